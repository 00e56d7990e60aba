"""Compiled manifest sidecars (cowfs.store.layer), bulk manifest validation, the lower built
from them.

A sidecar is a cache of its manifest: it must be used when intact and current, and anything
else (missing, stale, damaged, forged) must fall back to the manifest with a log line and
build exactly the lower the manifest describes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from cowfs.errors import StoreError
from cowfs.overlay.lower import ManifestLower
from cowfs.store import layer as L
from cowfs.store.manifest import (
    FileEntry,
    Manifest,
    _columns,
    _row_entries,
    manifest_path,
    read_manifest,
    write_manifest,
)
from cowfs.store.store import Store

D1, D2, D3 = "1" * 32, "2" * 32, "a" * 32


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store").ensure()


def _manifest(ident: str = "demo-1.0-abc", files: tuple[FileEntry, ...] | None = None,
              **kw: object) -> Manifest:
    files = files if files is not None else (
        FileEntry("demo/__init__.py", D1, 10, 0o644),
        FileEntry("demo/sub/deep/x.py", D2, 20, 0o644),
        FileEntry("demo/run", D3, 30, 0o755),
        FileEntry("demo-1.0.dist-info/METADATA", D1, 10, 0o644),
        FileEntry("top.py", D2, 20, 0o644),
    )
    return Manifest(ident, "demo", "1.0", files=files, mtime_ns=1_700_000_000 * 10**9,
                    dist_info="demo-1.0.dist-info",
                    data={"scripts": (FileEntry("tool", D3, 30, 0o755),)},
                    entry_points={"console_scripts": {"demo": "demo:main"}},
                    extra={"requires_dist": ["attrs"]}, **kw)  # type: ignore[arg-type]


def _view(lower: ManifestLower, path: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for name in lower.listdir(path):
        p = f"{path}/{name}" if path else name
        entry = lower.lookup(p)
        out[p] = entry
        if entry is not None and entry.is_dir:
            out[p + "/#subdirs"] = lower.subdir_count(p)
            out.update(_view(lower, p))
    return out


def _lower(store: Store, ids: list[str]) -> ManifestLower:
    return ManifestLower(store.objects, [L.read_layer(store, i) for i in ids])


def test_write_manifest_compiles_a_sidecar_that_builds_the_same_lower(store: Store) -> None:
    m = _manifest()
    write_manifest(store, m)
    assert L.layer_path(store, m.id).is_file()
    from_sidecar = _lower(store, [m.id])
    from_manifest = ManifestLower.from_manifests(store.objects, [read_manifest(store, m.id)])
    assert _view(from_sidecar) == _view(from_manifest)
    assert len(from_sidecar) == len(from_manifest) == 5 + 4  # files + demo, sub, deep, info
    entry = from_sidecar.lookup("demo/run")
    assert entry is not None and entry.mode & 0o777 == 0o755 and entry.size == 30
    assert entry.source == str(store.object_path(D3))
    assert from_sidecar.lookup("demo/nope") is None and from_sidecar.lookup("nope/x") is None


def test_the_sidecar_is_what_is_read(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    write_manifest(store, _manifest())

    def no_json(*_: object) -> None:
        raise AssertionError("the manifest's rows were parsed")

    monkeypatch.setattr(L, "_manifest_fields", no_json)
    layer = L.read_layer(store, "demo-1.0-abc")
    assert sorted(layer.names) == ["METADATA", "__init__.py", "run", "top.py", "x.py"]
    head = L.read_head(store, "demo-1.0-abc")
    assert head.entry_points == {"console_scripts": {"demo": "demo:main"}}
    assert head.data["scripts"] == (FileEntry("tool", D3, 30, 0o755),)
    assert head.extra == {"requires_dist": ["attrs"]} and head.dist_info == "demo-1.0.dist-info"


def _rewrite_manifest(store: Store, m: Manifest) -> None:
    """Replace the manifest as something other than write_manifest would (no sidecar)."""
    store.write_json(manifest_path(store, m.id), m.to_json())


@pytest.mark.parametrize("damage", ["stale", "flipped", "truncated", "garbage", "empty"])
def test_unusable_sidecar_falls_back_to_the_manifest_and_is_repaired(
        store: Store, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    m = _manifest()
    write_manifest(store, m)
    sidecar = L.layer_path(store, m.id)
    data = sidecar.read_bytes()
    if damage == "stale":  # the manifest changed after the sidecar was compiled
        m = _manifest(files=(FileEntry("other.py", D1, 1, 0o644),))
        _rewrite_manifest(store, m)
    elif damage == "flipped":
        sidecar.write_bytes(data[:-3] + bytes([data[-3] ^ 1]) + data[-2:])
    elif damage == "truncated":
        sidecar.write_bytes(data[:-5])
    elif damage == "garbage":
        sidecar.write_bytes(b"\0" * len(data))
    else:
        sidecar.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="cowfs.store.layer"):
        lower = _lower(store, [m.id])
    assert "reading the manifest" in caplog.text
    expected = ManifestLower.from_manifests(store.objects, [read_manifest(store, m.id)])
    assert _view(lower) == _view(expected)
    assert L.read_head(store, m.id).data == m.data
    L.ensure_layer(store, m.id)  # the installer's pass compiles it again
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cowfs.store.layer"):
        assert _view(_lower(store, [m.id])) == _view(expected)
    assert caplog.text == ""


def test_missing_sidecar_is_logged_and_compiled_by_ensure_layer(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    m = _manifest()
    write_manifest(store, m)
    L.layer_path(store, m.id).unlink()
    with caplog.at_level(logging.INFO, logger="cowfs.store.layer"):
        assert len(_lower(store, [m.id])) == 9
    assert "has no compiled layer" in caplog.text
    L.ensure_layer(store, m.id)
    assert L.layer_path(store, m.id).is_file()


def _forge(store: Store, m: Manifest, layer: L.Layer) -> None:
    """A sidecar with a valid checksum and source digest but hostile content."""
    source = manifest_path(store, m.id).read_bytes()
    L.layer_path(store, m.id).write_bytes(
        L.encode(m.id, L.source_digest(source), layer, m.to_json()))


@pytest.mark.parametrize("field,value", [
    ("names", ["..", "b", "c", "d", "e"]),
    ("names", ["a/b", "b", "c", "d", "e"]),
    ("names", ["", "b", "c", "d", "e"]),
    ("names", ["x" * 256, "b", "c", "d", "e"]),
    ("names", ["a\\b", "b", "c", "d", "e"]),
    ("dirs", ["", "../etc", "demo/sub", "demo/sub/deep", "demo-1.0.dist-info"]),
    ("dirs", ["", "/abs", "demo/sub", "demo/sub/deep", "demo-1.0.dist-info"]),
    ("dirs", ["", "demo", "demo", "demo/sub/deep", "demo-1.0.dist-info"]),
    ("digests", "../../../../etc/passwd".ljust(32, "0") + "1" * 128),
    ("digests", "A" * 160),
    ("modes", [0o644, 0o4777 | 0o10000, 0o644, 0o644, 0o644]),
    ("sizes", [2**63, 1, 1, 1, 1]),
    ("counts", [1, 1, 1, 1, 2]),
])
def test_forged_sidecar_is_rejected(store: Store, field: str, value: object,
                                    caplog: pytest.LogCaptureFixture) -> None:
    m = _manifest()
    write_manifest(store, m)
    good = L.read_layer(store, m.id)
    assert list(good.dirs) == ["", "demo", "demo-1.0.dist-info", "demo/sub", "demo/sub/deep"]
    _forge(store, m, good._replace(**{field: value}))
    with caplog.at_level(logging.WARNING, logger="cowfs.store.layer"):
        layer = L.read_layer(store, m.id)
    assert "ignoring" in caplog.text
    assert layer == L.layer_of(m.mtime_ns, _columns(m.to_json()["files"]))


def test_sidecar_of_another_distribution_is_rejected(store: Store) -> None:
    a, b = _manifest("a-1-x"), _manifest("b-1-x", files=(FileEntry("b.py", D1, 1, 0o644),))
    write_manifest(store, a)
    write_manifest(store, b)
    L.layer_path(store, b.id).write_bytes(L.layer_path(store, a.id).read_bytes())
    assert L.read_layer(store, b.id).names == ["b.py"]


def test_corrupt_manifest_is_an_error_even_with_a_sidecar(store: Store) -> None:
    m = _manifest()
    write_manifest(store, m)
    manifest_path(store, m.id).write_text("{not json")
    with pytest.raises(StoreError, match="unreadable manifest"):
        L.read_layer(store, m.id)
    with pytest.raises(StoreError, match="unreadable manifest"):
        L.read_head(store, m.id)


def test_later_layers_win_and_directories_win_over_files(store: Store) -> None:
    first = _manifest("first-1-x", files=(FileEntry("shared.py", D1, 1, 0o644),
                                          FileEntry("clash", D1, 1, 0o644),
                                          FileEntry("pkg/a.py", D1, 1, 0o644)))
    second = _manifest("second-1-x", files=(FileEntry("shared.py", D2, 2, 0o755),
                                            FileEntry("clash/inner.py", D2, 2, 0o644),
                                            FileEntry("pkg/b.py", D2, 2, 0o644)))
    for m in (first, second):
        write_manifest(store, m)
    lower = _lower(store, [first.id, second.id])
    shared = lower.lookup("shared.py")
    assert shared is not None and shared.size == 2 and shared.mode & 0o777 == 0o755
    clash = lower.lookup("clash")
    assert clash is not None and clash.is_dir and lower.listdir("clash") == ["inner.py"]
    assert sorted(lower.listdir("pkg")) == ["a.py", "b.py"]
    assert sorted(lower.listdir("")) == ["clash", "pkg", "shared.py"]
    assert lower.subdir_count("") == 2 and len(lower) == 6


# -- bulk validation of manifest rows ------------------------------------------------------


@pytest.mark.parametrize("row", [
    ["a//b", D1, 1, 0o644], ["/a", D1, 1, 0o644], ["a/", D1, 1, 0o644],
    ["./a", D1, 1, 0o644], ["a/./b", D1, 1, 0o644], ["a/..", D1, 1, 0o644],
    ["..", D1, 1, 0o644], ["", D1, 1, 0o644], ["a\\b", D1, 1, 0o644],
    ["a\0b", D1, 1, 0o644], ["x" * 256, D1, 1, 0o644], ["a/" + "é" * 128, D1, 1, 0o644],
    ["a\udcffb\ud800", D1, 1, 0o644], [1, D1, 1, 0o644],
    ["a", D3.upper(), 1, 0o644], ["a", D1[:-1], 1, 0o644], ["a", D1 + "0", 1, 0o644],
    ["a", "g" * 32, 1, 0o644], ["a", 5, 1, 0o644],
    ["a", D1, -1, 0o644], ["a", D1, True, 0o644], ["a", D1, 2**63, 0o644], ["a", D1, 1.0, 0o644],
    ["a", D1, 1, 0o10000], ["a", D1, 1, -1], ["a", D1, 1, None],
    ["a", D1, 1], "a", None,
])
def test_bulk_validation_rejects_what_row_validation_rejects(row: object) -> None:
    good = ["ok/path.py", D2, 5, 0o644]
    with pytest.raises(StoreError) as row_error:
        _row_entries([good, row])
    with pytest.raises(StoreError) as bulk_error:
        _columns([good, row])
    assert str(bulk_error.value) == str(row_error.value)


@pytest.mark.parametrize("path", ["a/b/c.py", "é/ü.py", "a" * 255, "/".join(["d" * 200] * 3),
                                  "a\udcff.py", ".hidden/..x/...", "a b/c;d"])
def test_bulk_validation_accepts_what_row_validation_accepts(path: str) -> None:
    rows = [["first.py", D1, 0, 0o755], [path, D2, 2**63 - 1, 0o644]]
    assert tuple(map(FileEntry._make, zip(*_columns(rows), strict=True))) \
        == tuple(_row_entries(rows))


def test_manifest_json_round_trip_keeps_file_entries(store: Store) -> None:
    m = _manifest()
    write_manifest(store, m)
    again = read_manifest(store, m.id)
    assert again == m and isinstance(again.files[0], FileEntry)
    assert json.loads(manifest_path(store, m.id).read_text())["files"][0] == \
        ["demo/__init__.py", D1, 10, 0o644]


def test_ensure_layer_never_fails_an_install(store: Store) -> None:
    L.ensure_layer(store, "absent-1-x")  # the daemon reports a missing manifest itself
    m = _manifest()
    write_manifest(store, m)
    L.layer_path(store, m.id).unlink()
    manifest_path(store, m.id).write_text("[]")
    L.ensure_layer(store, m.id)
    assert not L.layer_path(store, m.id).exists()
