"""Lookups in lower-only directories, answered by the C reader (cowfs/_fuse_fastlookup.c).

A directory that is not copied up holds only what the lower layer gives it, and nothing in
it changes without a copy-up of it first (a create, unlink or rename in it) or of a file in
it (a write, chmod, link): `Overlay.before_copy_up` is where the daemon stops it. So the first
time the daemon answers a LOOKUP in such a directory, it hands the reader the entries of all
its files (directories stay with the daemon: their link counts mean listing them); later
LOOKUPs and GETATTRs of those files cost no Python, nor do READs of their kernel opens. The
kernel's FORGET counts the lookups the reader answered too: `NodeTable.lookups` adds them,
`forget` takes them over. The first listing of such a directory hands the reader its
READDIRPLUS records too: a cold walk of a tree then costs no Python after the first time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from cowfs import fuse_shim
from cowfs.inode import Node
from cowfs.kernel_replies import direntplus
from cowfs.overlay import Overlay

log = logging.getLogger("cowfs.fastlookup")
MAX_DIR = 4096  # bigger directories stay with the daemon (publishing one stalls the loop)


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
        entries that listing numbers): publish its files if it is lower-only, and with a
        snapshot its whole listing too."""
        listing = snapshot is not None
        if parent.upper or parent.children is None or not self._on() \
                or (parent.ino in self._dirs and (not listing or parent.ino in self._listed)):
            return
        published = parent.ino in self._dirs
        self._dirs.add(parent.ino)
        if listing:
            self._listed.add(parent.ino)
        try:
            if snapshot is None:  # (a lookup: the names, without the readdir's work)
                found = [(n, self.ov.lookup(parent, n)) for n in self.ov.listdir(parent)]
                snapshot = [(n, node) for n, node in found if node is not None]
            if len(snapshot) > MAX_DIR:
                return
            items = []
            for name, node in snapshot:
                if not published and node.children is None and node.parent is parent:
                    source = node.lower.source if node.lower is not None else None
                    items.append((os.fsencode(name), node.ino, self.entry_out(node),
                                  os.fsencode(source or "")))
            plus = self._listing(parent, snapshot) if listing else b""
        except OSError as exc:  # (detached meanwhile, a lazy object...): the daemon answers
            log.debug("not publishing %d: %s", parent.ino, exc)
            return
        if items:
            fuse_shim.dir_publish(parent.ino, items)
        if plus:
            fuse_shim.dir_listing(parent.ino, plus)

    def _listing(self, parent: Node, entries: list[tuple[str, Node]]) -> bytes:
        """parent's READDIRPLUS records as the daemon's readdir numbers them: ".", "..",
        then the entries, offsets 1, 2, 3... (directories are there too: the reader only
        sends these records, it never answers a LOOKUP of a directory)."""
        dots = [(".", parent), ("..", parent.parent or parent)]
        return b"".join(direntplus(self.entry_out(node), os.fsencode(name), off)
                        for off, (name, node) in enumerate(dots + entries, 1))

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
        published, lookups, attrs, reads, listings, ahead, dropped = fuse_shim.lookup_totals()
        return {"lookups_published": published, "lookups_in_c": lookups,
                "lookup_getattrs_in_c": attrs, "reads_in_c": reads, "listings_in_c": listings,
                "read_ahead": ahead, "read_ahead_dropped": dropped}
