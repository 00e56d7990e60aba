"""Load cowfs.fuse._fuse_shim ahead of pyfuse3, so that the kernel may cache listings and opens.

The shim (cowfs/fuse/_fuse_shim.c) must sit in the global symbol scope before pyfuse3's extension
binds libfuse (extension modules load with RTLD_NOW), so `preload()` runs before the first
`import pyfuse3` of the daemon. Without it (not built, loaded too late, or disabled with
COWFS_KERNEL_CACHE=0) the daemon answers OPEN/RELEASE and OPENDIR/RELEASEDIR as usual.

It also brings a C thread that reads /dev/fuse and answers the ioctl each `isatty()` of an
opened module sends without waking the trio loop (cowfs/fuse/_fuse_reader.c; COWFS_FUSE_READER=0
turns it off).
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

_shim: ModuleType | None = None


def preload() -> None:
    global _shim
    if _shim is not None or "pyfuse3" in sys.modules:
        return
    if os.environ.get("COWFS_KERNEL_CACHE", "1") == "0":
        return
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_GLOBAL)
    try:
        from cowfs.fuse import _fuse_shim  # type: ignore[attr-defined]
    except ImportError:
        return
    finally:
        sys.setdlopenflags(flags)
    _shim = _fuse_shim
    if os.environ.get("COWFS_FUSE_READER", "1") != "0":
        _shim.want_reader(True)


BY_INODE = 1 << 63  # a file handle that carries an inode number (see _fuse_shim.c)


def active() -> bool:
    """True when the live session hands readdir the directory's inode instead of a handle,
    and read/write/fsync `BY_INODE | inode` instead of the zero handle of a kernel open."""
    return _shim is not None and bool(_shim.active())


def loaded() -> bool:
    return _shim is not None


# FUSE passthrough (see cowfs/fuse/passthrough.py); only called when loaded().
def want_passthrough() -> None:
    """Ask for FUSE_PASSTHROUGH in the INIT reply (before the session starts)."""
    assert _shim is not None
    _shim.want_passthrough(True)


def passthrough_state() -> int:
    """0: not asked, 1: the kernel did not offer passthrough, 2: in the INIT reply."""
    return 0 if _shim is None else int(_shim.passthrough_state())


def backing_open(fd: int) -> int:
    """Register fd's file as a backing file on /dev/fuse (FUSE_DEV_IOC_BACKING_OPEN)."""
    assert _shim is not None
    return int(_shim.backing_open(fd))


def backing_close(backing_id: int) -> None:
    assert _shim is not None
    _shim.backing_close(backing_id)


def reader_state() -> tuple[bool, int]:
    """(the C reader thread runs, ioctls it answered)."""
    if _shim is None:
        return False, 0
    running, answered = _shim.reader_state()
    return bool(running), int(answered)


# Passthrough opens the reader thread answers (cowfs/fuse/_fuse_fastopen.c); only while it runs.
FAST_NONE, FAST_BUSY, FAST_DRAINING = -1, -2, -3  # fast_stop's answers besides a backing id


def fast_available() -> bool:
    return reader_state()[0] and os.environ.get("COWFS_FAST_OPENS", "1") != "0"


def fast_publish(ino: int, backing_id: int, pid: int, attr_out: bytes) -> None:
    """The reader answers read-only opens of ino with backing_id from now on (the open being
    answered counts as the first), and its GETATTR with attr_out (a fuse_attr_out)."""
    assert _shim is not None
    _shim.fast_publish(ino, backing_id, pid, attr_out)


def fast_hold(ino: int, pid: int) -> tuple[int, bool]:
    """Count one more open of ino's entry: (its backing id, or -1 when there is none;
    whether the reader serves it, or it drains)."""
    assert _shim is not None
    backing_id, serving = _shim.fast_hold(ino, pid)
    return int(backing_id), bool(serving)


def fast_first_opens() -> None:
    """The reader registers the backing file of a published name's first open itself."""
    assert _shim is not None
    _shim.fast_first_opens(True)


def read_ahead(ino: int, backing_fd: int) -> None:
    """An open of ino, a published name, on its store object: as the reader does at a
    first open, read ahead what a walk reads next if the object's pages are cold."""
    if _shim is not None:
        _shim.read_ahead(ino, backing_fd)


def fast_block(ino: int, on: bool) -> None:
    """While the daemon has cached opens of ino (on), the reader makes no entry for it: the
    kernel refuses a passthrough open of an inode with cached opens."""
    if _shim is not None:
        _shim.fast_block(ino, on)


def fast_stop_all() -> None:
    """Stop every entry: idle ones are closed, those in use drain."""
    if _shim is not None:
        _shim.fast_stop_all()


def fast_stop(ino: int, force: bool, pid: int = 0) -> int:
    """Stop answering opens of ino: its backing id when no open used it (the entry is gone,
    the id is the caller's), FAST_NONE, FAST_BUSY (opens use it; not stopped unless force,
    or the one open is pid's), or FAST_DRAINING (stopped; the reader closes the id at the
    last release)."""
    assert _shim is not None
    return int(_shim.fast_stop(ino, force, pid))


def fast_totals() -> tuple[int, int, int, int, int]:
    """(published entries, opens they count, opens and GETATTRs the reader answered, entries
    it made at a first open)."""
    if _shim is None:
        return 0, 0, 0, 0, 0
    return tuple(int(v) for v in _shim.fast_totals())  # type: ignore[return-value]


# Lookups the reader thread answers (cowfs/fuse/_fuse_fastlookup.c); only while it runs.
def dir_publish(parent: int, items: list[tuple[bytes, int, bytes, bytes]],
                negative: bytes | None = None) -> int:
    """The reader answers LOOKUP of these (name, ino, fuse_entry_out, backing file path or
    b"") in parent, and GETATTR of those inos (and, once allowed, their first opens); how
    many were added. With a negative fuse_entry_out, items are all of parent's names: the
    reader answers a LOOKUP of any other name with it."""
    assert _shim is not None
    return int(_shim.dir_publish(parent, items, negative))


def dir_listing(parent: int, records: bytes) -> bool:
    """The reader answers READDIRPLUS of parent (a kernel open) with these fuse_direntplus
    records (offsets 1, 2, ...: cowfs.fuse.kernel_replies.direntplus), counting a lookup for each
    entry it sends but the dots."""
    assert _shim is not None
    return bool(_shim.dir_listing(parent, records))


def dir_stop(parent: int) -> None:
    if _shim is not None:
        _shim.dir_stop(parent)


def dir_stop_all() -> None:
    if _shim is not None:
        _shim.dir_stop_all()


def lookups_of(ino: int, take: bool) -> int:
    """Lookups of ino the reader answered since last taken (take: the caller counts them)."""
    return 0 if _shim is None else int(_shim.lookups_of(ino, take))


def lookup_totals() -> tuple[int, int, int, int, int, int, int, int]:
    """(published names, lookups answered, negative lookups answered, GETATTRs of them
    answered, READs answered, READDIRPLUS answered, store objects read ahead, read-aheads
    dropped: queue full)."""
    if _shim is None:
        return 0, 0, 0, 0, 0, 0, 0, 0
    return tuple(int(n) for n in _shim.lookup_totals())  # type: ignore[return-value]
