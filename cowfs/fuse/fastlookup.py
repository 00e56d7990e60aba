"""Lookups in lower-only directories, answered by the C reader (cowfs/fuse/_fuse_fastlookup.c).

A directory that is not copied up holds only what the lower layer gives it, and nothing in
it changes without a copy-up of it first (a create, unlink or rename in it) or of a file in
it (a write, chmod, link): `Overlay.before_copy_up` is where the daemon stops it. So the first
time the daemon answers a LOOKUP in such a directory, it hands the reader all its entries
(files and subdirectories: a lower-only directory's link count is the lower's, fixed while
it is published) and tells it they are all there; later LOOKUPs in it cost no Python, of
names it does not hold neither (an import probes `__init__` with three extension-module
suffixes in every package), nor do GETATTRs of those nodes or READs of their kernel opens.
The directory's `__pycache__` is published with it: importlib looks it up next and never
lists it. The kernel's FORGET counts the lookups the reader answered too:
`NodeTable.lookups` adds them, `forget` takes them over. The reader gets the directory's
READDIRPLUS records with its entries (an import lists a package right after probing it; a
walk lists first): listing it costs no Python either.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from cowfs.fuse import entries, fuse_shim
from cowfs.fuse.kernel_replies import direntplus, entry_out
from cowfs.overlay.inode import Node
from cowfs.overlay.overlay import Overlay

log = logging.getLogger("cowfs.fuse.fastlookup")
MAX_DIR = 4096  # bigger directories stay with the daemon (publishing one stalls the loop)
BYTECODE_DIR = "__pycache__"  # looked up (never listed) right after its directory
NEGATIVE = entry_out(entries.negative())


class FastLookups:
    def __init__(self, ov: Overlay, entry_out: Callable[[Node], bytes]) -> None:
        self.ov = ov
        self.entry_out = entry_out
        self.on: bool | None = None  # known once the reader runs (the first lookup)
        self._dirs: set[int] = set()  # published (or too big: looked at once)
        self._listed: set[int] = set()  # ... with their listing
        ov.table.extra_lookups = self.lookups

    def _on(self) -> bool:
        if self.on is None:
            self.on = fuse_shim.fast_available() and \
                os.environ.get("COWFS_FAST_LOOKUPS", "1") != "0"
        return self.on

    def looked_in(self, parent: Node,
                  snapshot: list[tuple[str, Node]] | None = None) -> None:
        """The daemon answered a LOOKUP in parent, or its first READDIRPLUS (snapshot: the
        entries that listing numbers): publish its entries if it is lower-only, with its
        whole listing (but for a `__pycache__`, which only a walk lists)."""
        if parent.upper or parent.children is None or not self._on():
            return
        published = parent.ino in self._dirs
        listing = snapshot is not None or (not published and parent.name != BYTECODE_DIR)
        if published and (not listing or parent.ino in self._listed):
            return
        self._dirs.add(parent.ino)
        if listing:
            self._listed.add(parent.ino)
        try:
            if snapshot is None:  # (the names and nodes as the daemon's readdir numbers them)
                found = [(n, self.ov.lookup(parent, n)) for n in self.ov.listdir(parent)]
                snapshot = [(n, node) for n, node in found if node is not None]
                complete = len(snapshot) == len(found)
            else:
                complete = True
            if len(snapshot) > MAX_DIR:
                return
            outs = [self.entry_out(node) for _, node in snapshot]
            items = []
            for (name, node), out in [] if published else zip(snapshot, outs, strict=True):
                if node.parent is not parent or node.upper:  # (a second name, a copy-up)
                    complete = False
                    continue
                source = node.lower.source if node.lower is not None \
                    and node.children is None else None
                items.append((os.fsencode(name), node.ino, out, os.fsencode(source or "")))
            plus = self._listing(parent, snapshot, outs) if listing else b""
        except OSError as exc:  # (detached meanwhile, a lazy object...): the daemon answers
            log.debug("not publishing %d: %s", parent.ino, exc)
            return
        if items:
            fuse_shim.dir_publish(parent.ino, items, NEGATIVE if complete else None)
        if plus:
            fuse_shim.dir_listing(parent.ino, plus)
        if not published:
            bytecode = parent.children.get(BYTECODE_DIR)
            if bytecode is not None and bytecode.children is not None:
                self.looked_in(bytecode)

    def _listing(self, parent: Node, entries: list[tuple[str, Node]],
                 outs: list[bytes]) -> bytes:
        """parent's READDIRPLUS records as the daemon's readdir numbers them: ".", "..",
        then the entries (outs: their LOOKUP answers), offsets 1, 2, 3..."""
        dots = [(".", parent), ("..", parent.parent or parent)]
        records = [direntplus(self.entry_out(node), os.fsencode(name), off)
                   for off, (name, node) in enumerate(dots, 1)]
        pairs = zip(entries, outs, strict=True)
        records += (direntplus(out, os.fsencode(name), off)
                    for off, ((name, _), out) in enumerate(pairs, len(dots) + 1))
        return b"".join(records)

    def changed(self, node: Node) -> None:
        """node is about to be copied up: its directory (or itself) is no longer lower-only."""
        for d in (node, node.parent):
            if d is not None and d.ino in self._dirs:
                self._dirs.discard(d.ino)
                self._listed.discard(d.ino)
                fuse_shim.dir_stop(d.ino)

    def changed_all(self) -> None:
        """The lower layer changed (reload, reset, repair)."""
        if self._dirs:
            self._dirs.clear()
            self._listed.clear()
            fuse_shim.dir_stop_all()

    def lookups(self, ino: int) -> int:
        """Lookups of ino the reader answered that the daemon has not counted yet."""
        return fuse_shim.lookups_of(ino, take=False) if self.on else 0

    def take(self, ino: int) -> int:
        """The same, counted by the caller from now on (at a FORGET)."""
        return fuse_shim.lookups_of(ino, take=True) if self.on else 0

    def status(self) -> dict[str, int]:
        published, lookups, negatives, attrs, reads, listings, ahead, dropped = \
            fuse_shim.lookup_totals()
        return {"lookups_published": published, "lookups_in_c": lookups,
                "negative_lookups_in_c": negatives,
                "lookup_getattrs_in_c": attrs, "reads_in_c": reads, "listings_in_c": listings,
                "read_ahead": ahead, "read_ahead_dropped": dropped}
