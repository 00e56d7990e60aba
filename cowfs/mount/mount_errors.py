"""Why a FUSE mount fails, said in one line that names the cause and the fix.

Two halves sharing one set of facts about this process (`Facts`):

* `preflight(spec)` runs in the parent before a daemon is started and checks what is cheap
  to see: the device (/dev/fuse exists and opens), the way libfuse will mount (mount(2)
  directly with CAP_SYS_ADMIN, else through the setuid helper fusermount3) and, for an
  unprivileged allow_other, /etc/fuse.conf.
* `explain(lines, mountpoint)` translates what libfuse and fusermount3 wrote to the daemon's
  stderr (its log) when the mount failed anyway: a busy mount point, a filesystem that
  fusermount3 refuses, a security profile that denies mount(2).

Inside a container the fix is a `docker run` flag, on a host a command to run as root.
COWFS_MOUNT_PREFLIGHT=0 skips the preflight, so that the translation can be tested alone;
COWFS_CONTAINER=0/1 says whether this is a container where the markers are wrong.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import re
import shutil
import stat
from dataclasses import dataclass
from functools import cached_property

DEVICE = "/dev/fuse"
FUSE_CONF = "/etc/fuse.conf"
# libfuse execs FUSERMOUNT_DIR/fusermount3 (compiled in: /usr/bin on Debian, Fedora, Arch)
# before it looks on PATH, so a copy earlier on PATH does not change what runs.
FUSERMOUNT_DIRS = ("/usr/bin",)
CAP_SYS_ADMIN = 21
DOCKER_FLAGS = "--device /dev/fuse --cap-add SYS_ADMIN"
# fusermount3's statfs magic numbers for the filesystem types it refuses to mount over.
FS_MAGIC = {0x958458F6: "hugetlbfs", 0x9FA0: "proc", 0x62656572: "sysfs", 0x1CD1: "devpts",
            0x27E0EB: "cgroup", 0x63677270: "cgroup2", 0x64626720: "debugfs",
            0x74726163: "tracefs", 0xCAFE4A11: "bpf", 0x19800202: "mqueue", 0x1021997: "9p"}


@dataclass
class Facts:
    """What decides how libfuse mounts here and which fix applies."""

    status: dict[str, str]

    @classmethod
    def here(cls) -> Facts:
        status: dict[str, str] = {}
        with contextlib.suppress(OSError), open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                status[key] = value.strip()
        return cls(status)

    def _cap(self, field: str) -> bool:
        try:
            return bool(int(self.status.get(field, "0"), 16) >> CAP_SYS_ADMIN & 1)
        except ValueError:
            return False

    @property
    def direct(self) -> bool:
        """libfuse calls mount(2) itself only with CAP_SYS_ADMIN; else fusermount3 does."""
        return self._cap("CapEff")

    @property
    def can_gain_admin(self) -> bool:
        """A setuid-root fusermount3 gets at most the bounding set, and nothing at all
        under no_new_privs."""
        return self._cap("CapBnd")

    @property
    def no_new_privs(self) -> bool:
        return self.status.get("NoNewPrivs", "0") == "1"

    @cached_property
    def in_container(self) -> bool:
        # COWFS_CONTAINER=0/1 overrides the markers, which a VM image made from a container
        # image keeps. Else Docker's and podman's marker files, and the systemd/podman
        # `container=` variable.
        forced = os.environ.get("COWFS_CONTAINER")
        if forced in ("0", "1"):
            return forced == "1"
        return (os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv")
                or bool(os.environ.get("container")))  # noqa: SIM112

    @property
    def user(self) -> str:
        uid = os.geteuid()
        try:
            return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
        except KeyError:
            return f"uid {uid}"

    def security_profiles(self) -> list[tuple[str, str]]:
        """(docker flag, what is active) for the AppArmor profile and seccomp filter."""
        flags: list[tuple[str, str]] = []
        for attr in ("/proc/self/attr/apparmor/current", "/proc/self/attr/current"):
            with contextlib.suppress(OSError), open(attr) as f:
                profile = f.read().strip("\0\n ")
                if profile and not profile.startswith("unconfined"):
                    flags.append(("--security-opt apparmor=unconfined", f"AppArmor: {profile}"))
                break
        if self.status.get("Seccomp") == "2":
            flags.append(("--security-opt seccomp=unconfined", "a seccomp filter is active"))
        return flags


def fusermount() -> str | None:
    """The fusermount3 that libfuse will exec."""
    for d in FUSERMOUNT_DIRS:
        path = os.path.join(d, "fusermount3")
        if os.access(path, os.X_OK):
            return path
    return shutil.which("fusermount3")


def _owner(st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group}"


# -- the causes ------------------------------------------------------------------------------


def no_device(f: Facts) -> str:
    if f.in_container:
        return f"this container has no {DEVICE}; run the container with {DOCKER_FLAGS}"
    with contextlib.suppress(OSError), open("/proc/filesystems") as fs:
        if any(line.split()[-1:] == ["fuse"] for line in fs):
            return (f"{DEVICE} does not exist, although the kernel has FUSE; as root: "
                    f"mknod -m 0666 {DEVICE} c 10 229")
    return f"{DEVICE} does not exist (the fuse module is not loaded); as root: modprobe fuse"


def device_problem(f: Facts) -> str | None:
    """None when /dev/fuse opens for reading and writing, as libfuse will open it."""
    try:
        st = os.stat(DEVICE)
    except FileNotFoundError:
        return no_device(f)
    except OSError as exc:
        return f"cannot look at {DEVICE}: {exc.strerror}"
    if not stat.S_ISCHR(st.st_mode):
        return (f"{DEVICE} is not the FUSE character device ({stat.filemode(st.st_mode)}); "
                + (f"run the container with {DOCKER_FLAGS}" if f.in_container else
                   f"as root: rm {DEVICE} && modprobe -r fuse; modprobe fuse"))
    try:
        os.close(os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return _open_problem(f, st, exc)
    return None


def _open_problem(f: Facts, st: os.stat_result, exc: OSError) -> str:
    if exc.errno in (errno.ENODEV, errno.ENXIO):
        return f"{DEVICE} has no driver (the fuse module is not loaded); as root: modprobe fuse"
    if exc.errno == errno.EPERM:  # a device cgroup, not the file mode
        return (f"opening {DEVICE} is not permitted (a device cgroup denies it); "
                + (f"run the container with {DOCKER_FLAGS}" if f.in_container else
                   "allow the device c 10:229 rwm in this process's cgroup"))
    if exc.errno != errno.EACCES:
        return f"cannot open {DEVICE}: {exc.strerror}"
    mode, owner = stat.filemode(st.st_mode), _owner(st)
    what = f"{f.user} may not open {DEVICE} ({mode} {owner})"
    group = owner.split(":")[1]
    if st.st_mode & 0o060 == 0o060 and group != "root":
        return f"{what}; as root: usermod -aG {group} {f.user.split()[0]}, then log in again"
    where = "on the host " if f.in_container else ""
    return (f"{what}; {where}as root: chmod 0666 {DEVICE} (its usual mode, which a udev rule "
            "keeps), or mount as root")


def helper_problem(f: Facts) -> str | None:
    """Without CAP_SYS_ADMIN, libfuse mounts through the setuid-root fusermount3."""
    if f.direct:
        return None
    if not f.can_gain_admin:
        if f.in_container:
            return ("the container lacks CAP_SYS_ADMIN, which mounting needs; run the "
                    f"container with {DOCKER_FLAGS}")
        return ("mounting needs CAP_SYS_ADMIN, and this process cannot gain it (it is not in "
                "its capability bounding set); run cowfs outside that restriction")
    why = f"{f.user} mounts through the setuid helper fusermount3"
    if f.no_new_privs:
        return (f"{why}, but this process runs with no_new_privs, which disables setuid "
                "(docker --security-opt no-new-privileges, systemd NoNewPrivileges=); "
                "drop that setting or mount as root")
    tool = fusermount()
    if tool is None:
        return f"{why}, which is not installed; as root: apt-get install fuse3"
    st = os.stat(tool)
    if st.st_uid != 0 or not st.st_mode & stat.S_ISUID:
        return (f"{why}, and {tool} is not setuid root ({stat.filemode(st.st_mode)} "
                f"{_owner(st)}); as root: chmod u+s {tool} (or apt-get install --reinstall "
                "fuse3)")
    if os.statvfs(tool).f_flag & os.ST_NOSUID:
        return (f"{why}, and {tool} is on a nosuid filesystem, where setuid does not work; "
                "install fuse3 on a filesystem mounted without nosuid")
    return None


def user_allow_other() -> bool | None:
    """Whether fusermount3 lets non-root users ask for allow_other (None: unreadable)."""
    try:
        with open(FUSE_CONF) as conf:
            return any(line.split("#")[0].strip() == "user_allow_other" for line in conf)
    except FileNotFoundError:
        return False
    except OSError:
        return None


def allow_other_problem(f: Facts) -> str:
    return (f"allow_other was asked for, and {FUSE_CONF} lacks the line user_allow_other "
            "that fusermount3 needs to grant it to a user other than root; as root: "
            f"echo user_allow_other >> {FUSE_CONF} (or mount without --allow-other)")


def busy(mountpoint: str, what: str) -> str:
    """A mount point already in use: `what` says by whom (or what the kernel said)."""
    return (f"cannot mount {mountpoint}: it is busy ({what}); unmount what is there first "
            f"(umount {mountpoint}) or choose another directory")


def preflight(mountpoint: str, allow_other: bool) -> None:
    """Raise CowfsError with the cause and the fix when the mount cannot work here."""
    from cowfs.errors import CowfsError

    if os.environ.get("COWFS_MOUNT_PREFLIGHT", "1") == "0":
        return
    f = Facts.here()
    problem = device_problem(f) or helper_problem(f)
    if (problem is None and allow_other and not f.direct and os.getuid() != 0
            and user_allow_other() is False):
        problem = allow_other_problem(f)
    if problem:
        raise CowfsError(f"cannot mount {mountpoint}: {problem}")


# -- what the daemon's libfuse said ------------------------------------------------------------

_FUSE_LINE = re.compile(r"^(?:fuse|fusermount3?): .*")


def _denied(f: Facts, err: str) -> str:
    """mount(2) failed with EPERM/EACCES: a missing privilege, or a security module."""
    problem = helper_problem(f) if not f.direct else None
    if problem:
        return problem
    profiles = f.security_profiles()
    if f.in_container:
        fix = " ".join(flag for flag, _ in profiles) or "--security-opt apparmor=unconfined"
        seen = "; ".join(why for _, why in profiles)
        return (f"the container's security profile denies mount(2) ({err}"
                f"{'; ' + seen if seen else ''}); run the container with {fix} as well as "
                f"{DOCKER_FLAGS}")
    return (f"mount(2) was denied ({err}) although this process may mount: a security module "
            "(AppArmor, SELinux, seccomp) forbids it; allow mount for cowfs in its policy")


def explain(lines: list[str], mountpoint: str) -> str | None:
    """The one-line reason for a failed mount, from the daemon's log lines of this attempt
    (libfuse and fusermount3 write to its stderr); None when they say nothing known."""
    f = Facts.here()
    said = [ln.strip() for ln in lines if _FUSE_LINE.match(ln.strip())]
    problem = None
    for line in said:
        if "device not found" in line or "failed to open /dev/fuse" in line:
            problem = device_problem(f) or line
        elif "failed to exec fusermount" in line:
            # Also what a direct mount(2) refused by a security module ends in: libfuse
            # falls back to fusermount3 on EPERM, which containers rarely have.
            problem = helper_problem(f) or _denied(f, "Operation not permitted")
        elif "user_allow_other" in line:
            problem = allow_other_problem(f)
        elif m := re.search(r"mount failed: (Operation not permitted|Permission denied)", line):
            problem = _denied(f, m.group(1))
        elif "Device or resource busy" in line:
            return busy(mountpoint, "mount(2): Device or resource busy")
        elif m := re.search(r"mounting over filesystem type (0x[0-9a-fA-F]+) is forbidden", line):
            from cowfs.overlay.fscaps import fstype_of

            kind = FS_MAGIC.get(int(m.group(1), 16)) or fstype_of(mountpoint)
            problem = (f"fusermount3 lets users mount only on common disk and network "
                       f"filesystems, not on {kind} ({m.group(1)}); choose a mount point on "
                       "ext4, xfs, btrfs, tmpfs or the like, or mount as root")
        elif "no write access to mountpoint" in line or "not owned by user" in line:
            problem = (f"fusermount3 mounts only on a directory {f.user} may write to (and "
                       "owns, if it is sticky); choose such a directory or mount as root")
        elif m := re.search(r"failed to access mountpoint \S+: (.*)", line):
            problem = (f"the mount point cannot be accessed ({m.group(1)}); check its path and "
                       "permissions")
        elif "too many FUSE filesystems mounted" in line:
            problem = (f"fusermount3's limit of FUSE mounts is reached; as root: raise "
                       f"mount_max in {FUSE_CONF}, or unmount some")
        if problem:
            return f"cannot mount {mountpoint}: {problem}"
    if said:  # unknown to us: libfuse's own words beat pyfuse3's "fuse_session_mount failed"
        return f"cannot mount {mountpoint}: {said[-1]}"
    return None
