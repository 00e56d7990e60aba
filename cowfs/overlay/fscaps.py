"""What a filesystem can hold, probed once per filesystem by trying it in a scratch directory.

The overlay needs, of the filesystem under its upper layer: user xattrs (whiteout and opaque
markers at full name length), POSIX modes and owners, symlinks, timestamps fine enough for
bytecode validation; and it profits from reflinks (instant copy-up) and copy_file_range.
NTFS through ntfs-3g, for instance, reports every file as 0777: chmod does not stick.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass

FICLONE = 0x40049409


@dataclass(frozen=True)
class Capabilities:
    fstype: str
    user_xattrs: bool
    modes: bool  # chmod sticks
    owners: bool  # chown sticks (only testable as root)
    symlinks: bool
    hardlinks: bool
    timestamp_ns: int  # resolution of mtimes set with utime
    copy_file_range: bool
    reflink: bool

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    def missing_for_upper(self) -> list[str]:
        """Capabilities without which an upper layer cannot represent the overlay at all."""
        missing = []
        if not self.symlinks:
            missing.append("symlinks")
        if not self.user_xattrs and not self.modes:
            missing.append("user xattrs or POSIX modes (cowfs needs one of them to keep "
                           "modes, owners and whiteouts)")
        return missing


def _mount_of(path: str) -> tuple[str, str]:
    """(filesystem type, source) of the mount holding path, from /proc/self/mountinfo."""
    real = os.path.realpath(path)
    best, found = "", ("unknown", "")
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mp = left.split()[4].replace("\\040", " ")
            if (real == mp or real.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
                kind, source = [*right.split(), "", ""][:2]
                best, found = mp, (kind, source.replace("\\040", " "))
    return found


def fstype_of(path: str) -> str:
    """The filesystem type of the mount holding path."""
    return _mount_of(path)[0]


def mount_source(path: str) -> str:
    """What is mounted at the mount holding path (a device, an image, "tmpfs"...)."""
    return _mount_of(path)[1]


def _try(fn: object, *args: object) -> bool:
    try:
        fn(*args)  # type: ignore[operator]
        return True
    except OSError:
        return False


def probe(directory: str) -> Capabilities:
    """Try each capability in a scratch dir inside directory (which must be writable)."""
    scratch = tempfile.mkdtemp(prefix=".cowfs-probe-", dir=directory)
    try:
        a, b = os.path.join(scratch, "a"), os.path.join(scratch, "b")
        with open(a, "wb") as f:
            f.write(b"x" * 8192)
        xattrs = _try(os.setxattr, a, "user.cowfs.probe", b"1")
        modes = _try(os.chmod, a, 0o640) and (os.stat(a).st_mode & 0o777) == 0o640
        owners = False
        if os.geteuid() == 0:
            owners = _try(os.chown, a, 12345, 12345) and os.stat(a).st_uid == 12345
        symlinks = _try(os.symlink, "a", os.path.join(scratch, "s"))
        hardlinks = _try(os.link, a, os.path.join(scratch, "h"))
        os.utime(a, ns=(1_000_000_123, 1_000_000_123))
        got = os.stat(a).st_mtime_ns
        resolution = 1 if got == 1_000_000_123 else (
            100 if got == 1_000_000_100 else 1_000_000_000 if got % 10**9 == 0 else 1000)
        cfr = reflink = False
        src = os.open(a, os.O_RDONLY)
        dst = os.open(b, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.ioctl(dst, FICLONE, src)
                reflink = True
            except OSError:
                pass
            try:
                cfr = os.copy_file_range(src, dst, 8192, 0, 0) > 0
            except OSError as exc:
                cfr = exc.errno not in (errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP,
                                        errno.EINVAL)
        finally:
            os.close(src)
            os.close(dst)
        return Capabilities(fstype_of(directory), xattrs, modes, owners, symlinks, hardlinks,
                            resolution, cfr, reflink)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
