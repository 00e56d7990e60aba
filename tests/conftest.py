"""Shared fixtures: isolated store/runtime dirs, real FUSE mounts that always unmount, the
cached real wheels and cowfs venvs made through the CLI. Plain helpers are imported by the
test modules (`from tests.conftest import cowfs, site, ...`)."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import pwd
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cowfs import dirfd
from cowfs.mount import control, mount as mounting
from cowfs.mount.spec import MountSpec, VenvState
from cowfs.overlay.inode import Node
from cowfs.overlay.overlay import Overlay
from cowfs.overlay.upper import probe_user_xattrs
from cowfs.store.store import Store, digest_bytes

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from wheelcache import ensure_wheels  # noqa: E402

PKG = "pycowsay==0.0.0.2"  # the real wheel the end-to-end tests install
UDDER, EDITED = "||----w |", "||----ww|"  # its cow's udder line, and an edit of it


@pytest.fixture(autouse=True)
def isolated_cowfs(tmp_path_factory: pytest.TempPathFactory,
                   monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Path:
    """Every test gets its own store and runtime dir (sockets, mount registry). Shared
    bytecode is compiled inline, so the store a test inspects after `cowfs install` is
    settled; tests marked background_bytecode get the default detached job."""
    base = tmp_path_factory.mktemp("cowfs-home")
    if request.node.get_closest_marker("background_bytecode") is None:
        monkeypatch.setenv("COWFS_BYTECODE", "inline")
    monkeypatch.setenv("COWFS_HOME", str(base / "store"))
    run = Path("/tmp") / f"cowfs-rt-{os.getpid()}-{base.name}"  # short: sun_path limit
    run.mkdir(exist_ok=True)
    monkeypatch.setenv("COWFS_RUNTIME_DIR", str(run))
    yield base
    shutil.rmtree(run, ignore_errors=True)


def force_unmount(mountpoint: str) -> None:
    """Teardown that cannot leave a mount behind, even when the daemon is wedged."""
    if mounting.find_mount(mountpoint) is None:
        return
    spec = MountSpec.for_mountpoint(mountpoint)
    status = control.try_request(spec.socket, "status", timeout=2) if spec else None
    with contextlib.suppress(Exception):
        mounting.umount(mountpoint)
    if mounting.find_mount(mountpoint) is not None:
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)
    if status is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(status["pid"]), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while mounting.find_mount(mountpoint) is not None and time.monotonic() < deadline:
        time.sleep(0.05)


def unmount_venv(venv: Path) -> None:
    """Teardown of a cowfs venv: unmount its site-packages, if the venv was made at all."""
    if VenvState.path_for(venv).exists():
        force_unmount(str(VenvState.load(venv).site_packages))


# -- the real command line on real wheels ----------------------------------------------------


@pytest.fixture(scope="session")
def wheels() -> Path:
    """The directory holding the cached real wheels (PKG); skipped offline, outside CI."""
    try:
        return ensure_wheels([PKG])
    except RuntimeError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"real wheels unavailable offline: {exc}")


def cowfs(*args: str, check: bool = True, timeout: float | None = 120, **kw: Any
          ) -> subprocess.CompletedProcess[str]:
    """`python -m cowfs ARGS` (kw go to subprocess.run: env, cwd); AssertionError with its
    stderr on a non-zero exit unless check=False."""
    proc = subprocess.run([sys.executable, "-m", "cowfs", *args], capture_output=True,
                          text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"cowfs {' '.join(args)} failed: {proc.stderr}")
    return proc


@pytest.fixture
def venvs(tmp_path: Path) -> Iterator[Callable[[str | Path], Path]]:
    """Factory: `cowfs venv` at tmp_path/NAME/.venv (a str) or at a given Path; each one is
    unmounted at teardown."""
    made: list[Path] = []

    def make(where: str | Path) -> Path:
        venv = tmp_path / where / ".venv" if isinstance(where, str) else where
        made.append(venv)
        cowfs("venv", str(venv))
        return venv

    try:
        yield make
    finally:
        from installer.wheel.bytecode_bg import wait

        for venv in made:
            wait(venv, 120)  # a background bytecode job would reload it
            unmount_venv(venv)


def install(venv: Path, wheel_dir: Path, *reqs: str) -> None:
    """`cowfs install` of reqs (default PKG) from wheel_dir only, quietly."""
    cowfs("install", "--venv", str(venv), *(reqs or (PKG,)), "--no-index", "--find-links",
          str(wheel_dir), "-q")


def one_line_error(proc: subprocess.CompletedProcess[str], text: str) -> None:
    """The CLI refused with exit 1 and exactly one `cowfs: error: ...` line holding text."""
    assert proc.returncode == 1, proc
    assert proc.stderr.startswith("cowfs: error:") and proc.stderr.count("\n") == 1, proc.stderr
    assert text in proc.stderr, proc.stderr


def object_hashes(store: Store) -> dict[str, str]:
    """digest -> hash of the object's bytes now (equal while the store is intact)."""
    return {d: digest_bytes(p.read_bytes()) for d, p in store.iter_objects()}


def upper_files(venv: Path) -> list[str]:
    """The venv's private layer's files; absorb may be emptying it meanwhile (a walk skips
    what goes, where rglob raised)."""
    upper = VenvState.load(venv).upper
    return sorted(os.path.relpath(os.path.join(d, f), upper)
                  for d, _, names in os.walk(upper) for f in names)


def site(venv: Path) -> Path:
    return VenvState.load(venv).site_packages


def cow(venv: Path) -> str:
    """The udder line `pycowsay moo` prints in this venv."""
    out = subprocess.run([str(venv / "bin" / "pycowsay"), "moo"], capture_output=True,
                         text=True, check=True).stdout
    return next(ln.strip() for ln in out.splitlines() if "||--" in ln)


def ensure_user(name: str) -> tuple[int, int]:
    """(uid, gid) of a system user for acting as someone else; created on first use."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/false",
                        name], check=True, capture_output=True)
        pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid


def as_user(uid: int, gid: int, *cmd: str) -> list[str]:
    """cmd run as uid:gid, with no supplementary groups."""
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *cmd]


@functools.cache
def user_pythonpath(uid: int, gid: int, site: str) -> str:
    """A PYTHONPATH holding cowfs, installer and site (the dev env's site-packages) that
    uid:gid can import from: the checkout itself, else (a checkout under a 0700 directory,
    such as mktemp -d) a copy in a world-readable temporary directory, for this session."""
    here = f"{ROOT}:{site}"
    reach = subprocess.run(as_user(uid, gid, "test", "-r", str(ROOT / "cowfs" / "__init__.py"),
                                   "-a", "-x", site), capture_output=True)
    if reach.returncode == 0:
        return here
    copy = Path(tempfile.mkdtemp(prefix="cowfs-src-", dir="/tmp"))
    atexit.register(shutil.rmtree, copy, True)
    copy.chmod(0o755)
    for pkg in ("cowfs", "installer"):
        shutil.copytree(ROOT / pkg, copy / "src" / pkg, symlinks=True)
    shutil.copytree(site, copy / "site", symlinks=True)
    return f"{copy / 'src'}:{copy / 'site'}"


@functools.cache
def user_python(uid: int, gid: int) -> str:
    """A Python interpreter uid:gid can run, for stdlib-only code run with -I: the system's,
    else the base interpreter of this venv (a venv or pyenv under /root is out of its reach;
    the python image has no /usr/bin/python3). Skips when there is none."""
    tried = list(dict.fromkeys(["/usr/bin/python3", "/usr/local/bin/python3",
                                os.path.realpath(sys.executable)]))
    for python in tried:
        if os.path.exists(python) and subprocess.run(
                as_user(uid, gid, python, "-I", "-c", ""), capture_output=True).returncode == 0:
            return python
    pytest.skip(f"no Python interpreter that uid {uid} can run (tried {', '.join(tried)})")


# -- generic overlay mounts --------------------------------------------------------------------


@dataclass
class OverlayMount:
    mnt: Path
    lower: list[Path]
    upper: Path
    work: Path
    spec: MountSpec

    def pid(self) -> int:
        return int(control.request(self.spec.socket, "status")["pid"])


@pytest.fixture
def overlay_mount(tmp_path: Path) -> Iterator[Callable[..., OverlayMount]]:
    """Factory: mount a generic overlay over the given lower dirs; unmounted at teardown.
    Its dirs are under tmp_path/ov-NAME; upper_base and mnt_base put the upper/work dirs (and
    daemon log) or the mountpoint under another directory (another filesystem)."""
    made: list[str] = []

    def make(*lower: Path, name: str = "mnt", upper_base: Path | None = None,
             mnt_base: Path | None = None, allow_other: bool = False) -> OverlayMount:
        base = (upper_base or tmp_path) / f"ov-{name}"
        mnt = (mnt_base or tmp_path) / f"ov-{name}" / "mnt"
        upper, work = base / "upper", base / "work"
        for d in (mnt, upper, work):
            d.mkdir(parents=True, exist_ok=True)
        spec = MountSpec(mountpoint=str(mnt), upper=str(upper), work=str(work),
                         log=str(base / "daemon.log"), lowerdirs=[str(p) for p in lower],
                         allow_other=allow_other)
        made.append(str(mnt))
        mounting.mount(spec)
        return OverlayMount(mnt, list(lower), upper, work, spec)

    try:
        yield make
    finally:
        for mp in made:
            force_unmount(mp)


@pytest.fixture(scope="session")
def passthrough_refused(tmp_path_factory: pytest.TempPathFactory) -> str | None:
    """Why passthrough opens fall back to kernel opens for files where the tests keep
    them (None: they work). In a container whose /tmp is overlayfs the kernel refuses a
    backing file stacked that deep, by design (cowfs/fuse/passthrough.py)."""
    base = tmp_path_factory.mktemp("pt-probe")
    (base / "lower").mkdir()
    (base / "lower" / "f").write_bytes(b"probe")
    for d in ("mnt", "upper", "work"):
        (base / d).mkdir()
    spec = MountSpec(mountpoint=str(base / "mnt"), upper=str(base / "upper"),
                     work=str(base / "work"), log=str(base / "daemon.log"),
                     lowerdirs=[str(base / "lower")])
    with pytest.MonkeyPatch.context() as m:
        m.setenv("COWFS_PASSTHROUGH", "1")  # inherited by the daemon
        mounting.mount(spec)
        try:
            (base / "mnt" / "f").read_bytes()
            st = control.request(spec.socket, "status")
            return None if st.get("opens") == "passthrough" else str(st.get("opens_why"))
        finally:
            force_unmount(str(base / "mnt"))


def populate(root: Path) -> None:
    """A small package-like tree: nested dirs, text and binary files, an executable."""
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("VALUE = 1\n")
    (root / "pkg" / "main.py").write_text("def main():\n    return 'moo'\n")
    (root / "pkg" / "sub" / "data.bin").write_bytes(bytes(range(256)) * 64)
    (root / "pkg" / "empty").mkdir()
    (root / "top.txt").write_text("top\n")
    tool = root / "tool.sh"
    tool.write_text("#!/bin/sh\necho tool\n")
    tool.chmod(0o755)
    (root / "pkg" / "link").symlink_to("main.py")


def fingerprint(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything about a tree that a mount must never change: bytes, metadata, xattrs."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in ["", *dirs, *files]:
            full = Path(dirpath) / name if name else Path(dirpath)
            st = full.lstat()
            digest = hashlib.sha256(full.read_bytes()).hexdigest() \
                if stat.S_ISREG(st.st_mode) else ""
            xattrs = {n: os.getxattr(full, n, follow_symlinks=False)
                      for n in os.listxattr(full, follow_symlinks=False)}
            out[str(full)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                              st.st_ino, st.st_nlink, digest, sorted(xattrs.items()))
    return out


# -- kernel caches and filesystems a container does not give -------------------------------


def drop_kernel_caches() -> None:
    """Make the kernel forget dentries and inodes (a FUSE FORGET for every unused inode):
    `echo 2 > /proc/sys/vm/drop_caches`. A container mounts /proc/sys read-only; there the
    same file of a private procfs instance is written (root with CAP_SYS_ADMIN, as the FUSE
    tests are); without that the test is skipped."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("2\n")
        return
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
    with tempfile.TemporaryDirectory(prefix="cowfs-proc-") as proc_dir:
        mounted = subprocess.run(["mount", "-t", "proc", "-o", "nosuid,nodev,noexec", "proc",
                                  proc_dir], capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip("cannot make the kernel forget inodes: /proc/sys is read-only and a "
                        f"private procfs cannot be mounted ({mounted.stderr.strip()})")
        try:
            Path(proc_dir, "sys", "vm", "drop_caches").write_text("2\n")
        finally:
            subprocess.run(["umount", proc_dir], check=True)


def drop_page_cache(paths: Iterable[Path]) -> None:
    """Evict the cached pages of these files only (POSIX_FADV_DONTNEED): their next reads
    reach the filesystem (on a mount: READ requests to the daemon)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _takes_device_whiteouts(directory: Path) -> bool:
    probe = directory / ".cowfs-whiteout-probe"
    try:
        os.mknod(probe, stat.S_IFCHR | 0o600, 0)
    except PermissionError:
        return False
    probe.unlink()
    return True


@pytest.fixture
def device_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory where a test can create classic 0/0 character-device whiteouts and user
    xattrs: tmp_path, unless its filesystem refuses the device (overlayfs gives EPERM, as a
    0/0 device is its own whiteout: a container's root, /tmp included); then a tmpfs mounted
    for the test (skipped where tmpfs has no user xattrs, before Linux 6.6)."""
    if _takes_device_whiteouts(tmp_path):
        yield tmp_path
        return
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0755", "cowfs-test",
                    str(mnt)], check=True, capture_output=True)
    try:
        if not probe_user_xattrs(str(mnt)):
            pytest.skip(f"{tmp_path} refuses 0/0 character devices and tmpfs has no user "
                        "xattrs on this kernel (Linux < 6.6)")
        assert _takes_device_whiteouts(mnt)
        yield mnt
    finally:
        # In-process overlays (pytest keeps a test's fixture values until every teardown
        # ran) hold their layer roots open, and dropped handles are closed late: now, or
        # the tmpfs is busy.
        dirfd.release_under(mnt)
        subprocess.run(["umount", str(mnt)], check=True)


_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD, _AT_SYMLINK_NOFOLLOW, _AT_STATX_FORCE_SYNC = -100, 0x100, 0x2000
_STATX_BASIC_STATS = 0x7FF


@dataclass(frozen=True)
class Statx:
    mode: int
    nlink: int
    ino: int
    size: int
    mtime_ns: int


def statx_fresh(path: Path | str) -> Statx:
    """lstat that bypasses the kernel's attribute cache (AT_STATX_FORCE_SYNC): on FUSE it
    asks the daemon, so a cache that hides a wrong daemon answer cannot hide it here."""
    buf = ctypes.create_string_buffer(256)
    if _libc.statx(_AT_FDCWD, os.fsencode(path), _AT_SYMLINK_NOFOLLOW | _AT_STATX_FORCE_SYNC,
                   _STATX_BASIC_STATS, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    nlink, = struct.unpack_from("I", buf, 16)
    mode, = struct.unpack_from("H", buf, 28)
    ino, size = struct.unpack_from("QQ", buf, 32)
    sec, nsec = struct.unpack_from("qI", buf, 112)
    return Statx(mode, nlink, ino, size, sec * 10**9 + nsec)


# -- merged-view helpers for unit tests that drive cowfs.overlay.overlay.Overlay directly ---------


def node_at(ov: Overlay, path: str) -> Node:
    node = ov.root
    for part in filter(None, path.split("/")):
        node = ov.child(node, part)
    return node


def read(ov: Overlay, path: str) -> bytes:
    fh = ov.open(node_at(ov, path), os.O_RDONLY)
    try:
        return ov.read(fh, 0, 1 << 24)
    finally:
        ov.release(fh)


def merged(ov: Overlay) -> dict[str, tuple[object, ...]]:
    """The whole merged view: path -> (kind, permission bits, content or link target)."""
    out: dict[str, tuple[object, ...]] = {}

    def walk(node: Node, path: str) -> None:
        for name in sorted(ov.listdir(node)):
            child = ov.child(node, name)
            p = f"{path}/{name}" if path else name
            attr = ov.getattr(child)
            if stat.S_ISDIR(attr.mode):
                out[p] = ("d", stat.S_IMODE(attr.mode))
                walk(child, p)
            elif stat.S_ISLNK(attr.mode):
                out[p] = ("l", ov.readlink(child))
            elif stat.S_ISREG(attr.mode):
                out[p] = ("f", stat.S_IMODE(attr.mode), read(ov, p))
            else:
                out[p] = ("o", attr.mode, attr.rdev)

    walk(ov.root, "")
    return out


def real_tree(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            full = Path(dirpath) / name
            st = full.lstat()
            rel = str(full.relative_to(root))
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode))
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(full))
            else:
                out[rel] = ("f", stat.S_IMODE(st.st_mode), full.read_bytes())
    return dict(sorted(out.items()))


@pytest.fixture
def py312(tmp_path: Path) -> Any:
    """A fake interpreter answering the query protocol as CPython 3.12.9."""
    from tests.test_interpreters import make_fake

    return make_fake(tmp_path, "3.12.9")


@pytest.fixture
def py39(tmp_path: Path) -> Any:
    """A fake interpreter answering as CPython 3.9.21 (same size and mtime as py312)."""
    from tests.test_interpreters import make_fake

    return make_fake(tmp_path, "3.9.21")


DAEMON_GONE = (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)  # errnos of a dead mount


def kill_during_synced_writes(target: Path, kill: Callable[[], None], synced_min: int) -> bytes:
    """Write 16-byte records to target from a thread, fsyncing every fourth; once synced_min
    are synced, call kill (kill -9 the daemon). Returns the bytes that were fsynced."""
    synced: list[int] = []

    def writer() -> None:
        try:
            with open(target, "r+b", buffering=0) as f:
                for i in range(1_000_000):
                    f.seek(i * 16)
                    f.write(f"record {i:08d}\n".encode())
                    if i % 4 == 3:
                        os.fsync(f.fileno())
                        synced.append(i)
        except OSError as exc:  # the daemon died under us
            assert exc.errno in DAEMON_GONE, exc

    t = threading.Thread(target=writer)
    t.start()
    deadline = time.monotonic() + 20
    while len(synced) < synced_min and time.monotonic() < deadline:
        time.sleep(0.01)
    kill()
    t.join(10)
    assert not t.is_alive() and len(synced) >= synced_min
    return b"".join(f"record {i:08d}\n".encode() for i in range(synced[-1] + 1))


@contextlib.contextmanager
def serving(httpd: Any) -> Iterator[None]:
    """A test's HTTP server (on 127.0.0.1) answering in a thread until the block ends."""
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
