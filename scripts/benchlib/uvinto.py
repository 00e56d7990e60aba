"""The uv-into-cowfs figure: uv itself installs the workload into a cowfs venv.

uv writes every file into the venv's upper layer (VENV/.cowfs/upper) like into any
site-packages; the mount daemon absorbs what it installed into the store about a second
after uv went quiet, and `cowfs adopt VENV` does so at once (installer/venv/absorb.py). Measured,
for venvs after the first (the first fills the store; its numbers are notes):

  uv-into-cowfs          wall time of `uv pip install --link-mode copy` into a cowfs venv
                         vs into a plain uv venv (uv copies from its warm cache in both)
  uv-into-cowfs-absorb   `cowfs adopt VENV` right after the install (waits for an absorb
                         the daemon runs, then absorbs the rest), vs the plain install
  uv-into-cowfs-disk     disk each venv adds: du of the venv (its .cowfs: upper layer,
                         state; the mount itself is not counted) + the store's growth,
                         vs the plain venv's du
  uv-sync-into-cowfs*    the same with `uv sync --frozen` in a `uv init` project whose
                         dependencies are the workload (locked once, untimed); skipped
                         with a note when the project cannot be locked offline

Each venv then waits up to ABSORB_WAIT_S for its upper layer to hold no files and runs
`cowfs adopt` once more (untimed: a barrier behind any absorb the daemon still runs); what
stays private is counted and listed by top-level directory (`private` in the notes).
Venvs measured: --fresh minus one (quick: 1, full: 2).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchlib.common import BenchError, Ctx, du_added, log, median, run, timed
from benchlib.figures import Results
from benchlib.peers import Cowfs, Env, Native

FIGURE = "uv-into-cowfs"
FIGURES = (FIGURE,)
PLAIN, COW = "uv-copy", "cowfs"
VARIANTS = {"pip": "uv-into-cowfs", "sync": "uv-sync-into-cowfs"}
DISK_TARGET_MB = 2.0
ABSORB_WAIT_S = 20.0


def _mb(path: Path) -> float:
    return du_added([path]) / 1e6 if path.exists() else 0.0


def upper_files(venv: Path) -> list[str]:
    """Files (not directories) in a cowfs venv's upper layer, relative to it."""
    upper = venv / ".cowfs" / "upper"
    out = []
    for root, _dirs, files in os.walk(upper):
        out.extend(os.path.relpath(os.path.join(root, f), upper) for f in files)
    return sorted(out)


def _private_summary(files: list[str]) -> dict[str, int]:
    """Top-level directory -> files left in the upper layer (the 8 largest)."""
    return dict(Counter(f.split("/", 1)[0] for f in files).most_common(8))


class Runner:
    def __init__(self, ctx: Ctx, res: Results) -> None:
        self.ctx = ctx
        self.res = res
        self.cow = Cowfs(ctx)
        self.native = Native(ctx)
        self.store = ctx.work / "store"
        self.project: Path | None = None  # a locked `uv init` project to copy from

    # -- the installs ------------------------------------------------------------------------

    def pip_cmd(self, venv: Path) -> list[str | Path]:
        c = self.ctx
        return [c.uv, "pip", "install", "-q", "--python", venv / "bin" / "python",
                "--link-mode", "copy", "--no-index", "--find-links", c.wheels, "-r", c.workload]

    def sync_cmd(self) -> list[str | Path]:
        c = self.ctx
        return [c.uv, "sync", "-q", "--frozen", "--no-install-project", "--link-mode", "copy",
                "--no-index", "--find-links", c.wheels, "--python", c.python]

    def template(self) -> Path | None:
        """A `uv init` project with the workload as dependencies, locked offline (once)."""
        if self.project is not None:
            return self.project
        proj = self.ctx.work / "uv-project-template"
        proj.mkdir()
        run(self.ctx, [self.ctx.uv, "init", "-q", "--no-workspace", "--python",
                       self.ctx.python, "--name", "uvinto"], cwd=proj)
        deps = [ln.split("#", 1)[0].strip() for ln in self.ctx.workload.read_text().splitlines()]
        deps = [d for d in deps if d]
        py = run(self.ctx, [self.ctx.python, "-c", "import sys;print('%d.%d' % "
                            "sys.version_info[:2])"]).stdout.strip()
        text = (proj / "pyproject.toml").read_text()
        text = re.sub(r"requires-python = \"[^\"]*\"", f'requires-python = "=={py}.*"', text)
        text = re.sub(r"dependencies = \[\]", "dependencies = [\n"
                      + "".join(f'    "{d}",\n' for d in deps) + "]", text)
        text += '\n[tool.uv]\nenvironments = ["sys_platform == \'linux\'"]\n'
        (proj / "pyproject.toml").write_text(text)
        lock = run(self.ctx, [self.ctx.uv, "lock", "-q", "--no-index", "--find-links",
                              self.ctx.wheels, "--python", self.ctx.python], cwd=proj,
                   check=False)
        if lock.returncode != 0:
            why = (lock.stderr.strip().splitlines() or ["?"])[-1]
            log(f"uv-sync-into-cowfs skipped: uv lock failed: {why}")
            self.res.note(FIGURE, "sync_skipped", f"uv lock failed: {why}")
            return None
        self.project = proj
        return proj

    def new_project(self, prefix: str) -> Path:
        tpl = self.template()
        assert tpl is not None
        proj = self.ctx.new_dir(prefix)
        for name in ("pyproject.toml", "uv.lock", ".python-version"):
            if (tpl / name).exists():
                shutil.copy2(tpl / name, proj / name)
        return proj

    # -- one venv of each kind ---------------------------------------------------------------

    def plain(self, variant: str) -> tuple[float, float]:
        """(install s, MB) of a plain uv venv."""
        if variant == "pip":
            venv = self.ctx.new_dir("uvinto-plain") / "venv"
            self.native.uv_venv(venv)
            cmd, cwd = self.pip_cmd(venv), None
        else:
            cwd = self.new_project("uvsync-plain")
            venv = cwd / ".venv"
            self.native.uv_venv(venv)
            cmd = self.sync_cmd()
        os.sync()
        t = timed(self.ctx, cmd, cwd=cwd)
        os.sync()
        return t, _mb(venv)

    def cowfs(self, variant: str) -> dict[str, Any]:
        """Install into a fresh cowfs venv, absorb, and measure what it added."""
        store0 = _mb(self.store)
        if variant == "pip":
            venv = self.ctx.new_dir("uvinto-cowfs") / "venv"
            cwd = None
        else:
            cwd = self.new_project("uvsync-cowfs")
            venv = cwd / ".venv"
        env: Env = self.cow.venv(venv)
        try:
            cmd = self.pip_cmd(venv) if variant == "pip" else self.sync_cmd()
            os.sync()
            t_install = timed(self.ctx, cmd, cwd=cwd)
            before = upper_files(venv)
            start = time.perf_counter()
            adopt = run(self.ctx, [*self.ctx.cowfs, "adopt", venv])
            t_adopt = time.perf_counter() - start
            waited, left = self.settle(venv)
            self.check_installed(env)
            os.sync()
            out = {"install_s": t_install, "adopt_s": t_adopt, "settle_s": waited,
                   "upper_files_after_install": len(before),
                   "adopt_said": adopt.stdout.strip().splitlines()[:1],
                   "venv_mb": _mb(venv), "upper_mb": _mb(venv / ".cowfs" / "upper"),
                   "store_growth_mb": _mb(self.store) - store0,
                   "private_files": len(left), "private": _private_summary(left)}
            out["added_mb"] = out["venv_mb"] + out["store_growth_mb"]
            return out
        finally:
            self.cow.close(env)

    def settle(self, venv: Path) -> tuple[float, list[str]]:
        """Wait (bounded) for the upper layer to empty, then a barrier adopt and its bytecode."""
        start = time.perf_counter()
        deadline = time.monotonic() + ABSORB_WAIT_S
        while (left := upper_files(venv)) and time.monotonic() < deadline:
            time.sleep(0.2)
        run(self.ctx, [*self.ctx.cowfs, "adopt", venv])
        # The shared bytecode of what was absorbed is compiled after adopt returns: what it
        # adds to the store belongs to this venv, not to the next one measured.
        from installer.wheel.bytecode_bg import wait

        wait(venv, 600)
        return time.perf_counter() - start, upper_files(venv) if left else []

    def check_installed(self, env: Env) -> None:
        """Every pin is visible through the mount (a broken absorb must not pass as small)."""
        names = {re.sub(r"[-_.]+", "_", n.split("-")[0]).lower()
                 for n in os.listdir(env.site) if n.endswith(".dist-info")}
        want = {re.sub(r"[-_.]+", "_", ln.split("==")[0].split("[")[0].strip()).lower()
                for ln in self.ctx.workload.read_text().splitlines()
                if "==" in ln.split("#", 1)[0]}
        if want - names:
            raise BenchError(f"{env.venv}: not installed after absorb: {sorted(want - names)}")

    # -- the figure --------------------------------------------------------------------------

    def variant(self, variant: str, reps: int) -> None:
        fig = VARIANTS[variant]
        first = self.cowfs(variant) if variant == "pip" else None  # fills the store
        if first is not None:
            log(f"{fig} first venv (fills the store): {_brief(first)}")
            self.res.note(fig, "first_venv", _round(first))
        runs: list[dict[str, Any]] = []
        for rep in range(reps):
            t_plain, mb_plain = self.plain(variant)
            got = self.cowfs(variant)
            runs.append(_round(got))
            self.res.add(fig, PLAIN, t_plain)
            self.res.add(fig, COW, got["install_s"])
            self.res.add(f"{fig}-absorb", COW, got["adopt_s"])
            self.res.add(f"{fig}-disk", PLAIN, mb_plain)
            self.res.add(f"{fig}-disk", COW, got["added_mb"])
            log(f"{fig} {rep + 1}/{reps}: plain {t_plain:.2f}s/{mb_plain:.0f}MB, "
                f"cowfs {_brief(got)}")
        self.res.note(fig, "venvs", {str(i + 1): r for i, r in enumerate(runs)})
        self.res.note(fig, "private_files", max(r["private_files"] for r in runs))
        self.res.note(fig, "upper_mb", median([r["upper_mb"] for r in runs]))
        self.res.note(fig, "store_growth_mb", median([r["store_growth_mb"] for r in runs]))


def _round(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


def _brief(d: dict[str, Any]) -> str:
    return (f"install {d['install_s']:.2f}s, adopt {d['adopt_s']:.2f}s, "
            f"+{d['added_mb']:.1f}MB (upper {d['upper_mb']:.1f}, store "
            f"+{d['store_growth_mb']:.1f}), {d['private_files']} files private {d['private']}")


def run_figure(ctx: Ctx, res: Results) -> None:
    """Measure uv-into-cowfs (and its uv sync variant)."""
    reps = max(1, ctx.fresh - 1)
    runner = Runner(ctx, res)
    warm = ctx.work / "uv-warmup"  # the uv cache, as the native peer warms it
    if not warm.exists():
        runner.native.uv_venv(warm)
        run(ctx, runner.pip_cmd(warm))
    runner.variant("pip", reps)
    if runner.template() is not None:
        runner.variant("sync", reps)


# -- report: ratios to the plain uv venv, the target, the text -------------------------------


def _med(figs: dict[str, Any], fig: str, peer: str) -> float | None:
    return figs.get(fig, {}).get("peers", {}).get(peer, {}).get("median")


def finish(figs: dict[str, Any]) -> None:
    """Ratios of this figure's rows to the plain uv venv, as ratio_vs_uv_copy (report.py
    knows only ratios to native or to a target; "ratio" stays None: no misleading table
    suffix)."""
    for base_fig in VARIANTS.values():
        plain_t = _med(figs, base_fig, PLAIN)
        for fig in (base_fig, f"{base_fig}-absorb", f"{base_fig}-disk"):
            doc = figs.get(fig)
            if not doc:
                continue
            doc["base"] = "uv-copy"
            if fig.endswith("-disk"):
                doc["unit"] = "MB"
                base = _med(figs, fig, PLAIN)
            else:
                base = plain_t
            doc["ratio_vs_uv_copy"] = {}
            for peer, d in doc["peers"].items():
                ok = base and d["median"] is not None and not math.isnan(base)
                d["ratio"] = None
                doc["ratio_vs_uv_copy"][peer] = (
                    round(d["median"] / base, 4) if ok else None)  # type: ignore[operator]
        cow_t = _med(figs, base_fig, COW)
        adopt_t = _med(figs, f"{base_fig}-absorb", COW)
        if plain_t and cow_t is not None and adopt_t is not None:
            figs[base_fig]["ratio_install_plus_absorb"] = round((cow_t + adopt_t) / plain_t, 3)


def verdicts(figs: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for base_fig in VARIANTS.values():
        mb = _med(figs, f"{base_fig}-disk", COW)
        if mb is not None:
            rows.append({"figure": f"{base_fig}-disk", "target": "<= 2 MB per extra venv",
                         "value": mb, "unit": "MB", "met": mb <= DISK_TARGET_MB})
    return rows


def render(figs: dict[str, Any]) -> str:
    lines: list[str] = []
    for label, base_fig in VARIANTS.items():
        if base_fig not in figs:
            continue
        r = {f: figs.get(f, {}).get("ratio_vs_uv_copy", {}).get(COW)
             for f in (base_fig, f"{base_fig}-absorb", f"{base_fig}-disk")}
        both = figs[base_fig].get("ratio_install_plus_absorb")
        extra = figs[base_fig].get("extra", {})
        lines.append(
            f"{base_fig} (uv {'pip install' if label == 'pip' else 'sync'} --link-mode copy, "
            f"ratios to a plain uv venv): install {_x(r[base_fig])}, absorb (adopt) "
            f"{_x(r[base_fig + '-absorb'])}, install+absorb {_x(both)}, disk "
            f"{_x(r[base_fig + '-disk'])} ({_med(figs, base_fig + '-disk', COW) or 0:.1f} MB: "
            f"upper {extra.get('upper_mb', 0):.1f} + store +{extra.get('store_growth_mb', 0):.1f}"
            f"; {extra.get('private_files', 0)} files stay private)")
    return "\n".join(lines)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"
