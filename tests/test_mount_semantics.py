"""Semantics that need a real kernel mount: caches, handles, crashes, limits, xattrs, threads.

Every mount comes from the `overlay_mount` factory (unmounted at teardown, even on failure);
every test that touches a lower file checks that the lower is unchanged afterwards.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import stat
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    drop_kernel_caches,
    fingerprint,
    kill_during_synced_writes,
    populate,
    statx_fresh,
)

from cowfs.mount import mount as mounting
from cowfs.overlay.upper import WHITEOUT_XATTR

NAME_255 = "n" * 251 + ".txt"


@pytest.fixture
def lower(tmp_path: Path) -> Any:
    root = tmp_path / "lower"
    root.mkdir()
    populate(root)
    (root / NAME_255).write_text("long name\n")
    os.setxattr(root / "top.txt", "user.origin", b"lower")
    before = fingerprint(root)
    yield root
    assert fingerprint(root) == before, "the lower tree was modified through the mount"


# -- handles and inode numbers --------------------------------------------------------------


def test_read_only_fd_sees_data_written_after_copy_up(lower: Path, overlay_mount: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Kernel opens; with passthrough the writer is refused instead (tests/test_passthrough.py).
    monkeypatch.setenv("COWFS_PASSTHROUGH", "0")
    m = overlay_mount(lower)
    path = m.mnt / "pkg" / "main.py"
    old = path.read_bytes()
    ro = os.open(path, os.O_RDONLY)
    ro2 = os.open(m.mnt / "top.txt", os.O_RDONLY)
    try:
        assert os.pread(ro, 4096, 0) == old  # the kernel has the lower data cached now
        mapped = mmap.mmap(ro, 0, prot=mmap.PROT_READ)
        with open(path, "r+b") as rw:  # copy-up happens here
            rw.write(b"NEW")
        assert os.pread(ro, 4096, 0) == b"NEW" + old[3:]
        assert mapped[:3] == b"NEW"
        mapped.close()
        with open(path, "wb") as trunc:  # O_TRUNC on the (now upper) file
            trunc.write(b"short")
        assert os.pread(ro, 4096, 0) == b"short"
        assert os.pread(ro2, 2, 0) == b"to"
        os.truncate(m.mnt / "top.txt", 1)  # copy-up by truncate(2), without data
        assert os.pread(ro2, 4096, 0) == b"t"
    finally:
        os.close(ro)
        os.close(ro2)
    assert (m.upper / "pkg" / "main.py").read_bytes() == b"short"


def test_inode_numbers_are_stable_for_the_mount_life(lower: Path, overlay_mount: Any) -> None:
    m = overlay_mount(lower)
    paths = ["pkg", "pkg/sub", "pkg/sub/data.bin", "top.txt", "pkg/link"]
    before = {p: os.lstat(m.mnt / p).st_ino for p in paths}
    assert len(set(before.values())) == len(paths)
    drop_kernel_caches()
    assert {p: os.lstat(m.mnt / p).st_ino for p in paths} == before
    with open(m.mnt / "pkg/sub/data.bin", "r+b") as f:
        f.write(b"copy-up")
    os.chmod(m.mnt / "top.txt", 0o600)
    os.utime(m.mnt / "pkg/link", ns=(1, 1), follow_symlinks=False)
    assert {p: os.lstat(m.mnt / p).st_ino for p in paths} == before
    os.rename(m.mnt / "pkg", m.mnt / "lib")
    os.rename(m.mnt / "top.txt", m.mnt / "lib" / "top.txt")
    drop_kernel_caches()
    moved = {p: os.lstat(m.mnt / p.replace("pkg", "lib").replace("top.txt", "lib/top.txt"))
             .st_ino for p in paths}
    assert moved == before
    assert statx_fresh(m.mnt / "lib/sub/data.bin").ino == before["pkg/sub/data.bin"]


def test_removed_but_open_entries_keep_their_attributes(lower: Path,
                                                        overlay_mount: Any) -> None:
    """fstat on an fd (or cwd) whose name is gone: nlink 0, not ENOENT, as on any local fs."""
    m = overlay_mount(lower)
    d = os.open(m.mnt / "pkg" / "empty", os.O_RDONLY | os.O_DIRECTORY)
    f = os.open(m.mnt / "pkg" / "main.py", os.O_RDONLY)
    g = os.open(m.mnt / "top.txt", os.O_RDWR)
    try:
        os.rmdir(m.mnt / "pkg" / "empty")
        os.unlink(m.mnt / "pkg" / "main.py")
        os.unlink(m.mnt / "top.txt")
        drop_kernel_caches()
        assert os.fstat(d).st_nlink == 0 and stat.S_ISDIR(os.fstat(d).st_mode)
        assert os.fstat(f).st_nlink == 0 and os.pread(f, 3, 0) == b"def"
        os.pwrite(g, b"still writable", 0)
        assert os.fstat(g).st_nlink == 0 and os.fstat(g).st_size == 14
        assert os.listdir(m.mnt / "pkg") == [] or "empty" not in os.listdir(m.mnt / "pkg")
    finally:
        for fd in (d, f, g):
            os.close(fd)


# -- several mounts, crashes ------------------------------------------------------------------


def test_two_mounts_share_a_lower_independently(lower: Path, overlay_mount: Any) -> None:
    a = overlay_mount(lower, name="a")
    b = overlay_mount(lower, name="b")
    with open(a.mnt / "pkg/main.py", "r+b") as f:
        f.write(b"AAA")
    (b.mnt / "pkg/main.py").write_text("bbb\n")
    os.unlink(a.mnt / "top.txt")
    assert (a.mnt / "pkg/main.py").read_bytes().startswith(b"AAA")
    assert (b.mnt / "pkg/main.py").read_text() == "bbb\n"
    assert not (a.mnt / "top.txt").exists() and (b.mnt / "top.txt").read_text() == "top\n"


def kill_during_writes(m: Any) -> bytes:
    """Write and fsync records from a thread, kill -9 the daemon midway; the synced bytes."""
    return kill_during_synced_writes(m.mnt / "pkg" / "sub" / "data.bin",
                                     lambda: os.kill(m.pid(), signal.SIGKILL), 50)


def test_kill_9_keeps_fsynced_data(lower: Path, overlay_mount: Any) -> None:
    m = overlay_mount(lower)
    expect = kill_during_writes(m)
    with pytest.raises(OSError) as exc:
        os.stat(m.mnt / "top.txt")
    assert exc.value.errno == errno.ENOTCONN
    assert (m.upper / "pkg" / "sub" / "data.bin").read_bytes()[:len(expect)] == expect
    # A new daemon on the same dirs (the dead mount detached by hand; mount() doing that
    # itself is the next test) serves the synced data; the lower is checked by the fixture.
    subprocess.run(["fusermount3", "-u", "-z", str(m.mnt)], check=True)
    assert mounting.mount(m.spec) == "mounted"
    assert (m.mnt / "pkg" / "sub" / "data.bin").read_bytes()[:len(expect)] == expect
    assert (m.mnt / "top.txt").read_text() == "top\n"
    assert os.listdir(m.work) == []


def test_mount_replaces_a_dead_mount(lower: Path, overlay_mount: Any) -> None:
    m = overlay_mount(lower)
    expect = kill_during_writes(m)
    assert mounting.mount_state(str(m.mnt)) == "stale"
    assert mounting.mount(m.spec) == "mounted"  # detaches the dead mount, mounts again
    assert mounting.mount_state(str(m.mnt)) == "live"
    assert (m.mnt / "pkg" / "sub" / "data.bin").read_bytes()[:len(expect)] == expect
    assert (m.mnt / "top.txt").read_text() == "top\n"
    assert os.listdir(m.work) == []


# -- limits -------------------------------------------------------------------------------


def test_statfs_is_the_upper_filesystem(lower: Path, overlay_mount: Any) -> None:
    m = overlay_mount(lower)
    got, upper = os.statvfs(m.mnt), os.statvfs(m.upper)
    assert (got.f_bsize, got.f_blocks, got.f_files) == \
        (upper.f_bsize, upper.f_blocks, upper.f_files)
    assert abs(got.f_bavail - upper.f_bavail) < upper.f_blocks // 100 + 1000
    assert got.f_namemax == 255


def test_name_length_limits(lower: Path, overlay_mount: Any) -> None:
    m = overlay_mount(lower)
    for fn in (lambda p: p.write_text("x"), lambda p: p.mkdir(), lambda p: p.lstat(),
               lambda p: p.symlink_to("t")):
        with pytest.raises(OSError) as exc:
            fn(m.mnt / ("x" * 256))
        assert exc.value.errno == errno.ENAMETOOLONG
    new = "m" * 255
    (m.mnt / new).write_text("255\n")
    os.rename(m.mnt / new, m.mnt / "pkg" / new)
    assert (m.mnt / "pkg" / new).read_text() == "255\n"
    os.unlink(m.mnt / "pkg" / new)
    assert (m.mnt / NAME_255).read_text() == "long name\n"
    os.unlink(m.mnt / NAME_255)  # a lower name: the whiteout needs all 255 bytes
    assert NAME_255 not in os.listdir(m.mnt)
    assert os.getxattr(m.upper / NAME_255, WHITEOUT_XATTR) == b"y"
    drop_kernel_caches()
    assert not (m.mnt / NAME_255).exists()
    (m.mnt / NAME_255).write_text("again\n")
    assert (m.mnt / NAME_255).read_text() == "again\n"


# -- copy-up triggered by metadata and data changes ----------------------------------------


def test_o_trunc_open_of_a_lower_file(lower: Path, overlay_mount: Any) -> None:
    m = overlay_mount(lower)
    with open(m.mnt / "tool.sh", "w") as f:
        f.write("#!/bin/sh\n")
    st = os.stat(m.mnt / "tool.sh")
    assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_size == 10
    fd = os.open(m.mnt / "pkg" / "__init__.py", os.O_RDONLY | os.O_TRUNC)
    os.close(fd)
    assert (m.mnt / "pkg" / "__init__.py").read_bytes() == b""


def test_attribute_changes_copy_up(lower: Path, overlay_mount: Any) -> None:
    m = overlay_mount(lower)
    os.chmod(m.mnt / "top.txt", 0o640)
    os.chown(m.mnt / "pkg" / "main.py", 1234, 5678)
    os.utime(m.mnt / "pkg" / "sub" / "data.bin", ns=(3 * 10**18, 4 * 10**18))
    os.chown(m.mnt / "pkg" / "link", 42, 43, follow_symlinks=False)
    os.chmod(m.mnt / "pkg" / "sub", 0o700)
    drop_kernel_caches()
    assert stat.S_IMODE(os.stat(m.mnt / "top.txt").st_mode) == 0o640
    assert (m.mnt / "top.txt").read_text() == "top\n"
    st = os.stat(m.mnt / "pkg" / "main.py")
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert os.stat(m.mnt / "pkg" / "sub" / "data.bin").st_mtime_ns == 4 * 10**18
    assert os.lstat(m.mnt / "pkg" / "link").st_uid == 42
    assert os.readlink(m.mnt / "pkg" / "link") == "main.py"
    assert stat.S_IMODE(os.stat(m.mnt / "pkg" / "sub").st_mode) == 0o700
    for rel in ("top.txt", "pkg/main.py", "pkg/sub/data.bin", "pkg/link"):
        assert os.path.lexists(m.upper / rel), rel


def test_xattrs_copy_up_and_private_names_are_invisible(lower: Path,
                                                        overlay_mount: Any) -> None:
    m = overlay_mount(lower)
    top = m.mnt / "top.txt"
    assert os.getxattr(top, "user.origin") == b"lower"
    os.setxattr(top, "user.mine", b"1")
    assert os.getxattr(m.upper / "top.txt", "user.origin") == b"lower"
    assert sorted(os.listxattr(top)) == ["user.mine", "user.origin"]
    os.removexattr(top, "user.origin")
    assert os.listxattr(top) == ["user.mine"]
    os.unlink(m.mnt / "pkg" / "main.py")  # the upper pkg now carries user.overlay.opaque
    for target in (m.mnt / "pkg", top):
        for name in ("user.overlay.opaque", "user.overlay.whiteout", "trusted.overlay.opaque"):
            with pytest.raises(OSError) as exc:
                os.setxattr(target, name, b"y")
            assert exc.value.errno in (errno.EPERM, errno.EOPNOTSUPP), name
            with pytest.raises(OSError) as exc:
                os.getxattr(target, name)
            assert exc.value.errno == errno.ENODATA, name
        assert not [n for n in os.listxattr(target) if ".overlay." in n]
    with pytest.raises(OSError) as exc:
        os.removexattr(m.mnt / "pkg", "user.overlay.opaque")
    assert exc.value.errno == errno.ENODATA
    assert "main.py" not in os.listdir(m.mnt / "pkg")


# -- a big copy-up does not stall the mount -----------------------------------------------------


def test_big_copy_up_runs_while_other_requests_are_served(tmp_path: Path,
                                                          overlay_mount: Any) -> None:
    lower = tmp_path / "biglower"
    lower.mkdir()
    block = os.urandom(1 << 20)
    with open(lower / "big.bin", "wb") as f:
        for _ in range(64):
            f.write(block)
    (lower / "small").write_text("s")
    m = overlay_mount(lower)
    done: list[float] = []
    stop = threading.Event()

    def stat_loop() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            # A fresh name every time: a lookup the kernel cannot answer from its cache.
            assert not os.path.lexists(m.mnt / f"probe-{i}")
            done.append(time.monotonic())

    t = threading.Thread(target=stat_loop)
    t.start()
    try:
        while len(done) < 20:
            time.sleep(0.001)
        t0 = time.monotonic()
        # Copies 64 MiB up: at the open, or at the first write when the kernel opens files
        # without asking the daemon (cowfs/fuse/_fuse_shim.c).
        fd = os.open(m.mnt / "big.bin", os.O_RDWR)
        os.pwrite(fd, b"tail", (64 << 20) - 4)
        t1 = time.monotonic()
    finally:
        stop.set()
        t.join()
    try:
        assert os.pread(fd, 4, 0) == block[:4]
    finally:
        os.close(fd)
    during = sum(1 for x in done if t0 < x < t1)
    print(f"\ncopy-up of 64 MiB took {(t1 - t0) * 1000:.0f} ms; "
          f"{during} lookups completed meanwhile")
    assert during >= 10, f"the mount stalled during the copy-up ({(t1 - t0) * 1000:.0f} ms)"
    assert (m.upper / "big.bin").stat().st_size == 64 << 20
    assert (lower / "big.bin").read_bytes()[-4:] == block[-4:]


def test_readdir_does_not_resurrect_names_removed_meanwhile(tmp_path: Path,
                                                           overlay_mount: Any) -> None:
    """A listing is a snapshot, but readdirplus also hands the kernel dentries: an entry
    removed after opendir must not come back to life through them."""
    lower = tmp_path / "manylower"
    (lower / "d").mkdir(parents=True)
    names = [f"file-{i:05d}" for i in range(3000)]
    for n in names:
        (lower / "d" / n).touch()
    m = overlay_mount(lower)
    victims = names[-50:]
    with os.scandir(m.mnt / "d") as it:
        first = next(it).name  # the kernel has fetched only the first part of the listing
        for n in victims:
            os.unlink(m.mnt / "d" / n)
        seen = {first, *(de.name for de in it)}
    assert seen <= set(names)
    for n in victims:
        assert not os.path.lexists(m.mnt / "d" / n), n
    assert sorted(os.listdir(m.mnt / "d")) == names[:-50]


def test_names_that_are_not_utf8(tmp_path: Path, overlay_mount: Any) -> None:
    lower = tmp_path / "bytes-lower"
    lower.mkdir()
    raw = os.fsencode(lower) + b"/caf\xe9-\xff.txt"  # latin-1 bytes: not valid UTF-8
    with open(raw, "wb") as f:
        f.write(b"latin")
    m = overlay_mount(lower)
    mnt = os.fsencode(m.mnt)
    assert os.listdir(mnt) == [b"caf\xe9-\xff.txt"]
    with open(mnt + b"/caf\xe9-\xff.txt", "r+b") as f:
        assert f.read() == b"latin"
        f.write(b"!")
    os.rename(mnt + b"/caf\xe9-\xff.txt", mnt + b"/\x80\x81")
    assert sorted(os.listdir(mnt)) == [b"\x80\x81"]
    with open(mnt + b"/\x80\x81", "rb") as f:
        assert f.read() == b"latin!"
    (m.mnt / ("é" * 127 + "x")).write_text("255 bytes")  # multi-byte: bytes count, not chars
    with pytest.raises(OSError) as exc:
        (m.mnt / ("é" * 128)).write_text("256 bytes")
    assert exc.value.errno == errno.ENAMETOOLONG


def test_namespace_changes_during_a_threaded_copy_up(tmp_path: Path,
                                                     overlay_mount: Any) -> None:
    """Rename the parent, unlink a sibling and list while a big copy-up runs in a thread:
    the copy lands under the new name, whole, and nothing else is lost."""
    lower = tmp_path / "racelower"
    (lower / "d").mkdir(parents=True)
    data = os.urandom(8 << 20)
    (lower / "d" / "big.bin").write_bytes(data)
    (lower / "d" / "sibling").write_text("s")
    m = overlay_mount(lower)
    errors: list[BaseException] = []

    def opener() -> None:
        try:
            with open(m.mnt / "d" / "big.bin", "r+b") as f:
                f.write(b"HEAD")
        except BaseException as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=opener)
    t.start()
    os.unlink(m.mnt / "d" / "sibling")
    os.rename(m.mnt / "d", m.mnt / "e")
    listing = os.listdir(m.mnt / "e")
    t.join(30)
    assert not errors and not t.is_alive()
    assert listing == ["big.bin"] and os.listdir(m.mnt) == ["e"]
    assert (m.mnt / "e" / "big.bin").read_bytes() == b"HEAD" + data[4:]
    drop_kernel_caches()
    assert (m.upper / "e" / "big.bin").read_bytes() == b"HEAD" + data[4:]
    assert os.listdir(m.work) == []


class Inotify:
    """Just enough inotify (ctypes) to see whether anything wrote to a watched tree."""

    WRITE_EVENTS = 0x2 | 0x4 | 0x8 | 0x100 | 0x200 | 0x40 | 0x80 | 0x400 | 0x800
    # IN_MODIFY IN_ATTRIB IN_CLOSE_WRITE IN_CREATE IN_DELETE IN_MOVED_FROM/TO IN_DELETE_SELF
    # IN_MOVE_SELF: a file opened for writing shows up as IN_CLOSE_WRITE even if untouched.

    def __init__(self, root: Path) -> None:
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0
        for dirpath, _, files in os.walk(root):
            for p in [dirpath, *(os.path.join(dirpath, f) for f in files)]:
                assert self._libc.inotify_add_watch(self.fd, os.fsencode(p),
                                                    self.WRITE_EVENTS) >= 0, p

    def events(self) -> list[tuple[int, int]]:
        out = []
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return out
        off = 0
        while off < len(data):
            wd, mask, _, length = struct.unpack_from("iIII", data, off)
            out.append((wd, mask))
            off += 16 + length
        return out


def test_lower_files_are_never_opened_for_writing(lower: Path, overlay_mount: Any) -> None:
    watch = Inotify(lower)
    m = overlay_mount(lower)
    with open(m.mnt / "pkg" / "main.py", "r+b"):
        pass  # opened for writing, nothing written: must not reach the lower either
    (m.mnt / "top.txt").write_text("changed\n")
    os.truncate(m.mnt / "tool.sh", 3)
    os.chmod(m.mnt / "pkg" / "__init__.py", 0o600)
    os.setxattr(m.mnt / "pkg" / "sub" / "data.bin", "user.x", b"1")
    os.utime(m.mnt / "pkg" / "link", ns=(5, 5), follow_symlinks=False)
    os.rename(m.mnt / "pkg", m.mnt / "lib")
    os.unlink(m.mnt / NAME_255)
    os.rmdir(m.mnt / "lib" / "empty")
    (m.mnt / "lib" / "sub" / "data.bin").read_bytes()
    assert watch.events() == [], "something opened a lower file or dir for writing"
    os.close(watch.fd)
