"""Directory listings cached by the kernel (cowfs/_fuse_shim.c): fewer round trips, never stale.

The daemon answers OPENDIR with ENOSYS once the shim tells readdir which directory it lists;
the kernel then serves repeated listings itself. Changes made through the mount invalidate
the kernel's copy on their own; changes the daemon makes (install, uninstall, reset) must
invalidate it explicitly, which these tests check on listings the kernel has already cached.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cowfs import control
from tests import test_installer_e2e as e2e
from tests.conftest import populate
from tests.test_changes import install
from tests.test_installer_e2e import cowfs, site

venvs = e2e.venvs
wheels = e2e.wheels


def served(spec: Any) -> int:
    return int(control.request(spec.socket, "status")["listings_served"])


def dirs_cached(spec: Any) -> bool:
    return bool(control.request(spec.socket, "status")["kernel_dircache"])


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    root = tmp_path / "lower"
    root.mkdir()
    populate(root)
    return root


def test_repeated_listings_cost_no_request(lower: Path, overlay_mount: Any) -> None:
    m = overlay_mount(lower)
    assert dirs_cached(m.spec), "cowfs._fuse_shim is not built or not loaded first"
    first = sorted(os.listdir(m.mnt / "pkg"))
    dirs = sum(1 for _ in os.walk(m.mnt))
    before = served(m.spec)
    for _ in range(20):
        assert sorted(os.listdir(m.mnt / "pkg")) == first
        assert sum(1 for _ in os.walk(m.mnt)) == dirs > 1
    assert served(m.spec) == before


def test_changes_through_the_mount_show_in_cached_listings(lower: Path,
                                                           overlay_mount: Any) -> None:
    m = overlay_mount(lower)
    pkg = m.mnt / "pkg"
    base = set(os.listdir(pkg))
    (pkg / "new.py").write_text("x = 1\n")
    assert set(os.listdir(pkg)) == base | {"new.py"}
    os.rename(pkg / "new.py", pkg / "renamed.py")
    assert set(os.listdir(pkg)) == base | {"renamed.py"}
    os.unlink(pkg / "main.py")
    assert set(os.listdir(pkg)) == (base | {"renamed.py"}) - {"main.py"}
    (m.mnt / "empty").mkdir()
    assert os.listdir(m.mnt / "empty") == []
    (m.mnt / "empty" / "f").write_text("")
    assert os.listdir(m.mnt / "empty") == ["f"]
    os.rename(pkg, m.mnt / "moved")
    assert "pkg" not in os.listdir(m.mnt) and "renamed.py" in os.listdir(m.mnt / "moved")


def test_getdents_lists_dot_entries_like_a_disk(lower: Path, overlay_mount: Any) -> None:
    m = overlay_mount(lower)
    (m.mnt / "empty").mkdir()
    for d in (m.mnt, m.mnt / "pkg", m.mnt / "empty"):
        got = subprocess.run(["ls", "-a1", str(d)], capture_output=True, text=True,
                             check=True).stdout.split()
        assert got[:2] == [".", ".."] and sorted(got[2:]) == sorted(os.listdir(d))
    inos = subprocess.run(["ls", "-ai1", str(m.mnt / "pkg")], capture_output=True, text=True,
                          check=True).stdout.split()
    assert int(inos[0]) == os.stat(m.mnt / "pkg").st_ino  # "." is the directory itself
    assert int(inos[2]) == os.stat(m.mnt).st_ino  # ".." its parent


def test_without_the_shim_every_listing_reaches_the_daemon(
        lower: Path, overlay_mount: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COWFS_KERNEL_DIRCACHE", "0")
    m = overlay_mount(lower)
    assert not dirs_cached(m.spec)
    before = served(m.spec)
    for _ in range(3):
        assert "main.py" in os.listdir(m.mnt / "pkg")
    assert served(m.spec) == before + 3
    (m.mnt / "pkg" / "new.py").write_text("")
    os.unlink(m.mnt / "pkg" / "main.py")
    assert "new.py" in os.listdir(m.mnt / "pkg") and "main.py" not in os.listdir(m.mnt / "pkg")


def test_install_uninstall_and_reset_refresh_cached_listings(
        venvs: Callable[[str], Path], wheels: Path) -> None:
    venv = venvs("A")
    sp = site(venv)
    assert os.listdir(sp) == []  # an empty listing, cached by the kernel
    install(venv, wheels)
    dist_info = "pycowsay-0.0.0.2.dist-info"
    assert {"pycowsay", dist_info} <= set(os.listdir(sp))
    pkg = sp / "pycowsay"
    listed = set(os.listdir(pkg))
    os.unlink(pkg / "main.py")
    assert set(os.listdir(pkg)) == listed - {"main.py"}
    cowfs("reset", "--venv", str(venv), "pycowsay/main.py", "-y")
    assert set(os.listdir(pkg)) == listed  # the daemon restored it behind the kernel's back
    cowfs("uninstall", "--venv", str(venv), "pycowsay")
    # The package directory stays as the private (copied-up) directory of the deletion;
    # the distribution's metadata directory is gone.
    assert dist_info not in os.listdir(sp) and os.listdir(sp / "pycowsay") == []
