"""`cowfs diff`: a venv's private changes (installer.venv.changes) as a unified diff against the
pristine store objects."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from cowfs.dirfd import short
from cowfs.store.store import Store
from installer.venv.changes import Change, Report

DIFF_LIMIT = 4 << 20  # larger files are summarised, never diffed line by line


def _text(data: bytes) -> list[str] | None:
    if b"\0" in data[:8192]:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        # Shown like diff(1); a line without newline differs from the same line with one.
        lines[-1] += "\n\\ No newline at end of file\n"
    return lines


def _read(path: Path, limit: int = DIFF_LIMIT) -> bytes | None:
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > limit:
                return None
            return f.read()
    except OSError:
        return None


def diff_lines(report: Report, changes: Sequence[Change], store: Store | None = None
               ) -> Iterator[str]:
    """A unified diff of text changes against the pristine store objects; one line for
    binary files, mode changes, type changes and anything too large to diff."""
    store = store or Store(report.state.store)
    def upper(rel: str) -> Path:
        return Path(short(f"{report.state.upper}/{rel}"))

    for c in changes:
        a, b = f"a/{c.path}", f"b/{c.path}"
        if c.mode_change and c.kind != "type":  # a symlink's mode is not a change
            yield f"mode change {c.mode_change[0]:o} => {c.mode_change[1]:o} {c.path}"
        if c.kind in ("mode", "metadata"):
            if c.kind == "metadata":
                yield f"metadata only (same content and mode): {c.path}"
            continue
        if c.kind == "type":
            yield f"type change: {c.path} is now a {_what(upper(c.path))}"
            continue
        if c.is_dir:
            yield f"new empty directory: {c.path}/"
            continue
        if c.kind == "unknown-pristine":
            yield f"pristine unknown (edited before adoption): {c.path}"
            continue
        old = _read(store.object_path(c.pristine.digest)) if c.pristine else b""
        new = b"" if c.kind == "deleted" else _read(upper(c.path))
        if os.path.islink(upper(c.path)) and c.kind == "added":
            yield f"new symlink: {c.path} -> {os.readlink(upper(c.path))}"
            continue
        old_lines = _text(old) if old is not None else None
        new_lines = _text(new) if new is not None else None
        label = {"added": "added", "deleted": "deleted"}.get(c.kind, "differ")
        if old_lines is None or new_lines is None:
            yield f"Binary file {b if c.kind == 'added' else a} {label}" \
                if label != "differ" else f"Binary files {a} and {b} differ"
            continue
        yield from (ln.rstrip("\n") for ln in difflib.unified_diff(
            old_lines, new_lines, "/dev/null" if c.kind == "added" else a,
            "/dev/null" if c.kind == "deleted" else b))


def _what(path: Path) -> str:
    if path.is_symlink():
        return "symlink"
    return "directory" if path.is_dir() else "file"
