"""The attributes the daemon hands the kernel with each entry (pyfuse3.EntryAttributes)."""

from __future__ import annotations

import os
import stat

import pyfuse3

from cowfs.overlay.inode import Node
from cowfs.overlay.overlay import Attr

LOWER_TIMEOUT = 86400.0  # immutable for the mount's life
UPPER_TIMEOUT = 300.0  # changes only through this daemon, which keeps the kernel informed
NEGATIVE_TIMEOUT = 300.0


def entry(node: Node, a: Attr) -> pyfuse3.EntryAttributes:
    # Not cached: the kernel keeps entries and attributes for long, so each is built about
    # once per mount, and 200 bytes per node is a third of the daemon's growth.
    e = pyfuse3.EntryAttributes()
    e.st_ino = node.ino
    e.generation = 0
    e.st_mode = a.mode
    e.st_nlink = a.nlink
    e.st_uid = a.uid
    e.st_gid = a.gid
    e.st_rdev = a.rdev
    e.st_size = a.size
    e.st_blksize = 4096
    e.st_blocks = a.blocks
    e.st_atime_ns = a.atime_ns
    e.st_mtime_ns = a.mtime_ns
    e.st_ctime_ns = a.ctime_ns
    timeout = UPPER_TIMEOUT if node.upper else LOWER_TIMEOUT
    e.entry_timeout = timeout
    e.attr_timeout = timeout
    return e


def negative() -> pyfuse3.EntryAttributes:
    """The answer to a LOOKUP of a name that does not exist: the kernel caches the absence."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = 0
    e.entry_timeout = NEGATIVE_TIMEOUT
    return e


def entry_of(st: os.stat_result, ino: int = pyfuse3.ROOT_INODE) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = ino
    for f in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns",
              "st_mtime_ns", "st_ctime_ns"):
        setattr(e, f, getattr(st, f))
    return e


def stand_in(node: Node, under: os.stat_result) -> pyfuse3.EntryAttributes:
    """node as a deleter of its venv still sees it once its layer file is gone: a directory
    like the one under the mount (`under`), or an empty file."""
    e = entry_of(under, node.ino)
    if node.children is None:
        e.st_mode, e.st_nlink, e.st_size = stat.S_IFREG | 0o644, 1, 0
    return e
