"""Faults: kill -9 of the daemon (during fsynced writes, during a big copy-up), an upper layer
on a full filesystem, a store on a read-only filesystem, concurrent installs racing a gc.

Each test states what must survive: fsynced data, the store objects (bytes, mode, mtime,
nlink), a view without half-copied files, and a mount that `cowfs.mount.mount.mount()` recovers.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cowfs.mount import control, mount as mounting
from cowfs.mount.spec import MountSpec, VenvState
from cowfs.store.store import Store
from tests.conftest import (
    DAEMON_GONE,
    PKG,
    UDDER,
    cow,
    cowfs,
    drop_kernel_caches,
    fingerprint,
    force_unmount,
    install,
    kill_during_synced_writes,
)
from tests.wheelbuild import build

TMP_NAME = re.compile(r"[0-9a-f]{32}")


def objects(store: Store) -> dict[str, tuple[str, int, int, int]]:
    out = {}
    for digest, path in store.iter_objects():
        st = path.stat()
        out[digest] = (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mode,
                       st.st_mtime_ns, st.st_nlink)
    return out


def daemon_pid(spec: MountSpec) -> int:
    return int(control.request(spec.socket, "status")["pid"])


def wait_stale(mp: Path) -> None:
    deadline = time.monotonic() + 10
    while mounting.mount_state(str(mp)) != "stale" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mounting.mount_state(str(mp)) == "stale"


# -- kill -9 ---------------------------------------------------------------------------------


def test_kill_9_during_fsynced_writes_on_a_venv(tmp_path: Path,
                                                venvs: Callable[[Path], Path]) -> None:
    links = tmp_path / "links"
    links.mkdir()
    data = os.urandom(256 * 1024)
    build(links, {"blob/__init__.py": b"X = 1\n", "blob/data.bin": data}, name="blob",
          meta_extra="")
    venv = venvs(tmp_path / "v")
    cowfs("install", "--venv", str(venv), "blob==1.0", "--no-index", "--find-links", str(links))
    state = VenvState.load(venv)
    spec = state.mount_spec()
    store = Store(state.store)
    before = objects(store)
    target = state.site_packages / "blob" / "data.bin"
    expect = kill_during_synced_writes(
        target, lambda: os.kill(daemon_pid(spec), signal.SIGKILL), 40)
    assert (state.upper / "blob" / "data.bin").read_bytes()[:len(expect)] == expect
    assert objects(store) == before, "a store object changed"
    wait_stale(state.site_packages)
    assert mounting.mount(spec) == "mounted"  # detaches the dead mount and mounts again
    assert target.read_bytes()[:len(expect)] == expect
    assert (state.site_packages / "blob" / "__init__.py").read_text() == "X = 1\n"
    assert os.listdir(state.work) == []
    log = state.log.read_text()
    for line in ("cowfs.fuse.daemon: mounted", "serving", "reloaded lower"):
        assert line in log, f"daemon log lacks {line!r}"
    assert log.count("cowfs.fuse.daemon: mounted") == 2  # before the kill, after the recovery
    cowfs("umount", str(venv))
    assert mounting.find_mount(str(state.site_packages)) is None
    assert state.log.read_text().rstrip().endswith(f"unmounted {state.site_packages}")


def test_status_after_the_daemon_was_killed_remounts_and_says_so(
        tmp_path: Path, venvs: Callable[[Path], Path], wheels: Path) -> None:
    """OOM killer, kill -9: files not in the kernel's cache gave ENOTCONN, while `cowfs
    status` read the private layer and answered "pristine". It now remounts, on stderr."""
    venv = venvs(tmp_path / "v")
    install(venv, wheels)
    state = VenvState.load(venv)
    os.kill(daemon_pid(state.mount_spec()), signal.SIGKILL)
    wait_stale(state.site_packages)
    proc = cowfs("status", "--venv", str(venv))
    assert "had stopped" in proc.stderr and "remounted" in proc.stderr
    assert "no private changes" in proc.stdout
    assert mounting.mount_state(str(state.site_packages)) == "live"
    drop_kernel_caches()
    assert cow(venv) == UDDER


def test_kill_9_during_a_big_copy_up(tmp_path: Path, overlay_mount: Any) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    size = 192 << 20
    block = bytearray(os.urandom(1 << 20))
    sha = hashlib.sha256()
    with open(lower / "big.bin", "wb") as f:
        for i in range(size >> 20):
            block[:8] = i.to_bytes(8, "little")  # every MiB different: misplaced data shows
            f.write(block)
            sha.update(block)
    before = fingerprint(lower)
    m = overlay_mount(lower)
    pid = m.pid()
    outcome: list[object] = []

    def opener() -> None:
        try:
            write_in_place(m.mnt / "big.bin")
            outcome.append("written")
        except OSError as exc:
            outcome.append(exc.errno)

    t = threading.Thread(target=opener)
    t.start()
    caught = None
    deadline = time.monotonic() + 30
    while caught is None and t.is_alive() and time.monotonic() < deadline:
        for de in os.scandir(m.work):
            if TMP_NAME.fullmatch(de.name):
                caught = de.stat().st_size
    os.kill(pid, signal.SIGKILL)
    t.join(10)
    assert caught is not None and caught < size, f"copy-up not caught in flight: {outcome}"
    assert outcome and outcome[0] in DAEMON_GONE
    assert not (m.upper / "big.bin").exists(), "a half-copied file is visible in the upper"
    leftovers = os.listdir(m.work)
    assert leftovers and all(TMP_NAME.fullmatch(n) for n in leftovers), leftovers
    wait_stale(m.mnt)
    assert mounting.mount(m.spec) == "mounted"
    assert os.listdir(m.work) == [], "the new daemon did not drop the work-dir garbage"
    got = hashlib.sha256()
    with open(m.mnt / "big.bin", "rb") as f:
        while chunk := f.read(8 << 20):
            got.update(chunk)
    assert got.digest() == sha.digest()
    with open(m.mnt / "big.bin", "r+b") as f:  # and a copy-up now completes
        f.write(b"done")
    assert (m.upper / "big.bin").stat().st_size == size
    assert fingerprint(lower) == before
    print(f"\nkilled with {caught >> 20} of {size >> 20} MiB copied")


# -- full and read-only filesystems -------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs; torn down after every mount that uses it (fixture order)."""
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "cowfs-test", str(d)],
                   check=True)
    try:
        yield d
    finally:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], check=True)


def fill(path: Path) -> tuple[int, int]:
    """Write 64 KiB chunks until the filesystem is full; (bytes written, errno)."""
    chunk = b"f" * 65536
    written = 0
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        while written < 16 << 20:
            written += os.write(fd, chunk)
    except OSError as exc:
        return written, exc.errno or 0
    finally:
        os.close(fd)
    return written, 0


@pytest.mark.parametrize("opens", ["kernel", "passthrough"])
def test_upper_on_a_full_filesystem(small_fs: Path, tmp_path: Path, opens: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Passthrough: a read file's backing id must not keep its space once deleted.
    monkeypatch.setenv("COWFS_PASSTHROUGH", "0" if opens == "kernel" else "1")
    lower = tmp_path / "lower"
    lower.mkdir()
    big = os.urandom(6 << 20)
    (lower / "big.bin").write_bytes(big)
    (lower / "small.txt").write_text("small\n")
    before = fingerprint(lower)
    spec = MountSpec(mountpoint=str(tmp_path / "mnt"), upper=str(small_fs / "upper"),
                     work=str(small_fs / "work"), log=str(tmp_path / "daemon.log"),
                     lowerdirs=[str(lower)])
    (tmp_path / "mnt").mkdir()
    mnt, upper, work = tmp_path / "mnt", small_fs / "upper", small_fs / "work"
    mounting.mount(spec)
    try:
        free = os.statvfs(mnt).f_bfree
        written, err = fill(mnt / "filler")
        assert err == errno.ENOSPC and 0 < written <= 4 << 20
        assert os.stat(mnt / "filler").st_size == written
        assert (mnt / "filler").read_bytes() == b"f" * written
        with pytest.raises(OSError) as exc:  # even a small copy-up cannot start now
            (mnt / "small.txt").write_text("edit\n")
        assert exc.value.errno == errno.ENOSPC
        os.unlink(mnt / "filler")
        with pytest.raises(OSError) as exc:  # 6 MiB cannot be copied into 4 MiB
            write_in_place(mnt / "big.bin")
        assert exc.value.errno == errno.ENOSPC
        assert not (upper / "big.bin").exists() and os.listdir(work) == []
        assert (mnt / "big.bin").read_bytes() == big
        assert os.statvfs(mnt).f_bfree >= free - 16, "the failed copy-up leaked space"
        with open(mnt / "big.bin", "wb") as f:  # O_TRUNC needs no data copy: it fits
            f.write(b"replaced")
        assert (mnt / "big.bin").read_bytes() == b"replaced"
        (mnt / "small.txt").write_text("edit\n")
        assert (upper / "small.txt").read_text() == "edit\n"
        assert fingerprint(lower) == before
    finally:
        force_unmount(str(mnt))


def test_copy_up_that_does_not_fit_leaves_the_store_intact(
        small_fs: Path, tmp_path: Path, venvs: Callable[[Path], Path]) -> None:
    links = tmp_path / "links"
    links.mkdir()
    data = os.urandom(5 << 20)
    build(links, {"blob/__init__.py": b"", "blob/data.bin": data}, name="blob", meta_extra="")
    venv = venvs(small_fs / "v")  # the venv, and so its upper layer, on the 4 MiB fs
    cowfs("install", "--venv", str(venv), "blob==1.0", "--no-index", "--find-links", str(links))
    state = VenvState.load(venv)
    store = Store(state.store)
    before = objects(store)
    target = state.site_packages / "blob" / "data.bin"
    with pytest.raises(OSError) as exc:
        write_in_place(target)
    assert exc.value.errno == errno.ENOSPC
    assert not (state.upper / "blob" / "data.bin").exists()
    assert os.listdir(state.work) == []
    assert target.read_bytes() == data
    assert objects(store) == before
    cowfs("store", "verify")
    (state.site_packages / "blob" / "__init__.py").write_text("X = 2\n")  # small ones fit
    assert objects(store) == before


def write_in_place(path: Path) -> None:
    """Open for writing and write a byte: the copy-up runs at the open or, when the kernel
    opens files without asking the daemon (cowfs/fuse/_fuse_shim.c), at the first write."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"x", 0)
    finally:
        os.close(fd)


@pytest.fixture
def readonly_store() -> Iterator[Callable[[], None]]:
    """Call it to turn the test's store read-only (a ro bind mount over itself)."""
    root = Store().root
    mounted: list[str] = []

    def make_readonly() -> None:
        subprocess.run(["mount", "--bind", str(root), str(root)], check=True)
        mounted.append(str(root))
        subprocess.run(["mount", "-o", "remount,ro,bind", str(root)], check=True)

    try:
        yield make_readonly
    finally:
        for mp in mounted:
            subprocess.run(["umount", "-l", mp], check=True)


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"dir"
            for p in sorted(path.rglob("*")) if not p.is_symlink()}


def test_store_on_a_read_only_filesystem(tmp_path: Path, wheels: Path,
                                         venvs: Callable[[Path], Path],
                                         readonly_store: Callable[[], None]) -> None:
    links = tmp_path / "links"
    links.mkdir()
    build(links, {"other/__init__.py": b"Y = 1\n"}, name="other", meta_extra="")
    a, b = venvs(tmp_path / "a"), venvs(tmp_path / "b")
    cowfs("install", "--venv", str(a), PKG, "--no-index", "--find-links", str(wheels),
          "--no-compile")
    before = objects(Store())
    readonly_store()
    with pytest.raises(OSError) as exc:
        (Store().root / "probe").write_text("x")
    assert exc.value.errno == errno.EROFS
    # Nothing new needed: the wheel is ingested already (its shared bytecode is not: that is
    # an optimisation, skipped on a read-only store).
    cowfs("install", "--venv", str(b), PKG, "--no-index", "--find-links", str(wheels))
    out = subprocess.run([str(b / "bin" / "pycowsay"), "ro"], capture_output=True, text=True)
    assert out.returncode == 0 and "< ro >" in out.stdout
    # Something new: one clear error, and the venv is as it was.
    state_before = VenvState.path_for(b).read_bytes()
    site_before = tree(VenvState.load(b).site_packages)
    proc = cowfs("install", "--venv", str(b), "other==1.0", "--no-index", "--find-links",
                 str(links), "--no-compile", check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("cowfs: error: ") and proc.stderr.count("\n") == 1, \
        proc.stderr
    assert "is read-only and does not hold other==1.0" in proc.stderr, proc.stderr
    print(f"\n{proc.stderr.strip()}")
    assert VenvState.path_for(b).read_bytes() == state_before
    assert tree(VenvState.load(b).site_packages) == site_before
    assert objects(Store()) == before
    cowfs("store", "verify")


# -- concurrency --------------------------------------------------------------------------------


def test_concurrent_installs_and_gc_share_one_store(tmp_path: Path, wheels: Path,
                                                    venvs: Callable[[Path], Path]) -> None:
    links = tmp_path / "links"
    links.mkdir()
    for whl in wheels.glob("pycowsay-*.whl"):
        os.link(whl, links / whl.name)
    for i in range(3):
        files = {f"syn{i}/__init__.py": f"N = {i}\n".encode(),
                 f"syn{i}/shared.py": b"SHARED = True\n",  # one object for all three
                 f"syn{i}/blob.bin": os.urandom(200_000)}
        build(links, files, name=f"syn{i}", meta_extra="")
    x, y = venvs(tmp_path / "x"), venvs(tmp_path / "y")

    def together(*commands: list[str]) -> None:
        procs = [subprocess.Popen([sys.executable, "-m", "cowfs", *c], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for c in commands]
        for c, p in zip(commands, procs, strict=True):
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, f"cowfs {' '.join(c)}: {err}"

    src = ["--no-index", "--find-links", str(links)]
    together(["install", "--venv", str(x), PKG, "syn0==1.0", "syn1==1.0", *src],
             ["install", "--venv", str(y), PKG, "syn1==1.0", "syn2==1.0", *src],
             ["store", "gc"])
    together(["uninstall", "--venv", str(x), "syn0", "syn1"],
             ["install", "--venv", str(y), "syn0==1.0", *src],
             ["store", "gc"])
    for venv, mods in ((x, "pycowsay.main"), (y, "pycowsay.main, syn0, syn1, syn2")):
        proc = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {mods}"],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert not (VenvState.load(x).site_packages / "syn0").exists()
    cowfs("store", "verify")
