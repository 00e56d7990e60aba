"""Answers of the local fast path (installer.resolve.locks.pins_from_local_wheels), kept per
request.

A warm `cowfs install -r reqs.txt --find-links DIR` repeats the same work every time: parse
each requirement and each wheel's Requires-Dist with packaging's parser (~10 ms for the 31
wheels of the reference workload) to arrive at the same pins. An entry is keyed by the
request (requirement arguments, requirement file paths, wheel directories, the interpreter's
tags and markers) and used only while everything its answer was computed from is unchanged:

* the bytes of every requirements file read (`-r` includes too), by xxh3-128;
* the full stat fingerprint of every wheel in every wheel directory, so a wheel added,
  removed or rewritten in place is a miss (the rule of installer.wheel.wheel_index).

It is a cache: anything unreadable or malformed is a miss, and a store that cannot be
written just keeps no entries.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import xxhash

from cowfs.errors import StoreError
from cowfs.store.store import Store
from installer.resolve.resolve import Pin
from installer.wheel.wheel_index import fingerprint

FORMAT = 1


def _entry(store: Store, requirements: Sequence[str], requirement_files: Sequence[Path],
           wheel_dirs: Sequence[Path], tags: Sequence[str], markers: dict[str, str]) -> Path:
    request = [FORMAT, list(requirements), [str(Path(f).absolute()) for f in requirement_files],
               [str(Path(d).absolute()) for d in wheel_dirs], list(tags), markers]
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:32]
    return store.root / "plans" / f"{key}.json"


def _wheels(directory: Path) -> list[list[Any]]:
    try:
        with os.scandir(directory) as it:
            return sorted([e.name, *fingerprint(e.stat())] for e in it
                          if e.name.endswith(".whl"))
    except FileNotFoundError:
        return []


def _digest(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def wheels_state(wheel_dirs: Sequence[Path]) -> list[list[list[Any]]]:
    """What the answer depends on in the wheel directories (taken before computing it)."""
    return [_wheels(d) for d in wheel_dirs]


def _pin(doc: Any) -> Pin:
    if not isinstance(doc, dict) or doc.get("direct_url") is not None:
        raise TypeError("not a local pin")
    strs = {k: doc[k] for k in ("name", "version", "url", "filename")}
    opt = {k: doc[k] for k in ("sha256", "requires_python")}
    lists = {k: tuple(doc[k]) for k in ("requires_dist", "hashes")}
    if not all(isinstance(v, str) for v in strs.values()) \
            or not all(v is None or isinstance(v, str) for v in opt.values()) \
            or not all(isinstance(x, str) for v in lists.values() for x in v) \
            or not isinstance(doc["requested"], bool):
        raise TypeError("bad pin field")
    return Pin(**strs, **opt, **lists, requested=doc["requested"])


def lookup(store: Store, requirements: Sequence[str], requirement_files: Sequence[Path],
           wheel_dirs: Sequence[Path], tags: Sequence[str],
           markers: dict[str, str]) -> list[Pin] | None:
    """The pins recorded for this request, if nothing they were computed from changed."""
    path = _entry(store, requirements, requirement_files, wheel_dirs, tags, markers)
    try:
        doc = json.loads(path.read_bytes())
        if doc["wheels"] != wheels_state(wheel_dirs) or not all(
                _digest(Path(f).read_bytes()) == digest for f, digest in doc["files"]):
            return None
        return [_pin(p) for p in doc["pins"]]
    except (OSError, ValueError, RecursionError, TypeError, KeyError):
        return None


def record(store: Store, requirements: Sequence[str], requirement_files: Sequence[Path],
           wheel_dirs: Sequence[Path], tags: Sequence[str], markers: dict[str, str], *,
           wheels: list[list[list[Any]]], read: Sequence[tuple[Path, str]],
           pins: Sequence[Pin]) -> None:
    """Keep an answer computed from `read` (requirements files as parsed) and `wheels`
    (wheels_state() taken before computing it); best effort."""
    if wheels_state(wheel_dirs) != wheels:
        return  # a wheel changed meanwhile: the answer may be a mix of both
    path = _entry(store, requirements, requirement_files, wheel_dirs, tags, markers)
    doc = {"wheels": wheels,
           "files": [[str(f.absolute()), _digest(text.encode("utf-8"))] for f, text in read],
           "pins": [{**p.__dict__, "requires_dist": list(p.requires_dist),
                     "hashes": list(p.hashes)} for p in pins]}
    try:
        store.ensure()
        store.write_json(path, doc)
    except (OSError, StoreError):
        pass
