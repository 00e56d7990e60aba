"""The peers: how each one makes a venv holding the workload, installs, mounts and unmounts.

native          uv venv + uv pip install --link-mode hardlink (shared uv cache; not isolated)
uv-copy         uv pip install --link-mode copy
fuse-overlayfs  an empty uv venv whose site-packages is a fuse-overlayfs mount over a plain
                copy of the native site-packages (fresh upper per venv)
kernel-overlay  the same with `mount -t overlay` (root only)
cowfs           cowfs venv + cowfs install -r WORKLOAD --no-index --find-links WHEELS
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib.common import (
    BenchError,
    Ctx,
    force_umount,
    log,
    mounted,
    run,
    timed,
    wait_mounted,
)

PEERS = ("native", "uv-copy", "fuse-overlayfs", "kernel-overlay", "cowfs")
EXTRA_PEERS = ("cowfs-pt", "cowfs-kernel")  # only when named: cowfs, passthrough forced on/off
INSTALLERS = ("native", "uv-copy", "cowfs")  # the peers that are installers


@dataclass
class Env:
    """One venv of one peer, holding the workload."""

    peer: str
    venv: Path
    site: Path
    python: Path
    shared: list[Path] = field(default_factory=list)  # du: bytes hard-linked from here are shared
    pid: int | None = None  # the daemon serving site, if any
    undo: object = None  # the cleanup action registered for it

    def daemon_pid(self) -> int | None:
        return self.pid


def site_of(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise BenchError(f"no site-packages under {venv}")
    return found[0]


class Peer:
    name = ""
    installs = False

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx

    def available(self) -> str | None:
        """None when usable, else why not."""
        return None

    def prepare(self) -> None:
        """One-time, untimed setup (warm caches, build the shared lower...)."""

    def new_env(self) -> Env:
        raise NotImplementedError

    def install_time(self) -> float:
        raise NotImplementedError

    def close(self, env: Env) -> None:
        """Unmount (if mounted) a venv that is no longer needed. Its files stay until the
        scratch directory goes: deleting on this ext4 (mounted with `discard`) slowed the
        next measurements down 3-4x (the freed blocks are discarded at the next commit)."""
        if env.undo is not None:
            self.ctx.cleanup.discard(env.undo)  # type: ignore[arg-type]
            env.undo()  # type: ignore[operator]
            env.undo = None


# -- uv ----------------------------------------------------------------------------------------


class Native(Peer):
    name = "native"
    installs = True
    link_mode = "hardlink"

    def uv_venv(self, venv: Path) -> None:
        run(self.ctx, [self.ctx.uv, "venv", "-q", "--python", self.ctx.python, venv])

    def install_cmd(self, venv: Path) -> list[str | Path]:
        c = self.ctx
        return [c.uv, "pip", "install", "-q", "--python", venv / "bin" / "python",
                "--link-mode", self.link_mode, "--no-index", "--find-links", c.wheels,
                "-r", c.workload]

    def env_of(self, venv: Path) -> Env:
        shared = [Path(self.ctx.env["UV_CACHE_DIR"])] if self.link_mode == "hardlink" else []
        return Env(self.name, venv, site_of(venv), venv / "bin" / "python", shared)

    def prepare(self) -> None:
        # The first install fills the uv cache (shared by both uv peers); not measured.
        venv = self.ctx.work / "uv-warmup"
        if not venv.exists():
            self.uv_venv(venv)
            run(self.ctx, self.install_cmd(venv))

    def new_env(self) -> Env:
        venv = self.ctx.new_dir(self.name) / "venv"
        self.uv_venv(venv)
        run(self.ctx, self.install_cmd(venv))
        return self.env_of(venv)

    def install_time(self) -> float:
        venv = self.ctx.new_dir(f"{self.name}-inst") / "venv"
        self.uv_venv(venv)
        os.sync()  # the previous run's writeback must not land in this measurement
        return timed(self.ctx, self.install_cmd(venv))


class UvCopy(Native):
    name = "uv-copy"
    link_mode = "copy"


# -- overlays over a plain copy of the native site-packages ------------------------------------


def lower_copy(ctx: Ctx) -> Path:
    """A plain copy (no hard links into the uv cache) of a freshly installed native
    site-packages, before any import wrote bytecode into it. Built once per run."""
    lower = ctx.work / "lower"
    if lower.exists():
        return lower
    tmp = ctx.work / "lower-src"
    Native(ctx).uv_venv(tmp)
    run(ctx, Native(ctx).install_cmd(tmp))
    run(ctx, ["cp", "-a", site_of(tmp), lower])
    shutil.rmtree(tmp)
    return lower


class _Overlay(Peer):
    fuse = True

    def prepare(self) -> None:
        self.lower = lower_copy(self.ctx)

    def new_env(self) -> Env:
        venv = self.ctx.new_dir(self.name) / "venv"
        Native(self.ctx).uv_venv(venv)
        site = site_of(venv)
        upper, work = venv / ".ovl" / "upper", venv / ".ovl" / "work"
        upper.mkdir(parents=True)
        work.mkdir()
        env = Env(self.name, venv, site, venv / "bin" / "python", [self.lower])
        self.mount(env, upper, work)
        return env

    def mount(self, env: Env, upper: Path, work: Path) -> None:
        raise NotImplementedError

    def remount_time(self, env: Env) -> float:
        """Unmount and mount again; the time until the mount answers."""
        upper, work = env.venv / ".ovl" / "upper", env.venv / ".ovl" / "work"
        if env.undo is not None:
            self.ctx.cleanup.discard(env.undo)  # type: ignore[arg-type]
            env.undo()  # type: ignore[operator]
        start = time.perf_counter()
        self.mount(env, upper, work)
        return time.perf_counter() - start

    def opts(self, upper: Path, work: Path) -> str:
        return f"lowerdir={self.lower},upperdir={upper},workdir={work}"


class FuseOverlayfs(_Overlay):
    name = "fuse-overlayfs"

    def available(self) -> str | None:
        return None if shutil.which("fuse-overlayfs") else "fuse-overlayfs is not installed"

    def mount(self, env: Env, upper: Path, work: Path) -> None:
        logf = open(env.venv / ".ovl" / "daemon.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(["fuse-overlayfs", "-f", "-o", self.opts(upper, work),
                                 str(env.site)], stdout=logf, stderr=logf,
                                stdin=subprocess.DEVNULL, env=self.ctx.env,
                                start_new_session=True)
        logf.close()
        site = env.site

        def undo() -> None:
            force_umount(site, fuse=True)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        env.undo = self.ctx.cleanup.add(f"fuse-overlayfs at {site}", undo)
        env.pid = proc.pid
        deadline = time.monotonic() + 30
        while not mounted(site):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"fuse-overlayfs did not mount {site} (see {logf.name})")
            time.sleep(0.001)
        os.stat(site)


class KernelOverlay(_Overlay):
    name = "kernel-overlay"

    def available(self) -> str | None:
        if os.geteuid() != 0:
            return "kernel overlayfs needs root"
        probe = self.ctx.work / "overlay-probe"
        dirs = [probe / d for d in ("l", "u", "w", "m")]
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        l, u, w, m = dirs  # noqa: E741
        proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                               f"lowerdir={l},upperdir={u},workdir={w}", str(m)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return f"mount -t overlay failed: {proc.stderr.strip()}"
        force_umount(m, fuse=False)
        shutil.rmtree(probe, ignore_errors=True)
        return None

    def mount(self, env: Env, upper: Path, work: Path) -> None:
        run(self.ctx, ["mount", "-t", "overlay", "overlay", "-o", self.opts(upper, work),
                       env.site])
        site = env.site
        env.undo = self.ctx.cleanup.add(f"overlay at {site}", lambda: force_umount(site, False))
        wait_mounted(site)


# -- cowfs -------------------------------------------------------------------------------------


class Cowfs(Peer):
    name = "cowfs"
    installs = True

    @property
    def cmd(self) -> list[str | Path]:
        return list(self.ctx.cowfs)

    def install_cmd(self, venv: Path) -> list[str | Path]:
        c = self.ctx
        return [*self.cmd, "install", "--venv", venv, "-q", "-r", c.workload, "--no-index",
                "--find-links", c.wheels]

    def venv(self, venv: Path) -> Env:
        run(self.ctx, [*self.cmd, "venv", venv, "--python", self.ctx.python])
        site = site_of(venv)

        def undo() -> None:
            if mounted(site):
                run(self.ctx, [*self.cmd, "umount", venv], check=False)
            force_umount(site, fuse=True)

        env = Env(self.name, venv, site, venv / "bin" / "python")
        env.undo = self.ctx.cleanup.add(f"cowfs venv {venv}", undo)
        return env

    def prepare(self) -> None:
        # The first install ingests every wheel into the store; not measured.
        venv = self.ctx.work / "cowfs-warmup"
        if not venv.exists():
            env = self.venv(venv)
            run(self.ctx, self.install_cmd(venv))
            self.close(env)

    def new_env(self) -> Env:
        env = self.venv(self.ctx.new_dir(self.name) / "venv")
        run(self.ctx, self.install_cmd(env.venv))
        env.pid = self.daemon_pid(env)
        return env

    def install_time(self) -> float:
        env = self.venv(self.ctx.new_dir(f"{self.name}-inst") / "venv")
        os.sync()
        t = timed(self.ctx, self.install_cmd(env.venv))
        self.close(env)
        return t

    @staticmethod
    def daemon_pid(env: Env) -> int | None:
        from cowfs.mount import control
        from cowfs.mount.spec import MountSpec

        spec = MountSpec.for_mountpoint(str(env.site))
        status = control.try_request(spec.socket, "status") if spec else None
        return int(status["pid"]) if status else None

    def remount_time(self, env: Env) -> float:
        """`cowfs umount VENV` (not timed), then `cowfs mount VENV` until it answers."""
        run(self.ctx, [*self.cmd, "umount", env.venv])
        t = timed(self.ctx, [*self.cmd, "mount", env.venv])
        env.pid = self.daemon_pid(env)
        return t

    def remount_time_api(self, env: Env) -> float:
        """The same through cowfs.mount.mount.mount() in this process: no CLI start-up."""
        from cowfs.mount import mount as mounting
        from cowfs.mount.spec import VenvState

        run(self.ctx, [*self.cmd, "umount", env.venv])
        spec = VenvState.load(env.venv).mount_spec()
        start = time.perf_counter()
        mounting.mount(spec)
        t = time.perf_counter() - start
        env.pid = self.daemon_pid(env)
        return t


class CowfsPassthrough(Cowfs):
    """cowfs with FUSE passthrough forced (COWFS_PASSTHROUGH=1), side by side. (Plain cowfs
    decides per mount: passthrough where another live mount serves the same store files,
    which in a run with this peer or page-cache's two venvs is every mount.)"""

    name = "cowfs-pt"
    setting = "1"

    @property
    def cmd(self) -> list[str | Path]:
        return ["env", f"COWFS_PASSTHROUGH={self.setting}", *self.ctx.cowfs]

    def remount_time_api(self, env: Env) -> float:
        os.environ["COWFS_PASSTHROUGH"] = self.setting
        try:
            return super().remount_time_api(env)
        finally:
            del os.environ["COWFS_PASSTHROUGH"]


class CowfsKernelOpens(CowfsPassthrough):
    """cowfs with passthrough off (COWFS_PASSTHROUGH=0): the kernel opens files itself."""

    name = "cowfs-kernel"
    setting = "0"


def make_peers(ctx: Ctx, names: list[str]) -> tuple[dict[str, Peer], dict[str, str]]:
    classes = {"native": Native, "uv-copy": UvCopy, "fuse-overlayfs": FuseOverlayfs,
               "kernel-overlay": KernelOverlay, "cowfs": Cowfs,
               "cowfs-pt": CowfsPassthrough, "cowfs-kernel": CowfsKernelOpens}
    peers: dict[str, Peer] = {}
    skipped: dict[str, str] = {}
    for name in names:
        peer = classes[name](ctx)
        why = peer.available()
        if why:
            log(f"peer {name} skipped: {why}")
            skipped[name] = why
        else:
            peers[name] = peer
    return peers, skipped
