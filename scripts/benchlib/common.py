"""Shared helpers: the run context, subprocess timing, cleanup of everything mounted, /proc."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_IMPORTS = "numpy,pandas,scipy.stats,matplotlib.pyplot,django.db.models,flask,requests,sympy"
CMD_TIMEOUT = 900.0


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# -- cleanup ---------------------------------------------------------------------------------


class Cleanup:
    """LIFO registry of undo actions; runs once, on normal exit, failure, Ctrl-C or SIGTERM."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], None]]] = []
        self._done = False
        atexit.register(self.run)

    def add(self, what: str, fn: Callable[[], None]) -> Callable[[], None]:
        self._actions.append((what, fn))
        return fn

    def discard(self, fn: Callable[[], None]) -> None:
        self._actions = [(w, f) for w, f in self._actions if f is not fn]

    def run(self) -> None:
        if self._done:
            return
        self._done = True
        while self._actions:
            what, fn = self._actions.pop()
            try:
                fn()
            except BaseException as exc:  # keep going: every mount must be undone
                log(f"cleanup of {what} failed: {exc}")


def install_signal_handlers() -> None:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


# -- mounts ----------------------------------------------------------------------------------


def mounted(path: Path | str) -> bool:
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4].replace("\\040", " ") == target:
                return True
    return False


def force_umount(path: Path | str, fuse: bool) -> None:
    """Unmount whatever is at path; lazily when busy. Quiet when nothing is mounted."""
    deadline = time.monotonic() + 10
    while mounted(path) and time.monotonic() < deadline:
        cmd = ["fusermount3", "-u", str(path)] if fuse else ["umount", str(path)]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            lazy = ["fusermount3", "-u", "-z", str(path)] if fuse else ["umount", "-l", str(path)]
            subprocess.run(lazy, capture_output=True)
        time.sleep(0.05)


def wait_mounted(path: Path | str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not mounted(path):
        if time.monotonic() > deadline:
            raise BenchError(f"{path} did not become a mount point")
        time.sleep(0.002)
    os.stat(path)


# -- the run context -------------------------------------------------------------------------


@dataclass
class Ctx:
    work: Path
    wheels: Path
    workload: Path
    python: str  # the base interpreter every venv is made from
    uv: str
    cowfs: list[str]
    imports: str
    reps: int
    fresh: int
    cold_reps: int
    cleanup: Cleanup
    env: dict[str, str] = field(default_factory=dict)
    counter: int = 0

    def new_dir(self, prefix: str) -> Path:
        self.counter += 1
        d = self.work / f"{prefix}-{self.counter}"
        d.mkdir(parents=True)
        return d

    @property
    def cowfs_python(self) -> str:
        """The interpreter cowfs (and its mount daemons) run on."""
        return sys.executable

    @property
    def import_cmd(self) -> str:
        mods = [m.strip() for m in self.imports.split(",") if m.strip()]
        return "import " + ", ".join(mods)


def child_env(work: Path, runtime: Path) -> dict[str, str]:
    """One environment for every measured process: no bytecode suppression, no user site."""
    env = dict(os.environ)
    for var in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV",
                "PYTHONSTARTUP", "PYTHONPYCACHEPREFIX", "PIP_REQUIRE_VIRTUALENV"):
        env.pop(var, None)
    env.update({
        "PYTHONNOUSERSITE": "1",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": str(work / "mplconfig"),
        "COWFS_HOME": str(work / "store"),
        "COWFS_RUNTIME_DIR": str(runtime),
        "UV_CACHE_DIR": str(work / "uv-cache"),
        "UV_NO_PROGRESS": "1",
        "UV_PYTHON_DOWNLOADS": "never",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    return env


def run(ctx: Ctx, cmd: Sequence[str | Path], *, check: bool = True,
        cwd: Path | None = None, timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], env=ctx.env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-15:]
        raise BenchError(f"`{' '.join(map(str, cmd))}` failed ({proc.returncode}):\n"
                         + "\n".join(tail))
    return proc


def timed(ctx: Ctx, cmd: Sequence[str | Path], *, cwd: Path | None = None) -> float:
    """Wall time of the whole process (output discarded; a failure is an error)."""
    start = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], env=ctx.env, cwd=cwd, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=CMD_TIMEOUT)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-15:]
        raise BenchError(f"`{' '.join(map(str, cmd))}` failed ({proc.returncode}):\n"
                         + "\n".join(tail))
    return elapsed


# -- disk, memory, caches --------------------------------------------------------------------


def du_added(paths: Sequence[Path], shared: Sequence[Path] = ()) -> int:
    """Allocated bytes of `paths` not shared (hard-linked) with `shared`; one filesystem only."""
    args = [str(p) for p in (*shared, *paths) if p.exists()]
    proc = subprocess.run(["du", "-x", "-s", "-B1", *args], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    mine = lines[len([p for p in shared if p.exists()]):]
    return sum(int(ln.split()[0]) for ln in mine)


def drop_caches() -> bool:
    """sync + drop the page, dentry and inode caches (root only). False when not possible."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS in kB."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


def fd_count(pid: int) -> int | None:
    """Open file descriptors of a process (its /proc/PID/fd entries), None if unreadable."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rmtree(path: Path) -> None:
    """Remove a tree, refusing to descend into anything still mounted."""
    with open("/proc/self/mountinfo") as f:
        inside = [ln.split()[4] for ln in f if ln.split()[4].startswith(str(path) + "/")]
    if inside:
        raise BenchError(f"not removing {path}: still mounted below it: {inside[:3]}")
    shutil.rmtree(path, ignore_errors=True)
