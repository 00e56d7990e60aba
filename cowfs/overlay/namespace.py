"""Namespace mutations of the overlay: create, mkdir, mknod, symlink, link, unlink, rmdir, rename.

Each one copies up what it touches (parents first), acts on the upper directory, leaves a
whiteout where a lower name must stay hidden, and updates the inode tree so inode numbers
follow the file. Renames of directories across layers materialise the directory in the
upper layer and mark it opaque: slower than overlayfs' redirect_dir, but never EXDEV and the
upper directory stays a self-describing tree.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from cowfs.dirfd import At, proc
from cowfs.overlay.inode import Node
from cowfs.overlay.lower import join
from cowfs.overlay.overlay import STRIP_OPEN, Overlay, oserror
from cowfs.overlay.upper import IS_ROOT, RENAME_EXCHANGE, RENAME_NOREPLACE


def _owner(ov: Overlay, parent: Node, uid: int, gid: int, mode: int) -> tuple[int, int, int]:
    """BSD-style group inheritance from a setgid parent, as ext4 does."""
    pmode = ov.getattr(parent).mode
    if pmode & stat.S_ISGID:
        gid = ov.getattr(parent).gid
        if stat.S_ISDIR(mode):
            mode |= stat.S_ISGID
    return uid, gid, mode


def _chown(at: At, uid: int, gid: int) -> None:
    if IS_ROOT:
        os.chown(at[1], uid, gid, dir_fd=at[0], follow_symlinks=False)


def _place(ov: Overlay, parent: Node, name: str, make: Callable[[At, bool], None]) -> str:
    """Create a new upper entry parent/name through make(target, over_whiteout).

    Over a whiteout the entry is built in the work dir and renamed into place, so the
    hidden lower entry never shows through, not even after a crash.
    """
    if ov.lookup(parent, name) is not None:
        raise oserror(errno.EEXIST)
    ov.copy_up(parent)
    path = join(ov.path(parent), name)
    st = ov.upper.lstat(path)
    over_whiteout = (st is not None and ov.upper.is_whiteout(path, st)) \
        or ov.upper.has_prefix_whiteout(path) or ov.lower_visible(parent, path)
    # Where cowfs keeps the metadata (cowfs.overlay.meta) the entry gets it before it appears.
    if over_whiteout or ov.upper.meta.active:
        tmp = ov.upper.temp()
        make(tmp, over_whiteout)
        ov.upper.install(tmp, path)
    else:
        make(ov.upper.at(path), False)
    return path


def _new_node(ov: Overlay, parent: Node, name: str, is_dir: bool) -> Node:
    (parent.children or {}).pop(name, None)
    node = ov.table.new(parent, name, None, upper=True)
    if is_dir:
        node.children = {}
    return node


def create(ov: Overlay, parent: Node, name: str, mode: int, flags: int, uid: int,
           gid: int) -> tuple[Node, int]:
    uid, gid, mode = _owner(ov, parent, uid, gid, mode)
    fds: list[int] = []

    def make(target: At, _: bool) -> None:
        # The creating open is the caller's handle: POSIX lets it write even when the new
        # mode is read-only, which a second open would refuse (to a non-root daemon).
        fd = os.open(target[1], (flags & ~(STRIP_OPEN | os.O_TRUNC)) | os.O_CREAT | os.O_EXCL
                     | os.O_CLOEXEC, 0o600, dir_fd=target[0])
        fds.append(fd)
        if IS_ROOT:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, stat.S_IMODE(mode))
        if ov.upper.meta.active:
            ov.upper.meta.record(None, fd=fd, mode=mode, uid=uid, gid=gid, fresh=True)

    try:
        _place(ov, parent, name, make)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    node = _new_node(ov, parent, name, is_dir=False)
    return node, ov.add_handle(node, fds[0], (flags & os.O_ACCMODE) != os.O_RDONLY,
                               on_lower=False)


def mkdir(ov: Overlay, parent: Node, name: str, mode: int, uid: int, gid: int) -> Node:
    uid, gid, mode = _owner(ov, parent, uid, gid, stat.S_IFDIR | mode)

    def make(target: At, over_whiteout: bool) -> None:
        os.mkdir(target[1], 0o700, dir_fd=target[0])
        _chown(target, uid, gid)
        if ov.upper.meta.active:
            ov.upper.meta.record(proc(target), mode=mode, uid=uid, gid=gid, fresh=True)
        if over_whiteout:
            # The lower directory of the same name must not merge into the new one.
            ov.upper.make_opaque_at(target)

    # The mode last: an unprivileged daemon could not move a 0555 directory out of the
    # work dir (rename rewrites its "..") nor mark it opaque.
    dir_fd, placed = ov.upper.at(_place(ov, parent, name, make))
    os.chmod(placed, stat.S_IMODE(mode), dir_fd=dir_fd)
    return _new_node(ov, parent, name, is_dir=True)


def mknod(ov: Overlay, parent: Node, name: str, mode: int, rdev: int, uid: int,
          gid: int) -> Node:
    uid, gid, mode = _owner(ov, parent, uid, gid, mode)

    def make(target: At, _: bool) -> None:
        os.mknod(target[1], stat.S_IFMT(mode) | 0o600, rdev, dir_fd=target[0])
        _chown(target, uid, gid)
        os.chmod(target[1], stat.S_IMODE(mode), dir_fd=target[0])
        _record_special(ov, target, mode, uid, gid)

    _place(ov, parent, name, make)
    return _new_node(ov, parent, name, is_dir=False)


def symlink(ov: Overlay, parent: Node, name: str, target_path: str, uid: int,
            gid: int) -> Node:
    uid, gid, _ = _owner(ov, parent, uid, gid, stat.S_IFLNK)

    def make(target: At, _: bool) -> None:
        os.symlink(target_path, target[1], dir_fd=target[0])
        _chown(target, uid, gid)
        _record_special(ov, target, 0o777, uid, gid)

    _place(ov, parent, name, make)
    return _new_node(ov, parent, name, is_dir=False)


def _record_special(ov: Overlay, at: At, mode: int, uid: int, gid: int) -> None:
    """The metadata of a new entry without user xattrs, where cowfs keeps it
    (cowfs.overlay.meta)."""
    if ov.upper.meta.active:
        ov.upper.meta.clear_side(proc(at))
        ov.upper.meta.record(proc(at), mode=mode, uid=uid, gid=gid, fresh=True)


def link(ov: Overlay, node: Node, parent: Node, name: str) -> Node:
    if node.children is not None:
        raise oserror(errno.EPERM)
    ov.copy_up(node)

    def make(target: At, _: bool) -> None:
        # The source named now: copying up parent may have walked many directories.
        src_fd, src = ov.upper.at(ov.path(node))
        os.link(src, target[1], src_dir_fd=src_fd, dst_dir_fd=target[0],
                follow_symlinks=False)  # (a symlink itself, as link(2) does)

    _place(ov, parent, name, make)
    dir_fd, placed = ov.upper.at(ov.path(node))
    st = os.lstat(placed, dir_fd=dir_fd)
    ov.table.by_upper_id[(st.st_dev, st.st_ino)] = node
    ov.table.add_link(node, parent, name)
    return node


def _remove(ov: Overlay, parent: Node, name: str, want_dir: bool) -> None:
    node = ov.child(parent, name)
    is_dir = node.children is not None
    if want_dir and not is_dir:
        raise oserror(errno.ENOTDIR)
    if not want_dir and is_dir:
        raise oserror(errno.EISDIR)
    if is_dir and not ov.is_empty_dir(node):
        raise oserror(errno.ENOTEMPTY)
    attr = ov.getattr(node)
    path = join(ov.path(parent), name)
    needs_whiteout = ov.lower_visible(parent, path)
    if node.upper and not is_dir:
        ov.removing_name(node, ov.path(parent))
        if ov.upper.meta.active:
            ov.upper.meta.forget(ov.upper.xpath(path))
    if node.upper and needs_whiteout:
        # Whiteouts inside a directory go with it (atomically): clearing them first would
        # let its lower content show through if we crashed before the whiteout is in place.
        ov.upper.replace_with_whiteout(path, is_dir)
    elif node.upper:
        if is_dir:
            ov.upper.clear_markers(path)  # nothing below to hide: only leftovers
        ov.upper.remove(path, is_dir)
    elif needs_whiteout:
        ov.copy_up(parent)
        ov.upper.make_whiteout(path)
    if parent.upper and needs_whiteout:  # (see _durable)
        ov.upper.fsync_dir(ov.path(parent))
    ov.forget_name(parent, name, attr)


def unlink(ov: Overlay, parent: Node, name: str) -> None:
    _remove(ov, parent, name, want_dir=False)


def rmdir(ov: Overlay, parent: Node, name: str) -> None:
    _remove(ov, parent, name, want_dir=True)


def _materialise(ov: Overlay, node: Node) -> None:
    """Copy a node fully into the upper layer; a directory also becomes opaque on disk."""
    ov.copy_up_tree(node)
    if node.children is not None:
        ov.upper.make_opaque(ov.path(node))
        node.lower = None


def _durable(src_whiteout: bool, src: Node, dst: Node | None) -> bool:
    """Whether a rename touches lower content (a whiteout left, a copy-up, an opaque
    directory): then it is fsynced at once, so a crash never shows a deleted or replaced
    lower entry again. A rename or unlink of upper-only entries is left to the filesystem's
    own ordering, as on any directory: a caller who needs it durable fsyncs the directory
    (FSYNCDIR). Fsyncing each one made every atomic write (temp file + rename, as uv and
    pip install files) cost a disk flush: ~1.5 ms a file."""
    return src_whiteout or src.lower is not None or (dst is not None and dst.lower is not None)


def rename(ov: Overlay, parent: Node, name: str, new_parent: Node, new_name: str,
           flags: int = 0) -> None:
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or \
            (flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE):
        raise oserror(errno.EINVAL)  # RENAME_WHITEOUT is the kernel overlay's, not a user's
    src = ov.child(parent, name)
    dst = ov.lookup(new_parent, new_name)
    if new_parent.children is None:
        raise oserror(errno.ENOTDIR)
    if flags & RENAME_NOREPLACE and dst is not None:
        raise oserror(errno.EEXIST)
    if flags & RENAME_EXCHANGE:
        if dst is None:
            raise oserror(errno.ENOENT)
        _exchange(ov, src, parent, name, dst, new_parent, new_name)
        return
    if dst is src:
        return  # two names of one file: POSIX says do nothing
    src_dir = src.children is not None
    if dst is not None:
        dst_dir = dst.children is not None
        if src_dir and not dst_dir:
            raise oserror(errno.ENOTDIR)
        if dst_dir and not src_dir:
            raise oserror(errno.EISDIR)
        if dst_dir and not ov.is_empty_dir(dst):
            raise oserror(errno.ENOTEMPTY)
    dst_attr = ov.getattr(dst) if dst is not None else None
    if dst is not None and dst.upper:
        ov.removing_name(dst, ov.path(new_parent))
    src_path = join(ov.path(parent), name)
    src_whiteout = ov.lower_visible(parent, src_path)
    durable = _durable(src_whiteout, src, dst)
    if src_dir:
        _materialise(ov, src)
    else:
        ov.copy_up(src)
    ov.copy_up(new_parent)
    dst_path = join(ov.path(new_parent), new_name)
    st = ov.upper.lstat(dst_path)
    if st is not None and stat.S_ISDIR(st.st_mode):
        if ov.upper.xattrs and dst is not None and dst.lower is not None:
            ov.upper.make_opaque(dst_path)  # a crash before the rename must not expose it
        ov.upper.clear_markers(dst_path)  # merged-empty: only whiteouts may be left in it
    elif st is not None and src_dir:
        ov.upper.remove(dst_path, is_dir=False)  # a whiteout file; the dir is opaque already
    elif st is None:
        ov.upper.remove_whiteout(dst_path)  # prefix-format marker, if any
    elif ov.upper.meta.active:
        ov.upper.meta.forget(ov.upper.xpath(dst_path))  # replaced: its side record goes
    if src_whiteout:
        ov.upper.rename_leaving_whiteout(src_path, dst_path)
    else:
        ov.upper.rename(src_path, dst_path)
    if durable:
        ov.upper.fsync_dir(ov.path(parent))
        if new_parent is not parent:
            ov.upper.fsync_dir(ov.path(new_parent))
    if dst is not None:
        ov.forget_name(new_parent, new_name, dst_attr)
    ov.table.move(src, parent, name, new_parent, new_name)


def _exchange(ov: Overlay, a: Node, a_parent: Node, a_name: str, b: Node, b_parent: Node,
              b_name: str) -> None:
    if a is b:
        return
    _materialise(ov, a)
    _materialise(ov, b)
    ov.upper.exchange(join(ov.path(a_parent), a_name), join(ov.path(b_parent), b_name))
    ov.upper.fsync_dir(ov.path(a_parent))  # durable like every other namespace change
    if b_parent is not a_parent:
        ov.upper.fsync_dir(ov.path(b_parent))
    ov.table.move(a, a_parent, a_name, b_parent, b_name)
    ov.table.move(b, b_parent, b_name, a_parent, a_name)
    assert b_parent.children is not None
    b_parent.children[b_name] = a  # the second move popped it
