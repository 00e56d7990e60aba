"""Parallel, hash-checked wheel downloads into the store's wheels/ directory.

trio runs one task per wheel; each blocking download runs in a worker thread (http.client
over kept-alive connections: installer.resolve.http_pool) under a CapacityLimiter. Threads cannot be
cancelled from outside, so a shared Event tells the others to stop at their next chunk once
one download has failed: the first error is reported without waiting for large downloads.

A download is written to a temporary file next to its destination, hashed while it streams,
fsynced and renamed into place, so `dest` only ever holds complete wheels that matched their
sha256. Local wheels (file:// URLs or plain paths) are used where they are, after the hash
check, and a wheel already in `dest` with the right hash is not downloaded again.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cowfs import __version__
from cowfs.errors import CowfsError
from cowfs.store.store import fsync_dir, sha256_file
from cowfs.tls import ssl_context
from installer.resolve.index_config import netrc_credentials, redact, split_credentials
from installer.resolve.resolve import Pin, local_path

if TYPE_CHECKING:  # imported by fetch_async: a warm install downloads nothing
    from installer.resolve.http_pool import Pool

CHUNK = 1 << 18
TIMEOUT = 60.0  # seconds without data before a connection is given up
RETRIES = 2  # extra attempts after a transient failure (5xx, reset, timeout, short read)
RETRY_DELAY = 0.5  # seconds before the first retry, doubled for each further one
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class _Aborted(Exception):
    """Another download failed: stop this one quietly."""


class _Transient(Exception):
    """A failure worth retrying; the message is reported if retries run out."""


def expected_hashes(pin: Pin) -> frozenset[str]:
    """The sha256 values the file may have; empty means unchecked."""
    return frozenset((pin.sha256,)) if pin.sha256 else frozenset(pin.hashes)


def mismatch(pin: Pin, expected: frozenset[str], actual: str) -> str:
    want = next(iter(expected)) if len(expected) == 1 else f"one of {len(expected)} hashes"
    return f"{pin.filename}: sha256 mismatch (expected {want}, got {actual})"


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class _Progress:
    """A redrawn one-line bar on a terminal; nothing where stderr is not one (CI logs and
    scripts get errors only, as with uv)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.tty = sys.stderr.isatty()
        self.enabled = enabled and total > 0 and self.tty
        self.total = total
        self.done = 0
        self.bytes = 0
        self.start = time.monotonic()
        self.last_draw = 0.0
        self.lock = threading.Lock()

    def _draw(self) -> None:
        rate = self.bytes / max(time.monotonic() - self.start, 1e-3)
        sys.stderr.write(f"\r\x1b[Kcowfs: downloading {self.done}/{self.total} wheels, "
                         f"{_size(self.bytes)} ({_size(rate)}/s)")
        sys.stderr.flush()

    def advance(self, n: int) -> None:
        if not self.enabled:
            return
        with self.lock:
            self.bytes += n
            now = time.monotonic()
            if now - self.last_draw > 0.1:
                self.last_draw = now
                self._draw()

    def finished(self, filename: str, size: int) -> None:
        if not self.enabled:
            return
        with self.lock:
            self.done += 1
            self._draw()

    def close(self) -> None:
        if self.enabled and self.done:
            self._draw()
            sys.stderr.write("\n")
            sys.stderr.flush()


def _reason(exc: BaseException) -> str:
    import urllib.error

    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        if not isinstance(exc.reason, BaseException):
            return str(exc.reason)
        exc = exc.reason
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _authorized(url: str) -> tuple[str, dict[str, str]]:
    """The URL without credentials and the headers to send: Basic auth from the URL's
    user:password@, else from ~/.netrc for its host."""
    import base64
    from urllib.parse import urlsplit

    bare, creds = split_credentials(url)
    if creds is None and (host := urlsplit(url).hostname):
        creds = netrc_credentials(host)
    headers = {"User-Agent": f"cowfs/{__version__}"}
    if creds is not None:
        token = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    return bare, headers


def _download_once(pin: Pin, target: Path, expected: frozenset[str], abort: threading.Event,
                   meter: _Progress, pool: Pool) -> str:
    # Imported here: a warm install downloads nothing and should not pay ~12 ms for them.
    import http.client
    import tempfile
    import urllib.error

    from installer.resolve.http_pool import RedirectError

    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{pin.filename}.", suffix=".part")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            h, size = hashlib.sha256(), 0
            url, headers = _authorized(pin.url)
            try:
                with pool.get(url, headers) as resp:
                    length = int(resp.headers.get("Content-Length") or -1)
                    while chunk := resp.read1(CHUNK):  # what has arrived: abort stays prompt
                        if abort.is_set():
                            raise _Aborted
                        h.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                        meter.advance(len(chunk))
            except urllib.error.HTTPError as exc:
                if exc.code in RETRY_STATUS:
                    raise _Transient(_reason(exc)) from None
                raise CowfsError(f"{pin.filename}: download failed: {_reason(exc)} "
                                 f"({redact(pin.url)})") from None
            except RedirectError as exc:
                raise CowfsError(f"{pin.filename}: download failed: {exc} "
                                 f"({redact(pin.url)})") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                raise _Transient(_reason(exc)) from None
            if 0 <= length != size:
                raise _Transient(f"connection closed after {size} of {length} bytes")
            digest = h.hexdigest()
            if expected and digest not in expected:
                raise CowfsError(mismatch(pin, expected, digest) + f" from {redact(pin.url)}; "
                                 "the download was discarded")
            out.flush()
            os.fchmod(out.fileno(), 0o644)
            os.fsync(out.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
        meter.finished(pin.filename, size)
        return digest
    finally:
        tmp.unlink(missing_ok=True)


def _download(pin: Pin, target: Path, expected: frozenset[str], abort: threading.Event,
              meter: _Progress, pool: Pool) -> str:
    """The wheel into target; its sha256."""
    for attempt in range(RETRIES + 1):
        if abort.is_set():
            raise _Aborted
        try:
            return _download_once(pin, target, expected, abort, meter, pool)
        except _Transient as exc:
            if attempt == RETRIES:
                raise CowfsError(f"{pin.filename}: download failed: {exc} "
                                 f"({redact(pin.url)})") from None
            if abort.wait(RETRY_DELAY * 2**attempt):
                raise _Aborted from None
    raise AssertionError("unreachable: the last attempt returns or raises")


def download(pin: Pin, target: Path, abort: threading.Event, pool: Pool) -> str:
    """One remote wheel into target, sha256-checked if pin has a hash, no progress shown;
    its sha256. The way in for installer.resolve.prefetch, which downloads before pins are known."""
    return _download(pin, target, expected_hashes(pin), abort, _Progress(False, 0), pool)


def _checked_digest(path: Path, expected: frozenset[str], known: KnownDigest | None) -> str:
    """path's sha256: the one recorded for the file as it is now (an ingestion or a download
    hashed it), else hashed again. A recorded one that does not match is checked afresh."""
    if known is not None and (digest := known(path)) in expected:
        return digest
    return sha256_file(path)


def _settled(pin: Pin, dest: Path, known: KnownDigest | None, check_local: bool) -> bool:
    """Nothing to download or hash: a local wheel without a hash (or with one nothing has
    recorded yet, when the caller checks it), or a wheel that is there (local, or
    downloaded before) whose recorded sha256 is one of pin's."""
    expected = expected_hashes(pin)
    path = local_path(pin.url)
    local = path is not None
    if path is None:
        if not pin.filename or Path(pin.filename).name != pin.filename:
            return False  # _obtain refuses it, with its error
        path = dest / pin.filename
    elif not expected:
        return True
    recorded = known(path) if known is not None else None
    if local and recorded is None:
        return not check_local
    return bool(expected) and recorded in expected


def _obtain(pin: Pin, dest: Path, abort: threading.Event, meter: _Progress,
            pool: Pool | None, known: KnownDigest | None = None,
            check_local: bool = True) -> Path:
    """The local path of pin's wheel, downloading it into dest when it is remote.
    check_local=False: a local wheel's sha256 is checked here only if one is recorded for
    it; otherwise the caller checks the one its ingestion computes (no second pass)."""
    if not pin.filename or Path(pin.filename).name != pin.filename or \
            not pin.filename.endswith(".whl"):
        raise CowfsError(f"{pin.name}: {pin.filename!r} is not a wheel filename")
    expected = expected_hashes(pin)
    try:
        path = local_path(pin.url)
        if path is not None:
            if not path.is_file():
                raise CowfsError(f"{pin.filename}: local wheel {path} does not exist")
            check = check_local or (known is not None and known(path) is not None)
            if expected and check and \
                    (digest := _checked_digest(path, expected, known)) not in expected:
                raise CowfsError(mismatch(pin, expected, digest) + f" for local file {path}")
            return path
        if not pin.url.startswith(("https://", "http://")):
            raise CowfsError(f"{pin.filename}: cannot download from {redact(pin.url)!r}")
        target = dest / pin.filename
        # Same filename, right hash: already fetched. Without a hash, the filename (unique per
        # version and build on an index) is all there is to go on.
        if target.is_file() and (not expected
                                 or _checked_digest(target, expected, known) in expected):
            return target
        assert pool is not None, "remote wheels are fetched by fetch_async, with a pool"
        _download(pin, target, expected, abort, meter, pool)
        return target
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise CowfsError(f"{pin.filename}: {exc.strerror or exc}{where}") from None


OnReady = Callable[[Pin, Path], None]
KnownDigest = Callable[[Path], "str | None"]  # a file's sha256 if recorded for it as it is


def warm_up(event_loop: bool = True) -> None:
    """Import what downloads need and load the TLS context in a thread while the resolver
    runs (its subprocess leaves this process idle): ~60 ms less between the resolution and
    the first download. event_loop=False: not trio (~55 ms of CPU), when the downloads are
    expected to happen meanwhile, outside fetch's event loop (installer.resolve.prefetch); fetch
    imports it if it still needs it. Failures are left for the downloads to report."""
    threading.Thread(target=_warm, args=(event_loop,), name="cowfs-warm-up",
                     daemon=True).start()


def _warm(event_loop: bool) -> None:
    try:
        import tempfile  # noqa: F401

        if event_loop:
            import trio  # noqa: F401

        import installer.resolve.http_pool  # noqa: F401

        ssl_context()
    except Exception:  # only a head start: the downloads meet and report any failure
        pass


def _obtain_and_hand_over(pin: Pin, dest: Path, abort: threading.Event, meter: _Progress,
                          pool: Pool | None, on_ready: OnReady | None,
                          known: KnownDigest | None = None, check_local: bool = True) -> Path:
    path = _obtain(pin, dest, abort, meter, pool, known, check_local)
    if on_ready is not None and not abort.is_set():
        on_ready(pin, path)
    return path


async def fetch_async(pins: Sequence[Pin], dest: Path, *, max_parallel: int = 8,
                      progress: bool = True, timeout: float = TIMEOUT,
                      on_ready: OnReady | None = None,
                      known: KnownDigest | None = None,
                      check_local: bool = True) -> dict[str, Path]:
    """`fetch` for callers already inside trio."""
    import trio

    from installer.resolve.http_pool import Pool

    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CowfsError(f"cannot create wheel directory {dest}: {exc.strerror}") from None
    remote = sum(1 for p in pins if local_path(p.url) is None
                 and not (dest / p.filename).is_file())
    meter = _Progress(progress, remote)
    pool = Pool(timeout)  # one kept-alive connection per download thread and host
    limiter = trio.CapacityLimiter(max(1, max_parallel))
    abort = threading.Event()
    result: dict[str, Path] = {}
    errors: list[CowfsError] = []

    async def one(pin: Pin) -> None:
        try:
            result[pin.name] = await trio.to_thread.run_sync(
                _obtain_and_hand_over, pin, dest, abort, meter, pool, on_ready, known,
                check_local, limiter=limiter)
        except CowfsError as exc:
            errors.append(exc)
            abort.set()
        except _Aborted:
            pass

    try:
        async with trio.open_nursery() as nursery:
            for pin in pins:
                nursery.start_soon(one, pin)
    finally:
        abort.set()  # on cancellation too: running threads stop at their next chunk
        meter.close()
        pool.close()
    if errors:
        more = f" (and {len(errors) - 1} more failed)" if len(errors) > 1 else ""
        raise CowfsError(f"{errors[0]}{more}")
    return result


def fetch(pins: Sequence[Pin], dest: Path, *, max_parallel: int = 8, progress: bool = True,
          timeout: float = TIMEOUT, on_ready: OnReady | None = None,
          known: KnownDigest | None = None, check_local: bool = True) -> dict[str, Path]:
    """Local wheel paths by pin name: remote wheels downloaded into dest, local ones in place.

    Downloads run max_parallel at a time; sha256 is checked whenever the pin has one (from
    `sha256` or a lock's `hashes`). Progress goes to stderr unless progress=False. Any
    failure (HTTP error, refused connection, hash mismatch) is one CowfsError naming the
    wheel, and leaves no partial file behind. on_ready(pin, path) is called (in a worker
    thread) as soon as each wheel is there and checked, so it can be ingested meanwhile.
    known: a file's sha256 if one was recorded for it as it is now (installer.wheel.wheel_index),
    so that a wheel hashed by its ingestion or download is not hashed again.
    check_local=False: local wheels nothing is recorded for are handed over unhashed; the
    caller must check the sha256 their ingestion computes (installer.wheel.ingest.Ingestor.results
    does), which saves reading each one twice.
    """
    if known is not None:  # (asked by _settled, then by _obtain: one record read per file)
        known = functools.cache(known)
    if all(_settled(p, Path(dest), known, check_local) for p in pins):
        # Nothing to download or hash (the warm path, or all fetched ahead): no event
        # loop, no threads.
        return {p.name: _obtain_and_hand_over(p, Path(dest), threading.Event(),
                                              _Progress(False, 0), None, on_ready, known,
                                              check_local)
                for p in pins}
    import trio  # only when there is real work: importing it costs ~50 ms

    return trio.run(functools.partial(fetch_async, pins, dest, max_parallel=max_parallel,
                                      progress=progress, timeout=timeout, on_ready=on_ready,
                                      known=known, check_local=check_local))


__all__ = ["KnownDigest", "download", "expected_hashes", "fetch", "fetch_async", "mismatch"]
