"""The `.pth` hook that makes an unmounted venv mount itself (e.g. after a reboot).

It lives in the venv's real site-packages directory, underneath the mount point, so it is
only ever seen while the overlay is NOT mounted. Python runs it during `site` start-up; it
runs the recorded cowfs executable (an absolute path, never looked up on PATH) to mount
exactly this venv, then re-reads the now-mounted site directory. If mounting fails it says so
in one line on stderr and the interpreter carries on with an empty site-packages.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cowfs.mount.spec import HOOK_MODULE, HOOK_PTH

__all__ = ["HOOK_MODULE", "HOOK_PTH", "write_hook"]

_TEMPLATE = '''\
"""cowfs automount hook (generated; see installer/venv/automount.py)."""
import os
import subprocess
import sys

VENV = {venv!r}
COWFS = {command!r}


def _mount():
    site_dir = os.path.dirname(os.path.abspath(__file__))
    if os.environ.get("COWFS_NO_AUTOMOUNT") or os.environ.get("_COWFS_AUTOMOUNTING"):
        return
    env = dict(os.environ, _COWFS_AUTOMOUNTING="1")  # no recursion through the hook
    try:
        proc = subprocess.run(COWFS + ["mount", VENV], capture_output=True, text=True,
                              env=env, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        sys.stderr.write("cowfs: cannot mount %s: %s\\n" % (site_dir, exc))
        return
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["cowfs mount failed"]
        msg = lines[-1]  # cowfs's own line already names the mount point and the fix
        if not msg.startswith("cowfs: "):
            msg = "cowfs: cannot mount %s: %s" % (site_dir, msg)
        sys.stderr.write(msg + "\\n")
        return
    import importlib
    import site

    importlib.invalidate_caches()
    sys.path_importer_cache.pop(site_dir, None)
    site.addsitedir(site_dir)


_mount()
'''


def cowfs_command() -> list[str]:
    """How the hook runs cowfs: this very interpreter (absolute path), isolated (-I) when
    cowfs is installed in it, so neither PATH nor PYTHONPATH can redirect the hook."""
    exe = os.path.abspath(sys.executable)  # not realpath: a venv python is a symlink
    probe = subprocess.run([exe, "-I", "-c", "import cowfs"], capture_output=True)
    if probe.returncode == 0:
        return [exe, "-I", "-m", "cowfs"]
    return [exe, "-m", "cowfs"]  # a source checkout on PYTHONPATH (development)


def write_hook(site_packages: Path, venv: Path) -> None:
    """Write the hook into the real (unmounted) site-packages directory, atomically."""
    module = _TEMPLATE.format(venv=str(venv), command=cowfs_command())
    for name, text in ((HOOK_MODULE, module), (HOOK_PTH, "import _cowfs_automount\n")):
        tmp = site_packages / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, site_packages / name)
