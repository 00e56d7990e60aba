"""Wheel -> store: validate a wheel, put its files in the object store, write one manifest.

Follows the binary distribution format and the recording-installed-packages specs. The
archive's names, WHEEL, METADATA, RECORD and entry points are all checked
(installer.wheel.wheel_archive) before any object is written; each member's hash is checked
against RECORD before its bytes are stored; the manifest is written last. So a rejected or
interrupted ingest leaves at most unreferenced objects (gc removes them), never a manifest.

Callers hold `store.lock()` (shared) from ingest until a gc root refers to the manifest:
taking it here would not be enough (gc could run between ingest and the root) and would
deadlock a caller that already holds it exclusively (`store verify --repair`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from zipfile import ZipFile, ZipInfo

from packaging.utils import NormalizedName
from packaging.version import Version

from cowfs.errors import StoreError
from cowfs.store.layer import read_head
from cowfs.store.manifest import (
    DATA_KEYS,
    Dist,
    FileEntry,
    Manifest,
    ManifestHead,
    read_manifest,
    write_manifest,
)
from cowfs.store.store import CHUNK, Store
from installer.wheel import wheel_index
from installer.wheel.wheel_archive import (
    RECORD_SIGNATURES,
    SCHEMES,
    SCRIPT_GROUPS,
    RecordRow,
    WheelError,
    b64,
    check_record_coverage,
    check_script_name,
    check_wheel_file,
    find_dist_info,
    iter_member,
    mtime_ns,
    open_zip,
    parse_entry_points,
    parse_filename,
    parse_metadata,
    parse_record,
    read_member,
    read_whole,
    scan,
    split_python_shebang,
)

__all__ = ["WheelError", "ingest_wheel", "ingested_manifest", "read_wheel_metadata",
           "venv_extra_files"]

# dist-info files never taken from the wheel: RECORD and its signatures are regenerated for
# the installed layout; INSTALLER is ours; REQUESTED and direct_url.json are per venv.
_NOT_SHARED = ("RECORD", *RECORD_SIGNATURES, "INSTALLER", "REQUESTED", "direct_url.json")
INSTALLER = b"cowfs\n"
# site-packages is lib/pythonX.Y/site-packages in a posix venv, so the venv root is 3 up.
VENV_ROOT_FROM_SITE = "../../../"
STREAM_THRESHOLD = 16 << 20  # members above this go through a temp file, not memory


@dataclass(frozen=True, slots=True)
class _Planned:
    info: ZipInfo
    scheme: str  # "" for site-packages, else scripts/headers/data
    path: str  # relative to that scheme's directory


def _plan(files: dict[str, ZipInfo], info_dir: str, wheel: str) -> list[_Planned]:
    """Where each member installs; purelib and platlib are both site-packages in a venv.

    Any top-level *.data directory is the data directory, as pip has it: one spelled unlike
    the dist-info directory must not end up as a stray directory in site-packages.
    """
    skip = {f"{info_dir}/{n}" for n in _NOT_SHARED}
    plan: list[_Planned] = []
    for name in sorted(files):
        if name in skip:
            continue
        top, _, inner = name.partition("/")
        if not (top.endswith(".data") and inner):
            plan.append(_Planned(files[name], "", name))
            continue
        key, _, rest = inner.partition("/")
        if key not in SCHEMES or not rest:
            raise WheelError(f"wheel {wheel}: unknown .data scheme {key!r} in {name!r}")
        if key == "scripts":
            try:
                check_script_name(rest)
            except WheelError as exc:
                raise WheelError(f"wheel {wheel}: {exc}") from None
        plan.append(_Planned(files[name], "" if key in ("purelib", "platlib") else key, rest))
    seen = {("", f"{info_dir}/RECORD"), ("", f"{info_dir}/INSTALLER")}
    for p in plan:
        if (p.scheme, p.path) in seen:
            where = p.scheme or "site-packages"
            raise WheelError(f"wheel {wheel}: two members install to {where}/{p.path}")
        seen.add((p.scheme, p.path))
    return plan


def _store_member(
    store: Store, zf: ZipFile, info: ZipInfo, row: RecordRow, wheel: str
) -> tuple[str, int, str]:
    """Check one member against RECORD, then store it: (digest, size, sha256 RECORD hash)."""
    sha = hashlib.sha256()
    other = hashlib.new(row.algo) if row.algo != "sha256" else None
    size = 0

    def update(chunk: bytes) -> None:
        nonlocal size
        sha.update(chunk)
        if other is not None:
            other.update(chunk)
        size += len(chunk)

    def verify() -> None:
        if b64((other or sha).digest()) != row.value or size != row.size:
            raise WheelError(f"wheel {wheel}: {info.filename!r} does not match its RECORD entry")

    if info.file_size <= STREAM_THRESHOLD:
        data = read_whole(zf, info, wheel)
        update(data)
        verify()
        digest = store.put_bytes(data)
    else:
        fd, tmp = store.temp_file()
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in iter_member(zf, info, wheel):
                    update(chunk)
                    out.write(chunk)
            verify()
            digest, _ = store.put_file(tmp)
        finally:
            tmp.unlink(missing_ok=True)
    return digest, size, "sha256=" + b64(sha.digest())


def _record_bytes(rows: list[tuple[str, str, int | None]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for path, hash_, size in rows:
        writer.writerow([path, hash_, "" if size is None else size])
    return buf.getvalue().encode("utf-8")


def _ingest(
    store: Store,
    zf: ZipFile,
    *,
    wheel: str,
    name: NormalizedName,
    version: Version,
    tags: list[str],
    wheel_sha256: str,
) -> Manifest:
    files = scan(zf, wheel)
    info_dir = find_dist_info(files, name, version, wheel)
    root_is_purelib = check_wheel_file(read_member(zf, files, f"{info_dir}/WHEEL", wheel), wheel)
    meta = parse_metadata(
        read_member(zf, files, f"{info_dir}/METADATA", wheel), name, version, wheel
    )
    record = parse_record(read_member(zf, files, f"{info_dir}/RECORD", wheel), wheel)
    check_record_coverage(files, record, info_dir, wheel)
    eps = f"{info_dir}/entry_points.txt"
    entry_points = (
        parse_entry_points(read_member(zf, files, eps, wheel), wheel) if eps in files else {}
    )
    plan = _plan(files, info_dir, wheel)
    data_scripts = {p.path for p in plan if p.scheme == "scripts"}
    script_names = [s for g in SCRIPT_GROUPS for s in entry_points.get(g, {})]
    for script in script_names:
        if script in data_scripts or script_names.count(script) > 1:
            raise WheelError(f"wheel {wheel} provides script {script!r} more than once")

    # All checks that need no contents passed: now store each member, hash-checked first.
    site: list[FileEntry] = []
    data: dict[str, list[FileEntry]] = {k: [] for k in DATA_KEYS}
    shas: dict[tuple[str, str], str] = {}
    for p in plan:
        digest, size, shas[p.scheme, p.path] = _store_member(
            store, zf, p.info, record[p.info.filename], wheel
        )
        executable = p.scheme == "scripts" or (p.info.external_attr >> 16) & 0o111
        entry = FileEntry(p.path, digest, size, 0o755 if executable else 0o644)
        (data[p.scheme] if p.scheme else site).append(entry)
    installer_path = f"{info_dir}/INSTALLER"
    site.append(FileEntry(installer_path, store.put_bytes(INSTALLER), len(INSTALLER), 0o644))
    shas["", installer_path] = "sha256=" + b64(hashlib.sha256(INSTALLER).digest())

    rows: list[tuple[str, str, int | None]] = sorted(
        (e.path, shas["", e.path], e.size) for e in site
    )
    # Files the venv gets outside site-packages, as seen from site-packages. Headers are
    # left out: their directory names the venv's Python version, unknown to a shared manifest.
    rows += [(f"{VENV_ROOT_FROM_SITE}bin/{s}", "", None) for s in sorted(script_names)]
    for e in data["scripts"]:
        with store.open_object(e.digest) as f:
            rewritten = split_python_shebang(f.read(4096)) is not None
        # a hash holds only for a script whose shebang install leaves alone
        kept: tuple[str, int | None] = (
            ("", None) if rewritten else (shas["scripts", e.path], e.size)
        )
        rows.append((f"{VENV_ROOT_FROM_SITE}bin/{e.path}", *kept))
    rows += [(f"{VENV_ROOT_FROM_SITE}{e.path}", shas["data", e.path], e.size) for e in data["data"]]
    record_path = f"{info_dir}/RECORD"
    installed_record = _record_bytes([*rows, (record_path, "", None)])
    site.append(
        FileEntry(record_path, store.put_bytes(installed_record), len(installed_record), 0o644)
    )
    site.sort(key=lambda e: e.path)
    return Manifest(
        id=f"{name}-{version}-{wheel_sha256[:16]}",
        name=meta.name,
        version=str(version),
        files=tuple(site),
        mtime_ns=mtime_ns(list(files.values())),
        wheel=wheel,
        wheel_sha256=wheel_sha256,
        tags=tuple(tags),
        dist_info=info_dir,
        data={k: tuple(v) for k, v in data.items()},
        entry_points=entry_points,
        extra={
            "requires_dist": meta.requires_dist,
            "requires_python": meta.requires_python,
            "root_is_purelib": root_is_purelib,
        },
    )


def _open_wheel(wheel_path: Path) -> IO[bytes]:
    try:
        return open(wheel_path, "rb")
    except OSError as exc:
        raise WheelError(f"cannot read wheel {wheel_path}: {exc.strerror}") from None


def _name_checked(wheel: str, supported_tags: Sequence[str] | None) -> tuple[
        NormalizedName, Version, list[str]]:
    name, version, tags = parse_filename(wheel)
    if supported_tags is not None and not set(tags) & set(supported_tags):
        raise WheelError(
            f"wheel {wheel} is not compatible with this interpreter (tags {', '.join(tags)})"
        )
    return name, version, tags


def ingested_manifest(
    store: Store, wheel_path: Path, *, supported_tags: Sequence[str] | None = None
) -> ManifestHead | None:
    """The manifest (without its files) of this unchanged wheel file if it was ingested
    before (the warm path: no hashing, no unzipping, no JSON rows), else None."""
    name, version, _tags = _name_checked(wheel_path.name, supported_tags)
    known = wheel_index.get(store, wheel_path).get("sha256")
    if isinstance(known, str):
        try:
            return read_head(store, f"{name}-{version}-{known[:16]}")
        except StoreError:
            pass
    return None


def ingest_wheel(
    store: Store,
    wheel_path: Path | str,
    *,
    supported_tags: Sequence[str] | None = None,
    force: bool = False,
    unwritten: list[Manifest] | None = None,
) -> Manifest:
    """Validate a wheel and make it installable from the store; returns its manifest.

    supported_tags: the interpreter's tags ("cp311-cp311-manylinux_2_28_x86_64", ...); a
    wheel with none of them is refused. A wheel already ingested (same name, version and
    sha256) is answered from its manifest without being read again, unless force is set.
    unwritten: a new manifest is appended there instead of written, for the caller to write
    with others (cowfs.store.manifest.write_manifests); its objects are stored but not synced.
    """
    wheel_path = Path(wheel_path)
    wheel = wheel_path.name
    name, version, tags = _name_checked(wheel, supported_tags)
    if not force:
        known = wheel_index.get(store, wheel_path).get("sha256")
        if isinstance(known, str):
            try:  # warm path: the same unchanged file was ingested before
                return read_manifest(store, f"{name}-{version}-{known[:16]}")
            except StoreError:
                pass
    with _open_wheel(wheel_path) as f:
        # Hash and unpack the same open file, so the id names exactly what was read.
        st = os.fstat(f.fileno())
        sha = hashlib.sha256()
        while chunk := f.read(CHUNK):
            sha.update(chunk)
        f.seek(0)
        wheel_sha256 = sha.hexdigest()
        store.ensure(read_only_ok=True)  # a read-only store may hold the manifest already
        wheel_index.put(store, wheel_path, st, sha256=wheel_sha256)
        if not force:
            try:
                return read_manifest(store, f"{name}-{version}-{wheel_sha256[:16]}")
            except StoreError:
                pass  # absent or unreadable: ingest, which (re)writes it
        with open_zip(f, wheel) as zf:
            manifest = _ingest(
                store,
                zf,
                wheel=wheel,
                name=name,
                version=version,
                tags=tags,
                wheel_sha256=wheel_sha256,
            )
    if unwritten is not None:
        unwritten.append(manifest)
    else:
        write_manifest(store, manifest)  # last: every object it names is already stored
    return manifest


def read_wheel_metadata(wheel_path: Path | str) -> tuple[str, str, list[str], str | None]:
    """(name, version, Requires-Dist, Requires-Python) from a wheel, without ingesting it.

    name is as written in METADATA (canonicalize it to compare); version is normalized.
    """
    wheel_path = Path(wheel_path)
    wheel = wheel_path.name
    name, version, _tags = parse_filename(wheel)
    with _open_wheel(wheel_path) as f, open_zip(f, wheel) as zf:
        files = scan(zf, wheel)
        info_dir = find_dist_info(files, name, version, wheel)
        meta = parse_metadata(
            read_member(zf, files, f"{info_dir}/METADATA", wheel), name, version, wheel
        )
    return meta.name, str(meta.version), meta.requires_dist, meta.requires_python


def venv_extra_files(
    store: Store, manifest: Dist, *, requested: bool, direct_url: dict[str, Any] | None
) -> list[FileEntry]:
    """REQUESTED and direct_url.json, stored as objects, for one venv's own layer.

    They differ per venv, so they never go into the shared manifest. Paths are relative to
    site-packages, inside the distribution's dist-info directory.
    """
    if not manifest.dist_info:
        raise WheelError(f"distribution {manifest.id} has no dist-info directory recorded")
    if not store.exists():
        store.ensure()  # not for a read-only store whose objects exist already
    out: list[FileEntry] = []
    if requested:
        out.append(FileEntry(f"{manifest.dist_info}/REQUESTED", store.put_bytes(b""), 0, 0o644))
    if direct_url is not None:
        if not isinstance(direct_url, dict) or not isinstance(direct_url.get("url"), str):
            raise WheelError("direct_url must be a JSON object with a 'url' string")
        try:
            doc = json.dumps(direct_url, sort_keys=True, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise WheelError(f"direct_url is not JSON serializable: {exc}") from None
        path = f"{manifest.dist_info}/direct_url.json"
        out.append(FileEntry(path, store.put_bytes(doc), len(doc), 0o644))
    return out
