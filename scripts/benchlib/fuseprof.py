"""Why cowfs is slower where it is: FUSE requests per operation, time per request.

A fresh cowfs venv of the workload is remounted with the instrumented daemon
(benchlib/profd.py: a CowfsOperations subclass counting and timing every handler). Then, per
operation (first import in the fresh mount, warm import, walk, warm read-all):

* requests by handler, and the handler time per request (inside the Python handler only);
* the daemon's CPU time (utime+stime from /proc) per request: handler + pyfuse3 dispatch +
  trio scheduling + the /dev/fuse read/write syscalls ("all-in");
* wall time next to native's, so (cowfs - native) / requests is the latency each request
  adds to the caller (context switches included);
* optionally (COWFS_BENCH_CPROFILE=1) the daemon's cProfile top functions per operation.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import common
from benchlib.common import BenchError, Ctx, cpu_seconds, force_umount, log, median, mounted
from benchlib.figures import READER
from benchlib.peers import Cowfs, Env

PROFD = Path(__file__).resolve().parent / "profd.py"


def start_profiling_daemon(ctx: Ctx, env: Env) -> int:
    """Mount env's overlay with the instrumented daemon (what cowfs.mount.mount.mount does)."""
    from cowfs.mount.spec import VenvState

    spec = VenvState.load(env.venv).mount_spec()
    spec_file = spec.save()
    read_fd, write_fd = os.pipe()
    with open(spec.log, "ab") as logf:
        proc = subprocess.Popen([sys.executable, str(PROFD), str(spec_file), str(write_fd)],
                                pass_fds=[write_fd], stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=logf, start_new_session=True, cwd="/", env=ctx.env)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], 60)
        answer = os.read(read_fd, 64) if ready else b""
    finally:
        os.close(read_fd)
    if not answer.startswith(b"ready"):
        proc.kill()
        raise BenchError(f"the profiling daemon did not start (log: {spec.log})")
    os.stat(env.site)
    return proc.pid


def _request(env: Env, op: str, **kw: Any) -> dict[str, Any]:
    from cowfs.mount import control
    from cowfs.mount.spec import MountSpec

    spec = MountSpec.for_mountpoint(str(env.site))
    assert spec is not None
    return control.request(spec.socket, op, **kw) if kw else control.request(spec.socket, op)


def _timed_cmd(ctx: Ctx, cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=ctx.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True, timeout=900)
    return time.perf_counter() - start


def _profiled(ctx: Ctx, env: Env, pid: int, cmd: list[str], reps: int,
              cprofile: bool) -> dict[str, Any]:
    _request(env, "profile-reset")
    if cprofile:
        _request(env, "cprofile-start")
    cpu0 = cpu_seconds(pid)
    walls = [_timed_cmd(ctx, cmd) for _ in range(reps)]
    cpu = (cpu_seconds(pid) - cpu0) / reps
    prof = _request(env, "profile")
    text = _request(env, "cprofile-stop", top=20).get("text") if cprofile else None
    counts, ns = prof["counts"], prof["ns"]
    total = sum(counts.values()) / reps
    out: dict[str, Any] = {
        "wall_s": round(median(walls), 4),
        "requests": round(total),
        "handler_us_per_request": round(sum(ns.values()) / 1e3 / reps / total, 2) if total else 0,
        "daemon_cpu_s": round(cpu, 4),
        "daemon_cpu_us_per_request": round(cpu * 1e6 / total, 2) if total else 0,
        "by_handler": {h: {"n": round(n / reps), "us": round(ns[h] / 1e3 / n, 2)}
                       for h, n in sorted(counts.items(), key=lambda kv: -kv[1])},
        "errors": {k: round(v / reps) for k, v in prof["errors"].items()},
        "negative_lookups": round(prof["negative_lookups"] / reps),
        "negative_samples": prof["negative_samples"],
        "read_mb": round(prof["read_bytes"] / reps / 1e6, 2),
    }
    if text:
        out["cprofile"] = text
    return out


def run(ctx: Ctx, peer: Cowfs, native: Env | None) -> dict[str, Any]:
    log("profile: fresh cowfs venv, remounted with the instrumented daemon")
    cprofile = os.environ.get("COWFS_BENCH_CPROFILE") == "1"
    env = peer.new_env()
    try:
        run_cmd = [*ctx.cowfs, "umount", str(env.venv)]
        subprocess.run(run_cmd, env=ctx.env, capture_output=True, check=True)
        t0 = time.perf_counter()
        pid = start_profiling_daemon(ctx, env)
        mount_s = time.perf_counter() - t0
        imp = [str(env.python), "-c", ctx.import_cmd]
        walk = ["find", str(env.site), "-type", "f", "-printf", "%s %m\n"]
        read = [ctx.python, "-I", "-S", "-c", READER, str(env.site)]
        ops: dict[str, Any] = {}
        ops["import-first"] = _profiled(ctx, env, pid, imp, 1, cprofile)
        _timed_cmd(ctx, imp)
        ops["import-warm"] = _profiled(ctx, env, pid, imp, max(3, ctx.reps // 2), cprofile)
        _timed_cmd(ctx, walk)
        ops["walk"] = _profiled(ctx, env, pid, walk, 3, cprofile)
        _timed_cmd(ctx, read)
        ops["read-all"] = _profiled(ctx, env, pid, read, 3, cprofile)
        if native is not None:
            nat = {"import-warm": [str(native.python), "-c", ctx.import_cmd],
                   "walk": ["find", str(native.site), "-type", "f", "-printf", "%s %m\n"],
                   "read-all": [ctx.python, "-I", "-S", "-c", READER, str(native.site)]}
            for op, cmd in nat.items():
                _timed_cmd(ctx, cmd)
                ops[op]["native_wall_s"] = round(median([_timed_cmd(ctx, cmd)
                                                         for _ in range(3)]), 4)
            ops["import-first"]["native_wall_s"] = ops["import-warm"]["native_wall_s"]
        for d in ops.values():
            notes = d.setdefault("notes", {})
            if d.get("native_wall_s") and d["requests"]:
                extra = d["wall_s"] - d["native_wall_s"]
                notes["added_wall_us_per_request"] = round(extra * 1e6 / d["requests"], 1)
        status = _request(env, "status")
        return {"operations": ops, "mount_s_instrumented": round(mount_s, 3),
                "daemon_max_rss_kb": status.get("max_rss_kb"), "nodes": status.get("nodes")}
    finally:
        if mounted(env.site):
            common.run(ctx, [*ctx.cowfs, "umount", env.venv], check=False)
            force_umount(env.site, fuse=True)
        peer.close(env)


def kernel_view(ctx: Ctx, peers: dict[str, Any], envs: dict[str, Env]) -> dict[str, Any]:
    """Requests and round trips per operation as the kernel sees them (fuse tracepoints), for
    every FUSE peer with its normal (uninstrumented) daemon; import-first on a fresh venv."""
    from benchlib.fusetrace import FuseTrace

    tracer = FuseTrace()
    why = tracer.available()
    if why:
        tracer.close()
        return {"skipped": why}
    fuse_peers = [n for n in ("cowfs", "fuse-overlayfs") if n in envs]
    out: dict[str, Any] = {}
    tracer.open()
    try:
        for name in fuse_peers:
            env = envs[name]
            fresh = peers[name].new_env()
            cmds = {"import-first": (fresh, [str(fresh.python), "-c", ctx.import_cmd]),
                    "import-warm": (env, [str(env.python), "-c", ctx.import_cmd]),
                    "walk": (env, ["find", str(env.site), "-type", "f", "-printf", "%s %m\n"]),
                    "read-all": (env, [ctx.python, "-I", "-S", "-c", READER, str(env.site)])}
            for op, (e, cmd) in cmds.items():
                if op != "import-first":
                    _timed_cmd(ctx, cmd)  # warm
                with tracer.record([e.site]) as rec:
                    wall = _timed_cmd(ctx, cmd)
                rec["wall_s"] = round(wall, 4)
                out.setdefault(op, {})[name] = rec
            peers[name].close(fresh)
    finally:
        tracer.close()
    return out
