"""Content-addressed object store shared by every venv.

Layout under the store root (see README):

    objects/ab/cdef...   file contents named by xxh3-128 hex, mode 0444, never modified
    dists/<id>.json      one manifest per distribution (cowfs.manifest)
    wheels/              downloaded wheels, kept so that `store verify --repair` can re-ingest
    interpreters/        path-aware interpreter cache entries (installer.interpreters)
    roots/<key>.json     one gc root per live venv
    tmp/                 staging for atomic renames, on the same filesystem
    lock                 flock: shared by writers, exclusive for gc

Every write is tmp + fsync + rename (or link), so a crash leaves at most garbage in tmp/.
xxhash is not collision resistant: an existing object with the same name is compared byte
for byte before it is trusted, and a mismatch is an error, never a silent dedup.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import xxhash

from cowfs.errors import CollisionError, StoreError

CHUNK = 1 << 20
OBJECT_MODE = 0o444
DIGEST_LEN = 32  # xxh3-128 hex


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


def fsync_dir(path: Path | str) -> None:
    """Make a directory's entries (a rename, a new link) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
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
        self.dists = self.root / "dists"
        self.wheels = self.root / "wheels"
        self.interpreters = self.root / "interpreters"
        self.roots = self.root / "roots"
        self.tmp = self.root / "tmp"
        self._made_fanout: set[str] = set()
        self._dirty_fanouts: set[Path] = set()

    # -- layout -------------------------------------------------------------------------

    def ensure(self, read_only_ok: bool = False) -> Store:
        """Create the layout; one clear error when the location is not writable. With
        read_only_ok an existing store that cannot be written passes: it serves what it
        holds (a read-only volume in a container), and a write fails where it happens."""
        if read_only_ok and self.exists():
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

    def _fanout(self, digest: str) -> Path:
        d = self.objects / digest[:2]
        if digest[:2] not in self._made_fanout:
            d.mkdir(parents=True, exist_ok=True)
            self._made_fanout.add(digest[:2])
        return d

    def put_bytes(self, data: bytes, digest: str | None = None) -> str:
        """Store data; return its digest. Dedups only after a byte comparison.

        A digest passed in is checked, not trusted: an object's name is its content's hash.
        """
        actual = digest_bytes(data)
        if digest is not None and digest != actual:
            raise CollisionError(f"data does not hash to the digest it was given ({digest!r})")
        digest = actual
        final = self.object_path(digest)
        if final.exists():
            if not _same_content(final, data):
                raise CollisionError(f"digest collision or corrupt object {digest}")
            return digest
        fd, tmp = self.temp_file()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, OBJECT_MODE)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._publish(tmp, final, digest)
        return digest

    def put_file(self, path: Path | str) -> tuple[str, int]:
        """Store a file's bytes (streamed, so large files do not sit in memory)."""
        with open(path, "rb") as src:
            digest, size = digest_fd(src.fileno())
            final = self.object_path(digest)
            if final.exists():
                if not _same_file_content(final, Path(path)):
                    raise CollisionError(f"digest collision or corrupt object {digest}")
                return digest, size
            src.seek(0)
            fd, tmp = self.temp_file()
            try:
                _copy_fd(src.fileno(), fd, size)
                os.fchmod(fd, OBJECT_MODE)
                os.fsync(fd)
            finally:
                os.close(fd)
        self._publish(tmp, final, digest)
        return digest, size

    def _publish(self, tmp: Path, final: Path, digest: str) -> None:
        """Atomically move tmp to final; a concurrent writer of the same digest is fine."""
        fanout = self._fanout(digest)
        try:
            os.link(tmp, final)  # fails if it exists: never replace a published object
        except FileExistsError:
            if not _same_file_content(final, tmp):
                raise CollisionError(f"digest collision or corrupt object {digest}") from None
        else:
            self._dirty_fanouts.add(fanout)
        finally:
            tmp.unlink(missing_ok=True)

    def sync_objects(self) -> None:
        """Make new object names durable; called before anything that references them."""
        while self._dirty_fanouts:
            fsync_dir(self._dirty_fanouts.pop())

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

    def write_json(self, path: Path, doc: Any) -> bytes:
        """Atomic JSON write (see write_bytes); returns the bytes written."""
        data = json.dumps(doc, indent=1, sort_keys=True).encode()
        self.write_bytes(path, data, suffix=".json")
        return data

    def write_bytes(self, path: Path, data: bytes, *, suffix: str = "") -> None:
        """Atomic write: tmp in the store, fsync, rename, fsync the directory."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = self.temp_file(suffix)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, 0o644)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)

