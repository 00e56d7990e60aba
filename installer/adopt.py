"""`cowfs adopt`: turn an existing venv (made by pip, uv or anything) into a cowfs venv.

Every installed distribution (a dist-info directory with a RECORD) becomes a manifest of
its own whose files go into the store -- but only files whose bytes still match their
RECORD hash. A file that does not match was edited (for instance through a hard link into a
shared uv cache): it stays private in the venv's upper layer, and its manifest row holds the
pristine content only when the store already has it from a verified wheel, so that
`cowfs reset` can bring it back. Files no RECORD names (user files, caches) stay private too.

Crash safety: the store and a staging directory next to site-packages are written first;
the original venv is untouched until one atomic rename turns the staging directory into
VENV/.cowfs. A marker file there says the swap is unfinished; `cowfs adopt` on such a venv
finishes it (hook, emptying the real site-packages, mount), each step being idempotent.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cowfs import mount as mounting
from cowfs import roots
from cowfs.errors import CowfsError
from cowfs.manifest import (
    Manifest,
    write_manifest,
)
from cowfs.spec import VenvState, new_venv_id
from cowfs.store import CHUNK, Store, fsync_dir
from cowfs.upper import RENAME_NOREPLACE, renameat2
from installer.automount import HOOK_MODULE, HOOK_PTH, write_hook
from installer.interpreters import InterpreterInfo, query_interpreter
from installer.record_match import Sorter, claims, shared_bytecode
from installer.venv import ensure_mounted, venv_python

MARKER = "adopting"  # in VENV/.cowfs while the swap is unfinished
STAGING_PREFIX = ".cowfs-adopt-"


@dataclass
class AdoptedDist:
    manifest: Manifest
    private: list[str] = field(default_factory=list)  # edited, pristine known: reset works
    unknown: list[str] = field(default_factory=list)  # edited, pristine unknown


@dataclass
class AdoptResult:
    state: VenvState
    dists: list[AdoptedDist] = field(default_factory=list)
    shared: int = 0  # files moved into the store
    private: int = 0  # files kept in the upper layer
    dropped_pycs: int = 0
    mounted: str = ""


@contextlib.contextmanager
def _locked(venv: Path) -> Iterator[None]:
    """One adopter per venv; flock on the directory itself leaves no file behind."""
    fd = os.open(venv, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def adopt(path: Path, store: Store) -> AdoptResult:
    venv = path.absolute()
    if not (venv / "pyvenv.cfg").is_file():
        raise CowfsError(f"{venv} is not a venv (no pyvenv.cfg)")
    with _locked(venv):
        state_dir = VenvState.state_dir(venv)
        if (state_dir / MARKER).exists() and VenvState.path_for(venv).exists():
            state = VenvState.load(venv)
            return _finish(state, AdoptResult(state))  # an interrupted adopt: finish it
        if VenvState.path_for(venv).exists():
            raise CowfsError(f"{venv} is already a cowfs venv")
        if state_dir.exists():
            if not (state_dir / MARKER).exists():
                raise CowfsError(f"{state_dir} exists but is no cowfs state; move it away")
            shutil.rmtree(state_dir)  # a swap that crashed before the state was saved
        for old in venv.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(old, ignore_errors=True)  # left by a crashed adopt
        store.ensure()
        info = query_interpreter(venv_python(venv), store)
        site = Path(info.paths["purelib"])
        _check_site(venv, site, Path(info.paths.get("platlib", site)))
        staging = venv / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
        # Shared lock from the first object until the gc root names the manifests.
        with store.lock():
            try:
                state, result = _build(venv, site, store, staging, info)
                renameat2(str(staging), str(state_dir), RENAME_NOREPLACE)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            fsync_dir(venv)
            state.save()
            roots.record(store, state)
        return _finish(state, result)


def _check_site(venv: Path, site: Path, platlib: Path) -> None:
    if venv not in site.parents or not site.is_dir():
        raise CowfsError(f"unexpected site-packages location {site} for {venv}")
    if mounting.find_mount(str(site)) is not None:
        raise CowfsError(f"{site} is a mount point; unmount it first")
    if os.path.realpath(platlib) != os.path.realpath(site) and platlib.is_dir() and any(
            platlib.iterdir()):
        raise CowfsError(f"{venv} has a separate platlib {platlib}; not supported by adopt")


def _walk(site: Path) -> tuple[dict[str, os.stat_result], list[str]]:
    """Every non-directory under site (lstat) and every empty directory, relative."""
    files: dict[str, os.stat_result] = {}
    empty: list[str] = []
    for dirpath, dirnames, filenames in os.walk(site):
        rel = os.path.relpath(dirpath, site)
        rel = "" if rel == "." else rel
        # os.walk does not descend into symlinked directories: they are entries like files.
        links = [d for d in dirnames if os.path.islink(f"{dirpath}/{d}")]
        for name in [*filenames, *links]:
            files[f"{rel}/{name}" if rel else name] = os.lstat(f"{dirpath}/{name}")
        if rel and not dirnames and not filenames:
            empty.append(rel)
    return files, empty


def _build(venv: Path, site: Path, store: Store, staging: Path, info: InterpreterInfo
           ) -> tuple[VenvState, AdoptResult]:
    files, empty_dirs = _walk(site)
    infos = sorted(p for p in files if p.count("/") == 1 and p.endswith(".dist-info/RECORD"))
    info_dirs = [rec.partition("/")[0] for rec in infos]
    claimed = claims(site, info_dirs, set(files))
    upper = staging / "upper"
    upper.mkdir(parents=True)
    (staging / "work").mkdir()
    state = VenvState(venv=venv, site_packages=site, store=store.root,
                      python=str(venv_python(venv)), id=new_venv_id())
    result = AdoptResult(state)
    sorter = Sorter(store, site, state, info_dirs)
    for path, st in sorted(files.items()):
        sorter.take(path, st, claimed.get(path))
    result.dropped_pycs = len(sorter.stale_pycs())
    private = sorter.private
    for path in sorted(private):
        _copy_private(site, upper, path)
        result.private += 1
    for d in empty_dirs:
        (upper / d).mkdir(parents=True, exist_ok=True)
    _copy_dir_stats(site, upper)
    result.shared = len(sorter.shared())
    for m in sorter.manifests():
        write_manifest(store, m)
        state.dists.append(m.id)
        result.dists.append(AdoptedDist(m, sorter.edited[m.dist_info],
                                        sorter.unknown[m.dist_info]))
    state.bytecode = shared_bytecode(store, [d.manifest for d in result.dists], info,
                                     venv_python(venv))
    (staging / MARKER).write_text(json.dumps({"site_packages": str(site)}))
    _fsync_tree(staging)
    # The originals are deleted after the swap: the objects must be durable first.
    store.sync_objects()
    fsync_dir(store.dists)
    return state, result


def _copy_private(site: Path, upper: Path, rel: str) -> None:
    """A copy (never a link: a hard link would keep sharing the inode with a cache)."""
    src, dst = site / rel, upper / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISREG(st.st_mode):
        with open(src, "rb") as fi, open(dst, "xb") as fo:
            shutil.copyfileobj(fi, fo, CHUNK)
            fo.flush()
            os.fsync(fo.fileno())
        shutil.copystat(src, dst)
    else:
        return  # sockets, fifos, devices: nothing a package ships
    if os.geteuid() == 0:
        os.lchown(dst, st.st_uid, st.st_gid)


def _copy_dir_stats(site: Path, upper: Path) -> None:
    """Upper directories get the mode and times of the originals (deepest first)."""
    for dirpath, _, _ in sorted(os.walk(upper), key=lambda t: -len(t[0])):
        rel = os.path.relpath(dirpath, upper)
        if rel != ".":
            with contextlib.suppress(OSError):
                shutil.copystat(site / rel, dirpath)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, _ in os.walk(root):
        fsync_dir(Path(dirpath))


def _finish(state: VenvState, result: AdoptResult) -> AdoptResult:
    """After the swap: hook first (so any interrupted state still mounts on use), then empty
    the real site-packages, drop the marker, mount. Safe to run again."""
    site = state.site_packages
    if mounting.find_mount(str(site)) is None:
        write_hook(site, state.venv)
        keep = {HOOK_MODULE, HOOK_PTH}
        for entry in list(site.iterdir()):
            if entry.name in keep:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        fsync_dir(site)
    (VenvState.state_dir(state.venv) / MARKER).unlink(missing_ok=True)
    result.mounted = ensure_mounted(state)
    return result


