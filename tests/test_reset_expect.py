"""absorb's conditional reset (cowfs.overlay.reset with expectations): the daemon drops an upper
entry only while it is what `cowfs adopt` examined, because pip or uv may write the next
version between adopt's look and the reset (seen: uv's upgrade lost the files it had just
written into a directory that adopt's reset then removed)."""

from __future__ import annotations

import os
from pathlib import Path

from cowfs.overlay.overlay import Overlay
from cowfs.overlay.reset import ABSENT, DIR, reset_paths, upper_identity
from tests import test_overlay_core
from tests.test_overlay_core import Layers, write

layers, ov = test_overlay_core.layers, test_overlay_core.ov  # its fixtures, used here too


def test_a_changed_entry_is_kept_an_unchanged_one_dropped(ov: Overlay, layers: Layers) -> None:
    write(ov, "pkg/main.py", b"# edited\n")
    write(ov, "top.txt", b"new top\n")
    seen = {p: upper_identity(layers.upper, p) for p in ("pkg/main.py", "top.txt")}
    assert isinstance(seen["top.txt"], list)
    write(ov, "top.txt", b"newer, and longer, top\n")  # written again after the look
    _, removed = reset_paths(ov, ["pkg/main.py", "top.txt"], seen)
    assert removed == ["pkg/main.py"]
    assert (layers.upper / "top.txt").read_bytes() == b"newer, and longer, top\n"
    assert not (layers.upper / "pkg" / "main.py").exists()


def test_absent_means_absent_and_a_directory_goes_only_once_empty(
        ov: Overlay, layers: Layers) -> None:
    write(ov, "pkg/sub/data.bin", b"mine")  # copies pkg/ and pkg/sub/ up
    assert str(upper_identity(layers.upper, "pkg/sub")).startswith(f"{DIR}:")
    assert upper_identity(layers.upper, "nothing/here") == ABSENT
    (layers.upper / "late.txt").write_text("written after the look\n")
    _, removed = reset_paths(ov, ["late.txt", "pkg/sub", "pkg"],
                             {"late.txt": ABSENT, "pkg/sub": DIR, "pkg": DIR})
    assert removed == [] and (layers.upper / "late.txt").exists()
    assert (layers.upper / "pkg" / "sub" / "data.bin").read_bytes().startswith(b"mine")
    seen = upper_identity(layers.upper, "pkg/sub/data.bin")
    _, removed = reset_paths(ov, ["pkg/sub/data.bin", "pkg/sub", "pkg"],
                             {"pkg/sub/data.bin": seen, "pkg/sub": DIR, "pkg": DIR})
    assert removed == ["pkg/sub/data.bin", "pkg/sub", "pkg"]  # children first, then empty
    assert not (layers.upper / "pkg").exists()
    assert Path(layers.lower / "pkg" / "sub" / "data.bin").read_bytes() == \
        bytes(range(256)) * 64
    assert os.listdir(layers.upper) == ["late.txt"]


def test_a_directory_made_again_after_the_look_is_kept(ov: Overlay, layers: Layers) -> None:
    """uv's upgrade removes pkg/ and makes it again, then fills it: an absorb that examined
    the old pkg/ must not drop the new one while it is still empty (uv then failed with
    ENOENT creating its temporary file in it). Even with the old inode number reused."""
    write(ov, "pkg/sub/data.bin", b"mine")
    seen = {p: upper_identity(layers.upper, p) for p in ("pkg/sub/data.bin", "pkg/sub", "pkg")}
    sub = layers.upper / "pkg" / "sub"
    (sub / "data.bin").unlink()
    sub.rmdir()
    sub.mkdir()  # the next version's directory, empty for now
    _, removed = reset_paths(ov, ["pkg/sub/data.bin", "pkg/sub", "pkg"], seen)
    assert removed == [] and sub.is_dir()
    # The directory examined, emptied meanwhile: it goes.
    seen["pkg/sub"] = upper_identity(layers.upper, "pkg/sub")
    _, removed = reset_paths(ov, ["pkg/sub"], seen)
    assert removed == ["pkg/sub"]

