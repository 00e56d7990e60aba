"""Persistent facts about wheel files (sha256, Requires-Dist), valid while the file is unchanged.

A warm install must not re-hash 100+ MB of wheels or reopen 31 zip files just to learn what
it learned last time. Facts are keyed by the wheel's absolute path and trusted only while its
full stat fingerprint (device, inode, size, mtime, ctime) is the same, the way the
interpreter cache is: an in-place rewrite changes the ctime, even with a forged mtime.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cowfs.errors import StoreError
from cowfs.store.store import Store

Facts = dict[str, Any]


def fingerprint(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _entry(store: Store, path: Path) -> Path:
    key = hashlib.sha256(os.fsencode(path.absolute())).hexdigest()[:32]
    return store.root / "wheel-index" / f"{key}.json"


def get(store: Store, path: Path, st: os.stat_result | None = None) -> Facts:
    """What is known about this exact file ({} when nothing, or when it changed)."""
    try:
        doc = json.loads(_entry(store, path).read_bytes())
        st = st or os.stat(path)
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("path") != str(path.absolute()) \
            or doc.get("fp") != fingerprint(st):
        return {}
    facts = doc.get("facts")
    return facts if isinstance(facts, dict) else {}


def sha256(store: Store, path: Path) -> str | None:
    """The sha256 recorded for this exact file (as it is now), if any."""
    digest = get(store, path).get("sha256")
    return digest if isinstance(digest, str) else None


def put(store: Store, path: Path, st: os.stat_result, **facts: Any) -> None:
    """Record facts learned from the file as it was when st was taken (merged with old ones)."""
    merged = {**get(store, path, st), **facts}
    try:
        store.ensure()
        # not fsynced: a torn entry is unreadable JSON, which get() takes for no entry
        store.write_json(_entry(store, path), {"path": str(path.absolute()),
                                               "fp": fingerprint(st), "facts": merged},
                         durable=False)
    except (OSError, StoreError):
        pass  # a cache: a read-only store just means no caching
