"""FUSE passthrough opens: the kernel reads and mmaps store objects and upper files itself.

With passthrough (kernel 6.9+, asked for at INIT by cowfs/fuse/_fuse_shim.c) an OPEN answered with
a backing id makes the kernel serve that open file's reads, writes and mmaps from the backing
file: no round trip per read, and the pages are the store object's own, shared by every venv
and by the store. The price is the OPEN (and an asynchronous RELEASE) round trip that the
kernel-opens mode (cowfs/fuse/fuse_shim.py) saves; see README, "Kernel opens and passthrough".

The kernel keeps one io mode per inode while files are open on it: all passthrough with one
backing file, or all cached (through the daemon). The daemon sees every OPEN and RELEASE, so
it knows which mode each inode is in and answers accordingly:

* read-only open, nothing open: passthrough to what the node is now (its store object, or its
  upper file);
* any open while passthrough opens are live but the node changed underneath them (copied up,
  reset, reloaded): passthrough with the live backing (the kernel insists) plus
  FOPEN_DIRECT_IO, so reads and writes of that open go through the daemon to the right file;
* writable open while passthrough opens of an upper file are live: the same;
* writable open or truncation while passthrough opens of a store object are live: ETXTBSY.
  The kernel would give the writer a writable backing file on the store object (it opens the
  backing path with the opener's flags), so the only alternatives are that or EIO;
* anything else (writers, and readers while a writer is open): cached through the daemon,
  without keep_cache (passthrough-era writes bypassed the FUSE page cache).

Backing ids are registered per backing inode (st_dev, st_ino); those of store objects (lower
files) are kept in a bounded LRU while no open uses them, dropped at a reload; the kernel holds
the backing file itself, the daemon no fd for it. Those of upper files are closed with their
last open (the file may be deleted next: its space must come back).

Fast opens: once the daemon answered a read-only OPEN of a lower file, it publishes the node
to the C reader thread (cowfs/fuse/_fuse_fastopen.c), which answers that node's next read-only
opens and their releases itself and counts them. The rules above still hold: a writer or a
truncation stops the entry first (refused while counted opens remain), and a node that changes
(copy-up, reload, forget) stops its entry for good; its counted opens drain there, and opens
that arrive meanwhile join them with FOPEN_DIRECT_IO, as with live opens above.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cowfs.fuse import fuse_shim
from cowfs.mount import mount_errors

log = logging.getLogger("cowfs.fuse.passthrough")

PT_FLAG = 1 << 62  # the handle asks the shim for a passthrough reply (see _fuse_shim.c)
PT_DIRECT = 1 << 61  # ... with FOPEN_DIRECT_IO: reads and writes still come to the daemon
FAST_FH = 1 << 31  # the reader counts this open (_fuse_fastopen.c)
FH_MASK = FAST_FH - 1  # the daemon's own handle number (0: none)
ID_SHIFT = 32  # where the backing id sits in a handle (_fuse_shim.c masks it)
# Registered backing files kept while unused (kernel files, not daemon fds).
BACKING_IDS_MAX = int(os.environ.get("COWFS_BACKING_IDS", "1024"))
# Nodes whose opens the reader answers (each holds a backing id): a warm import of a big
# workload opens a few thousand files, reading all of it 13k; the kernel forgetting an inode
# drops its entry too.
PUBLISHED_MAX = int(os.environ.get("COWFS_FAST_OPENS_MAX", "65536"))


def setting() -> str:
    """COWFS_PASSTHROUGH: "1" always (where the kernel takes it), "0" never, else "auto"."""
    value = os.environ.get("COWFS_PASSTHROUGH", "auto")
    return value if value in ("0", "1") else "auto"


def wanted() -> str:
    """Why passthrough is not asked for at INIT, or "" when it is. Auto mode asks for it and
    decides at the first open (Passthrough.decide)."""
    if setting() == "0":
        return "turned off (COWFS_PASSTHROUGH=0)"
    if not fuse_shim.loaded():
        return "the C shim is not loaded"
    if not mount_errors.Facts.here().direct:  # (CAP_SYS_ADMIN)
        return "no CAP_SYS_ADMIN (the kernel registers backing files only for it)"
    return ""


def daemon_fh(fh: int) -> int:
    return fh & FH_MASK


@dataclass(slots=True)
class Live:
    """Passthrough opens of one node the kernel still holds, and their backing file."""

    backing_id: int
    key: tuple[int, int]
    on_lower: bool
    count: int = 0
    pid: int = 0  # the process that made the last of them


class Passthrough:
    def __init__(self) -> None:
        self.why_not = wanted()
        self.enabled: bool | None = None if not self.why_not else False  # None: not tried yet
        self._ids: OrderedDict[tuple[int, int], int] = OrderedDict()  # unused ones: LRU
        self._live: dict[int, Live] = {}  # node ino -> its live passthrough opens
        self._opens: dict[int, tuple[int, bool]] = {}  # daemon fh -> (ino, passthrough)
        self._cached: dict[int, int] = {}  # node ino -> live cached opens
        self.failures = 0  # backing files the kernel refused (opens served cached instead)
        self.lower_ok = False  # a store object (lower file) was taken as a backing file
        self.fast: bool | None = None  # the reader answers opens (known at the first open)
        # Auto mode: does another live mount serve the same store files (cowfs.store.lease)?
        self.sharing: Callable[[], bool] = lambda: False
        self._published: OrderedDict[int, tuple[int, int]] = OrderedDict()  # ino -> key
        self._first_opens = False  # the reader makes entries of published names itself

    def ask(self) -> None:
        if self.enabled is None:
            fuse_shim.want_passthrough()

    def status(self) -> dict[str, object]:
        entries, opens, answered, attrs, firsts = fuse_shim.fast_totals()
        return {"backing_ids": len(self._ids) + len(self._live) + entries,
                "passthrough_opens": sum(v.count for v in self._live.values()) + opens,
                "backing_refused": self.failures, "fast_opens": bool(self.fast),
                "opens_in_c": answered, "getattrs_in_c": attrs, "first_opens_in_c": firsts}

    def decide(self, fd: int) -> bool:
        """At the first open: did the kernel take passthrough? Registers fd on success."""
        state = fuse_shim.passthrough_state()
        if state != 2:
            self.enabled = False
            self.why_not = "the kernel did not offer FUSE_PASSTHROUGH at INIT"
            return False
        why_not = self._auto_declines()
        if why_not:
            self.enabled = False
            self.why_not = why_not
            return False
        key = _key(fd)
        backing_id = self._backing(key, fd)
        if backing_id is None:
            self.enabled = False
            return False
        self._ids[key] = backing_id
        self.enabled = True
        return True

    def _auto_declines(self) -> str:
        """Auto mode takes passthrough where it pays (README, "Kernel opens and passthrough"):
        the pages of store files other mounts read too are shared, at the price of an OPEN
        and a GETATTR answered by the C reader per open (a warm import costs about the same,
        reading every file of a tree 3x more than with kernel opens)."""
        if setting() == "1":
            return ""
        if not self._fast():
            return "auto: the C reader is off (COWFS_FUSE_READER=0), opens would be slow"
        if not self.sharing():
            return ("auto: no other live mount serves these store files "
                    "(COWFS_PASSTHROUGH=1 forces passthrough)")
        return ""

    def writer_refused(self, ino: int, pid: int = 0) -> bool:
        """Must a writer (or truncation) of the node get ETXTBSY: is its store object open by
        passthrough? An idle published entry is stopped first. pid: the process truncating;
        the kernel sends the truncation of its own O_RDONLY|O_TRUNC open as a SETATTR without
        its handle, so that one open of the node does not stand in the way."""
        if self.fast:  # (the reader may have made the node's entry itself)
            answer = fuse_shim.fast_stop(ino, False, pid)
            if answer == fuse_shim.FAST_BUSY:
                return True
            self._stopped(ino, answer)
        live = self._live.get(ino)
        return live is not None and live.on_lower and not (
            pid and live.count == 1 and live.pid == pid)

    def changed(self, ino: int) -> None:
        """The node no longer is the store object its published entry serves (copy-up,
        reload, forget): the reader must not answer its opens any more."""
        if self.fast:
            self._stopped(ino, fuse_shim.fast_stop(ino, True))

    def _stopped(self, ino: int, answer: int) -> None:
        key = self._published.pop(ino, None)
        if answer >= 0:  # (idle: the id is ours again; one the reader made has no key here)
            if key is not None:
                self._keep(key, answer)
            else:
                self._close(answer)

    def _keep(self, key: tuple[int, int], backing_id: int) -> None:
        """An unused backing id of a store object, for the next open of it."""
        if key in self._ids:  # (two nodes of one store object registered it twice)
            self._close(backing_id)
            return
        self._ids[key] = backing_id
        while len(self._ids) > BACKING_IDS_MAX:
            self._close(self._ids.popitem(last=False)[1])

    def reply(self, fh: int, fd: int, ino: int, writable: bool, on_lower: bool,
              pid: int = 0, attr_out: Callable[[], bytes] | None = None) -> int | None:
        """The handle to answer an OPEN with (see the module docstring); raises ETXTBSY.
        None: the kernel refuses the lower layer's files, passthrough is off from now on.
        A handle without daemon part (daemon_fh 0) needs no daemon handle: the caller
        releases its own. attr_out: the node's GETATTR answer (attr_reply), for the reader."""
        if writable and self.writer_refused(ino):  # (began while the open awaited)
            raise OSError(errno.ETXTBSY, os.strerror(errno.ETXTBSY))
        if not writable and self.fast:
            # Not answered by the reader: it raced the publishing, or the node changed since
            # (draining: the kernel keeps the entry's backing, the daemon serves the I/O).
            backing_id, serving = fuse_shim.fast_hold(ino, pid)
            if backing_id >= 0:
                if serving:
                    return PT_FLAG | backing_id << ID_SHIFT | FAST_FH
                return PT_FLAG | PT_DIRECT | backing_id << ID_SHIFT | FAST_FH | fh
        live = self._live.get(ino)
        if live is None and (writable or self._cached.get(ino)):
            return self._cached_open(fh, ino)
        key = _key(fd)
        if live is None:
            backing_id = self._backing(key, fd)
            if backing_id is None and on_lower and not self.lower_ok:
                # (A store on an overlay, say: every lower open would go through the daemon
                # uncached, slower than kernel opens.)
                self.enabled = False
                return None
            if backing_id is None:
                return self._cached_open(fh, ino)
            self.lower_ok |= on_lower
            if on_lower and not writable and attr_out is not None and self._fast():
                fuse_shim.read_ahead(ino, fd)
                fuse_shim.fast_publish(ino, backing_id, pid, attr_out())
                if not self._first_opens:
                    for blocked in self._cached:  # (opened before: see fast_block)
                        fuse_shim.fast_block(blocked, True)
                    fuse_shim.fast_first_opens()  # (the kernel takes store objects)
                    self._first_opens = True
                self._published[ino] = key
                self._trim_published()
                return PT_FLAG | backing_id << ID_SHIFT | FAST_FH
            live = self._live[ino] = Live(backing_id, key, on_lower)
        live.count += 1
        live.pid = pid
        self._opens[fh] = (ino, True)
        direct = writable or live.key != key
        return PT_FLAG | (PT_DIRECT if direct else 0) | live.backing_id << ID_SHIFT | fh

    def _fast(self) -> bool:
        if self.fast is None:
            self.fast = fuse_shim.fast_available()
        return self.fast

    def _trim_published(self) -> None:
        """Stop the oldest entries beyond PUBLISHED_MAX (those in use drain)."""
        while len(self._published) > PUBLISHED_MAX:
            self.changed(next(iter(self._published)))

    def _cached_open(self, fh: int, ino: int) -> int:
        self._cached[ino] = self._cached.get(ino, 0) + 1
        self._opens[fh] = (ino, False)
        if self._first_opens:  # (the reader's own entries: see fuse_shim.fast_block)
            fuse_shim.fast_block(ino, True)
        return fh

    def created(self, fh: int, ino: int) -> None:
        """CREATE opens a new file in cached mode (libfuse's reply, not ours)."""
        self._cached_open(fh, ino)

    def _backing(self, key: tuple[int, int], fd: int) -> int | None:
        backing_id = self._ids.pop(key, None)
        if backing_id is None:
            try:
                backing_id = fuse_shim.backing_open(fd)
            except OSError as exc:
                self.why_not = f"the kernel refused a backing file: {os.strerror(exc.errno or 0)}"
                if not self.failures:
                    log.warning("backing file refused (%s): such opens go through the daemon",
                                os.strerror(exc.errno or 0))
                self.failures += 1
                return None
        return backing_id

    def released(self, fh: int) -> None:
        ino, pt = self._opens.pop(fh, (0, None))
        if pt is None:
            return
        if not pt:
            n = self._cached.get(ino, 1) - 1
            if n:
                self._cached[ino] = n
            else:
                self._cached.pop(ino, None)
                if self._first_opens:
                    fuse_shim.fast_block(ino, False)
            return
        live = self._live[ino]
        live.count -= 1
        if live.count:
            return
        del self._live[ino]
        # Upper files are not kept: a deleted one's space must come back at once. (Two nodes
        # of one store object may also have registered it twice.)
        if not live.on_lower or live.key in self._ids:
            self._close(live.backing_id)
            return
        self._keep(live.key, live.backing_id)

    def drop_unused(self) -> None:
        """After a reload: files of the old layer need not stay open in the kernel (gc may
        delete them; their space comes back once nothing holds them)."""
        if self.fast:
            fuse_shim.fast_stop_all()  # (the reader's own entries too; idle ids closed)
            self._published.clear()
        while self._ids:
            self._close(self._ids.popitem()[1])

    def _close(self, backing_id: int) -> None:
        try:
            fuse_shim.backing_close(backing_id)
        except OSError as exc:
            log.warning("closing backing id %d: %s", backing_id, exc)


def _key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino
