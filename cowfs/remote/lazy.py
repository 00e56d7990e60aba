"""Objects fetched by a mount daemon on their first open (a lazy install from a remote).

An install from a remote writes the manifest with only the objects the installer reads
itself, plus `dists/<id>.remote` (the remote's URL and each object's sha256). When the
daemon opens a lower file whose object is not in the store yet, it asks `LazyObjects.fetch`:
the download runs in a worker thread (the event loop keeps serving every other request),
concurrent first opens of one object share one download, and the bytes are kept only once
they match their sha256 (cowfs.remote.pull.fetch_object). A file that cannot be fetched
gets EIO, with one log line naming it; the next open tries again.
"""

from __future__ import annotations

import errno
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from cowfs.errors import CowfsError
from cowfs.manifest import iter_manifests
from cowfs.store import Store, is_digest

if TYPE_CHECKING:  # the rest only once something is fetched: every venv daemon has this
    from cowfs.remote.transport import Transport

log = logging.getLogger("cowfs.remote")
RETRY_AFTER_S = 2.0  # a failed fetch answers EIO at once for this long (no retry storm)
_NOT_LAZY = "no remote recorded for it"  # a store object lost, not one to fetch


@dataclass
class _Fetch:
    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None


class LazyObjects:
    """The store objects a daemon may fetch, by digest, and the downloads in flight."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._origins: dict[str, tuple[str, str]] = {}  # digest -> (url, sha256)
        self._loaded: set[str] = set()  # distributions whose .remote was read
        self._transports: dict[str, Transport] = {}
        self._lock = threading.Lock()  # _origins and _transports, from worker threads
        self._inflight: dict[str, _Fetch] = {}  # event loop only
        self._failed: dict[str, float] = {}  # digest -> when its last fetch failed

    def _origin(self, digest: str) -> tuple[str, str] | None:
        from cowfs.remote.pull import read_origin

        with self._lock:
            if digest not in self._origins:  # a distribution installed since: read it
                for ident in iter_manifests(self.store):
                    if ident in self._loaded:
                        continue
                    self._loaded.add(ident)  # an origin is written before its manifest
                    if (o := read_origin(self.store, ident)) is not None:
                        self._origins.update((d, (o[0], sha)) for d, sha in o[1].items())
            return self._origins.get(digest)

    def _transport(self, url: str) -> Transport:
        from cowfs.remote.transport import open_transport

        with self._lock:
            if url not in self._transports:
                self._transports[url] = open_transport(url)
            return self._transports[url]

    def _download(self, digest: str, who: str) -> str | None:
        """In a worker thread: fetch the object; None when done, else why not."""
        from cowfs.remote.pull import fetch_object

        origin = self._origin(digest)
        if origin is None:
            return _NOT_LAZY
        url, sha256 = origin
        try:
            transport = self._transport(url)
            with self.store.lock():  # shared: gc waits until the object is in place
                # durable before it is named: it is served at once, and a name whose data
                # a crash lost would be served as it is (an install syncs before it refers)
                fetch_object(self.store, transport, url, digest, sha256, who, durable=True)
        except (CowfsError, OSError) as exc:
            return str(exc)
        return None

    async def fetch(self, source: str, path: str) -> bool:
        """Make the store object at `source` exist: False when it is no store object of a
        lazy install (the caller reports its own error); OSError(EIO) when it could not be
        fetched."""
        fan, name = source.rsplit("/", 2)[-2:]
        digest = fan + name
        if not is_digest(digest) or not source.startswith(str(self.store.objects) + "/"):
            return False
        if self.store.has(digest):
            return True  # another first open fetched it meanwhile
        if trio.current_time() - self._failed.get(digest, -RETRY_AFTER_S) < RETRY_AFTER_S:
            raise OSError(errno.EIO, f"cannot fetch {path}")  # logged a moment ago
        job = self._inflight.get(digest)
        if job is None:
            job = self._inflight[digest] = _Fetch()
            try:
                job.error = await trio.to_thread.run_sync(self._download, digest, path)
            finally:
                del self._inflight[digest]
                job.done.set()
            if job.error not in (None, _NOT_LAZY):
                log.warning("cannot fetch %s (object %s): %s", path, digest, job.error)
                self._failed[digest] = trio.current_time()
        else:
            await job.done.wait()
        if job.error == _NOT_LAZY:
            return False
        if job.error is not None:
            raise OSError(errno.EIO, f"cannot fetch {path}")
        return True
