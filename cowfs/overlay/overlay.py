"""Merged-view semantics of the overlay, independent of FUSE (unit-testable on its own).

Linux overlayfs semantics (Documentation/filesystems/overlayfs.rst) with its non-POSIX
corners fixed: inode numbers are per path and survive copy-up, handles opened before a
copy-up read the new data, rename of directories across layers works (never EXDEV), and
st_nlink/statfs are right. Every method raises OSError with the errno a caller should see.

Namespace mutations (create, mkdir, unlink, rename, link...) live in cowfs.overlay.namespace.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from cowfs.dirfd import At, opendir, proc
from cowfs.overlay import copy_up
from cowfs.overlay.inode import Node, NodeTable
from cowfs.overlay.lower import Lower, LowerEntry, join
from cowfs.overlay.meta import ACL_ACCESS, mode_from_acl
from cowfs.overlay.upper import Upper, is_private_xattr

# Flags that only make sense for the caller's open, not for the daemon's backing fd.
STRIP_OPEN = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | getattr(os, "O_DIRECT", 0)


def oserror(code: int, path: str = "") -> OSError:
    return OSError(code, os.strerror(code), path) if path else OSError(code, os.strerror(code))


@dataclass(slots=True)
class Attr:
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


class Handle:
    __slots__ = ("fd", "node", "on_lower", "writable")

    def __init__(self, node: Node, fd: int, writable: bool, on_lower: bool) -> None:
        self.node = node
        self.fd = fd
        self.writable = writable
        self.on_lower = on_lower


def _attr_from_stat(st: os.stat_result) -> Attr:
    return Attr(st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_rdev, st.st_size,
                st.st_blocks, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)


def _attr_from_lower(e: LowerEntry, nlink: int) -> Attr:
    blocks = e.blocks if e.blocks >= 0 else ((e.size + 4095) // 4096) * 8
    return Attr(e.mode, nlink, e.uid, e.gid, e.rdev, e.size, blocks, e.mtime_ns, e.mtime_ns,
                e.ctime_ns or e.mtime_ns)


# Handle numbers wrap below the bits cowfs.fuse.passthrough puts above them (FAST_FH: 1 << 31).
MAX_FH = (1 << 31) - 1
IMPLICIT_OPEN_MAX = 512  # implicit handles of reachable files kept open (reopenable)


class Overlay:
    def __init__(self, lower: Lower, upper: Upper) -> None:
        self.lower = lower
        self.upper = upper
        root_lower = None if upper.is_opaque("") else lower.lookup("")
        self.table = NodeTable(root_lower)
        self.root = self.table.root
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        # node ino -> upper dirs where libfuse may hold .fuse_hidden names of its inode (by
        # path in the upper; None: the work dir)
        self._hidden_in: dict[int, set[str | None]] = {}
        # Kernel opens send no OPEN (see cowfs/fuse/ops.py): files are read and written through
        # one implicit handle per inode, opened on first use. Those of reachable files can be
        # reopened any time, so only the most recently used stay open; a file unlinked while
        # the kernel knows it is pinned open until the kernel forgets the inode.
        self.pin_unlinked = False
        self._implicit_lru: OrderedDict[int, Node] = OrderedDict()
        # Told before a node stops being its lower file (passthrough opens served by the
        # kernel from that file must not be handed out any more: cowfs.fuse.passthrough).
        self.before_copy_up: Callable[[Node], None] = lambda node: None

    # -- names --------------------------------------------------------------------------

    def path(self, node: Node) -> str:
        return self.table.path(node)

    def lower_visible(self, parent: Node, path: str) -> bool:
        """Would deleting `path` expose a lower entry (so a whiteout is needed)?"""
        return parent.lower is not None and self.lower.lookup(path) is not None

    def lookup(self, parent: Node, name: str) -> Node | None:
        """The child called name, or None. Raises ENOTDIR when parent is not a directory."""
        children = parent.children
        if children is None:
            raise oserror(errno.ENOTDIR)
        node = children.get(name)
        if node is not None:
            return node
        if len(name.encode("utf-8", "surrogateescape")) > 255:
            raise oserror(errno.ENAMETOOLONG)
        path = join(self.path(parent), name)
        st = self.upper.lstat(path) if parent.upper else None
        if st is not None and self.upper.is_whiteout(path, st):
            return None
        lower = None
        if parent.lower is not None and not (parent.upper and self.upper.has_prefix_whiteout(path)):
            lower = self.lower.lookup(path)
        if st is None:
            if lower is None:
                return None
            node = self.table.new(parent, name, lower, upper=False)
        elif stat.S_ISDIR(st.st_mode):
            merge = lower if lower is not None and lower.is_dir and \
                not self.upper.is_opaque(path) else None
            node = self.table.new(parent, name, merge, upper=True)
        else:
            if st.st_nlink > 1:
                known = self.table.by_upper_id.get((st.st_dev, st.st_ino))
                if known is not None and self._is_upper_inode(known, st):
                    self.table.add_link(known, parent, name)
                    return known
            node = self.table.new(parent, name, None, upper=True)
            if st.st_nlink > 1:
                self.table.by_upper_id[(st.st_dev, st.st_ino)] = node
        if stat.S_ISDIR(st.st_mode if st is not None else lower.mode):  # type: ignore[union-attr]
            node.children = {}
        return node

    def _is_upper_inode(self, node: Node, st: os.stat_result) -> bool:
        """Is node (still) a name of the upper inode st? Inode numbers get reused, and a
        reset can take a node back to the lower: a stale map entry must not alias files."""
        if not node.upper or not self.table.is_attached(node):
            return False
        mine = self.upper.lstat(self.path(node))
        return mine is not None and (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)

    def child(self, parent: Node, name: str) -> Node:
        node = self.lookup(parent, name)
        if node is None:
            raise oserror(errno.ENOENT)
        return node

    def listdir(self, node: Node) -> list[str]:
        """Merged listing: upper names, then lower names not shadowed or whited out."""
        if node.children is None:
            raise oserror(errno.ENOTDIR)
        path = self.path(node)
        names: list[str] = []
        hidden: set[str] = set()
        if node.upper:
            names, hidden = self.upper.listdir(path)
        if node.lower is not None:
            seen = set(names) | hidden
            names.extend(n for n in self.lower.listdir(path) if n not in seen)
        return names

    def is_empty_dir(self, node: Node) -> bool:
        return not self.listdir(node)

    # -- attributes ---------------------------------------------------------------------

    def getattr(self, node: Node) -> Attr:
        try:
            path = self.path(node)
        except FileNotFoundError:
            return self._detached_attr(node)
        if node.upper:
            at = self.upper.at(path)
            st = os.lstat(at[1], dir_fd=at[0])
            attr = self._upper_attr(at, st)
            if node.ino in self._hidden_in:
                attr.nlink -= self._hidden_links(node, st)
            if node.children is not None and (node.lower is not None or st.st_nlink < 2):
                # Merged: count the subdirectories of both layers. An upper-only directory's
                # own count is right where the filesystem keeps one (btrfs says 1): counting
                # meant listing and stat'ing the directory at every getattr, and the kernel
                # asks one after each file created in it (O(n^2) for an installer).
                attr.nlink = 2 + self._subdir_count(node)
            return attr
        assert node.lower is not None
        if node.children is not None:
            return _attr_from_lower(node.lower, 2 + self.lower.subdir_count(path))
        return _attr_from_lower(node.lower, 1)

    def _upper_attr(self, at: At | None, st: os.stat_result, fd: int | None = None) -> Attr:
        attr = _attr_from_stat(st)
        if self.upper.meta.active:
            attr.mode, attr.uid, attr.gid, attr.atime_ns, attr.mtime_ns = \
                self.upper.meta.attr(None if at is None else proc(at), st, fd)
        return attr

    def removing_name(self, node: Node, parent_path: str) -> None:
        """An upper name of node in parent_path goes away. On a FUSE upper (ntfs-3g) the
        name survives as `.fuse_hidden*` while the daemon holds the file open: its link must
        not count (see _hidden_links)."""
        if self.pin_unlinked and self.table.lookups(node) and node.children is None \
                and node.implicit is None and not node.extra_links \
                and stat.S_ISREG(self.getattr(node).mode):
            self._pin(node)  # the kernel may have it open: keep its data reachable
        if self.upper.fuse_hidden and node.handles and node.children is None:
            # (Upper.clear_markers may park hidden names in the work dir.)
            self._hidden_in.setdefault(node.ino, {None}).add(parent_path)

    def _hidden_links(self, node: Node, st: os.stat_result) -> int:
        count = 0
        for parent in self._hidden_in.get(node.ino, ()):
            at = self.upper.work_at("") if parent is None else self.upper.at(parent)
            with contextlib.suppress(OSError), opendir(at) as fd, os.scandir(fd) as it:
                count += sum(1 for de in it if de.name.startswith(".fuse_hidden")
                             and de.inode() == st.st_ino)
        return count

    def _detached_attr(self, node: Node) -> Attr:
        """A node whose last name is gone but which is still open or someone's cwd."""
        fd = self._any_fd(node) if node.upper else None
        if fd is not None:
            attr = self._upper_attr(None, os.fstat(fd), fd)  # may still be written to
        elif node.gone is not None:
            attr = replace(node.gone)
        elif node.lower is not None:
            attr = _attr_from_lower(node.lower, 0)
        else:
            raise oserror(errno.ENOENT)
        attr.nlink = 0
        return attr

    def forget_name(self, parent: Node, name: str, attr: Attr | None) -> None:
        """Drop parent/name from the tree; attr (taken before the entry was removed) is what
        the node answers from then on if that was its last name."""
        node = self.table.unlink(parent, name)
        if node is not None and node.parent is None and attr is not None:
            node.gone = replace(attr, nlink=0)

    def _any_fd(self, node: Node) -> int | None:
        for fh in node.handles or ():
            return self.handles[fh].fd
        return None

    def _subdir_count(self, node: Node) -> int:
        path = self.path(node)
        count = 0
        upper_names: set[str] = set()
        hidden: set[str] = set()
        if node.upper:
            names, hidden = self.upper.listdir(path)
            upper_names = set(names)
            for name in names:
                st = self.upper.lstat(join(path, name))
                if st is not None and stat.S_ISDIR(st.st_mode):
                    count += 1
        if node.lower is not None:
            for name in self.lower.listdir(path):
                if name in upper_names or name in hidden:
                    continue
                e = self.lower.lookup(join(path, name))
                if e is not None and e.is_dir:
                    count += 1
        return count

    def readlink(self, node: Node) -> str:
        path = self.path(node)
        if node.upper:
            fd, name = self.upper.at(path)
            return os.readlink(name, dir_fd=fd)
        return self.lower.readlink(path)

    def statfs(self) -> os.statvfs_result:
        return self.upper.statvfs()

    # -- copy-up ------------------------------------------------------------------------

    def needs_copy_up(self, node: Node) -> bool:
        return not node.upper

    def copy_up_parents(self, node: Node) -> None:
        chain = []
        p = node.parent
        while p is not None and not p.upper:
            chain.append(p)
            p = p.parent
        for d in reversed(chain):
            self.copy_up(d)

    def copy_up(self, node: Node, with_data: bool = True) -> None:
        """Make node exist in the upper layer with identical content and metadata."""
        if node.upper:
            return
        if node.parent is None:
            self._copy_up_orphan(node, with_data)
            return
        tmp = self.copy_up_prepare(node, with_data)
        self.copy_up_commit(node, tmp)

    def _copy_up_orphan(self, node: Node, with_data: bool) -> None:
        """A lower file unlinked while the kernel may hold it open (no OPEN request told us)
        is written to: its private copy is an anonymous file, alive as long as its handles."""
        if not (self.pin_unlinked or node.handles) or node.lower is None \
                or not stat.S_ISREG(node.lower.mode):
            raise oserror(errno.ENOENT)
        tmp = copy_up.prepare_file(self.upper, node.lower, with_data=with_data)
        self.before_copy_up(node)
        try:
            node.upper, node.lower = True, None
            self._redirect_handles(node, tmp)
            if node.implicit is None:
                fd = os.open(tmp[1], os.O_RDWR | os.O_CLOEXEC, dir_fd=tmp[0])
                node.implicit = self.add_handle(node, fd, writable=True, on_lower=False)
        finally:
            os.unlink(tmp[1], dir_fd=tmp[0])

    def copy_up_prepare(self, node: Node, with_data: bool = True) -> At:
        """Parents first, then the entry itself into the work dir (data copy included)."""
        self.copy_up_parents(node)
        meta = node.lower
        assert meta is not None
        if stat.S_ISREG(meta.mode):
            return copy_up.prepare_file(self.upper, meta, with_data=with_data)
        target = self.lower.readlink(self.path(node)) if stat.S_ISLNK(meta.mode) else None
        return copy_up.prepare_other(self.upper, meta, target)

    def copy_up_commit(self, node: Node, tmp: At) -> None:
        self.before_copy_up(node)
        copy_up.publish(self.upper, tmp, self.path(node))
        node.upper = True
        if node.children is None:
            node.lower = None
        self._redirect_handles(node)

    def _redirect_handles(self, node: Node, copy: At | None = None) -> None:
        """Handles opened on the lower file now read (writers: and write) the upper copy
        (same fd number)."""
        for fh in node.handles or ():
            h = self.handles[fh]
            if h.on_lower:
                dir_fd, name = copy or self.upper.at(self.path(node))
                new = os.open(name, (os.O_RDWR if h.writable else os.O_RDONLY) | os.O_CLOEXEC,
                              dir_fd=dir_fd)
                os.dup2(new, h.fd)
                os.close(new)
                h.on_lower = False

    def copy_up_tree(self, node: Node) -> None:
        """Copy up a node and, for a directory, everything merged into it from below."""
        self.copy_up(node)
        if node.children is None or node.lower is None:
            return
        for name in self.listdir(node):
            self.copy_up_tree(self.child(node, name))
        node.lower = None  # fully materialised: nothing below may merge in any more

    # -- files --------------------------------------------------------------------------

    def add_handle(self, node: Node, fd: int, writable: bool, on_lower: bool) -> int:
        fh = self._next_fh
        while fh in self.handles:  # (after a wrap: one still open)
            fh = fh % MAX_FH + 1
        self._next_fh = fh % MAX_FH + 1
        self.handles[fh] = Handle(node, fd, writable, on_lower)
        if node.handles is None:
            node.handles = set()
        node.handles.add(fh)
        return fh

    def open(self, node: Node, flags: int, defer_copy_up: bool = False) -> int:
        """A handle; a writable one copies node up first, or with defer_copy_up at its first
        write or truncation (the kernel sends O_TRUNC as a SETATTR after the OPEN when
        atomic O_TRUNC is off: copying the data at the open would be wasted)."""
        if node.children is not None:
            raise oserror(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if (writable and not defer_copy_up) or flags & os.O_TRUNC:
            self.copy_up(node, with_data=not flags & os.O_TRUNC)
        if node.upper:
            dir_fd, name = self.upper.at(self.path(node))
            fd = os.open(name, (flags & ~STRIP_OPEN) | os.O_CLOEXEC, dir_fd=dir_fd)
            return self.add_handle(node, fd, writable, on_lower=False)
        assert node.lower is not None and node.lower.source is not None
        dir_fd, name = node.lower.at()
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)  # never writable
        return self.add_handle(node, fd, writable, on_lower=True)

    def implicit_handle(self, node: Node, writable: bool) -> int:
        """The handle that serves kernel opens of node; writable ones need node copied up."""
        fh = node.implicit
        if fh is None:
            fh = self.open(node, os.O_RDWR if writable else os.O_RDONLY)
            node.implicit = fh
            self._implicit_lru[fh] = node
            self._trim_implicit()
        else:
            if fh in self._implicit_lru:  # (pinned ones are not)
                self._implicit_lru.move_to_end(fh)
            h = self.handles[fh]
            if writable and not h.writable:
                if h.on_lower:  # callers copy up first: the store is never opened to write
                    raise oserror(errno.EROFS)
                # Same fd number: a read racing with this upgrade sees the same file.
                new = os.open(f"/proc/self/fd/{h.fd}", os.O_RDWR | os.O_CLOEXEC)
                os.dup2(new, h.fd)
                os.close(new)
                h.writable = True
        return fh

    def _pin(self, node: Node) -> None:
        try:
            self.implicit_handle(node, writable=node.upper)
        except PermissionError:
            self.implicit_handle(node, writable=False)
        if node.implicit is not None:
            self._implicit_lru.pop(node.implicit, None)  # never closed before the forget

    def _trim_implicit(self, keep: int = IMPLICIT_OPEN_MAX) -> None:
        while len(self._implicit_lru) > keep:
            fh, node = self._implicit_lru.popitem(last=False)
            if self.table.is_attached(node):
                self.release(fh)

    def drop_implicit(self, node: Node) -> None:
        """The daemon changed node's layers (reset, reload): reopen on next use."""
        if node.implicit is not None and self.table.is_attached(node):
            self.release(node.implicit)

    def handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            raise oserror(errno.EBADF) from None

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return os.pread(self.handle(fh).fd, size, offset)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        h = self.handle(fh)
        if not h.writable:
            raise oserror(errno.EBADF)
        if h.on_lower:  # a deferred copy-up (open): callers copy up first
            raise oserror(errno.EROFS)
        return os.pwrite(h.fd, data, offset)

    def fsync(self, fh: int, datasync: bool) -> None:
        h = self.handle(fh)
        if not h.on_lower:
            (os.fdatasync if datasync else os.fsync)(h.fd)

    def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        os.close(h.fd)
        if h.node.implicit == fh:
            h.node.implicit = None
            self._implicit_lru.pop(fh, None)
        if h.node.handles is not None:
            h.node.handles.discard(fh)
        if not h.node.handles:
            self._hidden_in.pop(h.node.ino, None)  # libfuse drops its hidden names now
        self.table.maybe_drop(h.node)

    def setattr(self, node: Node, fh: int | None, *, size: int | None = None,
                mode: int | None = None, uid: int | None = None, gid: int | None = None,
                atime_ns: int | None = None, mtime_ns: int | None = None) -> Attr:
        if node.parent is not None or node is self.root:
            self.copy_up(node, with_data=size != 0)
        h = self.handles.get(fh) if fh is not None else None
        fd: int | None = None  # an open file, or else...
        at: At | None = None  # ...the upper entry, acted on by *at calls
        if h is not None and h.writable:
            fd = h.fd
        elif node.parent is not None or node is self.root:
            at = self.upper.at(self.path(node))
        else:  # unlinked but still open: act on the open file
            fd = self._any_fd(node)
            if fd is None or not node.upper:
                raise oserror(errno.ENOENT)
        target, dir_fd = (fd, None) if at is None else (at[1], at[0])
        nofollow = {} if at is None else {"follow_symlinks": False}  # (fds: not allowed)
        is_link = at is not None and stat.S_ISLNK(os.lstat(at[1], dir_fd=at[0]).st_mode)
        if size is not None:
            if is_link or node.children is not None:
                raise oserror(errno.EISDIR if node.children is not None else errno.EINVAL)
            # (No truncateat; an open would block on a fifo, or touch a device.)
            os.truncate(fd if at is None else proc(at), size)
        if mode is not None and not is_link:
            os.chmod(target, stat.S_IMODE(mode), dir_fd=dir_fd)
        if uid is not None or gid is not None:
            os.chown(target, -1 if uid is None else uid, -1 if gid is None else gid,
                     dir_fd=dir_fd, **nofollow)
        times = None
        if atime_ns is not None or mtime_ns is not None:
            cur = self.getattr(node)  # as shown: the upper may keep only coarser times
            times = (cur.atime_ns if atime_ns is None else atime_ns,
                     cur.mtime_ns if mtime_ns is None else mtime_ns)
            os.utime(target, ns=times, dir_fd=dir_fd, **nofollow)
        if self.upper.meta.active and (mode is not None or uid is not None or
                                       gid is not None or times is not None):
            # What the upper filesystem dropped (ntfs-3g: modes, owners, 100 ns times).
            self.upper.meta.record(None if at is None else proc(at), fd=fd,
                                   mode=None if is_link else mode, uid=uid, gid=gid,
                                   times=times)
        return self.getattr(node)

    # -- xattrs -------------------------------------------------------------------------

    def _xattr_target(self, node: Node) -> str | None:
        if node.upper:
            return self.upper.xpath(self.path(node))
        lower = node.lower
        return None if lower is None or lower.source is None else proc(lower.at())

    def getxattr(self, node: Node, name: str) -> bytes:
        target = self._xattr_target(node)
        if target is None or is_private_xattr(name):
            raise oserror(errno.ENODATA)
        if node.upper:
            target, name = self.upper.meta.xattr_place(target, name)
        return os.getxattr(target, name, follow_symlinks=False)

    def listxattr(self, node: Node) -> list[str]:
        target = self._xattr_target(node)
        if target is None:
            return []
        names = os.listxattr(target, follow_symlinks=False)
        kept = self.upper.meta.kept_names(target, names) if node.upper else []
        return [n for n in names if not is_private_xattr(n)] + kept

    def setxattr(self, node: Node, name: str, value: bytes, flags: int = 0) -> None:
        if is_private_xattr(name):
            raise oserror(errno.EPERM)  # overlay markers cannot be forged through the mount
        self.copy_up(node)
        path = self.upper.xpath(self.path(node))
        where, as_name = self.upper.meta.xattr_place(path, name)
        os.setxattr(where, as_name, value, flags, follow_symlinks=False)
        if name == ACL_ACCESS and self.upper.meta.keep_modes:
            # A mode set as an ACL (cp -p, sed -i): the upper filesystem ignored it.
            perms = mode_from_acl(value)
            if perms is not None:
                cur = self.getattr(node).mode
                self.upper.meta.record(path, mode=(cur & 0o7000) | perms)

    def removexattr(self, node: Node, name: str) -> None:
        if is_private_xattr(name):
            raise oserror(errno.ENODATA)
        self.getxattr(node, name)  # ENODATA before any copy-up
        self.copy_up(node)
        where, as_name = self.upper.meta.xattr_place(self.upper.xpath(self.path(node)), name)
        os.removexattr(where, as_name, follow_symlinks=False)
