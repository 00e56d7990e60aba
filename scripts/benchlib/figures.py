"""The figures of the spec, measured side by side (peers interleaved within each repetition,
so that drift on a noisy machine hits every peer alike)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchlib.common import (
    Ctx,
    cpu_seconds,
    drop_caches,
    du_added,
    fd_count,
    log,
    median,
    proc_status,
    timed,
)
from benchlib.peers import Cowfs, Env, Peer, _Overlay

FIGURES = ("install-warm", "import-warm", "import-first", "walk", "read-all", "read-all-cold",
           "disk-per-venv", "daemon-rss", "mount-time", "page-cache")
QUICK_FIGURES = ("install-warm", "import-warm", "import-first", "walk", "read-all",
                 "disk-per-venv", "daemon-rss", "mount-time")
UNITS = {"disk-per-venv": "MB", "daemon-rss": "MB", "page-cache": "MB"}

# Read every regular file's bytes (the same tiny reader for every peer).
# With a second argument: only the files that list names (relative paths, one per line).
READER = """
import os, sys
buf = bytearray(1 << 20)
n = 0
if len(sys.argv) > 2:
    paths = [os.path.join(sys.argv[1], p) for p in open(sys.argv[2]).read().splitlines()]
else:
    paths = [os.path.join(r, f) for r, _, fs in os.walk(sys.argv[1]) for f in fs]
for path in paths:
    with open(path, 'rb', buffering=0) as f:
        while (k := f.readinto(buf)):
            n += k
print(n)
"""


@dataclass
class Results:
    """figure -> peer -> list of samples (seconds, or MB for the size figures)."""

    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    extra: dict[str, dict[str, object]] = field(default_factory=dict)

    def add(self, figure: str, peer: str, value: float) -> None:
        self.samples.setdefault(figure, {}).setdefault(peer, []).append(value)

    def note(self, figure: str, key: str, value: object) -> None:
        self.extra.setdefault(figure, {})[key] = value

    def med(self, figure: str, peer: str) -> float:
        return median(self.samples.get(figure, {}).get(peer, []))


def _interleaved(ctx: Ctx, res: Results, figure: str, envs: dict[str, Env],
                 measure: Callable[[Env], float], reps: int) -> None:
    for rep in range(reps):
        for name, env in envs.items():
            res.add(figure, name, measure(env))
        log(f"{figure} {rep + 1}/{reps}: " + ", ".join(
            f"{n}={res.samples[figure][n][-1]:.3f}" for n in envs))


def install_warm(ctx: Ctx, res: Results, peers: dict[str, Peer]) -> None:
    installers = {n: p for n, p in peers.items() if p.installs}
    for rep in range(ctx.reps):
        for name, peer in installers.items():
            res.add("install-warm", name, peer.install_time())
        log(f"install-warm {rep + 1}/{ctx.reps}: " + ", ".join(
            f"{n}={res.samples['install-warm'][n][-1]:.3f}" for n in installers))


def import_cmd(ctx: Ctx, env: Env) -> list[str]:
    return [str(env.python), "-c", ctx.import_cmd]


def import_first(ctx: Ctx, res: Results, peers: dict[str, Peer]) -> dict[str, Env]:
    """Fresh venvs, first import each (bytecode not yet written); then the disk they use.

    Returns the first fresh venv of every peer (already imported once): the venv the warm
    figures are measured on."""
    main: dict[str, Env] = {}
    for i in range(ctx.fresh):
        for name, peer in peers.items():
            env = peer.new_env()
            os.sync()  # the install's writeback must not land in the measurement
            res.add("import-first", name, timed(ctx, import_cmd(ctx, env)))
            res.add("disk-per-venv", name, du_added([env.venv], env.shared) / 1e6)
            if name not in main:
                main[name] = env
            else:
                peer.close(env)
        log(f"import-first {i + 1}/{ctx.fresh}: " + ", ".join(
            f"{n}={res.samples['import-first'][n][-1]:.3f}s/"
            f"{res.samples['disk-per-venv'][n][-1]:.1f}MB" for n in peers))
    # What every venv shares (paid once per machine, not per venv), for context.
    for what, path in (("cowfs_store_mb", ctx.work / "store"),
                       ("uv_cache_mb", Path(ctx.env["UV_CACHE_DIR"])),
                       ("overlay_lower_mb", ctx.work / "lower")):
        if path.exists():
            res.note("disk-per-venv", what, round(du_added([path]) / 1e6, 1))
    return main


def _cached_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def page_cache(ctx: Ctx, res: Results, peers: dict[str, Peer]) -> None:
    """Page cache added by a first import of the workload in a fresh venv after a cache drop,
    then by the same in a second fresh venv (the figure: what one more venv costs in memory;
    hard links and passthrough share the first venv's pages)."""
    for name, peer in peers.items():
        envs = [peer.new_env(), peer.new_env()]
        if not drop_caches():
            res.note("page-cache", "warning", "drop_caches not permitted: NOT cold")
        added = []
        for env in envs:
            before = _cached_mb()
            timed(ctx, import_cmd(ctx, env))
            os.sync()
            added.append(_cached_mb() - before)
        res.add("page-cache", name, added[1])
        res.note("page-cache", f"{name}.first_venv_mb", round(added[0], 1))
        log(f"page-cache {name}: first venv +{added[0]:.1f} MB, second +{added[1]:.1f} MB")
        for env in envs:
            peer.close(env)


def main_envs(ctx: Ctx, peers: dict[str, Peer]) -> dict[str, Env]:
    """Venvs for the warm figures when import-first was not measured: one untimed import."""
    envs = {}
    for name, peer in peers.items():
        envs[name] = peer.new_env()
        timed(ctx, import_cmd(ctx, envs[name]))
    return envs


def import_warm(ctx: Ctx, res: Results, envs: dict[str, Env]) -> None:
    for env in envs.values():
        timed(ctx, import_cmd(ctx, env))  # bytecode is written, pages are cached
    cpu0 = {n: cpu_seconds(e.pid) for n, e in envs.items() if e.pid}
    _interleaved(ctx, res, "import-warm", envs, lambda e: timed(ctx, import_cmd(ctx, e)),
                 ctx.reps)
    for n, c0 in cpu0.items():  # the daemon's own CPU per warm import
        cpu = (cpu_seconds(envs[n].pid) - c0) / ctx.reps  # type: ignore[arg-type]
        res.note("import-warm", f"{n}.daemon_cpu_s_per_import", round(cpu, 4))


def walk(ctx: Ctx, res: Results, envs: dict[str, Env]) -> None:
    def cmd(e: Env) -> list[str]:
        return ["find", str(e.site), "-type", "f", "-printf", "%s %m\n"]

    for env in envs.values():
        timed(ctx, cmd(env))
    _interleaved(ctx, res, "walk", envs, lambda e: timed(ctx, cmd(e)), ctx.reps)
    tree_sizes(res, envs)


def tree_sizes(res: Results, envs: dict[str, Env]) -> None:
    """Files, directories and bytes of each site-packages: the trees differ (cowfs serves
    shared bytecode for every module; the others hold .pyc only for what was imported)."""
    for name, env in envs.items():
        files = dirs = size = 0
        for _root, ds, fs in os.walk(env.site):
            dirs += len(ds)
            files += len(fs)
            for f in fs:
                try:
                    size += os.lstat(os.path.join(_root, f)).st_size
                except OSError:
                    pass
        res.note("tree", name, {"files": files, "dirs": dirs, "bytes": size,
                                "mb": round(size / 1e6, 1)})


def reader(ctx: Ctx, env: Env) -> list[str]:
    return [ctx.python, "-I", "-S", "-c", READER, str(env.site)]


def read_all(ctx: Ctx, res: Results, envs: dict[str, Env]) -> None:
    for env in envs.values():
        timed(ctx, reader(ctx, env))
    _interleaved(ctx, res, "read-all", envs, lambda e: timed(ctx, reader(ctx, e)), ctx.reps)
    _read_same_files(ctx, res, envs)


def _read_same_files(ctx: Ctx, res: Results, envs: dict[str, Env], figure: str = "read-all",
                     before: Callable[[], None] | None = None) -> None:
    """The trees differ (cowfs holds bytecode for every module): also read only the files
    every peer has, so the ratio compares the same bytes (before: run before each read,
    e.g. dropping the caches)."""
    if "native" not in envs:
        return
    common: set[str] | None = None
    for env in envs.values():
        files = {os.path.relpath(os.path.join(r, f), env.site)
                 for r, _, fs in os.walk(env.site) for f in fs}
        common = files if common is None else common & files
    listing = ctx.work / "read-all-common.txt"
    listing.write_text("\n".join(sorted(common or ())))
    same: dict[str, list[float]] = {}
    for _ in range(ctx.cold_reps if before is not None else ctx.reps):
        for name, env in envs.items():
            if before is not None:
                before()
            same.setdefault(name, []).append(timed(ctx, [*reader(ctx, env), str(listing)]))
    base = median(same["native"])
    res.note(figure, "same_files", len(common or ()))
    for name, samples in same.items():
        res.note(figure, f"same_files_ratio.{name}", round(median(samples) / base, 3))


def read_all_cold(ctx: Ctx, res: Results, envs: dict[str, Env]) -> None:
    def drop() -> None:
        if not drop_caches():
            res.note("read-all-cold", "warning", "drop_caches not permitted: NOT cold")

    def cold(e: Env) -> float:
        drop()
        return timed(ctx, reader(ctx, e))

    _interleaved(ctx, res, "read-all-cold", envs, cold, ctx.cold_reps)
    _read_same_files(ctx, res, envs, "read-all-cold", before=drop)


def daemon_rss(ctx: Ctx, res: Results, envs: dict[str, Env]) -> None:
    """Peak RSS (VmHWM) of each daemon so far, i.e. over import-warm and read-all; its
    current RSS and open fds noted (the fd budget: layer roots, cached directory handles,
    open files)."""
    for name, env in envs.items():
        if env.pid:
            st = proc_status(env.pid)
            if "VmHWM" in st:
                res.add("daemon-rss", name, st["VmHWM"] / 1024)
                res.note("daemon-rss", f"{name}.VmRSS_MB", round(st["VmRSS"] / 1024, 1))
                res.note("daemon-rss", f"{name}.fds", fd_count(env.pid))
    if "cowfs" in envs and envs["cowfs"].pid:
        from cowfs.mount import control
        from cowfs.mount.spec import MountSpec

        spec = MountSpec.for_mountpoint(str(envs["cowfs"].site))
        status = control.try_request(spec.socket, "status") if spec else None
        if status:
            res.note("daemon-rss", "cowfs.nodes", status.get("nodes"))


def mount_time(ctx: Ctx, res: Results, peers: dict[str, Peer], envs: dict[str, Env]) -> None:
    """cowfs: `cowfs umount` + `cowfs mount VENV` until it answers (whole CLI process), and
    the same through the API; the overlay peers' remount for comparison."""
    for rep in range(ctx.reps):
        for name, env in envs.items():
            peer = peers[name]
            if isinstance(peer, Cowfs):
                res.add("mount-time", name, peer.remount_time(env))
                res.add("mount-time-api", name, peer.remount_time_api(env))
            elif isinstance(peer, _Overlay):
                res.add("mount-time", name, peer.remount_time(env))
        log(f"mount-time {rep + 1}/{ctx.reps}: " + ", ".join(
            f"{n}={v[-1]:.3f}" for n, v in res.samples.get("mount-time", {}).items()))
    if "cowfs" in envs:
        # Where a cowfs mount's time goes: the CLI process start, the daemon's imports.
        parts = {"cli_version_s": [*ctx.cowfs, "--version"],
                 "daemon_imports_s": [ctx.cowfs_python, "-c", "import cowfs.fuse.daemon"],
                 "python_bare_s": [ctx.cowfs_python, "-c", "pass"]}
        for key, cmd in parts.items():
            res.note("mount-time", key, round(median([timed(ctx, cmd) for _ in range(5)]), 4))
