"""Security: nothing done through a mount reaches a store object; the store cannot be tricked
into naming other bytes by a digest; mounts are private unless asked and enforce permissions;
the control socket is the owner's; the automount hook runs only what it recorded.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import mmap
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs.errors import CollisionError, StoreError
from cowfs.mount import mount as mounting
from cowfs.mount.spec import MountSpec, VenvState
from cowfs.store.manifest import read_manifest
from cowfs.store.store import Store, digest_bytes
from installer.venv.automount import HOOK_MODULE, write_hook
from tests import conftest
from tests.conftest import cowfs, ensure_user, force_unmount, unmount_venv
from tests.wheelbuild import build

USER = "cowfs-errno"  # shared with test_posix_errno


def as_user(code: str, *args: str) -> dict[str, object]:
    """Run python code as the unprivileged user; it prints one JSON document."""
    uid, gid = ensure_user(USER)
    proc = subprocess.run(conftest.as_user(uid, gid, conftest.user_python(uid, gid), "-I",
                                           "-c", code, *args),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


TRY = """
import errno, json, os, sys
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]
"""


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is root-only)."""
    base = Path(tempfile.mkdtemp(prefix="cowfs-sec-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        for entry in mounting.mount_table():
            if entry.mountpoint.startswith(f"{base}/"):
                force_unmount(entry.mountpoint)
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


# -- store objects are never written through a mount -----------------------------------------

ATTACKS = ["rdwr", "wronly", "append", "trunc_open", "rdonly_trunc", "truncate", "chmod",
           "chown", "utime", "setxattr", "link_then_write", "rename_onto", "mmap_shared",
           "proc_fd_reopen", "fallocate", "copy_file_range", "unlink"]


def attack(kind: str, p: Path) -> None:
    if kind in ("rdwr", "wronly", "append"):
        flags = {"rdwr": os.O_RDWR, "wronly": os.O_WRONLY,
                 "append": os.O_WRONLY | os.O_APPEND}[kind]
        fd = os.open(p, flags)
        os.write(fd, b"EVIL")
        os.close(fd)
    elif kind == "trunc_open":
        p.write_bytes(b"EVIL")
    elif kind == "rdonly_trunc":
        os.close(os.open(p, os.O_RDONLY | os.O_TRUNC))
    elif kind == "truncate":
        os.truncate(p, 1)
    elif kind == "chmod":
        os.chmod(p, 0o777)
    elif kind == "chown":
        os.chown(p, 4321, 4321)
    elif kind == "utime":
        os.utime(p, ns=(1, 1))
    elif kind == "setxattr":
        os.setxattr(p, "user.evil", b"1")
    elif kind == "link_then_write":
        os.link(p, p.with_name("hardlink"))
        p.with_name("hardlink").write_bytes(b"EVIL")
    elif kind == "rename_onto":
        p.with_name("evil.py").write_bytes(b"EVIL")
        os.rename(p.with_name("evil.py"), p)
    elif kind == "mmap_shared":
        with open(p, "r+b") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED) as m:
            m[:4] = b"EVIL"
            m.flush()
    elif kind == "proc_fd_reopen":
        fd = os.open(p, os.O_RDONLY)
        try:
            with pytest.raises(PermissionError):  # a read-only fd cannot be mapped writable
                mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_WRITE)
            try:
                with open(f"/proc/self/fd/{fd}", "r+b") as f:
                    f.write(b"EVIL")
            except OSError as exc:  # passthrough: a writer of a store object open read-only
                assert exc.errno == errno.ETXTBSY, exc
        finally:
            os.close(fd)
    elif kind == "fallocate":
        fd = os.open(p, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, 1 << 20)
        except OSError as exc:
            assert exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS), exc
        finally:
            os.close(fd)
    elif kind == "copy_file_range":
        src = os.open(p.with_name("dup1.py"), os.O_RDONLY)
        dst = os.open(p, os.O_WRONLY)
        try:
            os.copy_file_range(src, dst, 1 << 16, 0, 0)
        finally:
            os.close(src)
            os.close(dst)
    elif kind == "unlink":
        os.unlink(p)


def object_state(store: Store) -> dict[str, tuple[str, int, int, int, int]]:
    out = {}
    for digest, path in store.iter_objects():
        st = path.stat()
        out[digest] = (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mode,
                       st.st_mtime_ns, st.st_nlink, st.st_uid)
    return out


@pytest.mark.parametrize("opens", ["kernel", "passthrough"])
def test_no_write_path_reaches_a_store_object(tmp_path: Path, opens: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COWFS_PASSTHROUGH", "0" if opens == "kernel" else "1")
    links = tmp_path / "links"
    links.mkdir()
    files = {f"victim/{k}.py": f"# pristine {k}\n".encode() * 50 for k in ATTACKS}
    files["victim/dup1.py"] = files["victim/dup2.py"] = b"SHARED = 1\n"  # one object
    build(links, files, name="victim", meta_extra="")
    venvs = [tmp_path / "a", tmp_path / "b"]
    try:
        for v in venvs:
            cowfs("venv", str(v))
            cowfs("install", "--venv", str(v), "victim==1.0", "--no-index", "--find-links",
                  str(links), "--no-compile")
        a, b = (VenvState.load(v) for v in venvs)
        store = Store(a.store)
        before = object_state(store)
        manifest = read_manifest(store, a.dists[0])
        by_path = {fe.path: fe.digest for fe in manifest.files}
        for kind in ATTACKS:
            target = a.site_packages / "victim" / f"{kind}.py"
            attack(kind, target)
            digest = by_path[f"victim/{kind}.py"]
            assert object_state(store)[digest] == before[digest], f"{kind} changed its object"
            assert os.stat(store.object_path(digest)).st_nlink == 1
        attack("rdwr", a.site_packages / "victim" / "dup1.py")
        assert object_state(store) == before
        if opens == "passthrough":
            assert "opens=passthrough " in cowfs("mounts").stdout
        for path, content in files.items():  # the other venv still sees pristine files
            assert (b.site_packages / path).read_bytes() == content, path
        assert (a.site_packages / "victim" / "dup2.py").read_bytes() == b"SHARED = 1\n"
        assert (a.site_packages / "victim" / "rdwr.py").read_bytes().startswith(b"EVIL")
        assert not (a.site_packages / "victim" / "unlink.py").exists()
        cowfs("store", "verify")
    finally:
        for v in venvs:
            unmount_venv(v)


def test_a_digest_cannot_substitute_content(tmp_path: Path) -> None:
    store = Store(tmp_path / "store").ensure()
    good = b"print('good')\n"
    digest = store.put_bytes(good)
    path = store.object_path(digest)
    st = path.stat()
    with pytest.raises(CollisionError):
        store.put_bytes(b"print('evil')\n", digest=digest)  # forged name of an existing object
    assert path.read_bytes() == good and path.stat().st_mtime_ns == st.st_mtime_ns
    other = digest_bytes(b"something else")
    with pytest.raises(CollisionError):  # forged name of an object not yet in the store
        store.put_bytes(b"print('evil')\n", digest=other)
    assert not store.has(other)
    for bad in ("../../escape", "0" * 31, "Z" * 32, ""):
        with pytest.raises(StoreError):
            store.put_bytes(b"x", digest=bad or "not-a-digest")
    assert not (tmp_path / "escape").exists()
    # An object corrupted on disk (or a crash leftover: a name whose data never reached the
    # disk) is never trusted as the copy of good content: the next write of that content
    # replaces it, as a new inode (whoever holds the old one open keeps it).
    for corrupt in (b"print('evil')\n", b""):
        old_ino = path.stat().st_ino
        os.chmod(path, 0o644)
        path.write_bytes(corrupt)
        assert store.put_bytes(good) == digest
        assert path.read_bytes() == good and stat.S_IMODE(path.stat().st_mode) == 0o444
        assert path.stat().st_ino != old_ino
    os.chmod(path, 0o644)
    path.write_bytes(b"")
    src = tmp_path / "good.py"
    src.write_bytes(good)
    assert store.put_file(src) == (digest, len(good)) and path.read_bytes() == good
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no side files left
    assert not list(store.tmp.iterdir())


# -- who may use a mount -------------------------------------------------------------------------


def mount_options(mp: Path) -> str:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mp):
            return line.split(" - ")[1].split()[2]
    raise AssertionError(f"{mp} is not mounted")


def generic_mount(base: Path, allow_other: bool) -> MountSpec:
    lower, mnt = base / "lower", base / "mnt"
    lower.mkdir(mode=0o755)
    mnt.mkdir(mode=0o755)
    (lower / "public.txt").write_text("public\n")
    (lower / "secret.txt").write_text("secret\n")
    (lower / "secret.txt").chmod(0o600)
    (lower / "dir").mkdir(mode=0o755)
    spec = MountSpec(mountpoint=str(mnt), upper=str(base / "upper"), work=str(base / "work"),
                     log=str(base / "daemon.log"), lowerdirs=[str(lower)],
                     allow_other=allow_other)
    mounting.mount(spec)
    return spec


def test_mounts_are_private_unless_asked(public_dir: Path) -> None:
    spec = generic_mount(public_dir, allow_other=False)
    assert "allow_other" not in mount_options(Path(spec.mountpoint))
    got = as_user(TRY + "mnt = sys.argv[1]\nprint(json.dumps({"
                  "'stat': attempt(lambda: os.stat(mnt)),"
                  "'list': attempt(lambda: os.listdir(mnt)),"
                  "'read': attempt(lambda: open(mnt + '/public.txt').read())}))",
                  spec.mountpoint)
    assert got == {"stat": "EACCES", "list": "EACCES", "read": "EACCES"}
    assert os.listdir(spec.mountpoint)  # root, the owner, is served


def test_venv_mount_is_private(public_dir: Path) -> None:
    venv = public_dir / "v"
    try:
        cowfs("venv", str(venv))
        site = VenvState.load(venv).site_packages
        assert "allow_other" not in mount_options(site)
        got = as_user(TRY + "print(json.dumps(attempt(lambda: os.listdir(sys.argv[1]))))",
                      str(site))
        assert got == "EACCES"
    finally:
        unmount_venv(venv)


def test_allow_other_still_enforces_permissions(public_dir: Path) -> None:
    spec = generic_mount(public_dir, allow_other=True)
    assert "allow_other" in mount_options(Path(spec.mountpoint))
    assert "default_permissions" in mount_options(Path(spec.mountpoint))
    got = as_user(TRY + """
mnt = sys.argv[1]
def write(name):
    with open(mnt + "/" + name, "r+") as f:
        f.write("x")
print(json.dumps({
    "read_public": attempt(lambda: open(mnt + "/public.txt").read()),
    "read_secret": attempt(lambda: open(mnt + "/secret.txt").read()),
    "write_public": attempt(lambda: write("public.txt")),
    "create": attempt(lambda: open(mnt + "/dir/new", "w").close()),
    "mkdir": attempt(lambda: os.mkdir(mnt + "/newdir")),
    "chmod": attempt(lambda: os.chmod(mnt + "/public.txt", 0o666)),
    "unlink": attempt(lambda: os.unlink(mnt + "/public.txt")),
    "rename": attempt(lambda: os.rename(mnt + "/public.txt", mnt + "/dir/p")),
    "setxattr": attempt(lambda: os.setxattr(mnt + "/public.txt", "user.x", b"1")),
    "utime": attempt(lambda: os.utime(mnt + "/public.txt")),
}))""", spec.mountpoint)
    assert got == {"read_public": "ok", "read_secret": "EACCES", "write_public": "EACCES",
                   "create": "EACCES", "mkdir": "EACCES", "chmod": "EPERM",
                   "unlink": "EACCES", "rename": "EACCES", "setxattr": "EACCES",
                   "utime": "EACCES"}
    upper = Path(spec.upper)
    assert sorted(p.name for p in upper.rglob("*")) == [], "a refused request copied up"
    assert (Path(spec.mountpoint) / "public.txt").read_text() == "public\n"


def test_control_socket_is_the_owners(public_dir: Path) -> None:
    spec = generic_mount(public_dir, allow_other=True)
    sock = spec.socket
    assert sock.stat().st_mode & 0o777 == 0o600
    got = as_user(TRY + """
import socket
def unmount():
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.sendall(b'{"op": "unmount"}\\n')
    s.recv(100)
print(json.dumps(attempt(unmount)))""", str(sock))
    assert got == "EACCES"
    assert mounting.mount_state(spec.mountpoint) == "live"


# -- the automount hook ----------------------------------------------------------------------------


def hook_constants(path: Path) -> dict[str, object]:
    tree = ast.parse(path.read_text())
    out: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = ast.literal_eval(node.value)
    calls = [n for n in tree.body if isinstance(n, ast.Expr)
             and not isinstance(n.value, ast.Constant)]
    assert len(calls) == 1 and ast.unparse(calls[0]) == "_mount()", "unexpected top-level code"
    return out


def test_automount_hook_runs_only_the_recorded_cowfs(tmp_path: Path) -> None:
    venv = tmp_path / "v"
    try:
        cowfs("venv", str(venv))
        state = VenvState.load(venv)
        cowfs("umount", str(venv))
        consts = hook_constants(state.site_packages / HOOK_MODULE)
        command = consts["COWFS"]
        assert consts["VENV"] == str(venv)
        assert isinstance(command, list) and command[1:] == ["-I", "-m", "cowfs"], command
        assert os.path.isabs(command[0]) and os.access(command[0], os.X_OK)
        assert command[0] == os.path.abspath(sys.executable)
        # A PATH and a PYTHONPATH full of impostors change nothing.
        marker = tmp_path / "impostor-ran"
        fake = tmp_path / "fake"
        (fake / "bin").mkdir(parents=True)
        for name in ("cowfs", "python", "python3", "fusermount3"):
            (fake / "bin" / name).write_text(f"#!/bin/sh\necho {name} \"$@\" >> {marker}\nexit 1\n")
            (fake / "bin" / name).chmod(0o755)
        (fake / "cowfs").mkdir()
        for mod in ("__init__.py", "__main__.py"):
            (fake / "cowfs" / mod).write_text(f"open({str(marker)!r}, 'a').write({mod!r})\n")
        env = dict(os.environ, PATH=f"{fake / 'bin'}:{os.environ['PATH']}",
                   PYTHONPATH=str(fake))
        proc = subprocess.run([str(venv / "bin" / "python"), "-c", "import sys; print('ok')"],
                              capture_output=True, text=True, env=env, cwd=fake)
        assert proc.stdout.strip() == "ok", proc.stderr
        assert not marker.exists(), marker.read_text()
        assert mounting.mount_state(str(state.site_packages)) == "live"
    finally:
        unmount_venv(venv)


@pytest.mark.parametrize("hostile", ["/tmp/x'; import os; os.system('touch /tmp/pwn') #",
                                     '/tmp/a"\nimport os\n', "/tmp/\u00fcn\u00ef c\u00f6de",
                                     "/tmp/back\\slash"])
def test_automount_hook_quotes_the_venv_path(tmp_path: Path, hostile: str) -> None:
    write_hook(tmp_path, Path(hostile))
    consts = hook_constants(tmp_path / HOOK_MODULE)
    assert consts["VENV"] == hostile
    assert (tmp_path / "_cowfs_automount.pth").read_text() == "import _cowfs_automount\n"
