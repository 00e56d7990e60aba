"""Fuzzing the parsers that read files a user (or a corrupt disk) controls: manifests, venv
state, requirement locks and pylock.toml. Each must answer with its own error type (one line
on the command line) and never anything else; a manifest must never accept an unsafe path.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from cowfs.errors import CowfsError, StoreError
from cowfs.mount.spec import VenvState
from cowfs.store.manifest import Manifest, read_manifest
from cowfs.store.store import Store
from installer.resolve.locks import read_lock

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

json_leaf = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
             | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=5)
                          | st.dictionaries(st.text(max_size=10), c, max_size=5),
                          max_leaves=25)

# Path pieces that have broken path checks somewhere: traversal, separators, NUL, long and
# multi-byte components, surrogates.
PIECES = ["..", ".", "", "a", "pkg", "x.py", "\\", "\\..", "\0", " ", "..\u2024",
          "\u00e9" * 128, "\U0001f600" * 64, "n" * 255, "n" * 256, "\udcff", "\ud800", "/",
          "~", "\n"]
hostile_path = (st.lists(st.sampled_from(PIECES), min_size=1, max_size=6).map("/".join)
                | st.text(max_size=40))
DIGEST = "0123456789abcdef" * 2
digest = st.sampled_from([DIGEST, DIGEST.upper(), DIGEST[:31], "", "g" * 32]) | st.text(max_size=33)


def row(path: Any = None) -> st.SearchStrategy[Any]:
    good = st.tuples(hostile_path if path is None else st.just(path), digest,
                     st.integers(-1, 2**40), st.integers(-1, 0o20000)).map(list)
    return good | json_value


def manifest_doc() -> st.SearchStrategy[dict[str, Any]]:
    base = {"format": 1, "id": "demo-1.0-0123456789abcdef", "name": "demo", "version": "1.0",
            "files": [["demo/__init__.py", DIGEST, 3, 0o644]]}
    fields = st.fixed_dictionaries({}, optional={
        "format": st.just(1) | json_value, "id": st.text(max_size=30) | json_value,
        "name": st.text(max_size=10), "version": st.text(max_size=10),
        "mtime_ns": json_value, "tags": json_value, "dist_info": json_value,
        "files": st.lists(row(), max_size=4) | json_value,
        "data": st.dictionaries(st.sampled_from(["scripts", "headers", "data", "purelib"]),
                                st.lists(row(), max_size=3), max_size=3) | json_value,
        "entry_points": st.dictionaries(st.text(max_size=8), st.dictionaries(
            st.text(max_size=8), st.text(max_size=8) | json_value, max_size=2),
            max_size=2) | json_value,
    })
    return fields.map(lambda f: {**base, **f})


def is_safe(path: object) -> bool:
    if not isinstance(path, str) or not path or path.startswith("/") \
            or "\\" in path or "\0" in path:
        return False
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        return False
    return all(part not in ("", ".", "..")
               and len(part.encode("utf-8", "surrogateescape")) <= 255
               for part in path.split("/"))


def check_manifest(doc: Any) -> None:
    try:
        m = Manifest.from_json(doc)
    except StoreError:
        return
    rows = [*m.files, *(e for entries in m.data.values() for e in entries)]
    for e in rows:
        assert is_safe(e.path), f"unsafe path accepted: {e.path!r}"
        assert len(e.digest) == 32 and set(e.digest) <= set("0123456789abcdef")
        assert e.size >= 0 and not e.mode & ~0o7777
    assert "/" not in m.id and not m.id.startswith(".") and m.id.isprintable()
    assert Manifest.from_json(json.loads(json.dumps(m.to_json()))) == m  # round trip


@FUZZ
@given(json_value)
def test_manifest_parser_on_arbitrary_json(doc: Any) -> None:
    check_manifest(doc)


@FUZZ
@given(manifest_doc())
@example({"format": 1, "id": "a", "name": "a", "version": "1",
          "files": [["\u00e9" * 128, DIGEST, 1, 0o644]]})
@example({"format": 1, "id": "a", "name": "a", "version": "1",
          "files": [["a/../../etc/passwd", DIGEST, 1, 0o644]]})
@example({"format": 1, "id": "a", "name": "a", "version": "1", "files": [],
          "data": {"scripts": [["/etc/cron.d/x", DIGEST, 1, 0o755]]}})
def test_manifest_parser_never_accepts_an_unsafe_path(doc: dict[str, Any]) -> None:
    check_manifest(doc)


@FUZZ
@given(st.binary(max_size=300) | json_value.map(lambda v: json.dumps(v).encode()))
@example(b"[" * 100_000)
@example(b'{"format": 1, "venv": 1}')
@example(b"[]")
def test_manifest_file_reader(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    store = Store(tmp_path_factory.mktemp("store"))
    store.dists.mkdir(parents=True)
    (store.dists / "x.json").write_bytes(data)
    try:
        read_manifest(store, "x")
    except StoreError:
        pass


def state_doc() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={
        "format": st.just(1) | json_value, "venv": st.text(max_size=20) | json_value,
        "site_packages": st.text(max_size=20) | json_value,
        "store": st.text(max_size=20) | json_value, "python": json_value,
        "cowfs_exe": json_value, "dists": json_value, "bytecode": json_value,
        "extra": st.lists(row(), max_size=3) | json_value, "requested": json_value,
        "scripts": json_value})


@FUZZ
@given(st.binary(max_size=300) | json_value.map(lambda v: json.dumps(v).encode())
       | state_doc().map(lambda v: json.dumps(v).encode()))
@example(b"[]")
@example(b"1")
@example(b"[" * 100_000)
@example(b"\xff\xfe")
@example(b'{"format": 1, "venv": "/v", "site_packages": "/v/s", "store": "/s", "scripts": "ab"}')
def test_venv_state_loader(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    venv = tmp_path_factory.mktemp("venv")
    VenvState.path_for(venv).parent.mkdir()
    VenvState.path_for(venv).write_bytes(data)
    try:
        state = VenvState.load(venv)
    except CowfsError:
        return
    assert all(is_safe(e.path) for e in state.extra)


REQ_PIECES = ["pkg", "Pkg_Name", "==", "===", ">=", "1.0", "1.*", "[extra]", "@",
              "https://example.invalid/pkg-1.0-py3-none-any.whl", "http://[::1/x.whl",
              "file:///x.whl", "; python_version < '3'", "; os_name == 'posix'",
              "; bogus_marker ~= '1'", " --hash=sha256:" + "a" * 64, " --hash=md5:00",
              "-r", "-r other.txt", "-c c.txt", "-e .", "-i https://x", "--no-index", "#",
              " # comment", "\\", "\n", "\0", "\t", "\r\n", "\u00e9", "'", '"', "(", ")", " "]
req_text = (st.lists(st.sampled_from(REQ_PIECES), max_size=12).map("".join)
            | st.text(max_size=80))


@FUZZ
@given(req_text)
@example("-r \0\n")
@example("-r requirements.txt\n")
@example("pkg===\n")  # packaging accepts "===" with an empty version
@example("pkg @ http://[::1/pkg-1.0-py3-none-any.whl\n")
@example("pkg==1.0 --hash=sha256:" + "a" * 64 + " --hash=sha256:" + "b" * 64 + "\n")
def test_requirements_lock_reader(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    d = tmp_path_factory.mktemp("req")
    (d / "other.txt").write_text("other==2.0\n")
    path = d / "requirements.txt"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        pins = read_lock(path)
    except CowfsError:
        return
    for pin in pins:
        assert pin.name and pin.version


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float) and not isinstance(v, bool):
        return repr(v) if v == v and abs(v) != float("inf") else "nan"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()
                               if x is not None) + "}"
    return '""'


WHEEL_NAMES = ["pkg-1.0-py3-none-any.whl", "pkg-1.0-cp99-cp99-win32.whl", "pkg-1.0.tar.gz",
               "other-1.0-py3-none-any.whl", "pkg-2-py3-none-any.whl", "x.whl", ""]
wheel = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(WHEEL_NAMES) | st.text(max_size=12),
    "url": st.sampled_from(["https://e.invalid/pkg-1.0-py3-none-any.whl", "http://[::1/a.whl",
                            "file:///nope.whl", ""]) | st.text(max_size=12),
    "path": st.sampled_from(["pkg-1.0-py3-none-any.whl", "../x.whl", "/etc/passwd", "\0"])
    | st.text(max_size=8),
    "hashes": st.fixed_dictionaries({}, optional={"sha256": st.text(max_size=64)})
    | json_value})
package = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["pkg", "other", ""]) | json_value,
    "version": st.sampled_from(["1.0", "2", "x"]) | json_value,
    "marker": st.sampled_from(["python_version >= '3'", "bogus", "extra == 'x'",
                               "'group' in dependency_groups"]) | json_value,
    "wheels": st.lists(wheel, max_size=3) | json_value,
    "sdist": json_value, "requires-python": st.text(max_size=6) | json_value})
pylock = st.fixed_dictionaries({}, optional={
    "lock-version": st.sampled_from(["1.0", "1", "2.0", "x"]) | json_value,
    "environments": st.lists(st.sampled_from(["os_name == 'posix'", "bad marker", ""]),
                             max_size=2) | json_value,
    "requires-python": st.sampled_from([">=3", "<3", "~=", "==3.*"]) | json_value,
    "default-groups": json_value, "packages": st.lists(package, max_size=3) | json_value})


def pylock_text(doc: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in doc.items()
                   if v is not None)


@FUZZ
@given(pylock.map(pylock_text) | st.text(max_size=120, alphabet=string.printable + "\u00e9"))
@example('lock-version = "1.0"\n[[packages]]\nname = "pkg"\n'
         '[[packages.wheels]]\nurl = "http://[::1/pkg-1.0-py3-none-any.whl"\n'
         'hashes = {sha256 = "00"}\n')
@example('lock-version = "1.0"\n[[packages]]\nname = "pkg"\n'
         '[[packages.wheels]]\npath = "a\\u0000b"\nhashes = {sha256 = "00"}\n')
@example('lock-version = "1.0"\ndefault-groups = [{}]\npackages = []\n')
def test_pylock_reader(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    d = tmp_path_factory.mktemp("pylock")
    path = d / "pylock.toml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        pins = read_lock(path, supported_tags=["py3-none-any"])
    except CowfsError:
        return
    for pin in pins:
        assert pin.name and pin.filename.endswith(".whl")


def test_fuzz_targets_reject_what_they_must(tmp_path: Path) -> None:
    """The properties above are not vacuous: known-bad inputs are refused."""
    with pytest.raises(StoreError):
        Manifest.from_json({"format": 1, "id": "a", "name": "a", "version": "1",
                            "files": [["../x", DIGEST, 1, 0o644]]})
    assert not is_safe("a/../b") and not is_safe("\u00e9" * 128) and is_safe("a/b.py")
    (tmp_path / "r.txt").write_text("pkg>=1\n")
    with pytest.raises(CowfsError, match="not pinned"):
        read_lock(tmp_path / "r.txt")
