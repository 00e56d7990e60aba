"""Ingest wheels into the store while the others are still downloading.

`fetch` hands each wheel over the moment it is complete and hash-checked; a wheel the store
knows already is a lookup, any other is unzipped, hashed and written by a worker thread
(zlib, hashing and file creation release the GIL), so the network and the disk work at
the same time. No threads at all when every wheel is warm: they would only add overhead.
The new manifests are written together once every wheel is in (one syncfs for all).

A wheel may also be ingested before any pin names it (`speculate`: installer.resolve.prefetch, while
the resolver runs). Ingestions are keyed by the file's name and full stat fingerprint, so a
pin handed the same unchanged file later gets that ingestion, and any other file is ingested
afresh. A speculation that failed is redone for the pin, whose error is then its own.
"""

from __future__ import annotations

import heapq
import itertools
import os
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path

from cowfs.errors import CowfsError, StoreError
from cowfs.store.manifest import Dist, Manifest, write_manifests
from cowfs.store.store import Store, sha256_file
from installer.interpreters import InterpreterInfo
from installer.resolve.fetch import expected_hashes, mismatch
from installer.resolve.resolve import Pin
from installer.wheel.wheel import ingest_wheel, ingested_manifest
from installer.wheel.wheel_index import fingerprint

_Key = tuple[str, tuple[int, ...]]  # (file name, stat fingerprint)


class Ingestor:
    """Collects one manifest per pin; `submit` is safe to call from fetch's threads."""

    def __init__(self, store: Store, info: InterpreterInfo) -> None:
        self.store, self.tags = store, info.tags
        self._known: dict[str, Dist] = {}
        self._futures: dict[str, Future[Dist]] = {}
        self._by_file: dict[_Key, Future[Dist]] = {}  # every ingestion started, pin or not
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        # New manifests by id, written by results() for the pins' wheels only: a speculative
        # one no pin took leaves unreferenced objects, which `cowfs gc` collects.
        self._unwritten: dict[str, Manifest] = {}
        self._waiting: list[tuple[int, int, Path, Future[Dist]]] = []  # heap, largest first
        self._order = itertools.count()  # first come first served among equal sizes
        self._closed = False
        self._paths: dict[str, Path] = {}  # the wheel submitted for each pin

    def submit(self, pin: Pin, path: Path) -> None:
        self._paths[pin.name] = path
        st = path.stat()
        key = (path.name, tuple(fingerprint(st)))
        with self._lock:
            started = self._by_file.get(key)
        if started is not None:  # ingested or ingesting already: this very file
            self._futures[pin.name] = self._adopt(started, path, st.st_size)
            return
        manifest = ingested_manifest(self.store, path, supported_tags=self.tags)
        with self._lock:
            if manifest is not None:
                self._known[pin.name] = manifest
                return
            self._futures[pin.name] = self._by_file[key] = self._queue(path, st.st_size)

    def speculate(self, path: Path) -> None:
        """Start ingesting a wheel no pin names yet, unless the store knows it already."""
        st = path.stat()
        key = (path.name, tuple(fingerprint(st)))
        with self._lock:
            if key in self._by_file:
                return
        if ingested_manifest(self.store, path, supported_tags=self.tags) is not None:
            return
        with self._lock:
            if key not in self._by_file:
                self._by_file[key] = self._queue(path, st.st_size)

    def moved(self, old: Path, old_st: os.stat_result, new: Path,
              new_st: os.stat_result) -> None:
        """The caller renamed a wheel it speculated on (same inode and contents, only the
        ctime changed): a pin handed it under the new name gets that ingestion still."""
        same = (old_st.st_dev, old_st.st_ino, old_st.st_size, old_st.st_mtime_ns) == \
            (new_st.st_dev, new_st.st_ino, new_st.st_size, new_st.st_mtime_ns)
        with self._lock:
            future = self._by_file.pop((old.name, tuple(fingerprint(old_st))), None)
            if future is None or not same or old.name != new.name:
                return
            self._by_file[new.name, tuple(fingerprint(new_st))] = future
            # one not started yet opens the file where it is now
            self._waiting = [(s, n, new if f is future else p, f)
                             for s, n, p, f in self._waiting]

    def drop_speculation(self, keep: set[str]) -> None:
        """Cancel speculative ingestions of wheels not named in keep that have not started."""
        with self._lock:
            for (name, _), future in self._by_file.items():
                if name not in keep:
                    future.cancel()

    def _queue(self, path: Path, size: int, future: Future[Dist] | None = None) -> Future[Dist]:
        """Queue an ingestion (caller holds the lock)."""
        if self._closed:
            raise RuntimeError("the ingestor is closed")
        future = future or Future()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                            thread_name_prefix="cowfs-ingest")
            # A new store's 256 fan-out directories, made beside the first wheel's objects
            # rather than one mkdir at a time in their way (not before: a refused install
            # leaves the store as it was).
            threading.Thread(target=self.store.make_fanout, name="cowfs-fanout",
                             daemon=True).start()
        heapq.heappush(self._waiting, (-size, next(self._order), path, future))
        self._pool.submit(self._ingest_largest)
        return future

    def _adopt(self, started: Future[Dist], path: Path, size: int) -> Future[Dist]:
        """A pin's future for an ingestion already started: its result, or if it failed or
        was cancelled (a speculation), an ingestion of the pin's own."""
        mine: Future[Dist] = Future()

        def done(f: Future[Dist]) -> None:
            if not f.cancelled() and f.exception() is None:
                mine.set_result(f.result())
                return
            with self._lock:
                if self._closed:  # the install failed meanwhile: nothing more is written
                    mine.cancel()
                else:
                    self._queue(path, size, mine)

        started.add_done_callback(done)
        return mine

    def _ingest_largest(self) -> None:
        """Ingest the largest wheel waiting, not the first to arrive: the long ingests start
        first (local wheels all arrive at once), so the last to finish is a short one."""
        with self._lock:
            _, _, path, future = heapq.heappop(self._waiting)
        if not future.set_running_or_notify_cancel():
            return
        try:
            new: list[Manifest] = []
            manifest = ingest_wheel(self.store, path, supported_tags=self.tags, unwritten=new)
            with self._lock:
                self._unwritten.update((m.id, m) for m in new)
            self.store.sync_behind()  # its objects head for the disk while others unpack
            future.set_result(manifest)
        except BaseException as exc:  # as ThreadPoolExecutor's workers do: results() raises it
            future.set_exception(exc)

    def results(self, pins: Sequence[Pin], progress: bool = True) -> dict[str, Dist]:
        """Every pin's manifest, once all are ingested (a bar on a terminal while it waits).
        A read-only store that lacks some is one error naming them all."""
        if progress and sys.stderr.isatty():
            self._show_progress()
        lacking = []
        for pin in pins:
            future = self._futures.get(pin.name)
            if future is None:
                continue
            try:
                self._known[pin.name] = future.result()
            except StoreError:
                if self.store.writable():
                    raise
                lacking.append(f"{pin.name}=={pin.version}")
        if lacking:
            raise CowfsError(f"the store {self.store.root} is read-only and does not hold "
                             f"{', '.join(lacking)}: install that where the store is "
                             "writable (a read-only store serves only what it holds)")
        for pin in pins:
            if pin.name in self._known:
                self._check_hash(pin, self._known[pin.name])
        # only once every wheel is in: a failure above writes none
        with self._lock:
            new = [m for p in pins if p.name in self._known
                   and (m := self._unwritten.pop(self._known[p.name].id, None)) is not None]
        if new:
            write_manifests(self.store, new)
        return {p.name: self._known[p.name] for p in pins if p.name in self._known}

    def _check_hash(self, pin: Pin, manifest: Dist) -> None:
        """The wheel's sha256, computed by its ingestion, is one the pin allows (fetch
        leaves local wheels unhashed for this: installer.resolve.fetch, check_local)."""
        expected = expected_hashes(pin)
        if not expected:
            return
        path = self._paths.get(pin.name)
        digest = manifest.wheel_sha256 or (sha256_file(path) if path is not None else "")
        if digest not in expected:
            where = f" for local file {path}" if path is not None else ""
            raise CowfsError(mismatch(pin, expected, digest) + where)

    def _show_progress(self) -> None:
        pending = [f for f in self._futures.values() if not f.done()]
        total, done = len(self._futures), len(self._futures) - len(pending)
        if not pending:
            return
        for _ in as_completed(pending):
            done += 1
            sys.stderr.write(f"\r\x1b[Kcowfs: ingesting {done}/{total} wheels into the store")
            sys.stderr.flush()
        sys.stderr.write("\n")

    def close(self) -> None:
        """Wait for running ingests (a wheel is ingested whole or not at all) and drop
        those not started: after a failed download nothing more is written."""
        with self._lock:
            self._closed = True  # no adopted ingestion is queued again from here on
            waiting = [future for *_, future in self._waiting]
        for future in waiting:
            future.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["Ingestor"]
