"""Replies to the kernel built byte for byte as libfuse builds them, for the C reader thread
to send in the daemon's place (cowfs/fuse/_fuse_fastopen.c, _fuse_fastlookup.c)."""

from __future__ import annotations

import struct
from typing import Any

_ATTR = struct.Struct("<3Q3q10I")  # struct fuse_attr (libfuse's convert_stat)
_ATTR_OUT = struct.Struct("<QII")  # struct fuse_attr_out, before its fuse_attr
_ENTRY_OUT = struct.Struct("<QQQQII")  # struct fuse_entry_out, before its fuse_attr


def _seconds(timeout: float) -> tuple[int, int]:
    ns = int(timeout * 1e9)
    return ns // 10**9, ns % 10**9


def _attr(e: Any) -> bytes:
    """e: a pyfuse3.EntryAttributes."""
    (a_s, a_ns), (m_s, m_ns), (c_s, c_ns) = (divmod(t, 10**9) for t in (
        e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns))
    return _ATTR.pack(e.st_ino, e.st_size, e.st_blocks, a_s, m_s, c_s, a_ns, m_ns, c_ns,
                      e.st_mode, e.st_nlink, e.st_uid, e.st_gid, e.st_rdev & 0xFFFFFFFF,
                      e.st_blksize, 0)


def attr_out(e: Any) -> bytes:
    """A GETATTR answer (fuse_attr_out, 104 bytes)."""
    return _ATTR_OUT.pack(*_seconds(e.attr_timeout), 0) + _attr(e)


def entry_out(e: Any) -> bytes:
    """A LOOKUP answer (fuse_entry_out, 128 bytes)."""
    (e_s, e_ns), (a_s, a_ns) = _seconds(e.entry_timeout), _seconds(e.attr_timeout)
    return _ENTRY_OUT.pack(e.st_ino, e.generation, e_s, a_s, e_ns, a_ns) + _attr(e)


_DIRENT = struct.Struct("<QQII")  # struct fuse_dirent, before its name
_ATTR_INO = 40  # offset of fuse_attr.ino in fuse_entry_out
_ATTR_MODE = 100  # ... of fuse_attr.mode


def direntplus(entry: bytes, name: bytes, off: int) -> bytes:
    """One READDIRPLUS record (fuse_direntplus) from a LOOKUP answer, as libfuse's
    fuse_add_direntry_plus writes it: the entry, the dirent, the name padded to 8 bytes."""
    (ino,) = struct.unpack_from("<Q", entry, _ATTR_INO)
    (mode,) = struct.unpack_from("<I", entry, _ATTR_MODE)
    record = entry + _DIRENT.pack(ino, off, len(name), (mode & 0o170000) >> 12) + name
    return record + bytes(-len(record) % 8)
