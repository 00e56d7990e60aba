"""Atomic copy-up: build the entry in the work dir, then rename it into the upper dir.

Order for a file: create temp (0600) -> reflink or copy_file_range the data -> xattrs ->
owner, mode, times -> fsync -> rename into place -> fsync the parent. A crash at any point
leaves either the old view or the complete copy, plus garbage in the work dir.

The source is only ever opened O_RDONLY: store objects are never written through a mount.
The data copy (`copy_file_data`) touches no overlay state, so it can run in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat

from cowfs.dirfd import At, proc
from cowfs.overlay.lower import LowerEntry
from cowfs.overlay.upper import IS_ROOT, Upper, is_private_xattr, owner_writable

FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int)
_NO_REFLINK = {errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EBADF,
               errno.ENOSYS, errno.EPERM}


def copy_fd_data(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy size bytes: reflink when the filesystem can, else copy_file_range, else read/write."""
    if size <= 0:
        return
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return
    except OSError as exc:
        if exc.errno not in _NO_REFLINK:
            raise
    offset = 0
    try:
        while offset < size:
            n = os.copy_file_range(src_fd, dst_fd, size - offset, offset, offset)
            if n == 0:
                break
            offset += n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while offset < size:
        chunk = os.pread(src_fd, min(1 << 20, size - offset), offset)
        if not chunk:
            break
        os.pwrite(dst_fd, chunk, offset)
        offset += len(chunk)


def copy_xattrs(src: str, dst: str, upper: Upper | None = None) -> None:
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        if is_private_xattr(name):
            continue
        with contextlib.suppress(OSError):
            # Elsewhere where the upper filesystem would drop it (cowfs.overlay.meta).
            where, as_name = upper.meta.xattr_place(dst, name) if upper else (dst, name)
            os.setxattr(where, as_name, os.getxattr(src, name, follow_symlinks=False),
                        follow_symlinks=False)


def apply_owner_times(at: At, meta: LowerEntry, fd: int | None = None,
                      upper: Upper | None = None) -> None:
    """Owner, mode and times of the lower entry; what the upper filesystem cannot hold goes
    into upper.meta (cowfs.overlay.meta: an xattr, which leaves the times alone)."""
    dir_fd, name = at
    if IS_ROOT:
        if fd is not None:
            os.fchown(fd, meta.uid, meta.gid)
        else:
            os.chown(name, meta.uid, meta.gid, dir_fd=dir_fd, follow_symlinks=False)
    times = (meta.mtime_ns, meta.mtime_ns)
    if fd is not None:
        os.fchmod(fd, stat.S_IMODE(meta.mode))
        os.utime(fd, ns=times)
    elif not stat.S_ISLNK(meta.mode):
        os.chmod(name, stat.S_IMODE(meta.mode), dir_fd=dir_fd)
        os.utime(name, ns=times, dir_fd=dir_fd)
    else:
        os.utime(name, ns=times, dir_fd=dir_fd, follow_symlinks=False)
    if upper is not None and upper.meta.active:
        upper.meta.record(None if fd is not None else proc(at), fd=fd, mode=meta.mode,
                          uid=meta.uid, gid=meta.gid, times=times, fresh=True)


def prepare_file(upper: Upper, meta: LowerEntry, *, with_data: bool) -> At:
    """Build a complete copy of a lower regular file in the work dir; returns where it is."""
    assert meta.source is not None
    tmp = upper.temp()
    out = os.open(tmp[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                  dir_fd=tmp[0])
    try:
        if with_data and meta.size:
            src_dir, src_name = meta.at()
            src = os.open(src_name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=src_dir)
            try:
                copy_fd_data(src, out, meta.size)
            finally:
                os.close(src)
        copy_xattrs(proc(meta.at()), proc(tmp), upper)
        apply_owner_times(tmp, meta, out, upper)
        os.fsync(out)
    except BaseException:
        os.close(out)
        with contextlib.suppress(OSError):
            os.unlink(tmp[1], dir_fd=tmp[0])
        raise
    os.close(out)
    return tmp


def prepare_other(upper: Upper, meta: LowerEntry, symlink_target: str | None) -> At:
    """Directories, symlinks, devices and fifos: metadata only."""
    tmp = upper.temp()
    work, name = tmp
    kind = stat.S_IFMT(meta.mode)
    if kind == stat.S_IFDIR:
        os.mkdir(name, 0o700, dir_fd=work)
    elif kind == stat.S_IFLNK:
        assert symlink_target is not None
        os.symlink(symlink_target, name, dir_fd=work)
    else:
        os.mknod(name, meta.mode, meta.rdev, dir_fd=work)
    try:
        if kind != stat.S_IFDIR:
            upper.meta.clear_side(proc(tmp))
        if meta.source is not None:
            copy_xattrs(proc(meta.at()), proc(tmp), upper)
        apply_owner_times(tmp, meta, upper=upper)
    except BaseException:
        with contextlib.suppress(OSError):
            (os.rmdir if kind == stat.S_IFDIR else os.unlink)(name, dir_fd=work)
        raise
    return tmp


def publish(upper: Upper, tmp: At, rel: str) -> None:
    """Rename the prepared entry into place and make the rename durable.

    A copy-up is invisible in the merged view, so the parent's times are put back after the
    rename adds an entry to it (as overlayfs does): otherwise writing a file would change
    the mtime of its directory, and with it anything keyed on that (caches, make, rsync).
    """
    parent = rel.rpartition("/")[0]
    pst = upper.lstat(parent)
    tst = os.lstat(tmp[1], dir_fd=tmp[0])
    # rename(2) of a directory to another parent rewrites its "..": an unprivileged
    # daemon needs write access to it for the moment (a lower dir may well be 0555).
    lend_write = not IS_ROOT and stat.S_ISDIR(tst.st_mode) and not tst.st_mode & 0o200
    if lend_write:
        os.chmod(tmp[1], stat.S_IMODE(tst.st_mode) | 0o200, dir_fd=tmp[0])
    with owner_writable(upper.at(parent)):
        upper.install(tmp, rel)
    if lend_write:
        fd, name = upper.at(rel)
        os.chmod(name, stat.S_IMODE(tst.st_mode), dir_fd=fd)
    if pst is not None:
        fd, name = upper.at(parent)
        os.utime(name, ns=(pst.st_atime_ns, pst.st_mtime_ns), dir_fd=fd)
    upper.fsync_dir(parent)
