"""Per-venv files of a distribution: everything a wheel installs outside site-packages.

Scripts, launchers, headers and data files name the venv's interpreter or Python version,
so they are written into the venv itself, never into the shared store or lower layer.
Every write is tmp + rename in the destination directory: a crash leaves the old file or
the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

import xxhash

from cowfs.errors import StoreError
from cowfs.store.manifest import Dist, FileEntry, check_relpath
from cowfs.store.store import CHUNK, Store
from installer.wheel.wheel_archive import (
    SCRIPT_GROUPS,
    WheelError,
    check_script_name,
    parse_script_spec,
    split_python_shebang,
)

__all__ = ["VenvFiles", "install_venv_files", "launcher_script", "remove_venv_files",
           "shebang"]

# Linux truncates a shebang line at 127 bytes (before 5.1) and splits it at whitespace.
_MAX_SHEBANG = 127
_LIB_PYTHON = re.compile(r"python(\d+\.\d+)t?")

_LAUNCHER = """\
# -*- coding: utf-8 -*-
import re
import sys
from {module} import {name}
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit({call}())
"""


def shebang(python_exe: Path | str, args: bytes = b"") -> bytes:
    """'#!<python> <args>' line(s); a path the kernel would mangle is run through /bin/sh."""
    exe = os.fsencode(python_exe)
    if not os.path.isabs(exe) or b"\n" in exe or b"\r" in exe:
        raise WheelError(f"interpreter path {python_exe!r} cannot appear in a script")
    args = b" " + args.strip() if args.strip() else b""
    line = b"#!" + exe + args
    if b" " not in exe and b"\t" not in exe and len(line) <= _MAX_SHEBANG:
        return line + b"\n"
    # sh runs the exec line; Python sees only a string literal (pip/distlib do the same).
    quoted = os.fsencode(shlex.quote(os.fsdecode(exe)))
    stanza = b"'''exec' " + quoted + args + b' "$0" "$@"\n' + b"' '''"
    if stanza.count(b"'''") != 2:
        raise WheelError(f"interpreter path {python_exe!r} cannot appear in a script")
    return b"#!/bin/sh\n" + stanza + b"\n"


def launcher_script(python_exe: Path | str, spec: str) -> bytes:
    """A console/GUI script launcher, like pip's, for an entry point 'mod:obj.attr [x]'."""
    module, attr = parse_script_spec(spec)
    text = _LAUNCHER.format(module=module, name=attr.split(".")[0], call=attr)
    return shebang(python_exe) + text.encode("utf-8")


def _object_chunks(store: Store, entry: FileEntry) -> Iterator[bytes]:
    """An object's bytes, checked against its digest: a corrupt store must not spread."""
    h = xxhash.xxh3_128()
    size = 0
    try:
        with store.open_object(entry.digest) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
                yield chunk
    except FileNotFoundError:
        raise StoreError(
            f"object {entry.digest} ({entry.path}) is missing from the store"
        ) from None
    if h.hexdigest() != entry.digest or size != entry.size:
        raise StoreError(f"object {entry.digest} ({entry.path}) is corrupt")


class VenvFiles:
    """Atomic writes of files into a venv, batched: every file goes to a temp file next to
    its destination, is fsynced, and only then renamed into place.

    Writeback of all temp files is started before the first fsync, so one journal commit
    covers them (16 launchers: ~1.5 ms instead of one commit each, 4-50 ms on a busy disk);
    every file is still fsynced before its rename. Nothing is renamed unless all were
    written; abort() (or an error in commit) removes the temp files.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[int, Path, Path]] = []  # fd, temp file, destination

    def write(self, dest: Path, chunks: Iterable[bytes], mode: int) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = tmp = None
        try:
            for _ in range(100):  # O_EXCL names: no tempfile module on the warm path
                tmp = dest.parent / f".{dest.name}.{os.urandom(6).hex()}.tmp"
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o600)
                    break
                except FileExistsError:
                    continue
            if fd is None or tmp is None:
                raise FileExistsError(f"no free temporary name next to {dest}")
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            os.fchmod(fd, mode)  # exact mode: fchmod ignores the umask
        except BaseException:
            if fd is not None:
                os.close(fd)
                os.unlink(tmp)  # type: ignore[arg-type]
            raise
        self._pending.append((fd, tmp, dest))

    def commit(self) -> None:
        try:
            for fd, _, _ in self._pending:
                with contextlib.suppress(OSError):  # only a hint: start writeback now
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            for fd, _, _ in self._pending:
                os.fsync(fd)
            for _, tmp, dest in self._pending:
                os.replace(tmp, dest)  # replaces a symlink at dest itself, never its target
        finally:
            self.abort()

    def abort(self) -> None:
        """Forget what is not committed yet (its temp files go)."""
        pending, self._pending = self._pending, []
        for fd, tmp, _ in pending:
            os.close(fd)
            tmp.unlink(missing_ok=True)


def _python_version(venv: Path, python_exe: Path, purelib: Path | None) -> str:
    """X.Y of the venv's Python: from lib/pythonX.Y, else by asking the interpreter."""
    if purelib is not None and (m := _LIB_PYTHON.fullmatch(purelib.parent.name)):
        return m[1]
    found = {m[1] for p in venv.glob("lib/python*") if (m := _LIB_PYTHON.fullmatch(p.name))}
    if len(found) == 1:
        return found.pop()
    code = "import sys; print('%d.%d' % sys.version_info[:2])"
    try:
        out = subprocess.run(
            [str(python_exe), "-c", code], capture_output=True, text=True, check=True, timeout=60
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise WheelError(f"cannot tell the Python version of {python_exe}: {exc}") from None
    if not re.fullmatch(r"\d+\.\d+", out):
        raise WheelError(f"cannot tell the Python version of {python_exe}: got {out!r}")
    return out


def _check_paths(manifest: Dist) -> list[str]:
    """Script names stay in bin, targets are sane, other paths stay below their directory.

    Manifest parsing checks paths but not script names or entry points, and an in-memory
    manifest is not parsed at all: so check everything here, before any write.
    """
    names = [e.path for e in manifest.data.get("scripts", ())]
    for group in SCRIPT_GROUPS:
        for name, spec in manifest.entry_points.get(group, {}).items():
            parse_script_spec(spec)
            names.append(name)
    for name in names:
        check_script_name(name)
    for entry in (*manifest.data.get("headers", ()), *manifest.data.get("data", ())):
        check_relpath(entry.path)
    if "/" in manifest.name or manifest.name in ("", ".", ".."):
        raise WheelError(f"bad distribution name {manifest.name!r}")
    return names


def install_venv_files(
    store: Store,
    manifest: Dist,
    venv: Path,
    python_exe: Path,
    *,
    purelib: Path | None = None,
    headers_dir: Path | None = None,
    files: VenvFiles | None = None,
) -> list[Path]:
    """Write the distribution's scripts, launchers, headers and data files into venv.

    headers_dir is the distribution's own header directory; by default
    venv/include/site/pythonX.Y/<name>, X.Y taken from purelib (lib/pythonX.Y/...).
    Returns the paths written. With `files`, the writes join that batch and appear when
    the caller commits it; else they are committed before this returns.
    """
    if files is None:
        files = VenvFiles()
        try:
            written = install_venv_files(store, manifest, venv, python_exe, purelib=purelib,
                                         headers_dir=headers_dir, files=files)
            files.commit()
            return written
        finally:
            files.abort()
    venv, bindir = Path(venv), Path(venv) / "bin"
    # Everything that can be refused is refused before the first write.
    _check_paths(manifest)
    shebang(python_exe)
    headers = manifest.data.get("headers", ())
    if headers_dir is None and headers:
        version = _python_version(venv, Path(python_exe), purelib)
        headers_dir = venv / "include" / "site" / f"python{version}" / manifest.name
    written: list[Path] = []
    for entry in manifest.data.get("scripts", ()):
        dest = bindir / entry.path
        content = b"".join(_object_chunks(store, entry))  # scripts are small
        if (split := split_python_shebang(content)) is not None:
            args, rest = split
            content = shebang(python_exe, args) + rest
        files.write(dest, [content], entry.mode)
        written.append(dest)
    for group in SCRIPT_GROUPS:
        for name, spec in sorted(manifest.entry_points.get(group, {}).items()):
            dest = bindir / name
            files.write(dest, [launcher_script(python_exe, spec)], 0o755)
            written.append(dest)
    for entry in headers if headers_dir is not None else ():
        dest = Path(headers_dir) / entry.path
        files.write(dest, _object_chunks(store, entry), entry.mode)
        written.append(dest)
    for entry in manifest.data.get("data", ()):
        dest = venv / entry.path
        files.write(dest, _object_chunks(store, entry), entry.mode)
        written.append(dest)
    return written


def _remove(path: Path, stop: set[Path]) -> None:
    """Unlink path, then every parent left empty, up to (not including) a stop directory."""
    path.unlink(missing_ok=True)
    parent = path.parent
    while parent not in stop and parent != parent.parent:
        try:
            parent.rmdir()
        except OSError:  # not empty, or already gone: either way stop here
            return
        parent = parent.parent


def remove_recorded_outside(record: bytes, site: Path, venv: Path) -> None:
    """Remove what an installed RECORD lists outside site-packages but inside the venv
    (pip's and uv's console scripts, `.data/scripts`, data files): a distribution another
    installer put there has no manifest data for remove_venv_files. Paths leaving the venv
    are not touched: a RECORD is the venv's to edit, not a licence to delete anywhere."""
    from installer.venv.changes import parse_installed_record

    venv = Path(os.path.normpath(venv))
    stop = {venv, venv / "bin", venv / "include", venv / "include" / "site"}
    for rel, _, _ in parse_installed_record(record, str(site)):
        if not rel.startswith("../"):
            continue
        path = Path(os.path.normpath(site / rel))
        if venv in path.parents and not path.is_dir():
            _remove(path, stop)


def remove_venv_files(manifest: Dist, venv: Path) -> None:
    """Undo install_venv_files: remove exactly the paths it writes for this manifest.

    Headers are looked for under every include/site/python*/<name> (the version is not
    known here); a custom headers_dir given at install is not cleaned.
    """
    venv = Path(venv)
    bindir = venv / "bin"
    stop = {venv, bindir, venv / "include", venv / "include" / "site"}
    for name in _check_paths(manifest):
        _remove(bindir / name, stop)
    for root in sorted((venv / "include" / "site").glob("python*")):
        stop.add(root)
        for entry in manifest.data.get("headers", ()):
            _remove(root / manifest.name / entry.path, stop)
    for entry in manifest.data.get("data", ()):
        _remove(venv / entry.path, stop)
