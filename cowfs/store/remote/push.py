"""`cowfs store push`: publish the store's wheel distributions to a remote.

Content-addressed, so idempotent and safe from many hosts at once: an object's key is its
content, a manifest's key names the wheel it was made from, and each file is written whole
(rename on a directory, one PUT on S3). What the remote has is listed once and skipped;
every object is hashed before it leaves (xxh3 against its name: a corrupt store object is
never published; sha256 for the readers' check).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cowfs.store.gc import manifest_rows
from cowfs.store.layer import layer_path
from cowfs.store.manifest import iter_manifests, manifest_path, read_manifest
from cowfs.store.remote import (
    FORMAT,
    MARKER,
    RemoteError,
    layer_key,
    manifest_key,
    object_key,
    sha256_key,
)
from cowfs.store.remote.config import Remote
from cowfs.store.remote.transport import Transport, sha256_and_xxh3
from cowfs.store.store import Store

PARALLEL = 8  # uploads in flight (S3 and HTTP latency, not bandwidth, bound small objects)


@dataclass
class PushSummary:
    remote: str
    dists: list[str] = field(default_factory=list)  # pushed
    present: int = 0  # distributions the remote had already
    objects: int = 0  # uploaded
    bytes: int = 0
    objects_present: int = 0
    dry_run: bool = False

    def to_json(self) -> dict[str, object]:
        return {"remote": self.remote, "pushed": self.dists, "present": self.present,
                "objects": self.objects, "bytes": self.bytes,
                "objects_present": self.objects_present, "dry_run": self.dry_run}


def _hashes(store: Store, digest: str) -> str:
    """sha256 of a store object, checking that it still hashes to its name."""
    with store.open_object(digest) as f:
        sha, xxh = sha256_and_xxh3(f)
    if xxh != digest:
        raise RemoteError(f"store object {digest} is corrupt: nothing of its distribution was "
                          "pushed (`cowfs store verify --repair`)")
    return sha


def publishable(store: Store) -> list[str]:
    """Manifests made from a wheel (shared bytecode and absorbed installs have no wheel
    hash a reader could trust them by)."""
    out = []
    for ident in iter_manifests(store):
        try:
            doc = json.loads(manifest_path(store, ident).read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("wheel_sha256"):
            out.append(ident)
    return out


def push(store: Store, remote: Remote, *, dry_run: bool = False,
         progress: Callable[[PushSummary, int, int], None] | None = None) -> PushSummary:
    transport = remote.open()
    if not transport.writable:
        transport.put(MARKER, b"")  # raises the transport's own explanation
    summary = PushSummary(remote.label, dry_run=dry_run)
    ids = publishable(store)
    have_dists = transport.keys("dists/")
    have_objects = transport.keys("objects/")
    # Shared store lock: gc cannot collect what is being read for the upload.
    with store.lock(), ThreadPoolExecutor(PARALLEL, thread_name_prefix="cowfs-push") as pool:
        for i, ident in enumerate(ids):
            if progress is not None:
                progress(summary, i, len(ids))
            if manifest_key(ident) in have_dists:
                summary.present += 1
                continue
            _push_dist(store, transport, ident, have_objects, pool, summary)
            summary.dists.append(ident)
        if not dry_run:
            transport.put(MARKER, json.dumps({"format": FORMAT}).encode())
    return summary


def _push_dist(store: Store, transport: Transport, ident: str, have: set[str],
               pool: ThreadPoolExecutor, summary: PushSummary) -> None:
    source = manifest_path(store, ident).read_bytes()
    manifest = read_manifest(store, ident)
    sizes = {fe.digest: fe.size for fe in manifest_rows(manifest)}

    def one(digest: str) -> str:
        sha = _hashes(store, digest)
        if object_key(digest) not in have and not summary.dry_run:
            transport.put(object_key(digest), store.object_path(digest))
        return sha

    shas = dict(zip(sizes, pool.map(one, sizes), strict=True))
    for digest, size in sizes.items():
        if object_key(digest) in have:
            summary.objects_present += 1
            continue
        have.add(object_key(digest))
        summary.objects += 1
        summary.bytes += size
    if summary.dry_run:
        return
    trust = {"format": FORMAT, "manifest": hashlib.sha256(source).hexdigest(),
             "objects": shas}
    transport.put(sha256_key(ident), json.dumps(trust, sort_keys=True).encode())
    if (layer := layer_path(store, ident)).is_file():  # a cache: readers compile their own
        transport.put(layer_key(ident), layer)
    transport.put(manifest_key(ident), source)  # last: it says the rest is there
