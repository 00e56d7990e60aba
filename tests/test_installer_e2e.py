"""End to end through the `cowfs` CLI on the real pycowsay wheel (downloaded once, cached)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cowfs.mount import control, mount as mounting
from cowfs.mount.spec import VenvState
from cowfs.store.manifest import read_manifest
from cowfs.store.store import Store, digest_bytes
from installer.wheel import bytecode_bg
from tests.conftest import EDITED, PKG, UDDER, cow, cowfs, object_hashes, site


def test_two_projects_edit_stays_private(venvs: Callable[[str], Path], wheels: Path) -> None:
    a, b = venvs("A"), venvs("B")
    for v in (a, b):
        cowfs("install", "--venv", str(v), PKG, "--no-index", "--find-links", str(wheels))
    store = Store()
    before = object_hashes(store)
    assert all(d == h for d, h in before.items()), "objects are named by their content"
    main_a = site(a) / "pycowsay" / "main.py"
    main_a.write_text(main_a.read_text().replace(UDDER, EDITED))
    assert cow(a) == EDITED
    assert cow(b) == UDDER
    assert object_hashes(store) == before  # the store is byte-identical
    assert (a / ".cowfs" / "upper" / "pycowsay" / "main.py").read_text().count(EDITED) == 1
    c = venvs("C")
    cowfs("install", "--venv", str(c), PKG, "--no-index", "--find-links", str(wheels))
    assert cow(c) == UDDER
    # B and C share A's pristine object: the same inode content, not a copy per venv.
    digest = digest_bytes((site(c) / "pycowsay" / "main.py").read_bytes())
    assert store.has(digest)


def test_installed_layout_follows_the_specs(venvs: Callable[[str], Path], wheels: Path) -> None:
    a = venvs("A")
    out = cowfs("install", "--venv", str(a), PKG, "--no-index", "--find-links", str(wheels),
                "--json")
    assert '"pycowsay==0.0.0.2"' in out.stdout
    info = site(a) / "pycowsay-0.0.0.2.dist-info"
    assert (info / "INSTALLER").read_text() == "cowfs\n"
    assert (info / "REQUESTED").exists()
    record = (info / "RECORD").read_text()
    assert "pycowsay/main.py,sha256=" in record
    script = (a / "bin" / "pycowsay").read_text()
    assert script.startswith(f"#!{a}/bin/python")
    proc = subprocess.run([str(a / "bin" / "python"), "-c",
                           "import importlib.metadata as m; print(m.version('pycowsay'))"],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "0.0.0.2"


def test_uninstall_and_reinstall(venvs: Callable[[str], Path], wheels: Path) -> None:
    a = venvs("A")
    cowfs("install", "--venv", str(a), PKG, "--no-index", "--find-links", str(wheels))
    cowfs("uninstall", "--venv", str(a), "pycowsay")
    assert not (site(a) / "pycowsay").exists()
    assert not (a / "bin" / "pycowsay").exists()
    bad = cowfs("uninstall", "--venv", str(a), "pycowsay", check=False)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "not installed" in bad.stderr
    cowfs("install", "--venv", str(a), PKG, "--no-index", "--find-links", str(wheels))
    assert cow(a) == UDDER


def test_automount_after_unmount(venvs: Callable[[str], Path], wheels: Path) -> None:
    a = venvs("A")
    cowfs("install", "--venv", str(a), PKG, "--no-index", "--find-links", str(wheels))
    cowfs("umount", str(a))
    assert mounting.find_mount(str(site(a))) is None
    proc = subprocess.run([str(a / "bin" / "python"), "-c", "import pycowsay; print('ok')"],
                          capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr
    assert mounting.mount_state(str(site(a))) == "live"


def test_dead_daemon_is_recovered(venvs: Callable[[str], Path], wheels: Path) -> None:
    a = venvs("A")
    cowfs("install", "--venv", str(a), PKG, "--no-index", "--find-links", str(wheels))
    spec = VenvState.load(a).mount_spec()
    pid = int(control.request(spec.socket, "status")["pid"])
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if mounting.mount_state(str(site(a))) == "stale":
            break
        time.sleep(0.02)
    assert mounting.mount_state(str(site(a))) == "stale"
    cowfs("mount", str(a))
    assert mounting.mount_state(str(site(a))) == "live"
    assert cow(a) == UDDER


def test_uv_writes_land_in_the_upper_layer(venvs: Callable[[str], Path], wheels: Path,
                                           tmp_path: Path) -> None:
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    if not Path(uv).exists():
        pytest.skip("uv is not installed (test extra)")
    from tests.wheelbuild import build

    a = venvs("A")
    extra = tmp_path / "extra-wheels"
    extra.mkdir()
    build(extra, {"localpkg/__init__.py": b"X = 42\n"}, name="localpkg", meta_extra="")
    proc = subprocess.run([uv, "pip", "install", "--python", str(a / "bin" / "python"),
                           "--no-index", "--find-links", str(extra), "localpkg"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (a / ".cowfs" / "upper" / "localpkg" / "__init__.py").exists()
    out = subprocess.run([str(a / "bin" / "python"), "-c", "import localpkg; print(localpkg.X)"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "42"


def test_bad_input_gives_one_line(tmp_path: Path, wheels: Path) -> None:
    missing = cowfs("install", "--venv", str(tmp_path / "nope"), "x", check=False)
    assert missing.returncode == 1
    assert missing.stderr.startswith("cowfs: error: no cowfs venv at")
    assert missing.stderr.count("\n") == 1
    usage = cowfs("mount", "-o", "lowerdir=/x,bogus=1", "a", "b", check=False)
    assert usage.returncode == 1 and "unknown mount option" in usage.stderr


@pytest.mark.background_bytecode
def test_shared_bytecode_and_private_recompile(venvs: Callable[[str], Path],
                                               wheels: Path) -> None:
    a, b = venvs("A"), venvs("B")
    for v in (a, b):
        cowfs("install", "--venv", str(v), PKG, "--no-index", "--find-links", str(wheels))
        assert bytecode_bg.wait(v, 120)  # compiled after the install returned, then reloaded
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

    def imports(venv: Path) -> str:
        return subprocess.run([str(venv / "bin" / "python"), "-v", "-c", "import pycowsay.main"],
                              capture_output=True, text=True, env=env, check=True).stderr

    pyc = f"pycowsay/__pycache__/main.cpython-{sys.version_info[0]}{sys.version_info[1]}.pyc"
    assert (site(a) / pyc).exists()  # served from the store
    assert f"{pyc} matches" in imports(a)
    upper = a / ".cowfs" / "upper"
    assert not list(upper.rglob("*")), "a fresh venv imports warm and writes no bytecode"
    main_a = site(a) / "pycowsay" / "main.py"
    main_a.write_text(main_a.read_text().replace(UDDER, EDITED))
    os.utime(main_a, (1, 1))  # a different source mtime, whatever the clock resolution
    assert f"code object from '{site(a) / pyc}'" not in imports(a)
    assert (upper / pyc).exists(), "the edited module is recompiled privately"
    assert f"{pyc} matches" in imports(b)  # B still uses the shared pyc
    assert not list((b / ".cowfs" / "upper").rglob("*"))


@pytest.mark.background_bytecode
def test_pycs_written_before_the_shared_ones_are_published_do_not_stay_private(
        venvs: Callable[[str], Path], wheels: Path) -> None:
    """A program run right after `cowfs install` writes its own pycs into the private layer
    (the shared ones are still compiling); once they are published those go, so an untouched
    venv is pristine again (status said "N modified" for good)."""
    import fcntl

    venv = venvs("A")
    lock = os.open(bytecode_bg._lock_path(venv), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the job queues behind this
        cowfs("install", "--venv", str(venv), PKG, "--no-index", "--find-links", str(wheels))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        subprocess.run([str(venv / "bin" / "python"), "-c", "import pycowsay.main"], env=env,
                       check=True)
        upper = venv / ".cowfs" / "upper"
        assert [p for p in upper.rglob("*.pyc")], "the program wrote private pycs"
    finally:
        os.close(lock)
    deadline = time.monotonic() + 120  # the job may not hold its lock yet: see it publish
    while not VenvState.load(venv).bytecode and time.monotonic() < deadline:
        time.sleep(0.05)
    assert bytecode_bg.wait(venv, 120)
    assert not [p for p in upper.rglob("*") if not p.is_dir()]
    assert "no private changes" in cowfs("status", "--venv", str(venv)).stdout
    pyc = f"pycowsay/__pycache__/main.cpython-{sys.version_info[0]}{sys.version_info[1]}.pyc"
    assert (site(venv) / pyc).exists() and cow(venv) == UDDER


@pytest.mark.background_bytecode
@pytest.mark.parametrize("by", ["venv", "mountpoint"])
def test_umount_right_after_install_waits_for_the_bytecode_job(
        venvs: Callable[[str], Path], tmp_path: Path, by: str) -> None:
    """`cowfs install X && cowfs umount .venv`, as a container script does: the shared
    bytecode was still compiling through the mount, and umount said "busy"."""
    links = tmp_path / "links"
    links.mkdir()
    # Enough modules that the job still compiles when umount comes (~1 s).
    from tests.wheelbuild import build

    build(links, {f"many/m{i}.py": f"X = {i}\n".encode() * 50 for i in range(1500)},
          name="many", meta_extra="")
    venv = venvs("A")
    cowfs("install", "--venv", str(venv), "many==1.0", "--no-index", "--find-links", str(links))
    cowfs("umount", str(venv) if by == "venv" else str(site(venv)))
    assert mounting.find_mount(str(site(venv))) is None
    assert VenvState.load(venv).bytecode, "the job finished and published before"
    cowfs("mount", str(venv))
    assert (site(venv) / "many" / "__pycache__").is_dir()


@pytest.mark.background_bytecode
def test_store_commands_while_the_bytecode_job_runs(venvs: Callable[[str], Path],
                                                    wheels: Path) -> None:
    """verify and gc right after `cowfs install` returns, while its detached bytecode job
    compiles: verify finds nothing wrong, gc takes nothing the job publishes, and the venv
    ends up with its shared bytecode."""
    a = venvs("A")
    cowfs("install", "--venv", str(a), PKG, "--no-index", "--find-links", str(wheels))
    verify = cowfs("store", "verify", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    cowfs("store", "gc")
    assert bytecode_bg.wait(a, 120)
    (bytecode,) = VenvState.load(a).bytecode
    store = Store()
    assert all(store.has(f.digest) for f in read_manifest(store, bytecode).files)
    verify = cowfs("store", "verify", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    pyc = f"pycowsay/__pycache__/main.cpython-{sys.version_info[0]}{sys.version_info[1]}.pyc"
    assert (site(a) / pyc).exists()
    assert cow(a) == UDDER


def test_uninstall_leaves_no_empty_directory_a_copy_up_made(venvs: Callable[[str], Path],
                                                            wheels: Path) -> None:
    """chmod copies main.py and its directory up; reset drops the file, not the directory;
    after uninstall that empty private directory showed as a package (`import pycowsay`
    found a namespace package)."""
    venv = venvs("A")
    cowfs("install", "--venv", str(venv), PKG, "--no-index", "--find-links", str(wheels))
    os.chmod(site(venv) / "pycowsay" / "main.py", 0o600)
    cowfs("reset", "-y", "--venv", str(venv), "pycowsay/main.py")
    cowfs("uninstall", "--venv", str(venv), "pycowsay")
    assert not [n for n in os.listdir(site(venv)) if n.startswith("pycowsay")]
    assert not list((venv / ".cowfs" / "upper").iterdir())
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import pycowsay"],
                           capture_output=True, text=True)
    assert probe.returncode == 1 and "No module named 'pycowsay'" in probe.stderr


def test_a_local_wheel_is_hash_checked_once_by_its_ingestion(
        venvs: Callable[[str], Path], wheels: Path, tmp_path: Path) -> None:
    """fetch leaves a local wheel with a lock hash unhashed; its ingestion computes the
    sha256 and the install refuses a mismatch before anything names the wheel."""
    import hashlib

    from tests.conftest import one_line_error

    venv = venvs("v")
    wheel = next(wheels.glob("pycowsay-*.whl"))
    local = tmp_path / wheel.name
    shutil.copy2(wheel, local)  # a file no install has recorded yet
    lock = tmp_path / "pylock.toml"

    def write_lock(sha256: str) -> None:
        lock.write_text('lock-version = "1.0"\ncreated-by = "test"\n[[packages]]\n'
                        'name = "pycowsay"\nversion = "0.0.0.2"\n[[packages.wheels]]\n'
                        f'path = "{wheel.name}"\nhashes = {{sha256 = "{sha256}"}}\n')

    before = VenvState.path_for(venv).read_bytes()
    write_lock("0" * 64)
    proc = cowfs("sync", str(lock), "--venv", str(venv), check=False)
    one_line_error(proc, f"{wheel.name}: sha256 mismatch (expected {'0' * 64}, got ")
    assert f"for local file {local}" in proc.stderr
    assert VenvState.path_for(venv).read_bytes() == before, "the venv is unchanged"
    assert not list(Store().dists.glob("pycowsay-*")), "no manifest of a refused wheel"
    write_lock(hashlib.sha256(wheel.read_bytes()).hexdigest())
    cowfs("sync", str(lock), "--venv", str(venv))
    assert cow(venv) == UDDER
