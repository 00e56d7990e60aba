"""What a Python interpreter is (version, paths, markers, wheel tags), cached per path.

Spawning an interpreter costs tens of milliseconds, so answers are cached in the store's
`interpreters/` directory. An installer once served stale answers after a venv was recreated
with another Python whose executable had the same timestamp: it keyed on the path alone and
validated with a timestamp. Here:

* the key is the absolute path as given AND its symlink-resolved path, so repointing
  `.venv/bin/python` selects another entry (and switching back reuses the old one);
* an entry is valid only while a recorded fingerprint of every file that decides the answer
  matches exactly: the real executable, the venv's pyvenv.cfg (or its absence), the loaded
  libpython and the stdlib's os.py. A fingerprint is (dev, ino, size, mtime_ns, ctime_ns), so
  it is checked without spawning anything; pyvenv.cfg is also content-hashed, and so is any
  file changed within RACY_NS of recording ("racily clean", as git calls it): timestamps are
  coarse, and a same-size rewrite within one tick with its mtime restored would keep the stat.
* an interpreter that is really a wrapper (pyenv shim, shell script) whose sys.executable is
  another file is never cached: its answer depends on things no fingerprint covers.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import packaging
import packaging.markers

from cowfs.errors import CowfsError
from cowfs.store.store import Store, digest_fd

SCHEMA = 1
QUERY_SCRIPT = (Path(__file__).with_name("_interpreter_query.py")).read_text()
PATH_KEYS = ("purelib", "platlib", "scripts", "data", "include", "stdlib")
# Files changed this recently (or in the future: clock skew) get a content hash in the entry.
RACY_NS = 3 * 10**9
_STDERR_TAIL = 200


@dataclass(frozen=True)
class InterpreterInfo:
    executable: str  # absolute path as given, symlinks NOT resolved
    canonical: str  # realpath of executable
    version: str  # "3.11.7"
    version_info: tuple[int, int, int]
    implementation: str  # sys.implementation.name: "cpython", "pypy"
    sys_executable: str  # what the interpreter itself reports
    sys_prefix: str
    base_prefix: str
    is_venv: bool
    paths: dict[str, str] = field(hash=False)  # sysconfig paths, keys PATH_KEYS
    markers: dict[str, str] = field(hash=False)  # PEP 508 marker environment
    tags: list[str] = field(hash=False)  # supported wheel tags, most preferred first
    abiflags: str = ""
    soabi: str | None = None
    platform: str = ""  # sysconfig.get_platform()
    libpython: str | None = None  # the shared library actually loaded, None if static
    from_cache: bool = field(default=False, compare=False)  # not stored


# Fields that come from the query (and are stored); the rest are known without spawning.
_QUERY_FIELDS = tuple(
    f.name
    for f in fields(InterpreterInfo)
    if f.name not in ("executable", "canonical", "from_cache")
)


@functools.cache
def _marker_keys() -> frozenset[str]:
    return frozenset(packaging.markers.default_environment())


class _BadDoc(ValueError):
    """A query answer or cache entry that does not have the expected shape."""


def _str_dict(value: Any, what: str, required: Iterable[str]) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _BadDoc(f"{what} is not a mapping of strings")
    if missing := set(required) - value.keys():
        raise _BadDoc(f"{what} lacks {', '.join(sorted(missing))}")
    return dict(value)


def _info_from_doc(
    doc: Any, executable: str, canonical: str, *, from_cache: bool
) -> InterpreterInfo:
    """Validate a query answer strictly: garbage must never become a cached answer."""
    if not isinstance(doc, dict):
        raise _BadDoc("not a JSON object")
    if missing := [name for name in _QUERY_FIELDS if name not in doc]:
        raise _BadDoc(f"missing {', '.join(missing)}")

    def text(name: str, optional: bool = False) -> Any:
        value = doc[name]
        if not (isinstance(value, str) or (optional and value is None)):
            raise _BadDoc(f"{name} is not a string")
        return value

    vi = doc["version_info"]
    if not (isinstance(vi, list) and len(vi) == 3 and all(type(n) is int and n >= 0 for n in vi)):
        raise _BadDoc("version_info is not three integers")
    tags = doc["tags"]
    if not (isinstance(tags, list) and tags and all(isinstance(t, str) for t in tags)):
        raise _BadDoc("tags is not a non-empty list of strings")
    if not isinstance(doc["is_venv"], bool):
        raise _BadDoc("is_venv is not a boolean")
    return InterpreterInfo(
        executable=executable,
        canonical=canonical,
        version=text("version"),
        version_info=(vi[0], vi[1], vi[2]),
        implementation=text("implementation"),
        sys_executable=text("sys_executable"),
        sys_prefix=text("sys_prefix"),
        base_prefix=text("base_prefix"),
        is_venv=doc["is_venv"],
        paths=_str_dict(doc["paths"], "paths", PATH_KEYS),
        # Same keys as the host's packaging, which computed them inside the target.
        markers=_str_dict(doc["markers"], "markers", _marker_keys()),
        tags=list(tags),
        abiflags=text("abiflags"),
        soabi=text("soabi", optional=True),
        platform=text("platform"),
        libpython=text("libpython", optional=True),
        from_cache=from_cache,
    )


def _info_to_doc(info: InterpreterInfo) -> dict[str, Any]:
    doc = {name: getattr(info, name) for name in _QUERY_FIELDS}
    doc["version_info"] = list(info.version_info)
    return doc


# -- fingerprints -------------------------------------------------------------------------


def _stat_key(path: str) -> list[int] | None:
    """(dev, ino, size, mtime_ns, ctime_ns) following symlinks, None if absent."""
    try:
        st = os.stat(path)
    except OSError:  # absent, or as invisible to the interpreter as to us
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _content_digest(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # absent or unreadable (an execute-only binary): the stat must do
        return None
    try:
        return digest_fd(fd)[0]
    except OSError:  # a directory
        return None
    finally:
        os.close(fd)


def _record(path: str, *, always_hash: bool, now_ns: int) -> dict[str, Any]:
    """One file's fingerprint; content-hashed when stat alone cannot be trusted yet."""
    key = _stat_key(path)
    rec: dict[str, Any] = {"path": path, "stat": key}
    if key is not None and (always_hash or max(key[3], key[4]) > now_ns - RACY_NS):
        rec["xxh3"] = _content_digest(path)
    return rec


def _pyvenv_candidates(executable: str) -> list[str]:
    # Where CPython looks, from the path as invoked: a venv's bin/python is usually a symlink.
    exe_dir = os.path.dirname(executable)
    return [
        os.path.join(exe_dir, "pyvenv.cfg"),
        os.path.join(os.path.dirname(exe_dir), "pyvenv.cfg"),
    ]


def _static_records(executable: str, canonical: str, now_ns: int) -> list[dict[str, Any]]:
    """Fingerprints of files known before the query: the executable and pyvenv.cfg."""
    recs = [_record(canonical, always_hash=False, now_ns=now_ns)]
    recs += [_record(p, always_hash=True, now_ns=now_ns) for p in _pyvenv_candidates(executable)]
    return recs


def _reported_files(info: InterpreterInfo) -> list[str]:
    """Files only the query can name: an in-place upgrade may leave the executable alone."""
    files = [info.libpython] if info.libpython else []
    files.append(os.path.join(info.paths["stdlib"], "os.py"))
    return files


# -- cache entries ------------------------------------------------------------------------


def _entry_path(store: Store, executable: str, canonical: str) -> Path:
    key = hashlib.sha256(os.fsencode(executable) + b"\0" + os.fsencode(canonical)).hexdigest()
    return store.interpreters / f"{key}.json"


def _check_entry(
    doc: Any, executable: str, canonical: str
) -> tuple[InterpreterInfo, list[dict[str, Any]]] | None:
    """The cached answer and refreshed file records if every fingerprint still matches."""
    if not (isinstance(doc, dict) and doc.get("schema") == SCHEMA):
        raise _BadDoc("wrong schema")
    if doc.get("executable") != executable or doc.get("canonical") != canonical:
        raise _BadDoc("entry is for another interpreter")
    files = doc.get("files")
    if not (isinstance(files, list) and all(isinstance(r, dict) for r in files)):
        raise _BadDoc("files is not a list of records")
    paths = [r.get("path") for r in files]
    info = _info_from_doc(doc.get("info"), executable, canonical, from_cache=True)
    # An entry must cover every file that decides the answer, whatever wrote it.
    required = [canonical, *_pyvenv_candidates(executable), *_reported_files(info)]
    if paths != required:
        raise _BadDoc("fingerprint does not cover the required files")
    pyvenv = required[1:3]
    now_ns = time.time_ns()
    fresh = []
    for rec, path in zip(files, required, strict=True):
        key = _stat_key(path)
        if key != rec.get("stat"):
            return None
        new: dict[str, Any] = {"path": path, "stat": key}
        if key is not None and "xxh3" in rec:
            if _content_digest(path) != rec["xxh3"]:
                return None
            # Once a file is no longer racy its verified stat is proof enough: drop the hash
            # so that later lookups stay cheap (pyvenv.cfg is small and always hashed).
            if path in pyvenv or max(key[3], key[4]) > now_ns - RACY_NS:
                new["xxh3"] = rec["xxh3"]
        fresh.append(new)
    return info, fresh


def _write_entry(
    store: Store, path: Path, info: InterpreterInfo, files: list[dict[str, Any]]
) -> None:
    doc = {
        "schema": SCHEMA,
        "executable": info.executable,
        "canonical": info.canonical,
        "files": files,
        "info": _info_to_doc(info),
    }
    try:
        store.ensure()
        store.write_json(path, doc)
    except (OSError, CowfsError):
        pass  # the cache is an optimisation: a read-only store must not break queries


def _lookup(store: Store, executable: str, canonical: str) -> InterpreterInfo | None:
    path = _entry_path(store, executable, canonical)
    try:
        doc = json.loads(path.read_bytes())
        checked = _check_entry(doc, executable, canonical)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError):  # unreadable, corrupt, wrong schema
        checked = None
    if checked is None:
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    info, fresh = checked
    if fresh != doc["files"]:
        _write_entry(store, path, info, fresh)  # drop hashes that are no longer needed
    return info


def clean_interpreter_cache(store: Store) -> int:
    """Remove every interpreter cache entry; return how many were removed."""
    removed = 0
    if not store.interpreters.is_dir():
        return 0
    for entry in store.interpreters.glob("*.json"):
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            removed += 1
    return removed


# -- running the query --------------------------------------------------------------------


def _resolve_executable(executable: str | os.PathLike[str]) -> str:
    """Absolute path as given: `..` is folded lexically, as CPython does, symlinks kept."""
    exe = os.fspath(executable)
    if not exe:
        raise CowfsError("no python interpreter given")
    if os.sep not in exe:
        found = shutil.which(exe)
        if found is None:
            raise CowfsError(f"python interpreter {exe!r} not found on PATH")
        exe = found
    return os.path.abspath(exe)


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last if len(last) <= _STDERR_TAIL else last[:_STDERR_TAIL] + "..."


def _run_query(executable: str, timeout: float) -> Any:
    """Spawn the interpreter isolated and return its parsed JSON answer."""
    fail = f"cannot query python interpreter {executable}"
    if os.path.isdir(executable):
        raise CowfsError(f"{fail}: is a directory")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.pop("__PYVENV_LAUNCHER__", None)
    env["COWFS_NO_AUTOMOUNT"] = "1"  # a query must not mount the venv it asks about
    host_packaging = os.path.dirname(os.path.abspath(packaging.__file__))
    import tempfile  # cold path only

    with tempfile.TemporaryDirectory(prefix="cowfs-query-") as shim:
        os.symlink(host_packaging, os.path.join(shim, "packaging"))
        try:
            # Own session, so a timeout kills whatever the interpreter (or a wrapper) started.
            proc = subprocess.Popen(
                [executable, "-I", "-B", "-c", QUERY_SCRIPT, shim],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=shim,  # older Pythons put the cwd on sys.path even with -I
                start_new_session=True,
            )
        except FileNotFoundError:
            if os.path.lexists(executable):  # a dangling symlink or a bad #! line
                raise CowfsError(f"{fail}: cannot be executed: what it runs is missing") from None
            raise CowfsError(f"{fail}: not found") from None
        except PermissionError:
            raise CowfsError(f"{fail}: not executable") from None
        except OSError as exc:
            raise CowfsError(f"{fail}: {exc.strerror or exc}") from None
        with proc:  # closes the pipes without reading what an escaped grandchild holds open
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise CowfsError(f"{fail}: timed out after {timeout:g} s") from None
            finally:
                if proc.returncode is None:  # timeout or interrupt
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    if proc.returncode != 0:
        detail = _one_line(err.decode(errors="replace"))
        status = (
            f"killed by signal {-proc.returncode}"
            if proc.returncode < 0
            else f"exit status {proc.returncode}"
        )
        raise CowfsError(f"{fail}: {status}" + (f": {detail}" if detail else ""))
    try:
        return json.loads(out)
    except ValueError:
        shown = _one_line(out.decode(errors="replace")) or "nothing"
        raise CowfsError(f"{fail}: unexpected output: {shown}") from None


def query_interpreter(
    executable: str | os.PathLike[str],
    store: Store | None = None,
    *,
    timeout: float = 20.0,
    use_cache: bool = True,
) -> InterpreterInfo:
    """Describe an interpreter, from the cache when its fingerprint still matches.

    A bare name is looked up on PATH. use_cache=False neither reads nor writes the cache.
    Raises CowfsError (one line) for a missing, broken, hanging or lying interpreter.
    """
    exe = _resolve_executable(executable)
    canonical = os.path.realpath(exe)
    if use_cache:
        store = store if store is not None else Store()
        if (cached := _lookup(store, exe, canonical)) is not None:
            return cached
    before = _static_records(exe, canonical, time.time_ns())
    doc = _run_query(exe, timeout)
    try:
        info = _info_from_doc(doc, exe, canonical, from_cache=False)
    except _BadDoc as exc:
        raise CowfsError(
            f"cannot query python interpreter {exe}: unexpected answer: {exc}"
        ) from None
    if not use_cache or store is None:
        return info
    # Only cache what the fingerprint really pins down: not a wrapper that runs another file,
    # and not an answer during which the executable or pyvenv.cfg changed.
    if not info.sys_executable or os.path.realpath(info.sys_executable) != canonical:
        return info
    now_ns = time.time_ns()
    if [r["stat"] for r in before] != [r["stat"] for r in _static_records(exe, canonical, now_ns)]:
        return info
    files = before + [_record(p, always_hash=False, now_ns=now_ns) for p in _reported_files(info)]
    _write_entry(store, _entry_path(store, exe, canonical), info, files)
    return info
