"""Deep-path cases of the errno table (tests/test_posix_errno.py) and a tree snapshot that
works at any depth. Stdlib only: the table's runner imports it from a copy next to its own.

Each operation runs on a path of PATH_MAX-1 bytes relative to the case's working directory
(nested 255-byte components made with mkdir -p), which must work as on a plain directory,
and on one of PATH_MAX bytes, which the kernel refuses (ENAMETOOLONG) before the file
system sees it. The daemon's own path to such an entry (layer root + path) is longer than
PATH_MAX: these cases are about how it reaches it (cowfs.dirfd). The deep_cwd cases work
from a working directory that is itself ~PATH_MAX deep, and move a lower directory there.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat

MAX = 4095  # PATH_MAX - 1: the longest path a syscall takes


def deep(total: int, leaf: str = "f") -> str:
    """A relative path of exactly total bytes ending in a 100-byte name made of leaf; its
    parent directories are created (255-byte components, the last one shortened to fit)."""
    rest = total - 101
    parts = []
    while rest > 255:
        take = min(255, rest - 2)  # leave "/" plus at least one byte
        parts.append("d" * take)
        rest -= take + 1
    parts.append("d" * rest)
    parent = "/".join(parts)
    os.makedirs(parent, exist_ok=True)
    return f"{parent}/{leaf * 100}"


def deep_file(total: int = MAX, leaf: str = "f") -> str:
    path = deep(total, leaf)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o640)
    os.write(fd, b"deep data\n")
    os.close(fd)
    return path


def mode(path: str) -> int: return stat.S_IMODE(os.lstat(path).st_mode)


def c_deep_chmod(o): return (os.chmod(p := deep_file(), 0o600), mode(p))[1]
def c_deep_chown(o): os.chown(deep_file(), os.getuid(), os.getgid())


def c_deep_ftruncate(o):
    fd = os.open(deep(MAX), os.O_CREAT | os.O_RDWR, 0o640)
    try:
        os.write(fd, b"0123456789")
        os.ftruncate(fd, 4)
        return os.pread(fd, 20, 0).decode()
    finally:
        os.close(fd)


def c_deep_link(o): return (os.link(p := deep_file(), deep(MAX, "g")), os.stat(p).st_nlink)[1]
def c_deep_link_lower(o): return (os.link("lf", deep(MAX, "g")), os.stat("lf").st_nlink)[1]
def c_deep_mkdir(o): return (os.mkdir(p := deep(MAX), 0o750), mode(p))[1]
def c_deep_mkfifo(o): return (os.mkfifo(p := deep(MAX), 0o640), mode(p))[1]
def c_deep_mknod(o): os.mknod(deep(MAX), stat.S_IFREG | 0o600)
def c_deep_open(o): return (fd := os.open(deep_file(), os.O_RDONLY), os.read(fd, 99).decode(),
                           os.close(fd))[1]
def c_deep_rename(o): os.rename(deep_file(), deep(MAX, "g"))
def c_deep_rename_lower(o): (os.rename("lf", p := deep(MAX)), os.rename(p, "lf2"))
def c_deep_rmdir(o): (os.mkdir(p := deep(MAX)), os.rmdir(p))
def c_deep_symlink(o): return (os.symlink("lf", p := deep(MAX)), os.readlink(p))[1]
def c_deep_truncate(o): return (os.truncate(p := deep_file(), 2), os.stat(p).st_size)[1]
def c_deep_unlink(o): return (os.unlink(p := deep_file()), os.path.lexists(p))[1]


def c_deep_chmod_too_long(o): os.chmod(deep(MAX + 1), 0o600)
def c_deep_chown_too_long(o): os.chown(deep(MAX + 1), os.getuid(), -1)
def c_deep_ftruncate_too_long(o): os.open(deep(MAX + 1), os.O_CREAT | os.O_RDWR, 0o640)
def c_deep_link_too_long(o): os.link("lf", deep(MAX + 1))
def c_deep_mkdir_too_long(o): os.mkdir(deep(MAX + 1))
def c_deep_mkfifo_too_long(o): os.mkfifo(deep(MAX + 1))
def c_deep_mknod_too_long(o): os.mknod(deep(MAX + 1), stat.S_IFREG | 0o600)
def c_deep_open_too_long(o): os.open(deep(MAX + 1), os.O_CREAT | os.O_WRONLY, 0o640)
def c_deep_rename_too_long(o): os.rename("lf", deep(MAX + 1))
def c_deep_rmdir_too_long(o): os.rmdir(deep(MAX + 1))
def c_deep_symlink_too_long(o): os.symlink("lf", deep(MAX + 1))
def c_deep_truncate_too_long(o): os.truncate(deep(MAX + 1), 0)
def c_deep_unlink_too_long(o): os.unlink(deep(MAX + 1))


def c_deep_cwd_ops(o):
    """Every operation again, from a working directory ~PATH_MAX deep (twice that in all)."""
    os.chdir(deep(MAX, "w").rpartition("/")[0])
    p = deep_file()
    os.chmod(p, 0o604)
    os.truncate(p, 4)
    os.link(p, deep(MAX, "l"))
    os.rename(p, q := deep(MAX, "r"))
    os.symlink(q, deep(MAX, "s"))
    os.mkfifo(deep(MAX, "p"))
    os.mknod(deep(MAX, "n"), stat.S_IFREG | 0o600)
    os.mkdir(d := deep(MAX, "d"))
    os.rmdir(d)
    os.mkdir(d)
    os.unlink(deep(MAX, "l"))
    return mode(q), os.stat(q).st_size, sorted(os.listdir(q.rpartition("/")[0]))


def c_deep_cwd_lower_dir(o):
    """A directory with lower content moved ~2*PATH_MAX deep, edited there, moved back."""
    os.chdir(top := deep(MAX, "w").rpartition("/")[0])
    up = "../" * (top.count("/") + 1)
    os.rename(f"{up}ld", p := deep(MAX - 8))  # (p/new: MAX - 4)
    os.unlink(f"{p}/x")
    os.close(os.open(f"{p}/new", os.O_CREAT | os.O_WRONLY, 0o644))
    os.rename(p, f"{up}ld")
    return sorted(os.listdir(f"{up}ld"))


DEEP_CASES = {name[2:]: fn for name, fn in dict(globals()).items() if name.startswith("c_")}
DEEP_EXPECT = {name: ("ENAMETOOLONG",) * 2 if name.endswith("_too_long") else ("ok", "ok")
               for name in DEEP_CASES}


def snapshot(root: str) -> list:
    """Every entry under root: type, mode, owner, nlink, size and digest or link target,
    xattr names. Walks with directory handles, so a tree of any depth works."""
    out: list = []

    def walk(dir_fd: int | None, name: str, rel: str) -> None:
        st = os.lstat(name, dir_fd=dir_fd)
        row = [rel, stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
               st.st_nlink]
        if stat.S_ISREG(st.st_mode):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
                with os.fdopen(fd, "rb") as f:
                    row += [st.st_size, hashlib.sha256(f.read()).hexdigest()[:12]]
            except OSError as exc:
                row += [st.st_size, errno.errorcode[exc.errno]]
        elif stat.S_ISLNK(st.st_mode):
            row.append(os.readlink(name, dir_fd=dir_fd))
        where = name if dir_fd is None else f"/proc/self/fd/{dir_fd}/{name}"
        try:
            row.append(sorted(os.listxattr(where, follow_symlinks=False)))
        except OSError as exc:
            row.append(errno.errorcode[exc.errno])
        out.append(row)
        if stat.S_ISDIR(st.st_mode):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                for child in sorted(os.listdir(sub)):
                    walk(sub, child, os.path.join(rel, child))
            finally:
                os.close(sub)

    walk(None, root, "")
    return out
