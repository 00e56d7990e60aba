"""Opens and listings left to the kernel (cowfs/fuse/_fuse_shim.c): fewer round trips, never stale.

The daemon answers OPEN and OPENDIR with ENOSYS once the shim tells its handlers which inode
a zero handle stands for; the kernel then opens without asking, keeps pages across opens and
serves repeated listings itself. Changes made through the mount invalidate the kernel's copy
on their own; changes the daemon makes (install, uninstall, reset) must invalidate it
explicitly, which these tests check on data the kernel has already cached. Reads and writes
of kernel opens go through one implicit handle per inode in the daemon.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cowfs.mount import control
from tests.conftest import cowfs, drop_kernel_caches, drop_page_cache, install, populate, site


@pytest.fixture(autouse=True)
def kernel_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about kernel opens: without passthrough (tests/test_passthrough.py)."""
    monkeypatch.setenv("COWFS_PASSTHROUGH", "0")


def served(spec: Any, what: str = "listings") -> int:
    return int(control.request(spec.socket, "status")["served"][what])


def dirs_cached(spec: Any) -> bool:
    return bool(control.request(spec.socket, "status")["kernel_cache"])


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    root = tmp_path / "lower"
    root.mkdir()
    populate(root)
    return root


def test_repeated_listings_cost_no_request(lower: Path, overlay_mount: Any) -> None:
    m = overlay_mount(lower)
    assert dirs_cached(m.spec), "cowfs.fuse._fuse_shim is not built or not loaded first"
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


def test_without_the_shim_every_open_and_listing_reaches_the_daemon(
        lower: Path, overlay_mount: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COWFS_KERNEL_CACHE", "0")
    m = overlay_mount(lower)
    assert not dirs_cached(m.spec)
    before = served(m.spec)
    for _ in range(3):
        assert "main.py" in os.listdir(m.mnt / "pkg")
    assert served(m.spec) == before + 3
    opens = served(m.spec, "opens")
    for _ in range(3):
        assert (m.mnt / "pkg" / "main.py").read_bytes()
    assert served(m.spec, "opens") == opens + 3
    (m.mnt / "pkg" / "new.py").write_text("")
    os.unlink(m.mnt / "pkg" / "main.py")
    assert "new.py" in os.listdir(m.mnt / "pkg") and "main.py" not in os.listdir(m.mnt / "pkg")


def _isatty_through(path: Path, times: int) -> None:
    """What io.open() asks of every file it opens (an ioctl the kernel forwards)."""
    import fcntl
    import termios

    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(times):
            assert not os.isatty(fd)
        with pytest.raises(OSError) as err:
            fcntl.ioctl(fd, termios.TCGETS, bytes(64))
        assert err.value.errno == errno.ENOTTY  # as on a disk
    finally:
        os.close(fd)


def test_ioctls_are_answered_by_the_c_reader_without_python(lower: Path,
                                                            overlay_mount: Any) -> None:
    m = overlay_mount(lower)
    before = served(m.spec, "ioctls_in_c")
    _isatty_through(m.mnt / "pkg" / "main.py", 50)
    assert served(m.spec, "ioctls_in_c") >= before + 51
    (m.mnt / "pkg" / "main.py").write_text("still served by Python\n")  # the rest is
    assert (m.mnt / "pkg" / "main.py").read_text() == "still served by Python\n"


def test_without_the_c_reader_ioctls_get_the_same_answer(
        lower: Path, overlay_mount: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COWFS_FUSE_READER", "0")
    m = overlay_mount(lower)
    _isatty_through(m.mnt / "pkg" / "main.py", 5)
    assert served(m.spec, "ioctls_in_c") == 0


def test_install_uninstall_and_reset_refresh_cached_listings(
        venvs: Callable[[str], Path], wheels: Path) -> None:
    venv = venvs("A")
    sp = site(venv)
    row = next(r for r in json.loads(cowfs("mounts", "--json").stdout)
               if r["mountpoint"] == str(sp))
    assert row["kernel_cache"] is True
    assert "opens=kernel" in cowfs("mounts").stdout
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
    # Both are gone from the cached listing, the package directory too although the reset
    # had left it copied up (empty) in the private layer.
    assert dist_info not in os.listdir(sp) and "pycowsay" not in os.listdir(sp)
    assert not (sp / "pycowsay").exists()


def daemon_fds(spec: Any) -> int:
    pid = control.request(spec.socket, "status")["pid"]
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_repeated_opens_and_warm_reads_cost_no_request(lower: Path,
                                                       overlay_mount: Any) -> None:
    m = overlay_mount(lower)
    main = m.mnt / "pkg" / "main.py"
    data = main.read_bytes()
    opens, reads = served(m.spec, "opens"), served(m.spec, "reads")
    for _ in range(50):
        assert main.read_bytes() == data
        with open(main, "rb") as f:
            assert f.read(3) == data[:3]
    assert (served(m.spec, "opens"), served(m.spec, "reads")) == (opens, reads)


def test_writes_through_kernel_opens_copy_up_on_the_first_write(lower: Path,
                                                                overlay_mount: Any) -> None:
    m = overlay_mount(lower)
    main = m.mnt / "pkg" / "main.py"
    pristine = main.read_bytes()
    reader = open(main, "rb")  # noqa: SIM115 - held across the copy-up
    writer = os.open(main, os.O_RDWR)
    try:
        assert not (m.upper / "pkg" / "main.py").exists()  # an open alone copies nothing
        os.pwrite(writer, b"DEF", 0)
        assert reader.read() == b"DEF" + pristine[3:]  # the same file for every opener
        os.ftruncate(writer, 5)
        os.fsync(writer)
    finally:
        os.close(writer)
        reader.close()
    assert main.read_bytes() == (m.upper / "pkg" / "main.py").read_bytes() == b"DEF" + \
        pristine[3:5]
    assert (lower / "pkg" / "main.py").read_bytes() == pristine
    with open(main, "r+b") as f:  # O_TRUNC arrives as a truncate, not with the open
        f.truncate(0)
    with open(m.mnt / "top.txt", "wb") as f:
        f.write(b"new")
    assert main.read_bytes() == b"" and (m.mnt / "top.txt").read_bytes() == b"new"
    assert (lower / "top.txt").read_bytes() != b"new"


def test_unlinked_while_open_stays_readable_and_writable(lower: Path,
                                                         overlay_mount: Any) -> None:
    m = overlay_mount(lower)
    (m.mnt / "mine.txt").write_bytes(b"private")
    upper_file = os.open(m.mnt / "mine.txt", os.O_RDWR)
    lower_file = os.open(m.mnt / "top.txt", os.O_RDWR)
    lower_data = (lower / "top.txt").read_bytes()
    try:
        os.unlink(m.mnt / "mine.txt")
        os.unlink(m.mnt / "top.txt")
        drop_kernel_caches()
        assert os.pread(upper_file, 7, 0) == b"private"
        assert os.pread(lower_file, len(lower_data), 0) == lower_data
        os.pwrite(lower_file, b"XY", 0)  # an anonymous private copy, never the lower file
        assert os.pread(lower_file, 2, 0) == b"XY" and os.fstat(lower_file).st_nlink == 0
        os.pwrite(upper_file, b"P", 0)
        assert os.pread(upper_file, 7, 0) == b"Private"
    finally:
        os.close(upper_file)
        os.close(lower_file)
    assert (lower / "top.txt").read_bytes() == lower_data
    assert not (m.mnt / "top.txt").exists() and not (m.mnt / "mine.txt").exists()


def test_implicit_handles_are_bounded_and_reopen(tmp_path: Path, overlay_mount: Any) -> None:
    lower = tmp_path / "many"
    lower.mkdir()
    for i in range(700):
        (lower / f"f{i}").write_text(f"file {i}\n")
    m = overlay_mount(lower)
    base = daemon_fds(m.spec)
    for i in range(700):
        assert (m.mnt / f"f{i}").read_text() == f"file {i}\n"
    assert daemon_fds(m.spec) - base <= 520  # at most the most recently used 512 stay open
    files = [m.mnt / f"f{i}" for i in range(700)]
    drop_page_cache(files)  # pages only: reads come again, through reopened handles
    reads = served(m.spec, "reads")
    for i in range(700):
        assert (m.mnt / f"f{i}").read_text() == f"file {i}\n"
    assert served(m.spec, "reads") - reads >= 700
    drop_kernel_caches()  # inodes: the kernel forgets them, the daemon closes their files
    deadline = time.monotonic() + 5  # FORGET is asynchronous
    while daemon_fds(m.spec) - base > 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon_fds(m.spec) - base <= 8  # (without the forget it would stay at ~512)


def test_reset_reaches_files_the_kernel_holds_open(venvs: Callable[[str], Path],
                                                   wheels: Path) -> None:
    venv = venvs("A")
    install(venv, wheels)
    main = site(venv) / "pycowsay" / "main.py"
    pristine = main.read_bytes()
    with open(main, "r+b") as f:
        f.write(b"#edited")
        f.flush()
        reader = open(main, "rb", buffering=0)  # noqa: SIM115
        try:
            assert reader.read(7) == b"#edited"
            cowfs("reset", "--venv", str(venv), "pycowsay/main.py", "-y")
            reader.seek(0)
            assert reader.read() == pristine  # its next read sees the store's file
        finally:
            reader.close()
    assert main.read_bytes() == pristine


def test_unlinking_links_and_fifos_the_kernel_knows_never_opens_them(
        lower: Path, overlay_mount: Any) -> None:
    """Only regular files are kept open for possible kernel opens: opening a symlink that
    points into the mount from inside the daemon would wait on the daemon itself."""
    m = overlay_mount(lower)
    (m.mnt / "link").symlink_to(m.mnt / "top.txt")
    os.mkfifo(m.mnt / "fifo")
    # No open before the unlinks: the first open of a mount still reaches the daemon.
    assert os.readlink(m.mnt / "link") == str(m.mnt / "top.txt")
    os.lstat(m.mnt / "fifo")
    code = "import os, sys; [os.unlink(p) for p in sys.argv[1:]]"
    subprocess.run([sys.executable, "-c", code, str(m.mnt / "link"), str(m.mnt / "fifo")],
                   check=True, timeout=20)
    assert sorted(os.listdir(m.mnt)) == sorted(os.listdir(lower))
