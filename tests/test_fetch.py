"""installer.resolve.fetch: local wheels in place, downloads from a 127.0.0.1 HTTP server: no
network."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from cowfs import tls as cowfs_tls
from cowfs.errors import CowfsError
from installer.resolve import fetch as fetch_mod, http_pool
from installer.resolve.fetch import fetch, fetch_async
from installer.resolve.resolve import Pin
from tests.conftest import serving


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wheel_name(name: str) -> str:
    return f"{name}-1.0-py3-none-any.whl"


def pin(name: str, url: str, sha256: str | None = None, hashes: tuple[str, ...] = ()) -> Pin:
    return Pin(name, "1.0", url, wheel_name(name), sha256=sha256, hashes=hashes)


class Server:
    """Serves `files` by name; `plan[name]` lists status codes to answer first (503, ...)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.plan: dict[str, list[int]] = {}
        self.truncate: set[str] = set()
        self.trickle: set[str] = set()  # sent in 20 pieces, 0.1 s apart
        self.delay = 0.0
        self.redirect: dict[str, str] = {}  # name -> Location of a 302
        self.drop_idle = False  # close kept-alive connections after each response, unsaid
        self.connections = 0
        self.auth: dict[str, str | None] = {}  # name -> Authorization header last received
        self.hits: Counter[str] = Counter()
        self.active = self.max_active = 0
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with server.lock:
                    server.connections += 1

            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                with server.lock:
                    server.hits[name] += 1
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                    server.auth[name] = self.headers.get("Authorization")
                try:
                    time.sleep(server.delay)
                    planned = server.plan.get(name)
                    if name in server.redirect:
                        self.send_response(302)
                        self.send_header("Location", server.redirect[name])
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                    elif planned:
                        self.send_error(planned.pop(0))
                    elif name not in server.files:
                        self.send_error(404)
                    else:
                        body = server.files[name]
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        if name in server.trickle:
                            step = max(1, len(body) // 20)
                            try:
                                for i in range(0, len(body), step):
                                    self.wfile.write(body[i:i + step])
                                    self.wfile.flush()
                                    time.sleep(0.1)
                            except (BrokenPipeError, ConnectionResetError):
                                pass  # the client gave up, as it should
                        else:
                            self.wfile.write(body[:10] if name in server.truncate else body)
                        if name in server.truncate or server.drop_idle:
                            self.close_connection = True
                finally:
                    with server.lock:
                        server.active -= 1

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def keep_alive(self) -> None:
        """HTTP/1.1: connections stay open between requests (http.server's default is 1.0)."""
        self.httpd.RequestHandlerClass.protocol_version = "HTTP/1.1"

    def add(self, name: str, data: bytes) -> Pin:
        self.files[wheel_name(name)] = data
        return pin(name, f"{self.url}/{wheel_name(name)}", sha(data))


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    with serving(srv.httpd):
        yield srv


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch_mod, "RETRY_DELAY", 0.01)


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name.endswith(".part"))


# -- local wheels --------------------------------------------------------------------------


def test_local_wheels_are_used_in_place_after_the_hash_check(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / wheel_name("a")).write_bytes(b"wheel a")
    (src / wheel_name("b")).write_bytes(b"wheel b")
    dest = tmp_path / "dest"
    got = fetch([pin("a", (src / wheel_name("a")).as_uri(), sha(b"wheel a")),
                 pin("b", str(src / wheel_name("b")), hashes=("0" * 64, sha(b"wheel b")))],
                dest, progress=False)
    assert got == {"a": src / wheel_name("a"), "b": src / wheel_name("b")}
    assert list(dest.iterdir()) == []  # nothing copied


def test_local_hash_mismatch_and_missing_file(tmp_path: Path) -> None:
    local = tmp_path / wheel_name("a")
    local.write_bytes(b"tampered")
    with pytest.raises(CowfsError, match=rf"^{wheel_name('a')}: sha256 mismatch \(expected "
                                         rf"{'1' * 64}, got {sha(b'tampered')}\)"):
        fetch([pin("a", local.as_uri(), "1" * 64)], tmp_path / "d", progress=False)
    assert local.read_bytes() == b"tampered"  # a local file is never removed
    with pytest.raises(CowfsError, match=r"local wheel .* does not exist"):
        fetch([pin("b", (tmp_path / "nope.whl").as_uri())], tmp_path / "d", progress=False)


def test_a_recorded_sha256_spares_the_rehash_and_a_wrong_one_is_not_trusted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """known: what an ingestion or a download recorded for the file as it is. A wheel whose
    recorded sha256 matches its pin is not read again, even when it is remote and already
    in dest (no event loop, no download); a recorded one that does not match is hashed."""
    local = tmp_path / wheel_name("a")
    local.write_bytes(b"wheel a")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / wheel_name("b")).write_bytes(b"wheel b")
    pins = [pin("a", local.as_uri(), sha(b"wheel a")),
            pin("b", f"https://nowhere.invalid/{wheel_name('b')}", sha(b"wheel b"))]
    hashed: list[str] = []
    real = fetch_mod.sha256_file
    monkeypatch.setattr(fetch_mod, "sha256_file", lambda p: (hashed.append(p.name), real(p))[1])
    recorded = {local: sha(b"wheel a"), dest / wheel_name("b"): sha(b"wheel b")}
    ready: list[str] = []
    got = fetch(pins, dest, progress=False, known=recorded.get,
                on_ready=lambda p, path: ready.append(p.name))
    assert got == {"a": local, "b": dest / wheel_name("b")} and sorted(ready) == ["a", "b"]
    assert hashed == []
    recorded[local] = sha(b"something else")  # stale or wrong: the file is hashed
    assert fetch(pins[:1], dest, progress=False, known=recorded.get) == {"a": local}
    assert hashed == [wheel_name("a")]
    local.write_bytes(b"tampered")  # rewritten: wheel_index keys records by the stat
    with pytest.raises(CowfsError, match="sha256 mismatch"):  # fingerprint, so none is left
        fetch(pins[:1], dest, progress=False, known=lambda p: None)


def test_check_local_false_leaves_unrecorded_local_wheels_to_the_caller(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """check_local=False (sync.apply, whose ingestion hashes every wheel it reads): a local
    wheel nothing is recorded for is handed over unhashed, with no event loop; one whose
    recorded sha256 is not the pin's is still refused here, and remote wheels unchanged."""
    local = tmp_path / wheel_name("a")
    local.write_bytes(b"tampered")
    hashed: list[str] = []
    real = fetch_mod.sha256_file
    monkeypatch.setattr(fetch_mod, "sha256_file", lambda p: (hashed.append(p.name), real(p))[1])
    ready: list[str] = []
    pins = [pin("a", local.as_uri(), "1" * 64)]
    got = fetch(pins, tmp_path / "d", progress=False, known=lambda p: None,
                on_ready=lambda p, path: ready.append(p.name), check_local=False)
    assert got == {"a": local} and ready == ["a"] and hashed == []
    with pytest.raises(CowfsError, match="sha256 mismatch"):
        fetch(pins, tmp_path / "d", progress=False, known=lambda p: sha(b"tampered"),
              check_local=False)


def test_bad_filenames_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CowfsError, match="is not a wheel filename"):
        fetch([Pin("a", "1.0", "https://h/x", "../evil.whl")], tmp_path, progress=False)
    with pytest.raises(CowfsError, match="cannot download from 'ftp://h/a"):
        fetch([pin("a", f"ftp://h/{wheel_name('a')}")], tmp_path, progress=False)


# -- downloads -----------------------------------------------------------------------------


def test_parallel_downloads_are_bounded_and_atomic(server: Server, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    server.delay = 0.2
    pins = [server.add(f"w{i}", bytes([i]) * (100_000 + i)) for i in range(8)]
    dest = tmp_path / "wheels"
    got = fetch(pins, dest, max_parallel=3)
    assert set(got) == {p.name for p in pins}
    for p in pins:
        assert got[p.name] == dest / p.filename
        assert sha(got[p.name].read_bytes()) == p.sha256
        assert got[p.name].stat().st_mode & 0o777 == 0o644
    assert 2 <= server.max_active <= 3
    assert leftovers(dest) == []
    assert capsys.readouterr().err == ""  # not a terminal: quiet


def test_each_wheel_is_handed_over_as_soon_as_it_is_there(server: Server,
                                                           tmp_path: Path) -> None:
    """on_ready runs per wheel when it is complete and checked, while others still download
    (the installer ingests meanwhile); never for a wheel that failed."""
    slow = server.add("slow", b"s" * 200_000)
    server.trickle.add(slow.filename)  # ~2 s
    quick = [server.add(f"q{i}", bytes([i]) * 1000) for i in range(3)]
    bad = pin("bad", f"{server.url}/{wheel_name('bad')}")
    ready: dict[str, float] = {}
    start = time.monotonic()

    def on_ready(p: Pin, path: Path) -> None:
        assert sha(path.read_bytes()) == p.sha256
        ready[p.name] = time.monotonic() - start

    got = fetch([slow, *quick], tmp_path / "w", on_ready=on_ready)
    assert set(ready) == set(got) == {"slow", "q0", "q1", "q2"}
    assert max(ready[q.name] for q in quick) < ready["slow"]
    ready.clear()
    with pytest.raises(CowfsError, match=r"bad-1\.0"):
        fetch([bad, *quick], tmp_path / "w2", on_ready=on_ready)
    assert "bad" not in ready


def test_progress_bar_on_a_terminal(server: Server, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Tty()
    monkeypatch.setattr(fetch_mod.sys, "stderr", term)
    fetch([server.add("a", b"a" * 1500), server.add("b", b"b")], tmp_path)
    out = term.getvalue()
    assert out.startswith("\r\x1b[Kcowfs: downloading ") and out.endswith("\n")
    assert "downloading 2/2 wheels, 1.5 kB" in out and out.count("\n") == 1


def test_present_files_are_not_downloaded_again(server: Server, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    good = server.add("good", b"good bytes")
    stale = server.add("stale", b"new bytes")
    unhashed = pin("plain", f"{server.url}/{wheel_name('plain')}")
    (tmp_path / good.filename).write_bytes(b"good bytes")
    (tmp_path / stale.filename).write_bytes(b"corrupt")  # wrong hash: fetched again
    (tmp_path / unhashed.filename).write_bytes(b"trusted by name")
    got = fetch([good, stale, unhashed], tmp_path, progress=False)
    assert server.hits == Counter({stale.filename: 1})
    assert got["stale"].read_bytes() == b"new bytes"
    assert capsys.readouterr().err == ""  # progress=False is quiet


def test_404_fails_naming_the_wheel_and_leaves_nothing(server: Server, tmp_path: Path) -> None:
    pins = [server.add(f"ok{i}", b"x" * 50_000) for i in range(4)]
    missing = pin("gone", f"{server.url}/{wheel_name('gone')}", "0" * 64)
    with pytest.raises(CowfsError, match=r"^[^\n]+$") as err:
        fetch([*pins, missing], tmp_path, progress=False)
    assert str(err.value) == (f"{wheel_name('gone')}: download failed: HTTP 404 Not Found "
                              f"({missing.url})")
    assert server.hits[wheel_name("gone")] == 1  # a 404 is not retried
    assert leftovers(tmp_path) == []
    assert not (tmp_path / wheel_name("gone")).exists()


def test_hash_mismatch_download_is_discarded(server: Server, tmp_path: Path) -> None:
    p = server.add("a", b"real")
    bad = Pin(p.name, p.version, p.url, p.filename, sha256="f" * 64)
    with pytest.raises(CowfsError, match=rf"{p.filename}: sha256 mismatch .*discarded"):
        fetch([bad], tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []
    ok = Pin(p.name, p.version, p.url, p.filename, hashes=("f" * 64, sha(b"real")))
    assert fetch([ok], tmp_path, progress=False)["a"].read_bytes() == b"real"


def test_transient_failures_are_retried(server: Server, tmp_path: Path) -> None:
    p = server.add("flaky", b"eventually")
    server.plan[p.filename] = [503, 502]
    assert fetch([p], tmp_path, progress=False)["flaky"].read_bytes() == b"eventually"
    assert server.hits[p.filename] == 3
    short = server.add("short", b"y" * 1000)
    server.truncate.add(short.filename)
    with pytest.raises(CowfsError, match=r"short-1.0-py3-none-any.whl: download failed: "):
        fetch([short], tmp_path, progress=False)
    assert server.hits[short.filename] == 1 + fetch_mod.RETRIES
    assert leftovers(tmp_path) == []


def test_connection_refused(tmp_path: Path) -> None:
    srv = Server()  # bound, never served, then closed: the port refuses connections
    url = f"{srv.url}/{wheel_name('a')}"
    srv.httpd.server_close()
    with pytest.raises(CowfsError, match=rf"^{wheel_name('a')}: download failed: "
                                         r"Connection refused \(http://127\.0\.0\.1:\d+/"):
        fetch([pin("a", url)], tmp_path, progress=False)


def test_first_failure_stops_the_others(server: Server, tmp_path: Path) -> None:
    slow = [server.add(f"s{i}", b"z" * 200_000) for i in range(4)]
    server.trickle.update(p.filename for p in slow)  # 2 s each
    missing = pin("gone", f"{server.url}/{wheel_name('gone')}")
    start = time.monotonic()
    with pytest.raises(CowfsError, match=r"^gone-1\.0-py3-none-any\.whl: download failed"):
        fetch([missing, *slow], tmp_path, progress=False)
    # The running downloads stop at their next piece instead of finishing.
    assert time.monotonic() - start < 1.5
    assert list(tmp_path.iterdir()) == []


def test_fetch_async_runs_inside_trio(server: Server, tmp_path: Path) -> None:
    p = server.add("a", b"async")

    async def main() -> dict[str, Path]:
        return await fetch_async([p], tmp_path, progress=False)

    assert trio.run(main)["a"].read_bytes() == b"async"


def test_https_downloads_share_one_tls_context(server: Server, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Over HTTPS (a self-signed certificate trusted through SSL_CERT_FILE, as fetch's
    default context honours it), loading the CA bundle once for all wheels, not per wheel
    (~25 ms of CPU each)."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server.httpd.socket = tls.wrap_socket(server.httpd.socket, server_side=True)
    server.url = server.url.replace("http://", "https://")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    cowfs_tls.new_ssl_context.cache_clear()
    made = []
    real = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: made.append(1)
                        or real(*a, **k))
    # what urllib falls back to when it is given no context
    monkeypatch.setattr(ssl, "_create_default_https_context", ssl.create_default_context)
    try:
        pins = [server.add(f"t{i}", bytes([i]) * 50_000) for i in range(4)]
        got = fetch(pins, tmp_path / "wheels", progress=False)
    finally:
        cowfs_tls.new_ssl_context.cache_clear()  # not this test's certificate for later ones
    assert all(sha(got[p.name].read_bytes()) == p.sha256 for p in pins)
    assert len(made) == 1, "one TLS context for every download"


# -- kept-alive connections (installer.resolve.http_pool) ---------------------------------


def test_connections_are_kept_alive_and_reused(server: Server, tmp_path: Path) -> None:
    server.keep_alive()
    pins = [server.add(f"k{i}", bytes([i]) * 5000) for i in range(8)]
    got = fetch(pins, tmp_path, progress=False, max_parallel=2)
    assert all(sha(got[p.name].read_bytes()) == p.sha256 for p in pins)
    assert server.connections <= 2


def test_a_connection_the_server_closed_while_idle_is_replaced(server: Server,
                                                               tmp_path: Path) -> None:
    server.keep_alive()
    server.drop_idle = True  # each connection serves one response, then goes away unsaid
    pins = [server.add(f"d{i}", bytes([i]) * 5000) for i in range(3)]
    got = fetch(pins, tmp_path, progress=False, max_parallel=1)
    assert all(sha(got[p.name].read_bytes()) == p.sha256 for p in pins)
    assert all(server.hits[p.filename] == 1 for p in pins)  # no retry of a failed download
    assert server.connections == 3


def test_a_truncated_body_on_a_kept_alive_connection_fails_cleanly(server: Server,
                                                                   tmp_path: Path) -> None:
    server.keep_alive()
    short = server.add("short", b"y" * 1000)
    server.truncate.add(short.filename)
    with pytest.raises(CowfsError, match=r"^short-1.0-py3-none-any.whl: download failed: "
                                         r"connection closed after 10 of 1000 bytes"):
        fetch([short], tmp_path, progress=False)
    assert server.hits[short.filename] == 1 + fetch_mod.RETRIES
    assert leftovers(tmp_path) == []
    fine = server.add("fine", b"f" * 1000)  # what follows is not served from a broken one
    assert fetch([fine], tmp_path, progress=False)["fine"].read_bytes() == b"f" * 1000


def test_redirects_are_followed_and_credentials_stay_with_their_host(server: Server,
                                                                     tmp_path: Path) -> None:
    server.keep_alive()
    data = b"moved" * 100
    target = server.add("moved", data)
    port = server.url.rsplit(":", 1)[1]
    same = pin("same", f"http://u:pw@127.0.0.1:{port}/{wheel_name('same')}", sha(data))
    other = pin("other", f"http://u:pw@127.0.0.1:{port}/{wheel_name('other')}", sha(data))
    server.redirect[same.filename] = f"/{target.filename}"
    server.redirect[other.filename] = f"http://localhost:{port}/{target.filename}"
    assert fetch([same], tmp_path / "a", progress=False)["same"].read_bytes() == data
    assert server.auth[target.filename] is not None
    assert fetch([other], tmp_path / "b", progress=False)["other"].read_bytes() == data
    assert server.auth[other.filename] is not None
    assert server.auth[target.filename] is None  # not sent on to another host


def test_a_redirect_loop_or_to_another_scheme_fails(server: Server, tmp_path: Path) -> None:
    server.keep_alive()
    loop = pin("loop", f"{server.url}/{wheel_name('loop')}")
    server.redirect[loop.filename] = f"/{loop.filename}"
    with pytest.raises(CowfsError, match=r"^loop-1.0-py3-none-any.whl: download failed: "
                                         r"more than \d+ redirects"):
        fetch([loop], tmp_path, progress=False)
    assert server.hits[loop.filename] == 1 + http_pool.MAX_REDIRECTS  # not retried
    away = pin("away", f"{server.url}/{wheel_name('away')}")
    server.redirect[away.filename] = "file:///etc/passwd"
    with pytest.raises(CowfsError, match=r"redirected to file:///etc/passwd"):
        fetch([away], tmp_path, progress=False)
    nowhere = server.add("nowhere", b"n")
    server.plan[nowhere.filename] = [300]  # a redirect status without a Location
    with pytest.raises(CowfsError, match=r"^nowhere-1.0-py3-none-any.whl: download failed: "
                                         r"HTTP 300"):
        fetch([nowhere], tmp_path, progress=False)
    assert leftovers(tmp_path) == []


def test_a_proxy_is_used_through_urllib(server: Server, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """With http_proxy set, downloads go where urllib sends them: here the proxy is the
    test server itself, which answers the absolute URL's path."""
    p = server.add("viaproxy", b"proxied")
    monkeypatch.setenv("http_proxy", server.url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    url = f"http://wheels.invalid/{p.filename}"
    proxied = pin("viaproxy", url, p.sha256)
    server.files[f"http://wheels.invalid/{p.filename}".lstrip("/")] = b"proxied"
    assert fetch([proxied], tmp_path, progress=False)["viaproxy"].read_bytes() == b"proxied"
