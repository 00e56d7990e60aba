"""An install's wheels are ingested in parallel and their manifests written together, once
every wheel is in: one syncfs for all their objects and documents, none on failure (syncs
behind the ingestion, in a background thread, only shorten that one)."""

from __future__ import annotations

import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import wheelbuild as wb

from cowfs.errors import CowfsError
from cowfs.store import store as store_mod
from cowfs.store.layer import ensure_layer, layer_path
from cowfs.store.manifest import iter_manifests, read_manifest
from cowfs.store.store import Store
from installer.resolve.resolve import Pin
from installer.wheel.ingest import Ingestor
from installer.wheel.wheel_index import get as index_get

TAGS = ["py3-none-any"]


def _pin(wheel: Path) -> Pin:
    name, version = wheel.name.split("-")[:2]
    return Pin(name=name, version=version, url=wheel.as_uri(), filename=wheel.name)


def _wheels(tmp: Path, n: int) -> list[Path]:
    return [wb.build(tmp, {f"p{i}/__init__.py": f"V = {i}\n".encode()}, name=f"p{i}")
            for i in range(n)]


def _ingest(store: Store, wheels: list[Path]) -> dict[str, object]:
    ingest = Ingestor(store, SimpleNamespace(tags=TAGS))  # type: ignore[arg-type]
    try:
        for wheel in wheels:
            ingest.submit(_pin(wheel), wheel)
        return ingest.results([_pin(w) for w in wheels], progress=False)  # type: ignore[return-value]
    finally:
        ingest.close()


def test_manifests_written_together_with_one_syncfs(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "store").ensure()
    wheels = _wheels(tmp_path, 4)
    calls: list[object] = []
    real = store_mod.syncfs

    def counted(path: Path) -> None:
        if threading.current_thread().name != "cowfs-sync-behind":
            calls.append(path)
        real(path)

    monkeypatch.setattr(store_mod, "syncfs", counted)
    got = _ingest(store, wheels)
    assert len(calls) == 1
    assert iter_manifests(store) == sorted(m.id for m in got.values())
    for manifest in got.values():
        assert read_manifest(store, manifest.id).files == manifest.files
        sidecar = layer_path(store, manifest.id)
        before = sidecar.stat().st_mtime_ns
        ensure_layer(store, manifest.id)  # rewrites a damaged or stale sidecar
        assert sidecar.stat().st_mtime_ns == before
    assert not list(store.tmp.iterdir())  # no temporary document left behind
    for wheel in wheels:  # the wheel index learned each wheel's sha256
        assert len(index_get(store, wheel)["sha256"]) == 64


def test_a_bad_wheel_writes_no_manifest(tmp_path: Path) -> None:
    store = Store(tmp_path / "store").ensure()
    good = _wheels(tmp_path, 2)
    bad = wb.build(tmp_path, {"bad/__init__.py": b"V = 1\n"}, name="bad")
    with zipfile.ZipFile(bad) as zf:
        content = [(info, zf.read(info)) for info in zf.infolist()]
    content[0] = (content[0][0], b"V = 666\n")  # no longer what RECORD says
    wb.write(bad, content)
    with pytest.raises(CowfsError, match="does not match its RECORD entry"):
        _ingest(store, [*good, bad])
    assert iter_manifests(store) == []


def test_write_batch_leaves_nothing_when_it_fails(tmp_path: Path) -> None:
    store = Store(tmp_path / "store").ensure()
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(OSError):
        store.write_batch([(store.dists / "a.json", b"{}"), (blocker / "b.json", b"{}")])
    assert not (store.dists / "a.json").exists()
    assert not list(store.tmp.iterdir())


def test_the_largest_waiting_wheel_is_ingested_first(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Local wheels arrive all at once: the longest ingests go first, not the first named."""
    import threading

    from installer.wheel import ingest as ingest_mod

    started: list[str] = []
    busy = threading.Barrier(3)
    release = threading.Event()

    def fake_ingest(store: Store, path: Path, **kw: object) -> object:
        started.append(path.name.split("-")[0])
        if path.name.startswith("block"):
            busy.wait(5)
            release.wait(5)
        return SimpleNamespace(id=path.name)

    monkeypatch.setattr(ingest_mod, "ingest_wheel", fake_ingest)
    monkeypatch.setattr(ingest_mod.os, "cpu_count", lambda: 2)

    def wheel(name: str, size: int) -> Path:
        path = tmp_path / f"{name}-1.0-py3-none-any.whl"
        path.write_bytes(b"x" * size)
        return path

    ingest = Ingestor(Store(tmp_path / "store").ensure(),
                      SimpleNamespace(tags=TAGS))  # type: ignore[arg-type]
    sizes = {"block1": 1, "block2": 1, "small": 10, "large": 1000, "tiny": 1, "medium": 100}
    pins = {name: _pin(wheel(name, size)) for name, size in sizes.items()}
    try:
        for name, pin in pins.items():
            ingest.submit(pin, tmp_path / pin.filename)
            if name == "block2":
                busy.wait(5)  # both workers busy until released: the rest wait together
        release.set()
        assert len(ingest.results(list(pins.values()), progress=False)) == len(pins)
    finally:
        release.set()
        ingest.close()
    assert started[2:] == ["large", "medium", "small", "tiny"]


def test_a_sync_covers_only_objects_named_before_it_started(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The count behind sync_behind: an object written while a syncfs runs is synced by the
    next sync_objects; one a finished syncfs covered needs none."""
    store = Store(tmp_path / "store").ensure()
    calls: list[str] = []
    real = store_mod.syncfs
    late = b"written while the syncfs ran"

    def syncfs_while_writing(path: Path) -> None:
        calls.append(str(path))
        if len(calls) == 1:
            store.put_bytes(late)  # named after the count this syncfs covers was taken
        real(path)

    monkeypatch.setattr(store_mod, "syncfs", syncfs_while_writing)
    store.put_bytes(b"first")
    store.sync_objects()
    assert len(calls) == 1
    store.sync_objects()  # the late object is not covered yet
    assert len(calls) == 2
    store.sync_objects()  # now everything is
    assert len(calls) == 2


def test_sync_behind_leaves_the_writer_nothing_to_wait_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "store").ensure()
    done = threading.Event()
    threads: list[str] = []
    real = store_mod.syncfs

    def syncfs(path: Path) -> None:
        threads.append(threading.current_thread().name)
        real(path)
        done.set()

    monkeypatch.setattr(store_mod, "syncfs", syncfs)
    store.put_bytes(b"object")
    store.sync_behind()
    assert done.wait(10)
    store.sync_objects()
    assert threads == ["cowfs-sync-behind"]
