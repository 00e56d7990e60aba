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

from cowfs.dirfd import proc
from cowfs.errors import CowfsError
from cowfs.mount import mount as mounting
from cowfs.mount.spec import VenvState, new_venv_id
from cowfs.overlay.upper import RENAME_NOREPLACE, renameat2
from cowfs.store import roots
from cowfs.store.manifest import (
    Manifest,
    write_manifest,
)
from cowfs.store.store import CHUNK, Store, fsync_dir
from installer.venv import tree
from installer.venv.automount import HOOK_MODULE, HOOK_PTH, write_hook
from installer.interpreters import InterpreterInfo, query_interpreter
from installer.wheel.record_match import Sorter, claims, shared_bytecode
from installer.venv.venv import ensure_mounted, venv_python

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
    """Every non-directory under site (lstat) and every empty directory, relative. Through
    directory handles, raising on any error: a subtree the walk missed (deeper than
    PATH_MAX, say) would be lost when _finish empties site-packages."""
    files: dict[str, os.stat_result] = {}
    empty: list[str] = []
    for rel, dirnames, names, fd in tree.walk(site):
        for name in names:
            files[f"{rel}/{name}" if rel else name] = os.lstat(name, dir_fd=fd)
        if rel and not dirnames and not names:
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
    with _Copier(site, upper) as copier:
        for path in sorted(sorter.private):
            copier.copy(path)
            result.private += 1
        for d in empty_dirs:
            os.close(tree.descend(copier.dst_root, d, create=True))
        copier.copy_dir_stats()
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


class _Copier:
    """Copies private entries from site to the staging upper, relative to directory handles
    (any depth); the handles of the directory last used are kept, as entries come sorted."""

    def __init__(self, site: Path, upper: Path) -> None:
        self.src_root = os.open(site, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.dst_root = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._parent: tuple[str, int, int] | None = None

    def __enter__(self) -> _Copier:
        return self

    def __exit__(self, *exc: object) -> None:
        self._drop()
        os.close(self.src_root)
        os.close(self.dst_root)

    def _drop(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            os.close(self._parent[2])
            self._parent = None

    def _dirs(self, parent: str) -> tuple[int, int]:
        if self._parent is None or self._parent[0] != parent:
            self._drop()
            src = tree.descend(self.src_root, parent)
            try:
                dst = tree.descend(self.dst_root, parent, create=True)
            except BaseException:
                os.close(src)
                raise
            self._parent = (parent, src, dst)
        return self._parent[1], self._parent[2]

    def copy(self, rel: str) -> None:
        """A copy (never a link: a hard link would keep sharing the inode with a cache)."""
        parent, _, name = rel.rpartition("/")
        src, dst = self._dirs(parent)
        st = os.lstat(name, dir_fd=src)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=src), name, dir_fd=dst)
        elif stat.S_ISREG(st.st_mode):
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            with open(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src),
                      "rb") as fi, open(os.open(name, flags, 0o600, dir_fd=dst), "wb") as fo:
                shutil.copyfileobj(fi, fo, CHUNK)
                fo.flush()
                os.fsync(fo.fileno())
            shutil.copystat(proc((src, name)), proc((dst, name)))
        else:
            return  # sockets, fifos, devices: nothing a package ships
        if os.geteuid() == 0:
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dst, follow_symlinks=False)

    def copy_dir_stats(self) -> None:
        """Upper directories get the mode and times of the originals (children first)."""
        self._drop()
        for rel, _, _, fd in tree.walk(proc((self.dst_root, ".")), topdown=False):
            if rel:
                src = tree.descend(self.src_root, rel)
                try:
                    with contextlib.suppress(OSError):
                        shutil.copystat(proc((src, ".")), proc((fd, ".")))
                finally:
                    os.close(src)


def _fsync_tree(root: Path) -> None:
    for _, _, _, fd in tree.walk(root):
        os.fsync(fd)


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


