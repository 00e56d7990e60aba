"""The two-projects scenario on the real pycowsay wheel, printed step by step.

Projects A and B each get a cowfs venv with pycowsay==0.0.0.2. A edits the installed
pycowsay/main.py (the cow's udder `w` becomes `ww`). A sees its edit; B, the shared store
object and a new project C stay pristine. With uv's hard-link mode the same edit leaks into
every project and the cache (shown when uv is available). Exit status 0 only if all holds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wheelcache import ensure_wheels

PKG = "pycowsay==0.0.0.2"
COWFS = [sys.executable, "-m", "cowfs"]
UDDER, EDITED = "||----w |", "||----ww|"


def run(cmd: list[str], **kw: object) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise SystemExit(f"demo: `{' '.join(map(str, cmd))}` failed:\n{proc.stderr.strip()}")
    return proc.stdout


def cow_line(venv: Path, text: str) -> str:
    out = run([str(venv / "bin" / "pycowsay"), text])
    return next(ln.strip() for ln in out.splitlines() if "||--" in ln)


def step(msg: str) -> None:
    print(f"\n== {msg}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the workspace (mounted)")
    args = parser.parse_args()
    wheels = ensure_wheels([PKG])
    work = Path(tempfile.mkdtemp(prefix="cowfs-demo-"))
    os.environ["COWFS_HOME"] = str(work / "store")
    venvs = {name: work / f"project-{name}" / ".venv" for name in "ABC"}
    ok = True
    try:
        step("two projects, one shared store")
        for name in "AB":
            run([*COWFS, "venv", str(venvs[name])])
            out = run([*COWFS, "install", "--venv", str(venvs[name]), PKG, "--no-index",
                       "--find-links", str(wheels)])
            print(f"project {name}: {out.strip().splitlines()[-1]}")
        site = {n: next(v.glob("lib/python*/site-packages")) for n, v in venvs.items()
                if v.exists()}
        main_a = site["A"] / "pycowsay" / "main.py"
        obj = _store_object_of(main_a, work / "store")
        print(f"A and B read pycowsay/main.py from one store object: {obj.relative_to(work)}")

        step("edit the installed pycowsay/main.py in project A (w -> ww)")
        main_a.write_text(main_a.read_text().replace(UDDER, EDITED))
        a, b = cow_line(venvs["A"], "A"), cow_line(venvs["B"], "B")
        print(f"A's cow: {a}\nB's cow: {b}")
        pristine_store = UDDER in obj.read_text()
        print(f"store object still pristine: {pristine_store}")
        ok &= EDITED in a and UDDER in b and pristine_store

        step("a new project C installs from the same store")
        run([*COWFS, "venv", str(venvs["C"])])
        run([*COWFS, "install", "--venv", str(venvs["C"]), PKG, "--no-index", "--find-links",
             str(wheels)])
        c = cow_line(venvs["C"], "C")
        print(f"C's cow: {c}")
        ok &= UDDER in c
        upper = venvs["A"] / ".cowfs" / "upper"
        private = [str(p.relative_to(upper)) for p in upper.rglob("*") if p.is_file()]
        print(f"A's private changes (its upper layer): {private}")

        if shutil.which("uv"):
            step("for contrast: uv --link-mode hardlink, same edit")
            _uv_contrast(work, wheels)
    finally:
        if not args.keep:
            for v in venvs.values():
                if v.exists():
                    subprocess.run([*COWFS, "umount", str(v)], capture_output=True)
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nresult: {'OK - the edit stayed in project A' if ok else 'FAILED'}")
    return 0 if ok else 1


def _store_object_of(path: Path, store: Path) -> Path:
    from cowfs.store.store import digest_bytes

    digest = digest_bytes(path.read_bytes())
    return store / "objects" / digest[:2] / digest[2:]


def _uv_contrast(work: Path, wheels: Path) -> None:
    cache = work / "uv-cache"
    envs = [work / "uv-A", work / "uv-B"]
    for env in envs:
        run(["uv", "venv", "-q", str(env)])
        run(["uv", "pip", "install", "-q", "--python", str(env / "bin" / "python"),
             "--link-mode", "hardlink", "--cache-dir", str(cache), "--no-index",
             "--find-links", str(wheels), PKG])
    target = next(envs[0].glob("lib/python*/site-packages")) / "pycowsay" / "main.py"
    target.write_text(target.read_text().replace(UDDER, EDITED))
    print(f"uv-A's cow: {cow_line(envs[0], 'A')}")
    print(f"uv-B's cow: {cow_line(envs[1], 'B')}   <- the edit leaked through the hard link")
    print(f"link count of main.py: {target.stat().st_nlink}")


if __name__ == "__main__":
    sys.exit(main())
