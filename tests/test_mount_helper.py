"""`mount -t fuse.cowfs` and /etc/fstab: mount(8) -> mount.fuse3 -> `cowfs SRC MNT -o OPTS`.

mount(8) runs its helpers with the standard PATH, so the test puts `cowfs` in
/usr/local/sbin and its own /etc/fstab in place, both only inside a private mount
namespace: the machine's real files are never touched.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cowfs.cli import mount_helper_args

pytestmark = pytest.mark.skipif(shutil.which("mount.fuse3") is None and not
                                Path("/sbin/mount.fuse3").exists(), reason="no mount.fuse3")

SCRIPT = r"""
set -eu
mount --bind "$BIN" /usr/local/sbin
mount --bind "$FSTAB" /etc/fstab
mount -t fuse.cowfs cowfs "$T/mnt" -o "lowerdir=$T/lower,upperdir=$T/upper,workdir=$T/work"
cat "$T/mnt/a"
echo new > "$T/mnt/b"
umount "$T/mnt"
mount "$T/mnt2"
cat "$T/mnt2/a" "$T/mnt2/b"
umount "$T/mnt2"
"""


def test_mount_t_fuse_cowfs_and_fstab(tmp_path: Path) -> None:
    for d in ("lower", "upper", "work", "mnt", "mnt2", "bin"):
        (tmp_path / d).mkdir()
    (tmp_path / "lower" / "a").write_text("from lower\n")
    exe = Path(sys.executable).with_name("cowfs")
    if not exe.exists():
        pytest.skip("no cowfs console script next to this interpreter")
    (tmp_path / "bin" / "cowfs").symlink_to(exe)
    fstab = tmp_path / "fstab"
    fstab.write_text(f"cowfs {tmp_path}/mnt2 fuse.cowfs noauto,lowerdir={tmp_path}/lower,"
                     f"upperdir={tmp_path}/upper,workdir={tmp_path}/work2 0 0\n")
    (tmp_path / "work2").mkdir()
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
         "bash", "-c", SCRIPT], capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "T": str(tmp_path),
             "BIN": str(tmp_path / "bin"), "FSTAB": str(fstab),
             "COWFS_RUNTIME_DIR": str(tmp_path / "run")})
    assert proc.returncode == 0, proc.stderr
    said = [ln for ln in proc.stdout.splitlines() if not ln.startswith("mounted: ")]
    assert said == ["from lower", "from lower", "new"]
    assert (tmp_path / "upper" / "b").read_text() == "new\n"  # the write went to the upper


@pytest.mark.parametrize(("argv", "want"), [
    (["cowfs", "/m", "-o", "lowerdir=/l,upperdir=/u,workdir=/w"],
     ["mount", "-o", "lowerdir=/l,upperdir=/u,workdir=/w", "cowfs", "/m"]),
    (["status", "-o", "x"], ["status", "-o", "x"]),  # a command: left alone
    (["cowfs", "/m", "-o", "rw"], ["cowfs", "/m", "-o", "rw"]),  # no overlay options
])
def test_only_the_mount_helper_form_is_rewritten(argv: list[str], want: list[str]) -> None:
    assert mount_helper_args(argv) == want
