"""Shared bytecode compiled after the install returns, published atomically.

A cold install spends most of its time compiling `.pyc` files (installer.wheel.bytecode). So
`cowfs install` hands the distributions that have no shared bytecode yet to a detached
process (`python -m installer.wheel.bytecode_bg`) and returns. That process compiles them on all
cores under the store's shared lock, waits for the installer to write the venv state (or
to exit), then, under the venv
lock, adds the new bytecode manifests to the venv state (only for distributions the venv
still holds, and only if nobody rewrote the state meanwhile) and reloads the mount.

Imports are correct at every moment: until the reload Python finds no shared pyc and
compiles privately (as without cowfs); after it, the shared pycs match the sources' fixed
mtimes. The job holds an exclusive flock on `.cowfs/bytecode.lock` from before the
installer returns until it is done: `wait` blocks on it (tests, benchmarks, `--wait`).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cowfs.mount.spec import VenvState
from cowfs.selfexec import python_module

if TYPE_CHECKING:
    from cowfs.store.store import Store

LOCK_NAME = "bytecode.lock"
LOG_NAME = "bytecode.log"
PARENT_WAIT = 600.0  # seconds the job waits for the installer to exit


def _lock_path(venv: Path) -> Path:
    return VenvState.state_dir(venv) / LOCK_NAME


def schedule(venv: Path, store_root: Path, python: Path, dist_ids: Sequence[str]) -> bool:
    """Start the job for dist_ids; False when it could not start (the caller compiles)."""
    try:
        fd = os.open(_lock_path(venv), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return False
    try:
        try:  # held from here, and by the job once this process has exited
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held: int | None = fd
        except BlockingIOError:
            held = None  # the previous job still runs: the new one queues behind it
        job = json.dumps({"venv": str(venv), "store": str(store_root), "python": str(python),
                          "dists": list(dist_ids), "parent": os.getpid(), "lock_fd": held,
                          "state": _stat(VenvState.path_for(venv))})
        log = os.open(VenvState.state_dir(venv) / LOG_NAME,
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            root = str(Path(__file__).resolve().parents[1])
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [root, *filter(None, [os.environ.get("PYTHONPATH")])]))
            subprocess.Popen(python_module("installer.wheel.bytecode_bg", job),
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True, env=env, pass_fds=(fd,), cwd="/")
        finally:
            os.close(log)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def wait(venv: Path, timeout: float = 600.0) -> bool:
    """Block until no bytecode job runs for venv; False on timeout."""
    path = _lock_path(venv)
    if not path.exists():
        return True
    deadline = time.monotonic() + timeout
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.02)
    finally:
        os.close(fd)


def _stat(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_ino, st.st_mtime_ns]


def _parent_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a zombie child of someone else's shell counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def run_job(job: dict[str, object]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from cowfs.mount import control, mount as mounting
    from cowfs.store import roots
    from cowfs.store.layer import ensure_layer, read_head
    from cowfs.store.store import Store
    from installer.interpreters import query_interpreter
    from installer.venv.sync import venv_lock
    from installer.wheel.bytecode import ensure_bytecode

    venv, python = Path(str(job["venv"])), Path(str(job["python"]))
    store = Store(Path(str(job["store"])))
    ids = [str(i) for i in job["dists"]]  # type: ignore[attr-defined]
    with store.lock():  # from the first pyc object until the state's root names them
        info = query_interpreter(str(python), store)
        manifests = [read_head(store, i) for i in ids]
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            compiled = dict(zip(ids, pool.map(
                lambda m: ensure_bytecode(store, m, info, python), manifests), strict=True))
        # The installer writes the state that names the distributions after starting this
        # job: wait for that (or for its end, if it failed).
        path = VenvState.path_for(venv)
        deadline = time.monotonic() + PARENT_WAIT
        while (_stat(path) == job["state"] and not _parent_gone(int(str(job["parent"])))
               and time.monotonic() < deadline):
            time.sleep(0.01)
        with venv_lock(venv):
            before = path.stat()
            state = VenvState.load(venv)
            new = [b for d, b in compiled.items()
                   if b is not None and d in state.dists and b not in state.bytecode]
            if not new:
                return
            for ident in new:
                ensure_layer(store, ident)
            state.bytecode = [*state.bytecode, *new]
            after = path.stat()
            if (before.st_ino, before.st_mtime_ns) != (after.st_ino, after.st_mtime_ns):
                print("cowfs: bytecode: the venv changed meanwhile; the next install "
                      "picks the compiled bytecode up", file=sys.stderr)
                return
            state.save()
            roots.record(store, state)
    spec = state.mount_spec()
    if mounting.mount_state(spec.mountpoint) == "live":  # unmounted: the next mount reads it
        control.request(spec.socket, "reload")
        if drop := _private_pycs_now_shared(state, store, new):
            from installer.venv.absorb import emptied_dirs

            control.request(spec.socket, "reset",
                            paths=drop + emptied_dirs(state.upper, drop))


def _private_pycs_now_shared(state: VenvState, store: Store, bytecode: list[str]) -> list[str]:
    """Pycs Python wrote into the venv's private layer while the shared ones were being
    compiled (a program run right after the install), for sources still pristine: the
    shared pyc now serves them, and they would show as private changes for good."""
    from cowfs.dirfd import short
    from cowfs.store.manifest import read_manifest

    drop = []
    for ident in bytecode:
        for fe in read_manifest(store, ident).files:
            folder, _, name = fe.path.rpartition("/__pycache__/")
            source = f"{folder}/{name.partition('.')[0]}.py" if folder else ""
            if (source and os.path.isfile(short(f"{state.upper}/{fe.path}"))
                    and not os.path.lexists(short(f"{state.upper}/{source}"))):
                drop.append(fe.path)
    return drop


def main(argv: Sequence[str]) -> int:
    job = json.loads(argv[0])
    lock_fd = job.get("lock_fd")
    if lock_fd is None:
        lock_fd = os.open(_lock_path(Path(job["venv"])), os.O_RDWR | os.O_CLOEXEC)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
    try:
        os.nice(5)  # behind whatever the user runs next
    except OSError:
        pass
    try:
        run_job(job)
    except Exception as exc:  # bytecode is an optimisation: log, never fail loudly
        print(f"cowfs: bytecode: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        os.close(lock_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
