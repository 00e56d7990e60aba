"""A venv deleted under its mount: get out of the way instead of leaving a dangling mount.

`rm -rf .venv`, `python -m venv --clear`, `uv venv --clear` and uv recreating a venv all
delete the venv's entries one by one. The kernel refuses to remove a directory that is a
mount point, so a site-packages mount would make every one of them fail and leave the user
stuck. The daemon therefore watches its venv through a directory handle taken before it
mounted: once `pyvenv.cfg` or the cowfs state is gone, the venv is being deleted. It then
removes the automount hook from the real site-packages underneath, detaches the mount
(lazily: a deleter already inside keeps its handles), drops the venv's gc root, and answers
the deleter's remaining unlinks inside the detached tree without doing anything: that
view is being thrown away. The deleter's final rmdir of site-packages then meets an
ordinary empty directory. The check runs on every unlink/rmdir (two fstatat calls). A
watcher (inotify on the venv and its state directory) covers deleters that unlink
nothing inside the mount (an empty site-packages, or one they went through before the rest
of the venv): once the deletion has gone quiet it detaches, so a retry succeeds.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
from pathlib import Path

from cowfs.errors import CowfsError
from cowfs.mount.spec import HOOK_MODULE, HOOK_PTH, STATE_DIR, MountSpec, VenvState
from cowfs.store import roots
from cowfs.store.store import Store

log = logging.getLogger("cowfs.fuse.teardown")

MNT_DETACH = 2
POLL_S = 5.0  # a fallback only: inotify wakes the watcher at once
QUIET_S = 0.2  # no deletion in the venv for this long: the deleter is done or inside
_IN_DELETE, _IN_MOVED_FROM, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x200, 0x40, 0x400, 0x800
_IN_NONBLOCK, _IN_CLOEXEC = 0o4000, 0o2000000
_MARKS = ("pyvenv.cfg", f"{STATE_DIR}/state.json")


class VenvTeardown:
    def __init__(self, spec: MountSpec, state: VenvState) -> None:
        assert spec.venv is not None
        self.mountpoint = spec.mountpoint
        self.registry = spec.registry_file
        self.store, self.state = Store(state.store), state
        flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
        self.venv_fd = os.open(spec.venv, flags)
        self.under_fd = os.open(spec.mountpoint, flags)  # before the mount covers it

    @classmethod
    def for_spec(cls, spec: MountSpec) -> VenvTeardown | None:
        if spec.venv is None:
            return None
        try:
            return cls(spec, VenvState.load(Path(spec.venv)))
        except (CowfsError, OSError) as exc:
            log.warning("not watching the venv for deletion: %s", exc)
            return None

    def venv_deleted(self) -> bool:
        for name in _MARKS:
            try:
                os.stat(name, dir_fd=self.venv_fd, follow_symlinks=False)
            except FileNotFoundError:
                return True
            except OSError:
                pass  # unreadable is not deleted
        return False

    def get_out(self) -> None:
        """Called once, when venv_deleted() first says so (may block: run in a thread)."""
        log.info("venv %s is being deleted: detaching %s", self.state.venv, self.mountpoint)
        for name in (HOOK_PTH, HOOK_MODULE):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self.under_fd)
        roots.remove(self.store, self.state)
        self.registry.unlink(missing_ok=True)
        detach(self.mountpoint)


def watch(paths: list[str]) -> int | None:
    """An inotify fd reporting deletions and moves in (and of) these directories."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        return None
    mask = _IN_DELETE | _IN_MOVED_FROM | _IN_DELETE_SELF | _IN_MOVE_SELF
    if not any([libc.inotify_add_watch(fd, os.fsencode(p), mask) >= 0 for p in paths]):
        os.close(fd)
        return None
    return fd


def drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 65536):
            pass


def detach(mountpoint: str) -> None:
    """Lazy unmount: the mount leaves the namespace now; users inside keep their handles."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.umount2(os.fsencode(mountpoint), MNT_DETACH) == 0:
        return
    err = ctypes.get_errno()
    if err == 1:  # EPERM: an unprivileged daemon unmounts through the setuid helper
        import shutil
        import subprocess

        tool = shutil.which("fusermount3") or shutil.which("fusermount")
        if tool is not None and subprocess.run([tool, "-u", "-z", mountpoint],
                                               capture_output=True).returncode == 0:
            return
    log.warning("detaching %s failed: %s", mountpoint, os.strerror(err))
