"""Client side of mounting: start a daemon and wait until it answers, unmount, list, recover.

A mount whose daemon died answers every access with ENOTCONN ("Transport endpoint is not
connected"); `ensure_mounted` detects that, detaches the dead mount lazily and mounts again,
so the next cowfs command recovers transparently.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cowfs.errors import CowfsError
from cowfs.mount import control, mount_errors
from cowfs.mount.spec import HOOK_MODULE, HOOK_PTH, MountSpec
from cowfs.selfexec import python_module

FSTYPE = "fuse.cowfs"
READY_TIMEOUT = 30.0


@dataclass
class MountEntry:
    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_table() -> list[MountEntry]:
    entries = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) >= 5 and len(rfields) >= 2:
                entries.append(MountEntry(_unescape(fields[4]), rfields[0], _unescape(rfields[1])))
    return entries


def find_mount(mountpoint: str) -> MountEntry | None:
    mp = os.path.abspath(mountpoint)
    found = None
    for e in mount_table():
        if e.mountpoint == mp:
            found = e  # the last one is the visible (top) mount
    return found


def mount_state(mountpoint: str) -> str:
    """'none', 'live', 'stale' (daemon gone), 'gone' (its directory was deleted: the
    daemon detaches such a mount itself) or 'foreign' (someone else's mount)."""
    entry = find_mount(mountpoint)
    if entry is None:
        return "none"
    if entry.fstype != FSTYPE:
        return "foreign"
    try:
        # statfs always reaches the daemon; stat(2) may be answered from the kernel's
        # attribute cache long after the daemon died.
        os.statvfs(mountpoint)
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO):
            return "stale"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "gone"
        raise
    return "live"


def _fusermount(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise CowfsError("fusermount3 not found; install the fuse3 package")
    return subprocess.run([tool, *args], capture_output=True, text=True)


def detach_stale(mountpoint: str) -> None:
    proc = _fusermount("-u", "-z", mountpoint)
    if proc.returncode != 0 and find_mount(mountpoint) is not None:
        raise CowfsError(f"cannot detach the dead mount at {mountpoint}: "
                         f"{proc.stderr.strip()}")


def _last_log_line(log: str) -> str:
    try:
        lines = [ln for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if "ERROR" in ln or "Error" in ln or "error:" in ln]
    return (errors or lines or [""])[-1].strip()


def _log_lines(log: str, start: int) -> list[str]:
    try:
        with open(log, "rb") as f:
            f.seek(start)
            return f.read(1 << 20).decode(errors="replace").splitlines()
    except OSError:
        return []


def _take_strays(site: str, upper: str) -> None:
    """What was written into a venv's site-packages while it was not mounted (uv reuses its
    cached facts about the interpreter, so the automount hook never ran) would be hidden by
    the mount: it moves into the venv's private layer, where the mount shows it and absorb
    finds it. The hook's own files stay, and so does a name the private layer already has
    (what the venv showed last)."""
    try:
        names = os.listdir(site)
    except OSError:
        return
    for name in names:
        if name in (HOOK_MODULE, HOOK_PTH, "__pycache__"):
            continue
        target = os.path.join(upper, name)
        if os.path.lexists(target):
            continue
        with contextlib.suppress(OSError):  # another filesystem: left where it is
            os.rename(os.path.join(site, name), target)


def mount(spec: MountSpec, foreground: bool = False) -> str:
    """Mount and return only once the mount answers. Returns 'mounted' or 'already mounted'."""
    mp = spec.mountpoint
    state = mount_state(mp)
    if state == "live":
        return "already mounted"
    if state == "foreign":
        entry = find_mount(mp)
        raise CowfsError(mount_errors.busy(
            mp, f"already a mount point: {entry.fstype} from {entry.source}" if entry else
            "already a mount point"))
    if state == "stale":
        detach_stale(mp)  # the daemon died: "Transport endpoint is not connected"
    if not os.path.isdir(mp):
        raise CowfsError(f"mount point {mp} is not a directory")
    for d in spec.lowerdirs:  # before anything is created: a refused mount changes nothing
        if not os.path.isdir(d):
            raise CowfsError(f"lowerdir {d} is not a directory")
    mount_errors.preflight(mp, spec.allow_other)  # the cause and the fix, before a daemon
    for d, what in ((spec.upper, "upperdir"), (spec.work, "workdir")):
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as exc:
            raise CowfsError(f"cannot create {what} {d}: {exc.strerror}") from None
    if spec.venv is not None:
        _take_strays(mp, spec.upper)
    spec_file = spec.save()
    if foreground:
        from cowfs.fuse.daemon import run

        run(spec)
        return "unmounted"
    read_fd, write_fd = os.pipe()
    Path(spec.log).parent.mkdir(parents=True, exist_ok=True)
    # An isolated caller (the automount hook runs `python -I -m cowfs`) gets an isolated
    # daemon: PYTHONPATH must not choose the code that serves the mount.
    with open(spec.log, "ab") as logf:
        log_start = logf.tell()  # the log is appended to: read only this attempt's lines
        proc = subprocess.Popen(
            python_module("cowfs.fuse.daemon", str(spec_file), str(write_fd)),
            pass_fds=[write_fd], stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
            start_new_session=True, cwd="/")
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], READY_TIMEOUT)
        answer = os.read(read_fd, 64) if ready else b""
    finally:
        os.close(read_fd)
    if answer.startswith(b"ready"):
        os.stat(mp)  # the first request round-trips through the daemon
        return "mounted"
    if proc.poll() is None:
        proc.kill()
    if explained := mount_errors.explain(_log_lines(spec.log, log_start), mp):
        raise CowfsError(f"{explained} (log: {spec.log})")
    detail = _last_log_line(spec.log)
    raise CowfsError(f"mounting {mp} failed: {detail or 'daemon exited'} (log: {spec.log})")


def umount(mountpoint: str, lazy: bool = False, timeout: float = 10.0) -> None:
    mp = os.path.abspath(mountpoint)
    state = mount_state(mp)
    if state == "none":
        raise CowfsError(f"{mp} is not mounted")
    if state == "foreign":
        raise CowfsError(f"{mp} is not a cowfs mount")
    spec = MountSpec.for_mountpoint(mp)
    pid = None
    if state == "live" and spec is not None:
        status = control.try_request(spec.socket, "status")
        pid = status.get("pid") if status else None
    proc = _fusermount("-u", *(["-z"] if lazy or state == "stale" else []), mp)
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        if "busy" in msg.lower():
            raise CowfsError(f"{mp} is busy (files are open or a process has its cwd there); "
                             "close them or use --lazy")
        raise CowfsError(f"unmounting {mp} failed: {msg}")
    deadline = time.monotonic() + timeout
    while pid and _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if spec is not None:
        spec.registry_file.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def list_mounts() -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for e in mount_table():
        if e.fstype != FSTYPE:
            continue
        spec = MountSpec.for_mountpoint(e.mountpoint)
        state = mount_state(e.mountpoint)
        row: dict[str, object] = {"mountpoint": e.mountpoint, "state": state}
        if spec is not None:
            row.update(upper=spec.upper, venv=spec.venv, lowerdirs=spec.lowerdirs, log=spec.log)
            status = control.try_request(spec.socket, "status") if state == "live" else None
            if status:
                row.update(pid=status["pid"], nodes=status["nodes"],
                           open_files=status["open_files"], max_rss_kb=status["max_rss_kb"],
                           kernel_cache=status.get("kernel_cache", False),
                           opens=status.get("opens"), opens_why=status.get("opens_why", ""),
                           backing_ids=status.get("backing_ids", 0))
        out.append(row)
    return out
