"""Locks and local wheels: the paths from requirements to pins that avoid a pip resolve.

`read_lock` reads what `cowfs sync` installs: a pinned requirements file (`name==version`,
`--hash=sha256:...`, markers, `-r`) or a PEP 751 `pylock.toml`. `locate` gives URL-less
lock pins a wheel, from local directories by filename when it can, else from one
`pip --no-deps` report. `pins_from_local_wheels` is the warm-install fast path: an exactly
pinned set whose wheels are on disk is accepted once it is closed under dependencies
(pip-sync style validation, not a resolver); anything else returns None and the caller
resolves with pip. Spawning pip costs ~0.5-1 s, reading 31 METADATA files a few ms.
"""

from __future__ import annotations

import os
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from packaging.markers import InvalidMarker, Marker, default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.tags import Tag, sys_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

from cowfs.errors import CowfsError
from cowfs.store.store import Store, sha256_file
from installer.resolve.resolve import (
    PIP_TIMEOUT,
    Pin,
    _check_wheel_name,
    _filename_of,
    _pins_from_report,
    _run_pip,
    _version,
    local_path,
)
from installer.wheel import wheel_index

Markers = Mapping[str, Any]

# -- requirements files ----------------------------------------------------------------------

_COMMENT = re.compile(r"(^|\s+)#.*$")
_OPTION_SPLIT = re.compile(r"\s+(?=--?[A-Za-z])")
# Global options a pip-compile output may carry: where to look, not what to install.
_IGNORED_OPTIONS = frozenset({
    "-i", "--index-url", "--extra-index-url", "-f", "--find-links", "--no-index",
    "--trusted-host", "--prefer-binary", "--only-binary", "--no-binary", "--pre",
})


def _line(exc: BaseException) -> str:
    """packaging's parse errors draw a caret under the input: keep the first line only."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@dataclass(frozen=True)
class _Line:
    req: Requirement
    hashes: tuple[str, ...]
    where: str  # "file:line" for messages


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Lines with `\\` continuations joined and comments removed, as pip reads them."""
    pending: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
        if line.endswith("\\") and not _COMMENT.match(line):
            pending.append(line[:-1])
            continue
        joined = "".join([*pending, " " + line if _COMMENT.match(line) else line])
        pending = []
        if stripped := _COMMENT.sub("", joined).strip():
            yield start, stripped
    if pending and (stripped := _COMMENT.sub("", "".join(pending)).strip()):
        yield start, stripped


def _option(text: str) -> tuple[str, str]:
    """'--hash=sha256:x' or '-r file' -> (option, value)."""
    name, _, value = text.partition("=") if text.startswith("--") else (text, "", "")
    if not value:
        name, _, value = text.partition(" ")
    return name.strip(), value.strip()


def _read_requirement_file(path: Path, markers: Markers, depth: int = 0,
                           read: list[tuple[Path, str]] | None = None) -> list[_Line]:
    """Requirement lines that apply under `markers`; `-r` is followed, other options refused.

    Each file's text is appended to `read` as it is parsed (for installer.resolve.plan_cache).
    """
    if depth > 20:
        raise CowfsError(f"{path}: -r nesting too deep (a cycle?)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:  # ValueError: undecodable, or a NUL in `-r` path
        raise CowfsError(f"cannot read requirements file {path}: {exc}") from None
    if read is not None:
        read.append((path, text))
    out: list[_Line] = []
    for number, line in _logical_lines(text):
        where = f"{path}:{number}"
        if line.startswith("-"):
            opt, value = _option(line)
            if opt in ("-r", "--requirement"):
                out += _read_requirement_file(path.parent / value, markers, depth + 1, read)
            elif opt in ("-e", "--editable"):
                raise CowfsError(f"{where}: editable requirements are not supported: {line}")
            elif opt not in _IGNORED_OPTIONS:
                raise CowfsError(f"{where}: unsupported option {opt}")
            continue
        req_text, *options = _OPTION_SPLIT.split(line)
        hashes: list[str] = []
        for text_opt in options:
            opt, value = _option(text_opt)
            algo, _, digest = value.lower().partition(":")
            if opt != "--hash" or algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise CowfsError(f"{where}: unsupported option {text_opt!r} "
                                 "(only --hash=sha256:<64 hex digits>)")
            hashes.append(digest)
        try:
            req = Requirement(req_text)
        except InvalidRequirement as exc:
            raise CowfsError(f"{where}: invalid requirement {req_text!r}: {_line(exc)}") from None
        if req.marker is None or _evaluate(req.marker, markers, extra=""):
            out.append(_Line(req, tuple(hashes), where))
    return out


def _evaluate(marker: Marker, markers: Markers, *, extra: str | None = None,
              lock_file: bool = False) -> bool:
    env = dict(markers)
    if extra is not None:
        env["extra"] = extra
    try:
        if lock_file:
            return marker.evaluate(env, context="lock_file")
        return marker.evaluate(env)
    except Exception as exc:  # packaging raises several types for an unusable marker
        raise CowfsError(f"cannot evaluate marker '{marker}': {_line(exc)}") from None


def _pinned_version(req: Requirement) -> str | None:
    specs = list(req.specifier)
    # packaging accepts "===" with an empty version: that pins nothing
    if len(specs) == 1 and specs[0].operator in ("==", "===") and specs[0].version \
            and "*" not in specs[0].version:
        return specs[0].version
    return None


def _env(markers: Markers | None) -> dict[str, Any]:
    return dict(default_environment() if markers is None else markers)


# -- locks ---------------------------------------------------------------------------------


def read_lock(path: Path, *, markers: Markers | None = None,
              supported_tags: Sequence[str] | None = None) -> list[Pin]:
    """The pins of a lock: PEP 751 pylock(.name).toml, else a pinned requirements file.

    markers: the target's marker environment (default: this interpreter's); supported_tags:
    the target's wheel tags in priority order (default: this interpreter's), used to pick a
    pylock wheel. Requirements-file pins have no URL: pass them through `locate`.
    """
    path = Path(path)
    env = _env(markers)
    if path.suffix == ".toml":
        return _read_pylock(path, env, supported_tags)
    pins: dict[str, Pin] = {}
    for line in _read_requirement_file(path, env):
        name = canonicalize_name(line.req.name)
        version, url, filename = _pinned_version(line.req), "", ""
        direct_url = None
        if line.req.url:
            url, filename = line.req.url, _filename_of(line.req.url)
            _check_wheel_name(filename, name, None, line.where)
            version = str(parse_wheel_filename(filename)[1])
            direct_url = {"url": url, "archive_info": {"hashes": {"sha256": line.hashes[0]}}
                          if len(line.hashes) == 1 else {}}
        if version is None:
            raise CowfsError(f"{line.where}: '{line.req}' is not pinned "
                             "(a lock needs name==version or name @ wheel-url on every line)")
        if name in pins:
            raise CowfsError(f"{line.where}: '{name}' is pinned twice")
        pins[name] = Pin(name=name, version=version, url=url, filename=filename,
                         sha256=line.hashes[0] if len(line.hashes) == 1 else None,
                         requested=True, direct_url=direct_url, hashes=line.hashes)
    return list(pins.values())


def _tag_rank(supported_tags: Sequence[str] | None) -> dict[str, int]:
    if supported_tags is None:
        supported_tags = [str(t) for t in sys_tags()]
    return {tag: i for i, tag in enumerate(supported_tags)}


def _rank(tags: frozenset[Tag], rank: Mapping[str, int]) -> int | None:
    ranks = [rank[str(t)] for t in tags if str(t) in rank]
    return min(ranks) if ranks else None


def load_toml_lock(path: Path) -> dict[str, Any]:
    """A TOML lock file's document (pylock.toml, uv.lock); any failure is one clear error."""
    if sys.version_info < (3, 11):
        raise CowfsError(f"{path}: reading a TOML lock needs Python 3.11 or newer (tomllib)")
    import tomllib

    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CowfsError(f"cannot read lock file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CowfsError(f"{path}: not valid TOML: {_line(exc)}") from None


def _read_pylock(path: Path, env: dict[str, Any],
                 supported_tags: Sequence[str] | None) -> list[Pin]:
    def bad(msg: str) -> CowfsError:
        return CowfsError(f"{path}: {msg}")

    def get(table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str,
            required: bool = True) -> Any:
        value = table.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, kind):
            what = ("is missing" if value is None
                    else f"has the wrong type ({type(value).__name__})")
            raise bad(f"{where}'{key}' {what}")
        return value

    doc = load_toml_lock(path)
    lock_version = get(doc, "lock-version", str, "")
    if not isinstance(v := _version(lock_version), Version) or v.major != 1:
        raise bad(f"unsupported lock-version {lock_version!r} (cowfs reads 1.x)")
    try:
        env["extras"] = frozenset()
        env["dependency_groups"] = frozenset(get(doc, "default-groups", list, "", False) or ())
        environments = get(doc, "environments", list, "", False)
        if environments and not any(_evaluate(Marker(m), env, lock_file=True)
                                    for m in environments):
            raise bad(f"the lock does not cover this environment ({' or '.join(environments)})")
        requires_python = get(doc, "requires-python", str, "", False)
        if requires_python and not SpecifierSet(requires_python).contains(
                env["python_full_version"], prereleases=True):
            raise bad(f"the lock requires Python {requires_python}")
    except (InvalidMarker, InvalidSpecifier, TypeError) as exc:
        raise bad(f"invalid environments or requires-python: {_line(exc)}") from None
    rank = _tag_rank(supported_tags)
    pins: dict[str, Pin] = {}
    for i, pkg in enumerate(get(doc, "packages", list, "")):
        if not isinstance(pkg, dict):
            raise bad(f"packages[{i}] is not a table")
        name = get(pkg, "name", str, f"packages[{i}].")
        where = f"package '{name}': "
        version = get(pkg, "version", str, where, False)
        marker = get(pkg, "marker", str, where, False)
        try:
            if marker and not _evaluate(Marker(marker), env, lock_file=True):
                continue
        except InvalidMarker as exc:
            raise bad(f"{where}invalid marker: {_line(exc)}") from None
        wheels = get(pkg, "wheels", list, where, False)
        if not wheels:
            kinds = [k for k in ("sdist", "vcs", "directory", "archive") if k in pkg] or ["nothing"]
            raise bad(f"{where}no wheel in the lock (only {', '.join(kinds)}); "
                      "cowfs installs wheels only")
        best: tuple[int, str, str, str, str | None] | None = None
        for j, wheel in enumerate(wheels):
            wwhere = f"{where}wheels[{j}]."
            if not isinstance(wheel, dict):
                raise bad(f"{wwhere[:-1]} is not a table")
            url = get(wheel, "url", str, wwhere, False)
            wpath = get(wheel, "path", str, wwhere, False)
            if wpath is not None:
                local = path.parent / wpath
                if local.is_file() or url is None:
                    url = local.absolute().as_uri()
            if url is None:
                raise bad(f"{wwhere}'url' or 'path' is missing")
            filename = get(wheel, "name", str, wwhere, False) or _filename_of(url)
            tags = _check_wheel_name(filename, name, version, f"{path}: {where[:-2]}")
            sha256 = get(get(wheel, "hashes", dict, wwhere), "sha256", str, f"{wwhere}hashes.")
            wversion = str(parse_wheel_filename(filename)[1])
            r = _rank(tags, rank)
            if r is not None and (best is None or r < best[0]):
                best = (r, url, filename, wversion, sha256)
        if best is None:
            raise bad(f"{where}none of its {len(wheels)} wheels fits this interpreter")
        if name in pins:
            raise bad(f"{where}listed twice for this environment")
        _, url, filename, wversion, sha256 = best
        pins[name] = Pin(name=canonicalize_name(name), version=version or wversion, url=url,
                         filename=filename, sha256=sha256, requested=True,
                         requires_python=get(pkg, "requires-python", str, where, False),
                         hashes=(sha256,) if sha256 else ())
    return list(pins.values())


# -- local wheels --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Wheel:
    path: Path
    version: Version
    build: tuple[()] | tuple[int, str]
    tags: frozenset[Tag]


def _index_wheels(dirs: Sequence[Path], names: set[str]) -> dict[str, list[_Wheel]]:
    """Wheels of `names` in `dirs`, in directory order; only their filenames are parsed."""
    found: dict[str, list[_Wheel]] = {}
    for d in dirs:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if not entry.name.endswith(".whl") or canonicalize_name(
                    entry.name.split("-", 1)[0]) not in names:
                continue
            try:
                name, version, build, tags = parse_wheel_filename(entry.name)
            except InvalidWheelFilename:
                continue
            if entry.is_file():
                found.setdefault(name, []).append(
                    _Wheel(Path(entry.path).absolute(), version, build, tags))
    return found


def _pick(wheels: Sequence[_Wheel], version: str, rank: Mapping[str, int],
          hashes: Sequence[str]) -> tuple[_Wheel, str | None] | None:
    """The best-tagged local wheel of exactly `version` (matching a hash if any are given)."""
    want = _version(version)
    fits = [(r, i, -w.build[0] if w.build else 0, w) for i, w in enumerate(wheels)
            if (w.version == want if isinstance(want, Version) else str(w.version) == want)
            and (r := _rank(w.tags, rank)) is not None]
    # best tag first, then the earlier directory, then the higher build number
    for *_, wheel in sorted(fits, key=lambda f: f[:3]):
        if not hashes:
            return wheel, None
        digest = sha256_file(wheel.path)
        if digest in hashes:
            return wheel, digest
    return None


@lru_cache(maxsize=4096)
def _metadata_cached(path: str, size: int, mtime_ns: int) -> tuple[tuple[str, ...], str | None]:
    from email.parser import HeaderParser  # only when the wheel index has no answer

    del size, mtime_ns  # part of the cache key only: a rewritten file is read again
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist()
                 if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        if len(names) != 1:
            raise CowfsError(f"{path}: expected one .dist-info/METADATA, found {len(names)}")
        headers = HeaderParser().parsestr(zf.read(names[0]).decode("utf-8", "surrogateescape"))
    return tuple(headers.get_all("Requires-Dist") or ()), headers.get("Requires-Python")


def wheel_metadata(path: Path) -> tuple[tuple[str, ...], str | None]:
    """(Requires-Dist, Requires-Python) of a wheel file, cached in memory and in the store's
    wheel index (by full stat fingerprint), so a warm install opens no zip file."""
    st = path.stat()
    store = Store()
    facts = wheel_index.get(store, path, st)
    if isinstance(facts.get("requires_dist"), list):
        return tuple(facts["requires_dist"]), facts.get("requires_python")
    requires_dist, requires_python = _metadata_cached(str(path), st.st_size, st.st_mtime_ns)
    wheel_index.put(store, path, st, requires_dist=list(requires_dist),
                    requires_python=requires_python)
    return requires_dist, requires_python


def pins_from_local_wheels(
    requirements: Sequence[str],
    wheel_dirs: Sequence[Path],
    supported_tags: Sequence[str],
    markers: Markers,
    *,
    requirement_files: Sequence[Path] = (),
    read: list[tuple[Path, str]] | None = None,
) -> list[Pin] | None:
    """Pins for an exactly pinned, dependency-closed set of wheels already on disk, or None.

    None (the caller falls back to pip) when any requirement is not `==`, a wheel is missing
    or does not fit `supported_tags`, or some dependency (markers and requested extras
    evaluated against `markers`) is outside the set or outside its specifier.
    """
    env = _env(markers)
    try:
        lines = [_Line(Requirement(r), (), "argument") for r in requirements]
        for req_file in requirement_files:
            lines += _read_requirement_file(Path(req_file), env, read=read)
    except (InvalidRequirement, CowfsError):
        return None
    top: dict[str, _Line] = {}
    for line in lines:
        try:
            if line.req.marker is not None and not _evaluate(line.req.marker, env, extra=""):
                continue
        except CowfsError:
            return None
        name = canonicalize_name(line.req.name)
        if line.req.url or _pinned_version(line.req) is None:
            return None
        if name in top and top[name].req.specifier != line.req.specifier:
            return None
        top[name] = line
    if not top:
        return None
    index = _index_wheels([Path(d) for d in wheel_dirs], set(top))
    rank = {tag: i for i, tag in enumerate(supported_tags)}
    chosen: dict[str, tuple[_Wheel, str | None]] = {}
    for name, line in top.items():
        picked = _pick(index.get(name, ()), str(_pinned_version(line.req)), rank, line.hashes)
        if picked is None:
            return None
        chosen[name] = picked
    metadata: dict[str, tuple[tuple[str, ...], str | None]] = {}
    todo = [(name, canonicalize_name(extra)) for name, line in top.items()
            for extra in ("", *line.req.extras)]
    seen: set[tuple[str, str]] = set()
    python_version = env.get("python_full_version", "")
    while todo:
        item = todo.pop()
        if item in seen:
            continue
        seen.add(item)
        name, extra = item
        try:
            if name not in metadata:
                metadata[name] = wheel_metadata(chosen[name][0].path)
            requires_dist, requires_python = metadata[name]
            if requires_python and not SpecifierSet(requires_python).contains(
                    python_version, prereleases=True):
                return None
            for dep_text in requires_dist:
                dep = Requirement(dep_text)
                if dep.marker is not None and not _evaluate(dep.marker, env, extra=extra):
                    continue
                dep_name = canonicalize_name(dep.name)
                if dep_name not in chosen or dep.url or not dep.specifier.contains(
                        chosen[dep_name][0].version, prereleases=True):
                    return None
                todo += [(dep_name, canonicalize_name(e)) for e in ("", *dep.extras)]
        except (OSError, zipfile.BadZipFile, InvalidRequirement, InvalidSpecifier, CowfsError):
            return None  # unreadable wheel or metadata: let pip produce the real error
    return [
        Pin(name=name, version=str(_pinned_version(top[name].req)), url=wheel.path.as_uri(),
            filename=wheel.path.name, sha256=digest, requested=True,
            requires_dist=metadata[name][0], requires_python=metadata[name][1],
            hashes=top[name].hashes)
        for name, (wheel, digest) in chosen.items()
    ]


def locate(
    pins: Sequence[Pin],
    python: Path,
    find_links: Sequence[str] = (),
    no_index: bool = False,
    *,
    supported_tags: Sequence[str] | None = None,
    index_url: str | None = None,
    offline: bool = False,
    timeout: float | None = PIP_TIMEOUT,
) -> list[Pin]:
    """Give every URL-less pin (a requirements lock line) the wheel it installs from.

    With `supported_tags`, pins are first looked up by filename in local find-links
    directories (no pip spawn); the rest go to one `pip --no-deps` report for the exact
    versions. A lock's --hash values must match the wheel chosen.
    """
    missing = [p for p in pins if not p.url]
    if not missing:
        return list(pins)
    found: dict[str, Pin] = {}
    dirs = [d for link in find_links if (d := local_path(str(link))) and d.is_dir()]
    if dirs and supported_tags is not None:
        index = _index_wheels(dirs, {p.name for p in missing})
        rank = {tag: i for i, tag in enumerate(supported_tags)}
        for pin in missing:
            picked = _pick(index.get(pin.name, ()), pin.version, rank, pin.hashes)
            if picked is not None:
                wheel, digest = picked
                try:
                    requires_dist, requires_python = wheel_metadata(wheel.path)
                except (OSError, zipfile.BadZipFile, CowfsError):
                    continue  # unreadable here: pip will report it properly
                found[pin.name] = replace(pin, url=wheel.path.as_uri(), filename=wheel.path.name,
                                          sha256=digest or pin.sha256,
                                          requires_dist=requires_dist,
                                          requires_python=requires_python)
    rest = [p for p in missing if p.name not in found]
    if rest:
        # With a hash on every pin pip filters candidates by hash; a mix would make pip
        # demand hashes for all, so then the hashes are checked afterwards only.
        hashed = all(p.hashes for p in rest)
        req_file = "".join(f"{p.name}=={p.version} " + " ".join(f"--hash=sha256:{h}"
                                                                for h in p.hashes) + "\n"
                           for p in rest) if hashed else None
        options = ["--no-deps"]
        if offline or no_index:
            options.append("--no-index")
        elif index_url:
            options += ["--index-url", index_url]
        for link in find_links:
            options += ["--find-links", str(link)]
        reqs = [] if hashed else [f"{p.name}=={p.version}" for p in rest]
        doc = _run_pip(reqs, Path(python), options, timeout=timeout, quiet=True,
                       req_file=req_file)
        got = {p.name: p for p in _pins_from_report(doc)}
        for pin in rest:
            hit = got.get(pin.name)
            if hit is None:
                raise CowfsError(f"pip found no wheel for {pin.name}=={pin.version}")
            if pin.hashes and hit.sha256 not in pin.hashes:
                raise CowfsError(f"{hit.filename}: sha256 {hit.sha256} is not one of the "
                                 f"lock's hashes for {pin.name}=={pin.version}")
            found[pin.name] = replace(pin, url=hit.url, filename=hit.filename,
                                      sha256=hit.sha256, requires_dist=hit.requires_dist,
                                      requires_python=hit.requires_python)
    return [found.get(p.name, p) for p in pins]
