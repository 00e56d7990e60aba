"""Every mount failure is one `cowfs: error: ...` line naming the cause and the fix.

Each cause is produced for real, never mocked: as an unprivileged user (setpriv) with
/dev/fuse 0600, and in private mount namespaces (`unshare -m`) where /dev is a fresh tmpfs,
/dev/fuse is our own node of the real device with the mode under test, /usr/bin/fusermount3
is missing or a copy without setuid, /etc/fuse.conf is a temporary file, or the mount point
lies on a filesystem fusermount3 refuses. The machine's files are never changed. Most causes
run twice: caught by the parent's preflight, and (COWFS_MOUNT_PREFLIGHT=0) translated from
what libfuse wrote to the daemon's log.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest

from cowfs.mount import mount as mounting
from tests.conftest import ensure_user, force_unmount, one_line_error, user_pythonpath

USER = "cowfs-mnt"
GROUP = "cowfs-fuse"
USER_PYTHON = "/usr/bin/python3"  # readable by the user, unlike the dev env under /root
SITE = str(Path(pyfuse3.__file__).resolve().parent.parent)  # pyfuse3, trio, click...
BOTH = pytest.mark.parametrize("preflight", ["1", "0"], ids=["preflight", "daemon-log"])

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mknod)")


class Area:
    """A world-readable scratch dir with a generic overlay (lower, upper, work, mnt)
    owned by the test user, and the commands to run cowfs in it."""

    def __init__(self, base: Path, uid: int, gid: int) -> None:
        self.base, self.uid, self.gid = base, uid, gid
        self.mnt = base / "mnt"
        os.chown(base, uid, gid)  # the generic mount's log goes next to the work dir
        for d in ("lower", "upper", "work", "mnt", "run", "home"):
            (base / d).mkdir(mode=0o755)
            os.chown(base / d, uid, gid)
        (base / "lower" / "f").write_text("lower\n")

    def mount_args(self, *extra: str) -> list[str]:
        b = self.base
        return ["mount", *extra, "-o",
                f"lowerdir={b}/lower,upperdir={b}/upper,workdir={b}/work", "x", str(self.mnt)]

    def run(self, args: list[str], setup: str = "", user: bool = True, preflight: str = "1",
            container: str = "0", wrap: list[str] | None = None, python: str | None = None,
            after: str = "") -> subprocess.CompletedProcess[str]:
        """`python -m cowfs ARGS` as the user (or root), after `setup` ran as root in a
        private mount namespace (when given), with `wrap` (setpriv options) in between;
        `after` runs as root in the namespace once the command is done."""
        py = python or (USER_PYTHON if user else sys.executable)
        cmd = [py, "-m", "cowfs", *args] if args[0] != "-c" else [py, *args]
        if user:
            wrap = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                    *(wrap or [])]
        cmd = [*(wrap or []), *cmd]
        env = dict(os.environ, PYTHONPATH=user_pythonpath(self.uid, self.gid, SITE),
                   COWFS_HOME=str(self.base / "home"),
                   COWFS_RUNTIME_DIR=str(self.base / "run"), COWFS_MOUNT_PREFLIGHT=preflight,
                   COWFS_CONTAINER=container, PATH="/usr/bin:/bin")
        if setup:
            script = (f"set -e\n{setup}\nset +e\n{shlex.join(cmd)}\nrc=$?\n{after}\nexit $rc"
                      if after else f"set -e\n{setup}\nexec {shlex.join(cmd)}")
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env,
                              cwd=str(self.base))


def device(base: Path, mode: int, group: str = "root") -> str:
    """Setup: our own node of the real FUSE device (c 10 229), with `mode`, over /dev/fuse."""
    node = base / f"fuse-{mode:o}"
    return (f"[ -e {node} ] || mknod -m {mode:o} {node} c 10 229\nchgrp {group} {node}\n"
            f"mount --bind {node} /dev/fuse")


@pytest.fixture(scope="module")
def ids() -> tuple[int, int]:
    if not os.path.exists(USER_PYTHON):
        pytest.skip(f"{USER_PYTHON} is needed to run cowfs as another user")
    probe = subprocess.run([USER_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                           capture_output=True, text=True)
    if probe.stdout.strip() != str(sys.version_info[:2]):
        pytest.skip(f"{USER_PYTHON} is not Python {sys.version_info[:2]} (extension ABI)")
    for tool in ("unshare", "setpriv", "mknod"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is needed")
    return ensure_user(USER)


@pytest.fixture
def area(ids: tuple[int, int]) -> Iterator[Area]:
    base = Path(tempfile.mkdtemp(prefix="cowfs-mnterr-", dir="/tmp"))
    base.chmod(0o755)  # the user must reach it
    a = Area(base, *ids)
    try:
        yield a
    finally:
        force_unmount(str(a.mnt))
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


def no_mount_left(a: Area) -> None:
    assert mounting.find_mount(str(a.mnt)) is None


# -- the control: the namespace setups themselves allow an unprivileged mount ----------------


def test_user_mounts_with_an_accessible_device(area: Area) -> None:
    """Proves the setup of the tests below: with /dev/fuse 0666 and a setuid fusermount3
    (the usual host), the user mounts; so each failure below is its stated cause. The mount
    lives in the namespace only, and is unmounted in it before the namespace ends."""
    proc = area.run(area.mount_args(), setup=device(area.base, 0o666),
                    after=f"setpriv --reuid={area.uid} --regid={area.gid} --clear-groups "
                          f"cat {area.mnt}/f; "
                          f"fusermount3 -u {area.mnt}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("mounted") and "lower\n" in proc.stdout, proc.stdout
    no_mount_left(area)  # the mount lived in the namespace only


# -- no access to /dev/fuse ---------------------------------------------------------------------


@BOTH
def test_device_not_accessible_to_the_user(area: Area, preflight: str) -> None:
    """`cowfs venv` as a user where /dev/fuse is root's only (0600, as on many hosts), then
    the venv's automount hook and `cowfs mount`: the same line, naming mode and fix."""
    real = os.stat("/dev/fuse").st_mode
    setup = "" if real & 0o006 == 0 else device(area.base, 0o600)  # the real one if 0600
    venv = area.base / "home" / "v"
    proc = area.run(["venv", str(venv)], setup=setup, preflight=preflight)
    site = next((venv / "lib").glob("python3*/site-packages"))
    want = (f"cannot mount {site}: cowfs-mnt (uid {area.uid}) may not open /dev/fuse "
            "(crw------- root:root); as root: chmod 0666 /dev/fuse (its usual mode, which a "
            "udev rule keeps), or mount as root")
    one_line_error(proc, want)
    # The venv stays for a later `cowfs mount`; no gc root stays for a venv that never ran.
    assert not list((area.base / "home" / "roots").glob("*.json"))
    one_line_error(area.run(["mount", str(venv)], setup=setup, preflight=preflight), want)
    # The .pth hook: a plain `python` start in the unmounted venv says it in one line.
    hook = area.run(["-c", "print('started')"], setup=setup, preflight=preflight,
                    python=str(venv / "bin" / "python"))
    assert hook.returncode == 0 and hook.stdout == "started\n", hook
    assert hook.stderr.count("\n") == 1 and want in hook.stderr, hook.stderr
    assert mounting.find_mount(str(site)) is None


def test_device_group_names_the_group(area: Area) -> None:
    if subprocess.run(["getent", "group", GROUP], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", "--system", GROUP], check=True, capture_output=True)
    proc = area.run(area.mount_args(), setup=device(area.base, 0o660, GROUP))
    one_line_error(proc, f"may not open /dev/fuse (crw-rw---- root:{GROUP}); as root: "
                         f"usermod -aG {GROUP} cowfs-mnt, then log in again")


# -- no /dev/fuse at all ------------------------------------------------------------------------

NO_DEV = "mount -t tmpfs -o mode=0755 none /dev\nmknod -m 0666 /dev/null c 1 3"


@BOTH
def test_no_device_on_a_host(area: Area, preflight: str) -> None:
    proc = area.run(area.mount_args(), setup=NO_DEV, user=False, preflight=preflight)
    # The kernel here has FUSE (built in or loaded), so the node alone is missing.
    one_line_error(proc, f"cannot mount {area.mnt}: /dev/fuse does not exist, although the "
                         "kernel has FUSE; as root: mknod -m 0666 /dev/fuse c 10 229")


@BOTH
def test_no_device_in_a_container(area: Area, preflight: str) -> None:
    proc = area.run(area.mount_args(), setup=NO_DEV, user=False, preflight=preflight,
                    container="1")
    one_line_error(proc, f"cannot mount {area.mnt}: this container has no /dev/fuse; run the "
                         "container with --device /dev/fuse --cap-add SYS_ADMIN")


# -- fusermount3 (how users mount) --------------------------------------------------------------


def _usr_bin_without_fusermount(base: Path) -> str:
    """Setup: /usr/bin as a tmpfs of symlinks to the real one, minus fusermount3 (/bin and
    PATH lead there too; libfuse tries /usr/bin/fusermount3, then PATH)."""
    real, farm = base / "usr-bin", base / "farm"
    return (f"mkdir -p {real} {farm}\nmount --bind /usr/bin {real}\n"
            f"for f in {real}/* ; do ln -s \"$f\" {farm}/ ; done\nrm {farm}/fusermount3\n"
            f"mount -t tmpfs -o mode=0755 none /usr/bin\n{real}/cp -a {farm}/. /usr/bin/")


@BOTH
def test_fusermount_missing(area: Area, preflight: str) -> None:
    setup = device(area.base, 0o666) + "\n" + _usr_bin_without_fusermount(area.base)
    proc = area.run(area.mount_args(), setup=setup, preflight=preflight)
    one_line_error(proc, f"cannot mount {area.mnt}: cowfs-mnt (uid {area.uid}) mounts through "
                         "the setuid helper fusermount3, which is not installed; as root: "
                         "apt-get install fuse3")


@BOTH
def test_fusermount_not_setuid(area: Area, preflight: str) -> None:
    copy = area.base / "fusermount3"
    shutil.copyfile("/usr/bin/fusermount3", copy)
    copy.chmod(0o755)  # what a copy without -p gets: no setuid bit
    setup = device(area.base, 0o666) + f"\nmount --bind {copy} /usr/bin/fusermount3"
    proc = area.run(area.mount_args(), setup=setup, preflight=preflight)
    one_line_error(proc, "/usr/bin/fusermount3 is not setuid root (-rwxr-xr-x root:root); as "
                         "root: chmod u+s /usr/bin/fusermount3 (or apt-get install --reinstall "
                         "fuse3)")


def test_fusermount_on_a_nosuid_filesystem(area: Area) -> None:
    nosuid = area.base / "nosuid"
    nosuid.mkdir()
    setup = (device(area.base, 0o666) + f"\nmount -t tmpfs -o nosuid none {nosuid}\n"
             f"cp -a /usr/bin/fusermount3 {nosuid}/\n"
             f"mount --bind {nosuid}/fusermount3 /usr/bin/fusermount3")
    proc = area.run(area.mount_args(), setup=setup)
    one_line_error(proc, "/usr/bin/fusermount3 is on a nosuid filesystem, where setuid does "
                         "not work")


def test_no_new_privs(area: Area) -> None:
    proc = area.run(area.mount_args(), setup=device(area.base, 0o666), wrap=["--no-new-privs"])
    one_line_error(proc, "but this process runs with no_new_privs, which disables setuid")


# -- allow_other without user_allow_other -------------------------------------------------------


@BOTH
def test_allow_other_without_user_allow_other(area: Area, preflight: str) -> None:
    conf = area.base / "fuse.conf"
    conf.write_text("# user_allow_other\nmount_max = 1000\n")
    setup = device(area.base, 0o666) + f"\nmount --bind {conf} /etc/fuse.conf"
    proc = area.run(area.mount_args("--allow-other"), setup=setup, preflight=preflight)
    one_line_error(proc, f"cannot mount {area.mnt}: allow_other was asked for, and "
                         "/etc/fuse.conf lacks the line user_allow_other that fusermount3 "
                         "needs to grant it to a user other than root; as root: echo "
                         "user_allow_other >> /etc/fuse.conf (or mount without --allow-other)")
    # With the line, the same mount works (and is unmounted inside the namespace).
    conf.write_text("user_allow_other\n")
    ok = area.run(area.mount_args("--allow-other"), setup=setup, preflight=preflight,
                  after=f"fusermount3 -u {area.mnt}")
    assert ok.returncode == 0, ok.stderr
    no_mount_left(area)


# -- the mount point ------------------------------------------------------------------------------


def test_mount_point_already_mounted(area: Area) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "busy-tmpfs", str(area.mnt)], check=True)
    try:
        proc = area.run(area.mount_args(), user=False)
        one_line_error(proc, f"cannot mount {area.mnt}: it is busy (already a mount point: "
                             f"tmpfs from busy-tmpfs); unmount what is there first (umount "
                             f"{area.mnt}) or choose another directory")
    finally:
        subprocess.run(["umount", str(area.mnt)], check=True)


def test_mount_point_on_a_filesystem_fusermount_refuses(area: Area) -> None:
    """fusermount3 mounts for users only over a list of disk and network filesystems."""
    huge = area.base / "huge"
    huge.mkdir()
    setup = (device(area.base, 0o666) + f"\nmount -t hugetlbfs -o uid={area.uid},gid="
             f"{area.gid},mode=0755 none {huge}\nsetpriv --reuid={area.uid} mkdir {huge}/mnt")
    args = area.mount_args()
    args[-1] = str(huge / "mnt")
    proc = area.run(args, setup=setup)
    one_line_error(proc, f"cannot mount {huge}/mnt: fusermount3 lets users mount only on "
                         "common disk and network filesystems, not on hugetlbfs (0x958458f6)")


# -- mount(2) denied: no CAP_SYS_ADMIN ----------------------------------------------------------

NO_ADMIN = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin"]


@BOTH
def test_root_without_cap_sys_admin_in_a_container(area: Area, preflight: str) -> None:
    """docker run without --cap-add SYS_ADMIN: root, but mount(2) says EPERM (and the
    setuid fusermount3 cannot gain what the bounding set lacks)."""
    proc = area.run(area.mount_args(), user=False, wrap=NO_ADMIN, preflight=preflight,
                    container="1")
    one_line_error(proc, f"cannot mount {area.mnt}: the container lacks CAP_SYS_ADMIN, which "
                         "mounting needs; run the container with --device /dev/fuse --cap-add "
                         "SYS_ADMIN")


def test_root_without_cap_sys_admin_on_a_host(area: Area) -> None:
    proc = area.run(area.mount_args(), user=False, wrap=NO_ADMIN, preflight="0")
    one_line_error(proc, "mounting needs CAP_SYS_ADMIN, and this process cannot gain it (it is "
                         "not in its capability bounding set)")
