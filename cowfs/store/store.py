"""Content-addressed object store shared by every venv.

Layout under the store root (see README):

    objects/ab/cdef...   file contents named by xxh3-128 hex, mode 0444, never modified
    dists/<id>.json      one manifest per distribution (cowfs.store.manifest)
    wheels/              downloaded wheels, kept so that `store verify --repair` can re-ingest
    interpreters/        path-aware interpreter cache entries (installer.interpreters)
    roots/<key>.json     one gc root per live venv
    tmp/                 staging for atomic renames, on the same filesystem
    lock                 flock: shared by writers, exclusive for gc

Documents are tmp + fsync + rename. An object is written nameless (O_TMPFILE in its fan-out
directory; a tmp/ file where the filesystem has none) and linked under its name once
complete, so no name ever shows a partial object. Objects are not fsynced one by one (one
fsync of a new file costs as much as writing it here): `sync_objects()`, which everything that
references objects calls first (manifests, venv states), makes all new objects of the store
durable with one syncfs(2), as OSTree does per transaction. A crash before it may leave a
name whose data never reached the disk; the next write of that content finds the object
does not hash to its name and replaces it.
xxhash is not collision resistant: an existing object with the same name is compared byte
for byte before it is trusted, and a mismatch with an intact object is an error, never a
silent dedup.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import xxhash

from cowfs.errors import CollisionError, StoreError

CHUNK = 1 << 20
OBJECT_MODE = 0o444
DIGEST_LEN = 32  # xxh3-128 hex
_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400
_libc = ctypes.CDLL(None, use_errno=True)
# Objects written (or found written) per store root, and how many of them the last syncfs
# covers (process-wide: any Store instance of a root must sync what another instance wrote
# before a document references it). A count, not a flag: a syncfs covers only the objects
# counted before it started, so one can run in the background while more are written.
_written: dict[Path, int] = {}
_synced: dict[Path, int] = {}
_count_lock = threading.Lock()  # the counts; never held across a syscall
_sync_lock = threading.Lock()  # one syncfs at a time
_flush_wanted = threading.Event()
_flush_roots: set[Path] = set()
_flusher: threading.Thread | None = None


def default_root() -> Path:
    """$COWFS_HOME, else $XDG_CACHE_HOME/cowfs, else ~/.cache/cowfs."""
    if home := os.environ.get("COWFS_HOME"):
        return Path(home).expanduser().absolute()
    if cache := os.environ.get("XDG_CACHE_HOME"):
        return Path(cache).expanduser().absolute() / "cowfs"
    return Path.home() / ".cache" / "cowfs"


def digest_bytes(data: bytes | memoryview) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def digest_fd(fd: int) -> tuple[str, int]:
    """xxh3-128 and size of everything readable from fd's current offset."""
    h = xxhash.xxh3_128()
    size = 0
    while chunk := os.read(fd, CHUNK):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


_DIGEST = re.compile(r"[0-9a-f]{32}")


def is_digest(name: str) -> bool:
    return _DIGEST.fullmatch(name) is not None


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, streamed (wheels and RECORD checks are sha256, not xxhash)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def json_bytes(doc: Any) -> bytes:
    """A store document's JSON encoding."""
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def fsync_dir(path: Path | str) -> None:
    """Make a directory's entries (a rename, a new link) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: Path | str) -> None:
    """Flush everything of the filesystem holding path (data, inodes, directory entries)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def _flush_forever() -> None:
    while True:
        _flush_wanted.wait()
        _flush_wanted.clear()
        with _count_lock:  # the roots asked for since the last round
            roots = list(_flush_roots)
            _flush_roots.clear()
        for root in roots:
            try:
                Store(root).sync_objects()
            except Exception:  # only a head start: sync_objects() meets and reports it
                pass


def _link_fd(fd: int, target: Path | str) -> None:
    """Give an O_TMPFILE file its name (linkat through /proc, which needs no capability)."""
    if _libc.linkat(_AT_FDCWD, f"/proc/self/fd/{fd}".encode(), _AT_FDCWD,
                    os.fsencode(target), _AT_SYMLINK_FOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))


def _digest_of(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return digest_fd(fd)[0]
    finally:
        os.close(fd)


def _same_content(path: Path, data: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != len(data):
                return False
            return f.read() == data
    except FileNotFoundError:
        return False


def _same_file_content(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        if os.fstat(fa.fileno()).st_size != os.fstat(fb.fileno()).st_size:
            return False
        while True:
            ca, cb = fa.read(CHUNK), fb.read(CHUNK)
            if ca != cb:
                return False
            if not ca:
                return True


def _copy_fd(src: int, dst: int, size: int) -> None:
    """copy_file_range, else read/write: it refuses some pairs of filesystems (EXDEV from
    a FUSE mount, such as a live venv being absorbed)."""
    remaining = size
    try:
        while remaining > 0:
            n = os.copy_file_range(src, dst, remaining)
            if n == 0:
                return
            remaining -= n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    while remaining > 0 and (chunk := os.read(src, min(CHUNK, remaining))):
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view):]
        remaining -= len(chunk)


class Store:
    """A store rooted at a directory; cheap to construct, creates its layout on demand."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root).absolute() if root is not None else default_root()
        self.objects = self.root / "objects"
        self._objects = str(self.objects)
        self.dists = self.root / "dists"
        self.wheels = self.root / "wheels"
        self.interpreters = self.root / "interpreters"
        self.roots = self.root / "roots"
        self.tmp = self.root / "tmp"
        self._made_fanout: set[str] = set()
        self._tmpfile = True  # O_TMPFILE works here, until the filesystem says otherwise
        self._ensured = False

    # -- layout -------------------------------------------------------------------------

    def ensure(self, read_only_ok: bool = False) -> Store:
        """Create the layout; one clear error when the location is not writable. With
        read_only_ok an existing store that cannot be written passes: it serves what it
        holds (a read-only volume in a container), and a write fails where it happens."""
        if self._ensured or (read_only_ok and self.exists()):
            return self
        try:
            for d in (self.objects, self.dists, self.wheels, self.interpreters, self.roots,
                      self.tmp):
                d.mkdir(parents=True, exist_ok=True)
            if not os.access(self.tmp, os.W_OK):
                code = errno.EROFS if os.statvfs(self.tmp).f_flag & os.ST_RDONLY \
                    else errno.EACCES
                raise OSError(code, os.strerror(code), str(self.tmp))
        except OSError as exc:
            raise StoreError(f"store {self.root} is not writable: {exc.strerror}") from exc
        self._ensured = True  # once per instance: an install asks for every wheel it indexes
        return self

    def exists(self) -> bool:
        return self.objects.is_dir()

    def writable(self) -> bool:
        """Whether objects and documents can be added (not a read-only mount or view)."""
        try:
            return os.access(self.tmp, os.W_OK) and not os.statvfs(self.tmp).f_flag & os.ST_RDONLY
        except OSError:
            return False

    @contextlib.contextmanager
    def lock(self, exclusive: bool = False) -> Iterator[None]:
        """Writers (installs) share the lock; gc takes it exclusively."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES):
                raise
            # A read-only store still serves installs that need nothing new; flock works
            # on a read-only descriptor (and nobody can gc such a store anyway).
            fd = os.open(self.root / "lock", os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def temp_file(self, suffix: str = "") -> tuple[int, Path]:
        try:
            import tempfile  # ~3 ms to import; a warm install writes no temp file

            fd, name = tempfile.mkstemp(dir=self.tmp, suffix=suffix)
        except OSError as exc:  # every new object or document starts here
            raise StoreError(f"store {self.root} is not writable: {exc.strerror}") from None
        return fd, Path(name)

    # -- objects ------------------------------------------------------------------------

    def object_path(self, digest: str) -> Path:
        return self.objects / digest[:2] / digest[2:]

    def has(self, digest: str) -> bool:
        return self.object_path(digest).exists()

    def _fanout(self, digest: str) -> str:
        # str, not Path: this runs once per object written (pathlib costs ~5 us a join)
        d = f"{self._objects}/{digest[:2]}"
        if digest[:2] not in self._made_fanout:
            try:
                os.makedirs(d, exist_ok=True)
            except OSError as exc:  # every new object starts here
                raise StoreError(f"store {self.root} is not writable: {exc.strerror}") \
                    from None
            self._made_fanout.add(digest[:2])
        return d

    def make_fanout(self) -> None:
        """Create all 256 fan-out directories now (a new store: an install calls this in a
        thread at its first ingestion, so that unpacking wheels does not wait on mkdir)."""
        try:
            present = set(os.listdir(self._objects))
        except OSError:
            return
        for i in range(256):
            name = f"{i:02x}"
            if name not in present:
                try:
                    os.mkdir(f"{self._objects}/{name}")
                except FileExistsError:
                    pass
                except OSError:
                    return  # _fanout meets and reports it
            self._made_fanout.add(name)

    def put_bytes(self, data: bytes, digest: str | None = None) -> str:
        """Store data; return its digest. Dedups only after a byte comparison.

        A digest passed in is checked, not trusted: an object's name is its content's hash.
        """
        actual = digest_bytes(data)
        if digest is not None and digest != actual:
            raise CollisionError(f"data does not hash to the digest it was given ({digest!r})")
        digest = actual
        if os.path.exists(f"{self._objects}/{digest[:2]}/{digest[2:]}"):
            final = self.object_path(digest)
            if self._existing_is_same(final, digest, lambda: _same_content(final, data)):
                return digest

        def fill(fd: int) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]

        self._add_object(digest, fill)
        return digest

    def put_file(self, path: Path | str) -> tuple[str, int]:
        """Store a file's bytes (streamed, so large files do not sit in memory)."""
        with open(path, "rb") as src:
            digest, size = digest_fd(src.fileno())
            final = self.object_path(digest)
            if final.exists() and self._existing_is_same(
                    final, digest, lambda: _same_file_content(final, Path(path))):
                return digest, size

            def fill(fd: int) -> None:
                src.seek(0)
                _copy_fd(src.fileno(), fd, size)

            self._add_object(digest, fill)
        return digest, size

    def put_checked(self, digest: str, fill: Callable[[int], None], *,
                    durable: bool = False) -> None:
        """Add an object whose bytes fill(fd) writes into a nameless file and checks itself
        (against this digest and whatever else vouches for them): raising leaves nothing.
        durable: fsynced before it is named, for a reader that serves it at once (a mount
        daemon fetching from a remote) with no sync_objects() to come."""
        if not is_digest(digest):
            raise StoreError(f"bad object digest {digest!r}")
        self._add_object(digest, fill, durable=durable)

    def _existing_is_same(self, final: Path, digest: str, same: Callable[[], bool]) -> bool:
        """An object of that name exists: True if it holds these bytes; False if it is a
        crash leftover (it does not hash to its name), to be replaced; else a collision."""
        if same():
            return True
        if _digest_of(final) == digest:
            raise CollisionError(f"digest collision or corrupt object {digest}")
        return False

    def _add_object(self, digest: str, fill: Callable[[int], None],
                    durable: bool = False) -> None:
        """Write a new object nameless, then link it under its name (never replacing an
        intact one); its durability is left to sync_objects() unless durable."""
        fanout = self._fanout(digest)
        final = f"{fanout}/{digest[2:]}"
        fd, tmp = self._new_file(fanout)
        try:
            fill(fd)
            os.fchmod(fd, OBJECT_MODE)
            if durable:
                os.fsync(fd)
            try:
                if tmp is not None:
                    os.link(tmp, final)  # fails if it exists: never replace a published object
                else:
                    _link_fd(fd, final)
            except FileExistsError:
                existing = Path(final)
                source = tmp if tmp is not None else Path(f"/proc/self/fd/{fd}")
                if not self._existing_is_same(existing, digest,
                                              lambda: _same_file_content(existing, source)):
                    self._replace_leftover(fd, tmp, existing)
            except OSError as exc:
                if tmp is not None or exc.errno not in (errno.ENOENT, errno.EXDEV, errno.EPERM):
                    raise
                self._tmpfile = False  # no /proc here: name the object the classic way
                self._add_object(digest, fill, durable)
                return
            # Counted once named (or found named, maybe unsynced, by another writer): a
            # syncfs that starts later covers its data and its name.
            with _count_lock:
                _written[self.root] = _written.get(self.root, 0) + 1
        finally:
            os.close(fd)
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def _replace_leftover(self, fd: int, tmp: Path | None, final: Path) -> None:
        """Swap a complete copy in for a crash leftover under the same name."""
        side = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}")
        side.unlink(missing_ok=True)
        if tmp is not None:
            os.link(tmp, side)
        else:
            _link_fd(fd, side)
        os.replace(side, final)

    def _new_file(self, fanout: str) -> tuple[int, Path | None]:
        """An anonymous file in the fan-out directory, else a named one in tmp/."""
        if self._tmpfile:
            try:
                return os.open(fanout, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600), None
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL,
                                     errno.ENOSYS):
                    raise StoreError(f"store {self.root} is not writable: {exc.strerror}") \
                        from None
                self._tmpfile = False
        return self.temp_file()

    def sync_objects(self, *, always: bool = False) -> None:
        """Make every object written so far durable (data and names: one syncfs of the
        store's filesystem); called before anything that references them is written.
        always: sync even without new objects (for other files written without fsync)."""
        with _sync_lock:  # held throughout: a caller returns only once its objects are safe
            with _count_lock:
                written = _written.get(self.root, 0)
            if always or _synced.get(self.root, 0) < written:
                syncfs(self.objects)
                with _count_lock:
                    _synced[self.root] = max(_synced.get(self.root, 0), written)

    def sync_behind(self) -> None:
        """Start a sync_objects() in a background thread, so that the one a writer must wait
        for later finds less to write back (an install calls this after each wheel: the
        disk works while the next wheels are unpacked). Errors are left to that one."""
        global _flusher
        with _count_lock:
            _flush_roots.add(self.root)
            if _flusher is None:
                _flusher = threading.Thread(target=_flush_forever, name="cowfs-sync-behind",
                                            daemon=True)
                _flusher.start()
        _flush_wanted.set()

    def open_object(self, digest: str) -> IO[bytes]:
        return open(self.object_path(digest), "rb")

    def iter_objects(self) -> Iterator[tuple[str, Path]]:
        if not self.objects.is_dir():
            return
        for fan in sorted(self.objects.iterdir()):
            if len(fan.name) != 2 or not fan.is_dir():
                continue
            for obj in sorted(fan.iterdir()):
                digest = fan.name + obj.name
                if is_digest(digest):
                    yield digest, obj

    # -- small JSON documents (manifests, roots) ----------------------------------------

    def write_json(self, path: Path, doc: Any, *, durable: bool = True) -> bytes:
        """Atomic JSON write (see write_bytes); returns the bytes written."""
        data = json_bytes(doc)
        self.write_bytes(path, data, suffix=".json", durable=durable)
        return data

    def write_bytes(self, path: Path, data: bytes, *, suffix: str = "",
                    durable: bool = True) -> None:
        """Atomic write: tmp in the store, fsync, rename, fsync the directory.
        durable=False (a cache that checks what it reads): no fsync, the rename alone."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._write_temp(data, suffix, fsync=durable)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)

    def write_batch(self, docs: Sequence[tuple[Path, bytes]]) -> None:
        """write_bytes for many documents and the objects they name, with one syncfs and one
        fsync per directory instead of two fsyncs per document (and a syncfs per batch of
        objects): each document is complete and durable before its name appears."""
        temps = []
        try:
            for path, data in docs:
                path.parent.mkdir(parents=True, exist_ok=True)
                temps.append(self._write_temp(data, "", fsync=False))
            self.sync_objects(always=True)
            for (path, _), tmp in zip(docs, temps, strict=True):
                os.replace(tmp, path)
        finally:
            for tmp in temps:
                tmp.unlink(missing_ok=True)
        for parent in dict.fromkeys(path.parent for path, _ in docs):
            fsync_dir(parent)

    def _write_temp(self, data: bytes, suffix: str, *, fsync: bool) -> Path:
        fd, tmp = self.temp_file(suffix)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, 0o644)
            if fsync:
                os.fsync(fd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        return tmp

