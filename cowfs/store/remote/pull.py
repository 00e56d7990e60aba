"""Distributions from a remote into the local store, every byte checked before it is kept.

Trust: a manifest is accepted only as the one of a wheel whose sha256 the requester trusts
(a lock's or an index's hash; the manifest id and its `wheel_sha256` must name exactly that
wheel), with the sha256 of its bytes in the remote's `.sha256` document. Each object is
kept only once its bytes match the sha256 that document gives, and those sha256 values
must be the ones the distribution's RECORD lists. A mismatch anywhere is one RemoteError,
and nothing of that object is kept; no manifest is written until every object it names is
in the store (a failed pull leaves at most verified, unreferenced objects, which gc drops).

What this does not give without a publisher signature: protection from a remote whose
publisher is hostile and consistent (it can serve its own manifest, RECORD and objects for
a wheel hash). Corruption, truncation and mix-ups in transit or in storage are caught.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cowfs.errors import StoreError
from cowfs.store.gc import manifest_rows
from cowfs.store.manifest import Manifest, manifest_path, write_manifest
from cowfs.store.remote import (
    FORMAT,
    RemoteError,
    is_sha256,
    manifest_key,
    object_key,
    origin_path,
    sha256_key,
)
from cowfs.store.remote.config import Remote
from cowfs.store.remote.transport import Transport, sha256_and_xxh3
from cowfs.store.store import Store

PARALLEL = 8


@dataclass
class RemoteDist:
    """A verified manifest on a remote, with the sha256 of every object it names."""

    remote: Remote
    transport: Transport
    manifest: Manifest
    shas: dict[str, str]  # xxh3 digest -> sha256

    def missing(self, store: Store, *, lazy: bool = False) -> list[str]:
        """Objects the store lacks; lazy: of those an install itself reads (outside
        site-packages: scripts, data)."""
        wanted = {fe.digest for rows in self.manifest.data.values() for fe in rows} \
            if lazy else self.shas
        return [d for d in wanted if not store.has(d)]


def find(remote: Remote, transport: Transport, dist_id: str, wheel_sha256: str
         ) -> RemoteDist | None:
    """The remote's manifest of that wheel, verified; None when the remote has none."""
    source = transport.get(manifest_key(dist_id))
    if source is None:
        return None
    where = f"remote {remote.label}: {manifest_key(dist_id)}"
    try:
        manifest = Manifest.from_json(json.loads(source))
    except (ValueError, RecursionError, StoreError) as exc:
        raise RemoteError(f"{where}: not a valid manifest ({exc})") from None
    if manifest.id != dist_id or manifest.wheel_sha256 != wheel_sha256:
        raise RemoteError(f"{where}: names another wheel ({manifest.wheel_sha256 or 'none'}, "
                          f"expected sha256 {wheel_sha256}): not used")
    trust_doc = transport.get(sha256_key(dist_id))
    if trust_doc is None:
        raise RemoteError(f"{where}: its {sha256_key(dist_id)} is missing (an interrupted "
                          "push? push again)")
    try:
        trust = json.loads(trust_doc)
        shas = trust["objects"]
        ok = trust["manifest"] == hashlib.sha256(source).hexdigest() and isinstance(shas, dict)
    except (ValueError, RecursionError, KeyError, TypeError):
        ok = False
    digests = {fe.digest for fe in manifest_rows(manifest)}
    if not any(fe.path == f"{manifest.dist_info}/RECORD" for fe in manifest.files):
        raise RemoteError(f"{where}: the manifest has no RECORD: not used")
    if not ok or set(shas) != digests or not all(map(is_sha256, shas.values())):
        raise RemoteError(f"{where}: does not match its {sha256_key(dist_id)}: not used")
    return RemoteDist(remote, transport, manifest, shas)


def fetch_object(store: Store, transport: Transport, label: str, digest: str,
                 sha256: str, who: str, *, durable: bool = False) -> int:
    """Download one object straight into a nameless store file and name it only once its
    bytes match their sha256 (and their xxh3 name); its size. who names what needs it."""
    key = object_key(digest)
    size = 0

    def fill(fd: int) -> None:
        nonlocal size
        with os.fdopen(fd, "w+b", closefd=False) as out:
            if not transport.read(key, out):
                raise RemoteError(f"remote {label}: {key} is missing (named by {who})")
            out.flush()
            out.seek(0)
            sha, xxh = sha256_and_xxh3(out)
            size = out.tell()
        if sha != sha256:
            raise RemoteError(f"remote {label}: {key}: content does not match its sha256 "
                              f"(expected {sha256}, got {sha}); it was not kept")
        if xxh != digest:  # sha256 right, name wrong: the publisher's mix-up
            raise RemoteError(f"remote {label}: {key} holds another object")

    store.put_checked(digest, fill, durable=durable)
    return size


def _fetch(store: Store, rd: RemoteDist, digest: str) -> int:
    return fetch_object(store, rd.transport, rd.remote.label, digest, rd.shas[digest],
                        rd.manifest.id)


# -- what a daemon needs to fetch an object later: dists/<id>.remote in the local store ----


def write_origin(store: Store, rd: RemoteDist) -> None:
    store.write_json(origin_path(store, rd.manifest.id),
                     {"format": FORMAT, "url": rd.remote.url, "objects": rd.shas})


def read_origin(store: Store, dist_id: str) -> tuple[str, dict[str, str]] | None:
    """(remote URL, xxh3 -> sha256) recorded when the distribution came from a remote."""
    try:
        doc = json.loads(origin_path(store, dist_id).read_bytes())
        url, shas = doc["url"], doc["objects"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(url, str) or not isinstance(shas, dict) \
            or not all(map(is_sha256, shas.values())):
        return None
    return url, shas


def _check_record(store: Store, rd: RemoteDist) -> None:
    """Every site-packages file but RECORD itself is listed in RECORD with the sha256 the
    remote's document gives: RECORD (the wheel's hashes, as installed) vouches for each."""
    from installer.wheel.wheel_archive import WheelError, b64, parse_record

    m = rd.manifest
    record_path = f"{m.dist_info}/RECORD"
    by_path = {fe.path: fe.digest for fe in m.files}
    where = f"remote {rd.remote.label}: {m.id}"
    try:
        with store.open_object(by_path[record_path]) as f:
            record = parse_record(f.read(), m.wheel)
    except WheelError as exc:
        raise RemoteError(f"{where}: {exc}") from None
    for path, digest in by_path.items():
        row = record.get(path)
        if path == record_path:
            continue
        if row is None or row.algo != "sha256" \
                or row.value != b64(bytes.fromhex(rd.shas[digest])):
            raise RemoteError(f"{where}: {path} does not match its RECORD entry: not used")


Progress = Callable[[int, int, int], None]  # objects done, of, bytes


def materialize(store: Store, dists: Iterable[RemoteDist],
                progress: Progress | None = None, *, lazy: bool = False) -> tuple[int, int]:
    """Fetch what the store lacks of these distributions, then write their manifests (the
    caller holds the store lock, shared). Returns (objects fetched, bytes).

    lazy: only RECORD and the files installed outside site-packages (scripts, data: an
    install reads them); the mount daemon fetches the rest on first open (cowfs.store.remote.lazy).
    """
    dists = list(dists)
    if not dists:  # (no sync either: an install's own objects are synced with its manifests)
        return 0, 0
    store.ensure()
    done = [0, 0]  # objects, bytes
    for rd in dists:  # RECORD first: a distribution it does not vouch for costs no download
        record = next(fe.digest for fe in rd.manifest.files
                      if fe.path == f"{rd.manifest.dist_info}/RECORD")
        if not store.has(record):
            done[1] += _fetch(store, rd, record)
            done[0] += 1
        _check_record(store, rd)
    unique = {d: rd for rd in dists for d in rd.missing(store, lazy=lazy)}
    total = done[0] + len(unique)
    lock = threading.Lock()
    abort = threading.Event()

    def one(item: tuple[str, RemoteDist]) -> None:
        if abort.is_set():
            return
        try:
            size = _fetch(store, item[1], item[0])
        except BaseException:
            abort.set()  # the others stop starting: one failure is the answer
            raise
        with lock:
            done[0] += 1
            done[1] += size
            if progress is not None:
                progress(done[0], total, done[1])

    if unique:
        with ThreadPoolExecutor(PARALLEL, thread_name_prefix="cowfs-pull") as pool:
            futures = [pool.submit(one, item) for item in unique.items()]
        for future in futures:
            if (exc := future.exception()) is not None:
                raise exc
    store.sync_objects()  # before a manifest names them
    for rd in dists:
        if not manifest_path(store, rd.manifest.id).exists():  # else pulled for a venv
            write_origin(store, rd)  # before its manifest: a daemon can fetch what it lacks
            write_manifest(store, rd.manifest)
    return done[0], done[1]
