"""Shared fixtures: isolated store/runtime dirs and real FUSE mounts that always unmount."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cowfs import control
from cowfs import mount as mounting
from cowfs.spec import MountSpec


@pytest.fixture(autouse=True)
def isolated_cowfs(tmp_path_factory: pytest.TempPathFactory,
                   monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own store and runtime dir (sockets, mount registry)."""
    base = tmp_path_factory.mktemp("cowfs-home")
    monkeypatch.setenv("COWFS_HOME", str(base / "store"))
    run = Path("/tmp") / f"cowfs-rt-{os.getpid()}-{base.name}"  # short: sun_path limit
    run.mkdir(exist_ok=True)
    monkeypatch.setenv("COWFS_RUNTIME_DIR", str(run))
    yield base
    shutil.rmtree(run, ignore_errors=True)


def force_unmount(mountpoint: str) -> None:
    """Teardown that cannot leave a mount behind, even when the daemon is wedged."""
    if mounting.find_mount(mountpoint) is None:
        return
    spec = MountSpec.for_mountpoint(mountpoint)
    status = control.try_request(spec.socket, "status", timeout=2) if spec else None
    with contextlib.suppress(Exception):
        mounting.umount(mountpoint)
    if mounting.find_mount(mountpoint) is not None:
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)
    if status is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(status["pid"]), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while mounting.find_mount(mountpoint) is not None and time.monotonic() < deadline:
        time.sleep(0.05)


@dataclass
class OverlayMount:
    mnt: Path
    lower: list[Path]
    upper: Path
    work: Path
    spec: MountSpec

    def pid(self) -> int:
        return int(control.request(self.spec.socket, "status")["pid"])


@pytest.fixture
def overlay_mount(tmp_path: Path) -> Iterator[Callable[..., OverlayMount]]:
    """Factory: mount a generic overlay over the given lower dirs; unmounted at teardown."""
    made: list[str] = []

    def make(*lower: Path, name: str = "mnt") -> OverlayMount:
        base = tmp_path / f"ov-{name}"
        mnt, upper, work = base / "mnt", base / "upper", base / "work"
        for d in (mnt, upper, work):
            d.mkdir(parents=True, exist_ok=True)
        spec = MountSpec(mountpoint=str(mnt), upper=str(upper), work=str(work),
                         log=str(base / "daemon.log"), lowerdirs=[str(p) for p in lower])
        made.append(str(mnt))
        mounting.mount(spec)
        return OverlayMount(mnt, list(lower), upper, work, spec)

    try:
        yield make
    finally:
        for mp in made:
            force_unmount(mp)


def populate(root: Path) -> None:
    """A small package-like tree: nested dirs, text and binary files, an executable."""
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("VALUE = 1\n")
    (root / "pkg" / "main.py").write_text("def main():\n    return 'moo'\n")
    (root / "pkg" / "sub" / "data.bin").write_bytes(bytes(range(256)) * 64)
    (root / "pkg" / "empty").mkdir()
    (root / "top.txt").write_text("top\n")
    tool = root / "tool.sh"
    tool.write_text("#!/bin/sh\necho tool\n")
    tool.chmod(0o755)
    (root / "pkg" / "link").symlink_to("main.py")
