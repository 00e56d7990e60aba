"""Absorb of what another installer writes into a mounted venv, in the order uv writes it.

uv copies a distribution's whole tree from its cache, the dist-info (RECORD included)
possibly before the package's files: absorb must wait for the files, never take half.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from cowfs.manifest import read_manifest
from cowfs.spec import VenvState
from cowfs.store import Store
from tests.conftest import site
from tests.wheelbuild import record_row

FILES = {"slow/__init__.py": b"from .part import VALUE\n", "slow/part.py": b"VALUE = 42\n"}
INFO = "slow-1.0.dist-info"


def _upper_files(venv: Path) -> list[str]:
    upper = VenvState.load(venv).upper
    return sorted(str(p.relative_to(upper)) for p in upper.rglob("*") if not p.is_dir())


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
    assert any(p.startswith(INFO) for p in _upper_files(venv))  # not taken half
    (sp / "slow").mkdir()
    for path, data in FILES.items():
        (sp / path).write_bytes(data)
    assert _wait_for(lambda: _upper_files(venv) == []), _upper_files(venv)
    state = VenvState.load(venv)
    (ident,) = [d for d in state.dists if d.startswith("slow-1.0-adopted-")]
    paths = {fe.path for fe in read_manifest(Store(), ident).files}
    assert set(FILES) <= paths
    assert (sp / "slow" / "part.py").read_bytes() == FILES["slow/part.py"]
