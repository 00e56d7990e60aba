"""`cowfs adopt` on venvs made by uv, including the hard-link accident it is meant to rescue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cowfs.mount import mount as mounting
from cowfs.mount.spec import VenvState
from cowfs.store.store import Store
from installer.venv import adopt as adopt_module
from tests.conftest import EDITED, PKG, UDDER, cow, cowfs, force_unmount, install, one_line_error
from tests.test_changes import status

UV = Path(sys.executable).parent / "uv"
MAIN = "pycowsay/main.py"


def uv(*args: str) -> None:
    proc = subprocess.run([str(UV), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def uv_venv(tmp_path: Path, wheels: Path) -> Iterator[Callable[..., Path]]:
    """Factory: a uv venv holding pycowsay hard-linked from a uv cache; unmounted at the end
    if it was adopted."""
    if not UV.exists():
        pytest.skip("uv is not installed (test extra)")
    made: list[Path] = []

    def make(name: str, *extra: str) -> Path:
        venv = tmp_path / name
        uv("venv", "-q", "--python", sys.executable, str(venv))
        uv("pip", "install", "-q", "--python", str(venv / "bin" / "python"), "--link-mode",
           "hardlink", "--cache-dir", str(tmp_path / "uv-cache"), "--no-index",
           "--find-links", str(wheels), *extra, PKG)
        made.append(venv)
        return venv

    try:
        yield make
    finally:
        for venv in made:
            force_unmount(str(site_of(venv)))


def site_of(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def edit_through_the_link(venv: Path, tmp_path: Path) -> Path:
    """Edit main.py in place, as an editor that keeps the inode would: the uv cache's copy
    changes with it (the accident)."""
    main = site_of(venv) / MAIN
    assert main.stat().st_nlink > 1, "uv did not hard-link"
    main.write_text(main.read_text().replace(UDDER, EDITED))
    cached = [p for p in (tmp_path / "uv-cache").rglob("main.py") if p.samefile(main)]
    assert cached and EDITED in cached[0].read_text()
    return main


def test_adopt_rescues_an_edit_made_through_a_uv_hard_link(
        uv_venv: Callable[..., Path], venvs: Callable[[str], Path], wheels: Path,
        tmp_path: Path) -> None:
    install(venvs("B"), wheels)  # the store now has pycowsay from a verified wheel
    v = uv_venv("V")
    main = edit_through_the_link(v, tmp_path)
    (site_of(v) / "notes.txt").write_text("mine\n")
    before = main.stat().st_ino
    out = cowfs("adopt", str(v)).stdout
    assert "1 distribution" in out and f"{MAIN} was edited; `cowfs reset` restores it" in out
    assert mounting.mount_state(str(site_of(v))) == "live"
    assert cow(v) == EDITED  # the edit is still there, now privately
    got = status(v)
    assert got[MAIN]["kind"] == "modified" and got[MAIN]["owner"] == "pycowsay"
    assert got["notes.txt"]["kind"] == "added"
    assert (v / ".cowfs" / "upper" / MAIN).stat().st_ino != before  # a copy, not the link
    doc = json.loads(cowfs("status", "--venv", str(v), "--json").stdout)
    assert doc["groups"][0]["installer"] == "adopted"
    cowfs("reset", "--venv", str(v), "pycowsay", "-y")
    assert cow(v) == UDDER
    assert (site_of(v) / "notes.txt").read_text() == "mine\n"
    # The real site-packages under the mount holds only the automount hook now.
    cowfs("umount", str(v))
    assert sorted(p.name for p in site_of(v).iterdir()) == [
        "_cowfs_automount.pth", "_cowfs_automount.py"]
    run = subprocess.run([str(v / "bin" / "python"), "-c", "import pycowsay; print('ok')"],
                         capture_output=True, text=True)
    assert run.stdout.strip() == "ok", run.stderr  # automounted on use
    assert "nothing to absorb" in cowfs("adopt", str(v)).stdout  # a cowfs venv: absorbs


def test_adopt_keeps_an_edit_whose_pristine_is_unknown(
        uv_venv: Callable[..., Path], tmp_path: Path) -> None:
    v = uv_venv("V", "--compile-bytecode")
    edit_through_the_link(v, tmp_path)
    out = cowfs("adopt", str(v)).stdout
    assert "no pristine copy is known" in out
    assert "2 stale bytecode files dropped" in out  # __init__ and __main__: sources shared
    got = status(v)
    assert got[MAIN]["kind"] == "unknown-pristine" and got[MAIN]["owner"] == "pycowsay"
    # main.py is private, so its pyc (compiled from the edited source) stays with it.
    assert got["pycowsay/__pycache__/main.cpython-311.pyc"]["kind"] == "added"
    reset = cowfs("reset", "--venv", str(v), "pycowsay", "-y").stdout
    assert f"kept {MAIN}: no pristine copy is known" in reset
    assert cow(v) == EDITED
    assert "store is intact" in cowfs("store", "verify").stdout  # adopted manifests too


def test_a_failed_adopt_leaves_the_venv_untouched(
        uv_venv: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v = uv_venv("V")
    edit_through_the_link(v, tmp_path)

    def snapshot() -> dict[str, tuple[int, int, bytes]]:
        out = {}
        for p in sorted(v.rglob("*")):
            st = p.lstat()
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
            out[str(p.relative_to(v))] = (st.st_ino, st.st_mode, data)
        return out

    before = snapshot()
    calls = {"n": 0}
    real = Store.put_file

    def failing(self: Store, path: Path | str) -> tuple[str, int]:
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device", str(path))
        return real(self, path)

    # (monkeypatch.context: undo() would also undo the autouse fixture's COWFS_HOME, and
    # the rest of the test then used, and polluted, the real ~/.cache/cowfs store.)
    with monkeypatch.context() as m, pytest.raises(OSError):
        m.setattr(Store, "put_file", failing)
        adopt_module.adopt(v, Store())
    assert snapshot() == before
    assert not VenvState.path_for(v).exists()
    # An adopt interrupted after the swap (state saved, site-packages still full) is
    # finished by the next run.
    with monkeypatch.context() as m:
        m.setattr(adopt_module, "_finish", lambda state, result: result)
        adopt_module.adopt(v, Store())
    assert (v / ".cowfs" / adopt_module.MARKER).exists()
    assert (site_of(v) / MAIN).exists()  # not emptied yet
    cowfs("adopt", str(v))
    assert not (v / ".cowfs" / adopt_module.MARKER).exists()
    assert cow(v) == EDITED and status(v)[MAIN]["kind"] == "unknown-pristine"


def test_adopt_bad_input(tmp_path: Path) -> None:
    one_line_error(cowfs("adopt", str(tmp_path / "nope"), check=False), "is not a venv")
    plain = tmp_path / "plain"
    plain.mkdir()
    one_line_error(cowfs("adopt", str(plain), check=False), "no pyvenv.cfg")
    hint = cowfs("status", "--venv", str(tmp_path), check=False)
    assert hint.returncode == 1
    (tmp_path / "pyvenv.cfg").write_text("home = /usr/bin\n")
    one_line_error(cowfs("status", "--venv", str(tmp_path), check=False), "cowfs adopt")
    assert not os.path.exists(tmp_path / ".cowfs")
