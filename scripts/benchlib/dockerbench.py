"""`scripts/bench --docker`: seconds to a ready venv of the workload inside a NEW container.

The store (cowfs) and the cache (uv) are warm on named volumes, as when CI jobs or developers'
containers share them; each repetition starts a fresh container from the same image
(scripts/benchlib/containers.py) and installs the whole workload offline from the same
wheels (bind-mounted read-only):

  cowfs   `cowfs venv` + `cowfs install -r WORKLOAD --no-index --find-links /wheels`,
          COWFS_HOME on the store volume
  uv      `uv venv` + `uv pip install --link-mode copy` (the same flags otherwise),
          UV_CACHE_DIR on the cache volume: a volume is another mount than the container's
          root, so uv cannot hard-link from its cache and copies every file

Per run: the `docker run` wall time (create, start, install, unmount, exit), the time inside
the container (`date` around the install only), the container's writable layer (`docker
ps -s`'s size) and what the run added to its volume. Medians, ratios cowfs/uv; the peers are
interleaved within each repetition. No assertion on any number.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchlib import containers
from benchlib.common import BenchError, Ctx, du_added, log, median

PEERS = ("cowfs", "uv")
SITE = "/app/.venv/lib/python3*/site-packages"
SCRIPTS = {
    "cowfs": (
        "cowfs venv /app/.venv && cowfs install --venv /app/.venv -q -r /workload.txt "
        "--no-index --find-links /wheels",
        f"cowfs umount $(echo {SITE})"),
    "uv": (
        "uv venv -q --python /usr/local/bin/python3 /app/.venv && uv pip install -q "
        "--python /app/.venv/bin/python --link-mode copy --no-index --find-links /wheels "
        "-r /workload.txt",
        "true"),
}
# The install between two clock readings (in-container time), then the cleanup (cowfs: the
# unmount), timed apart; the whole line is the container's command, so `docker run` times
# all of it.
WRAP = ("set -e; t0=$(date +%s%N); {install}; t1=$(date +%s%N); {after}; t2=$(date +%s%N); "
        "echo \"in_container_ns=$((t1 - t0)) after_ns=$((t2 - t1))\"")
MOUNT = {"cowfs": "/cowfs-store", "uv": "/uv-cache"}
ENV = {"cowfs": {"COWFS_HOME": "/cowfs-store"},
       "uv": {"UV_CACHE_DIR": "/uv-cache", "UV_NO_PROGRESS": "1",
              "UV_PYTHON_DOWNLOADS": "never"}}


def _volume_bytes(path: Path | None) -> int | None:
    return du_added([path]) if path is not None else None


def _one(dk: containers.Docker, peer: str, volume: str, host: Path | None,
         ctx: Ctx) -> dict[str, float]:
    install, after = SCRIPTS[peer]
    mounts = [f"{volume}:{MOUNT[peer]}", f"{ctx.wheels}:/wheels:ro",
              f"{ctx.workload}:/workload.txt:ro"]
    before = _volume_bytes(host)
    proc, wall, name = dk.run(f"bench-{peer}", ["bash", "-c", WRAP.format(
        install=install, after=after)], mounts, ENV[peer])
    try:
        m = re.search(r"in_container_ns=(\d+) after_ns=(\d+)", proc.stdout)
        if proc.returncode != 0 or m is None:
            tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-15:]
            raise BenchError(f"{peer} in a container failed ({proc.returncode}):\n"
                             + "\n".join(tail))
        layer = dk.layer_bytes(name)
    finally:
        dk.remove(name)
    out = {"wall_s": wall, "in_container_s": int(m[1]) / 1e9, "after_s": int(m[2]) / 1e9,
           "layer_mb": layer / 1e6}
    now = _volume_bytes(host)
    if before is not None and now is not None:
        out["volume_mb"] = (now - before) / 1e6
        out["disk_mb"] = out["layer_mb"] + max(out["volume_mb"], 0.0)
    else:
        out["disk_mb"] = out["layer_mb"]
    return out


def run(ctx: Ctx, reps: int) -> dict[str, Any]:
    """The docker section of the results: per peer the runs and medians, and the ratios."""
    reason = containers.unavailable()
    if reason:
        raise BenchError(f"--docker: {reason}")
    image = containers.ensure_image(log)
    dk = containers.Docker(image)
    ctx.cleanup.add("docker containers and volumes", dk.close)
    volumes = {p: dk.volume(f"bench-{p}") for p in PEERS}
    hosts = {p: dk.volume_path(v) for p, v in volumes.items()}
    doc: dict[str, Any] = {"image": image, "engine": engine_version(), "reps": reps,
                           "peers": {}, "first": {}}
    try:
        for peer in PEERS:  # fills the store / the cache: the volumes are warm from now on
            doc["first"][peer] = _one(dk, peer, volumes[peer], hosts[peer], ctx)
            log(f"docker warm-up {peer}: {_fmt_run(doc['first'][peer])}")
        runs: dict[str, list[dict[str, float]]] = {p: [] for p in PEERS}
        for rep in range(reps):
            for peer in PEERS:
                runs[peer].append(_one(dk, peer, volumes[peer], hosts[peer], ctx))
            log(f"docker {rep + 1}/{reps}: " + "; ".join(
                f"{p} {_fmt_run(runs[p][-1])}" for p in PEERS))
        for peer, rs in runs.items():
            keys = sorted({k for r in rs for k in r})
            doc["peers"][peer] = {k: {"median": round(median([r[k] for r in rs if k in r]), 6),
                                      "runs": [round(r[k], 6) for r in rs if k in r]}
                                  for k in keys}
        med = {p: {k: v["median"] for k, v in d.items()} for p, d in doc["peers"].items()}
        doc["ratio"] = {k: float(f"{med['cowfs'][k] / med['uv'][k]:.3g}")
                        for k in ("wall_s", "in_container_s", "layer_mb", "disk_mb")
                        if med["uv"].get(k, 0) > 0 and k in med["cowfs"]}
        doc["volume_mb"] = {p: round(b / 1e6, 1) for p, h in hosts.items()
                            if (b := _volume_bytes(h)) is not None}
        doc["image_mb"] = round(int(containers.docker(
            "image", "inspect", "--format", "{{.Size}}", image).stdout.strip() or 0) / 1e6, 1)
    finally:
        dk.close()
        ctx.cleanup.discard(dk.close)
    return doc


def _mb(v: float) -> str:
    return f"{v * 1000:.0f}kB" if abs(v) < 1 else f"{v:.1f}MB"


def _fmt_run(r: dict[str, float]) -> str:
    return (f"wall {r['wall_s']:.2f}s, inside {r['in_container_s']:.2f}s "
            f"(+{r['after_s']:.2f}s cleanup), disk {_mb(r['disk_mb'])}")


def render(doc: dict[str, Any]) -> str:
    rows: list[tuple[str, str, Callable[[float], str]]] = [
        ("wall_s", "docker run wall", lambda v: f"{v:.2f}s"),
        ("in_container_s", "in-container", lambda v: f"{v:.2f}s"),
        ("after_s", "  then cleanup", lambda v: f"{v:.2f}s"),
        ("layer_mb", "writable layer", _mb),
        ("volume_mb", "added to volume", _mb),
        ("disk_mb", "disk per container", _mb),
    ]
    lines = ["", f"docker: a ready venv of the workload in a new container, volumes warm "
             f"(median of {doc['reps']}; image {doc['image']}, {doc.get('image_mb', '?')} MB)",
             f"  {'':<20}{'cowfs':>12}{'uv copy':>12}{'cowfs/uv':>10}"]
    for key, label, fmt in rows:
        c = doc["peers"].get("cowfs", {}).get(key)
        u = doc["peers"].get("uv", {}).get(key)
        if c is None or u is None:
            continue
        ratio = doc.get("ratio", {}).get(key)
        lines.append(f"  {label:<20}{fmt(c['median']):>12}{fmt(u['median']):>12}"
                     + (f"{ratio:>9.3g}x" if ratio is not None else f"{'-':>10}"))
    first = doc.get("first", {})
    if first:
        lines.append("  first run (empty volume): " + "; ".join(
            f"{p} {_fmt_run(r)}" for p, r in first.items()))
    if doc.get("volume_mb"):
        lines.append("  volumes at the end: " + ", ".join(
            f"{p} {mb} MB" for p, mb in doc["volume_mb"].items()))
    return "\n".join(lines)


def engine_version() -> str:
    proc = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                          capture_output=True, text=True)
    return proc.stdout.strip() or "?"
