"""The warm install path: planning cache, manifest heads and compiled sidecars on a real mount.

A warm `cowfs install` must give exactly what a cold one gives; the caches it reads are
only trusted while what they were computed from is unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cowfs.errors import StoreError
from cowfs.mount import control
from cowfs.mount.spec import VenvState
from cowfs.store.layer import layer_path
from cowfs.store.store import Store
from installer.interpreters import query_interpreter
from installer.resolve import locks, plan_cache
from installer.venv import sync
from installer.wheel.scripts import VenvFiles
from tests import wheelbuild
from tests.conftest import force_unmount


def _cowfs(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "cowfs", *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def _wheels(d: Path) -> Path:
    d.mkdir(exist_ok=True)
    wheelbuild.build(d, {"alpha/__init__.py": b"A = 1\n", "alpha/sub/data.txt": b"alpha\n"},
                     name="alpha", version="1.0", meta_extra="Requires-Dist: beta==2.0\n")
    wheelbuild.build(d, {"beta/__init__.py": b"def main():\n    print('beta')\n"},
                     name="beta", version="2.0", meta_extra="",
                     entry_points="[console_scripts]\nbeta = beta:main\n")
    return d


@pytest.fixture
def venv(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    made: list[Path] = []

    def make(name: str) -> Path:
        v = tmp_path / name
        _cowfs("venv", str(v))
        made.append(v)
        return v

    yield make
    for v in made:
        force_unmount(str(VenvState.load(v).site_packages))


def test_warm_install_serves_the_files_from_sidecars(
        tmp_path: Path, venv: Callable[[str], Path]) -> None:
    wheels, req = _wheels(tmp_path / "wheels"), tmp_path / "req.txt"
    req.write_text("alpha==1.0\nbeta==2.0\n")
    cold, warm = venv("cold"), venv("warm")
    for v in (cold, warm):
        out = _cowfs("install", "--venv", str(v), "-r", str(req), "--no-index",
                     "--find-links", str(wheels), "--json").stdout
        assert json.loads(out)["resolver"] == "local"
        state = VenvState.load(v)
        assert (state.site_packages / "alpha" / "sub" / "data.txt").read_text() == "alpha\n"
        assert (state.site_packages / "beta-2.0.dist-info" / "REQUESTED").exists()
        assert (v / "bin" / "beta").read_text().startswith(f"#!{v}/bin/python")
        log = state.log.read_text()
        assert "reading the manifest" not in log and "reloaded lower" in log
        store = Store(state.store)
        assert all(layer_path(store, d).is_file() for d in [*state.dists, *state.bytecode])
    assert len(list(Store(VenvState.load(cold).store).root.glob("plans/*.json"))) == 1


def test_daemon_falls_back_to_the_manifest_on_a_damaged_sidecar(
        tmp_path: Path, venv: Callable[[str], Path]) -> None:
    wheels = _wheels(tmp_path / "wheels")
    v = venv("v")
    _cowfs("install", "--venv", str(v), "alpha==1.0", "beta==2.0", "--no-index",
           "--find-links", str(wheels))
    state = VenvState.load(v)
    store = Store(state.store)
    alpha = next(d for d in state.dists if d.startswith("alpha-"))
    sidecar = layer_path(store, alpha)
    data = bytearray(sidecar.read_bytes())
    data[-40] ^= 0xFF
    os.chmod(sidecar, 0o644)
    sidecar.write_bytes(bytes(data))
    control.request(state.mount_spec().socket, "reload")
    assert "checksum mismatch" in state.log.read_text()
    assert (state.site_packages / "alpha" / "sub" / "data.txt").read_text() == "alpha\n"
    assert (state.site_packages / "alpha" / "__init__.py").read_text() == "A = 1\n"
    # The next install (here: a no-op) puts an intact sidecar back.
    _cowfs("install", "--venv", str(v), "alpha==1.0", "--no-index", "--find-links", str(wheels))
    assert sidecar.read_bytes() != bytes(data)


# -- the planning cache, in process ---------------------------------------------------------


@pytest.fixture
def planning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[
        Callable[[], list[str]]]:
    store = Store(tmp_path / "store").ensure()
    info = query_interpreter(sys.executable, store)
    wheels = _wheels(tmp_path / "wheels")
    (tmp_path / "base.txt").write_text("beta==2.0\n")
    (tmp_path / "req.txt").write_text("-r base.txt\nalpha==1.0\n")
    computed: list[int] = []
    real = locks.pins_from_local_wheels

    def counting(*args: object, **kw: object) -> object:
        computed.append(1)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(sync, "pins_from_local_wheels", counting)
    request = sync.Request(requirement_files=[tmp_path / "req.txt"], find_links=[str(wheels)],
                           no_index=True)

    def plan() -> list[str]:
        pins, how = sync.plan(request, info, store, Path(sys.executable))
        assert how == "local"
        return [f"{p.name}=={p.version}:{len(computed)}" for p in pins]

    yield plan


def test_plan_cache_hits_only_while_its_inputs_are_unchanged(
        tmp_path: Path, planning: Callable[[], list[str]]) -> None:
    assert planning() == ["beta==2.0:1", "alpha==1.0:1"]
    assert planning() == ["beta==2.0:1", "alpha==1.0:1"]  # no new computation
    (tmp_path / "base.txt").write_text("beta==2.0\n# edited\n")  # an included file
    assert planning() == ["beta==2.0:2", "alpha==1.0:2"]
    assert planning() == ["beta==2.0:2", "alpha==1.0:2"]
    wheel = next((tmp_path / "wheels").glob("alpha-*.whl"))
    wheel.write_bytes(wheel.read_bytes())  # rewritten in place: new ctime and mtime
    assert planning() == ["beta==2.0:3", "alpha==1.0:3"]
    wheelbuild.build(tmp_path / "wheels", {"x/__init__.py": b""}, name="unrelated",
                     meta_extra="")
    assert planning() == ["beta==2.0:4", "alpha==1.0:4"]  # any new wheel: recomputed


def test_plan_cache_entry_damage_is_a_miss(tmp_path: Path,
                                           planning: Callable[[], list[str]]) -> None:
    planning()
    (entry,) = (tmp_path / "store" / "plans").glob("*.json")
    doc = json.loads(entry.read_text())
    doc["pins"][0]["requested"] = "yes"
    entry.write_text(json.dumps(doc))
    assert planning() == ["beta==2.0:2", "alpha==1.0:2"]
    entry.write_text("{")
    assert planning() == ["beta==2.0:3", "alpha==1.0:3"]
    assert planning() == ["beta==2.0:3", "alpha==1.0:3"]
    assert plan_cache.FORMAT == 1


def test_venv_files_appear_together_or_not_at_all(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    files = VenvFiles()
    files.write(bindir / "a", [b"#!/bin/sh\n", b"echo a\n"], 0o755)
    files.write(bindir / "b", [b"b"], 0o644)
    assert all(p.name.startswith(".") for p in bindir.iterdir())  # nothing visible yet
    files.commit()
    assert sorted(p.name for p in bindir.iterdir()) == ["a", "b"]
    assert (bindir / "a").read_bytes() == b"#!/bin/sh\necho a\n"
    assert (bindir / "a").stat().st_mode & 0o777 == 0o755
    assert (bindir / "b").stat().st_mode & 0o777 == 0o644

    def corrupt() -> Iterator[bytes]:
        yield b"partial"
        raise StoreError("object is corrupt")

    files = VenvFiles()
    files.write(bindir / "c", [b"c"], 0o755)
    with pytest.raises(StoreError):
        files.write(bindir / "d", corrupt(), 0o755)
    files.abort()
    assert sorted(p.name for p in bindir.iterdir()) == ["a", "b"]  # no c, no temp files
