"""Smoke test of the uv-into-cowfs bench figure (scripts/benchlib/uvinto.py) on three tiny
synthetic wheels: uv pip install and uv sync into cowfs venvs, absorbed, measured against
plain uv venvs. Plumbing only (keys, positive ratios, nothing left mounted); no timing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import wheelbuild
from tests.test_bench_smoke import ROOT, _mounts_under, _uv, pytestmark  # noqa: F401


@pytest.mark.skipif(_uv() is None, reason="uv is not installed")
def test_uv_into_cowfs_figure(tmp_path: Path) -> None:
    wheels, workload = wheelbuild.bench_workload(tmp_path, "uvdemo")
    out, work = tmp_path / "results", tmp_path / "scratch"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("COWFS_HOME", "COWFS_RUNTIME_DIR")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--figures", "uv-into-cowfs",
         "--quick", "--workload", str(workload), "--wheels", str(wheels), "--out", str(out),
         "--workdir", str(work), "--no-chart"],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "uv-into-cowfs (uv pip install" in proc.stdout
    doc = json.loads(next(out.glob("bench-*.json")).read_text())
    figs = doc["figures"]
    for base in ("uv-into-cowfs", "uv-sync-into-cowfs"):
        for fig, peers in ((base, {"uv-copy", "cowfs"}), (f"{base}-disk", {"uv-copy", "cowfs"}),
                           (f"{base}-absorb", {"cowfs"})):
            assert set(figs[fig]["peers"]) == peers, fig
            for peer, r in figs[fig]["ratio_vs_uv_copy"].items():
                assert math.isfinite(r) and r > 0, (fig, peer, r)
        assert figs[base]["ratio_install_plus_absorb"] > 0
        venv = figs[base]["extra"]["venvs"]["1"]
        assert {"upper_mb", "store_growth_mb", "private_files", "adopt_s"} <= set(venv)
    assert figs["uv-into-cowfs-disk"]["unit"] == "MB"
    assert {r["figure"] for r in doc["targets"]} >= {"uv-into-cowfs-disk",
                                                     "uv-sync-into-cowfs-disk"}
    assert not _mounts_under(work)
    assert not any(work.iterdir())
