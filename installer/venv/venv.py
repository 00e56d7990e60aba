"""Venv creation and discovery: a real venv whose site-packages is a cowfs mount.

`create_venv` makes the venv with the target interpreter's own `venv` module (so activation
scripts and pyvenv.cfg are exactly what users expect), writes the automount hook into the
real site-packages, records the venv state, registers a gc root in the store and mounts.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from cowfs.errors import CowfsError
from cowfs.mount import mount as mounting
from cowfs.mount.spec import HOOK_MODULE, HOOK_PTH, VenvState, new_venv_id
from cowfs.store import roots
from cowfs.store.store import Store
from installer.venv import tree
from installer.venv.automount import write_hook
from installer.interpreters import InterpreterInfo, query_interpreter


def find_venv(explicit: str | Path | None = None) -> Path:
    """--venv DIR, else $VIRTUAL_ENV, else ./.venv (the conventions uv and pip use)."""
    if explicit:
        venv = Path(explicit)
    elif os.environ.get("VIRTUAL_ENV"):
        venv = Path(os.environ["VIRTUAL_ENV"])
    else:
        venv = Path(".venv")
    venv = venv.absolute()
    if not VenvState.path_for(venv).exists():
        if (venv / "pyvenv.cfg").exists():
            raise CowfsError(f"{venv} is a venv but not a cowfs venv; `cowfs adopt {venv}` "
                             "converts it")
        raise CowfsError(f"no cowfs venv at {venv}; create one with `cowfs venv {venv}`")
    VenvState.load(venv).check_location(venv)
    return venv


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_mounted(state: VenvState) -> str:
    """Mount the venv's overlay unless it is live; a dead mount is recovered."""
    return mounting.mount(state.mount_spec())


def create_venv(path: Path, python: str | None, store: Store) -> tuple[VenvState, str]:
    venv = path.absolute()
    if VenvState.path_for(venv).exists():
        state = VenvState.load(venv)
        state.check_location(venv)
        if python is not None:
            wanted = query_interpreter(python, store)
            have = query_interpreter(venv_python(venv), store)
            if (wanted.base_prefix, wanted.version) != (have.base_prefix, have.version):
                raise CowfsError(
                    f"{venv} is a cowfs venv of Python {have.version} ({have.base_prefix}), "
                    f"not of {python} ({wanted.version}, {wanted.base_prefix}): remove it "
                    f"first (rm -rf {venv}) or choose another directory")
        return state, ensure_mounted(state)
    if (venv / "pyvenv.cfg").exists():
        raise CowfsError(f"{venv} is already a venv (not made by cowfs); `cowfs adopt` it "
                         "or choose another directory")
    if venv.is_dir() and not venv.is_symlink() and _remains_of_a_venv(venv):
        _clear_remains(venv)  # what an interrupted `rm -rf` of a cowfs venv left: start over
    if venv.exists() and (not venv.is_dir() or any(venv.iterdir())):
        raise CowfsError(f"{venv} exists and is not an empty directory")
    base = query_interpreter(python or "python3", store)
    _check_filesystem(venv)
    # Before the venv exists: an unwritable new store leaves nothing behind.
    store.ensure(read_only_ok=True)
    _run_venv(base, venv)
    info = query_interpreter(venv_python(venv), store)
    site = Path(info.paths["purelib"])
    if not site.is_dir() or venv not in site.parents:
        raise CowfsError(f"unexpected site-packages location {site} for {venv}")
    state = VenvState(venv=venv, site_packages=site, store=store.root,
                      python=str(venv_python(venv)), id=new_venv_id())
    write_hook(site, venv)
    state.save()
    roots.record(store, state)
    try:
        return state, ensure_mounted(state)
    except CowfsError:
        # The venv stays (`cowfs mount` once the cause is fixed; its hook says why until
        # then), but no gc root for a venv that never ran: a container without /dev/fuse
        # left one in the shared store each time, kept for the whole retention period.
        roots.remove(store, state)
        raise


_VENV_TOP = {"bin", "include", "lib", "lib64", "share", ".cowfs"}


def _remains_of_a_venv(venv: Path) -> bool:
    """A venv's layout (lib/ and the usual top-level names only) holding nothing but empty
    directories, the lib64 link and automount hook files (and cowfs mounts, which the
    daemon detaches once its venv is gone): nothing anybody could want. Anything the walk
    cannot see (a tree deeper than PATH_MAX, an unreadable directory) counts as wanted."""
    top = set(os.listdir(venv))
    if "lib" not in top or not top <= _VENV_TOP:
        return False
    mounts = {e.mountpoint for e in mounting.mount_table() if e.fstype == mounting.FSTYPE}
    try:
        for rel, dirnames, names, fd in tree.walk(venv):
            if any(name not in (HOOK_PTH, HOOK_MODULE)
                   and not (name == "lib64" and stat.S_ISLNK(os.lstat(name, dir_fd=fd).st_mode))
                   for name in names):
                return False
            dirnames[:] = [d for d in dirnames if os.path.join(venv, rel, d) not in mounts]
    except OSError:
        return False
    return True


def _clear_remains(venv: Path) -> None:
    import shutil

    for e in mounting.mount_table():
        if e.fstype == mounting.FSTYPE and Path(e.mountpoint).is_relative_to(venv):
            mounting.detach_stale(e.mountpoint)
    shutil.rmtree(venv)
    venv.mkdir()


def _check_filesystem(venv: Path) -> None:
    """Refuse, in one sentence and before anything is made, a filesystem that cannot hold
    the venv's upper layer (cowfs.overlay.meta: neither user xattrs nor POSIX modes). Probed in the
    venv dir or its nearest existing ancestor (same filesystem), leaving nothing behind."""
    from cowfs.overlay import meta

    probe_dir = venv
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir() or not os.access(probe_dir, os.W_OK | os.X_OK):
        return  # creating the venv will say what is wrong
    try:
        why = meta.refusal(meta.caps_for(str(probe_dir)), str(venv))
    except OSError as exc:
        why = (f"cannot create {venv}: its filesystem ({probe_dir}) takes no new files: "
               f"{exc.strerror}")
    if why is not None:
        raise CowfsError(why)


def _run_venv(base: InterpreterInfo, venv: Path) -> None:
    # --without-pip: pip inside a cowfs venv is optional, and `cowfs install` never needs it.
    proc = subprocess.run([base.executable, "-m", "venv", "--without-pip", str(venv)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise CowfsError(f"creating the venv {venv} with {base.executable} failed: {detail}")
