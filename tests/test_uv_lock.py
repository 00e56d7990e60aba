"""uv.lock read for one interpreter: the graph from the project, markers, extras, groups."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.markers import default_environment

from cowfs.errors import CowfsError
from installer.resolve.uv_lock import read_uv_lock

WHEEL = '{{ url = "https://files.example/{n}-{v}-{t}.whl", hash = "sha256:{h}" }}'


def _pkg(name: str, version: str, *, deps: str = "", tags: tuple[str, ...] = ("py3-none-any",),
         extra: str = "") -> str:
    wheels = ", ".join(WHEEL.format(n=name, v=version, t=t, h=str(i) * 64)
                       for i, t in enumerate(tags))
    return (f'[[package]]\nname = "{name}"\nversion = "{version}"\n'
            f'source = {{ registry = "https://pypi.org/simple" }}\n'
            f"dependencies = [{deps}]\nwheels = [{wheels}]\n{extra}\n")


def _lock(tmp_path: Path, body: str, project_deps: str, dev: str = "") -> Path:
    dev_table = f"[package.dev-dependencies]\ndev = [{dev}]\n" if dev else ""
    text = (f'version = 1\nrevision = 2\nrequires-python = ">=3.8"\n\n'
            f'[[package]]\nname = "proj"\nversion = "0.1.0"\nsource = {{ editable = "." }}\n'
            f"dependencies = [{project_deps}]\n{dev_table}\n{body}")
    path = tmp_path / "uv.lock"
    path.write_text(text)
    return path


def _names(path: Path, **env: str) -> dict[str, str]:
    markers = {**default_environment(), **env}
    lock = read_uv_lock(path, markers, ["cp311-cp311-manylinux_2_17_x86_64", "py3-none-any"])
    return {p.name: p.version for p in lock.pins}


def test_the_graph_from_the_project_with_markers_extras_and_the_dev_group(
        tmp_path: Path) -> None:
    body = (_pkg("a", "1.0", deps='{ name = "b", extra = ["fast"] }')
            + _pkg("b", "2.0", extra='[package.optional-dependencies]\nfast = [{ name = "c" }]')
            + _pkg("c", "3.0")
            + _pkg("win", "1.0")
            + _pkg("devtool", "4.0")
            + _pkg("unused", "9.9"))
    lock = _lock(tmp_path, body, '{ name = "a" }, { name = "win", marker = '
                 '"sys_platform == \'win32\'" }', dev='{ name = "devtool" }')
    assert _names(lock, sys_platform="linux") == {"a": "1.0", "b": "2.0", "c": "3.0",
                                                  "devtool": "4.0"}
    assert "win" in _names(lock, sys_platform="win32")
    ul = read_uv_lock(lock, default_environment(), None)
    assert ul.editables == {"proj": tmp_path}


def test_the_best_wheel_for_the_interpreter_and_its_hash(tmp_path: Path) -> None:
    body = _pkg("a", "1.0", tags=("py3-none-any", "cp311-cp311-manylinux_2_17_x86_64"))
    lock = read_uv_lock(_lock(tmp_path, body, '{ name = "a" }'), default_environment(),
                        ["cp311-cp311-manylinux_2_17_x86_64", "py3-none-any"])
    (pin,) = lock.pins
    assert pin.filename == "a-1.0-cp311-cp311-manylinux_2_17_x86_64.whl"
    assert pin.sha256 == "1" * 64


def test_forks_pick_the_version_the_edge_names(tmp_path: Path) -> None:
    body = _pkg("a", "1.0") + _pkg("a", "2.0")
    lock = _lock(tmp_path, body, '{ name = "a", version = "2.0", marker = '
                 '"python_version >= \'3.8\'" }, { name = "a", version = "1.0", marker = '
                 '"python_version < \'3.8\'" }')
    assert _names(lock) == {"a": "2.0"}


@pytest.mark.parametrize(("body", "deps", "error"), [
    ('[[package]]\nname = "s"\nversion = "1"\nsource = { registry = "x" }\n'
     'sdist = { url = "https://x/s-1.tar.gz" }\n', '{ name = "s" }', "only a source"),
    ("", '{ name = "missing" }', "names 0 locked packages"),
    (_pkg("a", "1.0", tags=("cp27-cp27m-win32",)), '{ name = "a" }', "none of its 1 wheels"),
])
def test_what_cannot_be_installed_is_one_clear_error(tmp_path: Path, body: str, deps: str,
                                                     error: str) -> None:
    with pytest.raises(CowfsError, match=error):
        _names(_lock(tmp_path, body, deps))


def test_not_a_uv_lock(tmp_path: Path) -> None:
    path = tmp_path / "uv.lock"
    path.write_text("version = 7\n")
    with pytest.raises(CowfsError, match=r"unsupported uv\.lock version 7"):
        _names(path)
    path.write_text("version = 1\n[[package]]\nname = 'x'\nversion = '1'\n")
    with pytest.raises(CowfsError, match="no package has the project itself"):
        _names(path)
