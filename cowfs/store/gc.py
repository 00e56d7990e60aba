"""Store maintenance: which venvs are alive, verify objects, collect garbage, measure usage.

Liveness comes from gc roots (cowfs.store.roots) and from the leases of live mounts
(cowfs.store.lease). A root is live while its venv exists here and still uses this store; a root
registered from another mount namespace (a container) whose venv is not visible here is
unseen and keeps what it records until the retention period has passed. Whatever a live
mount anywhere on this kernel serves is leased and kept whatever the roots say. Link counts
are never consulted: objects are served through mounts, not hard-linked into venvs.

gc holds the store lock exclusively: installs hold it shared from ingest until a root
refers to what they ingested, and mounts while they take their lease, so gc never sees a
half-installed distribution or a starting mount's files as garbage.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cowfs.errors import StoreError
from cowfs.store import roots as gc_roots
from cowfs.store.lease import in_use
from cowfs.store.manifest import FileEntry, Manifest, iter_manifests, manifest_path, read_manifest
from cowfs.store.remote import origin_path
from cowfs.store.store import OBJECT_MODE, Store, digest_bytes, digest_fd

TMP_GRACE_S = 3600  # tmp/ entries younger than this may belong to a running writer


def check_root(store: Store) -> None:
    """Refuse a store root that cannot be a directory (COWFS_HOME naming a file, or a path
    below one): reading it as an empty store would hide the mistake. A root that does not
    exist yet is fine (an empty store)."""
    for path in (store.root, *store.root.parents):
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            continue  # the nearest existing ancestor decides
        except OSError:
            return  # cannot tell (no search permission): let the caller's access decide
        if stat.S_ISDIR(st.st_mode):
            return
        raise StoreError(f"store {store.root} is not a directory" if path == store.root
                         else f"store {store.root} cannot exist: {path} is not a directory")


def manifest_rows(m: Manifest) -> Iterable[FileEntry]:
    yield from m.files
    for rows in m.data.values():
        yield from rows


# -- verify ----------------------------------------------------------------------------------


@dataclass
class Problem:
    digest: str
    kind: str  # corrupt, missing, size, writable
    detail: str = ""
    dists: list[str] = field(default_factory=list)  # manifest ids that reference it
    venvs: list[str] = field(default_factory=list)
    repaired: bool = False
    repair_note: str = ""


@dataclass
class VerifyReport:
    objects: int = 0
    manifests: int = 0
    problems: dict[str, Problem] = field(default_factory=dict)
    bad_manifests: dict[str, str] = field(default_factory=dict)
    roots: list[gc_roots.Root] = field(default_factory=list)
    on_remote: int = 0  # rows whose object a lazy install left on its remote

    @property
    def ok(self) -> bool:
        return not self.bad_manifests and all(p.repaired for p in self.problems.values())

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "objects": self.objects, "manifests": self.manifests,
                "on_remote": self.on_remote,
                "bad_manifests": self.bad_manifests,
                "problems": [vars(p) for p in sorted(self.problems.values(),
                                                     key=lambda p: p.digest)]}


def _check_object(path: Path, digest: str) -> tuple[str, str] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return "corrupt", f"unreadable: {exc.strerror}"
    try:
        actual, _ = digest_fd(fd)
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    if actual != digest:
        return "corrupt", f"content hashes to {actual}"
    if mode & 0o222:
        return "writable", f"mode {mode:o}: objects must be read-only"
    return None


def verify(store: Store) -> VerifyReport:
    """Rehash every object, check every manifest row, and name who is affected."""
    rep = VerifyReport(roots=gc_roots.scan(store))
    sizes: dict[str, int] = {}
    objects = list(store.iter_objects())
    rep.objects = len(objects)
    # Reads release the GIL; hashing many small objects in parallel keeps the disk busy.
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        results = pool.map(lambda o: (o, _check_object(o[1], o[0])), objects)
        for (digest, path), bad in results:
            with contextlib.suppress(OSError):
                sizes[digest] = path.stat().st_size
            if bad is not None:
                rep.problems[digest] = Problem(digest, *bad)
    users: dict[str, list[str]] = {}  # digest -> manifest ids
    for ident in iter_manifests(store):
        rep.manifests += 1
        try:
            m = read_manifest(store, ident)
        except StoreError as exc:
            rep.bad_manifests[ident] = str(exc)
            continue
        lazy = origin_path(store, ident).exists()  # installed from a remote (cowfs.store.remote)
        for fe in manifest_rows(m):
            users.setdefault(fe.digest, []).append(ident)
            if lazy and fe.digest not in sizes and not store.has(fe.digest):
                rep.on_remote += 1  # fetched on its first read: not a problem
                continue
            _check_row(rep, fe, sizes, ident, store)
    venv_dists = {str(r.venv): set(r.dist_ids) for r in rep.roots if r.status == "live"}
    for r in rep.roots:
        for fe in r.state.extra if r.state and r.status == "live" else ():
            _check_row(rep, fe, sizes, f"venv-local file {fe.path} of {r.venv}", store)
            if fe.digest in rep.problems:
                rep.problems[fe.digest].venvs.append(str(r.venv))
    for digest, p in rep.problems.items():
        p.dists = sorted(set(users.get(digest, [])))
        p.venvs = sorted(set(p.venvs) | {v for v, ids in venv_dists.items()
                                          if ids & set(p.dists)})
    return rep


def _check_row(rep: VerifyReport, fe: FileEntry, sizes: dict[str, int], who: str,
               store: Store) -> None:
    if fe.digest not in sizes:
        # Written after the listing (an install, or shared bytecode being published, while
        # verify runs: it takes no lock): checked now, else it is missing indeed.
        path = store.object_path(fe.digest)
        try:
            sizes[fe.digest] = path.stat().st_size
        except OSError:
            rep.problems.setdefault(fe.digest, Problem(fe.digest, "missing", f"needed by {who}"))
            return
        rep.objects += 1
        if (bad := _check_object(path, fe.digest)) is not None:
            rep.problems[fe.digest] = Problem(fe.digest, *bad)
    elif sizes[fe.digest] != fe.size and fe.digest not in rep.problems:
        rep.problems[fe.digest] = Problem(
            fe.digest, "size", f"{who} says {fe.size} bytes, the object has {sizes[fe.digest]}")


class _NotApplicable(Exception):
    """The repair path does not apply to this manifest: leave the problem as it was."""


def repair(store: Store, rep: VerifyReport, reingest: Callable[[Path], object],
           rebuild: Callable[[str], bool | None] | None = None) -> None:
    """Fix what can be fixed; the caller holds the store lock exclusively.

    Writable objects with the right content are made read-only. Corrupt and missing objects
    come back by re-ingesting (force) a wheel kept in store.wheels whose sha256 matches a
    manifest that references them, else through `rebuild(manifest id)` (the installer
    recompiles bytecode manifests; None means it does not apply). A corrupt object is
    moved aside first (ingest refuses to trust an existing object that differs) and put
    back if the repair fails, so a failed repair never turns a corrupt object into a
    missing one.
    """
    for p in rep.problems.values():
        if p.kind == "writable":
            os.chmod(store.object_path(p.digest), OBJECT_MODE)
            p.repaired, p.repair_note = True, "made read-only"
        elif not p.dists and not p.venvs and p.kind == "corrupt":
            store.object_path(p.digest).unlink(missing_ok=True)  # garbage nobody uses
            p.repaired, p.repair_note = True, "unreferenced: removed"
        elif not p.dists and p.digest == digest_bytes(b""):
            _attempt(store, rep, [p.digest], lambda: store.put_bytes(b""), "rewritten (empty)")
    for wheel, digests in _wheels_for(store, rep).items():
        _attempt(store, rep, digests, functools.partial(reingest, wheel),
                 f"re-ingested {wheel.name}")
    for ident, digests in _unrepaired_by_manifest(rep).items() if rebuild else ():
        def act(ident: str = ident) -> None:
            done = rebuild(ident)  # type: ignore[misc]
            if done is None:
                raise _NotApplicable
            if not done:
                raise StoreError(f"{ident} could not be rebuilt")
        _attempt(store, rep, digests, act, f"rebuilt {ident}")
    for p in rep.problems.values():
        if not p.repaired and not p.repair_note:
            p.repair_note = (f"no wheel in {store.wheels} for {', '.join(p.dists)}: reinstall"
                             if p.dists else "a venv-local file: reinstall the distribution")


def _attempt(store: Store, rep: VerifyReport, digests: list[str], action: Callable[[], object],
             note: str) -> None:
    aside = {d: _move_aside(store, d) for d in digests
             if rep.problems[d].kind in ("corrupt", "size")}
    skip = False
    try:
        action()
        store.sync_objects()  # durable before the copies set aside are deleted
        failure = ""
    except _NotApplicable:
        skip, failure = True, "not applicable"
    except Exception as exc:  # any failure: restore what was there, report, go on
        failure = str(exc) or type(exc).__name__
    for d in digests:
        p = rep.problems[d]
        # A rebuilt manifest may no longer name the digest at all (a fresh compile).
        needed = any(d in {fe.digest for fe in _rows_of(store, i)} for i in p.dists) \
            or not p.dists
        p.repaired = not failure and (not needed or _check_object(store.object_path(d), d)
                                      is None)
        if not skip:
            p.repair_note = note if p.repaired else f"{note} failed: {failure or 'still wrong'}"
        moved = aside.get(d)
        if moved is not None:
            if needed and not store.object_path(d).exists():
                os.rename(moved, store.object_path(d))
            else:
                moved.unlink(missing_ok=True)


def _rows_of(store: Store, ident: str) -> list[FileEntry]:
    try:
        return list(manifest_rows(read_manifest(store, ident)))
    except StoreError:
        return []


def _unrepaired_by_manifest(rep: VerifyReport) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in rep.problems.values():
        if not p.repaired and not p.repair_note and p.dists:
            out.setdefault(p.dists[0], []).append(p.digest)
    return out


def _wheels_for(store: Store, rep: VerifyReport) -> dict[Path, list[str]]:
    """wheel file -> broken digests it can restore (the wheel must match the manifest)."""
    out: dict[Path, list[str]] = {}
    checked: dict[str, Path | None] = {}
    for p in rep.problems.values():
        if p.repaired or p.repair_note or p.kind == "writable":
            continue
        for ident in p.dists:
            if ident not in checked:
                checked[ident] = _wheel_of(store, ident)
            if (wheel := checked[ident]) is not None:
                out.setdefault(wheel, []).append(p.digest)
                break
    return out


def _wheel_of(store: Store, ident: str) -> Path | None:
    import hashlib

    try:
        m = read_manifest(store, ident)
    except StoreError:
        return None
    if not m.wheel or not m.wheel_sha256 or "/" in m.wheel:
        return None
    path = store.wheels / m.wheel
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return None
    return path if h.hexdigest() == m.wheel_sha256 else None


def _move_aside(store: Store, digest: str) -> Path | None:
    src = store.object_path(digest)
    dst = store.tmp / f"corrupt-{digest}-{os.getpid()}"
    try:
        os.rename(src, dst)
    except FileNotFoundError:
        return None
    return dst


# -- gc --------------------------------------------------------------------------------------


@dataclass
class GcReport:
    dry_run: bool
    live_roots: int = 0
    dead_roots: list[str] = field(default_factory=list)
    # One per dead root, in the same order: containers' roots often name the same path.
    dead_reasons: list[str] = field(default_factory=list)
    unseen_roots: list[dict[str, Any]] = field(default_factory=list)  # kept: not visible here
    manifests_kept: int = 0
    manifests_deleted: list[str] = field(default_factory=list)
    manifests_in_use: list[str] = field(default_factory=list)  # leased by a live mount
    objects_kept: int = 0
    objects_in_use: int = 0
    objects_deleted: int = 0
    bytes_freed: int = 0
    tmp_deleted: int = 0
    missing_manifests: list[str] = field(default_factory=list)
    retention_s: float = gc_roots.DEFAULT_RETENTION_S

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


def collect(store: Store, dry_run: bool = False, now: float | None = None, *,
            retention: float = gc_roots.DEFAULT_RETENTION_S,
            drop_unseen: bool = False) -> GcReport:
    check_root(store)
    rep = GcReport(dry_run, retention_s=retention)
    if not store.exists():
        return rep
    if not dry_run and not store.writable():
        raise StoreError(f"store {store.root} is read-only here: run gc where it is writable "
                         "(e.g. on the host that owns the volume)")
    now = time.time() if now is None else now
    with store.lock(exclusive=True):
        roots = gc_roots.scan(store, now=now, retention=retention, drop_unseen=drop_unseen)
        broken = [r for r in roots if r.status == "broken"]
        if broken:
            r = broken[0]
            raise StoreError(f"gc root {r.file} ({r.venv or '?'}): {r.reason}; fix or remove "
                             "it first (its venv's contents cannot be known): nothing collected")
        keep_dists: set[str] = set()
        keep_objects: set[str] = set()
        for r in roots:
            if r.status in ("live", "unseen"):
                keep_dists.update(r.dist_ids)
                keep_objects.update(r.object_ids)
            if r.status == "live":
                rep.live_roots += 1
            elif r.status == "unseen":
                rep.unseen_roots.append({"venv": str(r.venv), "reason": r.reason,
                                         "last_used": r.last_used,
                                         "kept_until": r.last_used + retention})
            else:
                rep.dead_roots.append(str(r.venv))
                rep.dead_reasons.append(r.reason)
        for ident in iter_manifests(store):
            if ident not in keep_dists and in_use(manifest_path(store, ident)):
                rep.manifests_in_use.append(ident)
                keep_dists.add(ident)
        for ident in sorted(keep_dists):
            if not manifest_path(store, ident).exists():
                rep.missing_manifests.append(ident)
                continue
            try:
                m = read_manifest(store, ident)
            except StoreError as exc:
                raise StoreError(f"{exc}: its objects cannot be known, nothing collected "
                                 "(`cowfs store verify`)") from None
            keep_objects.update(fe.digest for fe in manifest_rows(m))
        for ident in iter_manifests(store):
            if ident in keep_dists:
                rep.manifests_kept += 1
                continue
            rep.manifests_deleted.append(ident)
            if not dry_run:
                manifest_path(store, ident).unlink(missing_ok=True)
        if not dry_run:
            _clean_caches(store, keep_dists)
        for digest, path in store.iter_objects():
            if digest in keep_objects:
                rep.objects_kept += 1
                continue
            if in_use(path):  # a venv-local object of a live mount that recorded no root
                rep.objects_in_use += 1
                continue
            rep.objects_deleted += 1
            with contextlib.suppress(OSError):
                rep.bytes_freed += path.lstat().st_size
                if not dry_run:
                    path.unlink()
        rep.tmp_deleted = _clean_tmp(store, now, dry_run)
        if not dry_run:
            for r in roots:
                if r.status == "dead":
                    r.file.unlink(missing_ok=True)
    return rep


def _clean_caches(store: Store, keep_dists: set[str]) -> None:
    """Derived files go with what they derive from: compiled sidecars of deleted manifests,
    and every planning cache entry (one per request ever made; rebuilt on the next install)."""
    for pattern in ("*.layer", "*.remote"):  # sidecars, remote origins (cowfs.store.remote)
        for path in store.dists.glob(pattern) if store.dists.is_dir() else ():
            if path.stem not in keep_dists:
                path.unlink(missing_ok=True)
    plans = store.root / "plans"
    for path in plans.glob("*.json") if plans.is_dir() else ():
        path.unlink(missing_ok=True)


def _clean_tmp(store: Store, now: float, dry_run: bool) -> int:
    """Leftovers of writers that died: tmp/, downloads an interrupted install left in
    wheels/ (`.<wheel>.*.part`) and its speculative ones in wheels/.prefetch/."""
    spool = store.wheels / ".prefetch"
    n = _clean_old(store.tmp, now, dry_run)
    n += _clean_old(spool, now, dry_run)
    n += _clean_old(store.wheels, now, dry_run,
                    lambda name: name.startswith(".") and name.endswith(".part"))
    if not dry_run:
        with contextlib.suppress(OSError):  # (unless something younger is still in it)
            spool.rmdir()
    return n


def _clean_old(directory: Path, now: float, dry_run: bool,
               wanted: Callable[[str], bool] = lambda name: True) -> int:
    n = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as it:
        for de in list(it):
            if not wanted(de.name):
                continue
            try:
                if now - de.stat(follow_symlinks=False).st_mtime < TMP_GRACE_S:
                    continue
            except FileNotFoundError:
                continue
            n += 1
            if dry_run:
                continue
            if de.is_dir(follow_symlinks=False):
                shutil.rmtree(de.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(de.path)
    return n


# -- usage -----------------------------------------------------------------------------------


def _tree_size(path: Path) -> tuple[int, int]:
    """(files, bytes) under path."""
    files = size = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(dirpath, n)).st_size
                files += 1
    return files, size


def usage(store: Store) -> dict[str, Any]:
    """Store size by part, roots, and logical (per-venv) vs physical size of what is live."""
    check_root(store)
    objects = objects_bytes = objects_disk = 0
    obj_size: dict[str, int] = {}
    for digest, path in store.iter_objects():
        with contextlib.suppress(OSError):
            st = path.lstat()
            objects += 1
            objects_bytes += st.st_size
            objects_disk += st.st_blocks * 512
            obj_size[digest] = st.st_size
    roots = gc_roots.scan(store)
    logical = 0
    referenced: set[str] = set()
    venvs = []
    cache: dict[str, Manifest | None] = {}
    for r in roots:
        if r.status != "live" or r.state is None:
            continue
        view: dict[str, FileEntry] = {}
        for ident in [*r.bytecode, *r.state.dists]:  # in the lower's order: later wins
            if ident not in cache:
                try:
                    cache[ident] = read_manifest(store, ident)
                except StoreError:
                    cache[ident] = None
            for fe in cache[ident].files if cache[ident] else ():
                view[fe.path] = fe
        for fe in r.state.extra:
            view[fe.path] = fe
        size = sum(fe.size for fe in view.values())
        logical += size
        referenced.update(fe.digest for fe in view.values())
        venvs.append({"venv": str(r.venv), "files": len(view), "bytes": size})
    physical = sum(obj_size.get(d, 0) for d in referenced)
    parts = {name: _tree_size(getattr(store, name))
             for name in ("dists", "wheels", "interpreters", "tmp")}
    return {
        "store": str(store.root),
        "objects": {"count": objects, "bytes": objects_bytes, "disk_bytes": objects_disk},
        "manifests": len(iter_manifests(store)),
        **{name: {"files": f, "bytes": b} for name, (f, b) in parts.items()},
        "roots": {s: [str(r.venv or r.file) for r in roots if r.status == s]
                  for s in ("live", "unseen", "dead", "broken")},
        "venvs": venvs,
        "logical_bytes": logical,
        "physical_bytes": physical,
        "dedup_ratio": round(logical / physical, 2) if physical else None,
    }
