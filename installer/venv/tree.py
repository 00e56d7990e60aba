"""Walking and creating directory trees of any depth, through directory handles.

`os.walk` lists each directory by its full path: past PATH_MAX it gets ENAMETOOLONG and, by
default, silently skips the subtree. A tool that then deletes the original (adopt empties
site-packages, `cowfs venv` clears the remains of a venv) would lose what it never saw. Here
every directory is reached with openat from its parent's handle (os.fwalk) and every error
is raised, never skipped.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


def _raise(err: OSError) -> None:
    raise err


def walk(root: str | os.PathLike[str], topdown: bool = True
         ) -> Iterator[tuple[str, list[str], list[str], int]]:
    """(rel, dirnames, names, dir_fd) for root and every directory below it, rel "" for root.
    Symlinks to directories are names, like files (never followed); with topdown, pruning
    dirnames in place prunes the walk. Use dir_fd for every call on the entries."""
    for dirpath, dirnames, names, fd in os.fwalk(root, topdown=topdown, onerror=_raise):
        links = [d for d in dirnames if stat.S_ISLNK(os.lstat(d, dir_fd=fd).st_mode)]
        if links:
            dirnames[:] = [d for d in dirnames if d not in links]
            names.extend(links)
        rel = os.path.relpath(dirpath, root)
        yield ("" if rel == "." else rel), dirnames, names, fd


def descend(root_fd: int, rel: str, create: bool = False, mode: int = 0o755) -> int:
    """An O_PATH handle of root/rel, one component at a time (any depth); with create, the
    missing directories are made on the way (as `mkdir -p`). The caller closes it."""
    fd = os.dup(root_fd)
    try:
        for part in [p for p in rel.split("/") if p]:
            if create:
                try:
                    os.mkdir(part, mode, dir_fd=fd)
                except FileExistsError:
                    pass
            nxt = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd
