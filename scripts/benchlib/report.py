"""Ratios, target verdicts, the stdout table, the JSON document and the PNG chart."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchlib.common import log, median
from benchlib.figures import UNITS, Results

# figure -> (base of its ratios, human description of the base)
BASES = {
    "install-warm": "native", "import-warm": "native", "import-first": "native",
    "walk": "native", "read-all": "native", "read-all-cold": "native",
    "disk-per-venv": "native", "daemon-rss": "target", "mount-time": "target",
    "mount-time-api": "target", "page-cache": "native",
}
ABS_TARGETS = {"daemon-rss": 60.0, "mount-time": 0.3, "mount-time-api": 0.3,
               "scale-daemon-rss": 200.0, "scale-mount-time": 1.5}


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(x, 6)


def build_figures(res: Results, figures: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fig in [*figures, *(f for f in res.samples if f not in figures)]:
        per_peer = res.samples.get(fig, {})
        base_kind = BASES.get(fig, "target")
        if base_kind == "native":
            base = median(per_peer.get("native", []))
        else:
            base = ABS_TARGETS.get(fig, float("nan"))
        doc: dict[str, Any] = {"unit": UNITS.get(fig, "s"), "base": base_kind, "peers": {}}
        for peer, runs in per_peer.items():
            m = median(runs)
            ratio = m / base if base and not math.isnan(base) and base > 0 else float("nan")
            doc["peers"][peer] = {"median": _num(m), "min": _num(min(runs)),
                                  "runs": [round(r, 6) for r in runs],
                                  "ratio": _num(ratio)}
        if fig == "install-warm" and "uv-copy" in per_peer:
            uvc = median(per_peer["uv-copy"])
            doc["ratio_vs_uv_copy"] = {p: _num(median(r) / uvc) for p, r in per_peer.items()}
        if fig == "import-first":
            warm = median(res.samples.get("import-warm", {}).get("native", []))
            doc["ratio_vs_native_warm"] = {p: _num(median(r) / warm)
                                           for p, r in per_peer.items()}
        trees = res.extra.get("tree", {})
        key = "files" if fig == "walk" else "bytes"
        if fig in ("walk", "read-all", "read-all-cold") and trees.get("native", {}).get(key) \
                and base and not math.isnan(base):
            nat = base / trees["native"][key]
            doc["ratio_per_" + ("file" if key == "files" else "byte")] = {
                p: _num(median(r) / trees[p][key] / nat)
                for p, r in per_peer.items() if trees.get(p, {}).get(key)}
        if fig in res.extra:
            doc["extra"] = res.extra[fig]
        out[fig] = doc
    return out


def _peer(figs: dict[str, Any], fig: str, peer: str, key: str = "ratio") -> float | None:
    return figs.get(fig, {}).get("peers", {}).get(peer, {}).get(key)


def verdicts(figs: dict[str, Any], scale: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The spec's targets, on cowfs."""
    rows: list[dict[str, Any]] = []

    def add(fig: str, target: str, value: float | None, limit: float, le: bool = True,
            unit: str = "x") -> None:
        met = None if value is None else (value <= limit if le else value >= limit)
        rows.append({"figure": fig, "target": target, "value": value, "unit": unit,
                     "met": met})

    add("install-warm", "<= 1.0x uv hardlink", _peer(figs, "install-warm", "cowfs"), 1.0)
    uvc = figs.get("install-warm", {}).get("ratio_vs_uv_copy", {}).get("cowfs")
    add("install-warm", ">= 5x faster than uv copy", 1 / uvc if uvc else None, 5.0, le=False)
    add("import-warm", "<= 1.10x native", _peer(figs, "import-warm", "cowfs"), 1.10)
    warm = figs.get("import-first", {}).get("ratio_vs_native_warm", {}).get("cowfs")
    add("import-first", "<= 1.3x native warm import", warm, 1.3)
    add("walk", "<= 1.5x native", _peer(figs, "walk", "cowfs"), 1.5)
    add("read-all", "warm <= 1.1x native", _peer(figs, "read-all", "cowfs"), 1.1)
    add("disk-per-venv", "<= 2 MB", _peer(figs, "disk-per-venv", "cowfs", "median"), 2.0,
        unit="MB")
    add("daemon-rss", "<= 60 MB (workload)", _peer(figs, "daemon-rss", "cowfs", "median"),
        60.0, unit="MB")
    add("mount-time", "<= 0.3 s (workload)", _peer(figs, "mount-time", "cowfs", "median"),
        0.3, unit="s")
    for case, doc in (scale or {}).get("cases", {}).items():
        if "daemon_rss_mb" in doc:
            add(f"scale-daemon-rss[{case}]", "<= 200 MB at 100k files", doc["daemon_rss_mb"],
                200.0, unit="MB")
        if "mount_time_s" in doc:
            add(f"scale-mount-time[{case}]", "<= 1.5 s at 100k files", doc["mount_time_s"],
                1.5, unit="s")
    return [r for r in rows if r["value"] is not None or r["figure"] in figs
            or r["figure"].startswith("scale")]


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "s":
        return f"{v * 1000:.0f}ms" if v < 10 else f"{v:.1f}s"
    return f"{v:.1f}{unit}"


def table(figs: dict[str, Any], peers: list[str], rows: list[dict[str, Any]],
          trees: dict[str, Any] | None = None) -> str:
    width = 20
    head = f"{'figure':<15}" + "".join(f"{p:>{width}}" for p in peers)
    lines = [head, "-" * len(head)]
    for fig, doc in figs.items():
        cells = []
        for p in peers:
            d = doc["peers"].get(p)
            if not d or d["median"] is None:
                cells.append(f"{'-':>{width}}")
                continue
            r = d["ratio"]
            rtxt = f" ({r:.2f}x)" if r is not None and doc["base"] == "native" else (
                f" ({r:.2f}T)" if r is not None else "")
            cells.append(f"{_fmt(d['median'], doc['unit']) + rtxt:>{width}}")
        lines.append(f"{fig:<15}" + "".join(cells))
    lines.append("")
    lines.append("(x) = ratio to native (install-warm also vs uv-copy below); "
                 "(T) = fraction of the cowfs target")
    iw = figs.get("install-warm", {}).get("ratio_vs_uv_copy")
    if iw:
        lines.append("install-warm vs uv-copy: " + ", ".join(
            f"{p} {v:.2f}x" for p, v in iw.items() if v))
    for fig, key in (("walk", "ratio_per_file"), ("read-all", "ratio_per_byte")):
        norm = figs.get(fig, {}).get(key)
        if norm:
            lines.append(f"{fig} normalised ({key.replace('ratio_', '')}, the trees differ): "
                         + ", ".join(f"{p} {v:.2f}x" for p, v in norm.items() if v))
    fw = figs.get("import-first", {}).get("ratio_vs_native_warm")
    if fw:
        lines.append("import-first vs native import-warm: " + ", ".join(
            f"{p} {v:.2f}x" for p, v in fw.items() if v))
    for fig, doc in figs.items():
        extra = {k: v for k, v in doc.get("extra", {}).items() if not isinstance(v, dict)}
        if extra:
            lines.append(f"{fig} notes: " + ", ".join(f"{k}={v}" for k, v in extra.items()))
    if trees:
        lines.append("site-packages trees: " + "; ".join(
            f"{p} {t['files']} files/{t['dirs']} dirs/{t['mb']}MB" for p, t in trees.items()))
    lines.append("")
    lines.append("cowfs targets:")
    for r in rows:
        met = {True: "MET ", False: "MISS", None: "n/a "}[r["met"]]
        v = r["value"]
        shown = "-" if v is None else (f"{v:.2f}x" if r["unit"] == "x" else _fmt(v, r["unit"]))
        lines.append(f"  [{met}] {r['figure']:<32} {r['target']:<28} measured {shown}")
    return "\n".join(lines)


CHART = r"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
doc = json.load(open(sys.argv[1]))
figs = {k: v for k, v in doc["figures"].items() if v["peers"]}
peers = [p for p in doc["meta"]["peers"] if any(p in f["peers"] for f in figs.values())]
fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(figs)), 5))
w = 0.8 / max(1, len(peers))
for i, p in enumerate(peers):
    xs, ys = [], []
    for j, (name, f) in enumerate(figs.items()):
        r = f["peers"].get(p, {}).get("ratio")
        if r:
            xs.append(j + (i - (len(peers) - 1) / 2) * w)
            ys.append(r)
    bars = ax.bar(xs, ys, w, label=p)
    for x, y in zip(xs, ys):
        ax.text(x, y, f"{y:.2f}", ha="center", va="bottom", fontsize=6, rotation=90)
ax.axhline(1.0, color="black", linewidth=0.8)
ax.set_yscale("log")
ax.set_xticks(range(len(figs)))
ax.set_xticklabels([f"{n}\n(/{f['base']})" for n, f in figs.items()], fontsize=7)
ax.set_ylabel("ratio (lower is better)")
ax.set_title("cowfs benchmark: ratios to native (size/time figures: to the cowfs target)")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
"""


def chart(json_path: Path, png_path: Path, pythons: list[Path], env: dict[str, str]) -> bool:
    """Render with the first interpreter that has matplotlib (the workload venvs have it)."""
    for py in pythons:
        proc = subprocess.run([str(py), "-c", CHART, str(json_path), str(png_path)], env=env,
                              capture_output=True, text=True, timeout=300)
        if proc.returncode == 0 and png_path.exists():
            return True
        log(f"chart with {py} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    # None of them has matplotlib: install it into the dev env (this interpreter) on demand.
    log("installing matplotlib into the dev env for the chart")
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        log("pip install matplotlib failed; no chart")
        return False
    proc = subprocess.run([sys.executable, "-c", CHART, str(json_path), str(png_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode == 0 and png_path.exists()


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
