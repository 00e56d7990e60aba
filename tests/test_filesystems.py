"""Stores and upper layers on other filesystems (issue 9): ext4, NTFS (ntfs-3g), btrfs, xfs
and tmpfs, each a small sparse loop image (or tmpfs) mounted once for the module.

For every filesystem, with the venv's upper layer on it ("upper") and with the store on it
("store"): the two-projects scenario through the real CLI, and a short run of the
differential state machine of test_differential (mount vs a plain directory on the host).
NTFS, which keeps no POSIX modes or owners, gets its own checks that cowfs keeps them (and
that the kernel enforces them), that whiteouts and modes survive a remount, and that a
filesystem with neither user xattrs nor modes is refused in one sentence. On btrfs and xfs
a copy-up of a 100 MB file must be a reflink: its extents are shared with the lower file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from cowfs.cli import main as cli_main
from cowfs.mount import mount as mounting
from cowfs.mount.spec import VenvState
from cowfs.overlay import meta
from cowfs.overlay.upper import RENAME_EXCHANGE, WHITEOUT_XATTR, renameat2
from cowfs.store.store import Store, digest_bytes
from tests import fsimages
from tests.conftest import (
    EDITED,
    PKG,
    UDDER,
    OverlayMount,
    cow,
    fingerprint,
    force_unmount,
    object_hashes,
    populate,
    unmount_venv,
)

FSTYPE = {"ext4": "ext4", "ntfs": "fuse", "btrfs": "btrfs", "xfs": "xfs", "tmpfs": "tmpfs"}
PLACEMENTS = ["upper", "store"]
# Short, and no shrinking: a failure prints its steps without minutes of replays.
# COWFS_DIFF_PROFILE=thorough (as for test_differential) runs many more, with shrinking.
THOROUGH = os.environ.get("COWFS_DIFF_PROFILE") == "thorough"
SHORT_RUN = settings(max_examples=40 if THOROUGH else 2,
                     stateful_step_count=80 if THOROUGH else 30, deadline=None,
                     derandomize=not THOROUGH, database=None,
                     suppress_health_check=list(HealthCheck),
                     phases=list(Phase) if THOROUGH else [Phase.explicit, Phase.reuse,
                                                          Phase.generate])


# -- fixtures -------------------------------------------------------------------------------


class Images:
    """One mounted image per filesystem kind for the whole module, made on first use."""

    def __init__(self) -> None:
        self.base = fsimages.traversable_base()
        self.made: dict[str, fsimages.FsImage | str] = {}

    def get(self, kind: str) -> fsimages.FsImage:
        if kind not in self.made:
            try:
                self.made[kind] = fsimages.mounted(kind, self.base)
            except fsimages.Unavailable as exc:
                self.made[kind] = str(exc)
        got = self.made[kind]
        if isinstance(got, str):
            pytest.skip(got)
        return got

    def close(self) -> None:
        for fs in self.made.values():
            if not isinstance(fs, str):
                fsimages.release(fs)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def images() -> Iterator[Images]:
    imgs = Images()
    try:
        yield imgs
    finally:
        imgs.close()


@pytest.fixture(params=fsimages.FILESYSTEMS)
def fs(request: pytest.FixtureRequest, images: Images) -> fsimages.FsImage:
    return images.get(request.param)


@pytest.fixture
def scratch(request: pytest.FixtureRequest) -> Callable[[fsimages.FsImage], Path]:
    """A fresh directory on a filesystem image, removed after the test."""
    made: list[Path] = []

    def make(fs: fsimages.FsImage) -> Path:
        d = fs.root / f"t-{len(made)}-{os.urandom(4).hex()}"
        d.mkdir()
        made.append(d)
        return d

    yield make
    for d in made:
        for mp in fsimages._mounts_below(d):
            force_unmount(mp)
        shutil.rmtree(d, ignore_errors=True)


def cli(*args: str) -> str:
    """The real command line, in process (the mount daemons are real processes)."""
    result = CliRunner().invoke(cli_main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, f"cowfs {' '.join(args)}: {result.output}"
    return result.stdout


def cowfs_parallel(*commands: list[str]) -> None:
    """Independent CLI commands at once, as separate processes (two cores, half the wait)."""
    procs = [subprocess.Popen([sys.executable, "-m", "cowfs", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in commands]
    for args, proc in zip(commands, procs, strict=True):
        _, err = proc.communicate()
        assert proc.returncode == 0, f"cowfs {' '.join(args)}: {err}"


def cli_fails(*args: str) -> str:
    result = CliRunner().invoke(cli_main, list(args), catch_exceptions=False)
    assert result.exit_code == 1, result.output
    return result.stderr


# -- the two-projects scenario ----------------------------------------------------------------


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_two_projects(fs: fsimages.FsImage, placement: str, tmp_path: Path, images: Images,
                      scratch: Callable[[fsimages.FsImage], Path], wheels: Path,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A edits its installed main.py; B, the store and a new C stay pristine. "upper": A and
    C live on the filesystem, the store and B on the host (copy-up across filesystems);
    "store": the store and A on it (same filesystem), B and C on the host."""
    on, host = scratch(fs), tmp_path
    store_dir = (on if placement == "store" else host) / "store"
    monkeypatch.setenv("COWFS_HOME", str(store_dir))
    # The base interpreter's cache entry from an earlier scenario (checked against its stat
    # fingerprint like any entry): one interpreter query less for each venv.
    warm = images.base / "warm-interpreters"
    if warm.is_dir():
        shutil.copytree(warm, store_dir / "interpreters")
    where = {"A": on, "B": host, "C": on if placement == "upper" else host}
    venvs = {name: where[name] / name / ".venv" for name in "ABC"}
    install = ["install", "-q", PKG, "--no-index", "--find-links", str(wheels), "--venv"]
    try:
        # C is made now but gets pycowsay only after A's edit.
        cowfs_parallel(*(["venv", str(v)] for v in venvs.values()))
        cowfs_parallel([*install, str(venvs["A"])], [*install, str(venvs["B"])])
        a, b = venvs["A"], venvs["B"]
        store = Store()
        before = object_hashes(store)
        assert before and all(d == h for d, h in before.items())
        main_a = VenvState.load(a).site_packages / "pycowsay" / "main.py"
        main_a.write_text(main_a.read_text().replace(UDDER, EDITED))
        assert cow(a) == EDITED
        assert cow(b) == UDDER
        assert object_hashes(store) == before, "the store is byte-identical"
        assert (a / ".cowfs" / "upper" / "pycowsay" / "main.py").read_text().count(EDITED) == 1
        # Through the mount the copied-up file keeps its pristine mode, whatever the upper
        # filesystem holds (ntfs-3g: 0777 for everything).
        assert stat.S_IMODE(main_a.stat().st_mode) == 0o644
        cli(*install, str(venvs["C"]))
        c_main = VenvState.load(venvs["C"]).site_packages / "pycowsay" / "main.py"
        assert cow(venvs["C"]) == UDDER
        assert store.has(digest_bytes(c_main.read_bytes()))
        # The probed capabilities, as status (venv upper fs) and store info show them.
        status = json.loads(cli("status", "--venv", str(a), "--json"))
        upper_fs = status["upper_filesystem"]
        assert upper_fs["fstype"] == FSTYPE[fs.kind] and upper_fs["refused"] is None
        assert [c["path"] for g in status["groups"] for c in g["changes"]
                if c["kind"] == "modified"] == ["pycowsay/main.py"]
        info = json.loads(cli("store", "info", "--json"))
        if placement == "store":
            assert info["filesystem"]["fstype"] == FSTYPE[fs.kind]
            assert info["filesystem"]["reflink"] == (fs.kind in ("btrfs", "xfs"))
        if fs.kind == "ntfs" and where["A"] == on:
            assert upper_fs["modes"] is False and "user.cowfs.meta" in upper_fs["metadata"]
            assert "upper fs" in cli("status", "--venv", str(a))
        if not warm.is_dir():
            shutil.copytree(store_dir / "interpreters", warm)
    finally:
        for venv in venvs.values():
            unmount_venv(venv)


# -- the differential state machine ------------------------------------------------------------


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_differential_short_run(fs: fsimages.FsImage, placement: str, tmp_path: Path,
                                scratch: Callable[[fsimages.FsImage], Path],
                                overlay_mount: Callable[..., OverlayMount]) -> None:
    """test_differential's machine: "upper" puts the upper/work dirs on the filesystem (the
    lower on the host), "store" the lower layer; the plain reference stays on the host."""
    from tests.test_differential import OverlayVsPlain, bottom_layer

    on = scratch(fs)
    lower_base = on if placement == "store" else tmp_path
    upper_base = on if placement == "upper" else tmp_path / "uppers"
    layers = [bottom_layer(lower_base / "lower")]
    before = [fingerprint(layer) for layer in layers]

    def make(*lower: Path, name: str = "mnt") -> OverlayMount:
        om = overlay_mount(*lower, upper_base=upper_base, name=name)
        # The root shows the upper dir's attributes (as with overlayfs); the plain reference
        # copied the lower root's (ntfs-3g: 0777).
        os.chmod(om.mnt, stat.S_IMODE(lower[0].stat().st_mode))
        return om

    refs = tmp_path / "refs"
    refs.mkdir()
    OverlayVsPlain.make_mount = staticmethod(make)  # type: ignore[assignment]
    OverlayVsPlain.layers = layers
    OverlayVsPlain.base = refs
    OverlayVsPlain.counter = 0
    run_state_machine_as_test(OverlayVsPlain, settings=SHORT_RUN)
    assert OverlayVsPlain.counter > 0
    assert [fingerprint(layer) for layer in layers] == before, "a lower layer was modified"


# -- NTFS: metadata cowfs keeps itself ---------------------------------------------------------


def _as_user(uid: int, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                           *cmd], capture_output=True, text=True)


def test_ntfs_keeps_modes_owners_and_whiteouts_across_remount(
        images: Images, tmp_path: Path, scratch: Callable[[fsimages.FsImage], Path],
        overlay_mount: Callable[..., OverlayMount]) -> None:
    ntfs = images.get("ntfs")
    on = scratch(ntfs)
    lower = tmp_path / "lower"
    lower.mkdir()
    populate(lower)
    (lower / "secret.txt").write_text("root only\n")
    (lower / "gone").mkdir()
    (lower / "gone" / "x").write_text("x\n")
    mnt_base = images.base / f"mnt-{os.urandom(3).hex()}"  # traversable for another user
    mnt_base.mkdir(mode=0o755)
    try:
        om = overlay_mount(lower, upper_base=on, allow_other=True, mnt_base=mnt_base)
        m = om.mnt
        os.chmod(m / "pkg" / "main.py", 0o640)  # copy-up of a lower file
        os.chown(m / "pkg" / "main.py", 1234, 5678)
        os.chmod(m / "secret.txt", 0o600)
        fd = os.open(m / "new.txt", os.O_CREAT | os.O_WRONLY, 0o604)
        os.write(fd, b"new\n")
        os.close(fd)
        os.mkdir(m / "newdir", 0o750)
        os.mkfifo(m / "newdir" / "fifo", 0o640)
        os.symlink("../top.txt", m / "newdir" / "link")
        os.utime(m / "top.txt", ns=(1_500_000_000_123_456_789,) * 2)
        os.unlink(m / "pkg" / "__init__.py")  # whiteouts: a file, a directory, a rename
        shutil.rmtree(m / "gone")
        os.rename(m / "tool.sh", m / "newdir" / "tool.sh")
        renameat2(str(m / "pkg" / "sub"), str(m / "newdir"), RENAME_EXCHANGE)

        def check() -> None:
            def mode(p: str) -> int:
                return stat.S_IMODE((m / p).lstat().st_mode)

            st = (m / "pkg" / "main.py").stat()
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1234, 5678)
            assert (m / "pkg" / "main.py").read_text() == "def main():\n    return 'moo'\n"
            assert mode("secret.txt") == 0o600 and mode("new.txt") == 0o604
            assert mode("pkg/sub") == 0o750  # the exchanged directories
            assert stat.S_ISFIFO((m / "pkg" / "sub" / "fifo").lstat().st_mode)
            assert mode("pkg/sub/fifo") == 0o640
            assert os.readlink(m / "pkg" / "sub" / "link") == "../top.txt"
            assert mode("pkg/sub/tool.sh") == 0o755
            assert (m / "newdir" / "data.bin").stat().st_size == 256 * 64
            assert (m / "top.txt").stat().st_mtime_ns == 1_500_000_000_123_456_789
            for gone in ("pkg/__init__.py", "gone", "tool.sh"):
                assert not os.path.lexists(m / gone), gone
            assert sorted(os.listdir(m / "pkg")) == ["empty", "link", "main.py", "sub"]

        check()
        # What is on the NTFS upper itself: everything 0777, the truth in user.cowfs.meta.
        raw = om.upper / "pkg" / "main.py"
        assert stat.S_IMODE(raw.stat().st_mode) == 0o777
        assert os.getxattr(raw, meta.META_XATTR).startswith(b"1 100640 1234 5678")
        assert os.getxattr(om.upper / "pkg" / "__init__.py", WHITEOUT_XATTR) == b"y"
        # The kernel enforces the kept modes (default_permissions asks getattr).
        assert _as_user(4321, "cat", str(m / "top.txt")).stdout == "top\n"
        denied = _as_user(4321, "cat", str(m / "secret.txt"))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        # The private xattr can be neither read nor forged through the mount.
        assert meta.META_XATTR not in os.listxattr(m / "pkg" / "main.py")
        with pytest.raises(OSError) as exc:
            os.setxattr(m / "secret.txt", meta.META_XATTR, b"1 104777 0 0")
        assert exc.value.errno == errno.EPERM
        # `cp -p` and `sed -i` set modes as an ACL xattr, which ntfs-3g ignores too.
        subprocess.run(["cp", "-p", str(m / "secret.txt"), str(m / "copy.txt")], check=True)
        assert stat.S_IMODE((m / "copy.txt").stat().st_mode) == 0o600
        force_unmount(str(m))
        om = overlay_mount(lower, upper_base=on, allow_other=True, mnt_base=mnt_base)
        check()
        assert stat.S_IMODE((m / "copy.txt").stat().st_mode) == 0o600
    finally:
        force_unmount(str(mnt_base / "ov-mnt" / "mnt"))


def test_interrupted_directory_whiteout_is_finished_at_mount(
        images: Images, tmp_path: Path, scratch: Callable[[fsimages.FsImage], Path],
        overlay_mount: Callable[..., OverlayMount]) -> None:
    """Without RENAME_EXCHANGE (ntfs-3g) a directory becomes a whiteout in two renames; a
    daemon killed between them left an intent in the work dir: the next mount finishes it."""
    ntfs = images.get("ntfs")
    assert not meta.can_exchange(str(ntfs.root))
    on = scratch(ntfs)
    lower = tmp_path / "lower"
    lower.mkdir()
    populate(lower)
    om = overlay_mount(lower, upper_base=on)
    (om.mnt / "pkg" / "sub" / "data.bin").unlink()
    os.rmdir(om.mnt / "pkg" / "sub")
    assert os.getxattr(om.upper / "pkg" / "sub", WHITEOUT_XATTR) == b"y"
    force_unmount(str(om.mnt))
    # The state right after the first rename: the upper dir moved away, no whiteout yet.
    os.unlink(om.upper / "pkg" / "sub")
    (om.work / f"intent-{os.urandom(16).hex()}").write_bytes(b"whiteout\0pkg/sub")
    om = overlay_mount(lower, upper_base=on)
    assert not os.path.lexists(om.mnt / "pkg" / "sub")
    assert not [p for p in os.listdir(om.work) if p.startswith("intent-")]


def test_interrupted_exchange_is_finished_at_mount(
        images: Images, scratch: Callable[[fsimages.FsImage], Path]) -> None:
    """The emulated RENAME_EXCHANGE, killed after its first rename: the next Upper (mount)
    completes it from the intent, whichever step it stopped at."""
    from cowfs.overlay.upper import Upper

    on = scratch(images.get("ntfs"))
    for stopped_after in (1, 2):
        base = on / f"x{stopped_after}"
        upper, work = base / "upper", base / "work"
        (upper / "d").mkdir(parents=True)
        work.mkdir()
        (upper / "a").write_text("a\n")
        (upper / "d" / "b").write_text("b\n")
        tmp = f"xchg-{os.urandom(16).hex()}"
        (work / f"intent-{os.urandom(16).hex()}").write_bytes(
            "\0".join(["exchange", "a", "d/b", tmp]).encode())
        os.rename(upper / "a", work / tmp)
        if stopped_after == 2:
            os.rename(upper / "d" / "b", upper / "a")
        Upper(str(upper), str(work))
        assert (upper / "a").read_text() == "b\n" and (upper / "d" / "b").read_text() == "a\n"
        assert sorted(os.listdir(work)) == []


def test_metadata_records_and_acl_modes() -> None:
    rec = meta.Record(stat.S_IFREG | 0o4755, 12, None, (1, 1_500_000_000_123_456_789, 5))
    assert meta.Record.decode(rec.encode()) == rec
    assert meta.Record.decode(b"garbage") is None and meta.Record.decode(b"1 x - -") is None
    # user::rw- group::r-- other::r-- (what sed -i writes), then with a mask r-x
    acl = bytes.fromhex("02000000" "01000600ffffffff" "04000400ffffffff" "20000400ffffffff")
    assert meta.mode_from_acl(acl) == 0o644
    masked = acl[:-8] + bytes.fromhex("10000500ffffffff") + acl[-8:]
    assert meta.mode_from_acl(masked) == 0o654
    assert meta.mode_from_acl(b"\x02\0\0\0\x01\0") is None


def test_filesystem_without_xattrs_or_modes_is_refused(images: Images,
                                                       tmp_path: Path) -> None:
    """ntfs-3g with streams_interface=none has neither user xattrs nor modes."""
    images.get("ntfs")  # skips where ntfs-3g is unavailable
    try:
        bare = fsimages.mounted("ntfs", images.base, ["streams_interface=none"], size_mb=8)
    except fsimages.Unavailable as exc:
        pytest.skip(str(exc))
    try:
        venv = bare.root / "proj" / ".venv"
        err = cli_fails("venv", str(venv))
        assert err.count("\n") == 1 and "cannot hold a cowfs upper layer" in err
        assert "user xattrs or POSIX modes" in err
        assert not (bare.root / "proj").exists(), "nothing is left behind"
        lower = tmp_path / "lower"
        lower.mkdir()
        (bare.root / "u").mkdir()
        (bare.root / "w").mkdir()
        (tmp_path / "mnt").mkdir()
        err = cli_fails("mount", "-o", f"lowerdir={lower},upperdir={bare.root}/u,"
                        f"workdir={bare.root}/w", "cowfs", str(tmp_path / "mnt"))
        assert "user xattrs or POSIX modes" in err
        assert mounting.find_mount(str(tmp_path / "mnt")) is None
    finally:
        fsimages.release(bare)


# -- reflink copy-up ---------------------------------------------------------------------------

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000


def shared_bytes(path: Path) -> int:
    """Bytes of the file in extents the filesystem reports as shared (FIEMAP)."""
    total, start, batch = 0, 0, 64
    with open(path, "rb") as f:
        while True:
            buf = bytearray(struct.pack("QQIIII", start, 2**64 - 1 - start, FIEMAP_FLAG_SYNC,
                                        0, batch, 0) + bytes(56 * batch))
            fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, buf)
            mapped = struct.unpack_from("I", buf, 20)[0]
            if mapped == 0:
                return total
            for i in range(mapped):
                logical, _, length = struct.unpack_from("QQQ", buf, 32 + 56 * i)
                flags = struct.unpack_from("I", buf, 32 + 56 * i + 40)[0]
                if flags & FIEMAP_EXTENT_SHARED:
                    total += length
                if flags & FIEMAP_EXTENT_LAST:
                    return total
                start = logical + length


@pytest.mark.parametrize("kind", ["btrfs", "xfs"])
def test_copy_up_is_a_reflink_on_the_same_filesystem(
        kind: str, images: Images, scratch: Callable[[fsimages.FsImage], Path],
        overlay_mount: Callable[..., OverlayMount]) -> None:
    fs = images.get(kind)
    on = scratch(fs)
    lower = on / "lower"
    lower.mkdir()
    chunk = os.urandom(1 << 20)
    with open(lower / "big.bin", "wb") as f:
        for _ in range(100):
            f.write(chunk)
        os.fsync(f.fileno())
    assert shared_bytes(lower / "big.bin") == 0
    om = overlay_mount(lower, upper_base=on)
    started = time.perf_counter()
    with open(om.mnt / "big.bin", "r+b") as f:  # opening for write copies up
        copy_up_seconds = time.perf_counter() - started
        f.seek(0, os.SEEK_END)
        f.write(b"tail")
    upper = om.upper / "big.bin"
    assert upper.stat().st_size == (100 << 20) + 4
    # Deterministic: all but the rewritten last block still share the lower's extents.
    assert shared_bytes(upper) >= (100 << 20) - (1 << 20), "copy-up did not reflink"
    assert shared_bytes(lower / "big.bin") >= (100 << 20) - (1 << 20)
    with open(om.mnt / "big.bin", "rb") as f:
        f.seek(99 << 20)
        assert f.read() == chunk + b"tail"
    print(f"{kind}: copy-up of 100 MB by reflink took {copy_up_seconds * 1000:.1f} ms")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
