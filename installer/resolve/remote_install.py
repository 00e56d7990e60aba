"""Installing from remotes: pins whose wheel hash is trusted, served by a manifest.

For each pin with a sha256 (a lock's `--hash`es, an index's hash), the distribution id is
known without the wheel (`name-version-sha256[:16]`, as ingestion names it). If the store
has that manifest, or a remote has it and it verifies (cowfs.store.remote.pull), the pin needs
no index lookup and no wheel: `prepare` sets those pins aside before anything is written,
and `Prepared.materialize` (under the store lock, in sync.apply) fetches their objects.
Only consulted when a remote is configured or $COWFS_REMOTE names one: without one,
installs behave exactly as before.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from cowfs.errors import CowfsError, StoreError
from cowfs.store.layer import read_head
from cowfs.store.manifest import Dist
from cowfs.store.remote import config, is_sha256
from cowfs.store.store import Store
from installer.resolve.resolve import Pin

if TYPE_CHECKING:  # the rest is imported only when a remote is configured (warm installs)
    from cowfs.store.remote.config import Remote
    from cowfs.store.remote.pull import RemoteDist
    from cowfs.store.remote.transport import Transport


FETCH_ENV = "COWFS_REMOTE_FETCH"  # lazy (default): on first open; eager: at install


def fetch_mode() -> str:
    mode = os.environ.get(FETCH_ENV, "") or "lazy"
    if mode not in ("lazy", "eager"):
        raise CowfsError(f"${FETCH_ENV} must be lazy or eager, not {mode!r}")
    return mode


def candidates(pin: Pin) -> list[tuple[str, str]]:
    """(distribution id, wheel sha256) for each wheel the pin may install."""
    try:
        version = str(Version(pin.version))
    except InvalidVersion:
        return []
    hashes = [pin.sha256] if pin.sha256 else list(pin.hashes)
    name = canonicalize_name(pin.name)
    return [(f"{name}-{version}-{h[:16]}", h) for h in hashes if is_sha256(h)]


def _compatible(head: Dist, tags: Sequence[str]) -> bool:
    return bool(set(head.tags) & set(tags))


@dataclass
class Prepared:
    local: dict[str, Dist] = field(default_factory=dict)  # pin name -> in the store
    remote: dict[str, RemoteDist] = field(default_factory=dict)  # pin name -> to fetch

    def materialize(self, store: Store, progress: bool = True) -> dict[str, Dist]:
        """Every prepared pin's manifest, fetching what the store lacks (caller holds the
        store lock)."""
        if not self.remote:  # (cowfs.store.remote.pull costs ~10 ms to import)
            return dict(self.local)
        from cowfs.store.remote.pull import materialize

        show = progress and sys.stderr.isatty()

        def draw(done: int, total: int, size: int) -> None:
            sys.stderr.write(f"\r\x1b[Kcowfs: fetching {done}/{total} objects from remotes "
                             f"({size / 1e6:.1f} MB)")

        count, _ = materialize(store, self.remote.values(), draw if show else None,
                               lazy=fetch_mode() == "lazy")
        if show and count:
            sys.stderr.write("\n")
        return {**self.local, **{n: rd.manifest for n, rd in self.remote.items()}}


def _local(store: Store, pin: Pin, tags: Sequence[str]) -> Dist | None:
    for ident, sha in candidates(pin):
        try:
            head = read_head(store, ident)
        except StoreError:
            continue
        if head.wheel_sha256 == sha and _compatible(head, tags):
            return head
    return None


def _remote(remotes: list[tuple[Remote, Transport]], pin: Pin, tags: Sequence[str]
            ) -> RemoteDist | None:
    from cowfs.store.remote.pull import find

    for remote, transport in remotes:
        for ident, sha in candidates(pin):
            rd = find(remote, transport, ident, sha)
            if rd is not None and _compatible(rd.manifest, tags):
                return rd
    return None


def prepare(store: Store, pins: Sequence[Pin], tags: Sequence[str], *, offline: bool = False
            ) -> tuple[list[Pin], Prepared]:
    """(the pins left to the index and wheels, those the store or a remote serves)."""
    remotes = config.for_reading(store)
    prepared = Prepared()
    if not remotes:
        return list(pins), prepared
    fetch_mode()  # a bad value is refused before anything is fetched
    opened = [] if offline else [(r, r.open()) for r in remotes]  # offline: the store only
    rest: list[Pin] = []
    asks: list[Pin] = []
    for pin in pins:
        if (head := _local(store, pin, tags)) is not None:
            prepared.local[pin.name] = head
        elif opened and candidates(pin):
            asks.append(pin)
        else:
            rest.append(pin)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8, thread_name_prefix="cowfs-remote") as pool:
        found = list(pool.map(lambda p: _remote(opened, p, tags), asks))
    for pin, rd in zip(asks, found, strict=True):
        if rd is None:
            rest.append(pin)
        else:
            prepared.remote[pin.name] = rd
    return rest, prepared


__all__ = ["Prepared", "candidates", "prepare"]
