"""Metadata the upper filesystem cannot hold itself, kept by cowfs next to the entry.

The overlay shows POSIX modes, owners and nanosecond times for every entry. Some upper
filesystems drop them: NTFS through ntfs-3g reports every file as 0777 owned by the mounting
user (chmod and chown succeed and change nothing) and keeps times at 100 ns. When the probe
(cowfs.overlay.fscaps, once per upper filesystem at mount) finds that, and the filesystem has user
xattrs, cowfs keeps the metadata itself:

* regular files and directories: in the xattr `user.cowfs.meta` of the entry (it moves
  with the inode through renames and hard links);
* symlinks, fifos, devices and sockets, which Linux allows no user xattrs: in the xattr
  `user.cowfs.meta.<inode number>` of the layer's work dir, on the same filesystem (so
  renames and hard links need nothing; the last unlink drops it).

A record is `1 <st_mode octal> <uid|-> <gid|-> [<atime> <mtime> <fs mtime>]`: the type in
st_mode guards against a reused inode number; uid/gid `-` means "whatever the filesystem
says" (an unprivileged daemon cannot give files away anyway). Times are kept when the
filesystem's resolution is coarser than a nanosecond: they apply while the file's real
mtime is still the one the filesystem stored for them, so a later write shows its own time.

The overlay applies records in getattr, which also feeds the kernel's default_permissions
checks. A mode set as a POSIX ACL xattr (cp -p, sed -i) is recorded like a chmod.

xattrs in a namespace the filesystem does not keep and list (ntfs-3g leaves trusted.* out
of listxattr) are kept as `user.cowfs.x.<name>` on the entry, or as
`user.cowfs.xs.<inode number>.<name>` on the work dir for entries without user xattrs.
`user.cowfs.*` is private: never listed, copied or settable through a mount.

Entries are named by path strings: the daemon passes /proc/self/fd/N/NAME names (cowfs.dirfd),
which reach the entry through its layer's directory handle.

On a filesystem with POSIX modes, owners and ns times nothing is recorded (NativeMeta), so
ext4, xfs, btrfs and tmpfs pay nothing. A filesystem with neither user xattrs nor modes
cannot hold an upper layer: `refusal` names what is missing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass

from cowfs.overlay.fscaps import Capabilities, probe

META_XATTR = "user.cowfs.meta"
_SIDE_PREFIX = META_XATTR + "."
KEPT_XATTR_PREFIX = "user.cowfs.x."  # + the name of an xattr the filesystem drops
_SIDE_KEPT_PREFIX = "user.cowfs.xs."  # + inode number + "." + name: the same, on the work dir
IS_ROOT = os.geteuid() == 0
_NO_XATTR = (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.ENOENT)

_caps_by_dev: dict[tuple[int, str], Capabilities] = {}
_exchange_by_dev: dict[tuple[int, str], bool] = {}
_trusted_by_dev: dict[tuple[int, str], bool] = {}


def _fs_key(directory: str) -> tuple[int, str]:
    """Identifies one mounted filesystem: its device number plus the ids, types and sources
    of the mounts of that device (a loop, tmpfs or FUSE device number is reused by the next
    mount, and so is a mount id: a test's tmpfs and the ntfs-3g mounted after it had both)."""
    dev = os.stat(directory).st_dev
    majmin = f"{os.major(dev)}:{os.minor(dev)}"
    ids = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(maxsplit=3)
            if len(fields) > 2 and fields[2] == majmin:
                ids.append(fields[0] + " " + line.partition(" - ")[2].strip())
    return dev, ",".join(ids)


def caps_for(directory: str) -> Capabilities:
    """Probe the filesystem holding directory (writable) once per process and filesystem."""
    key = _fs_key(directory)
    caps = _caps_by_dev.get(key)
    if caps is None:
        caps = _caps_by_dev[key] = probe(directory)
    return caps


def can_exchange(directory: str) -> bool:
    """Does the filesystem holding directory do renameat2(RENAME_EXCHANGE)? ntfs-3g does
    not (EINVAL): cowfs then falls back to journalled two-step renames (cowfs.overlay.upper)."""
    from cowfs.overlay.upper import RENAME_EXCHANGE, renameat2

    dev = _fs_key(directory)
    if dev not in _exchange_by_dev:
        scratch = tempfile.mkdtemp(prefix=".cowfs-probe-", dir=directory)
        try:
            a, b = os.path.join(scratch, "a"), os.path.join(scratch, "b")
            os.close(os.open(a, os.O_CREAT | os.O_WRONLY, 0o600))
            os.mkdir(b)
            try:
                renameat2(a, b, RENAME_EXCHANGE)
                _exchange_by_dev[dev] = True
            except OSError:
                _exchange_by_dev[dev] = False
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return _exchange_by_dev[dev]


def keeps_trusted_xattrs(directory: str) -> bool:
    """Does the filesystem keep and list trusted.* xattrs? ntfs-3g keeps them but leaves
    them out of listxattr (only user.* are NTFS streams). Only root can tell, or needs to."""
    if not IS_ROOT:
        return True
    key = _fs_key(directory)
    if key not in _trusted_by_dev:
        fd, path = tempfile.mkstemp(prefix=".cowfs-probe-", dir=directory)
        os.close(fd)
        try:
            os.setxattr(path, "trusted.cowfs.probe", b"1")
            _trusted_by_dev[key] = os.getxattr(path, "trusted.cowfs.probe") == b"1" and \
                "trusted.cowfs.probe" in os.listxattr(path)
        except OSError as exc:
            # Refused outright is fine: the caller then gets the same error as on the upper.
            _trusted_by_dev[key] = exc.errno != errno.ENODATA
        finally:
            os.unlink(path)
    return _trusted_by_dev[key]


def refusal(caps: Capabilities, where: str) -> str | None:
    """One sentence why an upper layer cannot live at where, or None when it can."""
    missing = caps.missing_for_upper()
    if not missing:
        return None
    return (f"the {caps.fstype} filesystem at {where} cannot hold a cowfs upper layer: it "
            f"lacks {' and '.join(missing)}")


@dataclass(frozen=True)
class Record:
    mode: int  # full st_mode (type and permission bits)
    uid: int | None = None
    gid: int | None = None
    times: tuple[int, int, int] | None = None  # atime, mtime, the filesystem's mtime

    def encode(self) -> bytes:
        parts = ["1", f"{self.mode:o}", "-" if self.uid is None else str(self.uid),
                 "-" if self.gid is None else str(self.gid)]
        if self.times is not None:
            parts += [str(t) for t in self.times]
        return " ".join(parts).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> Record | None:
        if not raw:
            return None
        try:
            parts = raw.decode().split()
            if parts[0] != "1" or len(parts) not in (4, 7):
                return None
            uid = None if parts[2] == "-" else int(parts[2])
            gid = None if parts[3] == "-" else int(parts[3])
            times = tuple(int(p) for p in parts[4:]) if len(parts) == 7 else None
            return cls(int(parts[1], 8), uid, gid, times)  # type: ignore[arg-type]
        except (ValueError, UnicodeDecodeError, IndexError):
            return None


ACL_ACCESS = "system.posix_acl_access"
_ACL_USER_OBJ, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x04, 0x10, 0x20


def mode_from_acl(data: bytes) -> int | None:
    """The permission bits a POSIX access ACL (the xattr form) implies: how coreutils, sed
    and libacl set modes (fsetxattr instead of fchmod). None when it is not one."""
    if len(data) < 4 or (len(data) - 4) % 8 or int.from_bytes(data[:4], "little") != 2:
        return None
    perms: dict[int, int] = {}
    for off in range(4, len(data), 8):
        tag = int.from_bytes(data[off:off + 2], "little")
        perms[tag] = int.from_bytes(data[off + 2:off + 4], "little") & 7
    if _ACL_USER_OBJ not in perms or _ACL_OTHER not in perms:
        return None
    group = perms.get(_ACL_MASK, perms.get(_ACL_GROUP_OBJ, 0))
    return perms[_ACL_USER_OBJ] << 6 | group << 3 | perms[_ACL_OTHER]


def describe(caps: Capabilities, source: str = "") -> str:
    """A compact one-line summary of a filesystem's probed capabilities; FUSE filesystems
    (ntfs-3g...) are named by what they mount, their type says little."""
    have = [name for name, ok in (("user-xattrs", caps.user_xattrs), ("modes", caps.modes),
                                  ("owners", caps.owners), ("symlinks", caps.symlinks),
                                  ("hardlinks", caps.hardlinks), ("reflink", caps.reflink),
                                  ("copy_file_range", caps.copy_file_range)) if ok]
    lacks = [name for name, ok in (("user-xattrs", caps.user_xattrs), ("modes", caps.modes),
                                   ("owners", caps.owners or not IS_ROOT),
                                   ("symlinks", caps.symlinks),
                                   ("hardlinks", caps.hardlinks), ("reflink", caps.reflink))
             if not ok]
    res = caps.timestamp_ns
    times = "1ns" if res == 1 else f"{res}ns" if res < 10**9 else "1s"
    name = f"{caps.fstype} ({source})" if source and caps.fstype.startswith("fuse") \
        else caps.fstype
    line = f"{name}: {' '.join(have)}, times {times}"
    if lacks:
        line += f"; no {', '.join(lacks)}"
    return line


class NativeMeta:
    """The upper filesystem holds everything itself: nothing to record or apply."""

    active = False
    keeps: tuple[str, ...] = ()
    keep_modes = keep_owners = keep_times = False
    kept_namespaces: tuple[str, ...] = ()  # xattr namespaces kept as KEPT_XATTR_PREFIX + name

    def __init__(self, caps: Capabilities | None = None) -> None:
        self.caps = caps

    @property
    def strategy(self) -> str:
        return "native"

    def attr(self, path: str | None, st: os.stat_result,
             fd: int | None = None) -> tuple[int, int, int, int, int]:
        return st.st_mode, st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns

    def record(self, path: str | None, *, fd: int | None = None, mode: int | None = None,
               uid: int | None = None, gid: int | None = None,
               times: tuple[int, int] | None = None, fresh: bool = False) -> None:
        return None

    def forget(self, path: str) -> None:
        return None

    def clear_side(self, path: str) -> None:
        return None

    def ensure_root(self, path: str, mode: int) -> None:
        return None

    def xattr_place(self, path: str, name: str) -> tuple[str, str]:
        """Where the upper entry at path holds its xattr `name`: (path, name) unless it is
        in a namespace the filesystem drops, kept under a user.* name instead (for entries
        that cannot have user xattrs, on the work dir)."""
        return path, name

    def kept_names(self, path: str, names: list[str]) -> list[str]:
        """Names of the xattrs kept for the entry at path (whose real names are names)."""
        return []


class XattrMeta(NativeMeta):
    """Modes, owners and exact times in `user.cowfs.meta` (see the module docstring)."""

    active = True

    def __init__(self, caps: Capabilities, modes: bool, owners: bool, times: bool,
                 side_dir: str = ".") -> None:
        super().__init__(caps)
        self.side_dir = side_dir  # holds the records of entries without user xattrs
        self.keep_modes, self.keep_owners, self.keep_times = modes, owners, times
        self.keeps = tuple(n for n, k in (("modes", modes), ("owners", owners),
                                          ("times", times)) if k)

    @property
    def strategy(self) -> str:
        kept = [*self.keeps, *(f"{ns}* xattrs" for ns in self.kept_namespaces)]
        return f"xattr {META_XATTR} ({', '.join(kept)})"

    # -- where a record lives ---------------------------------------------------------------

    def _side(self, path: str | None, st: os.stat_result) -> tuple[str, str]:
        return self.side_dir, f"{_SIDE_PREFIX}{st.st_ino}"

    def _side_names(self, ino: int) -> list[str]:
        """Every side record of inode ino (metadata, kept xattrs)."""
        try:
            names = os.listxattr(self.side_dir)
        except OSError:
            return []
        mine, kept = f"{_SIDE_PREFIX}{ino}", f"{_SIDE_KEPT_PREFIX}{ino}."
        return [n for n in names if n == mine or n.startswith(kept)]

    def xattr_place(self, path: str, name: str) -> tuple[str, str]:
        if not self.kept_namespaces or not name.startswith(self.kept_namespaces):
            return path, name
        st = os.lstat(path)
        if self._inline(st):
            return path, KEPT_XATTR_PREFIX + name
        return self.side_dir, f"{_SIDE_KEPT_PREFIX}{st.st_ino}.{name}"

    def kept_names(self, path: str, names: list[str]) -> list[str]:
        if not self.kept_namespaces:
            return []
        st = os.lstat(path)
        if self._inline(st):
            return [n[len(KEPT_XATTR_PREFIX):] for n in names
                    if n.startswith(KEPT_XATTR_PREFIX)]
        prefix = f"{_SIDE_KEPT_PREFIX}{st.st_ino}."
        return [n[len(prefix):] for n in self._side_names(st.st_ino) if n.startswith(prefix)]

    @staticmethod
    def _inline(st: os.stat_result) -> bool:
        return stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)

    def _read(self, path: str | None, st: os.stat_result, fd: int | None) -> Record | None:
        try:
            if fd is not None and self._inline(st):
                raw = os.getxattr(fd, META_XATTR)
            elif path is None:
                return None
            elif self._inline(st):
                raw = os.getxattr(path, META_XATTR, follow_symlinks=False)
            else:
                raw = os.getxattr(*self._side(path, st))
        except OSError as exc:
            if exc.errno in _NO_XATTR:
                return None
            raise
        rec = Record.decode(raw)
        if rec is None or stat.S_IFMT(rec.mode) != stat.S_IFMT(st.st_mode):
            return None  # foreign, corrupt, or a reused inode number
        return rec

    def _write(self, path: str | None, st: os.stat_result, fd: int | None,
               rec: Record) -> None:
        data = rec.encode()
        if fd is not None and self._inline(st):
            os.setxattr(fd, META_XATTR, data)
        elif self._inline(st):
            assert path is not None
            os.setxattr(path, META_XATTR, data, follow_symlinks=False)
        else:
            assert path is not None
            os.setxattr(*self._side(path, st), data)

    # -- the interface ------------------------------------------------------------------------

    def attr(self, path: str | None, st: os.stat_result,
             fd: int | None = None) -> tuple[int, int, int, int, int]:
        rec = self._read(path, st, fd)
        mode, uid, gid = st.st_mode, st.st_uid, st.st_gid
        atime, mtime = st.st_atime_ns, st.st_mtime_ns
        if rec is None:
            return mode, uid, gid, atime, mtime
        if self.keep_modes:
            mode = stat.S_IFMT(st.st_mode) | stat.S_IMODE(rec.mode)
        if rec.uid is not None:
            uid = rec.uid
        if rec.gid is not None:
            gid = rec.gid
        if rec.times is not None and rec.times[2] == st.st_mtime_ns:
            atime, mtime = rec.times[0], rec.times[1]  # not written to since they were set
        return mode, uid, gid, atime, mtime

    def record(self, path: str | None, *, fd: int | None = None, mode: int | None = None,
               uid: int | None = None, gid: int | None = None,
               times: tuple[int, int] | None = None, fresh: bool = False) -> None:
        """Merge the given fields into the entry's record (call after the real chmod, chown
        or utime, so the filesystem's own values are current); fresh: a new entry, whose
        inode number may have left a record behind."""
        st = os.fstat(fd) if fd is not None else os.lstat(path)  # type: ignore[arg-type]
        existing = None if fresh else self._read(path, st, fd)
        old = existing or Record(st.st_mode)
        new_mode = old.mode if mode is None else stat.S_IFMT(st.st_mode) | stat.S_IMODE(mode)
        keep_ids = self.keep_owners and IS_ROOT
        new_uid = uid if uid is not None and keep_ids else old.uid
        new_gid = gid if gid is not None and keep_ids else old.gid
        new_times = old.times
        if times is not None:
            new_times = (times[0], times[1], st.st_mtime_ns) if self.keep_times else None
        rec = Record(new_mode, new_uid, new_gid, new_times)
        if rec != existing:
            self._write(path, st, fd, rec)

    def forget(self, path: str) -> None:
        """Before unlinking the last name of a special file: drop its side records."""
        try:
            st = os.lstat(path)
        except OSError:
            return
        if st.st_nlink <= 1:
            self.clear_side(path)

    def clear_side(self, path: str) -> None:
        """A new entry without user xattrs: drop what a former owner of its inode number
        left in the work dir (a removal behind cowfs' back, by a reset say)."""
        st = os.lstat(path)
        if self._inline(st):
            return
        for name in self._side_names(st.st_ino):
            with contextlib.suppress(OSError):
                os.removexattr(self.side_dir, name)

    def ensure_root(self, path: str, mode: int) -> None:
        """The upper root was made by mkdir, outside the overlay: give it a sane mode."""
        st = os.lstat(path)
        if self._read(path, st, None) is None:
            self._write(path, st, None, Record(stat.S_IFDIR | mode))


def for_upper(directory: str, side_dir: str | None = None) -> NativeMeta:
    """The metadata keeper for an upper layer whose work dir is directory; side_dir names
    it for the side records (the daemon's: through its handle, cowfs.dirfd)."""
    keeper = for_caps(caps_for(directory))
    if isinstance(keeper, XattrMeta):
        keeper.side_dir = side_dir or directory
    if keeper.active and not keeps_trusted_xattrs(directory):
        keeper.kept_namespaces = ("trusted.",)
    return keeper


def for_caps(caps: Capabilities) -> NativeMeta:
    """Choose how an upper layer on a filesystem with these capabilities keeps metadata."""
    modes = not caps.modes
    owners = IS_ROOT and not caps.owners
    times = caps.timestamp_ns > 1
    if not (modes or owners or times) or not caps.user_xattrs:
        # Nothing missing, or nowhere to keep it: without xattrs a filesystem must have
        # modes (Capabilities.missing_for_upper), and owners/times degrade gracefully.
        return NativeMeta(caps)
    return XattrMeta(caps, modes, owners, times)
