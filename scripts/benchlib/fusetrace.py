"""FUSE requests as the kernel sees them, for any FUSE filesystem (cowfs and fuse-overlayfs).

Uses the kernel's fuse:fuse_request_send / fuse:fuse_request_end tracepoints in a private
tracefs instance (its own ring buffer, so nobody else's tracing is disturbed), filtered on
the FUSE connection of the mount points measured. For each opcode: the number of requests
and the mean round trip (send -> reply, i.e. what the calling process waits for: queueing,
the daemon's wake-up, its processing and the reply). Root only; tracefs is mounted (and
unmounted afterwards) when it is not mounted yet.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TRACEFS = Path("/sys/kernel/tracing")
# Sent in the background: the caller does not wait for these (close() returns at once).
ASYNC_OPS = {"release", "releasedir", "forget", "batch_forget", "interrupt"}
LINE = re.compile(r"\s(\d+\.\d+): fuse_request_(send|end): connection (\d+) req (\d+)"
                  r"(?: opcode \d+ \((\w+)\))?")


def connection_of(path: Path | str) -> int:
    """The FUSE connection id (the kernel dev_t of the superblock; FUSE's major is 0)."""
    return os.minor(os.stat(path).st_dev)


class FuseTrace:
    def __init__(self, name: str = "cowfs-bench") -> None:
        self.name = f"{name}-{os.getpid()}"
        self.mounted_tracefs = False
        self.inst: Path | None = None

    def available(self) -> str | None:
        if os.geteuid() != 0:
            return "needs root"
        if not (TRACEFS / "events").is_dir():
            proc = subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                return f"cannot mount tracefs: {proc.stderr.strip()}"
            self.mounted_tracefs = True
        if not (TRACEFS / "events" / "fuse" / "fuse_request_send").is_dir():
            return "this kernel has no fuse request tracepoints"
        return None

    def open(self) -> None:
        self.inst = TRACEFS / "instances" / self.name
        self.inst.mkdir(exist_ok=True)
        (self.inst / "buffer_size_kb").write_text("65536\n")

    def close(self) -> None:
        if self.inst is not None and self.inst.exists():
            with contextlib.suppress(OSError):
                (self.inst / "tracing_on").write_text("0\n")
                self.inst.rmdir()
        self.inst = None
        if self.mounted_tracefs:
            subprocess.run(["umount", str(TRACEFS)], capture_output=True)
            self.mounted_tracefs = False

    @contextlib.contextmanager
    def record(self, mountpoints: list[Path]) -> Iterator[dict[str, Any]]:
        """Trace requests to these mounts while the block runs; fills the yielded dict."""
        assert self.inst is not None
        conns = sorted({connection_of(m) for m in mountpoints})
        flt = " || ".join(f"connection == {c}" for c in conns)
        events = self.inst / "events" / "fuse"
        for ev in ("fuse_request_send", "fuse_request_end"):
            (events / ev / "filter").write_text(flt + "\n")
            (events / ev / "enable").write_text("1\n")
        (self.inst / "trace").write_text("")  # clear
        (self.inst / "tracing_on").write_text("1\n")
        out: dict[str, Any] = {}
        try:
            yield out
        finally:
            (self.inst / "tracing_on").write_text("0\n")
            for ev in ("fuse_request_send", "fuse_request_end"):
                (events / ev / "enable").write_text("0\n")
            out.update(parse((self.inst / "trace").read_text()))


def parse(text: str) -> dict[str, Any]:
    sent: dict[tuple[str, str], tuple[float, str]] = {}
    count: dict[str, int] = defaultdict(int)
    total: dict[str, float] = defaultdict(float)
    lost = 0
    for line in text.splitlines():
        if "LOST" in line:
            lost += 1
        m = LINE.search(line)
        if not m:
            continue
        ts, kind, conn, req, op = m.groups()
        if kind == "send":
            sent[(conn, req)] = (float(ts), (op or "?").removeprefix("FUSE_").lower())
        else:
            start = sent.pop((conn, req), None)
            if start is not None:
                count[start[1]] += 1
                total[start[1]] += float(ts) - start[0]
    n = sum(count.values())
    by_op = {op: {"n": count[op], "us": round(total[op] * 1e6 / count[op], 1)}
             for op in sorted(count, key=lambda o: -count[o])}
    sync_n = sum(v for k, v in count.items() if k not in ASYNC_OPS)
    sync_t = sum(v for k, v in total.items() if k not in ASYNC_OPS)
    return {"requests": n, "unanswered": len(sent), "lost_events": lost,
            "round_trip_us": round(sum(total.values()) * 1e6 / n, 1) if n else 0.0,
            "sync_requests": sync_n,
            "sync_round_trip_us": round(sync_t * 1e6 / sync_n, 1) if sync_n else 0.0,
            # what the caller waited for in total (release & co. excluded: asynchronous)
            "waited_s": round(sync_t, 4), "by_op": by_op}
