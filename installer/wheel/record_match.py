"""Matching installed files against their RECORD: what another installer wrote becomes
store-backed manifests (`cowfs adopt` of a plain venv, absorbing into a live cowfs venv).

A file whose bytes match its RECORD hash goes into the store. One that does not was edited
(for instance through a hard link into a shared uv cache): it stays private, and its
manifest row holds the pristine content only when the store already has it from a verified
wheel, so that `cowfs reset` can bring it back. Files no RECORD names stay private too.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import stat
from pathlib import Path

import xxhash
from packaging.utils import canonicalize_name

from cowfs.dirfd import short
from cowfs.errors import StoreError
from cowfs.mount.spec import VenvState
from cowfs.store.manifest import (
    DEFAULT_MTIME_NS,
    FileEntry,
    Manifest,
    iter_manifests,
    read_manifest,
)
from cowfs.store.store import CHUNK, Store
from installer.interpreters import InterpreterInfo
from installer.venv.changes import dist_identity, parse_installed_record

# Never shared: they differ per venv, as they do for `cowfs install` (RECORD too: it hashes
# the console scripts, whose shebang names the venv, so a shared one made a manifest per venv).
PER_VENV = ("REQUESTED", "direct_url.json", "RECORD")


class Sorter:
    """Sorts the files of site (a directory, or a live mount's view) by their RECORDs."""

    def __init__(self, store: Store, site: Path, state: VenvState, info_dirs: list[str]) -> None:
        self.store, self.site, self.state = store, site, state
        self.private: set[str] = set()
        self.rows: dict[str, list[FileEntry]] = {d: [] for d in info_dirs}
        self.unknown: dict[str, list[str]] = {d: [] for d in info_dirs}
        self.edited: dict[str, list[str]] = {d: [] for d in info_dirs}
        self.pycs: list[str] = []  # decided once it is known which sources are shared
        self._index: dict[str, dict[str, FileEntry]] = {}

    def take(self, path: str, st: os.stat_result, owner: tuple[str, str] | None) -> None:
        """owner: (dist-info dir, RECORD hash) of the RECORD that names path, if any."""
        site, store, state = self.site, self.store, self.state
        if is_pyc(path):
            self.pycs.append(path)
            return
        if owner is None or not stat.S_ISREG(st.st_mode):
            self.private.add(path)
            return
        info_dir, hash_ = owner
        mode = stat.S_IMODE(st.st_mode) & 0o777
        if path.startswith(f"{info_dir}/") and path.rpartition("/")[2] in PER_VENV:
            digest, size = store.put_file(self._at(path))
            state.extra.append(FileEntry(path, digest, size, mode))
            if path.endswith("/REQUESTED"):
                state.requested.append(dist_identity(site / info_dir)[0])
            return
        algo = hash_.partition("=")[0]
        if hash_ and (algo not in hashlib.algorithms_available
                      or file_hash(self._at(path), algo) != hash_.rstrip("=")):
            self.private.add(path)
            key = str(canonicalize_name(dist_identity(site / info_dir)[0]))
            if key not in self._index:
                self._index[key] = pristine_index(store, key)
            fe = self._index[key].get(hash_.rstrip("="))
            if fe is not None and verified(store, fe, hash_.rstrip("=")):
                self.rows[info_dir].append(FileEntry(path, fe.digest, fe.size, mode))
                self.edited[info_dir].append(path)
            else:
                self.unknown[info_dir].append(path)
            return
        digest, size = store.put_file(self._at(path))
        self.rows[info_dir].append(FileEntry(path, digest, size, mode))

    def _at(self, path: str) -> str:
        """A name the kernel accepts for site/path at any depth (cowfs.dirfd)."""
        return short(f"{self.site}/{path}")

    def shared(self) -> set[str]:
        return {fe.path for entries in self.rows.values() for fe in entries} - self.private

    def stale_pycs(self) -> list[str]:
        """Compiled against the old mtime of a source that now carries the manifest's fixed
        mtime: stale; the shared bytecode manifest replaces them. The rest stay private."""
        shared = self.shared()
        stale = [p for p in self.pycs if pyc_source(p) in shared]
        self.private.update(p for p in self.pycs if p not in stale)
        return stale

    def manifests(self) -> list[Manifest]:
        return [adopted_manifest(self.site, d, self.rows[d], self.unknown[d], self.edited[d])
                for d in sorted(self.rows)]


def claims(site: Path, info_dirs: list[str], present: set[str] | None = None
           ) -> dict[str, tuple[str, str]]:
    """path -> (dist-info dir, RECORD hash), the first RECORD naming a path winning; paths
    outside site-packages (scripts) are left out, and with present only those in it."""
    claimed: dict[str, tuple[str, str]] = {}
    for info_dir in info_dirs:
        data = (site / info_dir / "RECORD").read_bytes()
        for path, hash_, _ in parse_installed_record(data, str(site)):
            if not path.startswith("../") and (present is None or path in present):
                claimed.setdefault(path, (info_dir, hash_))
    return claimed


def file_hash(path: Path | str, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return f"{algo}=" + base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()


def pristine_index(store: Store, key: str) -> dict[str, FileEntry]:
    """sha256 RECORD hash -> store entry, from manifests ingested from verified wheels.

    The installed RECORD the ingest wrote names the sha256 of every site-packages file, and
    ingest checked each member against the wheel's own RECORD before storing it.
    """
    index: dict[str, FileEntry] = {}
    for ident in iter_manifests(store):
        if not ident.startswith(f"{key}-") or "-adopted-" in ident:
            continue
        try:
            m = read_manifest(store, ident)
        except StoreError:
            continue
        if not m.wheel or str(canonicalize_name(m.name)) != key:
            continue
        by_path = {fe.path: fe for fe in m.files}
        rec = by_path.get(f"{m.dist_info}/RECORD")
        if rec is None:
            continue
        try:
            with store.open_object(rec.digest) as f:
                rows = parse_installed_record(f.read())
        except OSError:
            continue
        for path, hash_, _ in rows:
            if hash_.startswith("sha256=") and path in by_path:
                index.setdefault(hash_.rstrip("="), by_path[path])
    return index


def verified(store: Store, fe: FileEntry, want: str) -> bool:
    """The object really has the content the RECORD hash names (a store can rot)."""
    try:
        return file_hash(store.object_path(fe.digest), "sha256") == want
    except OSError:
        return False


def is_pyc(path: str) -> bool:
    parent, _, name = path.rpartition("/")
    return parent.rpartition("/")[2] == "__pycache__" and name.endswith(".pyc")


def pyc_source(path: str) -> str:
    """pkg/__pycache__/mod.cpython-311.pyc -> pkg/mod.py"""
    parent, _, name = path.rpartition("/")
    pkg = parent.rpartition("/")[0]
    src = name.split(".")[0] + ".py"
    return f"{pkg}/{src}" if pkg else src


def adopted_manifest(site: Path, info_dir: str, rows: list[FileEntry], unknown: list[str],
              edited: list[str]) -> Manifest:
    name, version = dist_identity(site / info_dir)
    key = str(canonicalize_name(name))
    rows = sorted(rows, key=lambda e: e.path)
    doc = json.dumps([[e.path, e.digest, e.size, e.mode] for e in rows] + [unknown])
    installer = ""
    with contextlib.suppress(OSError):
        installer = (site / info_dir / "INSTALLER").read_text().strip()
    return Manifest(
        id=f"{key}-{version}-adopted-{xxhash.xxh3_64_hexdigest(doc.encode())}",
        name=name, version=version, files=tuple(rows), mtime_ns=DEFAULT_MTIME_NS,
        dist_info=info_dir, entry_points=_entry_points(site / info_dir),
        extra={"adopted": True, "installer": installer, "unknown_pristine": sorted(unknown),
               "edited_at_adoption": sorted(edited)})


def _entry_points(info_dir: Path) -> dict[str, dict[str, str]]:
    """So that `cowfs uninstall` removes the launchers the other installer wrote."""
    from installer.wheel.wheel_archive import WheelError, parse_entry_points

    try:
        return parse_entry_points((info_dir / "entry_points.txt").read_bytes(), info_dir.name)
    except (OSError, WheelError):
        return {}


def shared_bytecode(store: Store, manifests: list[Manifest], info: InterpreterInfo,
                    python: Path) -> list[str]:
    """Shared pycs for the adopted dists, as `cowfs install` makes them (optional)."""
    from installer.wheel.bytecode import ensure_bytecode

    out = []
    for m in manifests:
        with contextlib.suppress(Exception):  # an optimisation: never fail adopt over it
            if (ident := ensure_bytecode(store, m, info, python)) is not None:
                out.append(ident)
    return out
