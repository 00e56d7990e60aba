"""Shared bytecode: `.pyc` files compiled once per (distribution, interpreter) into the store.

Python validates a timestamp pyc by the source's mtime (seconds) and size. Every lower file
of a distribution carries the manifest's fixed mtime, so one pyc is valid in every venv that
shares the distribution: a brand-new venv imports warm and writes no bytecode of its own.
An edited `.py` is copied up with a new mtime, so Python sees the shared pyc as stale and
recompiles it privately into the venv's upper layer, exactly as without cowfs.

The pycs of one distribution form a manifest of their own (`<dist id>.<cache tag>`), placed
in the lower layer after the distribution it belongs to.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from cowfs.store.manifest import (
    Dist,
    FileEntry,
    Manifest,
    manifest_path,
    read_manifest,
    write_manifest,
)
from cowfs.store.store import Store
from installer.interpreters import InterpreterInfo

# Runs inside the target interpreter: compile each source with the shared mtime and write a
# timestamp pyc. co_filename is fixed up by the import system on load, so a relative one is
# fine. Files that do not compile (Python 2 leftovers, templates) are skipped, as pip does.
_COMPILER = r"""
import importlib.util, json, os, sys
from importlib._bootstrap_external import _code_to_timestamp_pyc
job = json.load(sys.stdin)
mtime, out, done = job["mtime"], job["out"], []
for rel, src in job["files"]:
    try:
        with open(src, "rb") as f:
            data = f.read()
        code = compile(data, rel, "exec", dont_inherit=True)
    except Exception:
        continue
    pyc = importlib.util.cache_from_source(rel)
    target = os.path.join(out, pyc)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "wb") as f:
        f.write(_code_to_timestamp_pyc(code, mtime, len(data)))
    done.append(pyc)
json.dump({"tag": sys.implementation.cache_tag, "pycs": done}, sys.stdout)
"""


def cache_tag(info: InterpreterInfo) -> str:
    major, minor = info.version_info[:2]
    return f"{info.implementation}-{major}{minor}"


def bytecode_id(dist_id: str, tag: str) -> str:
    return f"{dist_id}.{tag}"


def bytecode_if_compiled(store: Store, manifest: Dist, info: InterpreterInfo) -> str | None:
    """Id of the distribution's bytecode manifest for this interpreter if it exists."""
    ident = bytecode_id(manifest.id, cache_tag(info))
    # A manifest is written last, so one that exists is complete.
    return ident if manifest_path(store, ident).exists() else None


def ensure_bytecode(store: Store, dist: Dist, info: InterpreterInfo,
                    python: Path) -> str | None:
    """Id of the distribution's bytecode manifest for this interpreter, compiling if new."""
    tag = cache_tag(info)
    ident = bytecode_id(dist.id, tag)
    if manifest_path(store, ident).exists():  # written last, so it is complete
        return ident
    manifest = dist if isinstance(dist, Manifest) else read_manifest(store, dist.id)
    sources = [(fe.path, str(store.object_path(fe.digest))) for fe in manifest.files
               if fe.path.endswith(".py")]
    if not sources or not all(os.path.exists(src) for _, src in sources):
        return None  # a lazy install from a remote (cowfs.store.remote.lazy): once pulled
    import tempfile  # cold path only

    try:
        out = Path(tempfile.mkdtemp(dir=store.tmp, prefix="pyc-"))
    except OSError:
        return None  # a read-only store: bytecode is an optimisation, never fail over it
    try:
        job = {"mtime": manifest.mtime_ns // 10**9, "out": str(out), "files": sources}
        # COWFS_NO_AUTOMOUNT: compiling must not mount the venv whose python this is (its
        # automount hook would, when a test or the user has just unmounted it).
        proc = subprocess.run([str(python), "-I", "-c", _COMPILER], input=json.dumps(job),
                              capture_output=True, text=True,
                              env={**os.environ, "COWFS_NO_AUTOMOUNT": "1"})
        if proc.returncode != 0:
            return None  # bytecode is an optimisation: never fail an install over it
        answer = json.loads(proc.stdout)
        if answer.get("tag") != tag:
            return None
        files = []
        for rel in answer["pycs"]:
            digest, size = store.put_file(out / rel)
            files.append(FileEntry(rel, digest, size, 0o644))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    write_manifest(store, Manifest(id=ident, name=manifest.name, version=manifest.version,
                                   files=tuple(files), mtime_ns=manifest.mtime_ns,
                                   extra={"bytecode_for": manifest.id, "cache_tag": tag}))
    return ident
