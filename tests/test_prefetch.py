"""Wheels downloaded and ingested while uv resolves (installer.resolve.prefetch): uv's log lines as
uv 0.13 writes them, and `cowfs install` through a PEP 503 index on 127.0.0.1, with and
without the speculation (COWFS_PREFETCH=0): the same venv, the same errors."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cowfs.mount.spec import VenvState
from cowfs.store.store import Store
from installer.resolve import prefetch, resolve
from tests.conftest import cowfs, one_line_error, serving
from tests.test_install_network import Index
from tests.wheelbuild import build

pytestmark = pytest.mark.skipif(resolve.find_uv() is None, reason="needs uv")

# Real lines of `uv pip compile` (uv 0.13.9, RUST_LOG=installer.resolve.resolve.UV_LOG).
PYPI = "https://files.pythonhosted.org/packages/82/c6/dddba524648da23345e446e6413530474e1"
REAL = {
    f"DEBUG No cache entry for: {PYPI}/httpx-0.29.0-py3-none-any.whl":
        ("url", f"{PYPI}/httpx-0.29.0-py3-none-any.whl"),
    f"DEBUG Sending fresh HEAD request for: {PYPI}/httpx-0.29.0-py3-none-any.whl":
        ("url", f"{PYPI}/httpx-0.29.0-py3-none-any.whl"),
    "DEBUG No cache entry for: http://127.0.0.1:41391/files/beta-1.0-py3-none-any.whl.metadata":
        ("url", "http://127.0.0.1:41391/files/beta-1.0-py3-none-any.whl"),
    "DEBUG Selecting: pygments==2.21.0 [compatible] (pygments-2.21.0-py3-none-any.whl)":
        ("selected", "pygments-2.21.0-py3-none-any.whl"),
    "DEBUG Selecting: pydantic-core==2.50.5 [compatible] (pydantic_core-2.50.5-cp311-cp311-"
    "manylinux2014_x86_64.manylinux_2_17_x86_64.whl)":
        ("selected", "pydantic_core-2.50.5-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_"
                     "x86_64.whl"),
    "\x1b[34mDEBUG\x1b[0m Selecting: h11==0.16.0 [compatible] (h11-0.16.0-py3-none-any.whl)":
        ("selected", "h11-0.16.0-py3-none-any.whl"),
    "DEBUG No cache entry for: https://pypi.org/simple/pygments/": None,
    "DEBUG Adding transitive dependency for rich==15.0.0: pygments>=2.13.0, <3.0.0": None,
    "DEBUG Selecting: typing-extensions==4.16.0 [compatible] (typing_extensions-4.16.0.tar.gz)":
        None,
    "warning: The `--only-binary` flag is experimental": None,
}


@pytest.mark.parametrize("line", REAL, ids=range(len(REAL)))
def test_log_lines(line: str) -> None:
    assert prefetch.parse(line) == REAL[line]


def test_log_lines_never_reach_errors_or_warnings() -> None:
    stderr = ("DEBUG Searching for a compatible version of gamma (>=2)\n"
              "\x1b[2mTRACE\x1b[0m Chose package for decision: gamma\n"
              "  \u00d7 No solution found when resolving dependencies:\n"
              "warning: something uv says\n")
    seen: list[str] = []
    kept: list[str] = []
    resolve._split_log(io.StringIO(stderr), seen.append, kept)
    assert kept == ["  \u00d7 No solution found when resolving dependencies:\n",
                    "warning: something uv says\n"]
    assert len(seen) == 2 and seen[0].startswith("DEBUG Searching")


class LoggedIndex(Index):
    """The index, recording each request as it arrives and once answered; answers named
    in `slow` wait first (uv cannot finish resolving before it has them)."""

    def __init__(self, wheels: list[Path], slow: dict[str, float] | None = None) -> None:
        super().__init__(wheels)
        self.events: list[str] = []
        self.slow = slow or {}
        self.tampered: dict[str, bytes] = {}  # served instead of the listed wheel
        self._lock = threading.Lock()

    def page(self, path: str) -> bytes | None:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        with self._lock:
            self.events.append(f"GET {name}")
        time.sleep(self.slow.get(name, 0))
        body = self.tampered.get(name) if path.startswith("/files/") else None
        body = body if body is not None else super().page(path)
        with self._lock:
            self.events.append(f"answered {name}")
        return body

    def gets(self, name: str) -> int:
        return self.events.count(f"GET {name}")


ALPHA1, ALPHA2 = "alpha-1.0-py3-none-any.whl", "alpha-2.0-py3-none-any.whl"
BETA = "beta-1.0-py3-none-any.whl"


@pytest.fixture
def links(tmp_path: Path) -> Path:
    """alpha 2.0 needs gamma>=2, which does not exist: uv reads its metadata, then settles
    on alpha 1.0 (which needs beta only)."""
    links = tmp_path / "links"
    links.mkdir()
    build(links, {"alpha/__init__.py": b"from beta import B\nA = B + 1\n"}, name="alpha",
          meta_extra="Requires-Dist: beta\n")
    build(links, {"alpha/__init__.py": b"A = 2\n"}, name="alpha", version="2.0",
          meta_extra="Requires-Dist: beta\nRequires-Dist: gamma>=2\n")
    build(links, {"gamma/__init__.py": b""}, name="gamma", meta_extra="")
    build(links, {"beta/__init__.py": b"B = 41\n"}, name="beta", meta_extra="")
    return links


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """Only the test's index, uv resolving, an empty uv cache."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "PIP_", "COWFS_PRE"))}
    out.update(PIP_CONFIG_FILE=os.devnull, UV_CACHE_DIR=str(tmp_path / "uv-cache"),
               UV_NO_CONFIG="1", COWFS_RESOLVER="uv")
    return out


@pytest.fixture
def index(links: Path) -> Iterator[LoggedIndex]:
    # gamma's page, which makes uv leave alpha 2.0 (and drop its download), comes late
    srv = LoggedIndex(sorted(links.glob("*.whl")), slow={"gamma": 0.5,
                                                         f"{ALPHA1}.metadata": 0.5})
    with serving(srv.httpd):
        yield srv


def _installed(venv: Path) -> tuple[list[str], dict[str, str]]:
    """The venv's distribution ids and its site-packages files (bytecode aside) by hash."""
    site = VenvState.load(venv).site_packages
    files = {str(p.relative_to(site)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in site.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    return sorted(VenvState.load(venv).dists), files


def test_wheels_are_fetched_while_uv_resolves_and_the_result_is_the_same(
        index: LoggedIndex, env: dict[str, str], venvs: Callable[[str], Path],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = {}
    for how in ("0", "1"):  # without the speculation, then with it, each with its own store
        monkeypatch.setenv("COWFS_HOME", str(tmp_path / f"home{how}"))
        venv = venvs(f"v{how}")
        index.events.clear()
        proc = cowfs("install", "--venv", str(venv), "alpha", "--index-url", index.url,
                     env={**env, "COWFS_HOME": str(tmp_path / f"home{how}"),
                          "COWFS_PREFETCH": how})
        results[how] = (proc.stdout.splitlines()[:-1], proc.stderr, _installed(venv))
        assert index.gets(ALPHA1) == index.gets(BETA) == 1, "downloaded once each"
    assert results["1"] == results["0"]
    dists, files = results["1"][2]
    assert [d.rsplit("-", 1)[0] for d in dists] == ["alpha-1.0", "beta-1.0"]
    assert "alpha/__init__.py" in files
    # Speculation: alpha 2.0, which uv read the metadata of and did not pick, was downloaded
    # (nothing but the speculation fetches a wheel uv did not pin), before uv had what it
    # needed to finish; it was not installed, and left nothing installable behind.
    events = index.events
    assert index.gets(ALPHA2) == 1
    assert events.index(f"GET {ALPHA2}") < events.index(f"answered {ALPHA1}.metadata")
    assert events.index(f"GET {BETA}") < events.index(f"answered {ALPHA1}.metadata")
    store = Store(tmp_path / "home1")
    assert not list(store.dists.glob("alpha-2.0-*")), "no manifest of alpha 2.0"
    assert sorted(p.name for p in store.wheels.rglob("*.whl")) == [ALPHA1, BETA]


def test_a_wheel_whose_bytes_differ_from_its_hash_is_not_installed(
        index: LoggedIndex, env: dict[str, str], venvs: Callable[[str], Path],
        links: Path, tmp_path: Path) -> None:
    venv = venvs("v")
    other = build(tmp_path, {"beta/__init__.py": b"B = 666\n"}, name="beta", meta_extra="")
    index.tampered[BETA] = other.read_bytes()  # the index lists the hash of the real one
    before = VenvState.path_for(venv).read_bytes()
    errors = {}
    for how in ("0", "1"):
        index.events.clear()
        proc = cowfs("install", "--venv", str(venv), "alpha", "--index-url", index.url,
                     check=False, env={**env, "COWFS_PREFETCH": how})
        one_line_error(proc, f"{BETA}: sha256 mismatch")
        errors[how] = proc.stderr
        # the speculation downloaded it too, then fetch did, and found it wrong
        assert index.gets(BETA) == 1 + int(how)
        assert VenvState.path_for(venv).read_bytes() == before, "the venv is unchanged"
        store = Store()
        assert not list(store.dists.glob("beta-*")), "no manifest of the wrong bytes"
        assert not list(store.wheels.rglob(BETA)), "nothing left to install it from"
    assert errors["1"] == errors["0"]


def test_resolver_errors_are_unchanged(index: LoggedIndex, env: dict[str, str],
                                       venvs: Callable[[str], Path]) -> None:
    venv = venvs("v")
    errors = {}
    for how in ("0", "1"):
        proc = cowfs("install", "--venv", str(venv), "alpha>=2", "--index-url", index.url,
                     check=False, env={**env, "COWFS_PREFETCH": how})
        one_line_error(proc, "gamma")
        errors[how] = proc.stderr
    assert errors["1"] == errors["0"]
    assert not list(Store().dists.glob("*.json"))
    assert not list(Store().wheels.rglob("*.whl")), "downloads of a failed resolve are deleted"


def test_a_pin_gets_the_ingestion_of_the_very_same_file_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ingestions started before the pins are known are keyed by the file's name and stat
    fingerprint: the same file is not ingested twice (also once moved by the caller), a
    rewritten one is ingested afresh, and a speculation that failed is redone for the pin."""
    from types import SimpleNamespace

    from cowfs.store.manifest import read_manifest
    from installer.resolve.resolve import Pin
    from installer.wheel import ingest as ingest_mod
    from installer.wheel.ingest import Ingestor

    calls: list[str] = []
    fail = {"c"}
    real = ingest_mod.ingest_wheel

    def counted(store: Store, path: Path, **kw: object) -> object:
        calls.append(path.name.split("-")[0])
        if path.name.split("-")[0] in fail:
            fail.clear()
            raise OSError("a speculation that failed")
        return real(store, path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ingest_mod, "ingest_wheel", counted)
    wheels = {n: build(tmp_path, {f"{n}/__init__.py": b"V = 1\n"}, name=n, meta_extra="")
              for n in "abcd"}
    pins = [Pin(name=n, version="1.0", url=w.as_uri(), filename=w.name)
            for n, w in wheels.items()]
    store = Store(tmp_path / "store").ensure()
    ingest = Ingestor(store, SimpleNamespace(tags=["py3-none-any"]))  # type: ignore[arg-type]
    try:
        for wheel in wheels.values():
            ingest.speculate(wheel)
        time.sleep(0.2)
        build(tmp_path, {"b/__init__.py": b"V = 2\n"}, name="b", meta_extra="")  # rewritten
        (tmp_path / "moved").mkdir()
        before = wheels["d"].stat()
        wheels["d"] = wheels["d"].rename(tmp_path / "moved" / wheels["d"].name)
        ingest.moved(tmp_path / wheels["d"].name, before, wheels["d"], wheels["d"].stat())
        for pin, wheel in zip(pins, wheels.values(), strict=True):
            ingest.submit(pin, wheel)
        got = ingest.results(pins, progress=False)
    finally:
        ingest.close()
    assert sorted(calls) == ["a", "b", "b", "c", "c", "d"]
    files = {e.path: e.digest for e in read_manifest(store, got["b"].id).files}
    assert store.object_path(files["b/__init__.py"]).read_bytes() == b"V = 2\n"
    assert sorted(p.stem.split("-")[0] for p in store.dists.glob("*.json")) == list("abcd")
