"""`cowfs install` from an HTTP index that misbehaves: one error line, the venv unchanged, a
retry completes. The index (PEP 503 pages, PEP 658 metadata) is served on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cowfs.mount.spec import VenvState
from cowfs.store.manifest import read_manifest
from cowfs.store.store import Store
from tests.conftest import cowfs, one_line_error, serving
from tests.wheelbuild import build


class Index:
    """Serves wheels from a directory; names in `broken` answer 404, in `short` are cut."""

    def __init__(self, wheels: list[Path]) -> None:
        self.files = {w.name: w.read_bytes() for w in wheels}
        self.broken: set[str] = set()
        self.short: set[str] = set()
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                body = index.page(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "text/html" if self.path.startswith("/simple")
                                 else "application/octet-stream")
                self.end_headers()
                name = self.path.rsplit("/", 1)[-1]
                self.wfile.write(body[:100] if name in index.short else body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/simple"

    def page(self, path: str) -> bytes | None:
        parts = path.strip("/").split("/")
        if parts[0] == "files" and len(parts) == 2:
            name = parts[1]
            if name.endswith(".metadata"):
                data = self.files.get(name.removesuffix(".metadata"))
                return None if data is None else self.metadata(name.removesuffix(".metadata"))
            return None if name in self.broken else self.files.get(name)
        if parts[0] == "simple" and len(parts) == 2:
            links = []
            for name, data in self.files.items():
                if name.split("-")[0] == parts[1]:
                    core = hashlib.sha256(self.metadata(name)).hexdigest()
                    links.append(f'<a href="../../files/{name}#sha256='
                                 f'{hashlib.sha256(data).hexdigest()}" '
                                 f'data-core-metadata="sha256={core}">{name}</a>')
            return "\n".join(["<html><body>", *links, "</body></html>"]).encode() \
                if links else None
        return None

    def metadata(self, wheel: str) -> bytes:
        import io
        import zipfile

        with zipfile.ZipFile(io.BytesIO(self.files[wheel])) as zf:
            return zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA")))


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    links = tmp_path / "links"
    links.mkdir()
    wheels = [build(links, {"alpha/__init__.py": b"from beta import B\nA = B + 1\n"},
                    name="alpha", meta_extra="Requires-Dist: beta\n"),
              build(links, {"beta/__init__.py": b"B = 41\n"}, name="beta", meta_extra="")]
    srv = Index(wheels)
    with serving(srv.httpd):
        yield srv


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """Only this index: no pip.conf or uv settings of the machine, an empty uv cache."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "PIP_"))}
    out.update(PIP_CONFIG_FILE=os.devnull, UV_CACHE_DIR=str(tmp_path / "uv-cache"),
               UV_NO_CONFIG="1")
    return out


@pytest.mark.parametrize("fault", ["404", "truncated"])
def test_a_failed_download_changes_nothing_and_a_retry_completes(
        index: Index, env: dict[str, str], venvs: Callable[[str], Path], fault: str) -> None:
    venv = venvs("v")
    beta = "beta-1.0-py3-none-any.whl"
    (index.broken if fault == "404" else index.short).add(beta)
    state_before = VenvState.path_for(venv).read_bytes()
    proc = cowfs("install", "--venv", str(venv), "alpha", "--index-url", index.url,
                 check=False, env=env)
    one_line_error(proc, beta)
    assert VenvState.path_for(venv).read_bytes() == state_before, "the venv is unchanged"
    store = Store()
    assert not any(read_manifest(store, p.stem).name == "beta" for p in
                   store.dists.glob("*.json")), "no manifest of the wheel that failed"
    assert not list(store.wheels.glob("*.part")) and not list(store.tmp.iterdir())
    index.broken.clear()
    index.short.clear()
    cowfs("install", "--venv", str(venv), "alpha", "--index-url", index.url, "-q", env=env)
    out = subprocess.run([str(venv / "bin" / "python"), "-c", "import alpha; print(alpha.A)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout == "42\n"
    assert sorted(d.split("-")[0] for d in VenvState.load(venv).dists) == ["alpha", "beta"]
