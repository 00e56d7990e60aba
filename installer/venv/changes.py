"""What a venv changed: its upper layer compared with the pristine lower layer.

The upper layer of a cowfs venv *is* its private diff, so status costs O(changes): only the
upper directory is walked (never the mount), and each upper file is compared with the
pristine file the manifests place at the same path (size, then xxh3 digest, then mode).
Deleted entries are whiteouts, or lower content hidden by an opaque directory.

Every change records the upper entry whose removal undoes it (`reset_path`): the path itself,
or for anything hidden by an opaque directory or a whiteout, the topmost such entry.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import errno
import io
import os
import posixpath
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

from cowfs.dirfd import short
from cowfs.errors import CowfsError
from cowfs.mount import control, mount as mounting
from cowfs.mount.spec import VenvState
from cowfs.overlay.upper import OPAQUE_XATTR, WH_OPAQUE, WH_PREFIX, is_opaque_dir, is_whiteout_stat
from cowfs.store.manifest import FileEntry, read_manifest
from cowfs.store.store import Store, digest_fd

# Kinds, in display order, with the one-letter code shown by `cowfs status`.
KINDS = {
    "modified": "M",  # content differs from the pristine file
    "unknown-pristine": "?",  # adopted with local edits; no verified pristine copy known
    "mode": "P",  # same content, other permission bits
    "metadata": "t",  # same content and mode (touched, xattrs): copied up, nothing else
    "type": "T",  # file <-> directory <-> symlink
    "added": "A",
    "deleted": "D",
}


@dataclass(frozen=True, slots=True)
class Dist:
    key: str  # canonical name
    name: str
    version: str
    dist_id: str = ""  # manifest id; "" for a distribution that exists only in the upper layer
    installer: str = "cowfs"  # cowfs, adopted, or the INSTALLER of an upper-only distribution

    @property
    def label(self) -> str:
        how = "" if self.installer == "cowfs" else f" ({self.installer})"
        return f"{self.name} {self.version}{how}"


@dataclass(slots=True)
class Change:
    path: str
    kind: str
    owner: str  # Dist.key, "" for no distribution
    reset_path: str
    pristine: FileEntry | None = None
    is_dir: bool = False
    mode_change: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"path": self.path, "kind": self.kind,
                               "owner": self.owner or None, "reset_path": self.reset_path}
        if self.is_dir:
            doc["dir"] = True
        if self.mode_change:
            doc["mode"] = [f"{m:o}" for m in self.mode_change]
        return doc


@dataclass
class Pristine:
    """The lower layer as the manifests describe it: path -> (entry, owner key)."""

    files: dict[str, tuple[FileEntry, str]] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=lambda: {""})
    dists: dict[str, Dist] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)  # adopted, pristine unknown
    _sorted: list[str] = field(default_factory=list)

    def kind(self, path: str) -> str | None:
        if path in self.files:
            return "file"
        return "dir" if path in self.dirs else None

    def files_at_or_under(self, path: str) -> list[str]:
        if path in self.files:
            return [path]
        if not self._sorted:
            self._sorted = sorted(self.files)
        prefix = f"{path}/" if path else ""
        i = bisect.bisect_left(self._sorted, prefix)
        out = []
        while i < len(self._sorted) and self._sorted[i].startswith(prefix):
            out.append(self._sorted[i])
            i += 1
        return out


def load_pristine(state: VenvState, store: Store) -> Pristine:
    """Mirror cowfs.overlay.super.build_lower: bytecode first, then dists (later wins), then
    extra."""
    p = Pristine()
    dists = [read_manifest(store, d) for d in state.dists]
    key_of: dict[str, str] = {}
    for m in dists:
        key = str(canonicalize_name(m.name))
        key_of[m.id] = key
        adopted = bool(m.extra.get("adopted"))
        p.dists[key] = Dist(key, m.name, m.version, m.id, "adopted" if adopted else "cowfs")
        for path in m.extra.get("unknown_pristine", ()) if adopted else ():
            p.unknown[str(path)] = key
    for bid in state.bytecode:
        bm = read_manifest(store, bid)
        owner = key_of.get(str(bm.extra.get("bytecode_for", "")), "")
        for fe in bm.files:
            p.files[fe.path] = (fe, owner)
    for m in dists:
        for fe in m.files:
            p.files[fe.path] = (fe, key_of[m.id])
    by_info = {f"{m.dist_info}/": key_of[m.id] for m in dists if m.dist_info}
    for fe in state.extra:
        owner = next((k for pre, k in by_info.items() if fe.path.startswith(pre)), "")
        p.files[fe.path] = (fe, owner)
    for path in p.files:
        parent = path.rpartition("/")[0]
        while parent not in p.dirs:
            p.dirs.add(parent)
            parent = parent.rpartition("/")[0]
    return p


def parse_installed_record(data: bytes, site: str = "") -> list[tuple[str, str, str]]:
    """(path relative to site-packages, hash, size) rows of an installed RECORD.

    Lenient where wheel.parse_record is strict: an installed RECORD may name any hash and
    paths outside site-packages (`../../../bin/x`), which are returned as normalised.
    """
    rows = []
    try:
        for row in csv.reader(io.StringIO(data.decode("utf-8"), newline="")):
            if not row or not row[0]:
                continue
            path = row[0]
            if os.path.isabs(path) and site:
                path = os.path.relpath(path, site)
            path = posixpath.normpath(path)
            rows.append((path, row[1] if len(row) > 1 else "", row[2] if len(row) > 2 else ""))
    except (UnicodeDecodeError, csv.Error):
        return []
    return rows


def dist_identity(info_dir: Path) -> tuple[str, str]:
    """(name, version) of a dist-info directory: METADATA, else its directory name."""
    stem = info_dir.name.removesuffix(".dist-info")
    name, _, version = stem.partition("-")
    with contextlib.suppress(OSError):
        headers = BytesHeaderParser().parsebytes((info_dir / "METADATA").read_bytes())
        name, version = headers.get("Name") or name, headers.get("Version") or version
    return str(name), str(version)


def supports_user_xattrs(path: str) -> bool:
    """Read-only probe (the daemon's write probe would show up in a live view)."""
    try:
        os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False)
    except OSError as exc:
        return exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP)
    return True


def digest_path(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return digest_fd(fd)[0]
    finally:
        os.close(fd)


@dataclass
class Report:
    state: VenvState
    pristine: Pristine
    changes: list[Change] = field(default_factory=list)
    dists: dict[str, Dist] = field(default_factory=dict)  # pristine + upper-only

    def groups(self) -> list[tuple[Dist | None, list[Change]]]:
        by: dict[str, list[Change]] = {}
        for c in self.changes:
            by.setdefault(c.owner, []).append(c)
        keys = sorted(k for k in by if k) + ([""] if "" in by else [])
        return [(self.dists.get(k), by[k]) for k in keys]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for c in self.changes:
            out[c.kind] += 1
        return {k: v for k, v in out.items() if v}

    def to_json(self) -> dict[str, Any]:
        return {
            "venv": str(self.state.venv), "site_packages": str(self.state.site_packages),
            "upper": str(self.state.upper), "counts": self.counts(),
            "groups": [{"distribution": d.name if d else None,
                        "version": d.version if d else None,
                        "installer": d.installer if d else None,
                        "changes": [c.to_json() for c in cs]} for d, cs in self.groups()],
        }


class _Scanner:
    def __init__(self, state: VenvState, pristine: Pristine) -> None:
        self.state = state
        self.root = str(state.upper)
        self.p = pristine
        self.xattrs = supports_user_xattrs(self.root)
        self.changes: list[Change] = []
        self.seen: set[str] = set()  # upper files and symlinks (they can hide a deletion)
        self.hide_roots: list[str] = []  # upper entries that hide lower content below them
        self.record_owner: dict[str, str] = {}
        self.dists = dict(pristine.dists)

    def run(self) -> Report:
        self._upper_dists()
        self._walk("", None)
        for h in self.hide_roots:
            for path in self.p.files_at_or_under(h):
                if path not in self.seen:
                    fe, owner = self.p.files[path]
                    self.changes.append(Change(path, "deleted", owner, h, fe))
        order = list(KINDS)
        self.changes.sort(key=lambda c: (c.path, order.index(c.kind)))
        return Report(self.state, self.p, self.changes, self.dists)

    def _upper_dists(self) -> None:
        """dist-info directories with a RECORD in the upper layer: things pip/uv wrote."""
        infos: list[Path] = []
        with contextlib.suppress(OSError), os.scandir(self.root) as it:
            infos = [Path(de.path) for de in it
                     if de.name.endswith(".dist-info") and de.is_dir(follow_symlinks=False)]
        for info in sorted(infos):
            try:
                record = (info / "RECORD").read_bytes()
            except OSError:
                continue
            name, version = dist_identity(info)
            key = str(canonicalize_name(name))
            if key not in self.dists or _replaces(self.dists[key], info.name):
                installer = ""
                with contextlib.suppress(OSError):
                    installer = (info / "INSTALLER").read_text().strip()
                self.dists[key] = Dist(key, name, version, "",
                                       f"installed by {installer or 'another tool'}")
            for path, _, _ in parse_installed_record(record):
                if not path.startswith("../"):
                    self.record_owner.setdefault(path, key)

    def _owner_new(self, path: str) -> str:
        """Owner of an upper-only path: an installed RECORD, or the source of a pyc."""
        if owner := self.record_owner.get(path):
            return owner
        parent, _, name = path.rpartition("/")
        if parent.endswith("__pycache__") and name.endswith(".pyc"):
            pkg = parent.rpartition("/")[0]
            src = posixpath.join(pkg, name.split(".")[0] + ".py")
            if src in self.p.files:
                return self.p.files[src][1]
            return self.p.unknown.get(src) or self.record_owner.get(src, "")
        return ""

    def _owner_any(self, path: str) -> str:
        under = self.p.files_at_or_under(path)
        return self.p.files[under[0]][1] if under else self._owner_new(path)

    def _walk(self, rel: str, hidden: str | None) -> int:
        """Classify the upper directory rel; returns how many visible entries it holds."""
        path = short(f"{self.root}/{rel}") if rel else self.root  # (any depth: cowfs.dirfd)
        if rel and hidden is None and rel in self.p.dirs and is_opaque_dir(path):
            self.hide_roots.append(rel)
            hidden = rel
        visible = 0
        try:
            entries = sorted(os.scandir(path), key=lambda de: de.name)
        except (FileNotFoundError, NotADirectoryError):
            return 0
        for de in entries:
            child = posixpath.join(rel, de.name) if rel else de.name
            if not self.xattrs and de.name.startswith(WH_PREFIX):
                if de.name != WH_OPAQUE:
                    self._whiteout(posixpath.join(rel, de.name[len(WH_PREFIX):]), hidden)
                continue
            try:
                st = de.stat(follow_symlinks=False)
                if is_whiteout_stat(de.path, st):
                    self._whiteout(child, hidden)
                    continue
                if stat.S_ISDIR(st.st_mode):
                    self._dir(child, hidden)
                else:
                    self._file(child, de.path, st, hidden)
            except FileNotFoundError:
                continue  # a live daemon removed it meanwhile (rename, reset): not a change
            visible += 1
        return visible

    def _whiteout(self, rel: str, hidden: str | None) -> None:
        # Inside a hidden area the lower is invisible anyway: the hide root reports it.
        if hidden is None and self.p.kind(rel) is not None:
            self.hide_roots.append(rel)

    def _dir(self, rel: str, hidden: str | None) -> None:
        kind = self.p.kind(rel)
        if kind == "file":
            # The "type" change covers the lower file; nothing lies below a file.
            self.changes.append(Change(rel, "type", self._owner_any(rel), hidden or rel,
                                       self.p.files[rel][0], is_dir=True))
            self._walk(rel, hidden or rel)
            return
        if self._walk(rel, hidden) == 0 and kind is None:
            self.changes.append(Change(rel, "added", self._owner_new(rel), rel, is_dir=True))

    def _file(self, rel: str, real: str, st: os.stat_result, hidden: str | None) -> None:
        self.seen.add(rel)
        reset = hidden or rel
        row = self.p.files.get(rel)
        if row is None:
            if self.p.kind(rel) == "dir":
                self.changes.append(Change(rel, "type", self._owner_any(rel), reset))
                if hidden is None:
                    self.hide_roots.append(rel)
            elif rel in self.p.unknown:
                self.changes.append(Change(rel, "unknown-pristine", self.p.unknown[rel], rel))
            else:
                self.changes.append(Change(rel, "added", self._owner_new(rel), rel))
            return
        fe, owner = row
        mode = stat.S_IMODE(st.st_mode)
        mode_change = (fe.mode, mode) if mode != fe.mode else None
        if not stat.S_ISREG(st.st_mode):
            kind = "type"
        elif st.st_size != fe.size or digest_path(real) != fe.digest:
            kind = "modified"
        else:
            kind = "mode" if mode_change else "metadata"
        self.changes.append(Change(rel, kind, owner, reset, fe, mode_change=mode_change))


def _replaces(dist: Dist, info_name: str) -> bool:
    """Does an upper dist-info of another version replace the lower one (pip -U inside)?"""
    stem = info_name.removesuffix(".dist-info")
    return dist.dist_id != "" and stem.partition("-")[2] != dist.version


def scan(state: VenvState, store: Store | None = None) -> Report:
    return _Scanner(state, load_pristine(state, store or Store(state.store))).run()


# -- selecting changes: PKG or PATH ----------------------------------------------------------


def site_relative(state: VenvState, arg: str) -> str:
    """A site-packages-relative path from a PATH argument: absolute, relative to the working
    directory when that lands inside site-packages (`cowfs diff main.py` from within the
    package, `cowfs reset .venv/lib/.../x.py` from the project), else site-packages-relative."""
    site = str(state.site_packages)
    if not os.path.isabs(arg):
        here = _below(os.path.normpath(os.path.join(os.getcwd(), arg)), site)
        if here is not None:
            return here
        rel = posixpath.normpath(arg)
        if rel.startswith("../") or rel == "..":
            raise CowfsError(f"{arg} is not inside {site}")
        return "" if rel == "." else rel
    rel = _below(os.path.normpath(arg), site)
    if rel is None:
        raise CowfsError(f"{arg} is not inside {site}")
    return rel


def _below(path: str, site: str) -> str | None:
    """path relative to site (either spelling of it), or None when it is not inside."""
    for base in (site, os.path.realpath(site)):
        if path == base or path.startswith(base + "/"):
            return os.path.relpath(path, base) if path != base else ""
    return None


def select(report: Report, args: Sequence[str]) -> list[Change]:
    """Changes named by PKG (a distribution name) or PATH (site-packages relative/absolute).

    A name wins over a top-level path of the same spelling (`pycowsay` is the distribution;
    `pycowsay/` is the directory).
    """
    chosen: dict[tuple[str, str], Change] = {}
    for arg in args:
        key = str(canonicalize_name(arg)) if "/" not in arg else ""
        if key and key in report.dists:
            hits = [c for c in report.changes if c.owner == key]
        else:
            rel = site_relative(report.state, arg.rstrip("/") or arg)
            hits = [c for c in report.changes
                    if not rel or c.path == rel or c.path.startswith(f"{rel}/")
                    or c.reset_path == rel]
            if not hits and not _exists(report, rel):
                raise CowfsError(f"unknown package or path: {arg} (not installed in "
                                 f"{report.state.venv} and not in its site-packages)")
        for c in hits:
            chosen[c.path, c.kind] = c
    return sorted(chosen.values(), key=lambda c: c.path)


def _exists(report: Report, rel: str) -> bool:
    if report.pristine.kind(rel) is not None:
        return True
    return any(os.path.lexists(base / rel) for base in (report.state.upper,
                                                         report.state.site_packages))


# -- undoing changes -------------------------------------------------------------------------


def minimal_paths(paths: Sequence[str]) -> list[str]:
    """Drop paths below another one: removing the ancestor undoes them too."""
    out: list[str] = []
    for p in sorted(set(paths)):
        if not any(p == q or p.startswith(f"{q}/") for q in out):
            out.append(p)
    return out


@dataclass
class ResetResult:
    removed: list[str] = field(default_factory=list)
    kept: list[Change] = field(default_factory=list)  # no pristine copy to go back to
    live: bool = False


def reset(report: Report, changes: Sequence[Change]) -> ResetResult:
    """Remove the upper entries behind changes: through the daemon on a live mount (it also
    drops kernel caches), directly in the upper dir when nothing serves the venv."""
    state = report.state
    result = ResetResult(kept=[c for c in changes if c.kind == "unknown-pristine"])
    paths = minimal_paths([c.reset_path for c in changes if c.kind != "unknown-pristine"])
    if not paths:
        return result
    spec = state.mount_spec()
    where = mounting.mount_state(spec.mountpoint)
    if where == "foreign":
        raise CowfsError(f"{spec.mountpoint} is mounted, but not by cowfs")
    result.live = where == "live"
    if not result.live and control.try_request(spec.socket, "status", timeout=2) is not None:
        raise CowfsError(f"a cowfs daemon still serves {state.venv}; unmount it first")
    result.removed = _apply(state, spec.socket, paths, result.live)
    # Added directories left empty would still be importable (as namespace packages).
    empty = _empty_added_dirs(state, report.pristine, paths)
    if empty:
        result.removed += _apply(state, spec.socket, empty, result.live)
    return result


def _apply(state: VenvState, socket: Path, paths: list[str], live: bool) -> list[str]:
    if live:
        return list(control.request(socket, "reset", paths=paths).get("removed", []))
    from installer.venv.sync import venv_lock  # only the offline path needs it

    removed = []
    with venv_lock(state.venv):
        for rel in paths:
            if _remove_upper(str(state.upper), rel):
                removed.append(rel)
    return removed


def _remove_upper(root: str, rel: str) -> bool:
    """Offline twin of cowfs.overlay.reset: the entry itself, or its `.wh.` fallback marker."""
    import shutil

    path = short(f"{root}/{rel}")
    parent, _, name = rel.rpartition("/")
    marker = short(f"{root}/{parent}/{WH_PREFIX}{name}" if parent else f"{root}/{WH_PREFIX}{name}")
    done = False
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        done = True
    with contextlib.suppress(FileNotFoundError):
        os.unlink(marker)
        done = True
    return done


def _empty_added_dirs(state: VenvState, pristine: Pristine, paths: list[str]) -> list[str]:
    """Upper-only ancestors of reset paths that hold nothing any more (topmost first)."""
    root = str(state.upper)
    candidates: set[str] = set()
    for p in paths:
        parent = p.rpartition("/")[0]
        while parent and pristine.kind(parent) is None:
            candidates.add(parent)
            parent = parent.rpartition("/")[0]

    def empty(rel: str) -> bool:
        try:
            names = os.listdir(short(f"{root}/{rel}"))
        except OSError:
            return False
        return all(f"{rel}/{n}" in candidates and empty(f"{rel}/{n}") for n in names)

    return minimal_paths([d for d in candidates if empty(d)])
