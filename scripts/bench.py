#!/usr/bin/env python3
"""cowfs benchmark: the figures of /work/shared/bench/README.md, as ratios to native, in one run.

Peers: native (uv hardlink), uv-copy, fuse-overlayfs, kernel-overlay, cowfs. Prints a table,
writes bench-results/bench-<timestamp>.json and a PNG chart of the ratios next to it, and
unmounts everything it mounted (also on Ctrl-C and failures). Root is needed for the kernel
overlay peer and for dropping caches (read-all-cold).

    scripts/bench                      # full run
    scripts/bench --quick              # fewer repetitions, no cold read
    scripts/bench --figures import-warm,walk --peers native,cowfs
    scripts/bench --scale [--torch]    # + 100k-file mount time / daemon RSS
    scripts/bench --profile            # + FUSE requests per operation (instrumented daemon)
    scripts/bench --docker [--quick]   # a ready venv in a new container, cowfs vs uv (Docker)
    scripts/bench --figures install-cold [--cold-remote]  # empty caches, vs uv pip install
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import figures as F, report, uvinto
from benchlib.common import (
    DEFAULT_IMPORTS,
    ROOT,
    BenchError,
    Cleanup,
    Ctx,
    child_env,
    install_signal_handlers,
    log,
)
from benchlib.peers import EXTRA_PEERS, PEERS, make_peers

SHARED_WORKLOAD = Path("/work/shared/bench/workload-ds.txt")
BUNDLED_WORKLOAD = Path(__file__).resolve().parent / "benchlib" / "workload-ds.txt"
COLD = "install-cold"  # a section of its own: peers are uv's modes, not native
ALL_FIGURES = (*F.FIGURES, *uvinto.FIGURES, COLD)
WARM_FIGURES = {"import-warm", "walk", "read-all", "read-all-cold", "daemon-rss", "mount-time"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 repetitions, 2 fresh venvs, "
                   "no read-all-cold")
    p.add_argument("--figures", help=f"comma list of: {','.join(ALL_FIGURES)}")
    p.add_argument("--peers", help=f"comma list of: {','.join(PEERS + EXTRA_PEERS)}")
    p.add_argument("--reps", type=int, help="repetitions per figure (default 7; quick 3)")
    p.add_argument("--fresh", type=int, help="fresh venvs for import-first (default 3)")
    p.add_argument("--cold-reps", type=int, help="cold reads per peer (default 3)")
    p.add_argument("--workload", type=Path, help="pinned requirements file (default: the "
                   "shared workload-ds.txt, else the bundled copy)")
    p.add_argument("--wheels", type=Path, default=ROOT / ".cache" / "bench-wheels",
                   help="wheel directory (fetched once with pip download)")
    p.add_argument("--imports", default=DEFAULT_IMPORTS,
                   help="comma list of modules the import figures import")
    p.add_argument("--python", help="base interpreter for every venv (default: this one's base)")
    p.add_argument("--scale", action="store_true", help="also the 100k-file scale run")
    p.add_argument("--scale-files", type=int, default=100_000)
    p.add_argument("--torch", nargs="?", const="auto", default=None,
                   help="scale run: also a venv with the PyTorch CPU wheel (path or auto)")
    p.add_argument("--profile", action="store_true",
                   help="also count FUSE requests per operation with an instrumented daemon")
    p.add_argument("--cold-remote", action="store_true",
                   help="install-cold also installs the flask set from the configured index "
                   "(network)")
    p.add_argument("--docker", action="store_true",
                   help="the container figure: a ready venv of the workload in a new container, "
                   "store / uv cache warm on volumes (alone unless --figures names others)")
    p.add_argument("--out", type=Path, default=ROOT / "bench-results")
    p.add_argument("--workdir", type=Path, help="parent of the scratch directory (default /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (unmounted)")
    p.add_argument("--no-chart", action="store_true", help="no PNG (no matplotlib needed)")
    args = p.parse_args(argv)
    if args.figures:
        args.figures = [f.strip() for f in args.figures.split(",") if f.strip()]
        bad = [f for f in args.figures if f not in ALL_FIGURES]
        if bad:
            p.error(f"unknown figure(s) {bad}; known: {', '.join(ALL_FIGURES)}")
    elif args.docker:
        args.figures = []
    else:
        args.figures = list(F.QUICK_FIGURES if args.quick else ALL_FIGURES)
    if args.peers:
        args.peers = [x.strip() for x in args.peers.split(",") if x.strip()]
        bad = [x for x in args.peers if x not in PEERS + EXTRA_PEERS]
        if bad:
            p.error(f"unknown peer(s) {bad}; known: {', '.join(PEERS)}")
    else:
        args.peers = list(PEERS)
    args.reps = args.reps or (3 if args.quick else 7)
    args.fresh = args.fresh or (2 if args.quick else 3)
    args.cold_reps = args.cold_reps or (1 if args.quick else 3)
    if args.workload is None:
        args.workload = SHARED_WORKLOAD if SHARED_WORKLOAD.is_file() else BUNDLED_WORKLOAD
    return args


def base_python() -> str:
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(exe)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(workload: Path) -> list[tuple[str, str]]:
    out = []
    for line in workload.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, _, version = line.partition("==")
            out.append((_norm(name.split("[")[0].strip()), version.strip().split(";")[0]))
    return out


def ensure_wheels(workload: Path, wheels: Path, python: str) -> None:
    """pip download --only-binary :all: once; reuse when every pin has a wheel already."""
    wheels.mkdir(parents=True, exist_ok=True)
    have = {(_norm(w.name.split("-")[0]), w.name.split("-")[1]) for w in wheels.glob("*.whl")}
    missing = [p for p in pins(workload) if p not in have]
    if not missing:
        return
    version = subprocess.run([python, "-c", "import sys;print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    log(f"fetching {len(missing)} wheel(s) into {wheels}")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q",
                           "--disable-pip-version-check", "--only-binary", ":all:",
                           "--python-version", version, "-d", str(wheels), "-r", str(workload)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"pip download failed:\n{proc.stderr.strip()[-2000:]}")


def cowfs_command() -> list[str]:
    exe = Path(sys.executable).parent / "cowfs"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cowfs"]


def _version(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except OSError:
        return "?"
    return ((proc.stdout or proc.stderr).strip().splitlines() or ["?"])[0]


def machine_load() -> dict[str, object]:
    """How busy the machine is (the figures are ratios, but FUSE suffers more from load)."""
    out: dict[str, object] = {"loadavg": os.getloadavg()}
    for kind in ("cpu", "io"):
        try:
            first = Path(f"/proc/pressure/{kind}").read_text().splitlines()[0]
            out[f"psi_{kind}_some"] = dict(kv.split("=") for kv in first.split()[1:4])
        except (OSError, IndexError, ValueError):
            pass
    return out


def meta(ctx: Ctx, args: argparse.Namespace, skipped: dict[str, str]) -> dict[str, object]:
    rev = _version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "cowfs",
                            "installer"], capture_output=True, text=True).stdout.strip()
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
        "python": _version([ctx.python, "--version"]), "python_path": ctx.python,
        "uv": _version([ctx.uv, "--version"]),
        "fuse_overlayfs": _version(["fuse-overlayfs", "--version"]),
        "cowfs_rev": rev + ("+dirty" if dirty else ""),
        "workload": str(ctx.workload), "wheels": len(list(ctx.wheels.glob("*.whl"))),
        "imports": ctx.import_cmd, "reps": ctx.reps, "fresh": ctx.fresh,
        "cold_reps": ctx.cold_reps, "peers": args.peers, "skipped_peers": skipped,
        "figures": args.figures, "quick": args.quick, "argv": sys.argv[1:],
        "load_at_start": args.load_at_start, "load_at_end": machine_load(),
    }


def find_uv() -> str:
    beside = Path(sys.executable).parent / "uv"
    found = str(beside) if beside.exists() else shutil.which("uv")
    if not found:
        raise BenchError("uv is not installed (pip install uv into the dev env)")
    return found


def measure(ctx: Ctx, args: argparse.Namespace, res: F.Results) -> dict[str, object]:
    """Every selected figure; returns the extra sections (profile, scale)."""
    sections: dict[str, object] = {}
    peers, skipped = make_peers(ctx, args.peers)
    sections["skipped"] = skipped
    sections["pythons"] = []
    figs = set(args.figures)
    need_envs = bool(figs & (WARM_FIGURES | {"import-first", "disk-per-venv"}))
    if peers and (need_envs or figs & {"install-warm", "page-cache"}):
        for name, peer in peers.items():
            log(f"preparing {name}")
            peer.prepare()
    if "install-warm" in figs:
        F.install_warm(ctx, res, peers)
    if "page-cache" in figs:
        F.page_cache(ctx, res, peers)
    envs = {}
    if figs & {"import-first", "disk-per-venv"}:
        envs = F.import_first(ctx, res, peers)
    elif need_envs:
        envs = F.main_envs(ctx, peers)
    sections["pythons"] = [e.python for e in envs.values()]
    if "import-warm" in figs:
        F.import_warm(ctx, res, envs)
    if "walk" in figs:
        F.walk(ctx, res, envs)
    if "read-all" in figs:
        F.read_all(ctx, res, envs)
    if "read-all-cold" in figs:
        F.read_all_cold(ctx, res, envs)
    if "daemon-rss" in figs:
        F.daemon_rss(ctx, res, envs)
    if "mount-time" in figs:
        F.mount_time(ctx, res, peers, envs)
    if uvinto.FIGURE in figs:
        uvinto.run_figure(ctx, res)
    if COLD in figs:
        from benchlib import coldinstall

        log("install-cold: empty caches each repetition, cowfs vs uv")
        sections["install_cold"] = coldinstall.run(ctx.wheels, ctx.workload, ctx.python,
                                                   ctx.uv, min(ctx.reps, 3),
                                                   remote=args.cold_remote)
    if args.profile and "cowfs" in peers:
        from benchlib import fuseprof

        sections["profile"] = fuseprof.run(ctx, peers["cowfs"], envs.get("native"))
        sections["profile"]["kernel"] = fuseprof.kernel_view(ctx, peers, envs)
    if args.scale:
        from benchlib import scale

        sections["scale"] = scale.run_scale(ctx, args.scale_files, args.torch)
    if args.docker:
        from benchlib import dockerbench

        sections["docker"] = dockerbench.run(ctx, min(ctx.reps, 5))
    return sections


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.load_at_start = machine_load()
    install_signal_handlers()
    cleanup = Cleanup()
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cowfs-bench-", dir=parent))
    runtime = Path(tempfile.mkdtemp(prefix="cbrt-", dir="/tmp"))  # short: sun_path limit
    if not args.keep:
        from benchlib.common import rmtree

        cleanup.add(f"scratch {work}", lambda: rmtree(work))
    cleanup.add(f"runtime {runtime}", lambda: shutil.rmtree(runtime, ignore_errors=True))
    env = child_env(work, runtime)
    os.environ.update({k: env[k] for k in ("COWFS_HOME", "COWFS_RUNTIME_DIR")})
    python = args.python or base_python()
    ctx = Ctx(work=work, wheels=args.wheels.absolute(), workload=args.workload.absolute(),
              python=python, uv=find_uv(), cowfs=cowfs_command(), imports=args.imports,
              reps=args.reps, fresh=args.fresh, cold_reps=args.cold_reps, cleanup=cleanup,
              env=env)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_json = args.out / f"bench-{stamp}.json"
    try:
        ensure_wheels(ctx.workload, ctx.wheels, python)
        log(f"scratch {work}; {len(pins(ctx.workload))} pins; reps {ctx.reps}")
        res = F.Results()
        sections = measure(ctx, args, res)
        figs = report.build_figures(res, [f for f in args.figures if f != COLD])
        uvinto.finish(figs)
        rows = report.verdicts(figs, sections.get("scale"))  # type: ignore[arg-type]
        rows += uvinto.verdicts(figs)
        doc = {"meta": meta(ctx, args, sections["skipped"]), "figures": figs,  # type: ignore[arg-type]
               "targets": rows, "trees": res.extra.get("tree"), "scale": sections.get("scale"),
               "profile": sections.get("profile"), "docker": sections.get("docker"),
               "install_cold": sections.get("install_cold")}
        report.write_json(out_json, doc)
        shown = [p for p in args.peers if any(p in f["peers"] for f in figs.values())]
        if figs:
            print(report.table(figs, shown, rows, res.extra.get("tree")))
            if uvinto.FIGURE in figs:
                print(uvinto.render(figs))
        load = doc["meta"]["load_at_end"]  # type: ignore[index]
        print(f"machine load at the end: {load}")
        for section in ("scale", "profile"):
            if sections.get(section):
                from benchlib import summary

                print(summary.render(section, sections[section]))
        if sections.get("install_cold"):
            from benchlib import coldinstall

            print(coldinstall.render(sections["install_cold"]))  # type: ignore[arg-type]
        if sections.get("docker"):
            from benchlib import dockerbench

            print(dockerbench.render(sections["docker"]))  # type: ignore[arg-type]
        png = out_json.with_suffix(".png")
        pythons = [*sections["pythons"], Path(sys.executable)]  # type: ignore[misc]
        if figs and not args.no_chart and report.chart(out_json, png, pythons, ctx.env):
            print(f"\nchart: {png}")
        print(f"json:  {out_json}")
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        cleanup.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
