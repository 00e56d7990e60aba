"""Kept-alive HTTP(S) connections for wheel downloads, shared by fetch's threads.

urllib opens a connection per request: a DNS lookup, a TCP handshake and, for HTTPS, a TLS
handshake for every wheel. Here a connection whose response was read to its end goes back to
an idle list per (scheme, host, port), and the next download from that host reuses it.

A server may close an idle connection at any time; a request on a reused connection that
fails before any response arrived is sent once more on a new connection (as urllib3 does).
Redirects are followed (credentials only to the same scheme and host). Where urllib would
use a proxy (http_proxy / https_proxy / no_proxy), also after a redirect, urllib does.
"""

from __future__ import annotations

import contextlib
import http.client
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urljoin, urlsplit

from cowfs.tls import ssl_context

MAX_REDIRECTS = 10
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# what a server's close of an idle kept-alive connection looks like to the next request
_STALE = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
          http.client.BadStatusLine)

_Key = tuple[str, str, int]


class RedirectError(Exception):
    """Too many redirects, or one to what is not http(s)."""


class Pool:
    """Idle connections by (scheme, host, port); `get` is safe to call from any thread."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.opened = 0  # connections made, reused ones not counted
        self._idle: dict[_Key, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._proxies = urllib.request.getproxies()

    @contextlib.contextmanager
    def get(self, url: str, headers: Mapping[str, str]) -> Iterator[Any]:
        """The response to GET url, redirects followed: `status`, `headers`, `read1`. An error
        status raises urllib.error.HTTPError, like urlopen."""
        origin = urlsplit(url)[:2]
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts[:2] != origin:  # credentials only where they were given, and as safely
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            if self._proxied(url):
                request = urllib.request.Request(url, headers=dict(headers))
                with urllib.request.urlopen(request, timeout=self.timeout,
                                            context=ssl_context()) as resp:
                    yield resp
                return
            key = (parts.scheme, parts.hostname or "", parts.port or
                   (443 if parts.scheme == "https" else 80))
            target = parts.path or "/"
            if parts.query:
                target += f"?{parts.query}"
            conn, resp = self._request(key, target, headers)
            try:
                location = resp.getheader("Location")
                if resp.status in _REDIRECTS and location:
                    resp.read()  # drained, the connection can serve the next request
                    url = urljoin(url, location)
                    if urlsplit(url).scheme not in ("http", "https"):
                        raise RedirectError(f"redirected to {url}")
                    continue
                if not 200 <= resp.status < 300:  # a 3xx without Location too, as urllib
                    raise urllib.error.HTTPError(url, resp.status, resp.reason, resp.headers,
                                                 None)
                yield resp
                return
            finally:
                self._release(key, conn, resp)
        raise RedirectError(f"more than {MAX_REDIRECTS} redirects")

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def _proxied(self, url: str) -> bool:
        parts = urlsplit(url)
        return parts.scheme in self._proxies and not urllib.request.proxy_bypass(
            parts.hostname or "")

    def _request(self, key: _Key, target: str, headers: Mapping[str, str]) -> tuple[
            http.client.HTTPConnection, http.client.HTTPResponse]:
        with self._lock:
            idle = self._idle.get(key)
            conn = idle.pop() if idle else None
        if conn is not None:
            try:
                conn.request("GET", target, headers=dict(headers))
                return conn, conn.getresponse()
            except _STALE:
                conn.close()  # closed by the server while idle: once more, on a new one
        conn = self._connect(key)
        try:
            conn.request("GET", target, headers=dict(headers))
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def _connect(self, key: _Key) -> http.client.HTTPConnection:
        scheme, host, port = key
        with self._lock:
            self.opened += 1
        if scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                               context=ssl_context())
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    def _release(self, key: _Key, conn: http.client.HTTPConnection,
                 resp: http.client.HTTPResponse) -> None:
        """Back to the idle list if the response was read to its end, else closed."""
        complete = resp.length == 0 if resp.length is not None else resp.isclosed()
        if complete and not resp.will_close:
            resp.close()  # the response's file only: the socket stays with conn
            with self._lock:
                self._idle.setdefault(key, []).append(conn)
        else:
            conn.close()
