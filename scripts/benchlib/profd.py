"""An instrumented cowfs mount daemon: counts FUSE requests per handler and times them.

Run exactly like `python -m cowfs.fuse.daemon SPEC_FILE READY_FD` (see benchlib.profile, which
starts it in place of the normal daemon). It is the real daemon (cowfs.fuse.daemon.run) with two
changes: the operations object is a subclass of cowfs.fuse.ops.CowfsOperations whose every handler
is wrapped with a counter and a perf_counter_ns timer, and the control socket understands
three more requests:

    profile         {"counts": {handler: n}, "ns": {handler: total ns}, "errors": {...},
                     "negative_lookups": n, "negative_samples": [...]}
    profile-reset   zero everything
    cprofile-start / cprofile-stop   cProfile around the event loop thread; stop returns the
                     top functions by internal time as text
"""

from __future__ import annotations

import cProfile
import functools
import io
import os
import pstats
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from cowfs.fuse import fuse_shim

fuse_shim.preload()  # as the real daemon does: before pyfuse3 binds libfuse

import pyfuse3

import cowfs.fuse.daemon as cowfs_daemon
from cowfs.fuse.ops import CowfsOperations
from cowfs.mount.spec import MountSpec

HANDLERS = ("lookup", "forget", "getattr", "setattr", "readlink", "statfs", "opendir",
            "readdir", "releasedir", "fsyncdir", "mkdir", "mknod", "symlink", "link", "unlink",
            "rmdir", "rename", "open", "create", "read", "write", "flush", "release", "fsync",
            "getxattr", "listxattr", "setxattr", "removexattr", "access")


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.counts: Counter[str] = Counter()
        self.ns: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.negative = 0
        self.negative_samples: Counter[str] = Counter()
        self.read_bytes = 0

    def to_json(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "ns": dict(self.ns), "errors": dict(self.errors),
                "negative_lookups": self.negative, "read_bytes": self.read_bytes,
                "negative_samples": self.negative_samples.most_common(15)}


STATS = Stats()


def _wrap(name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter_ns()
        try:
            result = await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError as exc:
            STATS.errors[f"{name}:{exc.errno}"] += 1
            raise
        finally:
            STATS.counts[name] += 1
            STATS.ns[name] += time.perf_counter_ns() - t0
        if name == "lookup" and getattr(result, "st_ino", 1) == 0:
            STATS.negative += 1
            raw = args[1] if len(args) > 1 else b"?"
            STATS.negative_samples[_shape(raw)] += 1
        elif name == "read" and isinstance(result, bytes | bytearray | memoryview):
            STATS.read_bytes += len(result)
        return result

    return counted


def _shape(raw: bytes) -> str:
    """Group negative lookups by what the importer was probing for."""
    name = raw.decode("utf-8", "replace")
    for suffix in (".cpython-311-x86_64-linux-gnu.so", ".abi3.so", ".so", ".pyc", ".py",
                   ".pth", ".pyw"):
        if name.endswith(suffix):
            return f"*{suffix}"
    return name if len(name) < 40 else name[:37] + "..."


CountingOperations = type("CountingOperations", (CowfsOperations,), {
    name: _wrap(name, getattr(CowfsOperations, name))
    for name in HANDLERS if name in CowfsOperations.__dict__
})


class ProfilingDaemon(cowfs_daemon.Daemon):
    def __init__(self, spec: MountSpec) -> None:
        super().__init__(spec)
        self.ops = CountingOperations(self.ov)
        self.cprof: cProfile.Profile | None = None

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "profile":
            return {"ok": True, **STATS.to_json()}
        if op == "profile-reset":
            STATS.reset()
            return {"ok": True}
        if op == "cprofile-start":
            self.cprof = cProfile.Profile()
            self.cprof.enable()
            return {"ok": True}
        if op == "cprofile-stop":
            if self.cprof is None:
                return {"ok": False, "error": "not profiling"}
            self.cprof.disable()
            out = io.StringIO()
            st = pstats.Stats(self.cprof, stream=out)
            st.sort_stats("tottime").print_stats(int(req.get("top", 25)))
            self.cprof = None
            return {"ok": True, "text": out.getvalue()}
        return await super().handle(req)


def _patch_main_loop() -> None:
    """Experiment knob: COWFS_PROF_TASKS=MIN,MAX passes min_tasks/max_tasks to pyfuse3.main
    (pyfuse3's default 1,99 starts and retires worker tasks as requests come and go)."""
    knob = os.environ.get("COWFS_PROF_TASKS")
    if not knob:
        return
    lo, hi = (int(x) for x in knob.split(","))
    original = pyfuse3.main

    async def main(min_tasks: int = lo, max_tasks: int = hi) -> None:
        await original(min_tasks=lo, max_tasks=hi)

    pyfuse3.main = main  # cowfs.fuse.daemon calls pyfuse3.main() through the module


def main(argv: list[str]) -> int:
    spec = MountSpec.load(Path(argv[0]))
    _patch_main_loop()
    cowfs_daemon.Daemon = ProfilingDaemon  # type: ignore[misc]  # run() builds this class
    cowfs_daemon.run(spec, int(argv[1]) if len(argv) > 1 else None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
