"""Absorb of what another installer writes into a mounted venv, in the order uv writes it.

uv copies a distribution's whole tree from its cache, the dist-info (RECORD included)
possibly before the package's files: absorb must wait for the files, never take half.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from cowfs.fuse.daemon import ABSORB_QUIET_S
from cowfs.mount.spec import VenvState
from cowfs.store.manifest import read_manifest
from cowfs.store.store import Store
from tests.conftest import cowfs, install, site, upper_files
from tests.wheelbuild import record_row

FILES = {"slow/__init__.py": b"from .part import VALUE\n", "slow/part.py": b"VALUE = 42\n"}
INFO = "slow-1.0.dist-info"


def _wait_for(pred: Callable[[], bool], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.1)
    return pred()


def test_a_distribution_whose_files_arrive_after_its_record_is_absorbed_whole(
        venvs: Callable[[str], Path]) -> None:
    venv = venvs("P")
    sp = site(venv)
    meta = {f"{INFO}/METADATA": b"Metadata-Version: 2.1\nName: slow\nVersion: 1.0\n",
            f"{INFO}/INSTALLER": b"uv\n"}
    rows = [record_row(p, d) for p, d in {**FILES, **meta}.items()] + [f"{INFO}/RECORD,,"]
    (sp / INFO).mkdir()
    for path, data in meta.items():
        (sp / path).write_bytes(data)
    (sp / INFO / "RECORD").write_text("\n".join(rows) + "\n")  # first, as uv may
    time.sleep(2.5)  # the daemon's absorb runs now and finds the files missing
    assert any(p.startswith(INFO) for p in upper_files(venv))  # not taken half
    (sp / "slow").mkdir()
    for path, data in FILES.items():
        (sp / path).write_bytes(data)
    assert _wait_for(lambda: upper_files(venv) == []), upper_files(venv)
    state = VenvState.load(venv)
    (ident,) = [d for d in state.dists if d.startswith("slow-1.0-adopted-")]
    paths = {fe.path for fe in read_manifest(Store(), ident).files}
    assert set(FILES) <= paths
    assert (sp / "slow" / "part.py").read_bytes() == FILES["slow/part.py"]


def test_a_removal_that_pauses_after_record_keeps_the_rest_until_it_is_done(
        venvs: Callable[[str], Path], wheels: Path) -> None:
    """uv removes RECORD first, then the files. Absorb used to take a missing RECORD for
    "uninstalled" and drop the whole distribution from the lower layer: the remover, paused
    past the quiet second under load, then failed on files gone from under it (EIO in CI),
    and deleting RECORD alone made a package vanish. Now the distribution stays until the
    removal is done, and is then recorded as gone."""
    venv = venvs("P")
    install(venv, wheels)
    sp = site(venv)
    (info,) = [d for d in os.listdir(sp) if d.startswith("pycowsay-")]
    rows = (sp / info / "RECORD").read_text().splitlines()
    files = [r.split(",")[0] for r in rows if not r.split(",")[0].endswith(("RECORD", ".pyc"))]
    files = [f for f in files if not f.startswith("..") and (sp / f).is_file()]
    assert len(files) >= 4
    (sp / info / "RECORD").unlink()
    (sp / files[0]).unlink()
    time.sleep(3 * ABSORB_QUIET_S + 0.5)  # absorb runs (and must leave the rest alone)
    for f in files[1:]:
        assert (sp / f).is_file(), f  # still there for the remover
        (sp / f).unlink()
    assert _wait_for(lambda: not any(d.startswith("pycowsay") for d in
                                     VenvState.load(venv).dists))
    # The state is saved before the daemon's reset empties the view: a walk racing it may
    # meet a directory that is just gone (ENOENT, as on a disk; it was EIO, now fixed).
    assert _wait_for(lambda: not any(n.endswith(".py") for _, _, names in
                                     os.walk(sp / "pycowsay") for n in names))
    assert "no private changes" in cowfs("status", "--venv", str(venv)).stdout
