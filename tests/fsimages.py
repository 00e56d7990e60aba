"""Small filesystems to put stores and upper layers on: sparse loop images, ntfs-3g, tmpfs.

`mounted(kind, base)` makes and mounts one; `release` unmounts it (a `mount -o loop` mount
detaches its loop device itself; anything still mounted below it is detached first, and a
busy mount is detached lazily) and deletes the image. A kind the kernel or the host refuses
raises `Unavailable` with the reason, which the tests turn into a skip.

The mount points live under a world-traversable base dir so that tests can check permission
enforcement as another user.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

# name -> (image size in MB (0: tmpfs), mkfs command, mount command prefix)
KINDS: dict[str, tuple[int, list[str], list[str]]] = {
    "ext4": (64, ["mkfs.ext4", "-q", "-F"], ["mount", "-o", "loop"]),
    "ntfs": (64, ["mkfs.ntfs", "-q", "-F"], ["mount", "-t", "ntfs-3g"]),
    "btrfs": (300, ["mkfs.btrfs", "-q", "-f"], ["mount", "-o", "loop"]),
    "xfs": (300, ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"], ["mount", "-o", "loop"]),
    "tmpfs": (0, [], ["mount", "-t", "tmpfs", "-o", "size=256m"]),
}
FILESYSTEMS = list(KINDS)


class Unavailable(Exception):
    """This filesystem cannot be made or mounted here (the message says why)."""


@dataclass
class FsImage:
    kind: str
    root: Path  # the mount point
    image: Path | None
    options: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.kind} at {self.root}"


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True)


def _reason(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else f"exit status {proc.returncode}"


def traversable_base(prefix: str = "cowfs-fs-") -> Path:
    """A fresh dir under /tmp that every user may traverse (pytest's tmp dirs are 0700)."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o755)
    return base


def mounted(kind: str, base: Path, options: list[str] | None = None,
            size_mb: int | None = None) -> FsImage:
    if os.geteuid() != 0:
        raise Unavailable("mounting filesystem images needs root")
    size, mkfs, mount = KINDS[kind]
    size = size_mb or size
    extra = ["-o", ",".join(options)] if options else []
    tag = f"{kind}-{os.urandom(3).hex()}"
    root = base / tag
    root.mkdir()
    image = None
    if "loop" in mount and not os.path.exists("/dev/loop-control"):
        root.rmdir()
        raise Unavailable(f"{kind} is mounted from an image through a loop device and there is "
                          "none (/dev/loop-control is missing: a container gets loop devices "
                          "only with --privileged or --device)")
    if mkfs:
        if shutil.which(mkfs[0]) is None:
            raise Unavailable(f"{mkfs[0]} is not installed")
        if kind == "ntfs" and shutil.which("ntfs-3g") is None:
            raise Unavailable("ntfs-3g is not installed")
        image = base / f"{tag}.img"
        with open(image, "wb") as f:
            f.truncate(size << 20)  # sparse
        proc = _run([*mkfs, str(image)])
        if proc.returncode != 0:
            image.unlink()
            raise Unavailable(f"{mkfs[0]} failed: {_reason(proc)}")
    proc = _run([*mount, *extra, str(image) if image else "tmpfs", str(root)])
    if proc.returncode != 0:
        if image is not None:
            image.unlink()
        root.rmdir()
        raise Unavailable(f"the kernel refuses to mount {kind}: {_reason(proc)}")
    root.chmod(0o755)  # ntfs-3g ignores it (0777), which is just as traversable
    return FsImage(kind, root, image, list(options or []))


def _mounts_below(root: Path) -> list[str]:
    out = []
    prefix = str(root).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp.startswith(prefix):
                out.append(mp)
    return sorted(out, key=len, reverse=True)


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def release(fs: FsImage) -> None:
    """Unmount (FUSE mounts below it first), detach its loop device, delete the image."""
    from tests.conftest import force_unmount

    for mp in _mounts_below(fs.root):
        force_unmount(mp)
        if is_mounted(Path(mp)):
            _run(["umount", "-l", mp])
    for attempt in range(50):
        if not is_mounted(fs.root):
            break
        proc = _run(["umount", str(fs.root)])
        if proc.returncode != 0 and attempt >= 20:
            _run(["umount", "-l", str(fs.root)])
        time.sleep(0.05 if proc.returncode else 0)
    if fs.image is not None:
        proc = _run(["losetup", "-j", str(fs.image)])
        for line in proc.stdout.splitlines():  # only if autoclear did not happen
            _run(["losetup", "-d", line.split(":")[0]])
        with contextlib.suppress(OSError):
            fs.image.unlink()
    with contextlib.suppress(OSError):
        fs.root.rmdir()
