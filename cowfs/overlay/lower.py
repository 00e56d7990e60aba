"""The read-only lower tree of an overlay.

Two sources, one interface (`Lower`):

* `ManifestLower` -- built from store manifests: the union of the files of every installed
  distribution, each backed by a content-addressed object. Built in memory in one pass over
  the directories of each manifest's layer (~20k files in a few ms); nothing on disk is
  stat'ed until a file is opened.
* `DirLower` -- one or more plain read-only directories, leftmost on top, merged the way
  `mount -t overlay -o lowerdir=A:B` merges them (generic overlay mode). Looked up lazily and
  memoised: the lower layer is immutable for the life of a mount.

Paths are relative POSIX strings without a leading slash; "" is the root.
"""

from __future__ import annotations

import os
import stat
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cowfs.dirfd import AT_FDCWD, At, Root, open_dir, proc, short
from cowfs.overlay.upper import is_opaque_dir, is_whiteout_stat
from cowfs.store.layer import Layer, layer_of_entries
from cowfs.store.manifest import FileEntry, Manifest
from cowfs.store.store import DIGEST_LEN

DIR_MODE = stat.S_IFDIR | 0o755


@dataclass(frozen=True, slots=True)
class LowerEntry:
    mode: int  # full st_mode
    size: int
    mtime_ns: int
    # Real path of the backing entry: the object or plain file; for a DirLower directory its
    # top layer (for xattrs); None for synthetic manifest directories. A name (messages,
    # the lazy fetch): the daemon reaches it through base, the handle of its layer root.
    source: str | None
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    ctime_ns: int = 0
    blocks: int = -1  # -1: derive from size
    # The held root that source is under (None: source is used as is); not part of what
    # the entry is: equal sources are the same entry.
    base: Root | None = field(default=None, compare=False, repr=False)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def at(self) -> At:
        """The backing entry for an *at syscall (cowfs.dirfd): use it at once."""
        assert self.source is not None
        if self.base is None:
            return AT_FDCWD, short(self.source)
        return self.base.at(self.source[len(self.base.path) + 1:])


class Lower(Protocol):
    def lookup(self, path: str) -> LowerEntry | None: ...

    def listdir(self, path: str) -> list[str]: ...

    def readlink(self, path: str) -> str: ...

    def subdir_count(self, path: str) -> int: ...


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class ManifestLower:
    """Merged view of distribution manifests plus venv-local extra files.

    Later entries win on a path clash, matching an installer that overwrites files
    of a previously installed distribution; a directory wins over a file of the same path.
    Built from layers (cowfs.store.layer: files grouped by directory) in one pass over the
    directories; a file's LowerEntry is made when it is looked up (the node keeps it).
    """

    def __init__(self, objects_dir: Path, layers: Iterable[Layer], uid: int = 0,
                 gid: int = 0) -> None:
        try:
            self._objects: Root | None = Root(objects_dir)
        except OSError:  # (no store yet: nothing to open, the paths then fail on their own)
            self._objects = None
        self._root = os.path.abspath(objects_dir)
        self._uid, self._gid = uid, gid
        # Per file row, as arrays: extending one is a copy in C, no int object per row.
        self._sizes, self._modes, self._mtimes = array("Q"), array("H"), array("q")
        digests: list[str] = []
        # directory -> {name: row of a file, None for a subdirectory}
        self._children: dict[str, dict[str, int | None]] = {"": {}}
        self._subdirs: dict[str, int] = {"": 0}
        self._entries: dict[str, LowerEntry] = {}  # directories
        self._ints: dict[int, int] = {}
        children, subdirs, entries = self._children, self._subdirs, self._entries
        base = 0
        for layer in layers:
            mtime_ns, names, n = layer.mtime_ns, layer.names, len(layer.names)
            digests.append(layer.digests)
            self._sizes.extend(array("Q", layer.sizes))
            self._modes.extend(array("H", layer.modes))
            self._mtimes.extend(array("q", (mtime_ns,)) * n)
            dir_entry = LowerEntry(DIR_MODE, 4096, mtime_ns, None, uid, gid, 0, mtime_ns)
            at = base
            for d, count in zip(layer.dirs, layer.counts):  # noqa: B905 (checked: decode)
                kids = children.get(d)
                if kids is None:  # a new directory; inlined: ~2k of them on a reload
                    parent, _, name = d.rpartition("/")
                    if parent not in children:
                        self._add_dirs(parent, dir_entry)
                    children[parent][name] = None
                    subdirs[parent] += 1
                    kids = children[d] = {}
                    subdirs[d] = 0
                    entries[d] = dir_entry
                if count:
                    end = at + count
                    kids.update(zip(names[at - base:end - base], range(at, end)))  # noqa: B905
                    at = end
            base += n
        self._digests = "".join(digests)

    def _add_dirs(self, path: str, entry: LowerEntry) -> None:
        """Create path and any missing ancestors as directories."""
        missing = []
        while path not in self._children:
            missing.append(path)
            path = path.rpartition("/")[0]
        for d in reversed(missing):
            parent, _, name = d.rpartition("/")
            self._children[parent][name] = None
            self._subdirs[parent] += 1
            self._children[d] = {}
            self._subdirs[d] = 0
            self._entries[d] = entry

    @classmethod
    def from_manifests(cls, objects_dir: Path, manifests: Sequence[Manifest],
                       extra: Sequence[FileEntry] = (), uid: int = 0,
                       gid: int = 0) -> ManifestLower:
        layers = [layer_of_entries(m.mtime_ns, m.files) for m in manifests]
        layers.append(layer_of_entries(manifests[0].mtime_ns if manifests else 0, extra))
        return cls(objects_dir, layers, uid, gid)

    def __len__(self) -> int:
        files = sum(1 for d, kids in self._children.items() for name, row in kids.items()
                    if row is not None and join(d, name) not in self._children)
        return files + len(self._children) - 1  # the root is no entry

    def lookup(self, path: str) -> LowerEntry | None:
        entry = self._entries.get(path)
        if entry is not None:
            return entry
        if not path:
            return LowerEntry(DIR_MODE, 4096, 0, None)
        parent, _, name = path.rpartition("/")
        kids = self._children.get(parent)
        i = kids.get(name) if kids is not None else None
        if i is None:
            return None
        d = self._digests[DIGEST_LEN * i:DIGEST_LEN * (i + 1)]
        # One int object per distinct mode and mtime (a layer's files share both), and no
        # cache of file entries: the node made from one holds it (~150 B a file less).
        ints = self._ints
        mode, mtime_ns = stat.S_IFREG | self._modes[i], self._mtimes[i]
        mode, mtime_ns = ints.setdefault(mode, mode), ints.setdefault(mtime_ns, mtime_ns)
        return LowerEntry(mode, self._sizes[i], mtime_ns, f"{self._root}/{d[:2]}/{d[2:]}",
                          self._uid, self._gid, 0, mtime_ns, base=self._objects)

    def listdir(self, path: str) -> list[str]:
        return list(self._children.get(path, ()))

    def readlink(self, path: str) -> str:
        raise OSError(22, "not a symlink")  # manifests hold regular files only

    def subdir_count(self, path: str) -> int:
        return self._subdirs.get(path, 0)


def _entry_from_stat(st: os.stat_result, root: Root, path: str) -> LowerEntry:
    return LowerEntry(st.st_mode, st.st_size, st.st_mtime_ns,
                      f"{root.path}/{path}" if path else root.path, st.st_uid, st.st_gid,
                      st.st_rdev, st.st_ctime_ns, st.st_blocks, root)


class DirLower:
    """Plain directories merged top-down; lazily looked up, memoised (the lower is immutable)."""

    def __init__(self, layers: Sequence[Path]) -> None:
        if not layers:
            raise ValueError("at least one lower directory is needed")
        self.roots = [Root(p) for p in layers]  # held open for the mount's lifetime
        self._lookup: dict[str, LowerEntry | None] = {}
        # For each merged directory: the layer indexes that contribute to it, top first.
        self._dir_layers: dict[str, list[int]] = {"": self._root_layers()}
        self._listing: dict[str, list[str]] = {}

    def _root_layers(self) -> list[int]:
        out = []
        for i, root in enumerate(self.roots):
            out.append(i)
            if is_opaque_dir(root.proc("")):
                break
        return out

    def lookup(self, path: str) -> LowerEntry | None:
        try:
            return self._lookup[path]
        except KeyError:
            pass
        entry = self._resolve(path)
        self._lookup[path] = entry
        return entry

    def _resolve(self, path: str) -> LowerEntry | None:
        if not path:
            return _entry_from_stat(os.fstat(self.roots[0].fd), self.roots[0], "")
        parent = path.rpartition("/")[0]
        parent_entry = self.lookup(parent)
        if parent_entry is None or not parent_entry.is_dir:
            return None
        found: LowerEntry | None = None
        contributing: list[int] = []
        for i in self._dir_layers[parent]:
            at = self.roots[i].at(path)
            try:
                st = os.lstat(at[1], dir_fd=at[0])
            except OSError:
                continue
            if is_whiteout_stat(at, st):
                break
            if found is None:
                found = _entry_from_stat(st, self.roots[i], path)
                if not stat.S_ISDIR(st.st_mode):
                    break
            elif not stat.S_ISDIR(st.st_mode):
                break  # a non-dir below a dir is hidden, and so is everything under it
            contributing.append(i)
            if is_opaque_dir(proc(at)):
                break
        if found is not None and found.is_dir:
            self._dir_layers[path] = contributing
        return found

    def listdir(self, path: str) -> list[str]:
        cached = self._listing.get(path)
        if cached is not None:
            return cached
        entry = self.lookup(path)
        names: dict[str, None] = {}
        if entry is not None and entry.is_dir:
            for i in self._dir_layers[path]:
                try:
                    fd = open_dir(self.roots[i].at(path))
                except OSError:
                    continue
                try:
                    names.update(dict.fromkeys(os.listdir(fd)))
                except OSError:
                    continue
                finally:
                    os.close(fd)
        listing = [n for n in names if self.lookup(join(path, n)) is not None]
        self._listing[path] = listing
        return listing

    def readlink(self, path: str) -> str:
        entry = self.lookup(path)
        if entry is None or entry.source is None:
            raise FileNotFoundError(path)
        fd, name = entry.at()
        return os.readlink(name, dir_fd=fd)

    def subdir_count(self, path: str) -> int:
        return sum(1 for n in self.listdir(path)
                   if (e := self.lookup(join(path, n))) is not None and e.is_dir)
