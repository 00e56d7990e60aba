"""Fetch real wheels once into a cache directory (the only place the suite touches the network)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / ".cache" / "wheels"


def wheel_dir() -> Path:
    return Path(os.environ.get("COWFS_WHEEL_CACHE", DEFAULT_DIR))


def ensure_wheels(requirements: list[str], dest: Path | None = None,
                  requirement_file: Path | None = None) -> Path:
    """pip download --only-binary into dest unless every pinned wheel is there already."""
    dest = dest or wheel_dir()
    dest.mkdir(parents=True, exist_ok=True)
    have = {p.name.split("-")[0].lower().replace("_", "-") + "==" + p.name.split("-")[1]
            for p in dest.glob("*.whl")}
    wanted = [r.lower().replace("_", "-") for r in requirements]
    if requirement_file is None and all(r in have for r in wanted):
        return dest
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary", ":all:",
           "--disable-pip-version-check", "-d", str(dest), *requirements]
    if requirement_file is not None:
        cmd += ["-r", str(requirement_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")]
        raise RuntimeError(f"cannot download wheels: {(lines or [proc.stderr.strip()])[-1]}")
    return dest
