"""A live mount's lease on the store files it serves, visible to gc in any mount namespace.

A mount daemon holds a shared flock on every manifest and venv-local object its lower
layer is built from, taken before its first read and held while it runs (swapped on
reload, released when the process ends, also by a crash). flock lives on the inode in the
one kernel, so gc sees it whether the mount is in a container, another mount namespace or
on a read-only view of the store that could record no gc root: a file gc cannot lock
exclusively is in use, and is kept. Leases are taken under the store lock (shared) and gc
runs under it exclusively, so no lease can start halfway through a collection.

Each lease also holds an open-file-description read lock (F_OFD_SETLK) on its files, which
flock does not see: a test for a conflicting write lock through the same descriptions ignores
the daemon's own and finds any other live mount's, in whatever namespace (`shared()`: is
sharing the store's page cache by passthrough worth it here).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

from cowfs.errors import StoreError
from cowfs.store.manifest import manifest_path
from cowfs.store.store import Store


class StoreLease:
    def __init__(self, fds: list[int]) -> None:
        self._fds = fds

    @classmethod
    def acquire(cls, store: Store, manifests: Iterable[str],
                objects: Iterable[str] = ()) -> StoreLease:
        paths = [manifest_path(store, i) for i in dict.fromkeys(manifests)]
        paths += [store.object_path(d) for d in dict.fromkeys(objects)]
        fds: list[int] = []
        try:
            with _store_lock(store):
                for path in paths:
                    try:
                        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:
                        raise StoreError(f"{path} is missing from the store (collected by "
                                         "gc, or the store was moved?): reinstall to restore "
                                         "it") from None
                    fds.append(fd)
                    fcntl.flock(fd, fcntl.LOCK_SH)
                    _ofd_lock(fd, fcntl.F_RDLCK)
        except BaseException:
            cls(fds).release()
            raise
        return cls(fds)

    def __len__(self) -> int:
        return len(self._fds)

    def shared(self) -> bool:
        """Does another live mount serve any of these store files?"""
        return any(_ofd_lock(fd, fcntl.F_WRLCK, test=True) for fd in self._fds)

    def release(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


@contextlib.contextmanager
def _store_lock(store: Store) -> Iterator[None]:
    """The store lock (shared) where it exists; a read-only store without one has no gc."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(store.lock())
        except (FileNotFoundError, PermissionError):
            pass
        yield


_FLOCK = struct.Struct("hhqqi4x")  # struct flock (x86-64 and aarch64 layouts)


def _ofd_lock(fd: int, kind: int, test: bool = False) -> bool:
    """Take an OFD lock of the whole file; with test, whether another holds a conflicting one
    (False where OFD locks are not supported)."""
    try:
        out = fcntl.fcntl(fd, fcntl.F_OFD_GETLK if test else fcntl.F_OFD_SETLK,
                          _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0))
    except OSError:
        return False
    return test and _FLOCK.unpack(out)[0] != fcntl.F_UNLCK


def in_use(path: Path) -> bool:
    """Whether a live mount holds a lease on this store file (gc, under the store lock)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
