"""installer.wheel.wheel: wheel -> store ingest, on synthetic good and hostile wheels."""

from __future__ import annotations

import base64
import csv
import dataclasses
import hashlib
import io
import json
import os
import random
import stat
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest
import wheelbuild as wb

from cowfs.store.manifest import Manifest, iter_manifests, read_manifest
from cowfs.store.store import Store
from installer.wheel import wheel as wheel_mod
from installer.wheel.scripts import install_venv_files, remove_venv_files, shebang
from installer.wheel.wheel import WheelError, ingest_wheel, read_wheel_metadata, venv_extra_files
from installer.wheel.wheel_archive import read_whole, split_python_shebang

CLI = b"import sys\n\ndef main():\n    print('hello', *sys.argv[1:])\n    return 3\n"
ENTRY_POINTS = (
    "[console_scripts]\ndemo-hello = demo.cli:main\nMyTool = demo.cli:App.run [extra]\n"
    "[gui_scripts]\ndemo-gui = demo.cli:main\n[demo.plugins]\nCaseKept = demo:VALUE\n"
)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store").ensure()


def _obj(store: Store, digest: str) -> bytes:
    with store.open_object(digest) as f:
        return f.read()


def _sha(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _full_wheel(tmp: Path) -> Path:
    """A platlib wheel using every .data scheme, an executable member and entry points."""
    return wb.build(
        tmp,
        {
            "demo/__init__.py": b"VALUE = 1\n",
            "demo/cli.py": CLI + b"class App:\n    run = staticmethod(main)\n",
            "demo/tool.sh": (b"#!/bin/sh\necho tool\n", 0o755),
            "Demo-1.0.data/purelib/demo_pure.py": b"PURE = 1\n",  # spelled unlike dist-info
            "demo-1.0.data/platlib/demo_plat/__init__.py": b"PLAT = 1\n",
            "demo-1.0.data/scripts/demo-py": b"#!python -u\nimport demo\nprint('py', demo.VALUE)\n",
            "demo-1.0.data/scripts/demo-sh": b"#!/bin/sh\necho sh\n",
            "demo-1.0.data/headers/demo.h": b"#define DEMO 1\n",
            "demo-1.0.data/data/share/demo/readme.txt": b"data file\n",
        },
        tag="cp311-cp311-linux_x86_64",
        purelib=False,
        entry_points=ENTRY_POINTS,
    )


# -- positive -------------------------------------------------------------------------


def test_purelib_wheel(store: Store, tmp_path: Path) -> None:
    whl = wb.build(tmp_path, {"demo/__init__.py": b"VALUE = 1\n", "demo/x.so": (b"ELF", 0o755)})
    m = ingest_wheel(store, whl, supported_tags=["cp311-cp311-linux_x86_64", "py3-none-any"])
    sha = hashlib.sha256(whl.read_bytes()).hexdigest()
    assert m.id == f"demo-1.0-{sha[:16]}" and m.wheel_sha256 == sha
    assert (m.name, m.version, m.wheel, m.tags) == ("demo", "1.0", whl.name, ("py3-none-any",))
    assert m.dist_info == "demo-1.0.dist-info"
    paths = {e.path: e for e in m.files}
    assert set(paths) == {
        "demo/__init__.py",
        "demo/x.so",
        "demo-1.0.dist-info/WHEEL",
        "demo-1.0.dist-info/METADATA",
        "demo-1.0.dist-info/INSTALLER",
        "demo-1.0.dist-info/RECORD",
    }
    assert _obj(store, paths["demo/__init__.py"].digest) == b"VALUE = 1\n"
    assert _obj(store, paths["demo-1.0.dist-info/INSTALLER"].digest) == b"cowfs\n"
    assert paths["demo/x.so"].mode == 0o755 and paths["demo/__init__.py"].mode == 0o644
    assert m.mtime_ns == int(datetime(*wb.DATE, tzinfo=timezone.utc).timestamp()) * 10**9
    assert m.extra == {
        "requires_dist": ["attrs>=20"],
        "requires_python": ">=3.8",
        "root_is_purelib": True,
    }
    assert m.data == {"scripts": (), "headers": (), "data": ()}
    assert read_manifest(store, m.id) == m


def test_platlib_wheel_maps_data_schemes(store: Store, tmp_path: Path) -> None:
    m = ingest_wheel(store, _full_wheel(tmp_path))
    paths = {e.path for e in m.files}
    assert {"demo_pure.py", "demo_plat/__init__.py", "demo/cli.py"} <= paths
    assert not any(".data" in p for p in paths)
    assert [e.path for e in m.data["scripts"]] == ["demo-py", "demo-sh"]
    assert all(e.mode == 0o755 for e in m.data["scripts"])  # scripts are executable
    assert [e.path for e in m.data["headers"]] == ["demo.h"]
    assert [e.path for e in m.data["data"]] == ["share/demo/readme.txt"]
    assert _obj(store, m.data["headers"][0].digest) == b"#define DEMO 1\n"
    assert {e.path: e.mode for e in m.files}["demo/tool.sh"] == 0o755
    assert m.extra["root_is_purelib"] is False


def test_entry_points_parsed_case_sensitive(store: Store, tmp_path: Path) -> None:
    m = ingest_wheel(store, _full_wheel(tmp_path))
    assert m.entry_points == {
        "console_scripts": {"demo-hello": "demo.cli:main", "MyTool": "demo.cli:App.run [extra]"},
        "gui_scripts": {"demo-gui": "demo.cli:main"},
        "demo.plugins": {"CaseKept": "demo:VALUE"},
    }


def test_installed_record(store: Store, tmp_path: Path) -> None:
    m = ingest_wheel(store, _full_wheel(tmp_path))
    by_path = {e.path: e for e in m.files}
    record = _obj(store, by_path["demo-1.0.dist-info/RECORD"].digest).decode()
    rows = {r[0]: (r[1], r[2]) for r in csv.reader(io.StringIO(record)) if r}
    for e in m.files:
        if e.path != "demo-1.0.dist-info/RECORD":
            assert rows[e.path] == (_sha(_obj(store, e.digest)), str(e.size)), e.path
    assert rows["demo-1.0.dist-info/RECORD"] == ("", "")
    # launchers and the '#!python' script are written per venv: no hash can hold for them
    for script in ("demo-hello", "MyTool", "demo-gui", "demo-py"):
        assert rows[f"../../../bin/{script}"] == ("", "")
    assert rows["../../../bin/demo-sh"] == (_sha(b"#!/bin/sh\necho sh\n"), "18")
    assert rows["../../../share/demo/readme.txt"] == (_sha(b"data file\n"), "10")
    assert len(rows) == len(m.files) + 6  # nothing else: no REQUESTED, no direct_url.json
    assert not any(p.endswith(("REQUESTED", "direct_url.json")) for p in by_path)


def test_stronger_record_hash_accepted_and_streaming(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wheel_mod, "STREAM_THRESHOLD", 4)  # every member through a temp file
    whl = wb.build(tmp_path, {"demo/__init__.py": b"X = 2\n" * 1000}, algo="sha512")
    m = ingest_wheel(store, whl)
    entry = next(e for e in m.files if e.path == "demo/__init__.py")
    assert _obj(store, entry.digest) == b"X = 2\n" * 1000
    assert list(store.tmp.iterdir()) == []  # temp files cleaned up


def test_newer_minor_wheel_version_accepted(store: Store, tmp_path: Path) -> None:
    assert ingest_wheel(store, wb.build(tmp_path, wheel_version="1.9")).name == "demo"


def test_dedup_across_wheels(store: Store, tmp_path: Path) -> None:
    shared = b"SHARED = True\n" * 50
    a = ingest_wheel(store, wb.build(tmp_path, {"demo/common.py": shared}))
    b = ingest_wheel(store, wb.build(tmp_path, {"other/common.py": shared}, name="other"))
    da = next(e.digest for e in a.files if e.path == "demo/common.py")
    db = next(e.digest for e in b.files if e.path == "other/common.py")
    assert da == db
    digests = {e.digest for m in (a, b) for e in m.files}
    assert sorted(d for d, _ in store.iter_objects()) == sorted(digests)  # one object each


def test_reingest_is_idempotent_and_warm(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whl = _full_wheel(tmp_path)
    first = ingest_wheel(store, whl)
    doc = (store.dists / f"{first.id}.json").read_bytes()

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("warm path must not read the wheel again")

    with monkeypatch.context() as m:  # (undo() would drop the autouse fixture's env too)
        m.setattr(wheel_mod, "_ingest", boom)
        assert ingest_wheel(store, whl) == first
    assert ingest_wheel(store, whl, force=True) == first
    assert (store.dists / f"{first.id}.json").read_bytes() == doc


def test_ids_and_manifests_are_deterministic(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    a = ingest_wheel(Store(tmp_path / "s1"), _full_wheel(one))
    b = ingest_wheel(Store(tmp_path / "s2"), _full_wheel(two))
    assert a.id == b.id and a.to_json() == b.to_json()
    changed = ingest_wheel(Store(tmp_path / "s1"), wb.build(one, {"demo/__init__.py": b"V=2\n"}))
    assert changed.id != a.id and changed.id.startswith("demo-1.0-")


def test_read_wheel_metadata(tmp_path: Path) -> None:
    whl = wb.build(tmp_path, name="Demo_Pkg", version="01.0", meta_extra="Requires-Dist: a\n")
    assert read_wheel_metadata(whl) == ("Demo_Pkg", "1.0", ["a"], None)


def test_real_wheel_metadata_if_available() -> None:
    found = sorted(Path("/opt/wheels").glob("torch-*.whl"))
    if not found:
        pytest.skip("no real wheel in /opt/wheels")
    name, version, requires, _python = read_wheel_metadata(found[0])
    assert name == "torch" and version.startswith("2.")
    assert any(r.startswith("filelock") for r in requires)


def test_venv_extra_files(store: Store, tmp_path: Path) -> None:
    m = ingest_wheel(store, wb.build(tmp_path))
    rows = venv_extra_files(store, m, requested=True, direct_url={"url": "file:///w.whl"})
    assert [r.path for r in rows] == [
        "demo-1.0.dist-info/REQUESTED",
        "demo-1.0.dist-info/direct_url.json",
    ]
    assert _obj(store, rows[0].digest) == b"" and rows[0].size == 0
    assert json.loads(_obj(store, rows[1].digest)) == {"url": "file:///w.whl"}
    assert venv_extra_files(store, m, requested=False, direct_url=None) == []
    with pytest.raises(WheelError, match="url"):
        venv_extra_files(store, m, requested=False, direct_url={"dir_info": {}})


# -- hostile and broken wheels: one clear error, no manifest ----------------------------


def _patched(tmp: Path, name: str, old: bytes, new: bytes, **kw: object) -> Path:
    """A wheel written normally, then bytes replaced in the archive (names, data)."""
    whl = wb.build(tmp, **kw)  # type: ignore[arg-type]
    raw = whl.read_bytes()
    assert old in raw
    out = tmp / name
    out.write_bytes(raw.replace(old, new))
    return out


def _with(tmp: Path, edit: Callable[[list[wb.Member]], list[wb.Member]], **kw: object) -> Path:
    content = edit(wb.members({"demo/__init__.py": b"VALUE = 1\n"}, **kw))  # type: ignore[arg-type]
    return wb.write(tmp / "demo-1.0-py3-none-any.whl", content)


def _replace_data(content: list[wb.Member], name: str, data: bytes) -> list[wb.Member]:
    return [(i, data if i.filename == name else d) for i, d in content]


INFO = "demo-1.0.dist-info"
REC = f"{INFO}/RECORD"


def _added(tmp: Path, info: zipfile.ZipInfo, data: bytes) -> Path:
    """A correct wheel plus one member, listed in a correct RECORD: only the member is bad."""
    return _with(tmp, lambda c: wb.with_record([*c[:-1], (info, data)], INFO))


def _truncated(tmp: Path) -> Path:
    whl = wb.build(tmp)
    whl.write_bytes(whl.read_bytes()[: whl.stat().st_size // 2])
    return whl


def _record_lists_missing(tmp: Path) -> Path:
    row = wb.record_row("demo/gone.py", b"gone").encode() + b"\n"
    return _with(tmp, lambda c: _replace_data(c, REC, c[-1][1] + row))


def _name_patch(old: bytes, new: bytes) -> Callable[[Path], Path]:
    return lambda t: _patched(t, "demo-1.0-py3-none-any.whl", old, new, files={old.decode(): b"x"})


CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "zip-slip": (lambda t: wb.build(t, {"../evil.py": b"x"}), "escapes the install"),
    "zip-slip-nested": (lambda t: wb.build(t, {"demo/../../e.py": b"x"}), "escapes the install"),
    "absolute": (lambda t: wb.build(t, {"/tmp/evil.py": b"x"}), "absolute path"),
    "backslash": (lambda t: wb.build(t, {"demo\\..\\e.py": b"x"}), "backslash"),
    "symlink": (
        lambda t: _added(t, wb.zinfo("demo/link", 0o777, stat.S_IFLNK), b"/etc/passwd"),
        "'demo/link' is a symlink",
    ),
    "duplicate": (lambda t: _with(t, lambda c: [c[0], *c]), "duplicate member 'demo/__init__"),
    "non-utf8-name": (_name_patch(b"demo/aXb.py", b"demo/a\xffb.py"), "not UTF-8"),
    "nul-in-name": (_name_patch(b"demo/aXb.py", b"demo/a\0b.py"), "NUL byte"),
    "truncated": (_truncated, "not a readable zip"),
    "crc": (
        lambda t: _patched(t, "demo-1.0-py3-none-any.whl", b"VALUE = 1", b"VALUE = 2"),
        "corrupt: member 'demo/__init__.py'.*CRC",
    ),
    "record-mismatch": (
        lambda t: _with(t, lambda c: _replace_data(c, "demo/__init__.py", b"VALUE = 666\n")),
        "'demo/__init__.py' does not match its RECORD entry",
    ),
    "record-missing": (lambda t: _with(t, lambda c: c[:-1]), f"has no {REC}"),
    "not-in-record": (
        lambda t: _with(t, lambda c: [*c, (wb.zinfo("demo/sneaky.py"), b"x")]),
        "'demo/sneaky.py' is not listed in RECORD",
    ),
    "record-lists-missing": (_record_lists_missing, "RECORD lists 'demo/gone.py', which is not"),
    "weak-hash": (lambda t: wb.build(t, algo="md5"), "uses hash 'md5'"),
    "wheel-version-2": (lambda t: wb.build(t, wheel_version="2.0"), "Wheel-Version 2.0"),
    "metadata-name": (
        lambda t: wb.build(t, meta_name="other"),
        "METADATA says other 1.0, the filename says demo 1.0",
    ),
    "unknown-scheme": (
        lambda t: wb.build(t, {"demo-1.0.data/etc/passwd": b"x"}),
        "unknown .data scheme 'etc'",
    ),
    "data-collision": (
        lambda t: wb.build(t, {"demo/a.py": b"1", "demo-1.0.data/platlib/demo/a.py": b"2"}),
        "two members install to site-packages/demo/a.py",
    ),
    "data-script-in-subdir": (
        lambda t: wb.build(t, {"demo-1.0.data/scripts/sub/x": b"x"}),
        "would escape the venv's bin",
    ),
    "script-escapes-bin": (
        lambda t: wb.build(t, entry_points="[console_scripts]\n../../evil = demo:main\n"),
        "would escape the venv's bin",
    ),
    "entry-point-injection": (
        lambda t: wb.build(t, entry_points="[console_scripts]\nx = os:system('id')\n"),
        "bad script entry point",
    ),
    "two-dist-info": (
        lambda t: _added(t, wb.zinfo("evil-1.0.dist-info/METADATA"), b""),
        "2 .dist-info directories",
    ),
    "bad-filename": (lambda t: wb.write(t / "demo.whl", wb.members()), "bad wheel filename"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_wheel_rejected(case: str, store: Store, tmp_path: Path) -> None:
    make, message = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate we make on purpose
        whl = make(tmp_path)
    with pytest.raises(WheelError, match=message) as info:
        ingest_wheel(store, whl)
    assert "\n" not in str(info.value)
    assert iter_manifests(store) == []


def test_incompatible_tags_rejected(store: Store, tmp_path: Path) -> None:
    whl = wb.build(tmp_path, tag="cp311-cp311-win_amd64")
    with pytest.raises(WheelError, match=r"not compatible with this interpreter \(tags cp311-cp"):
        ingest_wheel(store, whl, supported_tags=["cp311-cp311-manylinux_2_28_x86_64"])
    assert iter_manifests(store) == []


# -- per-venv files (installer.wheel.scripts) -----------------------------------------------


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("venvs") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    return path


def _site(store: Store, manifest: Manifest, site: Path) -> Path:
    """What the lower layer would show: the manifest's files, materialized."""
    for e in manifest.files:
        (site / e.path).parent.mkdir(parents=True, exist_ok=True)
        (site / e.path).write_bytes(_obj(store, e.digest))
    return site


def _run(cmd: list[str], site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_install_venv_files_and_run_launchers(store: Store, tmp_path: Path, venv: Path) -> None:
    m = ingest_wheel(store, _full_wheel(tmp_path))
    site = _site(store, m, tmp_path / "site")
    python = venv / "bin" / "python"
    written = install_venv_files(store, m, venv, python, purelib=venv / "lib/python3.11/x")
    bindir = venv / "bin"
    names = {"demo-hello", "MyTool", "demo-gui", "demo-py", "demo-sh"}
    header = venv / "include/site/python3.11/demo/demo.h"
    data = venv / "share/demo/readme.txt"
    assert set(written) == {bindir / n for n in names} | {header, data}
    for n in names:
        assert stat.S_IMODE((bindir / n).stat().st_mode) == 0o755, n
    assert header.read_bytes() == b"#define DEMO 1\n" and data.read_bytes() == b"data file\n"
    assert stat.S_IMODE(data.stat().st_mode) == 0o644
    assert not [p for p in bindir.iterdir() if p.name.startswith(".")]  # no temp files left

    launcher = (bindir / "demo-hello").read_text()
    assert launcher.startswith(f"#!{python}\n") and "from demo.cli import main" in launcher
    proc = _run([str(bindir / "demo-hello"), "a", "b"], site)
    assert (proc.returncode, proc.stdout) == (3, "hello a b\n"), proc.stderr
    proc = _run([str(bindir / "MyTool")], site)  # mod:obj.attr with an [extra]
    assert (proc.returncode, proc.stdout) == (3, "hello\n"), proc.stderr
    assert "from demo.cli import App" in (bindir / "MyTool").read_text()

    script = (bindir / "demo-py").read_bytes()
    assert script.startswith(f"#!{python} -u\nimport demo\n".encode())
    assert _run([str(bindir / "demo-py")], site).stdout == "py 1\n"
    assert (bindir / "demo-sh").read_bytes() == b"#!/bin/sh\necho sh\n"  # not '#!python'


def test_python_path_with_space_uses_sh_stanza(store: Store, tmp_path: Path, venv: Path) -> None:
    m = ingest_wheel(store, _full_wheel(tmp_path))
    site = _site(store, m, tmp_path / "site")
    spaced = tmp_path / "dir with space"
    spaced.mkdir()
    (spaced / "python").symlink_to(venv / "bin" / "python")
    target = tmp_path / "v2"
    install_venv_files(store, m, target, spaced / "python", headers_dir=tmp_path / "h")
    assert (target / "bin/demo-hello").read_bytes().startswith(b"#!/bin/sh\n'''exec' ")
    proc = _run([str(target / "bin/demo-hello"), "x y"], site)
    assert (proc.returncode, proc.stdout) == (3, "hello x y\n"), proc.stderr
    assert _run([str(target / "bin/demo-py")], site).stdout == "py 1\n"
    assert (tmp_path / "h/demo.h").is_file()


def test_shebang_rewrite_rules() -> None:
    assert split_python_shebang(b"#!python\nx") == (b"", b"x")
    assert split_python_shebang(b"#!pythonw -E\r\nx") == (b"-E", b"x")
    for other in (b"#!python3\n", b"#!/usr/bin/python\n", b"# !python\n", b"#!pythonx\n"):
        assert split_python_shebang(other) is None
    assert shebang("/p/python", b"-u") == b"#!/p/python -u\n"
    assert shebang("/" + "p" * 200).startswith(b"#!/bin/sh\n")  # kernel would truncate it


def test_remove_venv_files(store: Store, tmp_path: Path) -> None:
    m = ingest_wheel(store, _full_wheel(tmp_path))
    target = tmp_path / "v"
    (target / "bin").mkdir(parents=True)
    (target / "bin" / "python").write_text("keep")
    (target / "share" / "other").mkdir(parents=True)
    install_venv_files(
        store, m, target, Path("/usr/bin/python3"), purelib=target / "lib/python3.12/s"
    )
    remove_venv_files(m, target)
    assert [p.name for p in (target / "bin").iterdir()] == ["python"]
    assert not (target / "share" / "demo").exists() and (target / "share" / "other").is_dir()
    assert not (target / "include" / "site" / "python3.12" / "demo").exists()


@pytest.mark.parametrize(
    "bad",
    [
        {"entry_points": {"console_scripts": {"../evil": "demo.cli:main"}}},
        {"entry_points": {"console_scripts": {"sub/evil": "demo.cli:main"}}},
        {"entry_points": {"gui_scripts": {"ok": "demo.cli:main; import os"}}},
    ],
)
def test_install_refuses_escaping_script(
    store: Store, tmp_path: Path, bad: dict[str, object]
) -> None:
    m = dataclasses.replace(ingest_wheel(store, _full_wheel(tmp_path)), **bad)  # type: ignore[arg-type]
    target = tmp_path / "v"
    with pytest.raises(WheelError):
        install_venv_files(store, m, target, Path("/usr/bin/python3"), headers_dir=tmp_path / "h")
    assert not (tmp_path / "evil").exists() and not target.exists()  # nothing written at all


def test_install_refuses_relative_interpreter(store: Store, tmp_path: Path) -> None:
    m = ingest_wheel(store, _full_wheel(tmp_path))
    with pytest.raises(WheelError, match="interpreter path"):
        install_venv_files(store, m, tmp_path / "v", Path("python3"), headers_dir=tmp_path / "h")
    assert not (tmp_path / "v").exists()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("COWFS_SLOW_TESTS") != "1", reason="set COWFS_SLOW_TESTS=1")
def test_real_wheel_ingest(store: Store) -> None:
    """A big real wheel (about 12 s for torch) passes every check and installs consistently."""
    found = sorted(Path("/opt/wheels").glob("*.whl"))
    if not found:
        pytest.skip("no real wheel in /opt/wheels")
    m = ingest_wheel(store, found[0])
    record = next(e for e in m.files if e.path == f"{m.dist_info}/RECORD")
    rows = {r[0] for r in csv.reader(io.StringIO(_obj(store, record.digest).decode())) if r}
    assert {e.path for e in m.files} <= rows
    assert ingest_wheel(store, found[0]) == m


# -- read_whole: one pread and one inflate per member, checked as zipfile checks -----------


def _deflated(tmp: Path, members: dict[str, bytes], extra: bytes = b"") -> Path:
    path = tmp / "deflated.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, wb.DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.extra = extra
            zf.writestr(info, data)
    return path


def test_read_whole_reads_what_zipfile_reads(tmp_path: Path) -> None:
    rng = random.Random(7)
    members = {"empty": b"", "one": b"x", "text.py": b"import os\n" * 500,
               "noise.bin": rng.randbytes(200_000)}
    for extra in (b"", b"\xfe\xca" + (100).to_bytes(2, "little") + b"e" * 100):  # > guess
        path = _deflated(tmp_path, members, extra)
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                assert read_whole(zf, info, "w") == zf.read(info) == members[info.filename]


def test_read_whole_refuses_what_zipfile_refuses(tmp_path: Path) -> None:
    data = b"VALUE = 1\n" * 300
    path = _deflated(tmp_path, {"demo/a.py": data})
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("demo/a.py")
    start = 30 + len(b"demo/a.py")
    stream = raw[start:start + info.compress_size]

    def corrupt(patched: bytes, **changes: int) -> str:
        bad = tmp_path / "bad.zip"
        bad.write_bytes(patched)
        with zipfile.ZipFile(bad) as zf:
            member = zf.getinfo("demo/a.py")
            for field, value in changes.items():
                setattr(member, field, value)
            with pytest.raises(WheelError, match=r"is corrupt: member 'demo/a\.py'") as exc:
                read_whole(zf, member, "w")
        return str(exc.value)

    flipped = stream[:5] + bytes([stream[5] ^ 0xFF]) + stream[6:]
    corrupt(raw.replace(stream, flipped))
    assert "differ" in corrupt(raw.replace(b"demo/a.py", b"demo/b.py", 1))  # local name only
    assert "declared" in corrupt(raw, file_size=len(data) - 1)  # never inflated past it
    assert "CRC" in corrupt(raw, CRC=info.CRC ^ 1)
    assert "magic" in corrupt(raw, header_offset=1)
