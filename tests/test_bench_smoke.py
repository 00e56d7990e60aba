"""Smoke test of the benchmark machinery (scripts/bench.py) on three tiny synthetic wheels.

Checks the plumbing only: every figure is measured, the JSON has every figure key, ratios
are positive numbers, and nothing stays mounted. No timing is asserted.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import wheelbuild

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib.figures import FIGURES  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="needs root, /dev/fuse and fusermount3")


def _uv() -> str | None:
    beside = Path(sys.executable).parent / "uv"
    return str(beside) if beside.exists() else shutil.which("uv")


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f if ln.split()[4].startswith(str(path))]


@pytest.mark.skipif(_uv() is None, reason="uv is not installed")
def test_bench_produces_every_figure_with_positive_ratios(tmp_path: Path) -> None:
    wheels, workload = wheelbuild.bench_workload(tmp_path, "benchdemo", imports_util=True)
    out = tmp_path / "results"
    work = tmp_path / "scratch"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("COWFS_HOME", "COWFS_RUNTIME_DIR")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--workload", str(workload),
         "--wheels", str(wheels), "--imports", "benchdemo_a,benchdemo_b,benchdemo_c",
         "--reps", "1", "--fresh", "1", "--cold-reps", "1", "--out", str(out),
         "--workdir", str(work), "--no-chart"],
        capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cowfs targets:" in proc.stdout
    docs = list(out.glob("bench-*.json"))
    assert len(docs) == 1
    doc = json.loads(docs[0].read_text())

    figures = doc["figures"]
    assert set(FIGURES) <= set(figures), set(FIGURES) - set(figures)
    for fig in FIGURES:
        peers = figures[fig]["peers"]
        assert "cowfs" in peers, f"{fig}: no cowfs value"
        for peer, d in peers.items():
            if fig == "page-cache":  # a memory delta: ~0 or below with other work running
                assert isinstance(d["median"], float | int) and math.isfinite(d["median"])
                continue
            r = d["ratio"]
            assert isinstance(r, float | int) and math.isfinite(r) and r > 0, (fig, peer, d)
    for fig in ("install-warm", "import-warm", "import-first", "walk", "read-all"):
        assert {"native", "cowfs"} <= set(figures[fig]["peers"]), fig
    assert figures["install-warm"]["ratio_vs_uv_copy"]["cowfs"] > 0
    assert figures["import-first"]["ratio_vs_native_warm"]["cowfs"] > 0
    assert {r["figure"] for r in doc["targets"]} >= {"install-warm", "import-warm", "walk"}
    (cold,) = doc["install_cold"]  # the local-index row only: no network without --cold-remote
    assert "local index" in cold["label"] and "install-cold" in proc.stdout
    assert all(cold[k] > 0 for k in ("uv_s", "uv_compile_s", "cowfs_s", "ratio_vs_uv"))
    # Everything it mounted is gone, and so is its scratch directory.
    assert not _mounts_under(work)
    assert not any(work.iterdir())


@pytest.mark.skipif(_uv() is None, reason="uv is not installed")
def test_bench_scale_reports_daemon_rss_and_fds(tmp_path: Path) -> None:
    """The scale run at a tiny N: daemon RSS and open fds after the walk, per case, and the
    fd count of the workload's daemon (the handle budget stays bounded: no fd per file)."""
    wheels, workload = wheelbuild.bench_workload(tmp_path, "benchscale")
    out, work = tmp_path / "results", tmp_path / "scratch"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("COWFS_HOME", "COWFS_RUNTIME_DIR")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--workload", str(workload),
         "--wheels", str(wheels), "--imports", "benchscale_a", "--figures", "daemon-rss",
         "--peers", "cowfs", "--reps", "1", "--scale", "--scale-files", "2000",
         "--out", str(out), "--workdir", str(work), "--no-chart"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (doc,) = [json.loads(p.read_text()) for p in out.glob("bench-*.json")]
    assert doc["figures"]["daemon-rss"]["extra"]["cowfs.fds"] > 0
    cases = doc["scale"]["cases"]
    assert set(cases) == {"overlay-2k", "store-2k"}
    for case in cases.values():
        assert case["daemon_vmrss_mb"] > 0 and case["nodes"] > 2000
        assert 0 < case["daemon_fds"] < 2000  # bounded, not one per file walked
    assert "fds" in proc.stdout.split("scale run")[1]
    assert not _mounts_under(work)
