"""A manifest's files in the form a lower layer is built from, and their compiled sidecars.

A mount daemon rebuilds its lower layer from every manifest of the venv on each reload
(after every install): ~60 JSON manifests, ~20k rows on the reference workload. Parsing and
validating that JSON and grouping the rows by directory costs ~35 ms; a `Layer` read from a
compiled sidecar `dists/<id>.layer` costs a few, because it holds the rows already grouped
by directory, as flat blobs and arrays that are checked in bulk (C-speed string operations).
The sidecar's header also carries the manifest's other fields, so an installer gets what it
needs of an installed distribution (`read_head`) without parsing its rows.

The JSON manifest stays the authority. A sidecar is only a cache of it:

* it names the xxh3-128 of the manifest's exact bytes, and is used only while they match;
* it carries a checksum of itself, and every field is validated as strictly as a manifest's
  are (paths, names, digests, modes, sizes), so a corrupt or forged sidecar makes the
  daemon fall back to the manifest with a log line, never serve a wrong file;
* it is written atomically (tmp, fsync, rename) by whoever writes the manifest, and by the
  installer (holding the store lock) for any manifest of a venv whose sidecar is missing,
  stale or damaged; write_manifest removes an old one before it replaces the manifest.
"""

from __future__ import annotations

import json
import logging
import sys
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import xxhash

from cowfs.errors import StoreError
from cowfs.store.manifest import (
    DIGEST_LEN,
    MAX_INT,
    FileColumns,
    FileEntry,
    ManifestHead,
    _fields,
    _load_bytes,
    check_relpath,
    paths_ok,
)
from cowfs.store.store import Store

log = logging.getLogger("cowfs.store.layer")

MAGIC = b"cowfs-layer 1\n"
_COUNT, _SIZE, _MODE = "I", "Q", "H"  # array typecodes: files per dir, size, mode


class Layer(NamedTuple):
    """One manifest's files, grouped by directory: dirs[k] holds the next counts[k] names."""

    mtime_ns: int
    dirs: Sequence[str]  # "" is site-packages itself
    counts: Sequence[int]
    names: Sequence[str]
    digests: str  # DIGEST_LEN characters per file, in names order
    sizes: Sequence[int]
    modes: Sequence[int]


class LayerError(ValueError):
    """A sidecar that must not be used (the manifest is read instead)."""


def layer_path(store: Store, dist_id: str) -> Path:
    return store.dists / f"{dist_id}.layer"


def layer_of(mtime_ns: int, cols: FileColumns) -> Layer:
    """Group validated rows by directory (row order kept within a directory); directories
    sorted, with every ancestor, so that merging them never walks up a path."""
    groups: dict[str, list[int]] = {}
    for i, path in enumerate(cols.paths):
        parent = path.rpartition("/")[0]
        group = groups.get(parent)
        if group is None:
            group = groups[parent] = []
        group.append(i)
    for d in list(groups):  # every ancestor too, so that a parent always comes first
        while d and (d := d.rpartition("/")[0]) not in groups:
            groups[d] = []
    dirs = sorted(groups)
    order = [i for d in dirs for i in groups[d]]
    paths, digests = cols.paths, cols.digests
    return Layer(mtime_ns, dirs, [len(groups[d]) for d in dirs],
                 [paths[i].rpartition("/")[2] for i in order],
                 "".join([digests[i] for i in order]),
                 [cols.sizes[i] for i in order], [cols.modes[i] for i in order])


def layer_of_entries(mtime_ns: int, entries: Sequence[FileEntry]) -> Layer:
    return layer_of(mtime_ns, FileColumns(*(tuple(c) for c in zip(*entries, strict=True)))
                    if entries else FileColumns((), (), (), ()))


# -- the sidecar format --------------------------------------------------------------------
# MAGIC; the xxh3-128 of everything after this line; one JSON header line (counts, the
# manifest's source digest, its fields but "files"); then the body: dirs ("\0"-joined),
# counts, names ("\0"-joined), digests (ASCII hex), sizes, modes (arrays, native order).


def encode(dist_id: str, source: str, layer: Layer, head: dict[str, Any]) -> bytes:
    dirs = "\0".join(layer.dirs).encode("utf-8", "surrogateescape")
    names = "\0".join(layer.names).encode("utf-8", "surrogateescape")
    header = {"id": dist_id, "source": source, "mtime_ns": layer.mtime_ns,
              "dirs": len(layer.dirs), "files": len(layer.names), "dirs_bytes": len(dirs),
              "names_bytes": len(names), "byteorder": sys.byteorder,
              "manifest": {k: v for k, v in head.items() if k != "files"}}
    rest = b"".join([json.dumps(header, sort_keys=True).encode(), b"\n", dirs,
                     array(_COUNT, layer.counts).tobytes(), names,
                     layer.digests.encode("ascii"), array(_SIZE, layer.sizes).tobytes(),
                     array(_MODE, layer.modes).tobytes()])
    return MAGIC + xxhash.xxh3_128_hexdigest(rest).encode() + b"\n" + rest


def _header(data: bytes, dist_id: str, source: str) -> tuple[dict[str, Any], memoryview]:
    """The checked header and the body of a sidecar of this exact manifest source."""
    at = len(MAGIC) + 33  # the checksum line
    if not data.startswith(MAGIC) or data[at - 1:at] != b"\n" \
            or (end := data.find(b"\n", at)) < 0:
        raise LayerError("not a layer sidecar")
    if xxhash.xxh3_128_hexdigest(memoryview(data)[at:]).encode() != data[len(MAGIC):at - 1]:
        raise LayerError("checksum mismatch")
    try:
        header = json.loads(data[at:end])
    except ValueError as exc:
        raise LayerError(f"bad header: {exc}") from None
    if not isinstance(header, dict) or header.get("id") != dist_id:
        raise LayerError("header names another distribution")
    if header.get("source") != source:
        raise LayerError("stale: the manifest changed since it was compiled")
    if header.get("byteorder") != sys.byteorder:
        raise LayerError("written on a machine of the other byte order")
    return header, memoryview(data)[end + 1:]


def decode(data: bytes, dist_id: str, source: str) -> Layer:
    """The layer a sidecar holds, validated; LayerError says why it cannot be used."""
    header, body = _header(data, dist_id, source)
    n_dirs, n_files, dirs_bytes, names_bytes, mtime_ns = (
        header.get(k) for k in ("dirs", "files", "dirs_bytes", "names_bytes", "mtime_ns"))
    if not all(type(v) is int and 0 <= v <= MAX_INT
               for v in (n_dirs, n_files, dirs_bytes, names_bytes, mtime_ns)):
        raise LayerError("bad header counts")
    sizes_at = dirs_bytes + 4 * n_dirs + names_bytes + DIGEST_LEN * n_files
    if array(_COUNT).itemsize != 4 or array(_SIZE).itemsize != 8 \
            or len(body) != sizes_at + 10 * n_files:
        raise LayerError("truncated or oversized body")
    at = dirs_bytes + 4 * n_dirs
    names_blob, hex_blob = body[at:at + names_bytes], bytes(body[at + names_bytes:sizes_at])
    if hex_blob.translate(None, b"0123456789abcdef"):
        raise LayerError("bad digest")
    try:
        dirs = _split(body[:dirs_bytes], n_dirs)
        names = _split(names_blob, n_files)
    except UnicodeDecodeError as exc:
        raise LayerError(f"bad body: {exc}") from None
    counts = _array(_COUNT, body[dirs_bytes:at])
    sizes = _array(_SIZE, body[sizes_at:sizes_at + 8 * n_files])
    modes = _array(_MODE, body[sizes_at + 8 * n_files:])
    if len(dirs) != n_dirs or len(names) != n_files or sum(counts) != n_files:
        raise LayerError("counts do not add up")
    if n_files and (max(modes) > 0o7777 or max(sizes) > MAX_INT):
        raise LayerError("bad mode or size")
    if len(set(dirs)) != n_dirs or not _dirs_ok(dirs) or not _names_ok(names_blob, names):
        raise LayerError("unsafe path")
    return Layer(mtime_ns, dirs, counts, names, hex_blob.decode("ascii"), sizes, modes)


def _array(typecode: str, data: memoryview) -> array[int]:
    out = array(typecode)
    out.frombytes(data)
    return out


def _split(blob: memoryview, n: int) -> list[str]:
    return str(blob, "utf-8", "surrogateescape").split("\0") if n else []


def _dirs_ok(dirs: list[str]) -> bool:
    real = dirs[1:] if dirs and not dirs[0] else dirs  # "" (the root) sorts first
    return paths_ok(real) or all(_relpath_ok(d) for d in dirs if d)


def _names_ok(blob: memoryview, names: list[str]) -> bool:
    """Every name one valid path component (the rules of check_relpath): checked on the
    NUL-separated blob, as paths_ok does; anything unusual is checked name by name."""
    raw = b"\0" + bytes(blob) + b"\0"
    if b"/" in raw or b"\\" in raw or not raw.isascii() or b"\0\0" in raw \
            or b"\0.\0" in raw or b"\0..\0" in raw or max(map(len, names), default=0) > 255:
        return all("/" not in n and _relpath_ok(n) for n in names)
    return True


def _relpath_ok(path: str) -> bool:
    try:
        check_relpath(path)
    except StoreError:
        return False
    return True


# -- store I/O -----------------------------------------------------------------------------


def source_digest(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def write_layer(store: Store, dist_id: str, source: bytes, layer: Layer,
                head: dict[str, Any]) -> None:
    """Write a manifest's sidecar (atomically, like every store file)."""
    store.write_bytes(layer_path(store, dist_id), layer_bytes(dist_id, source, layer, head))


def layer_bytes(dist_id: str, source: bytes, layer: Layer, head: dict[str, Any]) -> bytes:
    """The sidecar of the manifest whose bytes are source."""
    return encode(dist_id, source_digest(source), layer, head)


def ensure_layer(store: Store, dist_id: str) -> None:
    """(Re)compile the sidecar of a manifest unless it has an intact, current one.

    Checks the checksum and the source digest (~30 us): a damaged sidecar is replaced by
    the next install instead of sending every reload to the manifest.
    """
    try:
        path, source = _load_bytes(store, dist_id)
        try:
            _header(layer_path(store, dist_id).read_bytes(), dist_id, source_digest(source))
            return
        except (OSError, LayerError):
            pass
        doc, fields = _manifest_fields(path, source, dist_id)
        write_layer(store, dist_id, source, layer_of(fields["mtime_ns"], fields["files"]), doc)
    except (OSError, StoreError) as exc:
        # A cache: with a read-only store (or a bad manifest, which the daemon reports)
        # daemons read the manifest itself.
        log.debug("no compiled layer for %s: %s", dist_id, exc)


def read_layer(store: Store, dist_id: str, missing: list[str] | None = None) -> Layer:
    """The validated files of a manifest: from its sidecar when that is intact and current,
    else from the manifest itself. A damaged or stale sidecar is logged; a missing one is
    added to `missing` (logged at once by the caller), else logged."""
    path, source = _load_bytes(store, dist_id)
    sidecar = layer_path(store, dist_id)
    try:
        return decode(sidecar.read_bytes(), dist_id, source_digest(source))
    except FileNotFoundError:
        if missing is None:
            log.info("%s has no compiled layer: reading the manifest", dist_id)
        else:
            missing.append(dist_id)
    except (OSError, LayerError) as exc:
        log.warning("ignoring %s (%s): reading the manifest", sidecar, exc)
    _, fields = _manifest_fields(path, source, dist_id)
    return layer_of(fields["mtime_ns"], fields["files"])


def read_head(store: Store, dist_id: str) -> ManifestHead:
    """A manifest but its files, validated as read_manifest validates it: from the sidecar's
    header when that is intact and current (no JSON rows to parse), else from the manifest."""
    path, source = _load_bytes(store, dist_id)
    try:
        header, _ = _header(layer_path(store, dist_id).read_bytes(), dist_id,
                            source_digest(source))
        doc = header.get("manifest")
        if isinstance(doc, dict):
            fields = _fields({**doc, "files": []})
            if fields["id"] == dist_id:
                del fields["files"]
                return ManifestHead(**fields)
    except (OSError, LayerError, StoreError):
        pass  # the manifest decides, and reports what is wrong with it
    _, fields = _manifest_fields(path, source, dist_id)
    del fields["files"]
    return ManifestHead(**fields)


def _manifest_fields(path: Path, source: bytes, dist_id: str) -> tuple[Any, dict[str, Any]]:
    try:
        doc = json.loads(source)
    except (ValueError, RecursionError) as exc:
        raise StoreError(f"unreadable manifest {path}: {exc}") from None
    fields = _fields(doc)
    if fields["id"] != dist_id:
        raise StoreError(f"manifest {path} names another id {fields['id']!r}")
    return doc, fields
