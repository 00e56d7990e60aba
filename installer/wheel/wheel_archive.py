"""Reading and validating a wheel archive, without touching the store.

Everything here is about trusting a zip from the internet: member names (zip-slip, absolute
paths, backslashes, NUL, non-UTF-8, symlinks, duplicates), corruption, WHEEL, METADATA,
RECORD and entry points. installer.wheel.wheel turns a checked archive into store objects and a
manifest; installer.wheel.scripts reuses the script-name and entry-point checks.
"""

from __future__ import annotations

import base64
import csv
import io
import keyword
import lzma
import os
import re
import stat
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO
from zipfile import BadZipFile, ZipFile, ZipInfo

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import (
    InvalidWheelFilename,
    NormalizedName,
    canonicalize_name,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from cowfs.errors import CowfsError
from cowfs.store.manifest import DATA_KEYS, DEFAULT_MTIME_NS
from cowfs.store.store import CHUNK

SCHEMES = ("purelib", "platlib", *DATA_KEYS)
SCRIPT_GROUPS = ("console_scripts", "gui_scripts")
# RECORD hash names allowed by the spec: hashlib names, nothing weaker than sha256.
STRONG_HASHES = frozenset(
    {"sha256", "sha384", "sha512", "sha3_256", "sha3_384", "sha3_512", "blake2b", "blake2s"}
)
RECORD_SIGNATURES = ("RECORD.jws", "RECORD.p7s")

_UTF8_FLAG = 0x800
_ENCRYPTED_FLAG = 0x1
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zipfile's structFileHeader
_LOCAL_MAGIC = b"PK\x03\x04"
_EXTRA_GUESS = 64  # local extra field bytes read along with the header (usually 0 or 28)
_ZIP_READ_ERRORS = (
    BadZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    NotImplementedError,
    RuntimeError,
    ValueError,
    OSError,  # bz2 reports bad data as OSError
)
_SCRIPT_SPEC = re.compile(r"(?P<module>[\w.]+)\s*:\s*(?P<attr>[\w.]+)\s*(?:\[[^\]]*\])?\s*")
_PYTHON_SHEBANG = re.compile(rb"#!pythonw?(?P<args>[ \t][^\r\n]*)?\r?")
_WHEEL_VERSION = re.compile(r"\s*(\d+)\.(\d+)\s*")


class WheelError(CowfsError):
    """A wheel is malformed, unsafe or incompatible; nothing of it was made installable."""


# -- scripts (also used by installer.wheel.scripts on manifests) ------------------------------


def check_script_name(name: str) -> str:
    """A file name directly inside bin/: nothing that could land anywhere else."""
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or not name.isprintable()
        or len(name.encode()) > 255
    ):
        raise WheelError(f"script name {name!r} would escape the venv's bin directory")
    return name


def parse_script_spec(spec: str) -> tuple[str, str]:
    """'pkg.mod:obj.attr [extra]' -> ('pkg.mod', 'obj.attr').

    The parts end up in generated Python source, so only dotted identifiers pass.
    """
    m = _SCRIPT_SPEC.fullmatch(spec.strip())
    if m is not None:
        module, attr = m["module"], m["attr"]
        parts = [*module.split("."), *attr.split(".")]
        if all(p.isidentifier() and not keyword.iskeyword(p) for p in parts):
            return module, attr
    raise WheelError(f"bad script entry point {spec!r}: expected 'module:callable'")


def split_python_shebang(data: bytes) -> tuple[bytes, bytes] | None:
    """(args, rest) if the first line is exactly '#!python' or '#!pythonw' (plus args)."""
    first, _, rest = data.partition(b"\n")
    m = _PYTHON_SHEBANG.fullmatch(first)
    if m is None:
        return None
    return (m["args"] or b"").strip(), rest


def b64(digest: bytes) -> str:
    """RECORD's hash encoding: urlsafe base64 without padding."""
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


# -- the archive ----------------------------------------------------------------------


def parse_filename(filename: str) -> tuple[NormalizedName, Version, list[str]]:
    """(normalized name, version, sorted tags) from a wheel filename."""
    try:
        name, version, _build, tags = parse_wheel_filename(filename)
    except (InvalidWheelFilename, InvalidVersion) as exc:
        raise WheelError(f"bad wheel filename {filename!r}: {exc}") from None
    return name, version, sorted(str(t) for t in tags)


def open_zip(fileobj: IO[bytes], wheel: str) -> ZipFile:
    try:
        return ZipFile(fileobj)
    except (BadZipFile, ValueError, EOFError, NotImplementedError, OSError) as exc:
        # ValueError includes UnicodeDecodeError: a name flagged UTF-8 that is not
        raise WheelError(f"wheel {wheel} is not a readable zip archive: {exc}") from None


def _check_member(info: ZipInfo, wheel: str) -> None:
    name = info.filename

    def bad(why: str) -> WheelError:
        return WheelError(f"wheel {wheel} is unsafe: member {info.orig_filename!r} {why}")

    # zipfile silently cuts a name at NUL; orig_filename keeps the whole of it
    if info.orig_filename != name or "\0" in name:
        raise bad("contains a NUL byte")
    # without the UTF-8 flag zipfile decodes cp437, which is ASCII only for ASCII bytes
    if not info.flag_bits & _UTF8_FLAG and not name.isascii():
        raise bad("has a name that is not UTF-8")
    if info.flag_bits & _ENCRYPTED_FLAG:
        raise bad("is encrypted")
    if "\\" in name:
        raise bad("contains a backslash")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise bad("is an absolute path")
    parts = (name[:-1] if info.is_dir() else name).split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise bad("escapes the install directory")
    if not name.isprintable() or any(len(p.encode()) > 255 for p in parts):
        raise bad("has an unusable name")
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise bad("is a symlink")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise bad("is not a regular file")


def scan(zf: ZipFile, wheel: str) -> dict[str, ZipInfo]:
    """Validate every member name; return the regular files by name."""
    files: dict[str, ZipInfo] = {}
    seen: set[str] = set()
    for info in zf.infolist():
        _check_member(info, wheel)
        if info.filename in seen:
            raise WheelError(f"wheel {wheel} is unsafe: duplicate member {info.filename!r}")
        seen.add(info.filename)
        if not info.is_dir():
            files[info.filename] = info
    parents = {n.rsplit("/", i)[0] for n in seen for i in range(1, n.count("/") + 1)}
    for name in files:
        if name in parents:
            raise WheelError(f"wheel {wheel} is unsafe: {name!r} is both a file and a directory")
    return files


def iter_member(zf: ZipFile, info: ZipInfo, wheel: str) -> Iterator[bytes]:
    """The member's bytes in chunks; corruption (CRC, truncation) becomes a WheelError."""

    def corrupt(exc: BaseException) -> WheelError:
        return WheelError(f"wheel {wheel} is corrupt: member {info.filename!r}: {exc}")

    try:
        src = zf.open(info)
    except _ZIP_READ_ERRORS as exc:
        raise corrupt(exc) from None
    with src:
        while True:
            try:
                chunk = src.read(CHUNK)
            except _ZIP_READ_ERRORS as exc:
                raise corrupt(exc) from None
            if not chunk:
                return
            yield chunk


def read_whole(zf: ZipFile, info: ZipInfo, wheel: str) -> bytes:
    """A member's bytes, checked as zipfile checks them (local header, name, sizes, CRC),
    with one pread and one bounded inflate where zipfile makes ~10 calls a member (an
    install reads thousands of small members). Other members go through zipfile."""
    try:
        fd = zf.fp.fileno() if zf.fp is not None else -1
    except (AttributeError, OSError, ValueError):  # not a real file (tests, pipes)
        fd = -1
    # deflate expands stored data by at most ~0.03% plus a few bytes: a larger claim is not
    # read in one piece (zipfile streams it, and meets the error itself)
    plausible = info.compress_size <= info.file_size + (info.file_size >> 10) + 1024
    if fd < 0 or info.compress_type not in (0, 8) or info.flag_bits & _ENCRYPTED_FLAG \
            or not plausible:
        return b"".join(iter_member(zf, info, wheel))

    def corrupt(why: str) -> WheelError:
        return WheelError(f"wheel {wheel} is corrupt: member {info.filename!r}: {why}")

    name = info.orig_filename.encode("utf-8" if info.flag_bits & _UTF8_FLAG else "cp437")
    try:
        buf = os.pread(fd, 30 + len(name) + _EXTRA_GUESS + info.compress_size,
                       info.header_offset)
    except OSError as exc:
        raise corrupt(exc.strerror or str(exc)) from None
    if len(buf) < 30 or buf[:4] != _LOCAL_MAGIC:
        raise corrupt("bad magic number for file header")
    fields = _LOCAL_HEADER.unpack_from(buf)
    start = 30 + fields[10] + fields[11]
    if buf[30:30 + fields[10]] != name:
        raise corrupt("file name in directory and header differ")
    raw = buf[start:start + info.compress_size]
    if len(raw) < info.compress_size and fields[11] > _EXTRA_GUESS:
        raw = os.pread(fd, info.compress_size, info.header_offset + start)
    if len(raw) != info.compress_size:
        raise corrupt("truncated")
    if info.compress_type == 8:
        inflate = zlib.decompressobj(-15)
        try:  # never past the declared size (+1 byte, to tell a lie)
            data = inflate.decompress(raw, info.file_size + 1)
        except zlib.error as exc:
            raise corrupt(str(exc)) from None
        if not inflate.eof:
            raise corrupt("compressed data does not end where it should")
    else:
        data = raw
    if len(data) != info.file_size:
        raise corrupt(f"{len(data)} bytes where {info.file_size} were declared")
    if zlib.crc32(data) != info.CRC:
        raise corrupt(f"Bad CRC-32 for file {info.filename!r}")
    return data


def read_member(zf: ZipFile, files: dict[str, ZipInfo], name: str, wheel: str) -> bytes:
    if name not in files:
        raise WheelError(f"wheel {wheel} has no {name}")
    return read_whole(zf, files[name], wheel)


def find_dist_info(files: dict[str, ZipInfo], name: str, version: Version, wheel: str) -> str:
    """The one top-level .dist-info directory, which must agree with the filename."""
    tops = {n.split("/", 1)[0] for n in files if "/" in n}
    found = sorted(t for t in tops if t.endswith(".dist-info"))
    if len(found) != 1:
        listed = f" ({', '.join(found)})" if found else ""
        raise WheelError(f"wheel {wheel} has {len(found)} .dist-info directories{listed}")
    info_dir = found[0]
    dist, sep, ver = info_dir[: -len(".dist-info")].rpartition("-")
    try:
        ok = bool(sep) and canonicalize_name(dist) == name and Version(ver) == version
    except InvalidVersion:
        ok = False
    if not ok:
        raise WheelError(f"wheel {wheel}: {info_dir} does not match the filename")
    return info_dir


# -- dist-info files --------------------------------------------------------------------


def _headers(data: bytes, wheel: str, what: str) -> dict[str, str]:
    """RFC 822 style headers (WHEEL), keys lower-cased, first occurrence wins."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise WheelError(f"wheel {wheel}: {what} is not UTF-8") from None
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, sep, value = line.partition(":")
        if sep and not line[0].isspace():
            out.setdefault(key.strip().lower(), value.strip())
    return out


def check_wheel_file(data: bytes, wheel: str) -> bool:
    """Wheel-Version must be 1.x (a newer minor is fine); returns Root-Is-Purelib."""
    raw = _headers(data, wheel, "WHEEL")
    version = raw.get("wheel-version", "")
    m = _WHEEL_VERSION.fullmatch(version)
    if m is None:
        raise WheelError(f"wheel {wheel} has a bad Wheel-Version {version!r}")
    if int(m[1]) != 1:
        raise WheelError(f"wheel {wheel} has Wheel-Version {version}; only 1.x is supported")
    purelib = raw.get("root-is-purelib", "").lower()
    if purelib not in ("true", "false"):
        raise WheelError(f"wheel {wheel} has a bad or missing Root-Is-Purelib")
    return purelib == "true"


@dataclass(frozen=True, slots=True)
class Metadata:
    name: str  # as written in METADATA
    version: Version
    requires_dist: list[str]
    requires_python: str | None


def parse_metadata(data: bytes, name: str, version: Version, wheel: str) -> Metadata:
    """METADATA's name and version must agree with the filename; requirements must parse."""
    from packaging.metadata import parse_email  # ~7 ms of email modules: cold ingests only

    raw, unparsed = parse_email(data)
    meta_name, meta_version = raw.get("name"), raw.get("version")
    if not meta_name or not meta_version or {"name", "version"} & set(unparsed):
        raise WheelError(f"wheel {wheel}: METADATA lacks a single Name and Version")
    try:
        parsed_version = Version(meta_version)
    except InvalidVersion:
        raise WheelError(f"wheel {wheel}: METADATA has a bad Version {meta_version!r}") from None
    if canonicalize_name(meta_name) != name or parsed_version != version:
        raise WheelError(
            f"wheel {wheel}: METADATA says {meta_name} {meta_version}, "
            f"the filename says {name} {version}"
        )
    requires = list(raw.get("requires_dist", []))
    requires_python = raw.get("requires_python")
    try:
        for req in requires:
            Requirement(req)
        if requires_python is not None:
            SpecifierSet(requires_python)
    except (InvalidRequirement, InvalidSpecifier) as exc:
        raise WheelError(f"wheel {wheel}: METADATA has a bad requirement: {exc}") from None
    return Metadata(meta_name, parsed_version, requires, requires_python)


@dataclass(frozen=True, slots=True)
class RecordRow:
    algo: str  # "" when RECORD gives no hash
    value: str  # urlsafe base64 without padding
    size: int | None


def parse_record(data: bytes, wheel: str) -> dict[str, RecordRow]:
    def bad(why: str) -> WheelError:
        return WheelError(f"wheel {wheel}: RECORD {why}")

    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise bad(f"is unreadable: {exc}") from None
    out: dict[str, RecordRow] = {}
    for row in rows:
        if not row:
            continue
        if len(row) != 3:
            raise bad(f"has a malformed row {row!r}")
        path, hash_, size = row
        if path in out:
            raise bad(f"lists {path!r} twice")
        size_ok = size.isascii() and size.isdigit()
        algo = value = ""
        if hash_:
            algo, _, value = hash_.partition("=")
            if algo not in STRONG_HASHES:
                raise bad(f"uses hash {algo!r} for {path!r}; only sha256 or stronger is accepted")
            if not value or not size_ok:
                raise bad(f"has an incomplete entry for {path!r}")
        elif size and not size_ok:
            raise bad(f"has a bad size for {path!r}")
        out[path] = RecordRow(algo, value.rstrip("="), int(size) if size else None)
    return out


def check_record_coverage(
    files: dict[str, ZipInfo], record: dict[str, RecordRow], info_dir: str, wheel: str
) -> None:
    """Every member but RECORD (and its signatures) hashed in RECORD, and vice versa."""
    exempt = {f"{info_dir}/{n}" for n in ("RECORD", *RECORD_SIGNATURES)}
    for name in files:
        if name not in exempt and not (name in record and record[name].algo):
            raise WheelError(f"wheel {wheel}: {name!r} is not listed in RECORD with a hash")
    for path, row in record.items():
        if row.algo and path not in files:
            raise WheelError(f"wheel {wheel}: RECORD lists {path!r}, which is not in the wheel")


def parse_entry_points(data: bytes, wheel: str) -> dict[str, dict[str, str]]:
    """All groups; console and GUI script names and targets are validated."""
    import configparser  # cold ingests only

    # '=' only, as importlib.metadata splits; no [DEFAULT] merging into every group
    parser = configparser.ConfigParser(
        delimiters=("=",), interpolation=None, strict=True, default_section="\0"
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # case-sensitive names
    try:
        parser.read_string(data.decode("utf-8"))
    except (UnicodeDecodeError, configparser.Error) as exc:
        raise WheelError(f"wheel {wheel}: bad entry_points.txt: {exc}") from None
    groups = {s: dict(parser.items(s)) for s in parser.sections()}
    try:
        for group in SCRIPT_GROUPS:
            for script, spec in groups.get(group, {}).items():
                check_script_name(script)
                parse_script_spec(spec)
    except WheelError as exc:
        raise WheelError(f"wheel {wheel}: {exc}") from None
    return groups


def mtime_ns(infos: Sequence[ZipInfo]) -> int:
    """Newest member time read as UTC: the same wheel always gives the same mtime."""
    newest = 0
    for info in infos:
        try:
            when = datetime(*info.date_time, tzinfo=timezone.utc)
        except ValueError:  # DOS dates can encode month 0 and the like
            continue
        newest = max(newest, int(when.timestamp()) * 10**9)
    return newest or DEFAULT_MTIME_NS
