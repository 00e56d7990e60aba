"""The two-projects scenario as one container plays it (run inside by tests/test_docker_e2e.py).

Standard library only, run with the image's python3; cowfs is on PATH, COWFS_HOME names the
shared store volume and /wheels holds the wheels. Projects live in the container at /proj.
Prints one JSON object: step -> what it saw (a cow's udder line, a digest of a venv's
site-packages, a module path), or "ERROR: ..." for a step that failed (every step runs).

    python3 docker_scenario.py setup edit|pristine PKG UDDER EDITED
    python3 docker_scenario.py check edit|pristine PKG UDDER EDITED
    python3 docker_scenario.py teardown
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

PROJ = Path("/proj")
WHEELS = "/wheels"


class StepError(Exception):
    pass


def sh(*cmd: str, timeout: float = 300) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-6:]
        raise StepError(f"`{' '.join(cmd)}` exited {proc.returncode}: " + " | ".join(tail))
    return proc.stdout


def venv(name: str) -> Path:
    return PROJ / name / ".venv"


def site(name: str) -> Path:
    found = sorted((venv(name) / "lib").glob("python3*/site-packages"))
    if not found:
        raise StepError(f"{venv(name)} has no site-packages")
    return found[0]


def make(name: str, pkg: str) -> str:
    sh("cowfs", "venv", str(venv(name)))
    sh("cowfs", "install", "--venv", str(venv(name)), pkg, "--no-index", "--find-links",
       WHEELS, "-q")
    return "ok"


def cow(name: str) -> str:
    out = sh(str(venv(name) / "bin" / "pycowsay"), "moo")
    lines = [ln.strip() for ln in out.splitlines() if "||--" in ln]
    if not lines:
        raise StepError(f"pycowsay printed no cow: {out!r}")
    return lines[0]


def imported(name: str) -> str:
    return sh(str(venv(name) / "bin" / "python"), "-c",
              "import pycowsay.main; print(pycowsay.main.__file__)").strip()


def tree_digest(name: str) -> str:
    """Every file's path and bytes under site-packages (each read through the mount)."""
    root = site(name)
    h = hashlib.sha256()
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            path = Path(dirpath) / f
            h.update(str(path.relative_to(root)).encode() + b"\0")
            if not path.is_symlink():
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def edit(name: str, udder: str, edited: str) -> str:
    main = site(name) / "pycowsay" / "main.py"
    text = main.read_text()
    if udder not in text:
        raise StepError(f"{main} has no {udder!r}")
    main.write_text(text.replace(udder, edited))
    return "ok"


def umount(name: str) -> str:
    sh("cowfs", "umount", str(site(name)))
    return "ok"


def remount(name: str) -> str:
    umount(name)
    sh("cowfs", "mount", str(venv(name)))
    return "ok"


def observe(steps: dict[str, str], names: list[str], suffix: str = "") -> None:
    for name in names:
        step(steps, f"cow.{name}{suffix}", lambda n=name: cow(n))
        step(steps, f"import.{name}{suffix}", lambda n=name: imported(n))
        step(steps, f"tree.{name}{suffix}", lambda n=name: tree_digest(n))


def step(steps: dict[str, str], key: str, fn: Callable[[], str]) -> None:
    try:
        steps[key] = fn()
    except (StepError, OSError, subprocess.TimeoutExpired) as exc:
        steps[key] = f"ERROR: {exc}"


def main(argv: list[str]) -> int:
    phase = argv[0]
    steps: dict[str, str] = {}
    if phase == "teardown":
        for v in sorted(PROJ.glob("*/.venv")):
            step(steps, f"umount.{v.parent.name}", lambda n=v.parent.name: umount(n))
        print(json.dumps(steps))
        return 0
    role, pkg, udder, edited = argv[1:5]
    if phase == "setup":
        for name in ("A", "B"):
            step(steps, f"make.{name}", lambda n=name: make(n, pkg))
        if role == "edit":
            step(steps, "edit.A", lambda: edit("A", udder, edited))
        step(steps, "make.C", lambda: make("C", pkg))
        observe(steps, ["A", "B", "C"])
    elif phase == "check":
        observe(steps, ["A", "B", "C"])  # still mounted across the gc
        step(steps, "remount.A", lambda: remount("A"))
        step(steps, "make.D", lambda: make("D", pkg))  # a new project from the same store
        observe(steps, ["A"], ".remounted")
        observe(steps, ["D"])
    else:
        print(f"unknown phase {phase!r}", file=sys.stderr)
        return 2
    print(json.dumps(steps))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
