"""Four containers share one store volume while the host collects garbage in it.

Each container (image built from the checkout by scripts/benchlib/containers.py, reused
while its content hash is unchanged) plays the two-projects scenario in tests/docker_scenario.py:
`cowfs venv` A and B, `cowfs install` the real wheel offline from the mounted wheel cache,
one container edits A's pycowsay/main.py, and a fresh project C stays pristine. While every
container keeps its venvs mounted, `cowfs store gc` runs on the host on the volume's
directory; afterwards every container must still run and import pycowsay, read every file
of its venvs, remount A and install a new project D from the store, and `cowfs store
verify` must pass. Also the plumbing of `scripts/bench --docker` on tiny synthetic wheels.
Skipped (quickly, with the reason) where no Docker engine answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests import wheelbuild
from tests.conftest import EDITED, PKG, UDDER, cowfs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from benchlib import containers  # noqa: E402

SCENARIO = Path(__file__).resolve().parent / "docker_scenario.py"
CONTAINERS = 4
STORE = "/cowfs-store"  # the volume's path inside the containers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def image() -> str:
    reason = containers.unavailable()
    if reason:
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("needs root (the host-side gc works in the engine's volume directory)")
    return containers.ensure_image()


def play(dk: containers.Docker, names: list[str], phase: str) -> list[dict[str, str]]:
    """Run one phase of the scenario in every container at once; its JSON per container."""
    def one(i: int) -> dict[str, str]:
        role = "edit" if i == 0 else "pristine"
        args = [phase] if phase == "teardown" else [phase, role, PKG, UDDER, EDITED]
        proc = dk.exec(names[i], ["python3", "/scenario.py", *args])
        try:
            return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
        except (IndexError, ValueError):
            return {"scenario": f"ERROR: exit {proc.returncode}: {proc.stderr.strip()[-800:]}"}

    with ThreadPoolExecutor(len(names)) as pool:
        return list(pool.map(one, range(len(names))))


def expected_cows(i: int, names: list[str]) -> dict[str, str]:
    return {f"cow.{n}": EDITED if (i == 0 and n.startswith("A")) else UDDER for n in names}


def problems(results: list[dict[str, str]], cows: list[str]) -> list[str]:
    """Every failed step and every cow that is not the one expected, per container."""
    out = []
    for i, steps in enumerate(results):
        out += [f"container {i}: {k}: {v}" for k, v in steps.items() if v.startswith("ERROR")]
        for key, want in expected_cows(i, cows).items():
            got = steps.get(key)
            if got is not None and not got.startswith("ERROR") and got != want:
                out.append(f"container {i}: {key} printed {got!r}, expected {want!r}")
    return out


def pristine_trees(results: list[dict[str, str]]) -> set[str]:
    """Digests of every pristine venv's site-packages (one value when they all agree)."""
    return {v for i, steps in enumerate(results) for k, v in steps.items()
            if k.startswith("tree.") and not v.startswith("ERROR")
            and not (i == 0 and k.startswith("tree.A"))}


def test_four_containers_share_a_store_across_a_host_gc(image: str, wheels: Path) -> None:
    with containers.Docker(image) as dk:
        volume = dk.volume("e2e-store")
        host_store = dk.volume_path(volume)
        if host_store is None:
            pytest.skip("the engine's volume directory is not on this machine")
        mounts = [f"{volume}:{STORE}", f"{wheels}:/wheels:ro", f"{SCENARIO}:/scenario.py:ro"]
        names = [dk.start(f"e2e{i}", mounts, {"COWFS_HOME": STORE}) for i in range(CONTAINERS)]
        try:
            before = play(dk, names, "setup")
            bad = problems(before, ["A", "B", "C"])
            assert not bad, "before the gc:\n" + "\n".join(bad)
            assert len(pristine_trees(before)) == 1, before

            host = {**os.environ, "COWFS_HOME": str(host_store)}
            gc = cowfs("store", "gc", check=False, env=host, timeout=300)
            after = play(dk, names, "check")
            verify = cowfs("store", "verify", check=False, env=host, timeout=300)

            bad = problems(after, ["A", "B", "C", "A.remounted", "D"])
            if gc.returncode != 0:
                bad.append(f"host gc exited {gc.returncode}: {gc.stderr.strip()}")
            if verify.returncode != 0:
                bad.append(f"host verify exited {verify.returncode}: "
                           f"{(verify.stdout + verify.stderr).strip()[-1500:]}")
            trees = pristine_trees(before) | pristine_trees(after)
            if len(trees) != 1:
                bad.append(f"pristine venvs differ across containers or the gc: {trees}")
            assert not bad, ("after a host-side gc while 4 containers kept their venvs "
                             "mounted:\n" + "\n".join(bad)
                             + f"\n--- gc said:\n{gc.stdout.strip()[-2500:]}")
        finally:
            play(dk, names, "teardown")


def test_bench_docker_figure_plumbing(image: str, tmp_path: Path) -> None:
    """`scripts/bench --docker` on three tiny synthetic wheels: the docker section has both
    peers' times and sizes and the cowfs/uv ratios, and no container or volume is left.
    No timing is asserted."""
    wheels, workload = wheelbuild.bench_workload(tmp_path, "dockdemo")
    out, work = tmp_path / "results", tmp_path / "scratch"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("COWFS_HOME", "COWFS_RUNTIME_DIR")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--docker", "--reps", "1",
         "--workload", str(workload), "--wheels", str(wheels), "--out", str(out),
         "--workdir", str(work), "--no-chart"],
        capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cowfs/uv" in proc.stdout, proc.stdout
    doc = json.loads(next(out.glob("bench-*.json")).read_text())["docker"]
    for peer in ("cowfs", "uv"):
        for key in ("wall_s", "in_container_s", "layer_mb", "disk_mb"):
            assert doc["peers"][peer][key]["median"] >= 0, (peer, key, doc)
        assert doc["peers"][peer]["wall_s"]["median"] > doc["peers"][peer]["in_container_s"][
            "median"] > 0
    assert set(doc["ratio"]) >= {"wall_s", "in_container_s", "disk_mb"}, doc
    left = containers.docker("ps", "-a", "-q", "--filter", "name=cowfs-bench-").stdout.split()
    left += containers.docker("volume", "ls", "-q", "--filter", "name=cowfs-bench-").stdout.split()
    assert not left, left


def test_skip_reason_is_quick_without_a_docker_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI has no engine: the check must answer at once, with a reason, not hang or raise."""
    monkeypatch.setenv("PATH", "/nonexistent")
    assert containers.unavailable() == "the docker CLI is not installed"


def test_skip_reason_names_the_failing_engine(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    reason = containers.unavailable()
    assert reason is not None and "Cannot connect to the Docker daemon" in reason
