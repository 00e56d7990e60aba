"""gc roots: the store's record of the venvs that use it, wherever they live.

One root per venv, `roots/<venv id>.json`, keyed by the venv's own id (not its path: two
containers may both have `/app/.venv`). Besides the venv's path it records what the venv
references (distributions, bytecode manifests, venv-local objects), the mount namespace it
was registered from and when it was last used. gc needs those because a venv in another
mount namespace (a container, `unshare -m`) is not visible where gc runs: such a root is
*unseen*, not dead, and keeps what it records until it has gone unused for the retention
period. What a live mount serves is protected by its lease (cowfs.store.lease) on top of that.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cowfs.errors import CowfsError, StoreError
from cowfs.mount.spec import VenvState
from cowfs.store.store import Store

DEFAULT_RETENTION_S = 30 * 86400
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_retention(text: str) -> float:
    """`30d`, `12h`, `90m`, `45s`, `2w`; a bare number is days."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if m is None:
        raise CowfsError(f"bad retention {text!r}: use a number with a unit s, m, h, d or w "
                         "(e.g. 30d, 12h)")
    return float(m[1]) * _UNITS[m[2] or "d"]


def default_retention() -> float:
    env = os.environ.get("COWFS_GC_RETENTION")
    return parse_retention(env) if env else DEFAULT_RETENTION_S


def mount_namespace() -> str:
    """This process's mount namespace (`mnt:[4026531841]`), "" where /proc cannot tell."""
    try:
        return os.readlink("/proc/self/ns/mnt")
    except OSError:
        return ""


def root_file(store: Store, state: VenvState) -> Path:
    return store.roots / f"{state.id}.json"


def record(store: Store, state: VenvState) -> None:
    """Write the venv's root with what its state references. Callers hold the store lock
    (shared) from the first new object until this returns. A read-only store gets no root:
    nobody can collect it from here, and the owner's gc sees the mount's lease."""
    doc = {"venv": str(state.venv), "state": str(VenvState.path_for(state.venv)),
           "id": state.id, "mntns": mount_namespace(), "used": time.time(),
           "refs": {"dists": list(state.dists), "bytecode": list(state.bytecode),
                    "objects": sorted({fe.digest for fe in state.extra})}}
    try:
        store.write_json(root_file(store, state), doc)
    except StoreError:
        if store.writable():
            raise


def touch(store: Store, state: VenvState) -> None:
    """Mark the root used now (a mount starting or ending): the retention clock of an
    unseen root runs from its venv's last use, not from its creation."""
    try:
        os.utime(root_file(store, state))
    except OSError:
        pass  # no root (read-only store) or not ours to touch: nothing to record


def remove(store: Store, state: VenvState) -> None:
    root_file(store, state).unlink(missing_ok=True)


@dataclass
class Root:
    file: Path
    venv: Path | None
    status: str  # live, unseen, dead, broken (unreadable root or state: liveness unknown)
    reason: str = ""
    state: VenvState | None = None
    bytecode: list[str] = field(default_factory=list)
    recorded: dict[str, list[str]] = field(default_factory=dict)  # refs kept by the root
    last_used: float = 0.0

    @property
    def dist_ids(self) -> list[str]:
        if self.state is not None:
            return [*self.state.dists, *self.bytecode]
        return [*self.recorded.get("dists", []), *self.recorded.get("bytecode", [])]

    @property
    def object_ids(self) -> list[str]:
        if self.state is not None:
            return [fe.digest for fe in self.state.extra]
        return list(self.recorded.get("objects", []))


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def scan(store: Store, *, now: float | None = None,
         retention: float = DEFAULT_RETENTION_S, drop_unseen: bool = False) -> list[Root]:
    """Every root, classified from where this process runs.

    live: the venv is here, is the one registered and uses this store. unseen: it is not
    here but was registered from another mount namespace, so it may well exist there; kept
    (with what the root records) until unused for `retention`, unless `drop_unseen`.
    dead: deleted, replaced or moved to another store, as seen from its own namespace.
    """
    now = time.time() if now is None else now
    here = mount_namespace()
    roots: list[Root] = []
    for f in sorted(store.roots.glob("*.json")) if store.roots.is_dir() else ():
        try:
            doc = json.loads(f.read_text())
            venv = Path(doc["venv"])
        except (OSError, ValueError, KeyError, TypeError):
            roots.append(Root(f, None, "broken", "unreadable root file"))
            continue
        roots.append(_classify(store, f, doc, venv, here, now, retention, drop_unseen))
    return roots


def _classify(store: Store, f: Path, doc: dict[str, Any], venv: Path, here: str, now: float,
              retention: float, drop_unseen: bool) -> Root:
    state_file = VenvState.path_for(venv)
    why = ""
    if not venv.is_dir():
        why = "venv deleted"
    elif not state_file.exists():
        why = "no cowfs state any more"
    else:
        try:
            state = VenvState.load(venv)
            raw = json.loads(state_file.read_text())
        except (OSError, ValueError, CowfsError) as exc:
            return Root(f, venv, "broken", str(exc))
        if "id" in doc and state.id != doc["id"]:
            why = "another venv is at that path now"
        elif not _same_dir(state.store, store.root):
            why = f"venv now uses the store {state.store}"
        else:
            return Root(f, venv, "live", "", state, _bytecode_ids(raw))
    ns = doc.get("mntns")
    refs = doc.get("refs")
    if not ns or ns == here or not isinstance(refs, dict):
        return Root(f, venv, "dead", why)
    last = max(_num(doc.get("used")), _mtime(f))
    recorded = {k: [str(x) for x in v] for k, v in refs.items() if isinstance(v, list)}
    root = Root(f, venv, "unseen", f"not visible here (registered from {ns})",
                recorded=recorded, last_used=last)
    if drop_unseen:
        root.status, root.reason = "dead", f"{root.reason}; dropped on request"
    elif now - last > retention:
        root.status = "dead"
        root.reason = f"{root.reason}; unused for {_days(now - last)}"
    return root


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) else 0.0


def _mtime(f: Path) -> float:
    try:
        return f.stat().st_mtime
    except OSError:
        return 0.0


def _days(seconds: float) -> str:
    return f"{seconds / 86400:.1f} days" if seconds >= 86400 else f"{seconds / 3600:.1f} hours"


def _bytecode_ids(doc: Any) -> list[str]:
    """`bytecode` in a state: a list of manifest ids (tolerates a dict or nested lists)."""
    out: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(doc.get("bytecode", []) if isinstance(doc, dict) else [])
    return out
