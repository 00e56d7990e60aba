"""Reading and writing a remote's files: a directory, HTTP(S) (read only), or S3.

Every transport answers `read` with the bytes streamed into a file object (None when the
remote has no such file: HTTP 404, S3 NoSuchKey), so a large object never sits in memory.
Transient failures (connection refused or reset, timeouts, 5xx, 408/429, a body shorter
than its Content-Length) are retried with exponential backoff; what is left is one
RemoteError naming the remote and the file.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import quote, urlsplit

from cowfs.store.remote import RemoteError
from cowfs.tls import ssl_context

CHUNK = 1 << 20
RETRIES = 3  # extra attempts after a transient failure
BACKOFF_S = 0.2  # before the first retry, doubled for each further one
TIMEOUT_S = float(os.environ.get("COWFS_REMOTE_TIMEOUT", "30"))  # without data
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
T = TypeVar("T")


class Transient(Exception):
    """Worth another attempt; the message is reported if none is left."""


class Transport:
    """One remote's files by key ("objects/ab/cd...", "dists/x.json")."""

    writable = True

    def __init__(self, url: str) -> None:
        self.url = url

    def read(self, key: str, out: IO[bytes]) -> bool:
        """Stream the file into out (from its start, truncating it on a retry); False if
        the remote has no such file."""
        def attempt() -> bool:
            out.seek(0)
            out.truncate()
            return self._read_once(key, out)
        return self._retrying(key, attempt)

    def get(self, key: str) -> bytes | None:
        buf = io.BytesIO()
        return buf.getvalue() if self.read(key, buf) else None

    def put(self, key: str, data: bytes | Path) -> None:
        self._retrying(key, lambda: self._put_once(key, data))

    def keys(self, prefix: str) -> set[str]:
        """Every key under prefix (to skip what the remote has without asking one by one)."""
        return self._retrying(prefix, lambda: self._keys_once(prefix))

    def _retrying(self, key: str, fn: Callable[[], T]) -> T:
        for attempt in range(RETRIES + 1):
            try:
                return fn()
            except Transient as exc:
                if attempt == RETRIES:
                    raise RemoteError(f"remote {self.url}: {key}: {exc} "
                                      f"(after {RETRIES + 1} attempts)") from None
                time.sleep(BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    def _read_once(self, key: str, out: IO[bytes]) -> bool:
        raise NotImplementedError

    def _put_once(self, key: str, data: bytes | Path) -> None:
        raise NotImplementedError

    def _keys_once(self, prefix: str) -> set[str]:
        raise NotImplementedError


def _copy(src: IO[bytes], out: IO[bytes]) -> int:
    n = 0
    while chunk := src.read(CHUNK):
        out.write(chunk)
        n += len(chunk)
    return n


class DirTransport(Transport):
    """A local directory (a web server's document root, a shared filesystem)."""

    def __init__(self, url: str, root: Path) -> None:
        super().__init__(url)
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key

    def _read_once(self, key: str, out: IO[bytes]) -> bool:
        try:
            with open(self._path(key), "rb") as f:
                _copy(f, out)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise RemoteError(f"remote {self.url}: {key}: {exc.strerror}") from None
        return True

    def _put_once(self, key: str, data: bytes | Path) -> None:
        """Write beside, fsync, rename: readers and other pushers never see a partial file,
        and two hosts pushing the same key leave one complete copy."""
        final = self._path(key)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{os.urandom(4).hex()}")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as out:
                if isinstance(data, Path):
                    with open(data, "rb") as src:
                        _copy(src, out)
                else:
                    out.write(data)
                out.flush()
                os.fchmod(out.fileno(), 0o644)
                os.fsync(out.fileno())
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise RemoteError(f"remote {self.url}: cannot write {key}: {exc.strerror}") \
                from None

    def _keys_once(self, prefix: str) -> set[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return set()
        return {f"{prefix}{os.path.relpath(os.path.join(d, n), base)}"
                for d, _, names in os.walk(base) for n in names if not n.startswith(".")}


class HttpTransport(Transport):
    """Any static web server, CDN or public/presigned bucket endpoint: GET only."""

    writable = False

    def _read_once(self, key: str, out: IO[bytes]) -> bool:
        import http.client
        import urllib.error
        import urllib.request

        from cowfs import __version__

        # quoted: a local version's "+" must reach the server as itself, not as a space
        request = urllib.request.Request(f"{self.url.rstrip('/')}/{quote(key)}",
                                         headers={"User-Agent": f"cowfs/{__version__}"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S,
                                        context=ssl_context()) as resp:
                length = int(resp.headers.get("Content-Length") or -1)
                size = _copy(resp, out)
        except urllib.error.HTTPError as exc:
            if exc.code in (403, 404, 410):  # 403: S3 website and presigned prefixes
                return False
            if exc.code in _RETRY_STATUS:
                raise Transient(f"HTTP {exc.code} {exc.reason}") from None
            raise RemoteError(f"remote {self.url}: {key}: HTTP {exc.code} {exc.reason}") \
                from None
        except urllib.error.URLError as exc:
            raise Transient(str(getattr(exc.reason, "strerror", None) or exc.reason)) \
                from None
        except (OSError, http.client.HTTPException) as exc:
            raise Transient(getattr(exc, "strerror", None) or str(exc)
                            or type(exc).__name__) from None
        if 0 <= length != size:
            raise Transient(f"connection closed after {size} of {length} bytes")
        return True

    def _put_once(self, key: str, data: bytes | Path) -> None:
        raise RemoteError(f"remote {self.url} is read-only over HTTP: push to the directory "
                          "the web server serves, or to s3://")

    def _keys_once(self, prefix: str) -> set[str]:
        return set()  # a static server cannot list: callers ask for each file


class S3Transport(Transport):
    """s3://bucket/prefix through boto3 and the standard AWS configuration (credentials,
    region, AWS_ENDPOINT_URL for MinIO, Ceph or R2)."""

    def __init__(self, url: str, bucket: str, prefix: str) -> None:
        super().__init__(url)
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise RemoteError(f"remote {url} needs boto3: pip install 'cowfs[s3]'") from None
        self.bucket, self.prefix = bucket, prefix
        # botocore retries throttling, 5xx and dropped connections itself (standard mode)
        self.client = boto3.session.Session().client("s3", config=Config(
            retries={"max_attempts": RETRIES + 1, "mode": "standard"},
            connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S, max_pool_connections=16))

    def _error(self, key: str, exc: Exception) -> RemoteError:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code")
        what = f"{code}: {exc}" if code else str(exc)
        return RemoteError(f"remote {self.url}: {key}: {what}")

    def _retrying(self, key: str, fn: Callable[[], T]) -> T:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()  # retried by botocore already
        except (BotoCoreError, ClientError) as exc:
            raise self._error(key, exc) from None

    def _read_once(self, key: str, out: IO[bytes]) -> bool:
        from botocore.exceptions import ClientError

        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return False
            raise
        body: Any = resp["Body"]
        size = _copy(body, out)
        if size != resp.get("ContentLength", size):
            raise RemoteError(f"remote {self.url}: {key}: truncated ({size} of "
                              f"{resp['ContentLength']} bytes)")
        return True

    def _put_once(self, key: str, data: bytes | Path) -> None:
        if isinstance(data, Path):
            with open(data, "rb") as f:
                self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=f)
        else:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def _keys_once(self, prefix: str) -> set[str]:
        out: set[str] = set()
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix)
        for page in pages:
            out.update(o["Key"][len(self.prefix):] for o in page.get("Contents", ()))
        return out


def check_url(url: str) -> str:
    """A remote URL as given, or one RemoteError saying what is wrong with it."""
    if not url or url != url.strip() or any(c in url for c in "\0\n\r\t"):
        raise RemoteError(f"bad remote URL {url!r}")
    if url.startswith("/"):
        return url
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise RemoteError(f"bad remote URL {url!r}: {exc}") from None
    if parts.scheme in ("http", "https") and parts.hostname:
        return url
    if parts.scheme == "s3" and parts.netloc and not parts.query and not parts.fragment:
        return url
    if parts.scheme == "file" and parts.netloc in ("", "localhost") and parts.path:
        return url
    raise RemoteError(f"bad remote URL {url!r}: use https://..., http://..., s3://BUCKET/PREFIX,"
                      " or an absolute directory path")


def open_transport(url: str) -> Transport:
    parts = urlsplit(check_url(url))
    if parts.scheme in ("http", "https"):
        return HttpTransport(url)
    if parts.scheme == "s3":
        prefix = parts.path.strip("/")
        return S3Transport(url, parts.netloc, f"{prefix}/" if prefix else "")
    from urllib.parse import unquote

    return DirTransport(url, Path(unquote(parts.path) if parts.scheme else url))


def sha256_and_xxh3(f: IO[bytes]) -> tuple[str, str]:
    """(sha256, xxh3-128) of the rest of f: what a remote object is checked against."""
    import hashlib

    import xxhash

    sha, xxh = hashlib.sha256(), xxhash.xxh3_128()
    while chunk := f.read(CHUNK):
        sha.update(chunk)
        xxh.update(chunk)
    return sha.hexdigest(), xxh.hexdigest()
