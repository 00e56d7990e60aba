"""Overlay inodes: one Node per file, with a stable inode number for the life of the mount.

A Node is named by links (parent node, name) rather than by a path string, so renaming a
directory moves its whole subtree for free and the inode number survives copy-up and rename.
Nodes are kept after the kernel forgets them (while their file exists), which is what keeps
the number of a path stable; only an unlinked node that the kernel has forgotten and nobody
holds open is dropped.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from cowfs.overlay.lower import LowerEntry

if TYPE_CHECKING:
    from cowfs.overlay.overlay import Attr

ROOT_INO = 1


class Node:
    __slots__ = ("children", "extra_links", "gone", "handles", "implicit", "ino", "lower",
                 "name", "nlookup", "parent", "upper")

    def __init__(self, ino: int, parent: Node | None, name: str, lower: LowerEntry | None,
                 upper: bool) -> None:
        self.ino = ino
        self.parent = parent  # None for the root, and for a node whose last link is gone
        self.name = name
        self.extra_links: list[tuple[Node, str]] | None = None  # hard links beyond the first
        self.lower = lower  # lower entry visible at this path (dirs: None when opaque)
        self.upper = upper  # exists in the upper directory
        self.nlookup = 0
        self.children: dict[str, Node] | None = None  # known children (dirs only)
        self.handles: set[int] | None = None  # open file handle ids
        self.implicit: int | None = None  # the handle serving kernel opens (no OPEN request)
        # Attributes at the moment the last name went away: an open directory or a cwd can
        # still be fstat'ed after rmdir, and must answer (nlink 0), not fail.
        self.gone: Attr | None = None

    def __repr__(self) -> str:
        return f"<Node {self.ino} {self.name!r} upper={self.upper} lower={self.lower is not None}>"


class NodeTable:
    def __init__(self, root_lower: LowerEntry | None) -> None:
        self.root = Node(ROOT_INO, None, "", root_lower, True)
        self.root.nlookup = 1
        self.root.children = {}
        self.by_ino: dict[int, Node] = {ROOT_INO: self.root}
        self.by_upper_id: dict[tuple[int, int], Node] = {}  # hard-linked upper files
        self._next_ino = ROOT_INO + 1
        # Lookups the kernel got from elsewhere than the daemon's handlers (cowfs.fuse.fastlookup).
        self.extra_lookups: Callable[[int], int] = lambda ino: 0

    def path(self, node: Node) -> str:
        parts = []
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        if node is not self.root:
            # a detached (deleted) node; with its errno, or the caller would see EIO
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        return "/".join(reversed(parts))

    def is_attached(self, node: Node) -> bool:
        while node.parent is not None:
            node = node.parent
        return node is self.root

    def new(self, parent: Node, name: str, lower: LowerEntry | None, upper: bool) -> Node:
        node = Node(self._next_ino, parent, name, lower, upper)
        self._next_ino += 1
        self.by_ino[node.ino] = node
        if parent.children is None:
            parent.children = {}
        parent.children[name] = node
        return node

    def add_link(self, node: Node, parent: Node, name: str) -> None:
        if node.extra_links is None:
            node.extra_links = []
        node.extra_links.append((parent, name))
        if parent.children is None:
            parent.children = {}
        parent.children[name] = node

    def unlink(self, parent: Node, name: str) -> Node | None:
        """Remove the name parent/name from the tree; the node lives on while linked/open."""
        children = parent.children or {}
        node = children.pop(name, None)
        if node is None:
            return None
        if node.parent is parent and node.name == name:
            if node.extra_links:
                node.parent, node.name = node.extra_links.pop(0)
            else:
                node.parent = None
        elif node.extra_links:
            node.extra_links = [(p, n) for p, n in node.extra_links
                                if not (p is parent and n == name)]
        self.maybe_drop(node)
        return node

    def move(self, node: Node, old_parent: Node, old_name: str, new_parent: Node,
             new_name: str) -> None:
        """Rename one link of node; the subtree follows through parent pointers."""
        (old_parent.children or {}).pop(old_name, None)
        if node.parent is old_parent and node.name == old_name:
            node.parent, node.name = new_parent, new_name
        elif node.extra_links:
            node.extra_links = [(new_parent, new_name) if (p is old_parent and n == old_name)
                                else (p, n) for p, n in node.extra_links]
        if new_parent.children is None:
            new_parent.children = {}
        new_parent.children[new_name] = node

    def forget(self, node: Node, count: int) -> None:
        node.nlookup = max(0, node.nlookup - count)
        self.maybe_drop(node)

    def lookups(self, node: Node) -> int:
        """How many lookups of node the kernel holds (its FORGETs will count them)."""
        return node.nlookup + self.extra_lookups(node.ino)

    def maybe_drop(self, node: Node) -> None:
        """Drop a node nobody can reach: unlinked, forgotten, not open."""
        if node.parent is None and node is not self.root and not node.handles \
                and self.lookups(node) == 0:
            self.by_ino.pop(node.ino, None)
            for key, n in list(self.by_upper_id.items()):
                if n is node:
                    del self.by_upper_id[key]
