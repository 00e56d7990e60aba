"""Thin pyfuse3 adapter over the overlay: inode numbers, handles and kernel-cache rules.

Kernel caching is the whole performance story of a Python daemon: the lower layer is
immutable and every write passes through this process, so entries and attributes are cached
for long and the page cache is kept across opens (`keep_cache`). When the daemon itself
changes what the kernel cached (reload after an install, reset), it invalidates explicitly.

`flush` answers ENOSYS once, which makes the kernel stop sending FLUSH on every close():
writes go straight to the upper file, so there is nothing to flush. `open` and `opendir` do
the same when cowfs.fuse._fuse_shim tells the handlers which inode a zero handle stands for (see
cowfs/fuse/fuse_shim.py): the kernel then opens files and directories without asking, caches
listings, and a warm scan, read or import costs no round trip at all. Reads and writes of
such kernel opens go through one implicit handle per inode (Overlay.implicit_handle).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import pyfuse3
import trio

from cowfs.dirfd import lexists
from cowfs.fuse import entries, fuse_shim
from cowfs.fuse.fastlookup import FastLookups
from cowfs.fuse.kernel_replies import attr_out, entry_out
from cowfs.fuse.passthrough import Passthrough, daemon_fh, setting
from cowfs.overlay import namespace
from cowfs.overlay.inode import Node
from cowfs.overlay.overlay import Attr, Overlay
from cowfs.store.store import syncfs

if TYPE_CHECKING:
    from cowfs.fuse.teardown import VenvTeardown
    from cowfs.store.remote.lazy import LazyObjects

log = logging.getLogger("cowfs.fuse.ops")

THREAD_COPY_UP_BYTES = 1 << 20  # bigger copy-ups run in a worker thread

T = TypeVar("T")


def fuse_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """OSError -> its errno; anything else is a bug: logged, EIO, and the mount lives on."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            if exc.errno is None:  # raised without one: a bug, found from the log
                log.warning("%s: %r", fn.__name__, exc, exc_info=True)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


class CowfsOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, overlay: Overlay) -> None:
        super().__init__()
        self.ov = overlay
        self._dirs: dict[int, tuple[Node, list[tuple[str, Node]]]] = {}
        self._next_dh = 1
        self._copying: dict[Node, trio.Event] = {}
        # Snapshots of listings in progress (a big directory takes several READDIRPLUS).
        self._listings: dict[int, list[tuple[str, Node]]] = {}
        self.by_inode = False  # the shim is in place (known once the session is live)
        self.pt = Passthrough()  # FUSE passthrough, when the kernel takes it (first OPEN)
        self.pt.ask()
        # Lookups in lower-only directories answered by the C reader (cowfs.fuse.fastlookup).
        self.lookups = FastLookups(overlay, lambda node: entry_out(self.entry(node)))
        overlay.before_copy_up = self._changing
        # Requests served, for `status`: listings (READDIRPLUS at offset 0), OPEN, READ.
        self.served = {"listings": 0, "opens": 0, "reads": 0}
        self.teardown: VenvTeardown | None = None  # set by the daemon for a venv mount
        self._teardown_done: trio.Event | None = None
        # Called when another installer finished or removed a distribution (a RECORD
        # written, a top-level dist-info removed): the daemon absorbs it (installer.venv.absorb).
        self.on_dist_change: Callable[[], None] | None = None
        # When the tree last changed through the mount: absorb waits until the writing tool
        # has been quiet for a while, whatever it writes (pip and uv remove and rewrite
        # thousands of files between two RECORDs).
        self.last_change = time.monotonic()
        # Fetches store objects a lazy install from a remote left out (cowfs.store.remote.lazy).
        self.lazy: LazyObjects | None = None

    def _changing(self, node: Node) -> None:
        """node is about to stop being its lower file: the C reader must not answer for it.
        Its published name first: the reader makes an entry only while the name is there."""
        self.lookups.changed(node)
        self.pt.changed(node.ino)

    def _noticed(self, parent: Node, name: str) -> None:
        self.last_change = time.monotonic()
        if self.on_dist_change is None:
            return
        if (name == "RECORD" and parent.parent is self.ov.root
                and parent.name.endswith(".dist-info")) or (
                parent is self.ov.root and name.endswith(".dist-info")):
            self.on_dist_change()

    async def venv_deleted(self, get_out: bool = True) -> bool:
        """Whether the venv around this mount is being deleted (cowfs.fuse.teardown). With
        get_out, the first time it is the mount gets out of the deleter's way before the
        caller answers anything (and every later caller waits for that)."""
        t = self.teardown
        if t is None:
            return False
        if self._teardown_done is None:
            if not t.venv_deleted():
                return False
            if not get_out:
                return True
            self._teardown_done = trio.Event()
            self.lookups.changed_all()  # the deleter's listings are empty from now on
            await trio.to_thread.run_sync(t.get_out)
            self._teardown_done.set()
        await self._teardown_done.wait()
        return True

    def init(self) -> None:
        self.by_inode = fuse_shim.active()
        # Kernel opens are invisible: a file unlinked while open must stay readable.
        # (Passthrough needs OPEN requests: while it may work, every open is seen.)
        self.ov.pin_unlinked = self.by_inode and self.pt.enabled is False

    def opens_mode(self) -> tuple[str, str]:
        """How this mount serves opens (for `status`), and why not by passthrough."""
        if self.pt.enabled:
            return "passthrough", ""
        if self.pt.enabled is None:  # (auto: decided then, see cowfs.fuse.passthrough)
            return f"{'passthrough' if setting() == '1' else 'auto'} (at the first open)", ""
        return ("kernel" if self.by_inode else "daemon"), self.pt.why_not

    # -- helpers ------------------------------------------------------------------------

    def node(self, ino: int) -> Node:
        try:
            return self.ov.table.by_ino[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def forget_caches(self) -> None:
        """The lower layer changed (reload, reset, repair): derived answers are stale."""
        self._listings.clear()
        self.lookups.changed_all()

    def entry(self, node: Node, attr: Attr | None = None) -> pyfuse3.EntryAttributes:
        return entries.entry(node, attr or self.ov.getattr(node))

    def _looked_up(self, node: Node) -> pyfuse3.EntryAttributes:
        e = self.entry(node)
        node.nlookup += 1
        return e

    async def settle(self, *nodes: Node | None) -> None:
        """Wait for in-flight threaded copy-ups of these nodes (all of them when none given)."""
        while True:
            pending = [self._copying[n] for n in nodes if n is not None and n in self._copying] \
                if nodes else list(self._copying.values())
            if not pending:
                return
            await pending[0].wait()

    async def ensure_upper(self, node: Node, with_data: bool = True) -> None:
        """Copy up, off the event loop when the file is big, so other requests keep flowing."""
        await self.settle(node)
        if node.upper:
            return
        lower = node.lower
        if with_data and self.lazy is not None and lower is not None and lower.source \
                and not lexists(lower.at()):
            await self._fetched(node)  # a copy-up reads the store object
        if not with_data or lower is None or lower.size < THREAD_COPY_UP_BYTES \
                or node.parent is None:
            self.ov.copy_up(node, with_data)
            return
        done = self._copying[node] = trio.Event()
        try:
            self.ov.copy_up_parents(node)
            tmp = await trio.to_thread.run_sync(self.ov.copy_up_prepare, node, with_data)
            self.ov.copy_up_commit(node, tmp)
        finally:
            del self._copying[node]
            done.set()

    # -- lookups and attributes ---------------------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.node(parent_inode)
        if name == b".":
            return self._looked_up(parent)
        if name == b"..":
            return self._looked_up(parent.parent or parent)
        node = self.ov.lookup(parent, _name(name))
        self.lookups.looked_in(parent)
        if node is None:
            return entries.negative()
        try:
            return self._looked_up(node)
        except FileNotFoundError as exc:
            e = await self._stand_in_if_deleted(node, exc)
            node.nlookup += 1
            return e

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            node = self.ov.table.by_ino.get(ino)
            if node is not None:
                node.nlookup += self.lookups.take(ino)  # (the C reader's answers count too)
                if node.nlookup <= count:
                    self.pt.changed(ino)  # (inode numbers are not reused; its entry is idle)
                    if node.implicit is not None:
                        self.ov.release(node.implicit)  # no kernel open outlives its inode
                self.ov.table.forget(node, count)

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        # A deleter (rm -rf VENV) stats site-packages after it removed the state (and
        # the upper root with it): answer, but do not detach between its stat and open
        # (it checks both name one inode); its first unlink inside detaches.
        node = self.node(inode)
        try:
            return self.entry(node)
        except OSError as exc:  # (the root: whatever its upper root's removal left)
            if inode != pyfuse3.ROOT_INODE and not isinstance(exc, FileNotFoundError):
                raise
            return await self._stand_in_if_deleted(node, exc)

    async def _stand_in_if_deleted(self, node: Node, exc: OSError) -> pyfuse3.EntryAttributes:
        """node's layer file is gone. A deleter that met VENV/.cowfs first removed the upper
        layer under the mount: the names it still sees answer as what they were (a
        directory, or a file), so that it removes them as such (its unlinks and rmdirs are
        then no-ops), not ENOENT. Anywhere else, the error met (exc)."""
        if not await self.venv_deleted(get_out=False):
            raise exc
        assert self.teardown is not None
        return entries.stand_in(node, os.fstat(self.teardown.under_fd))

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.node(inode)
        self.last_change = time.monotonic()
        size = attr.st_size if fields.update_size else None
        if size is not None and self.pt.writer_refused(node.ino, ctx.pid):
            raise pyfuse3.FUSEError(errno.ETXTBSY)  # see cowfs.fuse.passthrough
        # (A detached lower file may still be open: the kernel did not tell us, see open.)
        if node.parent is not None or (self.by_inode and node.children is None):
            await self.ensure_upper(node, with_data=size != 0)
        a = self.ov.setattr(
            node, None if fh is None else daemon_fh(fh),
            size=size,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return self.entry(node, a)

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(self.ov.readlink(self.node(inode)))

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = self.ov.statfs()
        out = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_favail"):
            setattr(out, f, getattr(st, f))
        out.f_namemax = 255
        return out

    # -- directories --------------------------------------------------------------------

    def snapshot(self, node: Node) -> list[tuple[str, Node]]:
        """A directory's entries: offsets into it stay meaningful while it changes."""
        listing = []
        for name in self.ov.listdir(node):
            child = self.ov.lookup(node, name)
            if child is not None:
                listing.append((name, child))
        return listing

    def listing(self, node: Node, fresh: bool) -> list[tuple[str, Node]]:
        """The snapshot of a listing in progress, taken anew when one starts (`fresh`)."""
        listing = None if fresh else self._listings.get(node.ino)
        if listing is None:
            listing = self._listings[node.ino] = self.snapshot(node)
        return listing

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.node(inode)
        if self.by_inode:
            # From now on the kernel opens directories without asking and caches listings.
            raise pyfuse3.FUSEError(errno.ENOSYS)
        dh = self._next_dh
        self._next_dh += 1
        self._dirs[dh] = (node, [] if await self.venv_deleted() else self.snapshot(node))
        return dh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self.served["listings"] += start_id == 0
        if start_id == 0 and await self.venv_deleted():
            return  # the deleter holds the directory open: empty, and detached (teardown)
        if self.by_inode:
            parent = self.node(fh)  # the shim passes the directory's inode as the handle
            listing = self.listing(parent, fresh=start_id == 0)
        else:
            parent, listing = self._dirs.get(fh, (self.ov.root, []))
        if start_id == 0:
            self.lookups.looked_in(parent, listing)  # (a walk looks nothing up)
        # "." and ".." first, as on disk filesystems. They also keep the kernel's cached
        # listing non-empty: it revalidates an empty one by mtime only, which a daemon-side
        # change (install, reset) does not touch, while a dropped page forces a re-read.
        dots = ((b".", parent), (b"..", parent.parent or parent))
        for i in range(start_id, len(dots)):
            name_b, node = dots[i]
            if not pyfuse3.readdir_reply(token, name_b, self.entry(node), i + 1):
                return  # no lookup reference: the kernel plants no dentry for dot entries
        for i in range(max(start_id - len(dots), 0), len(listing)):
            name, child = listing[i]
            # Readdirplus plants a dentry in the kernel for every entry: one for a name that
            # was removed, renamed or replaced since the listing began would bring the old
            # file back.
            if (parent.children or {}).get(name) is not child:
                continue
            try:
                entry = self.entry(child)
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), entry, i + len(dots) + 1):
                return
            child.nlookup += 1
        if self.by_inode:
            self._listings.pop(parent.ino, None)  # complete: the next one starts anew

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        # Namespace changes that involve lower content are fsynced when made; the others
        # (cowfs.overlay.namespace._durable) by this. The kernel opens directories itself (no handle
        # names the directory), so the whole upper filesystem is synced, in a worker.
        await trio.to_thread.run_sync(syncfs, self.ov.upper.xpath(""))

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.node(parent_inode)
        await self.settle(parent)
        self.last_change = time.monotonic()
        return self._looked_up(namespace.mkdir(self.ov, parent, _name(name), mode, ctx.uid,
                                               ctx.gid))

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.node(parent_inode)
        await self.settle(parent)
        self.last_change = time.monotonic()
        return self._looked_up(namespace.mknod(self.ov, parent, _name(name), mode, rdev,
                                               ctx.uid, ctx.gid))

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.node(parent_inode)
        await self.settle(parent)
        self.last_change = time.monotonic()
        return self._looked_up(namespace.symlink(self.ov, parent, _name(name),
                                                 os.fsdecode(target), ctx.uid, ctx.gid))

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node, parent = self.node(inode), self.node(new_parent_inode)
        await self.ensure_upper(node)
        self.last_change = time.monotonic()
        return self._looked_up(namespace.link(self.ov, node, parent, _name(new_name)))

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if await self.venv_deleted():
            return  # a view being thrown away: nothing to record
        parent = self.node(parent_inode)
        victim = (parent.children or {}).get(_name(name))
        await self.settle(parent, victim)
        if victim is not None:
            self._changing(victim)  # its link count is about to change: not the reader's
        namespace.unlink(self.ov, parent, _name(name))
        self._noticed(parent, _name(name))  # a RECORD deleted: another tool uninstalled

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if await self.venv_deleted():
            return
        await self.settle()
        parent = self.node(parent_inode)
        namespace.rmdir(self.ov, parent, _name(name))
        self._noticed(parent, _name(name))

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        await self.settle()
        new_parent = self.node(parent_inode_new)
        victim = (new_parent.children or {}).get(_name(name_new))
        if victim is not None:
            self._changing(victim)
        namespace.rename(self.ov, self.node(parent_inode_old), _name(name_old),
                         new_parent, _name(name_new), flags)
        self._noticed(new_parent, _name(name_new))

    # -- files --------------------------------------------------------------------------

    def implicit(self, fh: int) -> Node | None:
        """The node of a kernel open (the shim's BY_INODE | inode handle), else None."""
        return self.node(fh & ~fuse_shim.BY_INODE) if fh & fuse_shim.BY_INODE else None

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.node(inode)
        self.served["opens"] += 1
        pt = self.pt.enabled is not False
        if self.by_inode and not pt:
            # From now on the kernel opens files without asking (and keeps their pages);
            # the first read or write of an inode opens it here, a write copies it up.
            raise pyfuse3.FUSEError(errno.ENOSYS)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if pt and writable and self.pt.writer_refused(node.ino):
            raise pyfuse3.FUSEError(errno.ETXTBSY)  # before any copy-up: cowfs.fuse.passthrough
        # With the shim, O_TRUNC comes as a SETATTR after the OPEN: copy up at the first
        # write or truncation (cowfs.overlay.overlay.Overlay.open), not the data at the open.
        if writable and not self.by_inode:
            await self.ensure_upper(node, with_data=not flags & os.O_TRUNC)
        fh = await self._opening(
            node, lambda: self.ov.open(node, flags, defer_copy_up=self.by_inode))
        if not pt:
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        h = self.ov.handles[fh]
        reply = None
        try:
            if self.pt.enabled or self.pt.decide(h.fd):
                reply = self.pt.reply(fh, h.fd, node.ino, writable, h.on_lower, ctx.pid,
                                      lambda: attr_out(self.entry(node)))
        except OSError:
            self.ov.release(fh)
            raise
        if reply is None:  # passthrough refused: kernel opens (daemon opens) from now on
            log.info("opens: %s (no passthrough: %s)", *self.opens_mode())
            self.ov.pin_unlinked = self.by_inode
            if self.by_inode:
                self.ov.release(fh)
                raise pyfuse3.FUSEError(errno.ENOSYS)
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        if not daemon_fh(reply):  # the C reader counts this open: the kernel reads alone
            self.ov.release(fh)
        # A cached open drops the inode's pages: writes of passthrough times bypassed them.
        return pyfuse3.FileInfo(fh=reply, keep_cache=False)

    async def _fetched(self, node: Node) -> bool:
        """A lower file whose store object a lazy install left out: fetched now (EIO when
        it cannot be); False when that is not why it is missing."""
        lower = node.lower
        if self.lazy is None or node.upper or lower is None or not lower.source:
            return False
        return await self.lazy.fetch(lower.source, self.ov.path(node))

    async def _opening(self, node: Node, opener: Callable[[], int]) -> int:
        """opener(), again once node's store object is fetched if that was what it lacked."""
        try:
            return opener()
        except FileNotFoundError:
            if not await self._fetched(node):
                raise
            return opener()

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        parent = self.node(parent_inode)
        await self.settle(parent)
        node, fh = namespace.create(self.ov, parent, _name(name), stat.S_IMODE(mode), flags,
                                    ctx.uid, ctx.gid)
        if self.pt.enabled is not False:  # (off by default: nothing to track)
            self.pt.created(fh, node.ino)
        self._noticed(parent, _name(name))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._looked_up(node)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.served["reads"] += 1
        node = self.implicit(fh)
        if node is not None:
            fh = await self._opening(node, lambda: self.ov.implicit_handle(node, writable=False))
        return self.ov.read(daemon_fh(fh), off, size)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.last_change = time.monotonic()
        node = self.implicit(fh)
        if node is not None:
            await self.ensure_upper(node)
            fh = self.ov.implicit_handle(node, writable=True)
        h = self.ov.handles.get(daemon_fh(fh))
        if h is not None and h.on_lower:
            await self.ensure_upper(h.node)  # opened for writing, copied up now
        return self.ov.write(daemon_fh(fh), off, buf)

    async def flush(self, fh: int) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh: int) -> None:
        self.pt.released(daemon_fh(fh))
        self.ov.release(daemon_fh(fh))

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        node = self.implicit(fh)
        if node is not None:
            fh = self.ov.implicit_handle(node, writable=False)
        self.ov.fsync(daemon_fh(fh), datasync)

    # -- xattrs -------------------------------------------------------------------------

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return self.ov.getxattr(self.node(inode), os.fsdecode(name))
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP):
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in self.ov.listxattr(self.node(inode))]

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        node = self.node(inode)
        await self.ensure_upper(node)
        self.ov.setxattr(node, os.fsdecode(name), value)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self.node(inode)
        await self.settle(node)
        self.ov.removexattr(node, os.fsdecode(name))
