"""Overlay + namespace semantics on plain directories, without FUSE.

Every test builds `Overlay(DirLower([lower]), Upper(upper, work))` over a populated lower and
drives it through the same calls the FUSE adapter makes. Two invariants are checked after
every test by the `ovl` fixture: the lower tree is byte-for-byte (and metadata-) identical to
before, and a fresh Overlay over the same upper (a "remount") shows the same merged tree, so
nothing lives only in the daemon's memory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import fingerprint, merged, node_at, populate, read, real_tree

from cowfs.overlay import copy_up, meta as meta_module, namespace, upper as upper_module
from cowfs.overlay.inode import Node
from cowfs.overlay.lower import DirLower, ManifestLower
from cowfs.overlay.overlay import Overlay
from cowfs.overlay.upper import (
    OPAQUE_XATTR,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    WHITEOUT_XATTR,
    Upper,
)
from cowfs.store.manifest import FileEntry, Manifest
from cowfs.store.store import Store

RENAME_WHITEOUT = 4
NOBODY = 65534

# -- helpers ------------------------------------------------------------------------------


def split(ov: Overlay, path: str) -> tuple[Node, str]:
    parent, _, name = path.rpartition("/")
    return node_at(ov, parent), name


def write(ov: Overlay, path: str, data: bytes, offset: int = 0) -> None:
    fh = ov.open(node_at(ov, path), os.O_WRONLY)
    try:
        ov.write(fh, offset, data)
    finally:
        ov.release(fh)


def create(ov: Overlay, path: str, data: bytes = b"", mode: int = 0o644) -> Node:
    parent, name = split(ov, path)
    node, fh = namespace.create(ov, parent, name, mode, os.O_WRONLY | os.O_CREAT, 0, 0)
    ov.write(fh, 0, data)
    ov.release(fh)
    return node


def rename(ov: Overlay, old: str, new: str, flags: int = 0) -> None:
    p1, n1 = split(ov, old)
    p2, n2 = split(ov, new)
    namespace.rename(ov, p1, n1, p2, n2, flags)


def unlink(ov: Overlay, path: str) -> None:
    namespace.unlink(ov, *split(ov, path))


def rmdir(ov: Overlay, path: str) -> None:
    namespace.rmdir(ov, *split(ov, path))


def mkdir(ov: Overlay, path: str, mode: int = 0o755) -> Node:
    parent, name = split(ov, path)
    return namespace.mkdir(ov, parent, name, mode, 0, 0)


@dataclass
class Layers:
    lower: Path
    upper: Path
    work: Path

    def overlay(self) -> Overlay:
        return Overlay(DirLower([self.lower]), Upper(str(self.upper), str(self.work)))


@pytest.fixture
def layers(device_dir: Path) -> Iterator[Layers]:  # the upper may hold 0/0 device whiteouts
    lower, upper, work = device_dir / "lower", device_dir / "upper", device_dir / "work"
    lower.mkdir()
    upper.mkdir()
    populate(lower)
    os.setxattr(lower / "top.txt", "user.origin", b"lower")
    os.setxattr(lower / "pkg", "user.dirattr", b"d")
    before = fingerprint(lower)
    yield Layers(lower, upper, work)
    assert fingerprint(lower) == before, "the lower tree was modified"


@pytest.fixture
def ov(layers: Layers) -> Iterator[Overlay]:
    overlay = layers.overlay()
    yield overlay
    for fh in list(overlay.handles):
        overlay.release(fh)
    assert os.listdir(layers.work) == [], "copy-up or whiteout garbage left in the work dir"
    assert merged(layers.overlay()) == merged(overlay), "a remount shows another tree"


# -- lookups through markers --------------------------------------------------------------


def test_fresh_overlay_is_the_lower(ov: Overlay, layers: Layers) -> None:
    assert merged(ov) == real_tree(layers.lower)
    assert ov.getattr(node_at(ov, "pkg")).nlink == 4  # ., .., sub, empty
    assert ov.getattr(node_at(ov, "top.txt")).nlink == 1


def test_upper_markers_hide_lower_entries(layers: Layers) -> None:
    up = layers.upper
    (up / "top.txt").touch()
    os.setxattr(up / "top.txt", WHITEOUT_XATTR, b"y")  # xattr whiteout
    os.mknod(up / "tool.sh", stat.S_IFCHR | 0o600, 0)  # classic 0/0 device whiteout
    (up / "pkg").mkdir()
    os.setxattr(up / "pkg", OPAQUE_XATTR, b"y")
    (up / "pkg" / "new.py").write_text("new\n")
    ov = layers.overlay()
    assert ov.lookup(ov.root, "top.txt") is None
    assert ov.lookup(ov.root, "tool.sh") is None
    assert sorted(ov.listdir(ov.root)) == ["pkg"]
    assert ov.listdir(node_at(ov, "pkg")) == ["new.py"]
    assert ov.lookup(node_at(ov, "pkg"), "main.py") is None
    assert ov.getattr(node_at(ov, "pkg")).nlink == 2
    assert ov.getattr(ov.root).nlink == 3


def test_lower_layer_whiteouts_and_opaque_dirs(tmp_path: Path) -> None:
    bottom, top = tmp_path / "bottom", tmp_path / "top"
    bottom.mkdir()
    populate(bottom)
    (top / "pkg" / "sub").mkdir(parents=True)
    (top / "pkg" / "main.py").touch()
    os.setxattr(top / "pkg" / "main.py", WHITEOUT_XATTR, b"y")
    os.setxattr(top / "pkg" / "sub", OPAQUE_XATTR, b"y")
    (top / "pkg" / "sub" / "only.txt").write_text("top layer\n")
    (top / "top.txt").mkdir()  # a directory above a file hides the file
    (tmp_path / "u").mkdir()
    ov = Overlay(DirLower([top, bottom]), Upper(str(tmp_path / "u"), str(tmp_path / "w")))
    view = merged(ov)
    assert "pkg/main.py" not in view and "pkg/__init__.py" in view
    assert [k for k in view if k.startswith("pkg/sub/")] == ["pkg/sub/only.txt"]
    assert view["top.txt"][0] == "d"
    # Deleting a name that only a lower layer provides leaves a whiteout in the upper dir.
    unlink(ov, "pkg/__init__.py")
    ov2 = Overlay(DirLower([top, bottom]), Upper(str(tmp_path / "u"), str(tmp_path / "w")))
    assert "pkg/__init__.py" not in merged(ov2)


def test_name_too_long(ov: Overlay) -> None:
    with pytest.raises(OSError) as exc:
        ov.lookup(ov.root, "x" * 256)
    assert exc.value.errno == errno.ENAMETOOLONG
    assert ov.lookup(ov.root, "x" * 255) is None


# -- copy-up ------------------------------------------------------------------------------


def test_copy_up_keeps_metadata_and_work_dir_empty(ov: Overlay, layers: Layers) -> None:
    low = (layers.lower / "pkg" / "sub").stat()
    write(ov, "pkg/sub/data.bin", b"XY", 10)
    data = read(ov, "pkg/sub/data.bin")
    assert data[:10] == (bytes(range(256)) * 64)[:10] and data[10:12] == b"XY"
    assert len(data) == 256 * 64
    st = (layers.upper / "pkg" / "sub").stat()
    assert (st.st_mode, st.st_mtime_ns) == (low.st_mode, low.st_mtime_ns)
    assert os.listdir(layers.work) == []
    # The symlink copies up as a symlink (lutimes must not follow it).
    namespace_node = node_at(ov, "pkg/link")
    ov.setattr(namespace_node, None, atime_ns=10**18, mtime_ns=10**18)
    assert os.readlink(layers.upper / "pkg" / "link") == "main.py"
    assert (layers.upper / "pkg" / "link").lstat().st_mtime_ns == 10**18
    assert (layers.upper / "pkg" / "main.py").exists() is False


def test_copy_up_keeps_xattrs_of_files_and_dirs(ov: Overlay, layers: Layers) -> None:
    assert ov.getxattr(node_at(ov, "pkg"), "user.dirattr") == b"d"
    assert ov.getxattr(node_at(ov, "top.txt"), "user.origin") == b"lower"
    write(ov, "top.txt", b"T")
    ov.setattr(node_at(ov, "pkg"), None, mode=0o700)
    assert os.getxattr(layers.upper / "top.txt", "user.origin") == b"lower"
    assert os.getxattr(layers.upper / "pkg", "user.dirattr") == b"d"
    assert "user.dirattr" in ov.listxattr(node_at(ov, "pkg"))


def test_failed_copy_up_changes_nothing(ov: Overlay, layers: Layers,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: object) -> None:
        raise OSError(errno.ENOSPC, "no space")

    with monkeypatch.context() as m, pytest.raises(OSError):  # (not undo(): see test_adopt)
        m.setattr(copy_up, "copy_fd_data", boom)
        write(ov, "pkg/sub/data.bin", b"x")
    assert not (layers.upper / "pkg" / "sub" / "data.bin").exists()
    assert not node_at(ov, "pkg/sub/data.bin").upper
    assert read(ov, "pkg/sub/data.bin") == bytes(range(256)) * 64


def test_copy_up_does_not_touch_parent_times(ov: Overlay) -> None:
    """Copy-up is invisible: the parents' mtimes stay what the user saw (overlayfs does so)."""
    pkg = node_at(ov, "pkg")
    ov.setattr(pkg, None, atime_ns=10**18, mtime_ns=2 * 10**18)
    root_mtime = ov.getattr(ov.root).mtime_ns
    write(ov, "pkg/sub/data.bin", b"x")
    ov.setattr(node_at(ov, "pkg/main.py"), None, mode=0o600)
    assert ov.getattr(pkg).mtime_ns == 2 * 10**18
    write(ov, "top.txt", b"x")
    assert ov.getattr(ov.root).mtime_ns == root_mtime


def test_stale_work_dir_garbage_is_cleaned(layers: Layers) -> None:
    layers.work.mkdir()
    (layers.work / uuid.uuid4().hex).write_bytes(b"x" * 100)  # a half-copied file
    (layers.work / uuid.uuid4().hex / "deep").mkdir(parents=True)  # a half-copied tree
    (layers.work / "users-own-file").write_text("not ours to delete")
    ov = layers.overlay()
    assert os.listdir(layers.work) == ["users-own-file"]
    (layers.work / "users-own-file").unlink()
    assert merged(ov) == real_tree(layers.lower)


def test_handle_opened_before_copy_up_reads_new_data(ov: Overlay) -> None:
    node = node_at(ov, "top.txt")
    ro = ov.open(node, os.O_RDONLY)
    assert ov.read(ro, 0, 100) == b"top\n"
    write(ov, "top.txt", b"TOP!\nmore\n")
    assert ov.read(ro, 0, 100) == b"TOP!\nmore\n"
    ov.setattr(node, None, size=2)
    assert ov.read(ro, 0, 100) == b"TO"
    ov.release(ro)
    ro2 = ov.open(node_at(ov, "pkg/main.py"), os.O_RDONLY)
    ov.setattr(node_at(ov, "pkg/main.py"), None, size=0)  # copy-up without data
    assert ov.read(ro2, 0, 100) == b""


def test_open_for_write_never_opens_lower(ov: Overlay, layers: Layers) -> None:
    fh = ov.open(node_at(ov, "tool.sh"), os.O_RDWR | os.O_TRUNC)
    assert ov.read(fh, 0, 10) == b""
    ov.write(fh, 0, b"#!/bin/sh\n")
    ov.release(fh)
    assert (layers.upper / "tool.sh").read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE((layers.upper / "tool.sh").stat().st_mode) == 0o755


# -- namespace ------------------------------------------------------------------------------


def test_unlink_then_recreate_over_whiteout(ov: Overlay, layers: Layers) -> None:
    ino = node_at(ov, "top.txt").ino
    unlink(ov, "top.txt")
    assert ov.lookup(ov.root, "top.txt") is None
    assert "top.txt" not in ov.listdir(ov.root)
    assert merged(layers.overlay()).get("top.txt") is None
    node = create(ov, "top.txt", b"new\n", 0o600)
    assert node.ino != ino
    assert read(ov, "top.txt") == b"new\n"
    assert merged(layers.overlay())["top.txt"] == ("f", 0o600, b"new\n")
    unlink(ov, "top.txt")
    assert "top.txt" not in merged(layers.overlay())


def test_mkdir_over_whiteout_is_opaque(ov: Overlay, layers: Layers) -> None:
    with pytest.raises(OSError) as exc:
        rmdir(ov, "pkg/sub")
    assert exc.value.errno == errno.ENOTEMPTY
    unlink(ov, "pkg/sub/data.bin")
    rmdir(ov, "pkg/sub")
    assert ov.getattr(node_at(ov, "pkg")).nlink == 3
    mkdir(ov, "pkg/sub", 0o750)
    assert ov.listdir(node_at(ov, "pkg/sub")) == []
    assert ov.getattr(node_at(ov, "pkg/sub")).nlink == 2
    assert ov.getattr(node_at(ov, "pkg")).nlink == 4
    view = merged(layers.overlay())
    assert view["pkg/sub"] == ("d", 0o750)
    assert not [k for k in view if k.startswith("pkg/sub/")]


def test_rmdir_of_merged_empty_dir_and_whiteouts_inside(ov: Overlay) -> None:
    unlink(ov, "pkg/sub/data.bin")  # pkg/sub now holds only a whiteout in the upper
    rmdir(ov, "pkg/sub")
    rmdir(ov, "pkg/empty")  # lower-only empty dir: just a whiteout
    assert sorted(ov.listdir(node_at(ov, "pkg"))) == ["__init__.py", "link", "main.py"]


def test_rename_file_across_layers(ov: Overlay, layers: Layers) -> None:
    ino = node_at(ov, "pkg/main.py").ino
    rename(ov, "pkg/main.py", "moved.py")
    assert node_at(ov, "moved.py").ino == ino
    assert read(ov, "moved.py") == b"def main():\n    return 'moo'\n"
    assert ov.lookup(node_at(ov, "pkg"), "main.py") is None
    # Over existing targets: lower over lower, upper over lower, lower over upper.
    ino = node_at(ov, "top.txt").ino
    rename(ov, "top.txt", "tool.sh")
    assert node_at(ov, "tool.sh").ino == ino and read(ov, "tool.sh") == b"top\n"
    create(ov, "fresh", b"fresh")
    rename(ov, "fresh", "pkg/__init__.py")
    assert read(ov, "pkg/__init__.py") == b"fresh"
    rename(ov, "pkg/sub/data.bin", "moved.py")
    assert len(read(ov, "moved.py")) == 256 * 64
    assert sorted(ov.listdir(ov.root)) == ["moved.py", "pkg", "tool.sh"]
    assert ov.getattr(node_at(ov, "tool.sh")).nlink == 1


def test_rename_directory_across_layers(ov: Overlay, layers: Layers) -> None:
    inos = {p: node_at(ov, p).ino for p in ("pkg", "pkg/sub", "pkg/sub/data.bin")}
    unlink(ov, "pkg/__init__.py")  # a whiteout inside the renamed tree must stay effective
    create(ov, "pkg/sub/new.txt", b"n")
    rename(ov, "pkg", "lib")
    assert ov.lookup(ov.root, "pkg") is None
    assert node_at(ov, "lib").ino == inos["pkg"]
    assert node_at(ov, "lib/sub/data.bin").ino == inos["pkg/sub/data.bin"]
    assert sorted(ov.listdir(node_at(ov, "lib"))) == ["empty", "link", "main.py", "sub"]
    assert read(ov, "lib/sub/new.txt") == b"n"
    assert ov.readlink(node_at(ov, "lib/link")) == "main.py"
    # Back onto the old (now whited-out) name: the lower pkg must not merge in again.
    rename(ov, "lib", "pkg")
    assert "__init__.py" not in ov.listdir(node_at(ov, "pkg"))
    assert node_at(ov, "pkg/sub").ino == inos["pkg/sub"]


def test_rename_directory_over_existing_targets(ov: Overlay) -> None:
    rename(ov, "pkg/sub", "pkg/empty")  # over an empty lower dir
    assert ov.listdir(node_at(ov, "pkg/empty")) == ["data.bin"]
    assert ov.lookup(node_at(ov, "pkg"), "sub") is None
    mkdir(ov, "d1")
    create(ov, "d1/f", b"1")
    mkdir(ov, "d2")
    for src, dst, code in (("d1", "pkg", errno.ENOTEMPTY), ("d1", "top.txt", errno.ENOTDIR),
                           ("top.txt", "d2", errno.EISDIR)):
        with pytest.raises(OSError) as exc:
            rename(ov, src, dst)
        assert exc.value.errno == code, (src, dst)
    rename(ov, "d1", "d2")  # over an empty upper dir
    assert read(ov, "d2/f") == b"1"
    assert ov.getattr(ov.root).nlink == 2 + 2


def test_rename_noreplace_exchange_and_bad_flags(ov: Overlay) -> None:
    with pytest.raises(OSError) as exc:
        rename(ov, "top.txt", "tool.sh", RENAME_NOREPLACE)
    assert exc.value.errno == errno.EEXIST
    rename(ov, "top.txt", "new.txt", RENAME_NOREPLACE)
    a, b = node_at(ov, "new.txt").ino, node_at(ov, "pkg").ino
    rename(ov, "new.txt", "pkg", RENAME_EXCHANGE)  # a lower file with a lower dir
    assert node_at(ov, "new.txt").ino == b and node_at(ov, "pkg").ino == a
    assert read(ov, "pkg") == b"top\n"
    assert "__init__.py" in ov.listdir(node_at(ov, "new.txt"))
    with pytest.raises(OSError) as exc:
        rename(ov, "pkg", "missing", RENAME_EXCHANGE)
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(OSError) as exc:
        rename(ov, "pkg", "other", RENAME_WHITEOUT)
    assert exc.value.errno == errno.EINVAL


def test_hard_links(ov: Overlay, layers: Layers) -> None:
    node = node_at(ov, "pkg/main.py")
    namespace.link(ov, node, ov.root, "hard.py")
    assert node_at(ov, "hard.py") is node
    assert ov.getattr(node).nlink == 2
    write(ov, "hard.py", b"X")
    assert read(ov, "pkg/main.py").startswith(b"Xef")
    ov2 = layers.overlay()
    a, b = node_at(ov2, "hard.py"), node_at(ov2, "pkg/main.py")
    assert a is b and ov2.getattr(a).nlink == 2
    unlink(ov, "pkg/main.py")
    assert ov.getattr(node).nlink == 1
    assert ov.lookup(node_at(ov, "pkg"), "main.py") is None
    with pytest.raises(OSError) as exc:
        namespace.link(ov, node_at(ov, "pkg"), ov.root, "dirlink")
    assert exc.value.errno == errno.EPERM
    with pytest.raises(OSError) as exc:
        namespace.link(ov, node, ov.root, "top.txt")
    assert exc.value.errno == errno.EEXIST


def test_stale_hard_link_map_entry_does_not_alias(ov: Overlay, layers: Layers) -> None:
    """Upper inode numbers are reused: a map entry for a gone inode must not merge files."""
    (layers.upper / "x").write_text("x")
    os.link(layers.upper / "x", layers.upper / "y")
    st = os.lstat(layers.upper / "x")
    other = node_at(ov, "pkg/main.py")
    write(ov, "pkg/main.py", b"copied up")
    ov.table.by_upper_id[(st.st_dev, st.st_ino)] = other  # as if left from a reset
    x = node_at(ov, "x")
    assert x is not other and node_at(ov, "y") is x
    assert ov.getattr(x).nlink == 2 and read(ov, "y") == b"x"


def test_inode_numbers_follow_the_file(ov: Overlay) -> None:
    before = {p: node_at(ov, p).ino for p in ("pkg", "pkg/sub", "pkg/sub/data.bin", "top.txt")}
    write(ov, "pkg/sub/data.bin", b"x")
    ov.setattr(node_at(ov, "top.txt"), None, mode=0o600)
    assert {p: node_at(ov, p).ino for p in before} == before
    rename(ov, "pkg/sub", "sub2")
    assert node_at(ov, "sub2/data.bin").ino == before["pkg/sub/data.bin"]
    assert len({n.ino for n in ov.table.by_ino.values()}) == len(ov.table.by_ino)


def test_unlinked_open_file_stays_readable(ov: Overlay) -> None:
    fh = ov.open(node_at(ov, "pkg/main.py"), os.O_RDONLY)
    node = ov.handles[fh].node
    unlink(ov, "pkg/main.py")
    assert ov.read(fh, 0, 3) == b"def"
    assert ov.getattr(node).nlink == 0
    ov.release(fh)
    wfh = ov.open(node_at(ov, "top.txt"), os.O_RDWR)
    node = ov.handles[wfh].node
    unlink(ov, "top.txt")
    ov.write(wfh, 0, b"gone")
    assert ov.read(wfh, 0, 4) == b"gone" and ov.getattr(node).nlink == 0
    ov.setattr(node, wfh, size=1)
    assert ov.getattr(node).size == 1


def test_create_mkdir_symlink_mknod(ov: Overlay, layers: Layers) -> None:
    parent = node_at(ov, "pkg/sub")
    _, fh = namespace.create(ov, parent, "ro.txt", 0o444, os.O_RDWR | os.O_CREAT, 0, 0)
    assert ov.write(fh, 0, b"ro") == 2  # POSIX: the creating open may write a 0444 file
    ov.release(fh)
    namespace.symlink(ov, parent, "sl", "../main.py", 0, 0)
    namespace.mknod(ov, parent, "fifo", stat.S_IFIFO | 0o640, 0, 0, 0)
    with pytest.raises(OSError) as exc:
        namespace.mkdir(ov, parent, "data.bin", 0o755, 0, 0)
    assert exc.value.errno == errno.EEXIST
    view = merged(ov)
    assert view["pkg/sub/ro.txt"] == ("f", 0o444, b"ro")
    assert view["pkg/sub/sl"] == ("l", "../main.py")
    assert stat.S_ISFIFO(ov.getattr(node_at(ov, "pkg/sub/fifo")).mode)


def test_private_xattrs_are_hidden(ov: Overlay) -> None:
    unlink(ov, "pkg/main.py")  # marks upper pkg with user.overlay.opaque=x
    pkg = node_at(ov, "pkg")
    assert not [n for n in ov.listxattr(pkg) if n.startswith("user.overlay.")]
    for name in (OPAQUE_XATTR, WHITEOUT_XATTR):
        with pytest.raises(OSError) as exc:
            ov.getxattr(pkg, name)
        assert exc.value.errno == errno.ENODATA
        with pytest.raises(OSError) as exc:
            ov.setxattr(node_at(ov, "top.txt"), name, b"y")
        assert exc.value.errno == errno.EPERM
    assert not node_at(ov, "top.txt").upper


@contextlib.contextmanager
def as_unprivileged_daemon(build: Callable[[Path], None],
                           act: Callable[[Overlay], None]) -> Iterator[Path]:
    """Run act(overlay) in a child that is not root (a user's own mount); its dirs are made
    by build(lower) as root and then handed to that user. Yields the base dir, removed
    afterwards whatever happened."""
    base = Path(tempfile.mkdtemp(prefix="cowfs-unpriv-"))
    try:
        for d in ("lower", "upper", "work"):
            (base / d).mkdir()
        build(base / "lower")
        os.chmod(base, 0o755)
        for dirpath, dirs, files in os.walk(base):
            for name in ["", *dirs, *files]:
                os.chown(os.path.join(dirpath, name), NOBODY, NOBODY, follow_symlinks=False)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit code
            code = 1
            try:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                for module in (copy_up, namespace, upper_module, meta_module):  # at import
                    module.IS_ROOT = False  # type: ignore[attr-defined]
                act(Overlay(DirLower([base / "lower"]),
                            Upper(str(base / "upper"), str(base / "work"))))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged daemon failed"
        yield base
    finally:
        for dirpath, dirs, _ in os.walk(base):
            for d in dirs:
                os.chmod(os.path.join(dirpath, d), 0o755)
        shutil.rmtree(base)


def test_create_read_only_file_as_unprivileged_daemon() -> None:
    """POSIX: the open that creates a 0444 file may write it; a re-open would be refused."""
    def act(ov: Overlay) -> None:
        _, fh = namespace.create(ov, ov.root, "f", 0o444, os.O_RDWR | os.O_CREAT,
                                 NOBODY, NOBODY)
        assert ov.write(fh, 0, b"x") == 1

    with as_unprivileged_daemon(lambda lower: None, act) as base:
        assert (base / "upper" / "f").read_bytes() == b"x"


def test_read_only_lower_dirs_as_unprivileged_daemon() -> None:
    """The owner may edit a file in a 0555 directory; copy-up must manage that too, and
    mkdir/rename/rmdir must not trip over the mode copied from the lower."""
    def build(lower: Path) -> None:
        (lower / "ro" / "deep").mkdir(parents=True)
        (lower / "ro" / "f.txt").write_text("f")
        (lower / "ro" / "deep" / "g.txt").write_text("g")
        (lower / "gone").mkdir()
        for d in (lower / "ro" / "deep", lower / "ro"):
            d.chmod(0o555)

    def act(ov: Overlay) -> None:
        write(ov, "ro/f.txt", b"F")  # copy-up of ro, then of f.txt into the 0555 copy
        write(ov, "ro/deep/g.txt", b"G")
        rmdir(ov, "gone")
        mkdir(ov, "gone", 0o555)  # over a whiteout: opaque, then the final mode
        rename(ov, "ro", "ro2")  # materialised and marked opaque despite 0555
        assert merged(ov)["ro2/deep/g.txt"] == ("f", 0o644, b"G")

    with as_unprivileged_daemon(build, act) as base:
        up = base / "upper"
        assert (up / "ro2" / "f.txt").read_bytes() == b"F"
        assert stat.S_IMODE((up / "ro2").stat().st_mode) == 0o555
        assert stat.S_IMODE((up / "ro2" / "deep").stat().st_mode) == 0o555
        assert stat.S_IMODE((up / "gone").stat().st_mode) == 0o555
        assert os.listdir(base / "work") == []
        ov = Overlay(DirLower([base / "lower"]), Upper(str(up), str(base / "work")))
        assert "ro" not in ov.listdir(ov.root) and ov.listdir(node_at(ov, "gone")) == []


# -- manifest-backed lower ------------------------------------------------------------------


def test_manifest_lower_from_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "store").ensure()
    blobs = {"a": b"alpha\n", "b": b"beta\n" * 100, "c": b"#!/bin/sh\n"}
    digests = {k: store.put_bytes(v) for k, v in blobs.items()}

    def fe(path: str, key: str, mode: int = 0o644) -> FileEntry:
        return FileEntry(path, digests[key], len(blobs[key]), mode)

    m1 = Manifest("one-1.0", "one", "1.0", files=(fe("one/__init__.py", "a"),
                                            fe("one/data/x.bin", "b"), fe("shared.py", "a")),
                  mtime_ns=1_700_000_000 * 10**9)
    m2 = Manifest("two-2.0", "two", "2.0", files=(fe("two/run", "c", 0o755), fe("shared.py", "b")))
    extra = [fe("one-1.0.dist-info/REQUESTED", "a")]
    lower = ManifestLower.from_manifests(store.objects, [m1, m2], extra=extra)
    objects_before = fingerprint(store.objects)
    (tmp_path / "u").mkdir()
    ov = Overlay(lower, Upper(str(tmp_path / "u"), str(tmp_path / "w")))
    view = merged(ov)
    assert view["shared.py"] == ("f", 0o644, blobs["b"])  # the later manifest wins
    assert view["two/run"] == ("f", 0o755, blobs["c"])
    assert view["one/data"] == ("d", 0o755)
    assert "one-1.0.dist-info/REQUESTED" in view
    assert ov.getattr(node_at(ov, "one/data/x.bin")).mtime_ns == 1_700_000_000 * 10**9
    assert ov.getattr(node_at(ov, "one")).nlink == 3
    write(ov, "one/__init__.py", b"ALPHA")
    rename(ov, "one", "uno")
    unlink(ov, "shared.py")
    assert read(ov, "uno/__init__.py") == b"ALPHA\n"
    assert fingerprint(store.objects) == objects_before
    ov2 = Overlay(ManifestLower.from_manifests(store.objects, [m1, m2], extra=extra),
                  Upper(str(tmp_path / "u"), str(tmp_path / "w")))
    assert merged(ov2) == merged(ov)  # everything persisted in the upper dir


def test_manifest_lower_build_time_for_12k_files(tmp_path: Path) -> None:
    digest = "0" * 32
    manifests = []
    for d in range(60):
        files = tuple(FileEntry(f"dist{d}/mod{m}/file{f}.py", digest, 100 + f, 0o644)
                      for m in range(20) for f in range(10))
        manifests.append(Manifest(f"dist{d}-1.0", f"dist{d}", "1.0", files=files))
    t0 = time.perf_counter()
    lower = ManifestLower.from_manifests(tmp_path, manifests)
    elapsed = time.perf_counter() - t0
    print(f"\nManifestLower: {len(lower)} entries built in {elapsed * 1000:.1f} ms")
    assert len(lower) == 12000 + 60 * 21
    assert lower.subdir_count("dist7") == 20 and len(lower.listdir("dist7/mod3")) == 10
    assert elapsed < 0.5


