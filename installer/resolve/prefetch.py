"""Download and ingest wheels while uv is still resolving (issue #15).

`uv pip compile` spends most of its time waiting on the index, and cowfs sits idle meanwhile;
after it, ingesting the wheels (unzip, hash, one store object per file) is the longest step.
uv's debug log (installer.resolve.resolve.UV_LOG) names each remote wheel whose metadata it reads
("No cache entry for: https://.../x.whl[.metadata]") and each wheel it selects ("Selecting:
x==1.0 [compatible] (x-1.0-py3-none-any.whl)"), well before the resolution ends. So:

* a remote wheel for this interpreter is downloaded by fetch's own download code (into
  wheels/.prefetch/ in the store), then ingested;
* a selected wheel found by its filename in a local find-links directory or file:// index
  is ingested where it lies.

This is speculation and changes nothing about the result: the pins are uv's lock as always,
`fetch` checks each wheel's sha256 (a file with the wrong bytes is downloaded again), and
the Ingestor hands a pin an ingestion made before only for the very same file (name and
stat fingerprint). The store's wheels/ holds only wheels that matched their pin's sha256 (the
local fast path installs from it without an index, other installs fetch into it): once the
pins are known, a download that is a pin's wheel and has its hash is moved there, where
fetch finds it, and the others are deleted, as all are if resolving failed.
Any error here is swallowed: the normal path then does the work and meets the error itself.
Downloads still running for wheels not in the pins are cancelled. Objects of wheels ingested
but not installed have no manifest: unreferenced, `cowfs gc` collects them. The store lock
(shared) is held from the first object written until the install's state names them: the
caller keeps this object open until `sync.apply` has returned.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import unquote, urljoin

from packaging.utils import InvalidWheelFilename, parse_wheel_filename

from cowfs.errors import CowfsError
from cowfs.store.store import Store
from installer.interpreters import InterpreterInfo
from installer.resolve.fetch import download, expected_hashes
from installer.resolve.index_config import IndexConfig, split_credentials, with_credentials
from installer.resolve.resolve import Pin, local_path
from installer.wheel import wheel_index
from installer.wheel.ingest import Ingestor
from installer.wheel.wheel_index import fingerprint

if TYPE_CHECKING:
    from installer.resolve.http_pool import Pool

ENV = "COWFS_PREFETCH"  # "0": no speculation (to compare, or to rule it out)
MAX_DOWNLOADS = 8
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_WHEEL_URL = re.compile(r"^DEBUG .*?(https?://\S+?\.whl)(?:\.metadata)?$")
_SELECTING = re.compile(r"^DEBUG Selecting: \S+ \[[^\]]*\] \(([^()\s/]+\.whl)\)$")
_HREF = re.compile(r"""href\s*=\s*["']([^"']+)["']""", re.I)


def parse(line: str) -> tuple[str, str] | None:
    """("url", wheel URL) for a remote wheel uv reads the metadata of, ("selected", wheel
    filename) for a wheel it selects; None for any other line."""
    line = _ANSI.sub("", line).rstrip()
    if m := _SELECTING.match(line):
        return "selected", m[1]
    if m := _WHEEL_URL.match(line):
        return "url", m[1]
    return None


class Prefetch:
    """Speculative downloads and ingestions for one install; a context manager (the store
    lock and the threads are released on exit). Inert until a resolution `begin`s."""

    def __init__(self, store: Store, info: InterpreterInfo) -> None:
        self.store, self.info = store, info
        self.ingest: Ingestor | None = None  # for sync.apply: it reuses what started here
        self.downloads: dict[str, tuple[threading.Event, Future[None]]] = {}  # by filename
        # filename -> (the file downloaded, its stat fingerprint and sha256)
        self._fetched: dict[str, tuple[Path, list[int], str]] = {}
        self._tags = frozenset(info.tags)
        self._located: set[str] = set()
        self._latest: dict[str, str] = {}  # project -> filename of its latest download
        self._sources: list[str] = []
        self._find_dirs: list[Path] = []
        self._index_dirs: list[Path] = []
        self._stack = ExitStack()
        self._spool: Path | None = None
        self._work: ThreadPoolExecutor | None = None
        self._http: Pool | None = None
        self._http_lock = threading.Lock()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def enabled(self) -> bool:
        """Whether a resolution by uv would be followed: not for a read-only store, nor
        when disabled."""
        if os.environ.get(ENV, "") == "0":
            return False
        return not (self.store.exists() and not self.store.writable())

    def begin(self, config: IndexConfig) -> bool:
        """Whether to follow the resolution (see enabled)."""
        if not self.enabled():
            return False
        try:
            self.store.ensure()
            self._stack.enter_context(self.store.lock())
        except (OSError, CowfsError):
            return False
        # Made at the first download and removed when empty: an install that downloads
        # nothing ahead (a refused one too) leaves the store as it found it.
        self._spool = self.store.wheels / ".prefetch"
        self.ingest = Ingestor(self.store, self.info)
        self._stack.callback(self.ingest.close)
        self._work = ThreadPoolExecutor(MAX_DOWNLOADS, thread_name_prefix="cowfs-prefetch")
        self._sources = config.urls()
        for link in config.find_links:
            if (path := local_path(link)) is not None:
                self._find_dirs.append(path)
        for url in (config.index_url, *config.extra_index_urls):
            if url and url.startswith("file:") and (path := local_path(url)) is not None:
                self._index_dirs.append(path)
        return True

    def line(self, text: str) -> None:
        """One line of uv's log (in the thread reading it: the work goes to the pool)."""
        seen = parse(text)
        if seen is None or self._work is None:
            return
        kind, value = seen
        filename = unquote(value.rsplit("/", 1)[-1]) if kind == "url" else value
        try:
            name, _, _, tags = parse_wheel_filename(filename)
        except InvalidWheelFilename:
            return
        if not any(str(tag) in self._tags for tag in tags):
            return
        if kind == "url":
            if filename not in self.downloads:
                # One download per project: when uv backtracks to another version, the
                # one it left is dropped (a resolution may pass over many large wheels).
                if (previous := self._latest.get(name)) is not None:
                    self.downloads[previous][0].set()
                self._latest[name] = filename
                abort = threading.Event()
                future = self._work.submit(self._download, value, filename, abort)
                self.downloads[filename] = (abort, future)
        elif filename not in self._located:
            self._located.add(filename)
            self._work.submit(self._ingest_local, filename)

    def _download(self, url: str, filename: str, abort: threading.Event) -> None:
        assert self.ingest is not None
        try:
            if (self.store.wheels / filename).is_file():  # fetch checks it, as it would
                self.ingest.speculate(self.store.wheels / filename)
                return
            name, version, _, _ = parse_wheel_filename(filename)
            bare, _ = split_credentials(url)  # uv's log may show them masked
            pin = Pin(name=name, version=str(version), filename=filename,
                      url=with_credentials(bare, self._sources))
            self._spool.mkdir(exist_ok=True)
            target = self._spool / filename
            digest = download(pin, target, abort, self._pool())
            self._fetched[filename] = (target, fingerprint(target.stat()), digest)
            if not abort.is_set():
                self.ingest.speculate(target)
        except Exception:  # _Aborted, a failed download: the normal path does it again
            pass

    def _ingest_local(self, filename: str) -> None:
        assert self.ingest is not None
        try:
            if (path := self._locate(filename)) is not None:
                self.ingest.speculate(path)
        except Exception:  # speculation only: fetch and the Ingestor meet any real error
            pass

    def _locate(self, filename: str) -> Path | None:
        """The local wheel uv selected: in a find-links directory, or linked by a file://
        index's project page (PEP 503)."""
        import html  # ~1 ms: not for warm installs, which never get here
        for directory in self._find_dirs:
            if (directory / filename).is_file():
                return directory / filename
        name = parse_wheel_filename(filename)[0]
        for index in self._index_dirs:
            page = index / name / "index.html"
            try:
                text = page.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            for href in _HREF.findall(text):
                link = html.unescape(href).split("#", 1)[0]
                if unquote(link.rsplit("/", 1)[-1]) == filename:
                    path = local_path(urljoin(page.as_uri(), link))
                    if path is not None and path.is_file():
                        return path
        return None

    def _pool(self) -> Pool:
        from installer.resolve.fetch import TIMEOUT
        from installer.resolve.http_pool import Pool

        with self._http_lock:  # one pool (kept-alive connections) for every download
            if self._http is None:
                self._http = Pool(TIMEOUT)
                self._stack.callback(self._http.close)
            return self._http

    def settle(self, pins: Sequence[Pin]) -> None:
        """The resolution is known: cancel what it does not need, let the rest finish, move
        each pin's wheel that has the pin's hash into wheels/ (fetch finds it there, a
        complete file), delete the other downloads."""
        if self._work is None or self.ingest is None:
            return
        by_file = {p.filename: p for p in pins}
        for filename, (abort, _) in self.downloads.items():
            if filename not in by_file:
                abort.set()
        self.ingest.drop_speculation(set(by_file))
        self._work.shutdown(wait=True, cancel_futures=True)
        for filename, (spooled, fp, digest) in self._fetched.items():
            pin = by_file.get(filename)
            expected = expected_hashes(pin) if pin is not None else frozenset()
            if pin is not None and (not expected or digest in expected):
                with contextlib.suppress(OSError):
                    self._publish(spooled, fp, digest)
        self._discard()

    def _publish(self, spooled: Path, fp: list[int], digest: str) -> None:
        """A pin's wheel into wheels/, where fetch finds it (unless one is there already:
        fetch checks that one, as it would have)."""
        assert self.ingest is not None
        st = spooled.stat()
        final = self.store.wheels / spooled.name
        if fingerprint(st) != fp or final.exists():  # replaced meanwhile: not ours
            return
        os.rename(spooled, final)
        moved = final.stat()
        self.ingest.moved(spooled, st, final, moved)
        wheel_index.put(self.store, final, moved, sha256=digest)  # the warm path's shortcut

    def _discard(self) -> None:
        """Delete what was downloaded and not published: never a pin's wheel that matched."""
        for spooled, fp, _ in self._fetched.values():
            with contextlib.suppress(OSError):
                if fingerprint(spooled.stat()) == fp:  # not another install's
                    spooled.unlink()
        self._fetched.clear()

    def close(self) -> None:
        for abort, _ in self.downloads.values():
            abort.set()
        if self._work is not None:
            self._work.shutdown(wait=True, cancel_futures=True)
        self._discard()
        if self._spool is not None:
            with contextlib.suppress(OSError):  # (another install's downloads keep it)
                self._spool.rmdir()
        self._stack.close()

__all__ = ["ENV", "Prefetch", "parse"]
