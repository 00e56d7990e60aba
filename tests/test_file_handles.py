"""The daemon's file handle numbers stay below the bits the passthrough replies put above them
(cowfs.fuse.passthrough: FAST_FH marks an open the C reader counts): they wrap, skipping any still
open, instead of growing into those bits after 2^31 opens."""

from __future__ import annotations

import os

from cowfs.fuse.passthrough import FAST_FH, FH_MASK
from cowfs.overlay import overlay as overlay_mod
from cowfs.overlay.overlay import Overlay
from tests import test_overlay_core
from tests.test_overlay_core import Layers

layers, ov = test_overlay_core.layers, test_overlay_core.ov  # its fixtures, used here too


def test_handle_numbers_wrap_below_the_passthrough_bits(ov: Overlay, layers: Layers) -> None:
    assert overlay_mod.MAX_FH <= FH_MASK < FAST_FH
    node = ov.child(ov.child(ov.root, "pkg"), "main.py")
    ov._next_fh = overlay_mod.MAX_FH - 1
    held = [ov.open(node, os.O_RDONLY) for _ in range(2)]
    assert held == [overlay_mod.MAX_FH - 1, overlay_mod.MAX_FH]
    ov._next_fh = overlay_mod.MAX_FH - 1  # wrapped around onto handles still open
    again = [ov.open(node, os.O_RDONLY) for _ in range(2)]
    assert again == [1, 2] and all(fh & FAST_FH == 0 for fh in held + again)
    assert all(ov.read(fh, 0, 100) == ov.read(held[0], 0, 100) for fh in again)
    for fh in held + again:
        ov.release(fh)
