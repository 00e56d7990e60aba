"""Third-party stress and verification tools against a real mount: stress-ng and fio.

Both run on a mount over a populated lower (plus a 16 MiB lower file for copy-up under load);
afterwards the daemon log must hold no internal error and the lower must be unchanged.
Skipped (not failed) where the tool is not installed; scripts/test installs both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import fingerprint, force_unmount, populate

from cowfs.mount import mount as mounting

# stress-ng's filesystem class, minus what a FUSE overlay cannot or need not support:
#   bind-mount, binderfs  mount namespaces and binderfs: not about the file system under test
#   verity                fs-verity ioctls: FUSE has no fs-verity
#   fiemap                FS_IOC_FIEMAP: FUSE has no extent maps (the stressor skips itself)
#   fallocate, fpunch, sync-file, inode-flags, chattr, iomix
#                         need fallocate(2) or FS_IOC_[GS]ETFLAGS: pyfuse3 has no fallocate or
#                         ioctl handler, so the kernel answers EOPNOTSUPP/ENOTTY and these do
#                         (next to) no work: they pass, proving nothing
#   flock, fcntl, lockf, locka, lockofd, lease, inotify, dnotify, fanotify
#                         a FUSE fs without lock/notify handlers gets these from the kernel
#                         (local locks, VFS notifications): the overlay is not involved
#   procfs, eventfd, dup, ioprio, handle, io, fsize, chdir
#                         exercise /proc, fd tables, I/O priorities, sync(2) or rlimits, not
#                         the overlay
#   access, chown, dirmany, fstat, mknod, touch
#                         overlay paths the ones below (and the differential test) already
#                         cover; each passes alone (checked with 0.15.06), but every stressor
#                         costs >= 1 s and the suite has a time budget
# What remains covers the namespace, data, metadata and xattr paths, each with --verify.
STRESSORS = ["chmod", "copy-file", "dentry", "dir", "dirdeep", "filename", "getdent", "hdd",
             "link", "open", "rename", "symlink", "utime", "xattr"]
# A concurrent mix on one mount: the daemon serves them all at once.
CONCURRENT = ["dir", "rename", "link", "open", "hdd", "xattr", "utime", "symlink", "chmod"]

FIO_JOB = """\
[global]
directory={mnt}
size=16m
bs=4k
rw=randwrite
verify=crc32c
verify_fatal=1
do_verify=1
randrepeat=1

[psync-new-file]
ioengine=psync
filename=fio-new.dat

[direct-io-on-a-lower-file]
ioengine=psync
direct=1
filename=existing.dat

[mmap-new-file]
ioengine=mmap
filename=fio-mmap.dat
"""


@pytest.fixture
def loaded(tmp_path: Path, overlay_mount: Any) -> Any:
    lower = tmp_path / "lower"
    lower.mkdir()
    populate(lower)
    with open(lower / "existing.dat", "wb") as f:
        f.write(os.urandom(16 << 20))
    before = fingerprint(lower)
    m = overlay_mount(lower)
    yield m
    force_unmount(str(m.mnt))
    log = Path(m.spec.log).read_text(errors="replace")
    assert "ERROR" not in log, f"the daemon logged internal errors:\n{log[-3000:]}"
    assert fingerprint(lower) == before, "the lower was modified"


def run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(shutil.which("stress-ng") is None, reason="stress-ng is not installed")
def test_stress_ng_filesystem_stressors(loaded: Any) -> None:
    work = loaded.mnt / "stress"
    work.mkdir()
    failed = []
    for name in STRESSORS:
        proc = run(["stress-ng", f"--{name}", "1", "--timeout", "1s", "--verify",
                    "--temp-path", str(work)], work, 120)
        if proc.returncode != 0:
            failed.append(f"{name}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
    proc = run(["stress-ng", *[a for s in CONCURRENT for a in (f"--{s}", "1")],
                "--timeout", "3s", "--verify", "--temp-path", str(work)], work, 120)
    if proc.returncode != 0:
        failed.append(f"concurrent mix: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
    assert not failed, "\n\n".join(failed)
    assert (loaded.mnt / "pkg" / "main.py").read_text() == "def main():\n    return 'moo'\n"


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_fio_random_writes_verify_across_a_remount(loaded: Any, tmp_path: Path) -> None:
    job = tmp_path / "verify.fio"
    job.write_text(FIO_JOB.format(mnt=loaded.mnt))
    proc = run(["fio", str(job)], tmp_path, 300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Unmount and mount again: every cache is gone, so this pass reads what the daemon
    # actually stored in the upper dir, with the same offsets and checksums as the writes.
    force_unmount(str(loaded.mnt))
    assert mounting.mount(loaded.spec) == "mounted"
    proc = run(["fio", "--verify_only", str(job)], tmp_path, 300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("fio-new.dat", "existing.dat", "fio-mmap.dat"):
        assert (loaded.mnt / name).read_bytes() == (loaded.upper / name).read_bytes(), name
