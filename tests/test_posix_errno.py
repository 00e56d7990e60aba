"""POSIX conformance, errno-exact: every operation of a table runs on a mount over a populated
lower (and an upper written through the mount) and on a plain ext4 directory holding the same
tree, as root and as an unprivileged user (setpriv), and must give the same errno and leave
the same tree behind (types, modes, owners, sizes, contents, link targets, nlink, xattrs).

The top of this file is the case runner: stdlib only, so that a copy of it run by a system
interpreter (`PYTHON -I COPY run DIR ...`, conftest.user_python) works for a user who cannot
reach the project's interpreter or checkout. The pytest side starts below the `__main__` guard.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import sys
import time
from pathlib import Path

try:  # pytest imports the package; the runner's copy runs next to a copy of posix_deep
    from tests.posix_deep import DEEP_CASES, DEEP_EXPECT, snapshot
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from posix_deep import DEEP_CASES, DEEP_EXPECT, snapshot  # type: ignore[no-redef]

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
AT_FDCWD, AT_SYMLINK_NOFOLLOW = -100, 0x100
_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(ret: int, path: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def renameat2(old: str, new: str, flags: int) -> None:
    _check(_libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags), old)


def utimensat(path: str, atime: tuple[int, int], mtime: tuple[int, int], flags: int = 0) -> None:
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    _check(_libc.utimensat(AT_FDCWD, os.fsencode(path), times, flags), path)


def opens(path: str, flags: int, data: bytes = b"") -> None:
    fd = os.open(path, flags, 0o640)
    try:
        if data:
            os.write(fd, data)
    finally:
        os.close(fd)


def read(path: str) -> str: return Path(path).read_bytes().decode("latin-1")
def mtime(path: str, follow: bool = True) -> int: return os.stat(path, follow_symlinks=follow)\
    .st_mtime_ns
def recent(ns: int) -> bool: return abs(ns / 1e9 - time.time()) < 120


# -- the cases: each runs with its own fresh copy of the layout as cwd -----------------------


def c_chmod_lower(o): os.chmod("lf", 0o600)
def c_chmod_upper(o): os.chmod("uf", 0o640)
def c_chmod_dir(o): os.chmod("ld", 0o700)
def c_chmod_via_symlink(o): os.chmod("lsym", 0o604)
def c_chmod_suid_bits(o): os.chmod("lf", 0o6755)
def c_chmod_not_owner(o): os.chmod("rootf", 0o666)
def c_chmod_sgid_foreign_group(o): os.chmod("sgid/f", 0o2775)
def c_chmod_missing(o): os.chmod("nope", 0o600)
def c_chown_to_other(o): os.chown("lf", o["uid"], -1)
def c_chown_to_self(o): os.chown("lf", os.getuid(), os.getgid())
def c_chown_other_group(o): os.chown("lf", -1, o["gid"])
def c_lchown_symlink(o): os.chown("lsym", o["uid"], -1, follow_symlinks=False)
def c_chown_dir(o): os.chown("ld", os.getuid(), o["gid"])


def c_link_lower_then_write(o):
    os.link("lf", "lf2")
    opens("lf2", os.O_WRONLY, b"X")
    return read("lf"), os.stat("lf").st_nlink, os.path.samestat(os.stat("lf"), os.stat("lf2"))


def c_link_upper(o): return (os.link("uf", "ud/uf2"), os.stat("uf").st_nlink)[1]


def c_link_twice_then_unlink(o):
    os.link("lf", "a")
    os.link("a", "ld/b")
    os.unlink("lf")
    return os.stat("a").st_nlink, read("ld/b")


def c_link_dir(o): os.link("ld", "ld2")
def c_link_exists(o): os.link("lf", "uf")
def c_link_missing(o): os.link("nope", "x")
def c_link_not_owned(o): os.link("rootf", "rootf2")  # fs.protected_hardlinks
def c_link_into_rodir(o): os.link("lf", "rodir/lf")
def c_mkdir_exists_dir(o): os.mkdir("ld")
def c_mkdir_exists_file(o): os.mkdir("lf")
def c_mkdir_exists_symlink(o): os.mkdir("lsym")
def c_mkdir_dangling_symlink(o): os.mkdir("dangling")
def c_mkdir_new(o): os.mkdir("ld/n", 0o750)
def c_mkdir_sgid_inherit(o): os.mkdir("sgid/n", 0o755)
def c_mkdir_in_rodir(o): os.mkdir("rodir/n")
def c_mkdir_missing_parent(o): os.mkdir("nope/n")
def c_mkdir_through_file(o): os.mkdir("lf/n")
def c_mkdir_after_rmdir(o): (os.rmdir("le"), os.mkdir("le", 0o700))
def c_mkfifo_new(o): os.mkfifo("fifo", 0o640)
def c_mkfifo_exists(o): os.mkfifo("lf")
def c_mknod_regular(o): os.mknod("reg", stat.S_IFREG | 0o600)
def c_mknod_char_device(o): os.mknod("null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
def c_mknod_socket(o): os.mknod("sock", stat.S_IFSOCK | 0o600)
def c_mknod_in_rodir(o): os.mknod("rodir/reg", stat.S_IFREG | 0o600)


EXCL = os.O_CREAT | os.O_EXCL | os.O_WRONLY
def c_open_excl_lower(o): opens("lf", EXCL)
def c_open_excl_upper(o): opens("uf", EXCL)
def c_open_excl_symlink(o): opens("lsym", EXCL)
def c_open_excl_dangling(o): opens("dangling", EXCL)
def c_open_excl_new(o): opens("new", EXCL, b"fresh")
def c_open_creat_dangling(o): opens("dangling", os.O_CREAT | os.O_WRONLY, b"made")
def c_open_directory_on_file(o): opens("lf", os.O_RDONLY | os.O_DIRECTORY)
def c_open_directory_on_dir(o): opens("ld", os.O_RDONLY | os.O_DIRECTORY)
def c_open_nofollow_symlink(o): opens("lsym", os.O_RDONLY | os.O_NOFOLLOW)
def c_open_nofollow_component(o): opens("ldsym/x", os.O_RDONLY | os.O_NOFOLLOW)
def c_open_wronly_dir(o): opens("ld", os.O_WRONLY)
def c_open_rdwr_dir(o): opens("ud", os.O_RDWR)
def c_open_creat_dir(o): opens("ld", os.O_CREAT | os.O_RDONLY)
def c_open_creat_trailing_slash(o): opens("newf/", os.O_CREAT | os.O_WRONLY)
def c_open_trunc_lower(o): opens("lf", os.O_WRONLY | os.O_TRUNC)
def c_open_trunc_rdonly(o): opens("lf", os.O_RDONLY | os.O_TRUNC)
def c_open_trunc_upper(o): opens("uf", os.O_RDWR | os.O_TRUNC, b"n")
def c_open_write_ro_file(o): opens("lro", os.O_WRONLY, b"W")
def c_open_trunc_ro_file(o): opens("lro", os.O_RDONLY | os.O_TRUNC)
def c_open_write_not_owned(o): opens("rootf", os.O_WRONLY, b"W")
def c_open_write_world_writable(o): opens("rootw", os.O_WRONLY, b"W")
def c_open_creat_in_rodir(o): opens("rodir/new", os.O_CREAT | os.O_WRONLY)
def c_open_write_in_rodir(o): opens("rodir/inside", os.O_WRONLY, b"I")
def c_open_append_lower(o): opens("lf", os.O_WRONLY | os.O_APPEND, b"more\n")
def c_open_through_file(o): opens("lf/x", os.O_RDONLY)
def c_open_missing(o): opens("nope", os.O_RDONLY)
def c_open_loop(o): opens("loop1", os.O_RDONLY)
def c_open_loop_component(o): opens("loop1/x", os.O_RDONLY)
def c_open_empty_path(o): opens("", os.O_RDONLY)
def c_write_clears_suid(o): opens("suid", os.O_WRONLY, b"S")
def c_rename_upper_over_lower(o): os.rename("uf", "lf")
def c_rename_lower_over_upper(o): os.rename("lf", "uf")
def c_rename_lower_to_new(o): os.rename("lf", "ld/moved")
def c_rename_lower_dir(o): os.rename("ld", "ud/ld")
def c_rename_dir_onto_empty_dir(o): os.rename("ld", "le")
def c_rename_dir_onto_nonempty(o): os.rename("ue", "ld")
def c_rename_dir_onto_nonempty_upper(o): os.rename("le", "ud")
def c_rename_file_onto_dir(o): os.rename("lf", "le")
def c_rename_dir_onto_file(o): os.rename("ld", "lf")
def c_rename_dir_into_itself(o): os.rename("ld", "ld/sub")
def c_rename_same_name(o): os.rename("lf", "lf")
def c_rename_symlink(o): os.rename("lsym", "ld/lsym")
def c_rename_trailing_slash_file(o): os.rename("lf/", "x")
def c_rename_noreplace_exists(o): renameat2("lf", "uf", RENAME_NOREPLACE)
def c_rename_noreplace_new(o): renameat2("lf", "new", RENAME_NOREPLACE)
def c_rename_exchange_file_dir(o): renameat2("lf", "ud", RENAME_EXCHANGE)
def c_rename_exchange_dirs(o): renameat2("ld", "ud", RENAME_EXCHANGE)
def c_rename_exchange_files(o): renameat2("uf", "lf", RENAME_EXCHANGE)
def c_rename_exchange_missing(o): renameat2("lf", "nope", RENAME_EXCHANGE)
def c_rename_bad_flags(o): renameat2("lf", "x", RENAME_NOREPLACE | RENAME_EXCHANGE)
def c_rename_in_sticky_not_owner(o): os.rename("sticky/rootfile", "sticky/x")
def c_rename_in_sticky_owner(o): os.rename("sticky/mine", "sticky/x")
def c_rename_out_of_rodir(o): os.rename("rodir/inside", "x")
def c_rename_dir_out_of_rodir(o): os.rename("rodir/sub", "x")
def c_rename_over_whiteout_dir(o): (os.unlink("ld/x"), os.rename("ue", "ld"))


def c_rename_hardlinks_same_inode(o): return (os.link("lf", "lf2"), os.rename("lf", "lf2"),
                                               sorted(os.listdir(".")))[2]


def c_rmdir_nonempty_lower(o): os.rmdir("ld")
def c_rmdir_nonempty_upper(o): os.rmdir("ud")
def c_rmdir_file(o): os.rmdir("lf")
def c_rmdir_symlink_to_dir(o): os.rmdir("ldsym")
def c_rmdir_empty_lower(o): os.rmdir("le")
def c_rmdir_empty_upper(o): os.rmdir("ue")
def c_rmdir_merged_empty(o): (os.unlink("ld/x"), os.rmdir("ld"))
def c_rmdir_dot(o): os.rmdir("le/.")
def c_rmdir_missing(o): os.rmdir("nope")
def c_rmdir_in_rodir(o): os.rmdir("rodir/sub")
def c_symlink_new(o): return (os.symlink("lf", "s2"), os.readlink("s2"))[1]
def c_symlink_exists(o): os.symlink("x", "lf")
def c_symlink_dangling(o): os.symlink("../nowhere/at/all", "s2")
def c_symlink_empty_target(o): os.symlink("", "s2")
def c_symlink_in_rodir(o): os.symlink("x", "rodir/s")
def c_truncate_lower_shrink(o): os.truncate("lf", 3)
def c_truncate_lower_grow(o): os.truncate("lf", 10000)
def c_truncate_lower_zero(o): os.truncate("lf", 0)
def c_truncate_upper(o): os.truncate("uf", 1)
def c_truncate_dir(o): os.truncate("ld", 0)
def c_truncate_negative(o): os.truncate("lf", -1)
def c_truncate_ro_file(o): os.truncate("lro", 1)
def c_truncate_via_symlink(o): os.truncate("lsym", 2)
def c_truncate_clears_suid(o): os.truncate("suid", 1)


def c_ftruncate_rdonly(o):
    fd = os.open("lf", os.O_RDONLY)
    try:
        os.ftruncate(fd, 1)
    finally:
        os.close(fd)


def c_ftruncate_rdwr(o):
    fd = os.open("lf", os.O_RDWR)
    try:
        os.ftruncate(fd, 5)
        os.ftruncate(fd, 7)
        return os.pread(fd, 10, 0).decode("latin-1"), os.fstat(fd).st_size
    finally:
        os.close(fd)


def c_ftruncate_ro_mode_after_create(o):
    fd = os.open("new", os.O_CREAT | os.O_RDWR, 0o444)
    try:
        os.ftruncate(fd, 4)
        os.write(fd, b"ok")
    finally:
        os.close(fd)


def c_unlink_dir(o): os.unlink("ld")
def c_unlink_upper_dir(o): os.unlink("ud")
def c_unlink_lower(o): return (os.unlink("lf"), os.path.lexists("lf"))[1]
def c_unlink_upper(o): os.unlink("uf")
def c_unlink_symlink(o): os.unlink("lsym")
def c_unlink_missing(o): os.unlink("nope")
def c_unlink_sticky_not_owner(o): os.unlink("sticky/rootfile")
def c_unlink_sticky_owner(o): os.unlink("sticky/mine")
def c_unlink_in_rodir(o): os.unlink("rodir/inside")
def c_unlink_through_file(o): os.unlink("lf/x")
def c_unlink_then_recreate(o): (os.unlink("lf"), opens("lf", os.O_CREAT | os.O_WRONLY, b"new"))


def c_unlink_open_file(o):
    fd = os.open("lf", os.O_RDONLY)
    try:
        os.unlink("lf")
        return os.read(fd, 100).decode(), os.fstat(fd).st_nlink
    finally:
        os.close(fd)


def c_utime_explicit(o):
    os.utime("lf", ns=(5_000_000_001, 7_000_000_002))
    st = os.stat("lf")
    return st.st_atime_ns, st.st_mtime_ns


def c_utime_now(o): return (os.utime("lf"), recent(mtime("lf")))[1]
def c_utime_dir(o): return (os.utime("ld", ns=(1, 2)), mtime("ld"))[1]


def c_utime_omit_mtime(o):
    before = mtime("lf")
    utimensat("lf", (3, 0), (0, UTIME_OMIT))
    return os.stat("lf").st_atime_ns, mtime("lf") == before


def c_utime_omit_both(o): return (t := mtime("lf"), utimensat("lf", (0, UTIME_OMIT),
                                   (0, UTIME_OMIT)), mtime("lf") == t)[2]


def c_utime_now_and_omit(o):
    before = mtime("lf")
    utimensat("lf", (0, UTIME_NOW), (0, UTIME_OMIT))
    return recent(os.stat("lf").st_atime_ns), mtime("lf") == before


def c_utime_symlink_nofollow(o):
    before = mtime("lf")
    utimensat("lsym", (4, 0), (6, 0), AT_SYMLINK_NOFOLLOW)
    return mtime("lsym", follow=False), mtime("lf") == before


def c_utime_not_owner_now(o): utimensat("rootf", (0, UTIME_NOW), (0, UTIME_NOW))
def c_utime_not_owner_explicit(o): os.utime("rootf", ns=(1, 1))
def c_utime_writable_not_owner_now(o): utimensat("rootw", (0, UTIME_NOW), (0, UTIME_NOW))
def c_utime_writable_not_owner_explicit(o): os.utime("rootw", ns=(1, 1))
def c_utime_ro_file_owner(o): return (os.utime("lro", ns=(8, 9)), mtime("lro"))[1]


N255, N256 = "n" * 255, "n" * 256
U255, U256 = "\u00e9" * 127 + "x", "\u00e9" * 128  # 255 and 256 bytes in UTF-8
def c_name_255_create(o): return (opens(N255, os.O_CREAT | os.O_WRONLY, b"ok"), read(N255))[1]
def c_name_255_utf8(o): return (os.mkdir(U255), os.listdir(".").count(U255))[1]
def c_name_256_create(o): opens(N256, os.O_CREAT | os.O_WRONLY)
def c_name_256_utf8(o): os.mkdir(U256)
def c_name_256_stat(o): os.stat(N256)
def c_name_256_mkdir(o): os.mkdir(N256)
def c_name_256_rename(o): os.rename("lf", N256)
def c_name_256_symlink(o): os.symlink("lf", N256)
def c_name_256_link(o): os.link("lf", N256)
def c_name_256_unlink(o): os.unlink(N256)
def c_eloop_stat(o): os.stat("loop1")
def c_eloop_lstat(o): return stat.S_ISLNK(os.lstat("loop1").st_mode)
def c_eloop_component(o): os.stat("loop1/x")
def c_eloop_mkdir_under(o): os.mkdir("loop1/x")


def chain(n: int) -> None:
    for i in range(n):
        os.symlink(f"c{i + 1}" if i + 1 < n else "lf", f"c{i}")


def c_eloop_chain_40(o): return (chain(40), read("c0"))[1]
def c_eloop_chain_41(o): return (chain(41), read("c0"))[1]
def c_enotdir_stat(o): os.stat("lf/x")
def c_enotdir_trailing_slash(o): os.stat("lf/")
def c_enotdir_via_symlink(o): os.stat("lsym/x")
def c_enotdir_listdir(o): os.listdir("lf")
def c_enotdir_upper_file(o): os.stat("uf/x")
def c_access_bits(o): return [os.access(p, m) for p in ("lro", "rootf", "rodir", "lf", "lx")
                       for m in (os.R_OK, os.W_OK, os.X_OK)]
def c_xattr_set_get(o): return (os.setxattr("lf", "user.k", b"v"), os.getxattr("lf", "user.k")
                                 .decode())[1]
def c_xattr_missing(o): os.getxattr("lf", "user.nope")
def c_xattr_not_owner(o): os.setxattr("rootf", "user.k", b"v")
def c_xattr_remove_missing(o): os.removexattr("lf", "user.nope")
def c_xattr_create_exists(o): (os.setxattr("lf", "user.k", b"1"),
                               os.setxattr("lf", "user.k", b"2", os.XATTR_CREATE))
def c_xattr_replace_missing(o): os.setxattr("lf", "user.k", b"1", os.XATTR_REPLACE)
def c_sgid_create_file(o): opens("sgid/new", os.O_CREAT | os.O_WRONLY, b"g")


CASES = {name[2:]: fn for name, fn in dict(globals()).items() if name.startswith("c_")}
CASES.update(DEEP_CASES)

# -- layout and snapshots --------------------------------------------------------------------

# (path, kind, data or target, mode, owner) -- owner u: the test user, r: root,
# g: the test user with the other group. LOWER goes into the lower layer (or the native dir);
# UPPER is written through the mount, so it lives in the upper layer.
LOWER = [
    ("lf", "f", b"lower file\n", 0o644, "u"), ("lx", "f", b"#!/bin/sh\n", 0o755, "u"),
    ("lro", "f", b"read only\n", 0o444, "u"), ("ld", "d", None, 0o755, "u"),
    ("ld/x", "f", b"x\n", 0o644, "u"), ("le", "d", None, 0o755, "u"),
    ("lsym", "l", "lf", None, "u"), ("ldsym", "l", "ld", None, "u"),
    ("dangling", "l", "nowhere", None, "u"), ("loop1", "l", "loop2", None, "u"),
    ("loop2", "l", "loop1", None, "u"), ("rootf", "f", b"root's\n", 0o644, "r"),
    ("rootw", "f", b"root writable\n", 0o666, "r"), ("rodir", "d", None, 0o555, "u"),
    ("rodir/inside", "f", b"i\n", 0o644, "u"), ("rodir/sub", "d", None, 0o755, "u"),
    ("sticky", "d", None, 0o1777, "r"), ("sticky/rootfile", "f", b"r\n", 0o644, "r"),
    ("sticky/mine", "f", b"m\n", 0o644, "u"), ("sgid", "d", None, 0o2775, "g"),
    ("sgid/f", "f", b"g\n", 0o664, "g"), ("suid", "f", b"suid\n", 0o4755, "u"),
]
UPPER = [
    ("uf", "f", b"upper file\n", 0o644, "u"), ("ud", "d", None, 0o755, "u"),
    ("ud/y", "f", b"y\n", 0o644, "u"), ("ue", "d", None, 0o755, "u"),
    ("usym", "l", "uf", None, "u"),
]


def build(root: str, entries: list, ids: dict[str, tuple[int, int]]) -> None:
    """Create entries under root; owners and modes last (children of 0555 dirs first)."""
    for rel, kind, data, _, _ in entries:
        path = os.path.join(root, rel)
        if kind == "d":
            os.mkdir(path)
        elif kind == "l":
            os.symlink(data, path)
        else:
            opens(path, os.O_CREAT | os.O_WRONLY, data)
    for rel, _kind, _, mode, owner in reversed(entries):
        path = os.path.join(root, rel)
        os.chown(path, *ids[owner], follow_symlinks=False)
        if mode is not None:
            os.chmod(path, mode)


def run_cases(top: str, other: dict[str, int]) -> dict[str, list]:
    os.umask(0o022)
    results = {}
    for name, fn in CASES.items():
        os.chdir(os.path.join(top, name))
        try:
            value = fn(other)
            result = ["ok", value]
        except OSError as exc:
            result = ["err", errno.errorcode.get(exc.errno, str(exc.errno))]
        os.chdir(top)
        results[name] = [result, snapshot(os.path.join(top, name))]
    return results


if __name__ == "__main__":  # the runner: THIS_FILE run TOP OTHER_UID OTHER_GID
    _, _, top_dir, other_uid, other_gid = sys.argv
    json.dump(run_cases(top_dir, {"uid": int(other_uid), "gid": int(other_gid)}), sys.stdout)
    sys.exit(0)

# -- the pytest side -------------------------------------------------------------------------

import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from cowfs.mount import mount as mounting  # noqa: E402
from cowfs.mount.spec import MountSpec  # noqa: E402
from tests.conftest import (  # noqa: E402
    as_user,
    ensure_user,
    fingerprint,
    force_unmount,
    user_python,
)

USER = "cowfs-errno"
OTHER = {"uid": 54321, "gid": 54321}
WHO = ("root", "user")

# What the native directory must answer (keeps the table honest: a case that stopped
# exercising its errno would otherwise pass silently on both sides). (root, user).
EXPECT = {
    "chmod_not_owner": ("ok", "EPERM"), "chown_to_other": ("ok", "EPERM"),
    "chown_other_group": ("ok", "EPERM"), "link_dir": ("EPERM", "EPERM"),
    "link_exists": ("EEXIST", "EEXIST"), "link_not_owned": ("ok", "EPERM"),
    "mkdir_exists_symlink": ("EEXIST", "EEXIST"), "mkdir_in_rodir": ("ok", "EACCES"),
    "mkdir_through_file": ("ENOTDIR", "ENOTDIR"), "mknod_char_device": ("ok", "EPERM"),
    "open_excl_lower": ("EEXIST", "EEXIST"), "open_excl_dangling": ("EEXIST", "EEXIST"),
    "open_directory_on_file": ("ENOTDIR", "ENOTDIR"), "open_nofollow_symlink": ("ELOOP",) * 2,
    "open_wronly_dir": ("EISDIR", "EISDIR"), "open_creat_dir": ("EISDIR", "EISDIR"),
    "open_write_ro_file": ("ok", "EACCES"), "open_trunc_ro_file": ("ok", "EACCES"),
    "open_creat_in_rodir": ("ok", "EACCES"), "open_loop": ("ELOOP", "ELOOP"),
    "rename_dir_onto_nonempty": ("ENOTEMPTY",) * 2, "rename_file_onto_dir": ("EISDIR",) * 2,
    "rename_dir_onto_file": ("ENOTDIR",) * 2, "rename_dir_into_itself": ("EINVAL",) * 2,
    "rename_noreplace_exists": ("EEXIST",) * 2, "rename_exchange_file_dir": ("ok", "ok"),
    "rename_exchange_missing": ("ENOENT",) * 2, "rename_in_sticky_not_owner": ("ok", "EPERM"),
    "rename_out_of_rodir": ("ok", "EACCES"), "rmdir_nonempty_lower": ("ENOTEMPTY",) * 2,
    "rmdir_file": ("ENOTDIR",) * 2, "rmdir_dot": ("EINVAL",) * 2,
    "truncate_dir": ("EISDIR",) * 2, "truncate_ro_file": ("ok", "EACCES"),
    "ftruncate_rdonly": ("EINVAL",) * 2, "unlink_dir": ("EISDIR",) * 2,
    "unlink_sticky_not_owner": ("ok", "EPERM"), "unlink_in_rodir": ("ok", "EACCES"),
    "utime_not_owner_now": ("ok", "EACCES"), "utime_not_owner_explicit": ("ok", "EPERM"),
    "utime_writable_not_owner_now": ("ok", "ok"),
    "utime_writable_not_owner_explicit": ("ok", "EPERM"),
    "name_255_create": ("ok", "ok"), "name_256_create": ("ENAMETOOLONG",) * 2,
    "name_256_utf8": ("ENAMETOOLONG",) * 2, "eloop_stat": ("ELOOP",) * 2,
    "eloop_chain_40": ("ok", "ok"), "eloop_chain_41": ("ELOOP",) * 2,
    "enotdir_stat": ("ENOTDIR",) * 2, "xattr_create_exists": ("EEXIST",) * 2,
    "xattr_replace_missing": ("ENODATA",) * 2, **DEEP_EXPECT,
}
# Known differences that cannot be fixed in cowfs: (case, who) -> reason.
XFAIL: dict[tuple[str, str], str] = {}


def runner(script: Path, top: Path, who: str, uid: int, gid: int) -> subprocess.Popen[str]:
    cmd = [user_python(uid, gid), "-I", str(script), "run", str(top), str(OTHER["uid"]),
           str(OTHER["gid"])]
    if who == "user":
        cmd = as_user(uid, gid, *cmd)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(proc: subprocess.Popen[str]) -> dict[str, list]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def results() -> Iterator[dict[tuple[str, str], Any]]:
    """Build both trees, mount, run the table as root and as the user on both sides.

    The upper half of each case's layout is written straight into the upper directory
    (as a previous mount would have left it); the lower half is copied with cp -a.
    """
    uid, gid = ensure_user(USER)
    user_python(uid, gid)  # skips if there is none
    ids = {"u": (uid, gid), "r": (0, 0), "g": (uid, OTHER["gid"])}
    base = Path(tempfile.mkdtemp(prefix="cowfs-errno-", dir="/tmp"))
    base.chmod(0o755)  # the user must reach the mount and the native dir
    mnt = base / "mnt"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COWFS_RUNTIME_DIR", str(base / "run"))
        try:
            for d in ("tmpl", "native", "lower", "mnt", "upper", "work"):
                (base / d).mkdir(mode=0o755)
            for name in CASES:
                (base / "tmpl" / name).mkdir()
                build(str(base / "tmpl" / name), LOWER, ids)
                os.chown(base / "tmpl" / name, *ids["u"])
            for side in ("native", "lower"):
                for who in WHO:
                    subprocess.run(["cp", "-a", str(base / "tmpl"), str(base / side / who)],
                                   check=True)
            for who in WHO:
                (base / "upper" / who).mkdir(mode=0o755)
                for name in CASES:
                    (base / "upper" / who / name).mkdir(mode=0o755)
                    os.chown(base / "upper" / who / name, *ids["u"])
                    for side in ("native", "upper"):
                        build(str(base / side / who / name), UPPER, ids)
            lower_before = fingerprint(base / "lower")
            spec = MountSpec(mountpoint=str(mnt), upper=str(base / "upper"),
                             work=str(base / "work"), log=str(base / "daemon.log"),
                             lowerdirs=[str(base / "lower")], allow_other=True)
            # The user runs a copy of this file: the checkout may be closed to others (a 0700
            # parent such as mktemp -d), base is not.
            script = base / "errno_runner.py"
            shutil.copyfile(__file__, script)
            shutil.copyfile(Path(__file__).with_name("posix_deep.py"), base / "posix_deep.py")
            for copy in (script, base / "posix_deep.py"):
                copy.chmod(0o644)
            mounting.mount(spec)
            procs = {(side, who): runner(script,
                                         base / side / who if side == "native" else mnt / who,
                                         who, uid, gid)
                     for side in ("native", "mount") for who in WHO}
            runs = {key: collect(proc) for key, proc in procs.items()}
            out: dict[tuple[str, str], Any] = {
                (name, who): (runs[("native", who)][name], runs[("mount", who)][name])
                for who in WHO for name in CASES}
            if dump := os.environ.get("COWFS_ERRNO_DUMP"):  # for eyeballing the table
                Path(dump).write_text(json.dumps({f"{w}-{n}": v for (n, w), v in out.items()}))
            out[("lower", "")] = lower_before == fingerprint(base / "lower")
            log = (base / "daemon.log").read_text()
            out[("log", "")] = [ln for ln in log.splitlines() if "ERROR" in ln or "Trace" in ln]
            yield out
        finally:
            force_unmount(str(mnt))
            subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


def _params() -> list[Any]:
    out = []
    for who in WHO:
        for name in CASES:
            marks = []
            if (name, who) in XFAIL:
                marks.append(pytest.mark.xfail(strict=True, reason=XFAIL[(name, who)]))
            out.append(pytest.param(name, who, marks=marks, id=f"{who}-{name}"))
    return out


@pytest.mark.parametrize(("case", "who"), _params())
def test_errno_and_tree_match_native(results: dict[tuple[str, str], Any], case: str,
                                     who: str) -> None:
    (native_result, native_tree), (mount_result, mount_tree) = results[(case, who)]
    if case in EXPECT:
        want = EXPECT[case][WHO.index(who)]
        got = native_result[0] if want == "ok" else native_result[1]
        assert got == want, f"the native directory answers {native_result}: fix the case"
    assert mount_result == native_result, f"result differs: native {native_result}"
    assert mount_tree == native_tree, "the tree left behind differs"


def test_lower_unchanged_and_daemon_log_clean(results: dict[tuple[str, str], Any]) -> None:
    assert results[("lower", "")], "the lower layer was modified through the mount"
    assert results[("log", "")] == [], "the daemon logged internal errors (EIO answers)"


def test_table_covers_the_brief() -> None:
    ops = {"chmod", "chown", "link", "mkdir", "mkfifo", "mknod", "open", "rename", "rmdir",
           "symlink", "truncate", "ftruncate", "unlink", "utime", "name", "eloop", "enotdir"}
    assert ops <= {name.split("_")[0] for name in CASES}
