"""The daemon reaches its layers through held directory handles (cowfs.dirfd), not paths.

Without FUSE: an Overlay keeps working after the directories holding its layers were moved
away (absolute path strings would now name nothing), and layer roots are released with the
objects that hold them (the fd budget stays bounded however many overlays come and go).
"""

from __future__ import annotations

import errno
import gc
import os
from pathlib import Path

import pytest
from conftest import merged, node_at, populate, read

from cowfs import dirfd
from cowfs.overlay import namespace
from cowfs.overlay.inode import NodeTable
from cowfs.overlay.lower import DirLower
from cowfs.overlay.overlay import Overlay
from cowfs.overlay.upper import Upper


def _overlay(base: Path) -> Overlay:
    return Overlay(DirLower([base / "lower"]), Upper(str(base / "upper"), str(base / "work")))


def test_overlay_works_after_its_layer_directories_moved(device_dir: Path) -> None:
    base = device_dir / "layers"
    for d in ("lower", "upper", "work"):
        (base / d).mkdir(parents=True)
    populate(base / "lower")
    ov = _overlay(base)
    moved = device_dir / "moved"
    os.rename(base, moved)  # every absolute path the daemon could have kept is gone now
    assert read(ov, "pkg/main.py").startswith(b"def main")  # a lower file, never looked up
    fh = ov.open(node_at(ov, "top.txt"), os.O_WRONLY)  # copy-up from the lower's handle
    ov.write(fh, 0, b"TOP")
    ov.release(fh)
    namespace.mkdir(ov, node_at(ov, "pkg"), "new", 0o755, 0, 0)
    namespace.unlink(ov, node_at(ov, "pkg"), "__init__.py")  # a whiteout in the upper
    namespace.rename(ov, node_at(ov, "pkg"), "sub", ov.root, "sub2")  # a merged dir moves up
    view = merged(ov)
    assert view["top.txt"][2] == b"TOP\n" and "pkg/new" in view and "sub2/data.bin" in view
    assert "pkg/__init__.py" not in view and "pkg/sub" not in view
    assert (moved / "upper" / "top.txt").read_bytes() == b"TOP\n"  # ...in the moved upper
    assert merged(_overlay(moved)) == view  # and a remount at the new place shows the same
    assert os.listdir(moved / "work") == []


def test_layer_roots_are_released_with_their_overlay(device_dir: Path) -> None:
    base = device_dir / "layers"
    for d in ("lower", "upper", "work"):
        (base / d).mkdir(parents=True)
    populate(base / "lower")
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(120):  # three roots each: 360 fds if they leaked
        assert read(_overlay(base), "top.txt") == b"top\n"
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) - before <= dirfd.CACHE_MAX + dirfd.RETIRED_MAX


def test_short_paths_are_one_call_from_the_root_and_deep_ones_from_a_parent(
        tmp_path: Path) -> None:
    root = dirfd.Root(tmp_path)
    assert root.at("") == (root.fd, ".")
    assert root.at("a/b/c") == (root.fd, "a/b/c")  # the kernel walks only inside the layer
    seg = "s" * 200
    deep = "/".join([seg] * 20)  # ~4 KB: longer than PATH_MAX allows at once
    (tmp_path / "d").mkdir()
    with dirfd.opendir(root.at("d")) as fd:
        for _ in range(20):
            os.mkdir(seg, dir_fd=fd)
            nxt = os.open(seg, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
        fd = os.open(".", os.O_RDONLY, dir_fd=fd)  # (opendir closes what it opened)
    parent_fd, name = root.at(f"d/{deep}/f")
    assert name == "f" and parent_fd != root.fd
    assert os.path.samestat(os.fstat(parent_fd), os.lstat(dirfd.proc((parent_fd, "."))))
    assert dirfd.lexists(root.at(f"d/{deep}/f"))
    os.rename(tmp_path / "d", tmp_path / "e")
    root.forget("d")  # whoever renames a directory says so: no stale handle is used
    assert not dirfd.lexists(root.at(f"d/{deep}/f"))
    assert dirfd.lexists(root.at(f"e/{deep}/f"))
    dirfd.clear()


def test_a_removed_node_has_no_path_enoent_not_an_errno_less_error() -> None:
    """A listing racing a reset asks for a node just removed: its path lookup raised
    FileNotFoundError without an errno, which the FUSE layer turned into EIO."""
    table = NodeTable(None)
    gone = table.new(table.root, "d", None, upper=True)
    gone.nlookup = 1  # the kernel still knows it
    table.unlink(table.root, "d")
    with pytest.raises(FileNotFoundError) as err:
        table.path(gone)
    assert err.value.errno == errno.ENOENT
