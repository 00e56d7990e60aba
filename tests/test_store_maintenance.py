"""`cowfs store verify|gc|du|info` on real venvs sharing one store."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cowfs.mount.spec import VenvState
from cowfs.store import gc
from cowfs.store.manifest import FileEntry, Manifest, read_manifest, write_manifest
from cowfs.store.store import Store, digest_bytes
from tests.conftest import UDDER, cow, cowfs, force_unmount, install, one_line_error, site
from tests.wheelbuild import build

MAIN = "pycowsay/main.py"


def _object_of(venv: Path, path: str) -> str:
    store = Store()
    state = VenvState.load(venv)
    for ident in state.dists:
        for fe in read_manifest(store, ident).files:
            if fe.path == path:
                return fe.digest
    raise AssertionError(f"{path} not in {venv}")


def _verify(*args: str) -> tuple[int, dict[str, object]]:
    proc = cowfs("store", "verify", "--json", *args, check=False)
    return proc.returncode, json.loads(proc.stdout)


def test_verify_finds_and_repairs_corrupt_and_missing_objects(
        venvs: Callable[[str], Path], wheels: Path) -> None:
    store = Store().ensure()
    wheel = next(wheels.glob("pycowsay-0.0.0.2-*.whl"))
    a = venvs("A")
    install(a, wheels)  # found by the local fast path via --find-links, not kept in store
    assert _verify()[0] == 0
    digest = _object_of(a, MAIN)
    obj = store.object_path(digest)
    obj.chmod(0o644)
    obj.write_bytes(obj.read_bytes().replace(b"w |", b"X |"))
    rc, doc = _verify()
    assert rc == 1
    (problem,) = doc["problems"]  # type: ignore[misc]
    assert problem["digest"] == digest and problem["kind"] == "corrupt"
    assert problem["venvs"] == [str(a)]
    assert any(d.startswith("pycowsay-0.0.0.2-") for d in problem["dists"])
    # No wheel in the store: cannot repair, and the object is not made worse (not removed).
    rc, doc = _verify("--repair")
    assert rc == 1 and obj.exists()
    assert "no wheel" in doc["problems"][0]["repair_note"]  # type: ignore[index]
    text = cowfs("store", "verify", check=False)
    assert text.returncode == 1 and "corrupt object" in text.stdout and str(a) in text.stdout
    shutil.copy(wheel, store.wheels / wheel.name)
    license_digest = _object_of(a, "pycowsay-0.0.0.2.dist-info/LICENSE")
    store.object_path(license_digest).unlink()
    rc, doc = _verify()
    assert rc == 1 and {p["kind"] for p in doc["problems"]} == {"corrupt", "missing"}  # type: ignore[union-attr]
    out = cowfs("store", "verify", "--repair").stdout
    assert "all problems repaired" in out
    assert digest_bytes(obj.read_bytes()) == digest and not obj.stat().st_mode & 0o222
    assert store.has(license_digest)
    assert _verify()[0] == 0
    assert UDDER in (site(a) / MAIN).read_text()  # first read through the mount: repaired
    # Shared bytecode is no wheel member: it is recompiled with the venv's interpreter.
    (bytecode,) = VenvState.load(a).bytecode
    pyc = read_manifest(store, bytecode).files[0].digest
    store.object_path(pyc).chmod(0o644)
    store.object_path(pyc).write_bytes(b"not bytecode")
    rc, doc = _verify("--repair")
    assert rc == 0, doc
    assert doc["problems"][0]["repair_note"] == f"rebuilt {bytecode}"  # type: ignore[index]
    assert _verify()[0] == 0
    assert cow(a) == UDDER


def test_gc_collects_a_deleted_venv_and_keeps_shared_objects(
        venvs: Callable[[str], Path], wheels: Path, tmp_path: Path) -> None:
    store = Store()
    solo_dir = tmp_path / "solo-wheels"
    solo_dir.mkdir()
    build(solo_dir, {"solo/__init__.py": b"ONLY_IN_B = 1\n"}, name="solo", meta_extra="")
    a, b = venvs("A"), venvs("B")
    install(a, wheels)
    install(b, wheels)
    cowfs("install", "--venv", str(b), "solo==1.0", "--no-index", "--find-links", str(solo_dir),
          "-q")
    info = json.loads(cowfs("store", "info", "--json").stdout)
    assert info["store"] == str(store.root) and len(info["roots"]["live"]) == 2
    assert info["dedup_ratio"] > 1.5  # pycowsay stored once, seen by two venvs
    assert "dedup" in cowfs("store", "du").stdout
    shared = _object_of(a, MAIN)
    unique = _object_of(b, "solo/__init__.py")
    b_ids = set(VenvState.load(b).dists) - set(VenvState.load(a).dists)
    force_unmount(str(site(b)))
    shutil.rmtree(b)
    old, new = store.tmp / "old-leftover", store.tmp / "fresh"
    old.write_text("x")
    new.write_text("y")
    # what a killed install leaves: a download in the making, a speculative one (prefetch)
    spool = store.wheels / ".prefetch"
    spool.mkdir(parents=True)
    part, spooled = store.wheels / ".x-1.0-py3-none-any.whl.k2j.part", spool / "x.whl"
    fresh_part, kept = store.wheels / ".y-1.0-py3-none-any.whl.q9.part", store.wheels / "k.whl"
    for leftover in (old, part, spooled, fresh_part, kept):
        leftover.write_text("x")
    for leftover in (old, part, spooled, kept):
        os.utime(leftover, (time.time() - 7200, time.time() - 7200))

    sidecars = {p.stem for p in store.dists.glob("*.layer")}
    assert b_ids <= sidecars  # compiled manifest sidecars, derived from the manifests
    plans = list((store.root / "plans").glob("*.json"))
    assert plans  # the planning cache of the installs above
    dry = json.loads(cowfs("store", "gc", "--dry-run", "--json").stdout)
    assert dry["dead_roots"] == [str(b)] and dry["objects_deleted"] >= 1
    assert store.has(unique) and old.exists() and part.exists() and spooled.exists()
    assert dry["tmp_deleted"] == 3  # a dry run counts, and changes nothing
    assert {p.stem for p in store.dists.glob("*.layer")} == sidecars and plans[0].exists()
    text = cowfs("store", "info").stdout
    assert "1 live, 1 dead" in text
    done = json.loads(cowfs("store", "gc", "--json").stdout)
    assert done["live_roots"] == 1 and done["bytes_freed"] > 0
    assert b_ids <= set(done["manifests_deleted"])
    assert not store.has(unique) and store.has(shared)
    assert not old.exists() and new.exists()
    assert not part.exists() and not spool.exists() and done["tmp_deleted"] == 3
    assert fresh_part.exists() and kept.exists()  # a running download's; a fetched wheel
    assert [p.name for p in store.roots.glob("*.json")] == [f"{VenvState.load(a).id}.json"]
    left = {p.stem for p in store.dists.glob("*.layer")}
    gone = set(done["manifests_deleted"])
    assert left and left == sidecars - gone  # sidecars go with their manifests
    assert not any((store.root / "plans").glob("*.json"))  # a cache: rebuilt on demand
    again = json.loads(cowfs("store", "gc", "--json").stdout)
    assert again["objects_deleted"] == 0 and again["dead_roots"] == []
    assert _verify()[0] == 0
    assert cow(a) == UDDER  # A lost nothing: bytecode manifests and REQUESTED were kept


def test_gc_refuses_when_a_live_venv_state_is_unreadable(tmp_path: Path) -> None:
    store = Store().ensure()
    orphan = store.put_bytes(b"garbage nobody references")
    venv = tmp_path / "venv"
    (venv / ".cowfs").mkdir(parents=True)
    (venv / ".cowfs" / "state.json").write_text("{broken")
    store.write_json(store.roots / "someroot.json", {"venv": str(venv)})
    one_line_error(cowfs("store", "gc", check=False), "nothing collected")
    assert store.has(orphan)
    (venv / ".cowfs" / "state.json").unlink()  # no cowfs state any more: a dead root
    done = json.loads(cowfs("store", "gc", "--json").stdout)
    assert done["dead_roots"] == [str(venv)] and not store.has(orphan)


def test_verify_checks_objects_written_after_its_listing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify takes no lock: an install or the bytecode job may add objects and a manifest
    naming them between its object listing and its manifest scan. Those are checked then,
    not reported missing (it said 'missing object' and exited 1 while pycs were published)."""
    store = Store(tmp_path / "store").ensure()
    early = store.put_bytes(b"listed\n")
    listed = list(store.iter_objects())
    late = store.put_bytes(b"written after the listing\n")
    write_manifest(store, Manifest(
        id="late-1.0-x", name="late", version="1.0", dist_info="late-1.0.dist-info",
        files=(FileEntry("late/a.py", early, 7, 0o644), FileEntry("late/b.py", late, 26, 0o644))))
    with monkeypatch.context() as mp:
        mp.setattr(Store, "iter_objects", lambda self: iter(listed))
        rep = gc.verify(store)
    assert rep.problems == {} and rep.objects == 2
    store.object_path(late).unlink()
    assert gc.verify(store).problems[late].kind == "missing"


@pytest.mark.parametrize("lacking", ["O_TMPFILE", "/proc"])
def test_objects_are_written_whole_without_o_tmpfile_or_proc(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lacking: str) -> None:
    """A filesystem without O_TMPFILE (ntfs-3g), or no /proc to name an anonymous file by
    (a bare chroot): objects go through a named file in tmp/ instead, whole, and tmp/ is
    left empty."""
    from cowfs.store import store as store_mod

    real_open = os.open

    def no_tmpfile(path: object, flags: int, *args: object, **kw: object) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    def no_proc(fd: int, target: Path) -> None:
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), f"/proc/self/fd/{fd}")

    if lacking == "O_TMPFILE":
        monkeypatch.setattr(store_mod.os, "open", no_tmpfile)
    else:
        monkeypatch.setattr(store_mod, "_link_fd", no_proc)
    store = Store(tmp_path / "store").ensure()
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(3 << 20))
    digests = [store.put_bytes(b"small\n"), store.put_file(src)[0], store.put_bytes(b"small\n")]
    assert store.object_path(digests[0]).read_bytes() == b"small\n"
    assert store.object_path(digests[1]).read_bytes() == src.read_bytes()
    assert all(stat.S_IMODE(store.object_path(d).stat().st_mode) == 0o444 for d in digests)
    assert not store._tmpfile and not list(store.tmp.iterdir())
    store.sync_objects()
    assert gc.verify(store).problems == {}
