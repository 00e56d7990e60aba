"""Dropping a venv's private changes: remove upper entries and bring the nodes back in line.

Costs O(changes): only the named upper entries are touched. Node inode numbers survive a
reset (the pristine file keeps the number the edited one had), and the kernel is told to
drop the cached pages, attributes and dentries involved.
"""

from __future__ import annotations

import os
import shutil
import stat

from cowfs import dirfd
from cowfs.overlay.inode import Node
from cowfs.overlay.lower import join
from cowfs.overlay.overlay import Overlay
from cowfs.overlay.super import Invalidation
from cowfs.store.manifest import check_relpath

# Expectations besides a file's identity: ABSENT; DIR, any directory; a directory's own
# identity, DIR:inode:birth (a directory uv removed and made again is another one).
ABSENT, DIR = "absent", "dir"
Expectation = list[int] | str


def upper_identity(upper: str | os.PathLike[str], rel: str) -> Expectation:
    """What the upper entry rel is now, for a reset that must not drop a newer one."""
    return _identity((dirfd.AT_FDCWD, dirfd.short(f"{os.fspath(upper)}/{rel}")))


def _identity(at: dirfd.At) -> Expectation:
    try:
        st = os.lstat(at[1], dir_fd=at[0])
    except (FileNotFoundError, NotADirectoryError):  # (below a whiteout)
        return ABSENT
    if stat.S_ISDIR(st.st_mode):
        return f"{DIR}:{st.st_ino}:{dirfd.birth_ns(at)}"
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _as_expected(at: dirfd.At, want: Expectation | None) -> bool:
    if isinstance(want, str) and want.startswith(DIR):
        # Dropped once empty (what was in it was examined) if it is still the one examined:
        # a new empty one is another installer's, about to be filled.
        try:
            return (want == DIR or _identity(at) == want) and not dirfd.listdir(at)
        except (FileNotFoundError, NotADirectoryError):
            return False
    return want is not None and _identity(at) == want


def reset_paths(ov: Overlay, paths: list[str], expect: dict[str, Expectation] | None = None
                ) -> tuple[Invalidation, list[str]]:
    """Drop the upper entries of paths. With expect (absorb's), a path is dropped only while
    its upper entry is what the caller examined (a file's identity; ABSENT: only a whiteout
    marker; DIR: a directory, dropped once empty, so children come first): another
    installer may have written it since. The daemon runs this between two FUSE requests,
    so the check and the removal see the same tree."""
    inv = Invalidation()
    removed: list[str] = []
    for raw in paths:
        path = check_relpath(raw.strip("/"))
        if expect is not None and not _as_expected(ov.upper.at(path), expect.get(raw)):
            continue
        st = ov.upper.lstat(path)
        if st is None and not ov.upper.remove_whiteout(path):
            continue
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                dir_fd, name = ov.upper.at(path)
                shutil.rmtree(name, dir_fd=dir_fd)
                ov.upper.moved(path)
            else:
                ov.upper.remove(path, is_dir=False)
        removed.append(path)
        parent = _known_parent(ov, path)
        if parent is not None:
            name = path.rpartition("/")[2]
            inv.entries.append((parent.ino, name))
            child = (parent.children or {}).get(name)
            if child is not None:
                _revalidate(ov, parent, name, child, path, inv)
            inv.inodes.append(parent.ino)
    return inv, removed


def _known_parent(ov: Overlay, path: str) -> Node | None:
    node = ov.root
    for part in path.split("/")[:-1]:
        nxt = (node.children or {}).get(part)
        if nxt is None:
            return None
        node = nxt
    return node


def _revalidate(ov: Overlay, parent: Node, name: str, node: Node, path: str,
                inv: Invalidation) -> None:
    """Re-resolve one known node after its upper entry went away."""
    entry = ov.lower.lookup(path) if parent.lower is not None else None
    is_dir = node.children is not None
    if ov.upper.lstat(path) is not None:
        return  # still has an upper entry (not reset)
    if entry is None or entry.is_dir != is_dir:
        ov.table.unlink(parent, name)
        inv.entries.append((parent.ino, name))
        return
    node.upper = False
    node.lower = entry
    inv.inodes.append(node.ino)
    for h in (ov.handles[fh] for fh in node.handles or ()):
        if not h.writable and entry.source is not None:
            # Readers see the pristine file on their next read, as on their next open.
            dir_fd, name = entry.at()
            new = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
            os.dup2(new, h.fd)
            os.close(new)
            h.on_lower = True
    for child_name, child in list((node.children or {}).items()):
        if child.parent is node and child.name == child_name:
            _revalidate(ov, node, child_name, child, join(path, child_name), inv)
