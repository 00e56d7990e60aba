"""FUSE passthrough opens (cowfs/fuse/passthrough.py): the kernel reads lower and upper files
itself.

Differential where it can be: the same checks on a mount with COWFS_PASSTHROUGH=0 (kernel
opens, the daemon reads) must come out the other way, so each test can fail.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cowfs.mount import control
from tests.conftest import cow, cowfs, drop_page_cache, install, site

BIG = 4 << 20
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def status(spec: Any) -> dict[str, Any]:
    return dict(control.request(spec.socket, "status"))


def reads_served(spec: Any) -> int:
    """READs answered, by the daemon or its C reader (kernel opens of published files)."""
    st = status(spec)
    return int(st["served"]["reads"]) + int(st["reads_in_c"])


def released(spec: Any) -> dict[str, Any]:
    """The status once the kernel's asynchronous RELEASEs of closed files arrived."""
    for _ in range(200):
        st = status(spec)
        if not st["passthrough_opens"] and not st["open_files"]:
            break
        time.sleep(0.01)
    return st


def resident(path: Path) -> float:
    """Fraction of path's pages in memory as a mapping of it sees them (mincore)."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        try:
            assert _libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) / pages


@pytest.fixture(autouse=True)
def passthrough_on(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
                   passthrough_refused: str | None) -> None:
    if passthrough_refused is not None \
            and request.node.get_closest_marker("without_passthrough") is None:
        pytest.skip(f"passthrough falls back here: {passthrough_refused}")
    monkeypatch.setenv("COWFS_PASSTHROUGH", "1")  # inherited by the mount daemons


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    root = tmp_path / "lower"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "big.bin").write_bytes(os.urandom(BIG))
    (root / "pkg" / "mod.py").write_text("VALUE = 1\n")
    return root


@pytest.mark.parametrize("mode", ["passthrough", "kernel"])
def test_mounts_share_the_lower_files_pages(lower: Path, overlay_mount: Any,
                                            monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    if mode == "kernel":
        monkeypatch.setenv("COWFS_PASSTHROUGH", "0")
    big = lower / "pkg" / "big.bin"
    drop_page_cache([big])
    mounts = [overlay_mount(lower, name="a"), overlay_mount(lower, name="b")]
    for m in mounts:
        assert (m.mnt / "pkg" / "big.bin").read_bytes() == big.read_bytes()
    st = status(mounts[0].spec)
    assert st["opens"] == mode, st
    reads = [reads_served(m.spec) for m in mounts]
    # Evicting the lower file's pages: with passthrough there is no other copy.
    drop_page_cache([big])
    left = [resident(m.mnt / "pkg" / "big.bin") for m in mounts]
    if mode == "passthrough":
        assert reads == [0, 0], "the daemon read what the kernel should have"
        assert max(left) < 0.5, f"a mount keeps its own copy of the pages: {left}"
        assert st["backing_ids"] >= 1
    else:
        assert min(reads) > 0
        assert min(left) > 0.9, left  # each mount's own copy survives the lower's eviction


@pytest.mark.parametrize("answered_by", ["daemon", "reader"])
def test_writer_of_a_store_object_open_by_passthrough(lower: Path, overlay_mount: Any,
                                                      answered_by: str) -> None:
    """The one semantic change (README, "Kernel opens and passthrough"): while a lower file is
    open read-only by passthrough, opening it to write or truncating it is ETXTBSY; once it is
    closed, the copy-up works and every later open reads the new data. The read-only open is
    the node's first (answered by the daemon) or a later one (by the C reader)."""
    m = overlay_mount(lower)
    path = m.mnt / "pkg" / "mod.py"
    if answered_by == "reader":
        path.read_bytes()
    in_c = status(m.spec)["opens_in_c"]
    ro = os.open(path, os.O_RDONLY)
    assert status(m.spec)["opens_in_c"] == in_c + (answered_by == "reader")
    try:
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(OSError) as exc:
                os.close(os.open(path, flags))
            assert exc.value.errno == errno.ETXTBSY
        other = subprocess.run(["truncate", "-s", "1", str(path)], capture_output=True,
                               text=True)  # (another process: see only_opener)
        assert other.returncode and "Text file busy" in other.stderr, other
        assert not (m.upper / "pkg" / "mod.py").exists(), "copied up although refused"
        # A metadata change copies up without changing the bytes: allowed, and an open made
        # now reads the upper file through the daemon (DIRECT_IO with the live backing).
        os.chmod(path, 0o600)
        again = os.open(path, os.O_RDONLY)
        assert os.pread(again, 100, 0) == b"VALUE = 1\n"
        os.close(again)
        assert os.pread(ro, 100, 0) == b"VALUE = 1\n"
    finally:
        os.close(ro)
    path.write_text("VALUE = 2\n")
    assert path.read_text() == "VALUE = 2\n"
    assert (lower / "pkg" / "mod.py").read_text() == "VALUE = 1\n"
    assert released(m.spec)["passthrough_opens"] == 0


def test_upper_file_readers_and_writers_stay_coherent(lower: Path, overlay_mount: Any) -> None:
    m = overlay_mount(lower)
    path = m.mnt / "pkg" / "new.txt"
    path.write_bytes(b"a" * 10000)
    ro = os.open(path, os.O_RDONLY)  # passthrough to the upper file
    rw = os.open(path, os.O_RDWR)  # DIRECT_IO with the same backing: writes via the daemon
    try:
        assert status(m.spec)["passthrough_opens"] == 2
        os.pwrite(rw, b"b" * 100, 5000)
        assert os.pread(ro, 10000, 0) == b"a" * 5000 + b"b" * 100 + b"a" * 4900
        with mmap.mmap(rw, 10000, flags=mmap.MAP_SHARED,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            mm[0:3] = b"xyz"
            mm.flush()
        assert os.pread(ro, 3, 0) == b"xyz"
        os.ftruncate(rw, 4)
        assert os.pread(ro, 100, 0) == b"xyza"
        assert os.fstat(ro).st_size == 4
    finally:
        os.close(ro)
        os.close(rw)
    assert (m.upper / "pkg" / "new.txt").read_bytes() == b"xyza"


def test_auto_takes_passthrough_where_another_mount_serves_the_same_store_files(
        venvs: Callable[[str], Path], wheels: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default (auto): a venv alone on its store keeps kernel opens (warm opens cost no
    round trip); one whose store files another live mount serves too shares their pages."""
    monkeypatch.setenv("COWFS_PASSTHROUGH", "auto")
    alone = venvs("a")
    install(alone, wheels)
    assert cow(alone).startswith("||")
    out = cowfs("status", "--venv", str(alone)).stdout
    assert "; opens kernel (auto: no other live mount serves these store files" in out, out
    second = venvs("b")
    install(second, wheels)
    assert cow(second).startswith("||")
    assert "; opens passthrough" in cowfs("status", "--venv", str(second)).stdout
    assert "; opens kernel" in cowfs("status", "--venv", str(alone)).stdout  # (decided once)
    monkeypatch.setenv("COWFS_PASSTHROUGH", "0")
    third = venvs("c")
    install(third, wheels)
    assert cow(third).startswith("||")
    assert "; opens kernel (turned off" in cowfs("status", "--venv", str(third)).stdout


def test_venv_runs_on_passthrough_and_reset_reaches_new_opens(
        venvs: Callable[[str], Path], wheels: Path) -> None:
    venv = venvs("a")
    install(venv, wheels)
    assert "opens=passthrough" in cowfs("mounts").stdout
    assert "; opens passthrough" in cowfs("status", "--venv", str(venv)).stdout
    main = site(venv) / "pycowsay" / "main.py"
    pristine = main.read_bytes()
    assert cow(venv).startswith("||")
    main.write_bytes(pristine.replace(b"w", b"ww"))
    held = os.open(main, os.O_RDONLY)  # passthrough to the private copy
    try:
        cowfs("reset", "--venv", str(venv), "pycowsay/main.py", "-y")
        assert main.read_bytes() == pristine  # a new open: the store object
        assert os.pread(held, len(pristine) + 10, 0) != pristine  # the old open: its file
    finally:
        os.close(held)
    assert main.read_bytes() == pristine
    cowfs("store", "verify")


@pytest.mark.without_passthrough
def test_lower_on_an_overlay_falls_back_to_kernel_opens(tmp_path: Path, lower: Path,
                                                        overlay_mount: Any,
                                                        passthrough_refused: str | None
                                                        ) -> None:
    """A backing file on a stacked filesystem is refused by the kernel (ELOOP: the mount
    declares stack depth 1): the mount says so and runs on kernel opens."""
    ovl = tmp_path / "ovl"
    for d in ("upper", "work", "merged"):
        (ovl / d).mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                           f"lowerdir={lower},upperdir={ovl}/upper,workdir={ovl}/work",
                           str(ovl / "merged")], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"no kernel overlayfs here: {done.stderr.strip()}")
    if passthrough_refused is not None and "refused a backing file" not in passthrough_refused:
        subprocess.run(["umount", str(ovl / "merged")], check=False)
        pytest.skip(f"no passthrough here at all: {passthrough_refused}")
    try:
        m = overlay_mount(ovl / "merged")
        assert (m.mnt / "pkg" / "mod.py").read_text() == "VALUE = 1\n"
        st = status(m.spec)
        assert st["opens"] == "kernel", st
        assert "refused a backing file" in st["opens_why"], st
        assert "opens=kernel (the kernel refused" in cowfs("mounts").stdout
        ro = os.open(m.mnt / "pkg" / "mod.py", os.O_RDONLY)
        try:  # kernel opens keep today's guarantee: a writer is fine, the reader follows
            (m.mnt / "pkg" / "mod.py").write_text("VALUE = 3\n")
            assert os.pread(ro, 100, 0) == b"VALUE = 3\n"
        finally:
            os.close(ro)
    finally:
        subprocess.run(["umount", "-l", str(ovl / "merged")], check=False)


@pytest.mark.parametrize("fast", [True, False])
def test_backing_ids_are_bounded_and_closed(lower: Path, overlay_mount: Any,
                                            monkeypatch: pytest.MonkeyPatch, fast: bool) -> None:
    monkeypatch.setenv("COWFS_BACKING_IDS", "8")  # kept while unused: 8 at most
    monkeypatch.setenv("COWFS_FAST_OPENS_MAX", "16")  # answered by the C reader: 16 at most
    monkeypatch.setenv("COWFS_FAST_OPENS", "1" if fast else "0")
    n = 40
    for i in range(n):
        (lower / "pkg" / f"f{i}").write_text(str(i))
    m = overlay_mount(lower)
    fds = [os.open(m.mnt / "pkg" / f"f{i}", os.O_RDONLY) for i in range(n)]
    try:
        st = status(m.spec)
        assert st["passthrough_opens"] == n and st["backing_ids"] == n
        # One daemon fd per open file answered by Python, none per backing id (fast opens:
        # none at all, the kernel reads alone).
        assert st["open_files"] == (0 if fast else n)
        assert st["fast_opens"] is fast
    finally:
        for fd in fds:
            os.close(fd)
    for i in reversed(range(n)):
        assert (m.mnt / "pkg" / f"f{i}").read_text() == str(i)
    st = released(m.spec)
    assert st["passthrough_opens"] == 0 and st["open_files"] == 0
    if fast:
        # The daemon answered the first open; the reader all the others, making the entries of
        # the other 39 itself (their names are published: cowfs.fuse.fastlookup). Those are not
        # bounded by COWFS_FAST_OPENS_MAX but by the kernel: a forgotten inode's entry goes.
        assert st["served"]["opens"] == 1
        assert st["opens_in_c"] == 2 * n - 1 and st["first_opens_in_c"] == n - 1
        assert st["backing_ids"] == n
        if os.access("/proc/sys/vm/drop_caches", os.W_OK):
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2\n")  # dentries and inodes: FORGETs
            for _ in range(100):
                if status(m.spec)["backing_ids"] <= 8:
                    break
                time.sleep(0.05)
            assert status(m.spec)["backing_ids"] <= 8  # (the daemon's one, kept unused)
    else:
        assert st["backing_ids"] == 8
    assert reads_served(m.spec) == 0  # every one of them read by passthrough


def test_the_reader_answers_opens_and_stats_until_the_file_changes(
        lower: Path, overlay_mount: Any) -> None:
    """Once the daemon answered a store object's first open, the C reader answers its next
    opens and GETATTRs (a passthrough read makes the kernel ask for the atime again at every
    fstat); a copy-up, an unlink or a reload makes the daemon answer again, never the reader
    with what it was told before."""
    m = overlay_mount(lower)
    path = m.mnt / "pkg" / "mod.py"
    first = os.stat(lower / "pkg" / "mod.py")
    assert path.read_bytes() == b"VALUE = 1\n"  # the daemon's open: published
    before = status(m.spec)
    for _ in range(5):
        with open(path, "rb") as f:
            assert f.read() == b"VALUE = 1\n"
            st = os.fstat(f.fileno())
            assert (st.st_size, st.st_mode, st.st_nlink) == (10, first.st_mode, 1)
            assert st.st_mtime_ns == first.st_mtime_ns
    after = status(m.spec)
    assert after["opens_in_c"] - before["opens_in_c"] == 5
    assert after["getattrs_in_c"] - before["getattrs_in_c"] >= 4
    assert after["served"]["opens"] == before["served"]["opens"]

    os.chmod(path, 0o600)  # a copy-up: the reader stops answering for it
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path, "rb") as f:
        assert stat.S_IMODE(os.fstat(f.fileno()).st_mode) == 0o600
        assert f.read() == b"VALUE = 1\n"
    assert status(m.spec)["opens_in_c"] == after["opens_in_c"]

    big = m.mnt / "pkg" / "big.bin"
    big.read_bytes()
    fd = os.open(big, os.O_RDONLY)  # answered by the reader
    try:
        os.unlink(big)
        assert os.fstat(fd).st_nlink == 0  # as on a disk, not the reader's stale 1
        assert len(os.pread(fd, BIG, 0)) == BIG
    finally:
        os.close(fd)
    assert released(m.spec)["passthrough_opens"] == 0

