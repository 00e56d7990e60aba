"""Trees deeper than PATH_MAX: the daemon reaches their entries through directory handles
(cowfs.dirfd), in both layers. The tests walk with dir fds themselves (no path they use is
longer than a component), so any ENAMETOOLONG would be the daemon's.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import cowfs, force_unmount, install, site
from posix_deep import snapshot

from cowfs import dirfd
from cowfs.mount import mount as mounting
from cowfs.mount.spec import VenvState
from cowfs.overlay.upper import WHITEOUT_XATTR
from cowfs.store.manifest import iter_manifests, read_manifest
from cowfs.store.store import Store

SEG = "s" * 255
DEPTH = 24  # 24 * 256 bytes: deeper than PATH_MAX below any root
DIR = os.O_RDONLY | os.O_DIRECTORY
SHIPPED = b"print('shipped deep')\n"


@contextlib.contextmanager
def down(root: Path, depth: int = DEPTH, create: bool = False) -> Iterator[int]:
    """A handle of root/SEG/.../SEG (depth levels), made on the way with create."""
    fd = os.open(root, DIR)
    try:
        for _ in range(depth):
            if create:
                os.mkdir(SEG, dir_fd=fd)
            nxt = os.open(SEG, DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def write(fd: int, name: str, data: bytes, flags: int = os.O_CREAT | os.O_WRONLY) -> None:
    out = os.open(name, flags, 0o644, dir_fd=fd)
    try:
        os.write(out, data)
    finally:
        os.close(out)


def read(fd: int, name: str) -> bytes:
    src = os.open(name, os.O_RDONLY, dir_fd=fd)
    try:
        return os.read(src, 1 << 16)
    finally:
        os.close(src)


def names(fd: int, rel: str) -> list[str]:
    sub = os.open(rel, DIR, dir_fd=fd)
    try:
        return sorted(os.listdir(sub))
    finally:
        os.close(sub)


@pytest.fixture
def deep_lower(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "lower"
    root.mkdir()
    with down(root, create=True) as fd:
        write(fd, "f.txt", b"lower data\n")
        os.setxattr(f"/proc/self/fd/{fd}/f.txt", "user.origin", b"lower")
        write(fd, "gone.txt", b"gone\n")
        os.symlink("f.txt", "link", dir_fd=fd)
        os.mkdir("moveme", dir_fd=fd)
        write(fd, "moveme/a.txt", b"a\n")
        os.mkdir("moveme/sub", dir_fd=fd)
        write(fd, "moveme/sub/b.txt", b"b\n")
    before = snapshot(str(root))
    yield root
    assert snapshot(str(root)) == before, "the lower tree was modified through the mount"


def test_copy_up_whiteout_and_dir_rename_deeper_than_path_max(deep_lower: Path,
                                                              overlay_mount: Any) -> None:
    m = overlay_mount(deep_lower)
    with down(m.mnt) as fd:
        assert read(fd, "f.txt") == b"lower data\n"
        assert os.readlink("link", dir_fd=fd) == "f.txt"
        write(fd, "f.txt", b"more\n", os.O_WRONLY | os.O_APPEND)  # copy-up
        assert read(fd, "f.txt") == b"lower data\nmore\n"
        assert os.getxattr(f"/proc/self/fd/{fd}/f.txt", "user.origin") == b"lower"
        os.unlink("gone.txt", dir_fd=fd)  # whiteout
        os.rename("moveme", "moved", src_dir_fd=fd, dst_dir_fd=fd)  # dir with lower content
        os.mkdir("moveme", dir_fd=fd)  # the old name again: a new, empty directory
        write(fd, "moveme/z", b"z\n")
        assert names(fd, "moveme") == ["z"]
        assert names(fd, "moved") == ["a.txt", "sub"]
        os.unlink("moved/sub/b.txt", dir_fd=fd)
        os.rmdir("moved/sub", dir_fd=fd)  # a merged-empty dir replaced by a whiteout
        os.mkdir("new", dir_fd=fd)
        write(fd, "new/n.txt", b"n\n")
        assert sorted(os.listdir(fd)) == ["f.txt", "link", "moved", "moveme", "new"]
        assert names(fd, "moved") == ["a.txt"]
    # Up to the mount's root and back: handles kept for the old place must not be used.
    with down(m.mnt) as fd, down(m.mnt, 0) as top:
        os.rename("moved", "up", src_dir_fd=fd, dst_dir_fd=top)
        os.rename("up", "moved", src_dir_fd=top, dst_dir_fd=fd)
        assert read(fd, "moved/a.txt") == b"a\n"
    with down(m.upper) as ufd:
        st = os.lstat("gone.txt", dir_fd=ufd)
        assert (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0) or \
            WHITEOUT_XATTR in os.listxattr(f"/proc/self/fd/{ufd}/gone.txt",
                                           follow_symlinks=False)
        assert read(ufd, "f.txt") == b"lower data\nmore\n"
    force_unmount(str(m.mnt))
    assert mounting.mount(m.spec) == "mounted"  # what is on disk shows the same view
    with down(m.mnt) as fd:
        assert sorted(os.listdir(fd)) == ["f.txt", "link", "moved", "moveme", "new"]
        assert read(fd, "f.txt") == b"lower data\nmore\n"
        assert read(fd, "moved/a.txt") == b"a\n"
        assert read(fd, "new/n.txt") == b"n\n"
    assert os.listdir(m.work) == []


def test_dirfd_keeps_few_handles_and_forgets_moved_dirs(tmp_path: Path) -> None:
    """Many deep directories: the process holds a bounded number of handles; a directory
    renamed away or removed is never reached through a stale handle."""
    fds_before = len(os.listdir("/proc/self/fd"))
    with down(tmp_path, create=True) as fd:
        for i in range(300):
            os.mkdir(f"d{i}", dir_fd=fd)
    deep = os.path.join(str(tmp_path), *[SEG] * DEPTH)
    for i in range(300):
        os.close(os.open(dirfd.short(f"{deep}/d{i}/f"), os.O_CREAT | os.O_WRONLY, 0o644))
    assert len(os.listdir("/proc/self/fd")) - fds_before <= dirfd.CACHE_MAX + dirfd.RETIRED_MAX
    with down(tmp_path) as fd:
        os.rename("d1", "moved", src_dir_fd=fd, dst_dir_fd=fd)
        dirfd.forget(f"{deep}/d1")
        os.mkdir("d1", dir_fd=fd)
        assert not os.path.lexists(dirfd.short(f"{deep}/d1/f"))
        os.unlink("d2/f", dir_fd=fd)
        os.rmdir("d2", dir_fd=fd)  # behind dirfd's back
        os.mkdir("d2", dir_fd=fd)
        write(fd, "d2/g", b"g")
    with open(dirfd.short(f"{deep}/d2/g"), "rb") as f:
        assert f.read() == b"g"
    dirfd.clear()


def test_status_diff_reset_of_a_tree_deeper_than_path_max(venvs: Any, wheels: Path) -> None:
    a = venvs("A")
    install(a, wheels)
    with down(site(a), create=True) as fd:
        write(fd, "f.txt", b"deep\n")
        write(fd, "g.txt", b"g\n")
    deep = "/".join([SEG] * DEPTH)
    got = {c["path"]: c["kind"] for g in json.loads(cowfs(
        "status", "--venv", str(a), "--json").stdout)["groups"] for c in g["changes"]}
    assert got == {f"{deep}/f.txt": "added", f"{deep}/g.txt": "added"}
    diff = cowfs("diff", "--venv", str(a)).stdout.splitlines()
    assert f"+++ b/{deep}/f.txt" in diff and "+deep" in diff
    assert "reset 1 change" in cowfs("reset", "--venv", str(a), f"{deep}/g.txt", "-y").stdout
    with down(site(a)) as fd:
        assert sorted(os.listdir(fd)) == ["f.txt"]
    out = cowfs("reset", "--venv", str(a), SEG, "-y").stdout
    assert "reset 1 change" in out
    assert not os.path.lexists(site(a) / SEG)
    assert "no private changes" in cowfs("status", "--venv", str(a)).stdout


def test_dirfd_fails_where_the_full_path_would(tmp_path: Path) -> None:
    """short() itself never raises: the caller's syscall gets the full path's errno."""
    with down(tmp_path, create=True) as fd:
        write(fd, "file", b"f")
    deep = os.path.join(str(tmp_path), *[SEG] * DEPTH)
    for rel, error in [("missing/x", FileNotFoundError), ("file/x", NotADirectoryError),
                       (f"missing/{'/'.join([SEG] * 14)}/x", FileNotFoundError),
                       (f"file/{'/'.join([SEG] * 14)}/x", NotADirectoryError)]:
        name = dirfd.short(f"{deep}/{rel}")
        with pytest.raises(error):
            os.lstat(name)
        with pytest.raises(error):
            os.mkdir(name)
    with pytest.raises(FileNotFoundError):
        os.lstat(dirfd.short(f"{tmp_path}/nowhere/{'/'.join([SEG] * DEPTH)}/x"))
    dirfd.clear()


def test_adopt_keeps_a_user_tree_deeper_than_path_max(tmp_path: Path, wheels: Path) -> None:
    """adopt empties the real site-packages after the swap: a tree its walk missed would be
    lost. Every level, file, symlink and mode must come through the mount."""
    venv = tmp_path / "plain"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    sp = next((venv / "lib").glob("python3*/site-packages"))
    with down(sp, create=True) as fd:
        write(fd, "f.txt", b"deep user data\n")
        os.chmod("f.txt", 0o600, dir_fd=fd)
        os.symlink("f.txt", "link", dir_fd=fd)
        os.mkdir("empty", dir_fd=fd)
        write(fd, "shipped.py", SHIPPED)
    # A distribution whose RECORD names a file down there: it goes into the store.
    deep = "/".join([SEG] * DEPTH)
    info = sp / "deep-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: deep\nVersion: 1.0\n")
    digest = base64.urlsafe_b64encode(hashlib.sha256(SHIPPED).digest()).rstrip(b"=").decode()
    (info / "RECORD").write_text(f"{deep}/shipped.py,sha256={digest},{len(SHIPPED)}\n"
                                 "deep-1.0.dist-info/METADATA,,\ndeep-1.0.dist-info/RECORD,,\n")
    try:
        assert "1 distribution" in cowfs("adopt", str(venv)).stdout
        assert mounting.find_mount(str(sp)) is not None
        stored = Store()
        held = {fe.path: fe for ident in iter_manifests(stored)
                for fe in read_manifest(stored, ident).files}
        assert stored.object_path(held[f"{deep}/shipped.py"].digest).read_bytes() == SHIPPED
        with down(sp) as fd:
            assert read(fd, "shipped.py") == SHIPPED
            assert read(fd, "f.txt") == b"deep user data\n"
            assert stat.S_IMODE(os.stat("f.txt", dir_fd=fd).st_mode) == 0o600
            assert os.readlink("link", dir_fd=fd) == "f.txt"
            assert sorted(os.listdir(fd)) == ["empty", "f.txt", "link", "shipped.py"]
    finally:
        force_unmount(str(sp))


def test_absorb_takes_a_file_deeper_than_path_max_into_the_store(venvs: Any) -> None:
    """What another installer wrote down there is ingested like any file of its RECORD."""
    from tests.wheelbuild import record_row

    venv = venvs("P")
    sp, info = site(venv), "deepd-1.0.dist-info"
    deep = "/".join([SEG] * DEPTH)
    with down(sp, create=True) as fd:
        write(fd, "shipped.py", SHIPPED)
    meta = {f"{info}/METADATA": b"Metadata-Version: 2.1\nName: deepd\nVersion: 1.0\n",
            f"{info}/INSTALLER": b"uv\n"}
    (sp / info).mkdir()
    for path, data in meta.items():
        (sp / path).write_bytes(data)
    rows = [record_row(f"{deep}/shipped.py", SHIPPED)] + [
        record_row(p, d) for p, d in meta.items()] + [f"{info}/RECORD,,"]
    (sp / info / "RECORD").write_text("\n".join(rows) + "\n")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(
            d.startswith("deepd-1.0-adopted-") for d in VenvState.load(venv).dists):
        time.sleep(0.2)
    (ident,) = [d for d in VenvState.load(venv).dists if d.startswith("deepd-1.0-adopted-")]
    entry = {fe.path: fe for fe in read_manifest(Store(), ident).files}[f"{deep}/shipped.py"]
    assert Store().object_path(entry.digest).read_bytes() == SHIPPED
    with down(sp) as fd:
        assert read(fd, "shipped.py") == SHIPPED
    with contextlib.suppress(FileNotFoundError), down(VenvState.load(venv).upper) as fd:
        assert "shipped.py" not in os.listdir(fd)  # private no more
