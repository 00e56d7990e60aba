"""Child interpreters run cowfs's own modules whatever directory they start in."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cowfs import __version__
from cowfs.selfexec import python_module


def test_a_directory_named_like_our_packages_does_not_shadow_them(tmp_path: Path) -> None:
    # A checkout at /cowfs seen from cwd / (the daemon's): `python -m cowfs` imported that
    # directory as a namespace package and failed in every container that had one.
    for name in ("cowfs", "installer"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__main__.py").write_text("raise SystemExit('shadowed')\n")
    proc = subprocess.run(python_module("cowfs", "--version"), cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"cowfs, version {__version__}", proc
