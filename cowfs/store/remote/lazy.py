"""Objects fetched by a mount daemon on their first open (a lazy install from a remote).

An install from a remote writes the manifest with only the objects the installer reads
itself, plus `dists/<id>.remote` (the remote's URL and each object's sha256). When the
daemon opens a lower file whose object is not in the store yet, it asks `LazyObjects.fetch`:
the download runs in a worker thread (the event loop keeps serving every other request),
concurrent first opens of one object share one download, and the bytes are kept only once
they match their sha256 (cowfs.store.remote.pull.fetch_object). A file that cannot be fetched
gets EIO, with one log line naming it; the next open tries again.

The first object fetched of a distribution starts a background prefetch of the rest of
it, PREFETCH_PARALLEL at a time: an import reads dozens of a package's files one after
another, and fetching each only when it is opened made a first import of the reference
workload 2.2x slower than after an eager install (each file a round trip and an fsync).
Opens still fetch what they need at once, sharing a download already in flight.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from cowfs.errors import CowfsError
from cowfs.store.manifest import iter_manifests, read_manifest
from cowfs.store.store import Store, is_digest

if TYPE_CHECKING:  # the rest only once something is fetched: every venv daemon has this
    from cowfs.store.remote.transport import Transport

log = logging.getLogger("cowfs.store.remote")
RETRY_AFTER_S = 2.0  # a failed fetch answers EIO at once for this long (no retry storm)
PREFETCH_PARALLEL = 8  # background downloads at once (opens that wait do not count)
PREFETCH_ENV = "COWFS_REMOTE_PREFETCH"  # read by the daemon at mount; 0: only what is opened


def prefetch_parallel() -> int:
    try:
        return max(0, int(os.environ.get(PREFETCH_ENV, PREFETCH_PARALLEL)))
    except ValueError:
        return PREFETCH_PARALLEL
_NOT_LAZY = "no remote recorded for it"  # a store object lost, not one to fetch


def _mtime_ns(path: object) -> int | None:
    try:
        return os.stat(path).st_mtime_ns  # type: ignore[call-overload]
    except OSError:
        return None


@dataclass
class _Fetch:
    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None


class LazyObjects:
    """The store objects a daemon may fetch, by digest, and the downloads in flight."""

    def __init__(self, store: Store, prefetch: int = 0) -> None:
        self.store = store
        self.prefetch = prefetch  # background downloads at once; 0: none
        self._origins: dict[str, tuple[str, str]] = {}  # digest -> (url, sha256)
        self._loaded: set[str] = set()  # distributions whose .remote was read
        self._listed: int | None = None  # mtime of the manifests' directory when listed
        self._transports: dict[str, Transport] = {}
        self._lock = threading.Lock()  # _origins and _transports, from worker threads
        self._inflight: dict[str, _Fetch] = {}  # event loop only
        self._failed: dict[str, float] = {}  # digest -> when its last fetch failed
        self._dist_of: dict[str, str] = {}  # digest -> distribution id
        self._dirs: dict[str, dict[str, list[str]]] = {}  # id -> directory -> digests
        self._prefetched: set[tuple[str, str]] = set()  # (distribution, directory)
        self._prefetch_failed: set[str] = set()
        self._limiter = trio.CapacityLimiter(max(1, prefetch))
        self.nursery: trio.Nursery | None = None  # the daemon's: prefetches run in it

    def _origin(self, digest: str) -> tuple[str, str] | None:
        from cowfs.store.remote.pull import read_origin

        with self._lock:
            # A distribution installed since: read it. Only then: an object no install
            # left out (a lost one) re-listed the whole store on every open. (Within a
            # second of a change, always: mtimes are coarser than two writes apart.)
            listed = _mtime_ns(self.store.dists)
            if digest not in self._origins and (listed != self._listed or listed is None
                                                or time.time_ns() - listed < 1_000_000_000):
                self._listed = listed
                for ident in iter_manifests(self.store):
                    if ident in self._loaded:
                        continue
                    self._loaded.add(ident)  # an origin is written before its manifest
                    if (o := read_origin(self.store, ident)) is not None:
                        self._origins.update((d, (o[0], sha)) for d, sha in o[1].items())
                        self._dist_of.update(dict.fromkeys(o[1], ident))
            return self._origins.get(digest)

    def _transport(self, url: str) -> Transport:
        from cowfs.store.remote.transport import open_transport

        with self._lock:
            if url not in self._transports:
                self._transports[url] = open_transport(url)
            return self._transports[url]

    def _download(self, digest: str, who: str) -> str | None:
        """In a worker thread: fetch the object; None when done, else why not."""
        from cowfs.store.remote.pull import fetch_object

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
        error = await self._get(digest, path)
        if error == _NOT_LAZY:
            return False
        if error is not None:
            raise OSError(errno.EIO, f"cannot fetch {path}")
        self._prefetch_rest(digest, path)
        return True

    async def _get(self, digest: str, who: str, quiet: bool = False) -> str | None:
        """Download digest, or wait for the download in flight; None or why not."""
        job = self._inflight.get(digest)
        if job is not None:
            await job.done.wait()
            return job.error
        job = self._inflight[digest] = _Fetch()
        try:
            job.error = await trio.to_thread.run_sync(self._download, digest, who)
        finally:
            del self._inflight[digest]
            job.done.set()
        if job.error not in (None, _NOT_LAZY) and not quiet:  # (a prefetch leaves the
            # next open its own try and its own log line naming the file)
            log.warning("cannot fetch %s (object %s): %s", who, digest, job.error)
            self._failed[digest] = trio.current_time()
        return job.error

    def _prefetch_rest(self, digest: str, path: str) -> None:
        """The other files of path's directory in its distribution: what an import of a
        package or a module reads next (a whole distribution fetched 3x the bytes the
        workload's first import needs and slowed it down)."""
        ident = self._dist_of.get(digest)
        where = posixpath.dirname(path)
        if not self.prefetch or self.nursery is None or ident is None \
                or (ident, where) in self._prefetched:
            return
        self._prefetched.add((ident, where))
        self.nursery.start_soon(self._prefetch_dir, ident, where)

    async def _prefetch_dir(self, ident: str, where: str) -> None:
        # Off the request path: the manifest read and the store checks run in a thread.
        for other in await trio.to_thread.run_sync(self._not_here, ident, where):
            if other not in self._inflight and self.nursery is not None:
                self.nursery.start_soon(self._prefetch_one, other, ident)

    def _not_here(self, ident: str, where: str) -> list[str]:
        """The objects of ident's files in directory where that the store lacks."""
        with self._lock:
            if ident not in self._dirs:
                by_dir: dict[str, list[str]] = {}
                try:
                    files = read_manifest(self.store, ident).files
                except (CowfsError, OSError) as exc:  # a prefetch never fails an open
                    log.warning("prefetch of %s: %s", ident, exc)
                    files = ()
                for fe in files:
                    by_dir.setdefault(posixpath.dirname(fe.path), []).append(fe.digest)
                self._dirs[ident] = by_dir
            digests = self._dirs[ident].get(where, [])
        return [d for d in digests if not self.store.has(d)]

    async def _prefetch_one(self, digest: str, ident: str) -> None:
        async with self._limiter:
            if ident in self._prefetch_failed or self.store.has(digest) \
                    or digest in self._failed:
                return
            error = await self._get(digest, ident, quiet=True)
            if error is not None and ident not in self._prefetch_failed:
                self._prefetch_failed.add(ident)  # the rest is left to opens: one line
                log.warning("prefetch of %s stopped: %s", ident, error)
