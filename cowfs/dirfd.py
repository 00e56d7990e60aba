"""Directory handles for the daemon's syscalls: layer roots held open, paths of any depth.

The daemon acts on its layers relative to directory handles, not absolute path strings.
Each layer root (upper, work, every lower directory, the store's objects) is opened once as
an O_PATH directory fd, a `Root`, kept as long as its layer object. A path inside the layer
resolves to an `At` pair (dir_fd, name) for the *at syscalls (`os.lstat(name, dir_fd=fd)`,
`os.open`, `os.rename(src_dir_fd=, dst_dir_fd=)`...): while the path is short, (root fd,
path), one call in which the kernel walks only the part inside the layer. A deeper one (a
caller may use PATH_MAX-1 bytes relative to a deep working directory in the mount, and the
daemon's path is longer) resolves to an O_PATH handle of its parent directory and the last
component, so it works at any depth. xattrs have no *at form: `proc(at)` names the entry
/proc/self/fd/N/NAME, where the kernel resolves only N, a magic link to the directory
itself (never a path string), so follow_symlinks=False still applies to NAME.

Parent handles are found by walking down with openat in chunks from the nearest cached
ancestor. A bounded LRU keeps the directories in use: a deep tree is walked level by level,
so the parent is usually cached. Callers keep a pair for the length of one operation, never
longer; so a dropped handle (a root's too) is not closed at once but retired, and closed
only after RETIRED_MAX others were retired: its number is never reused under a pair that is
still being used (worker threads included).

Whoever renames or removes a directory calls `Root.forget(rel)`; a handle whose directory
was removed behind our back (st_nlink 0) is dropped when next used. `short(path)` does the
same for an absolute path string, for tools outside the daemon that keep paths (installer).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import struct
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterator

# Paths from this many bytes on go through a parent's handle (headroom below PATH_MAX for
# the /proc/self/fd/N/ prefix and a 255-byte name). COWFS_DIRFD_FROM=0 sends every path
# through a cached parent handle (the test suite uses it to exercise the deep case).
LONG = int(os.environ.get("COWFS_DIRFD_FROM", "3584"))
CHUNK = 3072  # bytes of path opened per openat while walking down
CACHE_MAX = 128
RETIRED_MAX = 128
_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_SURELY_SHORT = LONG // 4
AT_FDCWD = -100
_ABSOLUTE = 0  # the cache's root id of absolute paths (short)

At = tuple[int, str]  # (directory fd, name relative to it): use at once, do not keep

_lock = threading.Lock()
_cache: OrderedDict[tuple[int, bytes], int] = OrderedDict()  # (root id, dir path) -> fd
_retired: deque[int] = deque()
_ids = itertools.count(_ABSOLUTE + 1)
_live: weakref.WeakSet[Root] = weakref.WeakSet()  # (for release_under)


def _is_short(path: str) -> bool:
    # (Hot: every layer path comes here. A character is at most 4 bytes in UTF-8.)
    return len(path) < _SURELY_SHORT or len(os.fsencode(path)) < LONG


class Root:
    """A layer's root directory, held open as long as this object (roots of layers that are
    replaced, a reloaded lower say, are retired with the object)."""

    __slots__ = ("__weakref__", "_id", "fd", "path")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(path)  # for messages, and whoever must name it to others
        self.fd = os.open(self.path, _DIR)
        self._id = next(_ids)
        _live.add(self)

    def __del__(self) -> None:
        if self.fd >= 0:
            _retire(self.fd)

    def at(self, rel: str) -> At:
        """The entry at rel ("" is the root itself) for an *at syscall. Never fails itself:
        where a deep walk stops (a missing or non-directory component), the pair leads the
        caller's own syscall to fail there, with the errno the full path would give."""
        if not rel:
            return self.fd, "."
        if _is_short(rel):
            return self.fd, rel
        parent, _, name = os.fsencode(rel).rpartition(b"/")
        with _lock:
            fd, failed = _walk(self._id, self.fd, parent)
        return fd, os.fsdecode(b"%s/%s" % (failed, name) if failed else name)

    def proc(self, rel: str) -> str:
        return proc(self.at(rel))

    def forget(self, rel: str) -> None:
        """The directory at rel (and everything below it) was renamed or removed."""
        _forget(self._id, os.fsencode(rel))


def proc(at: At) -> str:
    """A path string of the entry, for the calls without an *at form (xattrs)."""
    return f"/proc/self/fd/{at[0]}/{at[1]}"


_libc = ctypes.CDLL(None, use_errno=True)
_STATX_BTIME, _AT_SYMLINK_NOFOLLOW = 0x800, 0x100


def birth_ns(at: At) -> int:
    """When the entry was created (statx btime), 0 where the filesystem does not say. Tells a
    directory made again under the same name, even with its old inode number, from the old
    one."""
    buf = ctypes.create_string_buffer(256)  # struct statx
    if _libc.statx(at[0], os.fsencode(at[1]), _AT_SYMLINK_NOFOLLOW, _STATX_BTIME, buf) != 0:
        return 0
    mask, = struct.unpack_from("<I", buf, 0)
    if not mask & _STATX_BTIME:
        return 0
    sec, nsec = struct.unpack_from("<qI", buf, 80)  # stx_btime
    return sec * 1_000_000_000 + nsec


def lexists(at: At) -> bool:
    try:
        os.lstat(at[1], dir_fd=at[0])
    except OSError:
        return False
    return True


def open_dir(at: At) -> int:
    """A readable fd of the directory (os.scandir and os.listdir take it; O_PATH will not)."""
    return os.open(at[1], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=at[0])


@contextlib.contextmanager
def opendir(at: At) -> Iterator[int]:
    fd = open_dir(at)
    try:
        yield fd
    finally:
        os.close(fd)


def listdir(at: At) -> list[str]:
    with opendir(at) as fd:
        return os.listdir(fd)


def short(path: str) -> str:
    """A name of the absolute path the kernel accepts: the path itself while it is short,
    else /proc/self/fd/N/NAME with N a handle of its parent. Never fails itself (see at)."""
    if _is_short(path):
        return path
    parent, _, name = os.fsencode(path).rpartition(b"/")
    with _lock:
        fd, failed = _walk(_ABSOLUTE, -1, parent or b"/")
    if fd < 0:
        return os.fsdecode(b"%s/%s" % (failed, name))
    return os.fsdecode(b"/proc/self/fd/%d/%s" % (fd, b"%s/%s" % (failed, name) if failed
                                                   else name))


def forget(path: str) -> None:
    """The directory at the absolute path (and everything below it) was renamed or removed."""
    _forget(_ABSOLUTE, os.fsencode(path))


def clear() -> None:
    """Drop every cached handle (for whoever replaced a whole tree, and for tests)."""
    with _lock:
        while _cache:
            _retire(_cache.popitem()[1])


def release_under(path: str | os.PathLike[str]) -> None:
    """Close now every held root at or below path, every cached handle and every retired
    one: only where nothing can still be using them (a test about to unmount the filesystem
    they are on, while pytest still holds its in-process overlays)."""
    prefix = os.path.join(os.path.abspath(path), "")
    for root in list(_live):
        if root.fd >= 0 and os.path.join(root.path, "").startswith(prefix):
            fd, root.fd = root.fd, -1
            os.close(fd)
    clear()
    while _retired:
        with contextlib.suppress(IndexError):
            os.close(_retired.popleft())


def _forget(root: int, key: bytes) -> None:
    if not _cache:
        return
    below = key + b"/" if key else b""
    with _lock:
        for k in [k for k in _cache if k[0] == root and (k[1] == key or
                                                          k[1].startswith(below))]:
            _retire(_cache.pop(k))


def _retire(fd: int) -> None:
    # Needs no lock (a collection may drop a Root while _lock is held): deque operations
    # are atomic, and two threads trimming at once close distinct fds.
    _retired.append(fd)
    while len(_retired) > RETIRED_MAX:
        with contextlib.suppress(IndexError):
            os.close(_retired.popleft())


def _alive(fd: int) -> bool:
    """Is the directory still linked? (A FUSE upper may answer a removed one with an error.)"""
    try:
        return os.fstat(fd).st_nlink > 0
    except OSError:
        return False


def _cached(key: tuple[int, bytes]) -> int | None:
    fd = _cache.get(key)
    if fd is None:
        return None
    if _alive(fd):
        _cache.move_to_end(key)
        return fd
    _retire(_cache.pop(key))  # removed behind our back: walk again
    return None


def _keep(key: tuple[int, bytes], fd: int) -> None:
    _cache[key] = fd
    while len(_cache) > CACHE_MAX:
        _retire(_cache.popitem(last=False)[1])


def _walk(root: int, root_fd: int, path: bytes) -> tuple[int, bytes]:
    """(a cached O_PATH handle of the directory at path, b""): path is relative to root_fd,
    or absolute for _ABSOLUTE. Where the walk fails: (the deepest directory reached, the
    part that failed to open), or (-1, path) when a short absolute path fails. Under _lock."""
    fd = _cached((root, path))
    if fd is not None:
        return fd, b""
    # The nearest ancestor that is cached, the root, or short enough to open by name.
    base = path
    while (fd := _cached((root, base))) is None:
        if not base:
            fd = root_fd
            break
        if len(base) < LONG or base == b"/":
            try:
                fd = os.open(base, _DIR, dir_fd=None if root == _ABSOLUTE else root_fd)
            except OSError:
                return (-1, base) if root == _ABSOLUTE else (root_fd, base)
            _keep((root, base), fd)
            break
        base = base.rpartition(b"/")[0] or (b"/" if root == _ABSOLUTE else b"")
    rest = path[len(base):].lstrip(b"/")
    while rest:
        chunk = rest[:CHUNK]
        if len(rest) > CHUNK:
            chunk = chunk.rpartition(b"/")[0] or rest.partition(b"/")[0]
        try:
            nxt = os.open(chunk, _DIR, dir_fd=fd)
        except OSError:
            return fd, chunk
        base = b"%s/%s" % (base.rstrip(b"/"), chunk) if base else chunk
        rest = rest[len(chunk):].lstrip(b"/")
        if rest:  # an intermediate step: closed once walked past (retired, like any)
            _retire(nxt)
        else:
            _keep((root, base), nxt)
        fd = nxt
    return fd, b""
