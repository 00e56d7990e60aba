"""The mount daemon: one process per mount, pyfuse3 + trio, plus its control socket.

Started by cowfs.mount.mount as `python -m cowfs.fuse.daemon SPEC_FILE READY_FD`; writes "ready" to
READY_FD once the kernel mount exists and the request loop runs, so `cowfs mount` returns
only when the mount answers. Logs to the file named in the spec.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

from cowfs.fuse import fuse_shim

fuse_shim.preload()  # before pyfuse3 binds libfuse: lets the kernel cache opens, listings

import pyfuse3
import trio

from cowfs.errors import CowfsError
from cowfs.fuse import teardown
from cowfs.fuse.ops import CowfsOperations
from cowfs.fuse.teardown import VenvTeardown
from cowfs.mount.spec import MountSpec, VenvState
from cowfs.overlay.super import Invalidation, build_lower, build_overlay, swap_lower
from cowfs.overlay.upper import foreign_dist_infos
from cowfs.selfexec import python_module
from cowfs.store import roots
from cowfs.store.store import Store

log = logging.getLogger("cowfs.fuse.daemon")
ABSORB_QUIET_S = 1.0  # absorb once nothing was written through the mount for this long
ABSORB_LATER, ABSORB_RETRIES = 75, 60  # `cowfs adopt`: some dist unfinished (EX_TEMPFAIL)


class Daemon:
    def __init__(self, spec: MountSpec) -> None:
        self.spec = spec
        lower, self.lease = build_lower(spec)  # held while the daemon runs (cowfs.store.lease)
        self.ov = build_overlay(spec, lower)
        self.ops = CowfsOperations(self.ov)
        # Auto passthrough: worth it where other mounts read the same store files.
        self.ops.pt.sharing = lambda: self.lease is not None and self.lease.shared()
        self.ops.teardown = VenvTeardown.for_spec(spec)  # before the mount hides the hook
        self._dists_changed = trio.Event()
        if spec.venv is not None:
            self.ops.on_dist_change = self._dists_changed.set
            from cowfs.store.remote.lazy import LazyObjects, prefetch_parallel

            self.ops.lazy = LazyObjects(Store(VenvState.load(Path(spec.venv)).store),
                                        prefetch_parallel())

    def last_used(self) -> None:
        """The retention clock of the venv's gc root runs from the end of its last mount."""
        if self.spec.venv is not None:
            with contextlib.suppress(CowfsError, OSError):
                state = VenvState.load(Path(self.spec.venv))
                roots.touch(Store(state.store), state)

    # -- kernel cache invalidation --------------------------------------------------------

    async def invalidate(self, inv: Invalidation) -> None:
        for ino in inv.inodes:  # before any await: no read may use the old layer's file
            node = self.ov.table.by_ino.get(ino)
            if node is not None:
                self.ov.drop_implicit(node)
        for parent, name in inv.entries:
            pyfuse3.invalidate_entry_async(parent, os.fsencode(name), ignore_enoent=True)
        for ino in inv.inodes:
            try:
                # May block on the kernel: never on the event loop that serves requests.
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("invalidate inode %d: %s", ino, exc)

    # -- control requests ----------------------------------------------------------------

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "status":
            usage = resource.getrusage(resource.RUSAGE_SELF)
            opens, why = self.ops.opens_mode()
            return {"ok": True, "pid": os.getpid(), "mountpoint": self.spec.mountpoint,
                    "upper": self.spec.upper, "venv": self.spec.venv,
                    "lowerdirs": self.spec.lowerdirs, "nodes": len(self.ov.table.by_ino),
                    "open_files": len(self.ov.handles), "max_rss_kb": usage.ru_maxrss,
                    "kernel_cache": self.ops.by_inode,
                    "served": {**self.ops.served, "ioctls_in_c": fuse_shim.reader_state()[1]},
                    "opens": opens, "opens_why": why, **self.ops.pt.status(),
                    **self.ops.lookups.status()}
        if op == "reload":
            await self.ops.settle()
            # In a thread: taking the lease waits for a running gc to finish.
            lower, lease = await trio.to_thread.run_sync(build_lower, self.spec)
            # The C reader must answer nothing from the old layer once it is swapped.
            self.ops.forget_caches()
            self.ops.pt.drop_unused()
            inv = swap_lower(self.ov, lower)
            if self.lease is not None:
                self.lease.release()  # only now: the old layer was served until the swap
            self.lease = lease
            await self.invalidate(inv)
            log.info("reloaded lower: %d inodes, %d entries invalidated", len(inv.inodes),
                     len(inv.entries))
            return {"ok": True, "invalidated": len(inv.inodes) + len(inv.entries)}
        if op == "reset":
            from cowfs.overlay.reset import reset_paths  # only needed by this request

            await self.ops.settle()
            self.ops.forget_caches()  # (the C reader's entries stop before anything changes)
            inv, removed = reset_paths(self.ov, list(req.get("paths", [])), req.get("expect"))
            self.ops.forget_caches()
            await self.invalidate(inv)
            log.info("reset %d paths", len(removed))
            return {"ok": True, "removed": removed}
        if op == "invalidate":
            # After `store verify --repair`: the kernel may still cache a corrupt object's
            # pages under the unchanged lower entry; drop them for every node it backs.
            wanted = {str(d) for d in req.get("objects", [])}
            inv = Invalidation(inodes=[
                n.ino for n in self.ov.table.by_ino.values()
                if n.lower is not None and n.lower.source is not None
                and "".join(n.lower.source.rsplit("/", 2)[-2:]) in wanted])
            self.ops.forget_caches()
            self.ops.pt.drop_unused()  # (passthrough opens must not reach the old file)
            await self.invalidate(inv)
            return {"ok": True, "invalidated": len(inv.inodes)}
        if op == "unmount":
            log.info("unmount requested")
            pyfuse3.terminate()
            return {"ok": True}
        return {"ok": False, "error": f"unknown request {op!r}"}

    async def serve_client(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while not data.endswith(b"\n"):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            try:
                reply = await self.handle(json.loads(data))
            except (CowfsError, OSError, ValueError) as exc:
                reply = {"ok": False, "error": str(exc)}
            except Exception as exc:
                log.exception("control request failed")
                reply = {"ok": False, "error": f"internal error: {exc}"}
            await stream.send_all(json.dumps(reply).encode() + b"\n")

    async def serve_control(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        path = self.spec.socket
        path.unlink(missing_ok=True)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # owner-only from the first moment, not after a chmod
        try:
            await sock.bind(str(path))
        finally:
            os.umask(old_umask)
        sock.listen(16)
        task_status.started()
        await trio.serve_listeners(self.serve_client, [trio.SocketListener(sock)])

    async def main(self, ready_fd: int | None) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.serve_control)
            nursery.start_soon(self._signals)
            if self.ops.lazy is not None:
                self.ops.lazy.nursery = nursery  # background prefetches of lazy installs
            if self.ops.teardown is not None:
                nursery.start_soon(self._watch_venv)
            if self.spec.venv is not None:
                nursery.start_soon(self._absorb_foreign)
            if ready_fd is not None:
                os.write(ready_fd, b"ready\n")
                os.close(ready_fd)
            log.info("serving %s", self.spec.mountpoint)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    async def _watch_venv(self) -> None:
        """A venv deleted without its deleter unlinking anything inside the mount (an
        empty site-packages, or one it went through before the rest of the venv) must
        not leave the mount behind either. Detaching while a deleter is between its stat
        and open of site-packages would fail it, so the watcher first waits for the
        deletion to go quiet; a deleter inside the mount detaches it at a safe point."""
        venv = Path(self.spec.venv or "")
        fd = teardown.watch([str(venv), str(VenvState.state_dir(venv))])
        try:
            while not await self.ops.venv_deleted(get_out=False):
                with trio.move_on_after(teardown.POLL_S):
                    if fd is None:
                        await trio.sleep_forever()
                    await trio.lowlevel.wait_readable(fd)
                    teardown.drain(fd)
            while fd is not None:
                with trio.move_on_after(teardown.QUIET_S):
                    await trio.lowlevel.wait_readable(fd)
                    teardown.drain(fd)
                    continue
                break
            await self.ops.venv_deleted()
        finally:
            if fd is not None:
                os.close(fd)

    async def _absorb_foreign(self) -> None:
        """Once another installer (pip, uv) has finished or removed distributions and gone
        quiet, `cowfs adopt VENV` makes them store-backed (installer.venv.absorb); it calls back
        here for reload and reset. Its failure is logged: the venv works unabsorbed."""
        retries = 0
        if foreign_dist_infos(self.ov.upper.xpath("")):
            self._dists_changed.set()  # written while unmounted (cowfs.mount.mount._take_strays)
        while True:
            await self._dists_changed.wait()
            self._dists_changed = trio.Event()  # what changes from now on: another round
            self.ops.on_dist_change = self._dists_changed.set
            # Quiet: nothing written through the mount for ABSORB_QUIET_S (an uninstall
            # deletes RECORD first, then thousands of files; a reinstall writes them again).
            while (idle := time.monotonic() - self.ops.last_change) < ABSORB_QUIET_S:
                await trio.sleep(ABSORB_QUIET_S - idle)
            if self.ops.teardown is not None and await self.ops.venv_deleted(get_out=False):
                return
            proc = await trio.run_process(
                python_module("cowfs", "adopt", str(self.spec.venv)),
                capture_stdout=True, capture_stderr=True, check=False,
                env={**os.environ, "COWFS_NO_AUTOMOUNT": "1"})
            out = (proc.stdout + proc.stderr).decode(errors="replace").strip()
            lines = out.splitlines() or [""]
            # A traceback's cause is its last line; a report's gist is its first.
            said = lines[0] if lines[-1] == lines[0] else f"{lines[0]} ... {lines[-1]}"
            log.log(logging.WARNING if proc.returncode not in (0, ABSORB_LATER) else logging.INFO,
                    "absorb (exit %d): %s", proc.returncode, said)
            if proc.returncode == ABSORB_LATER and retries < ABSORB_RETRIES:
                retries += 1  # some distribution is still being written or removed:
                await trio.sleep(ABSORB_QUIET_S)  # again once it had time to go on
                self._dists_changed.set()
            else:
                retries = 0

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d: unmounting", signum)
                pyfuse3.terminate()
                return


def run(spec: MountSpec, ready_fd: int | None = None) -> None:
    logging.basicConfig(
        filename=None if ready_fd is None else spec.log, level=logging.INFO,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    os.umask(0)  # modes arrive from the kernel with the caller's umask already applied
    # Every file the kernel holds open through the mount may cost the daemon an fd.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    daemon = Daemon(spec)
    options = set(pyfuse3.default_options) | {"fsname=cowfs", "subtype=cowfs"}
    if spec.allow_other:
        options.add("allow_other")
    pyfuse3.init(daemon.ops, spec.mountpoint, options)
    log.info("mounted %s (upper %s)%s", spec.mountpoint, spec.upper,
             "; ioctls answered in C" if fuse_shim.reader_state()[0] else "")
    try:
        trio.run(daemon.main, ready_fd)
    except BaseException:
        log.exception("daemon failed")
        raise
    finally:
        pyfuse3.close(unmount=True)
        spec.socket.unlink(missing_ok=True)
        daemon.last_used()
        if answered := fuse_shim.reader_state()[1]:
            log.info("%d ioctls answered in C", answered)
        log.info("unmounted %s", spec.mountpoint)


def main(argv: list[str]) -> int:
    spec = MountSpec.load(Path(argv[0]))
    ready_fd = int(argv[1]) if len(argv) > 1 else None
    try:
        run(spec, ready_fd)
    except CowfsError as exc:
        print(f"cowfs daemon: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
