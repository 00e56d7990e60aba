"""Real engines on loopback for the remote tests: nginx serving a directory, moto's S3
server, and a small HTTP server that injects the faults a static server never makes
(5xx, truncated bodies, stalls). Each is a context manager that stops what it started."""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import serving


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port}")


@contextlib.contextmanager
def _process(cmd: list[str], port: int, what: str, log: Path,
             env: dict[str, str] | None = None) -> Iterator[None]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        _wait_listening(port, proc, what, log)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@contextlib.contextmanager
def nginx(root: Path, work: Path) -> Iterator[str]:
    """nginx from Debian serving root read-only on 127.0.0.1; yields its base URL."""
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = work / "nginx.conf"
    temps = "\n".join(f"  {k}_temp_path {work}/{k};" for k in
                      ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root;" if os.geteuid() == 0 else ""  # workers must read the tmp tree
    conf.write_text(f"""{user}
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log {work}/access.log;
{temps}
  server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
""")
    with _process([exe, "-c", str(conf), "-p", str(work)], port, "nginx", work / "out.log"):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def moto_s3(work: Path) -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1; yields the AWS variables that point at it."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_CONFIG_FILE": str(work / "none"), "AWS_SHARED_CREDENTIALS_FILE":
           str(work / "none")}
    exe = Path(sys.executable).with_name("moto_server")
    with _process([str(exe), "-H", "127.0.0.1", "-p", str(port)], port, "moto",
                  work / "moto.log", env={**os.environ, **aws}):
        yield aws


class FaultServer:
    """Serves a directory like a static server, with faults per path suffix:
    fail[path] = N: the first N GETs answer 503; truncate: the body stops halfway;
    stall: seconds to wait before answering."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fail: dict[str, int] = {}
        self.truncate: set[str] = set()
        self.stall: dict[str, float] = {}
        self.requests: list[str] = []
        lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                key = self.path.lstrip("/")
                with lock:
                    outer.requests.append(key)
                    failing = outer.fail.get(key, 0)
                    if failing:
                        outer.fail[key] = failing - 1
                time.sleep(outer.stall.get(key, 0))
                if failing:
                    self.send_error(503)
                    return
                try:
                    data = (outer.root / key).read_bytes()
                except OSError:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data[:len(data) // 2] if key in outer.truncate else data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @contextlib.contextmanager
    def running(self) -> Iterator[FaultServer]:
        with serving(self.httpd):
            yield self
