"""Paths of any depth for the daemon's own syscalls, through directory handles.

A caller inside the mount may use a path of PATH_MAX-1 bytes relative to a deep working
directory; the daemon's path to the same entry (layer root + path in the mount) is longer
and the kernel refuses it (ENAMETOOLONG). `short(path)` returns a name the kernel accepts
for the same entry: the path itself while it is short (the common case: no extra cost),
else `/proc/self/fd/N/NAME`, where N is an O_PATH handle of NAME's parent directory. The
kernel resolves that magic link to the directory itself (never to a path string), so it
works at any depth and for every path-taking call (lstat, open, rename, xattrs, utime...).

Handles are found by walking down with openat in chunks from the nearest cached ancestor
(or from the deepest ancestor short enough to open by name). A bounded LRU keeps the
directories in use: a deep tree is walked level by level, so the parent is usually cached.
Callers keep strings, not handles, for the length of one operation; so a dropped handle is
not closed at once but retired, and closed only after RETIRED_MAX others were retired: its
number is never reused under a string that is still being used (worker threads included).

Whoever renames or removes a directory calls `forget(path)`; a handle whose directory was
removed behind our back (st_nlink 0) is dropped when next used. Store paths and short layer
paths never get here.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict, deque

# Paths from this many bytes on go through a directory handle (headroom below PATH_MAX for
# the suffixes callers append: "/.wh..wh..opq", a 255-byte name). COWFS_DIRFD_FROM=0 sends
# every path through handles (the test suite uses it to exercise this module everywhere).
LONG = int(os.environ.get("COWFS_DIRFD_FROM", "3584"))
CHUNK = 3072  # bytes of path opened per openat while walking down
CACHE_MAX = 128
RETIRED_MAX = 128
_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_SURELY_SHORT = LONG // 4

_lock = threading.Lock()
_cache: OrderedDict[bytes, int] = OrderedDict()
_retired: deque[int] = deque()


def short(path: str) -> str:
    """A name of the absolute path the kernel accepts (see the module docstring). It never
    fails itself: where the walk stops (a missing or non-directory component), the name
    leads the caller's own syscall to fail there, with the errno the full path would give."""
    # (Hot: every layer path comes here. A character is at most 4 bytes in UTF-8.)
    if len(path) < _SURELY_SHORT or len(os.fsencode(path)) < LONG:
        return path
    parent, _, name = os.fsencode(path).rpartition(b"/")
    with _lock:
        prefix = _parent(parent or b"/")
    return os.fsdecode(b"%s/%s" % (prefix, name))


def forget(path: str) -> None:
    """The directory at path (and everything below it) was renamed or removed."""
    if not _cache:
        return
    key = os.fsencode(path)
    below = key + b"/"
    with _lock:
        for k in [k for k in _cache if k == key or k.startswith(below)]:
            _retire(_cache.pop(k))


def clear() -> None:
    """Drop every cached handle (for whoever replaced a whole tree, and for tests)."""
    with _lock:
        while _cache:
            _retire(_cache.popitem()[1])


def _retire(fd: int) -> None:
    _retired.append(fd)
    _retire_overflow()


def _retire_overflow() -> None:
    while len(_retired) > RETIRED_MAX:
        os.close(_retired.popleft())


def _alive(fd: int) -> bool:
    """Is the directory still linked? (A FUSE upper may answer a removed one with an error.)"""
    try:
        return os.fstat(fd).st_nlink > 0
    except OSError:
        return False


def _cached(path: bytes) -> int | None:
    fd = _cache.get(path)
    if fd is None:
        return None
    if _alive(fd):
        _cache.move_to_end(path)
        return fd
    _retire(_cache.pop(path))  # removed behind our back: walk again
    return None


def _keep(path: bytes, fd: int) -> None:
    _cache[path] = fd
    while len(_cache) > CACHE_MAX:
        _retire(_cache.popitem(last=False)[1])


def _parent(path: bytes) -> bytes:
    """/proc/self/fd/N for the directory at the absolute path, N a cached O_PATH handle;
    where the walk fails, /proc/self/fd/N/REST with N the deepest directory reached and
    REST the part that failed to open. Under _lock."""
    fd = _cached(path)
    if fd is not None:
        return b"/proc/self/fd/%d" % fd
    # The nearest ancestor that is cached or short enough to open by name.
    base = path
    while (fd := _cached(base)) is None:
        if len(base) < LONG or base == b"/":
            try:
                fd = os.open(base, _DIR)
            except OSError:
                return base  # short: the caller's syscall fails here, as with the full path
            _keep(base, fd)
            break
        base = base.rpartition(b"/")[0] or b"/"
    rest = path[len(base):].lstrip(b"/")
    while rest:
        chunk = rest[:CHUNK]
        if len(rest) > CHUNK:
            chunk = chunk.rpartition(b"/")[0] or rest.partition(b"/")[0]
        try:
            nxt = os.open(chunk, _DIR, dir_fd=fd)
        except OSError:
            return b"/proc/self/fd/%d/%s" % (fd, chunk)
        base = base.rstrip(b"/") + b"/" + chunk
        rest = rest[len(chunk):].lstrip(b"/")
        if rest:  # an intermediate step: closed once walked past (retired, like any)
            _retired.append(nxt)
            _retire_overflow()
        else:
            _keep(base, nxt)
        fd = nxt
    return b"/proc/self/fd/%d" % fd
