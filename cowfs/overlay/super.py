"""Building an overlay from a MountSpec (the kernel's super.c): lower, upper, live reload."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from cowfs.mount.spec import MountSpec, VenvState
from cowfs.overlay.inode import Node
from cowfs.overlay.lower import DirLower, Lower, ManifestLower, join
from cowfs.overlay.overlay import Overlay
from cowfs.overlay.upper import Upper
from cowfs.store import roots
from cowfs.store.layer import layer_of_entries, read_layer
from cowfs.store.lease import StoreLease
from cowfs.store.store import Store

log = logging.getLogger("cowfs.overlay.super")


def build_lower(spec: MountSpec) -> tuple[Lower, StoreLease | None]:
    """The lower layer, and for a venv the lease on the store files it is built from,
    taken before any of them is read (gc in any namespace then keeps them)."""
    if spec.venv is None:
        return DirLower([Path(p) for p in spec.lowerdirs]), None
    state = VenvState.load(Path(spec.venv))
    store = Store(state.store)
    # Bytecode first: later manifests win a clash, and a wheel's own file must win.
    ids = [*state.bytecode, *state.dists]
    lease = StoreLease.acquire(store, ids, (fe.digest for fe in state.extra))
    try:
        missing: list[str] = []
        layers = [read_layer(store, d, missing) for d in ids]
        if missing:
            log.info("%d manifests have no compiled layer (read as JSON): %s", len(missing),
                     ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else ""))
        layers.append(layer_of_entries(layers[0].mtime_ns if layers else 0, state.extra))
        st = os.stat(state.venv)
        lower = ManifestLower(store.objects, layers, uid=st.st_uid, gid=st.st_gid)
    except BaseException:
        lease.release()
        raise
    roots.touch(store, state)
    return lower, lease


def build_overlay(spec: MountSpec, lower: Lower) -> Overlay:
    os.makedirs(spec.upper, exist_ok=True)
    os.makedirs(spec.work, exist_ok=True)
    return Overlay(lower, Upper(spec.upper, spec.work))


@dataclass
class Invalidation:
    """What the kernel cached that a daemon-side change made stale."""

    inodes: list[int] = field(default_factory=list)  # data and attributes
    entries: list[tuple[int, str]] = field(default_factory=list)  # (parent ino, name)


def swap_lower(ov: Overlay, new: Lower) -> Invalidation:
    """Replace the lower layer of a live overlay (after an install or uninstall).

    Known nodes are re-resolved against the new lower, parents before children; names that
    appeared, vanished or changed are reported so the kernel drops positive and negative
    dentries and cached pages for them.
    """
    old = ov.lower
    ov.lower = new
    inv = Invalidation()
    root = ov.root
    if root.lower is not None:
        root.lower = new.lookup("")
    _refresh_dir(ov, old, new, root, "", inv)
    inv.inodes.append(root.ino)
    return inv


def _refresh_dir(ov: Overlay, old: Lower, new: Lower, node: Node, path: str,
                 inv: Invalidation) -> None:
    if node.lower is not None or old.lookup(path) is not None:
        before = set(old.listdir(path)) if old.lookup(path) is not None else set()
        after = set(new.listdir(path)) if node.lower is not None else set()
        changed = before ^ after
        for name in changed:
            inv.entries.append((node.ino, name))
        if changed:
            inv.inodes.append(node.ino)  # the kernel may hold the old listing
    for name, child in list((node.children or {}).items()):
        child_path = join(path, name)
        if child.parent is not node or child.name != name:
            continue  # an extra hard link; handled through its primary name
        entry = new.lookup(child_path) if node.lower is not None else None
        if child.upper:
            if child.children is not None:
                # Same rule as a fresh lookup: merge unless the upper dir is opaque.
                child.lower = entry if entry is not None and entry.is_dir \
                    and not ov.upper.is_opaque(child_path) else None
        elif entry is None or (entry.is_dir != (child.children is not None)):
            ov.table.unlink(node, name)
            inv.entries.append((node.ino, name))
            continue
        elif entry != child.lower:
            child.lower = entry
            inv.inodes.append(child.ino)
        if child.children is not None:
            _refresh_dir(ov, old, new, child, child_path, inv)
