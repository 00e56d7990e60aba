"""The scale run: mount time and daemon RSS at 100k files (targets: <= 1.5 s, <= 200 MB).

overlay-100k   generic overlay mode: `cowfs mount -o lowerdir=L,upperdir=U,workdir=W src MNT`
               over a synthetic plain directory of N small files (100 dirs x 10 x N/1000)
store-100k     a store-backed venv whose lower is a synthetic N-file manifest (256 distinct
               objects, written through cowfs.store.store / cowfs.store.manifest; no 100k fsyncs)
torch          optional: the PyTorch CPU wheel installed with `cowfs install` (and uv for
               the native import time)

Each case: mount time (CLI process, and the API call), then `find -type f` + stat of every
file (which makes the daemon hold a node per file), then the daemon's VmHWM, VmRSS and open
fds (bounded: layer roots + cached directory handles, not per file). fuse-overlayfs
over the same synthetic lower is measured alongside for reference.
"""

from __future__ import annotations

import glob
import hashlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib.common import (
    Ctx,
    fd_count,
    force_umount,
    log,
    median,
    mounted,
    proc_status,
    run,
    timed,
)
from benchlib.peers import Cowfs, Env, FuseOverlayfs, site_of

TORCH_GLOB = ("/opt/wheels/torch-*+cpu-cp311-*.whl",)


def synth_lower(root: Path, n: int) -> None:
    for i in range(n):
        d = root / f"pkg{i // 1000:03d}" / f"sub{(i // 100) % 10}"
        if i % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"mod{i}.py").write_bytes(b"# synthetic module %d\nVALUE = %d\n" % (i, i))


def _daemon_pid(mp: Path) -> int | None:
    from cowfs.mount import control
    from cowfs.mount.spec import MountSpec

    spec = MountSpec.for_mountpoint(str(mp))
    status = control.try_request(spec.socket, "status") if spec else None
    return int(status["pid"]) if status else None


def _walk(ctx: Ctx, mp: Path) -> float:
    return timed(ctx, ["find", str(mp), "-type", "f", "-printf", "%s %m\n"])


def _measure(ctx: Ctx, mp: Path, mount_cmd: list[str | Path], umount_cmd: list[str | Path],
             api_mount: Any) -> dict[str, Any]:
    reps = max(3, min(ctx.reps, 5))
    cli, api = [], []
    for _ in range(reps):
        run(ctx, umount_cmd)
        cli.append(timed(ctx, mount_cmd))
        run(ctx, umount_cmd)
        start = time.perf_counter()
        api_mount()
        api.append(time.perf_counter() - start)
    walk = _walk(ctx, mp)
    walk2 = _walk(ctx, mp)
    pid = _daemon_pid(mp)
    st = proc_status(pid) if pid else {}
    from cowfs.mount import control
    from cowfs.mount.spec import MountSpec

    spec = MountSpec.for_mountpoint(str(mp))
    status = control.try_request(spec.socket, "status") if spec else None
    return {"mount_time_s": round(median(cli), 4), "mount_time_runs": [round(x, 4) for x in cli],
            "mount_time_api_s": round(median(api), 4), "walk_s": round(walk, 3),
            "walk_warm_s": round(walk2, 3),
            "daemon_rss_mb": round(st.get("VmHWM", 0) / 1024, 1) if st else None,
            "daemon_vmrss_mb": round(st.get("VmRSS", 0) / 1024, 1) if st else None,
            "daemon_fds": fd_count(pid) if pid else None,
            "nodes": status.get("nodes") if status else None}


def overlay_case(ctx: Ctx, n: int) -> dict[str, Any]:
    from cowfs.mount import mount as mounting
    from cowfs.mount.spec import MountSpec

    base = ctx.new_dir("scale-overlay")
    lower, upper, work, mp = (base / d for d in ("lower", "upper", "work", "mnt"))
    for d in (upper, work, mp):
        d.mkdir()
    t0 = time.perf_counter()
    synth_lower(lower, n)
    log(f"scale: {n} files written in {time.perf_counter() - t0:.1f}s")
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    mount_cmd: list[str | Path] = [*ctx.cowfs, "mount", "-o", opts, "synthetic", mp]
    umount_cmd: list[str | Path] = [*ctx.cowfs, "umount", mp]

    def undo() -> None:
        if mounted(mp):
            run(ctx, umount_cmd, check=False)
        force_umount(mp, fuse=True)

    ctx.cleanup.add(f"scale overlay {mp}", undo)
    run(ctx, mount_cmd)
    spec = MountSpec(mountpoint=str(mp), upper=str(upper), work=str(work),
                     log=str(work) + ".log", lowerdirs=[str(lower)])
    out = _measure(ctx, mp, mount_cmd, umount_cmd, lambda: mounting.mount(spec))
    out["files"] = n
    undo()
    # fuse-overlayfs over the same lower, for reference.
    if FuseOverlayfs(ctx).available() is None:
        peer = FuseOverlayfs(ctx)
        peer.lower = lower
        venv = base / "fov"
        (venv / ".ovl" / "upper").mkdir(parents=True)
        (venv / ".ovl" / "work").mkdir()
        (venv / "site").mkdir()
        env = Env("fuse-overlayfs", venv, venv / "site", venv / "python")
        t = time.perf_counter()
        peer.mount(env, venv / ".ovl" / "upper", venv / ".ovl" / "work")
        mount_s = time.perf_counter() - t
        walk = _walk(ctx, env.site)
        st = proc_status(env.pid) if env.pid else {}
        out["fuse_overlayfs"] = {"mount_time_s": round(mount_s, 4), "walk_s": round(walk, 3),
                                 "daemon_rss_mb": round(st.get("VmHWM", 0) / 1024, 1)}
        peer.close(env)
    return out


def _synthetic_manifest(ctx: Ctx, n: int) -> str:
    from cowfs.store.manifest import FileEntry, Manifest, write_manifest
    from cowfs.store.store import Store

    store = Store(Path(ctx.env["COWFS_HOME"])).ensure()
    digests = [store.put_bytes(b"# synthetic object %d\nVALUE = %d\n" % (k, k))
               for k in range(256)]
    files = [FileEntry(f"synth{i // 1000:03d}/sub{(i // 100) % 10}/mod{i}.py",
                       digests[i % 256], 32, 0o644) for i in range(n)]
    info = "synth100k-1.0.dist-info"
    files.append(FileEntry(f"{info}/METADATA", store.put_bytes(
        b"Metadata-Version: 2.1\nName: synth100k\nVersion: 1.0\n"), 51, 0o644))
    ident = "synth100k-1.0-" + hashlib.sha256(str(n).encode()).hexdigest()[:16]
    write_manifest(store, Manifest(id=ident, name="synth100k", version="1.0",
                                   files=tuple(files), dist_info=info))
    return ident


def store_case(ctx: Ctx, n: int) -> dict[str, Any]:
    from cowfs.mount import mount as mounting
    from cowfs.mount.spec import VenvState

    peer = Cowfs(ctx)
    env = peer.venv(ctx.new_dir("scale-store") / "venv")
    ident = _synthetic_manifest(ctx, n)
    state = VenvState.load(env.venv)
    state.dists.append(ident)
    state.save()
    run(ctx, [*ctx.cowfs, "umount", env.venv])
    run(ctx, [*ctx.cowfs, "mount", env.venv])
    out = _measure(ctx, env.site, [*ctx.cowfs, "mount", env.venv],
                   [*ctx.cowfs, "umount", env.venv],
                   lambda: mounting.mount(VenvState.load(env.venv).mount_spec()))
    out["files"] = n
    peer.close(env)
    return out


def torch_case(ctx: Ctx, wheel: Path) -> dict[str, Any]:
    from cowfs.mount import mount as mounting
    from cowfs.mount.spec import VenvState

    log(f"scale: torch wheel {wheel.name} (+ its dependencies, fetched once)")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:",
                    "-d", str(ctx.wheels), str(wheel)], check=True, capture_output=True)
    peer = Cowfs(ctx)
    env = peer.venv(ctx.new_dir("scale-torch") / "venv")
    install = [*ctx.cowfs, "install", "--venv", env.venv, "-q", str(wheel), "--no-index",
               "--find-links", ctx.wheels]
    t_install = timed(ctx, install)
    files = int(subprocess.run(f"find '{env.site}' -type f | wc -l", shell=True,
                               capture_output=True, text=True).stdout.strip() or 0)
    out = _measure(ctx, env.site, [*ctx.cowfs, "mount", env.venv],
                   [*ctx.cowfs, "umount", env.venv],
                   lambda: mounting.mount(VenvState.load(env.venv).mount_spec()))
    out.update(files=files, install_cold_s=round(t_install, 2))
    imp = [str(env.python), "-c", "import torch"]
    timed(ctx, imp)
    out["import_torch_warm_s"] = round(median([timed(ctx, imp) for _ in range(3)]), 3)
    native = ctx.new_dir("scale-torch-native") / "venv"
    run(ctx, [ctx.uv, "venv", "-q", "--python", ctx.python, native])
    run(ctx, [ctx.uv, "pip", "install", "-q", "--python", native / "bin" / "python",
              "--link-mode", "hardlink", "--no-index", "--find-links", ctx.wheels, wheel])
    nimp = [str(native / "bin" / "python"), "-c", "import torch"]
    timed(ctx, nimp)
    out["import_torch_warm_native_s"] = round(median([timed(ctx, nimp) for _ in range(3)]), 3)
    out["note"] = (f"import torch warm: cowfs {out['import_torch_warm_s']}s vs native "
                   f"{out['import_torch_warm_native_s']}s; site {site_of(native).name}")
    peer.close(env)
    return out


def run_scale(ctx: Ctx, n: int, torch: str | None) -> dict[str, Any]:
    cases: dict[str, Any] = {}
    key = f"{n // 1000}k" if n >= 1000 else str(n)
    log(f"scale: generic overlay over {n} files")
    cases[f"overlay-{key}"] = overlay_case(ctx, n)
    log(f"scale: store-backed venv with a {n}-file manifest")
    cases[f"store-{key}"] = store_case(ctx, n)
    if torch:
        found = [Path(p) for g in TORCH_GLOB for p in glob.glob(g)] if torch == "auto" \
            else [Path(torch)]
        if found and found[0].is_file():
            cases["torch"] = torch_case(ctx, found[0])
        else:
            log("scale: no torch wheel found; skipped")
    return {"files": n, "cases": cases}

