"""install-cold: cowfs vs `uv pip install` into a new venv, every cache empty each repetition.

Two rows: the reference workload from a local PEP 503 index (its wheels, served over HTTP
on 127.0.0.1 by this process: no network noise), and the flask set from the machine's
configured index (pip.conf / PIP_* as configured, PyPI otherwise). cowfs is timed until
`cowfs install` returns (its defaults: shared bytecode compiled in the background) and,
separately, until that bytecode is published; uv with its defaults and with
--compile-bytecode. Ratios are printed, never asserted.

    .dev-env/bin/python scripts/benchlib/coldinstall.py [--reps N] [--wheels DIR]
        [--no-remote | --no-local]
"""

from __future__ import annotations

import argparse
import hashlib
import html
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
FLASK_SET = ["flask", "requests", "rich", "pydantic", "httpx"]
ISOLATE = {"PIP_CONFIG_FILE": os.devnull}  # the local row sees only the local index


def make_index(wheels: Path, out: Path) -> Path:
    """out/simple/<project>/index.html linking to out/files/<wheel>#sha256=... (PEP 503),
    with each wheel's METADATA as out/files/<wheel>.metadata (PEP 658)."""
    files = out / "files"
    files.mkdir(parents=True)
    projects: dict[str, list[str]] = {}
    for wheel in sorted(wheels.glob("*.whl")):
        shutil.copy2(wheel, files / wheel.name)
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
        # PEP 658: the wheel's METADATA beside it, as PyPI serves it, so resolvers read
        # metadata without fetching whole wheels (this server has no range requests).
        with zipfile.ZipFile(wheel) as zf:
            meta = next(n for n in zf.namelist()
                        if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
            metadata = zf.read(meta)
        (files / f"{wheel.name}.metadata").write_bytes(metadata)
        core = hashlib.sha256(metadata).hexdigest()
        projects.setdefault(name, []).append(
            f'<a href="../../files/{html.escape(wheel.name)}#sha256={digest}" '
            f'data-core-metadata="sha256={core}" data-dist-info-metadata="sha256={core}">'
            f"{html.escape(wheel.name)}</a><br>")
    for name, links in projects.items():
        d = out / "simple" / name
        d.mkdir(parents=True)
        (d / "index.html").write_text("<!DOCTYPE html><html><body>\n"
                                      + "\n".join(links) + "\n</body></html>\n")
    root = "".join(f'<a href="{n}/">{n}</a><br>\n' for n in projects)
    (out / "simple" / "index.html").write_text(f"<html><body>\n{root}</body></html>\n")
    return out


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/simple"


def _env(work: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
    env.update(COWFS_HOME=str(work / "home"), UV_CACHE_DIR=str(work / "uv-cache"),
               PIP_CACHE_DIR=str(work / "pip-cache"), COWFS_RUNTIME_DIR=str(work / "rt"),
               **extra)
    return env


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed: {proc.stderr.strip()[-800:]}")
    return elapsed


def one(kind: str, python: str, uv: str, args: list[str], extra: dict[str, str],
        parent: Path) -> tuple[float, float]:
    """(seconds until the command returned, seconds until bytecode was published)."""
    from installer.wheel.bytecode_bg import wait

    work = Path(tempfile.mkdtemp(prefix="cold-", dir=parent))
    env = _env(work, extra)
    venv = work / "venv"
    try:
        if kind == "cowfs":
            cowfs = [sys.executable, "-m", "cowfs"]
            subprocess.run([*cowfs, "venv", str(venv), "--python", python], env=env,
                           check=True, capture_output=True)
            start = time.perf_counter()
            returned = _timed([*cowfs, "install", "--venv", str(venv), "-q", *args], env)
            wait(venv, 600)
            done = time.perf_counter() - start
            subprocess.run([*cowfs, "umount", str(venv)], env=env, capture_output=True)
            return returned, done
        subprocess.run([uv, "venv", "-q", "-p", python, str(venv)], env=env, check=True)
        flags = ["--compile-bytecode"] if kind == "uv-compile" else []
        t = _timed([uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"),
                    *flags, *args], env)
        return t, t
    finally:
        shutil.rmtree(work, ignore_errors=True)


def row(label: str, python: str, uv: str, args: list[str], extra: dict[str, str],
        reps: int, parent: Path) -> dict[str, object]:
    """Medians of each peer, interleaved (load changes hit every peer alike), and ratios."""
    results: dict[str, list[tuple[float, float]]] = {"uv": [], "uv-compile": [], "cowfs": []}
    for _ in range(reps):
        for kind in results:
            results[kind].append(one(kind, python, uv, args, extra, parent))
    med = {k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v))
           for k, v in results.items()}
    uv_t, uvc_t = med["uv"][0], med["uv-compile"][0]
    cow_ret, cow_done = med["cowfs"]
    return {"label": label, "reps": reps, "uv_s": uv_t, "uv_compile_s": uvc_t,
            "cowfs_s": cow_ret, "cowfs_bytecode_s": cow_done,
            "ratio_vs_uv": cow_ret / uv_t, "ratio_vs_uv_compile": cow_ret / uvc_t,
            "bytecode_ratio_vs_uv_compile": cow_done / uvc_t,
            "runs": {k: [[round(a, 3), round(b, 3)] for a, b in v] for k, v in results.items()}}


def render(rows: list[dict[str, object]]) -> str:
    out = []
    for r in rows:
        out += [f"install-cold {r['label']} (median of {r['reps']}):",
                f"  uv pip install                    {r['uv_s']:6.2f} s",
                f"  uv pip install --compile-bytecode {r['uv_compile_s']:6.2f} s",
                f"  cowfs install (returns)           {r['cowfs_s']:6.2f} s  "
                f"{r['ratio_vs_uv']:.2f}x uv, {r['ratio_vs_uv_compile']:.2f}x uv "
                "--compile-bytecode  (target <= 1.0x uv)",
                f"  cowfs install + shared bytecode   {r['cowfs_bytecode_s']:6.2f} s  "
                f"{r['bytecode_ratio_vs_uv_compile']:.2f}x uv --compile-bytecode"]
    return "\n".join(out)


def compile_sources() -> None:
    """Bytecode for cowfs's own modules, as an installed cowfs has: from a checkout run with
    PYTHONDONTWRITEBYTECODE, every command would compile ~30 modules first (~70 ms)."""
    import compileall

    for package in ("cowfs", "installer"):
        compileall.compile_dir(ROOT / package, quiet=1)


def run(wheels: Path, workload: Path, python: str, uv: str, reps: int,
        remote: bool = True, local: bool = True) -> list[dict[str, object]]:
    """The local-index row (local), and (remote) the flask set from the configured index."""
    compile_sources()
    parent = Path(tempfile.mkdtemp(prefix="cowfs-cold-"))
    server = None
    rows = []
    try:
        server, url = serve(make_index(wheels, parent / "index"))
        if local:
            rows.append(row(f"reference workload ({len(list(wheels.glob('*.whl')))} wheels, "
                            "local index)", python, uv,
                            ["--index-url", url, "-r", str(workload)], ISOLATE, reps, parent))
        if remote:
            rows.append(row(f"{' '.join(FLASK_SET)} (configured index)", python, uv,
                            FLASK_SET, {}, reps, parent))
    finally:
        if server is not None:
            server.shutdown()
        shutil.rmtree(parent, ignore_errors=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--wheels", type=Path, default=ROOT / ".cache" / "bench-wheels")
    p.add_argument("--workload", type=Path,
                   default=ROOT / "scripts" / "benchlib" / "workload-ds.txt")
    p.add_argument("--python", default=os.path.realpath(
        getattr(sys, "_base_executable", sys.executable)))
    p.add_argument("--no-remote", action="store_true", help="only the local-index row")
    p.add_argument("--no-local", action="store_true", help="only the configured-index row")
    args = p.parse_args()
    uv = str(Path(sys.executable).parent / "uv") if (Path(sys.executable).parent
                                                    / "uv").exists() else shutil.which("uv")
    if not uv or not list(args.wheels.glob("*.whl")):
        print("needs uv and the workload's wheels (scripts/bench fetches them)", file=sys.stderr)
        return 1
    print(render(run(args.wheels, args.workload, args.python, uv, args.reps,
                     remote=not args.no_remote, local=not args.no_local)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
