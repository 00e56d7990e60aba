"""Ingest wheels into the store while the others are still downloading.

`fetch` hands each wheel over the moment it is complete and hash-checked; a wheel the store
knows already is a lookup, any other is unzipped, hashed and written by a worker thread
(zlib, hashing and file creation release the GIL), so the network and the disk work at
the same time. No threads at all when every wheel is warm: they would only add overhead.
The new manifests are written together once every wheel is in (one syncfs for all).
"""

from __future__ import annotations

import heapq
import os
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path

from cowfs.errors import CowfsError, StoreError
from cowfs.manifest import Dist, Manifest, write_manifests
from cowfs.store import Store
from installer.interpreters import InterpreterInfo
from installer.resolve import Pin
from installer.wheel import ingest_wheel, ingested_manifest


class Ingestor:
    """Collects one manifest per pin; `submit` is safe to call from fetch's threads."""

    def __init__(self, store: Store, info: InterpreterInfo) -> None:
        self.store, self.tags = store, info.tags
        self._known: dict[str, Dist] = {}
        self._futures: dict[str, Future[Dist]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._unwritten: list[Manifest] = []  # new manifests, written together by results()
        self._waiting: list[tuple[int, int, Path, Future[Dist]]] = []  # heap, largest first

    def submit(self, pin: Pin, path: Path) -> None:
        manifest = ingested_manifest(self.store, path, supported_tags=self.tags)
        size = path.stat().st_size
        with self._lock:
            if manifest is not None:
                self._known[pin.name] = manifest
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                                thread_name_prefix="cowfs-ingest")
            future: Future[Dist] = Future()
            heapq.heappush(self._waiting, (-size, len(self._futures), path, future))
            self._futures[pin.name] = future
            self._pool.submit(self._ingest_largest)

    def _ingest_largest(self) -> None:
        """Ingest the largest wheel waiting, not the first to arrive: the long ingests start
        first (local wheels all arrive at once), so the last to finish is a short one."""
        with self._lock:
            _, _, path, future = heapq.heappop(self._waiting)
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(ingest_wheel(self.store, path, supported_tags=self.tags,
                                           unwritten=self._unwritten))
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
        if self._unwritten:  # only once every wheel is in: a failure above writes none
            write_manifests(self.store, self._unwritten)
            self._unwritten.clear()
        return {p.name: self._known[p.name] for p in pins if p.name in self._known}

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
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            for *_, future in self._waiting:
                future.cancel()


__all__ = ["Ingestor"]
