"""Absorbing what pip, uv or any installer wrote into a mounted cowfs venv.

Another installer writes a distribution into the venv's upper layer like into any
site-packages. Once it is done (its RECORD, written last, is there), the files that match
their RECORD hashes become a manifest in the store (the rules of `cowfs adopt`,
installer.wheel.record_match), the venv's state lists it like one cowfs installed, the daemon
swaps in the new lower layer and then drops the upper copies, which now equal the lower
files: the venv shares them with every other venv, and its private layer keeps only what
differs from RECORD (edits, unlisted files). A distribution cowfs installed and the other
tool replaced or uninstalled leaves the state the same way. Running processes keep
working: a reset path is seen pristine on its next open, open files keep their data.

The daemon runs `cowfs adopt VENV` (this, for a live venv) once an installer has gone quiet;
`cowfs install`, `sync`, `uninstall`, `status` and `reset` absorb first, so that they see
what is really installed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cowfs import dirfd
from cowfs.dirfd import short
from cowfs.errors import CowfsError
from cowfs.mount import control, mount as mounting
from cowfs.mount.spec import VenvState
from cowfs.overlay.reset import ABSENT, DIR, Expectation, upper_identity
from cowfs.overlay.upper import foreign_dist_infos
from cowfs.store import roots
from cowfs.store.layer import ensure_layer, read_head
from cowfs.store.manifest import Manifest, write_manifest
from cowfs.store.store import Store
from installer.interpreters import query_interpreter
from installer.wheel.record_match import Sorter, claims


@dataclass
class Absorbed:
    manifests: list[Manifest] = field(default_factory=list)
    edited: dict[str, list[str]] = field(default_factory=dict)  # dist-info -> private paths
    shared: int = 0  # files now served from the store
    private: int = 0  # files kept in the upper layer
    gone: list[str] = field(default_factory=list)  # "name version" the other tool removed
    unfinished: list[str] = field(default_factory=list)  # dist-infos still being written


def absorb(state: VenvState, store: Store, python: Path | None = None) -> Absorbed | None:
    """Absorb into a live venv; None when there is nothing to do. The caller holds the
    venv's installer lock; the state is updated in place (and saved). With python, shared
    bytecode is compiled for what was absorbed."""
    if not state.may_hold_foreign_dists():
        return None
    site = state.site_packages
    # uv copies a whole dist-info (RECORD included) before or while the package's files
    # arrive: a distribution whose RECORD names files not there yet is still being
    # written, and is left for the next run (the daemon retries; installer finished first).
    info_dirs, unfinished = [], []
    for d in foreign_dist_infos(state.upper):
        (unfinished if _missing(site, d) else info_dirs).append(d)
    heads = {i: read_head(store, i) for i in state.dists}
    # Replaced, or uninstalled: pip and uv delete what RECORD lists, RECORD included (the
    # dist-info directory may stay, holding per-venv files such as REQUESTED). uv deletes
    # RECORD first: while any other file of the distribution is still there, the removal
    # is under way (or RECORD alone was deleted) and dropping the rest from the lower
    # layer would pull files from under the remover (seen: EIO in uv's reinstall). Files
    # another distribution claims are its own (an upgrade rewrote the same paths).
    claimed = claims(site, info_dirs)
    gone = [i for i, h in heads.items() if h.dist_info in info_dirs]
    unrecorded = [i for i, h in heads.items() if i not in gone
                  and not (site / h.dist_info / "RECORD").is_file()]
    if unrecorded:
        others = set(claimed) | files_of(store, [i for i in heads if i not in gone
                                                 and i not in unrecorded])
        for i in unrecorded:
            if _still_there(store, i, site, others):
                unfinished.append(heads[i].dist_info)  # being removed: absorbed when done
            else:
                gone.append(i)
    if not info_dirs and not gone:
        return Absorbed(unfinished=unfinished) if unfinished else None
    if mounting.mount_state(str(site)) != "live":
        raise CowfsError(f"{site} is not mounted: mount it (`cowfs mount {state.venv}`) so "
                         "that what other tools installed can be absorbed")
    result = Absorbed(unfinished=unfinished,
                      gone=[f"{heads[i].name} {heads[i].version}" for i in gone
                            if heads[i].dist_info not in info_dirs])
    # The replaced or removed distributions' names that the view no longer shows (the
    # other tool removed them: whiteouts now hiding nothing once the lower has them no
    # more). Anything visible stays: it may be private.
    gone_infos = {f"{heads[i].dist_info}/" for i in gone}
    gone_extra = {fe.path for fe in state.extra if fe.path.startswith(tuple(gone_infos))}
    old_hidden = {p for p in paths_of(store, gone) | gone_extra
                  if not _in_view(site, p)}
    # What each upper entry to be dropped was when examined: the daemon drops it only if it
    # still is (pip or uv may start again at any moment, e.g. writing the next version).
    seen: dict[str, Expectation] = {}
    for p in old_hidden | gone_extra:
        _look(seen, state.upper, p)
    with store.lock():  # from the first object until the root names the manifests
        # The gone ones' per-venv files (REQUESTED, RECORD...) go with them; a replacement's
        # own arrive below.
        state.extra = [fe for fe in state.extra if fe.path not in gone_extra]
        n_extra = len(state.extra)
        sorter = Sorter(store, site, state, info_dirs)
        for path, owner in sorted(claimed.items()):
            try:
                st = os.lstat(short(f"{site}/{path}"))  # (any depth)
            except FileNotFoundError:
                continue  # listed but not installed (pip lists pycs it may not write)
            _look(seen, state.upper, path)  # before its content is read
            sorter.take(path, st, owner)
        stale = sorter.stale_pycs()
        result.manifests = sorter.manifests()
        for m in result.manifests:
            write_manifest(store, m)
            ensure_layer(store, m.id)
        result.edited = {d: sorted(p) for d, p in sorter.edited.items() if p}
        result.shared, result.private = len(sorter.shared()), len(sorter.private)
        per_venv = {fe.path for fe in state.extra[n_extra:]}
        kept = [i for i in state.dists if i not in gone]
        state.dists = kept + [m.id for m in result.manifests]
        state.extra = list({fe.path: fe for fe in state.extra}.values())
        state.requested = sorted(set(state.requested))
        bytecode = [b for b in state.bytecode if b.rpartition(".")[0] in kept]
        if python is not None and result.manifests:
            from installer.venv.sync import shared_bytecode_for  # compiled after, like installs

            info = query_interpreter(python, store)
            bytecode += shared_bytecode_for(store, result.manifests, info, python,
                                            state.venv)
        state.bytecode = bytecode
        store.sync_objects()  # the state names venv-local objects
        state.save()
        roots.record(store, state)
    socket = state.mount_spec().socket
    control.request(socket, "reload")
    # What the view still shows of a gone distribution's per-venv files is the other
    # tool's leftover (uv keeps REQUESTED when it removes): it goes too.
    drop = sorted(sorter.shared() | set(stale) | old_hidden | per_venv
                  | (gone_extra - per_venv))
    dirs = emptied_dirs(state.upper, drop)
    expect = {**{p: seen.get(p, ABSENT) for p in drop}, **{d: seen.get(d, DIR) for d in dirs}}
    deepest_first = sorted(drop, key=lambda p: -p.count("/")) + dirs
    control.request(socket, "reset", paths=deepest_first, expect=expect)
    return result


def _missing(site: Path, info_dir: str) -> bool:
    """A file its RECORD names (bytecode aside: pip lists pycs it may not write) is absent."""
    from installer.venv.changes import parse_installed_record

    try:
        rows = parse_installed_record((site / info_dir / "RECORD").read_bytes(), str(site))
    except OSError:
        return True
    return any(not path.startswith("../") and not path.endswith(".pyc")
               and not _in_view(site, path) for path, _, _ in rows)


def _in_view(site: Path, path: str) -> bool:
    """lexists at any depth (os.path.lexists says False past PATH_MAX)."""
    return dirfd.lexists((dirfd.AT_FDCWD, short(f"{site}/{path}")))


def _still_there(store: Store, dist: str, site: Path, others: set[str]) -> bool:
    """A file of the installed distribution (bytecode aside) that no other distribution
    claims is still in the view."""
    return any(not p.endswith((".pyc", "/RECORD")) and p not in others
               and _in_view(site, p) for p in files_of(store, [dist]))


def files_of(store: Store, ids: list[str]) -> set[str]:
    """The site-packages files of these distributions."""
    from cowfs.store.manifest import read_manifest

    return {fe.path for i in ids for fe in read_manifest(store, i).files}


def paths_of(store: Store, ids: list[str]) -> set[str]:
    """Files of these distributions and the directories above them."""
    paths: set[str] = set()
    for path in files_of(store, ids):
        parts = path.split("/")
        paths.update("/".join(parts[:n]) for n in range(1, len(parts) + 1))
    return paths


def _look(seen: dict[str, Expectation], upper: Path, path: str) -> None:
    """What path and its directories in the upper layer are now, for the reset's check."""
    seen[path] = upper_identity(upper, path)
    d = path.rpartition("/")[0]
    while d and d not in seen:
        seen[d] = upper_identity(upper, d)
        d = d.rpartition("/")[0]


def emptied_dirs(upper: Path, dropped: list[str]) -> list[str]:
    """Upper directories that will hold nothing once dropped is reset (deepest first), so
    that no empty copy of a shared directory stays private."""
    dropped_set = set(dropped)
    dirs = sorted({p.rpartition("/")[0] for p in dropped if "/" in p},
                  key=lambda d: -d.count("/"))
    out: list[str] = []
    for d in dirs:
        while d:
            try:
                names = os.listdir(short(f"{upper}/{d}"))  # (any depth: cowfs.dirfd)
                left = [n for n in names if f"{d}/{n}" not in dropped_set]
            except OSError:
                break
            if left:
                break
            dropped_set.add(d)
            out.append(d)
            d = d.rpartition("/")[0]
    return list(dict.fromkeys(out))
