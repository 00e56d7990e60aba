"""The writable upper directory of an overlay: entries by handle, whiteouts, opaque directories.

Markers follow the kernel's unprivileged ("userxattr") overlayfs format so the upper directory
stays readable by other overlay tools and names keep their full 255-byte length:

* whiteout: an empty regular file carrying the xattr `user.overlay.whiteout`; its parent
  directory carries `user.overlay.opaque=x` ("holds whiteouts", as the kernel expects).
  The classic 0/0 character device whiteout is recognised too, and a privileged daemon's
  renames leave one (RENAME_WHITEOUT is the only atomic rename-plus-whiteout).
* opaque directory: `user.overlay.opaque=y`.

Where the upper filesystem has no user xattrs (some FUSE or NTFS mounts), the aufs-style
name-prefix fallback is used: `.wh.NAME` and `.wh..wh..opq` (names then lose 4 bytes).

The upper filesystem is probed once at mount (cowfs.overlay.fscaps via cowfs.overlay.meta):
modes, owners and fine times it cannot hold are kept by `self.meta` (cowfs.overlay.meta); one
with neither user xattrs nor modes is refused. Where it has no renameat2(RENAME_EXCHANGE)
(ntfs-3g), the two steps that replace a directory with a whiteout (or a whiteout with a
directory) and user exchanges are journalled in the work dir (`intent-*` files) and finished
at the next mount, so a crash between them never shows a deleted lower entry again.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator

from cowfs.dirfd import AT_FDCWD, At, Root, lexists, listdir, open_dir, opendir, proc
from cowfs.errors import CowfsError
from cowfs.overlay import meta as metadata

WHITEOUT_XATTR = "user.overlay.whiteout"
OPAQUE_XATTR = "user.overlay.opaque"
PRIVATE_XATTR_PREFIXES = ("user.overlay.", "trusted.overlay.", "user.cowfs.")
WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"
# Names this module creates in the work dir (temp, the xattr probe): only those are ever
# deleted from it, since a user may point workdir= at a directory that holds other things.
_WORK_NAME = re.compile(r"[0-9a-f]{32}|\.cowfs-xattr-probe-[0-9a-f]{32}"
                        r"|\.cowfs-probe-[0-9a-z_]{8}")
_INTENT = re.compile(r"intent-[0-9a-f]{32}")
# libfuse (ntfs-3g...) renames a file unlinked while open to this until its last close; the
# daemon holds the upper files its callers have open, so a FUSE upper has them now and then.
_FUSE_HIDDEN = re.compile(r"\.fuse_hidden[0-9a-f]{16}")
_NO_EXCHANGE = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS)


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2_at(old: At, new: At, flags: int) -> None:
    """rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE, which os.rename cannot express."""
    if _libc.renameat2(old[0], os.fsencode(old[1]), new[0], os.fsencode(new[1]), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old[1])


def renameat2(old: str, new: str, flags: int) -> None:
    renameat2_at((AT_FDCWD, old), (AT_FDCWD, new), flags)


def rename_at(old: At, new: At) -> None:
    os.rename(old[1], new[1], src_dir_fd=old[0], dst_dir_fd=new[0])


IS_ROOT = os.geteuid() == 0


@contextlib.contextmanager
def owner_writable(at: At) -> Iterator[None]:
    """Let an unprivileged daemon put an entry or a marker into an upper directory whose
    mode (copied from the lower, e.g. 0555) denies it: the owner may edit a file inside a
    read-only directory, so its copy-up must work. Root needs no help."""
    fd, name = at
    st = None if IS_ROOT else os.lstat(name, dir_fd=fd)
    if st is None or st.st_mode & 0o300 == 0o300:
        yield
        return
    os.chmod(name, stat.S_IMODE(st.st_mode) | 0o300, dir_fd=fd)
    try:
        yield
    finally:
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=fd)


def is_private_xattr(name: str) -> bool:
    return name.startswith(PRIVATE_XATTR_PREFIXES)


def _getxattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def is_whiteout_stat(path: str | At, st: os.stat_result) -> bool:
    """Is the entry at path (already lstat'ed) a whiteout, in either xattr format?"""
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return True
    if not stat.S_ISREG(st.st_mode) or st.st_size:
        return False
    return _getxattr(path if isinstance(path, str) else proc(path), WHITEOUT_XATTR) is not None


def foreign_dist_infos(upper: str | os.PathLike[str]) -> list[str]:
    """Top-level dist-info directories with a real RECORD (not the whiteout of one deleted
    by an uninstall) in a venv's upper layer: written by an installer other than cowfs,
    whose own are lower entries. What installer.venv.absorb takes into the store."""
    try:
        names = os.listdir(upper)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        path = os.path.join(upper, name, "RECORD")
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if name.endswith(".dist-info") and stat.S_ISREG(st.st_mode) \
                and not is_whiteout_stat(path, st):
            found.append(name)
    return sorted(found)


def is_opaque_dir(path: str) -> bool:
    value = _getxattr(path, OPAQUE_XATTR) or _getxattr(path, "trusted.overlay.opaque")
    return value == b"y" or os.path.lexists(f"{path}/{WH_OPAQUE}")


def probe_user_xattrs(directory: str) -> bool:
    """Can this filesystem hold user.* xattrs on regular files?"""
    probe = f"{directory}/.cowfs-xattr-probe-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.setxattr(probe, "user.cowfs.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)


class Upper:
    """The upper directory plus its work directory (same filesystem, for atomic renames),
    both held open (cowfs.dirfd): entries are named by upper-relative paths and reached by
    *at syscalls from the root handles, never by absolute path strings."""

    def __init__(self, root: str, work: str, use_xattrs: bool | None = None) -> None:
        self.root = os.path.abspath(root)  # (names, for messages and other processes)
        self.work = os.path.abspath(work)
        os.makedirs(self.work, exist_ok=True)
        self._root, self._work = Root(self.root), Root(self.work)
        if os.fstat(self._root.fd).st_dev != os.fstat(self._work.fd).st_dev:
            raise ValueError("upperdir and workdir must be on the same filesystem")
        self._rename_whiteout = True  # until the kernel says otherwise
        self.caps = metadata.caps_for(self.work)  # once per filesystem
        why = metadata.refusal(self.caps, self.root)
        if why is not None:
            raise CowfsError(why)
        self.xattrs = self.caps.user_xattrs if use_xattrs is None else use_xattrs
        self.meta = metadata.for_upper(self.work, self._work.proc(""))
        self.exchange_ok = metadata.can_exchange(self.work)
        self.fuse_hidden = self.caps.fstype.startswith("fuse")
        self.replay_intents()
        self.clean_work()
        self.meta.ensure_root(self.xpath(""), 0o755)

    def clean_work(self) -> None:
        """Drop half-built copy-ups a killed daemon left behind (never visible in the view)."""
        work = self._work.fd
        with opendir(self.work_at("")) as fd, os.scandir(fd) as it:
            ours = [(de.name, de.is_dir(follow_symlinks=False)) for de in it
                    if _WORK_NAME.fullmatch(de.name)]
        for name, is_dir in ours:
            if is_dir:
                shutil.rmtree(name, ignore_errors=True, dir_fd=work)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=work)

    def at(self, rel: str) -> At:
        """The upper entry rel for an *at syscall, however deep rel is (cowfs.dirfd): use it
        at once, do not keep it."""
        return self._root.at(rel)

    def xpath(self, rel: str) -> str:
        """A path string of the upper entry rel through the root handle, for xattr calls."""
        return self._root.proc(rel)

    def work_at(self, name: str) -> At:
        """An entry of the work dir ("" is the dir itself); its handle lives as long as self."""
        return self._work.at(name)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self._root.fd)

    def moved(self, *rels: str) -> None:
        """Directories at rels were renamed or removed: drop handles kept below them."""
        for rel in rels:
            self._root.forget(rel)

    def rename(self, src: str, dst: str) -> None:
        """rename(2) of upper-relative paths."""
        rename_at(self.at(src), self.at(dst))
        self.moved(src, dst)

    def remove(self, rel: str, is_dir: bool) -> None:
        fd, name = self.at(rel)
        (os.rmdir if is_dir else os.unlink)(name, dir_fd=fd)
        if is_dir:
            self.moved(rel)

    # -- the intent journal (filesystems without RENAME_EXCHANGE) -----------------------------

    def _intent(self, *fields: str) -> str:
        """Durably note what must hold after a crash in the middle of a multi-step change;
        returns the intent's name in the work dir."""
        name = f"intent-{uuid.uuid4().hex}"
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                     dir_fd=self._work.fd)
        try:
            os.write(fd, "\0".join(fields).encode("utf-8", "surrogateescape"))
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_at(self.work_at(""))
        return name

    def _intent_done(self, intent: str, *parents: str) -> None:
        for parent in parents:
            self.fsync_dir(parent)
        os.unlink(intent, dir_fd=self._work.fd)

    def replay_intents(self) -> None:
        """Finish what a killed daemon left half done (before anything is served)."""
        work = self._work.fd
        intents = [n for n in listdir(self.work_at("")) if _INTENT.fullmatch(n)]
        for intent in intents:
            try:
                fd = os.open(intent, os.O_RDONLY | os.O_CLOEXEC, dir_fd=work)
                with open(fd, "rb") as f:
                    fields = f.read().decode("utf-8", "surrogateescape").split("\0")
                self._replay(fields)
            except (OSError, ValueError, IndexError):
                pass  # a torn intent was written before any step it guards
            with contextlib.suppress(FileNotFoundError):
                os.unlink(intent, dir_fd=work)

    def _replay(self, fields: list[str]) -> None:
        if fields[0] == "whiteout":
            rel = fields[1]
            parent = rel.rpartition("/")[0]
            pst = self.lstat(parent)
            if self.lstat(rel) is None and pst is not None and stat.S_ISDIR(pst.st_mode):
                self.make_whiteout(rel)
                self.fsync_dir(parent)
        elif fields[0] == "exchange":
            a, b, tmp = fields[1], fields[2], self.work_at(fields[3])
            if lexists(tmp):
                if self.lstat(a) is None and self.lstat(b) is not None:
                    self.rename(b, a)
                rename_at(tmp, self.at(b))

    def exchange(self, a: str, b: str) -> None:
        """renameat2(RENAME_EXCHANGE) of two upper entries, emulated where unsupported."""
        if self.exchange_ok:
            before = {b: self._lstat(a), a: self._lstat(b)}  # by new name
            renameat2_at(self.at(a), self.at(b), RENAME_EXCHANGE)
            self.moved(a, b)
            if a.rpartition("/")[0] != b.rpartition("/")[0]:
                # xfs stamps a directory whose ".." an exchange rewrites with a new mtime;
                # ext4 and a plain rename do not: the view keeps the entry's own times.
                for rel, st in before.items():
                    if stat.S_ISDIR(st.st_mode) and self._lstat(rel).st_mtime_ns != st.st_mtime_ns:
                        fd, name = self.at(rel)
                        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=fd)
            return
        if b.startswith(f"{a}/") or a.startswith(f"{b}/"):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), a)
        tmp_name = f"xchg-{uuid.uuid4().hex}"
        tmp = self.work_at(tmp_name)
        intent = self._intent("exchange", a, b, tmp_name)
        rename_at(self.at(a), tmp)
        self.rename(b, a)
        rename_at(tmp, self.at(b))
        self.moved(a, b)
        self._intent_done(intent, a.rpartition("/")[0], b.rpartition("/")[0])

    def _lstat(self, rel: str) -> os.stat_result:
        fd, name = self.at(rel)
        return os.lstat(name, dir_fd=fd)

    def lstat(self, rel: str) -> os.stat_result | None:
        if self.fuse_hidden and _FUSE_HIDDEN.fullmatch(rel.rpartition("/")[2]):
            return None  # not part of the view (nor is it ours to remove)
        try:
            return self._lstat(rel)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def temp(self) -> At:
        """A fresh name in the work dir (the handle is the work root's: it may be kept)."""
        return self.work_at(uuid.uuid4().hex)

    # -- markers ------------------------------------------------------------------------

    def is_whiteout(self, rel: str, st: os.stat_result) -> bool:
        return is_whiteout_stat(self.at(rel), st)

    def _marker(self, rel: str) -> str:
        """The fallback format's `.wh.NAME` next to rel."""
        parent, _, name = rel.rpartition("/")
        return f"{parent}/{WH_PREFIX}{name}" if parent else f"{WH_PREFIX}{name}"

    def has_prefix_whiteout(self, rel: str) -> bool:
        """Fallback format: is there a `.wh.NAME` next to NAME?"""
        return not self.xattrs and lexists(self.at(self._marker(rel)))

    def is_opaque(self, rel: str) -> bool:
        return is_opaque_dir(self.xpath(rel))

    def make_whiteout(self, rel: str) -> None:
        """Hide the lower entry at rel. rel must not exist in upper (except as a whiteout)."""
        if not self.xattrs:
            fd, name = self.at(self._marker(rel))
            os.close(os.open(name, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=fd))
            return
        rename_at(self._whiteout_temp(), self.at(rel))
        self._mark_parent(rel.rpartition("/")[0])

    def rename_leaving_whiteout(self, src: str, dst: str) -> None:
        """rename(src, dst) plus a whiteout at src, in one step where the kernel can do it
        (RENAME_WHITEOUT: a 0/0 device whiteout, needs CAP_MKNOD), so that a crash between
        the two never shows the lower src again next to its renamed copy."""
        if self.xattrs and self._rename_whiteout:
            try:
                renameat2_at(self.at(src), self.at(dst), RENAME_WHITEOUT)
                self.moved(src, dst)
                self._mark_parent(src.rpartition("/")[0])
                return
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self._rename_whiteout = False  # unprivileged or unsupported: two steps
        self.rename(src, dst)
        self.make_whiteout(src)

    def replace_with_whiteout(self, rel: str, is_dir: bool) -> None:
        """Turn the upper entry at rel (an empty dir or a non-dir) into a whiteout atomically:
        an unlink of a name that exists below never shows the lower entry, even on a crash."""
        parent = rel.rpartition("/")[0]
        if not self.xattrs:
            # Marker first: while the upper entry exists it still wins the lookup.
            self.make_whiteout(rel)
            if is_dir:
                self.clear_markers(rel)
            self.remove(rel, is_dir)
            return
        tmp = self._whiteout_temp()
        if is_dir and self.exchange_ok:
            # The directory may still hold whiteouts of its lower content: they go with it.
            renameat2_at(tmp, self.at(rel), RENAME_EXCHANGE)
            self.moved(rel)
            shutil.rmtree(tmp[1], ignore_errors=True, dir_fd=tmp[0])  # the old, merged-empty one
        elif is_dir:
            intent = self._intent("whiteout", rel)
            moved = self.temp()
            rename_at(self.at(rel), moved)
            self.moved(rel)
            rename_at(tmp, self.at(rel))
            self._mark_parent(parent)
            self._intent_done(intent, parent)
            shutil.rmtree(moved[1], ignore_errors=True, dir_fd=moved[0])
            return
        else:
            rename_at(tmp, self.at(rel))
        self._mark_parent(parent)

    def _whiteout_temp(self) -> At:
        tmp = self.temp()
        os.close(os.open(tmp[1], os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600,
                         dir_fd=tmp[0]))
        os.setxattr(proc(tmp), WHITEOUT_XATTR, b"y")
        return tmp

    def _mark_parent(self, parent: str) -> None:
        """The kernel's userxattr format flags a directory holding whiteouts with opaque=x."""
        if _getxattr(self.xpath(parent), OPAQUE_XATTR) is None:
            with owner_writable(self.at(parent)):
                os.setxattr(self.xpath(parent), OPAQUE_XATTR, b"x")

    def remove_whiteout(self, rel: str) -> bool:
        """Drop a whiteout at rel if there is one; True when one was removed."""
        if not self.xattrs:
            fd, name = self.at(self._marker(rel))
            try:
                os.unlink(name, dir_fd=fd)
                return True
            except FileNotFoundError:
                return False
        st = self.lstat(rel)
        if st is not None and self.is_whiteout(rel, st):
            self.remove(rel, is_dir=False)
            return True
        return False

    def make_opaque(self, rel: str) -> None:
        self.make_opaque_at(self.at(rel))

    def make_opaque_at(self, at: At) -> None:
        with owner_writable(at):  # user.* xattrs and new entries both need write access
            if self.xattrs:
                os.setxattr(proc(at), OPAQUE_XATTR, b"y")
            else:
                os.close(os.open(f"{at[1]}/{WH_OPAQUE}", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC,
                                 0o600, dir_fd=at[0]))

    def listdir(self, rel: str) -> tuple[list[str], set[str]]:
        """Visible upper names and whited-out names of the upper directory rel."""
        names: list[str] = []
        whiteouts: set[str] = set()
        try:
            fd = open_dir(self.at(rel))
        except (FileNotFoundError, NotADirectoryError):
            return names, whiteouts
        try:
            with os.scandir(fd) as it:
                for de in it:
                    name = de.name
                    if not self.xattrs and name.startswith(WH_PREFIX):
                        if name != WH_OPAQUE:
                            whiteouts.add(name[len(WH_PREFIX):])
                        continue
                    if self.xattrs and not de.is_dir(follow_symlinks=False) and \
                            is_whiteout_stat((fd, name), de.stat(follow_symlinks=False)):
                        whiteouts.add(name)
                        continue
                    if self.fuse_hidden and _FUSE_HIDDEN.fullmatch(name):
                        continue
                    names.append(name)
        finally:
            os.close(fd)
        return names, whiteouts

    def clear_markers(self, rel: str) -> None:
        """Remove whiteouts inside an upper dir whose merged view is empty (before rmdir)."""
        _, whiteouts = self.listdir(rel)
        markers = [n if self.xattrs else f"{WH_PREFIX}{n}" for n in whiteouts]
        if not self.xattrs:
            markers.append(WH_OPAQUE)
        for marker in markers:
            with contextlib.suppress(FileNotFoundError):
                self.remove(f"{rel}/{marker}" if rel else marker, is_dir=False)
        if self.fuse_hidden:
            # Still-open removed files keep the directory from being removed: park them in
            # the work dir (libfuse follows the rename; clean_work removes them later).
            hidden = [n for n in listdir(self.at(rel)) if _FUSE_HIDDEN.fullmatch(n)]
            for name in hidden:
                with contextlib.suppress(FileNotFoundError):
                    rename_at(self.at(f"{rel}/{name}" if rel else name), self.temp())

    def install(self, tmp: At, rel: str) -> None:
        """Atomically put a prepared temp entry at rel, replacing a whiteout if present."""
        target = self.at(rel)
        if not self.xattrs:
            # The new entry first: it wins the lookup, so the marker can go afterwards.
            rename_at(tmp, target)
            self.remove_whiteout(rel)
            return
        if stat.S_ISDIR(os.lstat(tmp[1], dir_fd=tmp[0]).st_mode) and lexists(target):
            # A directory cannot be renamed over the (file) whiteout: swap them, then drop
            # the whiteout, so there is no moment where the lower entry shows through.
            if self.exchange_ok:
                renameat2_at(tmp, target, RENAME_EXCHANGE)
                os.unlink(tmp[1], dir_fd=tmp[0])
                return
            intent = self._intent("whiteout", rel)
            os.unlink(target[1], dir_fd=target[0])
            rename_at(tmp, self.at(rel))
            self._intent_done(intent, rel.rpartition("/")[0])
            return
        rename_at(tmp, target)

    def fsync_dir(self, rel: str) -> None:
        _fsync_at(self.at(rel))


def _fsync_at(at: At) -> None:
    fd = open_dir(at)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
