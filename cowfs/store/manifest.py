"""Distribution manifests: what one installed wheel contributes to a venv, by content digest.

A manifest is the unit the lower layer is built from. It is written once per wheel into
`dists/<id>.json` and never changed. Parsing is strict: a manifest that could place a file
outside site-packages, or name a malformed digest, is rejected as a whole.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from cowfs.errors import StoreError
from cowfs.store.store import DIGEST_LEN, Store, is_digest, json_bytes

FORMAT = 1
# Lower files get one fixed mtime (the wheel's newest member time, or this default) so that
# bytecode compiled against them is valid in every venv that shares them.
DEFAULT_MTIME_NS = 1_600_000_000 * 10**9
DATA_KEYS = ("scripts", "headers", "data")


class FileEntry(NamedTuple):
    # A named tuple, not a dataclass: manifests are read with ~20k rows, and a tuple is
    # built in C (see _rows) where a frozen dataclass runs four object.__setattr__ calls.
    path: str  # relative POSIX path, validated
    digest: str
    size: int
    mode: int  # permission bits only (0o644 / 0o755)


@dataclass(frozen=True, slots=True)
class ManifestHead:
    """A manifest without its site-packages files (cowfs.store.layer.read_head): what installing
    a distribution into a venv needs beyond the lower layer (scripts, data, metadata)."""

    id: str
    name: str
    version: str
    mtime_ns: int = DEFAULT_MTIME_NS
    wheel: str = ""
    wheel_sha256: str = ""
    tags: tuple[str, ...] = ()
    dist_info: str = ""
    data: dict[str, tuple[FileEntry, ...]] = field(default_factory=dict)
    entry_points: dict[str, dict[str, str]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Manifest(ManifestHead):
    """A whole manifest: the head plus the files it puts into site-packages."""

    files: tuple[FileEntry, ...] = field(kw_only=True)

    def to_json(self) -> dict[str, Any]:
        def rows(entries: tuple[FileEntry, ...]) -> list[list[Any]]:
            return [[e.path, e.digest, e.size, e.mode] for e in entries]

        doc: dict[str, Any] = {
            "format": FORMAT,
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "mtime_ns": self.mtime_ns,
            "wheel": self.wheel,
            "wheel_sha256": self.wheel_sha256,
            "tags": list(self.tags),
            "dist_info": self.dist_info,
            "files": rows(self.files),
            "data": {k: rows(v) for k, v in self.data.items()},
            "entry_points": self.entry_points,
        }
        doc.update(self.extra)
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> Manifest:
        """Parse and validate; raises StoreError with the first problem found."""
        fields = _fields(doc)
        fields["files"] = _entries(fields["files"])
        return cls(**fields)


# What installing into a venv takes: a whole manifest, or one without its files.
Dist = ManifestHead


def _fields(doc: Any) -> dict[str, Any]:
    """Manifest fields of a JSON document, validated; files as FileColumns."""
    if not isinstance(doc, dict):
        raise StoreError("manifest is not a JSON object")
    if doc.get("format") != FORMAT:
        raise StoreError(f"unsupported manifest format {doc.get('format')!r}")
    try:
        data_doc = doc.get("data", {})
        if not isinstance(data_doc, dict) or not set(data_doc) <= set(DATA_KEYS):
            raise StoreError("manifest 'data' must map scripts/headers/data to files")
        eps = doc.get("entry_points", {})
        if not isinstance(eps, dict) or not all(
            isinstance(v, dict) and all(isinstance(x, str) for x in [*v, *v.values()])
            for v in eps.values()
        ):
            raise StoreError("manifest 'entry_points' must map groups to name -> target")
        known = {"format", "id", "name", "version", "mtime_ns", "wheel", "wheel_sha256",
                 "tags", "dist_info", "files", "data", "entry_points"}
        return dict(
            id=_str(doc, "id", ident=True),
            name=_str(doc, "name"),
            version=_str(doc, "version"),
            files=_columns(doc.get("files")),
            mtime_ns=_int(doc.get("mtime_ns", DEFAULT_MTIME_NS), "mtime_ns"),
            wheel=_str(doc, "wheel", required=False),
            wheel_sha256=_str(doc, "wheel_sha256", required=False),
            tags=tuple(_strlist(doc.get("tags", []), "tags")),
            dist_info=_str(doc, "dist_info", required=False),
            data={k: _rows(v) for k, v in data_doc.items()},
            entry_points=eps,
            extra={k: v for k, v in doc.items() if k not in known},
        )
    except (TypeError, ValueError) as exc:
        raise StoreError(f"malformed manifest: {exc}") from None


def check_relpath(path: Any) -> str:
    """A relative POSIX path with no '..', '.', empty or absolute components.

    Written as substring tests rather than a split: the daemon validates every row of every
    manifest when it (re)builds a lower, ~20k rows on the reference workload.
    """
    if not isinstance(path, str) or not path:
        raise StoreError(f"bad path in manifest: {path!r}")
    framed = f"/{path}/"
    ascii_ = path.isascii()
    if "//" in framed or "/./" in framed or "/../" in framed or "\\" in path \
            or "\0" in path or (not ascii_ and not _fs_encodable(path)) \
            or (len(path) > (255 if ascii_ else 63) and any(  # 64 chars: up to 256 bytes
                len(p.encode("utf-8", "surrogateescape")) > 255 for p in path.split("/"))):
        raise StoreError(f"unsafe path in manifest: {path!r}")
    return path


def _fs_encodable(path: str) -> bool:
    """A lone surrogate other than an escaped byte has no file name (os.fsencode fails)."""
    try:
        path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


def _str(doc: dict[str, Any], key: str, required: bool = True, ident: bool = False) -> str:
    value = doc.get(key, None if required else "")
    if not isinstance(value, str) or (required and not value):
        raise StoreError(f"manifest field {key!r} must be a non-empty string")
    if ident and (not value.isprintable() or "/" in value or value.startswith(".")):
        raise StoreError(f"bad manifest id {value!r}")
    return value


MAX_INT = 2**63 - 1  # sizes and times are signed 64-bit on their way to the kernel


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT:
        raise StoreError(f"manifest field {what!r} must be a non-negative 64-bit integer")
    return value


def _strlist(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StoreError(f"manifest field {what!r} must be a list of strings")
    return value


class FileColumns(NamedTuple):
    """A validated files list as parallel columns: what a lower layer is built from,
    without one FileEntry object per row (~18k rows on the reference workload)."""

    paths: tuple[str, ...]
    digests: tuple[str, ...]
    sizes: tuple[int, ...]
    modes: tuple[int, ...]


_EMPTY = FileColumns((), (), (), ())
_HEX_DELETE = {ord(c): None for c in "0123456789abcdef"}


def _columns(rows: Any) -> FileColumns:
    """Validate file rows [path, digest, size, mode] column-wise, in C-speed bulk checks.

    Exactly the rules of `_row_entries` (which reports the first bad row when a bulk check
    fails): the daemon validates every row of every manifest on each reload.
    """
    if not isinstance(rows, list):
        raise StoreError("manifest 'files' must be a list")
    if not rows:
        return _EMPTY
    if set(map(type, rows)) == {list} and set(map(len, rows)) == {4}:
        paths, digests, sizes, modes = zip(*rows, strict=True)
        if set(map(type, paths)) == {str} and set(map(type, digests)) == {str} \
                and set(map(type, sizes)) == {int} and set(map(type, modes)) == {int} \
                and min(sizes) >= 0 and max(sizes) <= MAX_INT and min(modes) >= 0 \
                and max(modes) <= 0o7777 \
                and _digests_ok(digests) and paths_ok(paths):
            return FileColumns(paths, digests, sizes, modes)
    entries = _row_entries(rows)  # raises with the first offending row
    return FileColumns(tuple(e.path for e in entries), tuple(e.digest for e in entries),
                       tuple(e.size for e in entries), tuple(e.mode for e in entries))


def _digests_ok(digests: tuple[str, ...]) -> bool:
    return set(map(len, digests)) == {DIGEST_LEN} and hex_ok("".join(digests))


def hex_ok(text: str) -> bool:
    """Only lowercase hex digits (what digests are made of)."""
    return not text.translate(_HEX_DELETE)


def paths_ok(paths: Sequence[str]) -> bool:
    """check_relpath for every path at once; False means: look path by path."""
    blob = "\0".join(paths)
    if blob.count("\0") != len(paths) - 1 or "\\" in blob or not blob.isascii():
        return False  # NUL or backslash inside a path; non-ASCII: the exact checks decide
    parts = "\0" + blob.replace("/", "\0") + "\0"  # every component framed by NULs
    if "\0\0" in parts or "\0.\0" in parts or "\0..\0" in parts:
        return False  # an empty, "." or ".." component (or an empty path)
    return max(map(len, paths)) <= 255 or max(map(len, parts.split("\0"))) <= 255


def _row_entries(rows: list[Any]) -> list[FileEntry]:
    out = []
    for row in rows:
        if not isinstance(row, list) or len(row) != 4:
            raise StoreError(f"bad file row in manifest: {row!r}")
        path, digest, size, mode = row
        if not isinstance(digest, str) or not is_digest(digest):
            raise StoreError(f"bad digest in manifest: {digest!r}")
        mode = _int(mode, "mode")
        if mode & ~0o7777:
            raise StoreError(f"bad mode in manifest: {mode!r}")
        out.append(FileEntry(check_relpath(path), digest, _int(size, "size"), mode))
    return out


def _entries(cols: FileColumns) -> tuple[FileEntry, ...]:
    return tuple(map(_new_entry, zip(*cols, strict=True)))


_new_entry = partial(tuple.__new__, FileEntry)  # FileEntry(*row) without a Python frame


def _rows(rows: Any) -> tuple[FileEntry, ...]:
    return _entries(_columns(rows))


# -- store I/O ----------------------------------------------------------------------------


def manifest_path(store: Store, dist_id: str) -> Path:
    return store.dists / f"{dist_id}.json"


def write_manifest(store: Store, manifest: Manifest) -> Path:
    """Write a manifest, then its compiled sidecar (cowfs.store.layer: what daemons load)."""
    from cowfs.store import layer  # it imports this module

    path = manifest_path(store, manifest.id)
    store.sync_objects()  # a crash must never leave a manifest naming a lost object
    layer.layer_path(store, manifest.id).unlink(missing_ok=True)  # never one of another
    doc = manifest.to_json()
    data = store.write_json(path, doc)
    try:
        layer.write_layer(store, manifest.id, data,
                          layer.layer_of_entries(manifest.mtime_ns, manifest.files), doc)
    except (OSError, StoreError):
        pass  # only a cache: the manifest is written, and the installer retries the sidecar
    return path


def write_manifests(store: Store, manifests: Sequence[Manifest]) -> None:
    """write_manifest for many (an install's new wheels): their objects and documents made
    durable by one syncfs, instead of a syncfs and four fsyncs each."""
    from cowfs.store import layer

    docs = []
    for manifest in manifests:
        layer.layer_path(store, manifest.id).unlink(missing_ok=True)
        doc = manifest.to_json()
        data = json_bytes(doc)
        compiled = layer.layer_bytes(manifest.id, data, layer.layer_of_entries(
            manifest.mtime_ns, manifest.files), doc)
        docs += [(manifest_path(store, manifest.id), data),
                 (layer.layer_path(store, manifest.id), compiled)]
    store.write_batch(docs)


def _load_bytes(store: Store, dist_id: str) -> tuple[Path, bytes]:
    path = manifest_path(store, dist_id)
    try:
        return path, path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"distribution {dist_id} is not in the store {store.root}") from None
    except OSError as exc:
        raise StoreError(f"unreadable manifest {path}: {exc}") from None


def _load(store: Store, dist_id: str) -> tuple[Path, Any]:
    path, data = _load_bytes(store, dist_id)
    try:
        return path, json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise StoreError(f"unreadable manifest {path}: {exc}") from None


def read_manifest(store: Store, dist_id: str) -> Manifest:
    path, doc = _load(store, dist_id)
    manifest = Manifest.from_json(doc)
    if manifest.id != dist_id:
        raise StoreError(f"manifest {path} names another id {manifest.id!r}")
    return manifest


def iter_manifests(store: Store) -> list[str]:
    if not store.dists.is_dir():
        return []
    return sorted(p.stem for p in store.dists.glob("*.json"))
