"""The interpreter cache on real interpreters and through the command line."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import sysconfig
from pathlib import Path

import click
import packaging.markers
import packaging.tags
import pytest
from click.testing import CliRunner

from cowfs.cli import CowfsGroup
from cowfs.store.store import Store
from installer import interpreters
from installer.cli.interpreter_commands import COMMANDS
from installer.interpreters import query_interpreter
from tests.test_interpreters import REPO, Fake, make_venv


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")

# -- real interpreters --------------------------------------------------------------------


def _assert_matches_this_process(info: interpreters.InterpreterInfo) -> None:
    assert info.version == platform.python_version()
    assert info.version_info == tuple(sys.version_info[:3])
    assert info.implementation == sys.implementation.name
    assert info.tags == [str(t) for t in packaging.tags.sys_tags()]
    assert info.soabi == sysconfig.get_config_var("SOABI")
    assert info.paths["stdlib"] == sysconfig.get_paths()["stdlib"]
    if info.libpython is not None:
        assert Path(info.libpython).is_file()


def test_host_interpreter(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The query must be immune to the caller's environment: -I and a cleaned environment.
    evil = tmp_path / "evil"
    (evil / "packaging").mkdir(parents=True)
    (evil / "packaging" / "__init__.py").write_text("raise ImportError('wrong packaging')\n")
    (evil / "sitecustomize.py").write_text("print('noise')\n")
    monkeypatch.setenv("PYTHONPATH", str(evil))
    monkeypatch.setenv("PYTHONHOME", str(tmp_path / "nowhere"))
    info = query_interpreter(sys.executable, store)
    _assert_matches_this_process(info)
    assert info.markers == packaging.markers.default_environment()
    assert info.paths["purelib"] == sysconfig.get_paths()["purelib"]
    assert (info.is_venv, info.sys_prefix) == (sys.prefix != sys.base_prefix, sys.prefix)
    assert info.executable == os.path.abspath(sys.executable)
    assert info.canonical == os.path.realpath(sys.executable)
    cached = query_interpreter(sys.executable, store)
    assert cached.from_cache and cached == info


def test_bare_venv_without_packaging(tmp_path: Path, store: Store) -> None:
    venv = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    assert not list(venv.glob("lib/python*/site-packages/packaging"))
    python = venv / "bin" / "python"
    info = query_interpreter(python, store)
    _assert_matches_this_process(info)
    assert (info.is_venv, info.sys_prefix, info.executable) == (True, str(venv), str(python))
    assert info.base_prefix == sys.base_prefix
    assert info.paths["purelib"].startswith(str(venv) + os.sep)
    assert query_interpreter(python, store).from_cache


# -- command line -------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> click.Group:
    monkeypatch.setenv("COWFS_HOME", str(tmp_path / "home"))
    return CowfsGroup(commands=COMMANDS)


def test_cli_info_json_and_text(cli: click.Group, py312: Fake) -> None:
    runner = CliRunner()
    first = runner.invoke(cli, ["python", "info", str(py312.exe), "--json"])
    assert first.exit_code == 0, first.output
    doc = json.loads(first.stdout)
    assert (doc["version"], doc["from_cache"], doc["tags"]) == (
        "3.12.9",
        False,
        py312.doc()["tags"],
    )
    text = runner.invoke(cli, ["python", "info", str(py312.exe)])
    assert text.exit_code == 0, text.output
    assert "version     3.12.9 (cpython)" in text.stdout
    assert "cache       hit" in text.stdout
    assert py312.runs() == 1


def test_cli_default_python(
    cli: click.Group, tmp_path: Path, py312: Fake, py39: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    make_venv(tmp_path / "active", py312)
    make_venv(tmp_path / "project" / ".venv", py39)
    monkeypatch.chdir(tmp_path / "project")
    monkeypatch.setenv("VIRTUAL_ENV", str(tmp_path / "active"))
    doc = json.loads(runner.invoke(cli, ["python", "info", "--json"]).stdout)
    assert (doc["version"], doc["executable"]) == ("3.12.9", str(tmp_path / "active/bin/python"))
    monkeypatch.delenv("VIRTUAL_ENV")
    doc = json.loads(runner.invoke(cli, ["python", "info", "--json"]).stdout)
    assert (doc["version"], doc["executable"]) == (
        "3.9.21",
        str(tmp_path / "project/.venv/bin/python"),
    )


def test_cli_error_and_cache_clean(cli: click.Group, tmp_path: Path, py312: Fake) -> None:
    runner = CliRunner()
    bad = runner.invoke(cli, ["python", "info", str(tmp_path / "nope")])
    assert bad.exit_code == 1
    assert (
        bad.stderr
        == f"cowfs: error: cannot query python interpreter {tmp_path / 'nope'}: not found\n"
    )
    assert runner.invoke(cli, ["python", "info", str(py312.exe)]).exit_code == 0
    cleaned = runner.invoke(cli, ["cache", "clean"])
    assert cleaned.exit_code == 0
    assert cleaned.stdout.startswith("removed 1 interpreter cache entry from ")
    again = runner.invoke(cli, ["cache", "clean", "--interpreters"])
    assert again.stdout.startswith("removed 0 interpreter cache entries")


def test_python_m_cowfs_python_info(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COWFS_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "cowfs", "python", "info", sys.executable, "--json"]
    runs = [subprocess.run(cmd, env=env, capture_output=True, text=True) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    first, second = (json.loads(run.stdout) for run in runs)
    assert (first["version"], first["from_cache"]) == (platform.python_version(), False)
    assert second["from_cache"] is True
    assert second["tags"] == first["tags"] == [str(t) for t in packaging.tags.sys_tags()]
