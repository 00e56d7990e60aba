"""Remotes: one store's distributions published for a fleet (docs/remotes.md).

A remote is a plain tree of immutable, content-addressed files, the store's own layout, so
any static web server, CDN or object store serves it and no server of our own exists:

    cowfs-remote.json      {"format": 1}: written by every push; tells a remote from a typo
    objects/ab/cdef...     object bytes, named by xxh3-128 as in the store
    dists/<id>.sha256      {"format": 1, "manifest": sha256, "objects": {xxh3: sha256}}
    dists/<id>.layer       the compiled sidecar (a cache: readers compile their own)
    dists/<id>.json        the manifest, byte for byte as in the publisher's store

A push writes a distribution's objects, then its .sha256 and .layer, and its manifest last:
a manifest on a remote means everything it names is there. Remote bytes are untrusted:
`cowfs.store.remote.pull` accepts a manifest only for the wheel sha256 the requester trusts (a lock
or index hash) and an object only once its bytes match the sha256 the .sha256 document
gives, cross-checked with the distribution's RECORD.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from cowfs.errors import CowfsError

if TYPE_CHECKING:
    from cowfs.store.store import Store

FORMAT = 1
MARKER = "cowfs-remote.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class RemoteError(CowfsError):
    """A remote could not be read or written, or served something that failed a check."""


def object_key(digest: str) -> str:
    return f"objects/{digest[:2]}/{digest[2:]}"


def manifest_key(dist_id: str) -> str:
    return f"dists/{dist_id}.json"


def sha256_key(dist_id: str) -> str:
    return f"dists/{dist_id}.sha256"


def layer_key(dist_id: str) -> str:
    return f"dists/{dist_id}.layer"


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def origin_path(store: Store, dist_id: str) -> Path:
    """Where the local store records which remote a distribution came from (its URL and
    each object's sha256): what a daemon fetches a lazily installed object by. Not *.json
    (that is a manifest); gc drops it with its manifest."""
    return store.dists / f"{dist_id}.remote"
