"""The venv's lifecycle as other tools treat it: deleted or cleared under a live mount.

`rm -rf .venv`, `python -m venv --clear`, `uv venv --clear` and `shutil.rmtree` must succeed
on the first attempt, leave no mount behind, drop the gc root, and `cowfs venv` must make a
new venv at the same place. On ext4 and on a tmpfs: their directory orders differ, so the
deleters meet the state directory before or after site-packages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cowfs.mount import mount as mounting
from cowfs.mount.spec import VenvState
from cowfs.store.store import Store
from tests.conftest import UDDER, cow, cowfs, install, one_line_error, unmount_venv

UV = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))


def _deleters() -> dict[str, Callable[[Path], list[str] | None]]:
    return {
        "rm -rf": lambda v: ["rm", "-rf", str(v)],
        "python -m venv --clear": lambda v: [sys.executable, "-m", "venv", "--clear",
                                             "--without-pip", str(v)],
        "uv venv --clear": lambda v: [UV, "venv", "-q", "--clear", str(v)],
        "shutil.rmtree": lambda v: None,
    }


@pytest.fixture(params=["ext4", "tmpfs"])
def project(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "project"
    where.mkdir()
    if request.param == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "cowfs-lifecycle", str(where)], check=True)
    try:
        yield where
    finally:
        venv = where / ".venv"
        with_state = VenvState.path_for(venv).exists()
        if with_state:
            unmount_venv(venv)
        for e in mounting.mount_table():
            if Path(e.mountpoint).is_relative_to(where) and e.mountpoint != str(where):
                subprocess.run(["umount", "-l", e.mountpoint], capture_output=True)
        if request.param == "tmpfs":
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _mounts_below(path: Path) -> list[str]:
    return [e.mountpoint for e in mounting.mount_table()
            if e.fstype == mounting.FSTYPE and Path(e.mountpoint).is_relative_to(path)]


def _no_mount_left(path: Path) -> None:
    deadline = time.monotonic() + 5
    while _mounts_below(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _mounts_below(path) == []


@pytest.mark.parametrize("deleter", list(_deleters()))
def test_deleting_or_clearing_a_mounted_venv_just_works(
        project: Path, wheels: Path, deleter: str) -> None:
    if deleter.startswith("uv") and not Path(UV).exists():
        pytest.skip("uv is not installed")
    venv = project / ".venv"
    cowfs("venv", str(venv))
    install(venv, wheels)
    assert cow(venv) == UDDER
    store = Store()
    assert any(store.roots.glob("*.json"))
    argv = _deleters()[deleter](venv)
    if argv is None:
        shutil.rmtree(venv)
    else:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=project)
        assert proc.returncode == 0, proc.stderr  # the first attempt
    _no_mount_left(project)
    assert not any(store.roots.glob("*.json"))  # its gc root went with it
    assert "gone" not in cowfs("mounts").stdout
    if deleter.endswith("--clear"):  # the tool made a plain venv there: cowfs names the way
        fail = cowfs("install", "--venv", str(venv), "pycowsay", check=False)
        assert fail.returncode == 1 and f"cowfs adopt {venv}" in fail.stderr
        shutil.rmtree(venv)
    cowfs("venv", str(venv))  # the same place, from scratch
    install(venv, wheels)
    assert cow(venv) == UDDER


def test_rm_rf_of_a_venv_whose_listings_the_c_reader_answers(project: Path,
                                                             wheels: Path) -> None:
    """The C reader answers READDIRPLUS of directories listed once (cowfs/fuse/fastlookup.py):
    after a walk and a cache drop, `rm -rf` meets those answers and must still succeed at
    once. (The daemon stops them when it notices the deletion, so the deleter then lists
    empty directories as before; without that stop the no-op unlinks of the detached tree
    succeed too, only more of them.)"""
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        pytest.skip("the kernel cannot be made to drop its cached listings here")
    venv = project / ".venv"
    cowfs("venv", str(venv))
    install(venv, wheels)
    site = VenvState.load(venv).site_packages
    listed = sorted(str(p.relative_to(site)) for p in site.rglob("*"))
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    assert sorted(str(p.relative_to(site)) for p in site.rglob("*")) == listed
    from cowfs.mount import control
    from cowfs.mount.spec import MountSpec

    spec = MountSpec.for_mountpoint(str(site))
    assert spec is not None
    assert control.request(spec.socket, "status")["listings_in_c"] > 0
    proc = subprocess.run(["rm", "-rf", str(venv)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not venv.exists()
    _no_mount_left(project)


def test_rm_rf_after_uv_installed_into_the_venv(project: Path, wheels: Path) -> None:
    """uv's files sit in the upper layer until absorbed; `rm -rf` meets VENV/.cowfs (the
    upper) before site-packages on ext4 here, so the names the kernel still knows lost their
    files under the mount: they must answer as what they were, not ENOENT (rm then tried
    unlink on a directory: EISDIR)."""
    if not Path(UV).exists():
        pytest.skip("uv is not installed")
    venv = project / ".venv"
    cowfs("venv", str(venv))
    subprocess.run([UV, "pip", "install", "-q", "--python", str(venv / "bin" / "python"),
                    "--no-index", "--find-links", str(wheels), "pycowsay"], check=True)
    assert cow(venv) == UDDER  # the kernel now knows pycowsay/ and its files
    proc = subprocess.run(["rm", "-rf", str(venv)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not venv.exists()
    _no_mount_left(project)


def test_a_deletion_that_went_through_site_packages_first_needs_at_most_one_retry(
        project: Path, wheels: Path) -> None:
    """`rm -rf .venv/lib .venv`: site-packages is emptied while the venv still stands (a
    live venv's mount point cannot be removed), then the rest goes and the mount leaves."""
    venv = project / ".venv"
    cowfs("venv", str(venv))
    install(venv, wheels)
    first = subprocess.run(["rm", "-rf", str(venv / "lib"), str(venv)], capture_output=True,
                           text=True)
    assert first.returncode == 0 or "busy" in first.stderr.lower(), first.stderr
    _no_mount_left(project)
    retry = subprocess.run(["rm", "-rf", str(venv)], capture_output=True, text=True)
    assert retry.returncode == 0, retry.stderr
    assert not venv.exists()


def test_cowfs_venv_starts_over_on_what_a_failed_deletion_left(
        project: Path, wheels: Path) -> None:
    venv = project / ".venv"
    cowfs("venv", str(venv))
    install(venv, wheels)
    lib = subprocess.run(["rm", "-rf", str(venv / "lib")], capture_output=True, text=True)
    assert lib.returncode == 1 and "busy" in lib.stderr.lower()  # a live venv's mount point
    rest = [str(p) for p in venv.iterdir() if p.name != "lib"]
    subprocess.run(["rm", "-rf", *rest], check=True)  # the venv goes; its mount follows
    _no_mount_left(project)
    assert [p.name for p in venv.iterdir()] == ["lib"]
    cowfs("venv", str(venv))
    install(venv, wheels)
    assert cow(venv) == UDDER


def test_a_venv_dir_with_anything_else_is_not_taken_for_remains(tmp_path: Path) -> None:
    venv = tmp_path / ".venv"
    (venv / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    (venv / "notes.txt").write_text("mine")
    fail = cowfs("venv", str(venv), check=False)
    assert fail.returncode == 1 and "not an empty directory" in fail.stderr
    assert (venv / "notes.txt").read_text() == "mine"


def test_remains_holding_a_tree_deeper_than_path_max_are_not_cleared(tmp_path: Path) -> None:
    """A plain os.walk skips what lies past PATH_MAX, so the file below looked like empty
    remains of a venv and `cowfs venv` deleted it."""
    venv = tmp_path / ".venv"
    (venv / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    fd = os.open(venv / "lib", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(20):
            os.mkdir("d" * 255, dir_fd=fd)
            fd, old = os.open("d" * 255, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(old)
        os.close(os.open("precious", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
        one_line_error(cowfs("venv", str(venv), check=False), "not an empty directory")
        os.stat("precious", dir_fd=fd)  # still there
    finally:
        os.close(fd)


def test_cowfs_venv_with_another_python_on_an_existing_venv_refuses(
        venvs: Callable[[str | Path], Path]) -> None:
    """It said "already mounted" and kept the old interpreter; now one line says so."""
    other = shutil.which("python3", path="/usr/bin") or ""
    here = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    if not other or os.path.realpath(other) == here:
        pytest.skip("no second Python interpreter here")
    venv = venvs("V")  # made with this test's interpreter
    before = VenvState.path_for(venv).read_bytes()
    proc = cowfs("venv", str(venv), "--python", other, check=False)
    one_line_error(proc, "is a cowfs venv of Python")
    assert VenvState.path_for(venv).read_bytes() == before
    cowfs("venv", str(venv), "--python", here)  # the same interpreter: fine, as before


def test_a_moved_venv_is_named_as_moved(tmp_path: Path, wheels: Path) -> None:
    """cowfs venvs record their location; a moved one reported on (and mounted) its old
    place. Every command now says it was moved, in one line; moved back, it works."""
    venv, moved = tmp_path / "a" / ".venv", tmp_path / "b"
    cowfs("venv", str(venv))
    try:
        install(venv, wheels)
        cowfs("umount", str(venv))
        venv.rename(moved)
        for args in (["status", "--venv", str(moved)], ["mount", str(moved)],
                     ["venv", str(moved)], ["install", "--venv", str(moved), "x"]):
            one_line_error(cowfs(*args, check=False), f"{moved} was made as a cowfs venv at "
                                                       f"{venv} and then moved")
        moved.rename(venv)
        cowfs("mount", str(venv))
        assert cow(venv) == UDDER
    finally:
        if moved.exists() and not venv.exists():
            moved.rename(venv)
        unmount_venv(venv)
