"""Requirements -> pinned wheels.

Resolution is uv's when uv is found (`uv pip compile --python TARGET`, the fastest resolver
there is), else the host pip's (`pip --python TARGET ...`; COWFS_RESOLVER forces either), run
against the target interpreter, so markers and wheel tags are the target's and the target venv
needs no resolver of its own. This module only builds the command, turns the resolver's
failures into one line, and parses its output into `Pin`s (one code path for both).

The paths that avoid spawning pip (~0.8 s) live in installer.resolve.locks and are importable from
here as well: `pins_from_local_wheels` (a fully pinned set whose wheels are on disk, checked
to be closed under dependencies), `locate` (a lock's pins found in local wheel directories by
filename) and `read_lock` (pinned requirements files and PEP 751 pylock.toml).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import unquote, urlparse

from packaging.tags import Tag
from packaging.utils import (
    InvalidWheelFilename,
    canonicalize_name,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from cowfs.errors import CowfsError
from installer.resolve.index_config import IndexConfig, effective, with_credentials

PIP_TIMEOUT = 900.0  # seconds for one pip run; a resolve against a slow index can take minutes
# uv's log of the wheels it looks at and selects, for a ResolverLog (installer.resolve.prefetch)
UV_LOG = "uv_resolver=debug,uv_client=debug"
# a line of uv's log (tracing's level first, maybe coloured), never one of its messages
# ("error:", "warning:", the cause tree): these never reach _uv_error or the user
_LOG_LINE = re.compile(r"^(?:\x1b\[[0-9;]*m)*(?:TRACE|DEBUG|INFO|WARN|ERROR)(?:\x1b\[[0-9;]*m)* ")


class ResolverLog(Protocol):
    """Follows uv's log while it resolves (installer.resolve.prefetch)."""

    def begin(self, config: IndexConfig) -> bool:
        """Whether to follow this resolution: uv then logs, and `line` gets each log line."""
        ...

    def line(self, text: str) -> None:
        ...


@dataclass(frozen=True)
class Pin:
    """One wheel to install. `url` is https://, file:// or "" (a lock line not located yet)."""

    name: str  # canonical
    version: str
    url: str
    filename: str
    sha256: str | None = None
    requested: bool = False  # named by the user (pip's REQUESTED), not pulled in as a dependency
    direct_url: dict[str, Any] | None = field(default=None, hash=False)  # PEP 610 data
    requires_dist: tuple[str, ...] = ()
    requires_python: str | None = None
    hashes: tuple[str, ...] = ()  # sha256 values a lock allows; `sha256` is the chosen file's


def _urlparse(url: str) -> Any:
    try:
        return urlparse(url)
    except ValueError as exc:  # e.g. "Invalid IPv6 URL" for http://[::1/x
        raise CowfsError(f"invalid URL {url!r}: {exc}") from None


def local_path(url: str) -> Path | None:
    """The local path a file:// URL or plain path names; None for a remote URL."""
    parsed = _urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            return None
        # urllib.request.url2pathname on POSIX, without importing urllib.request (~15 ms)
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and url:
        return Path(url)
    return None


def _filename_of(url: str) -> str:
    return unquote(_urlparse(url).path.rsplit("/", 1)[-1])


# -- running pip ---------------------------------------------------------------------------


def _pip_error(stderr: str, returncode: int) -> str:
    """The one line that says why pip failed, reworded for the common cases."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    text = "\n".join(lines)
    if "no such option: --python" in text:
        return f"the pip in {sys.executable} is too old: pip >= 22.3 is needed for --python"
    if re.search(r"unknown command .lock.", text):
        return (f"the pip in {sys.executable} is too old to resolve (`pip lock` needs pip >= "
                f"25.1): install uv, which cowfs prefers ({sys.executable} -m pip install uv), "
                f"or upgrade pip ({sys.executable} -m pip install -U pip)")
    if re.search(r"No module named pip\b", text):
        return (f"pip is not installed in cowfs's environment ({sys.executable}); "
                f"run: {sys.executable} -m ensurepip")
    errors = [ln[len("ERROR:"):].strip() for ln in lines if ln.startswith("ERROR:")]
    network = any(ln.startswith("WARNING: Retrying") for ln in lines)
    for err in errors:
        m = re.match(r"Could not find a version that satisfies the requirement (.+?) "
                     r"\(from versions: (.*)\)$", err)
        if m:
            req, versions = m.groups()
            name = re.split(r"[\s\[<>=!~;@(]", req, maxsplit=1)[0]
            if network:
                return f"could not reach the package index while looking for '{name}'"
            if versions.strip() == "none":
                return (f"no version of '{name}' satisfies the requirements: no wheel found "
                        "(unknown package, or only source distributions, which cowfs does "
                        "not build)")
            return f"no version of '{name}' satisfies '{req}' (wheels available: {versions})"
        m = re.match(r"Cannot install (.+) because these package versions have conflicting", err)
        if m:
            return f"conflicting requirements: {m[1]} cannot be installed together"
    errors = [e for e in errors if e and not e.startswith(("ResolutionImpossible", "Exception"))]
    if errors:
        return errors[0].rstrip(".:")
    return lines[-1] if lines else f"pip failed with exit status {returncode}"


def _run_pip(requirements: Sequence[str], python: Path, options: Sequence[str], *,
             timeout: float | None, quiet: bool, req_file: str | None = None) -> dict[str, Any]:
    """One `pip install --dry-run --report` for the target interpreter; the parsed report."""
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise CowfsError(f"interpreter {python} does not exist or is not executable")
    import tempfile  # pip runs only on the cold path

    with tempfile.TemporaryDirectory(prefix="cowfs-pip-") as tmp:
        report = Path(tmp, "report.json")
        args = list(options)
        if req_file is not None:
            Path(tmp, "requirements.txt").write_text(req_file)
            args += ["-r", str(Path(tmp, "requirements.txt"))]
        cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run",
               "--ignore-installed", "--only-binary", ":all:", "--report", str(report),
               "--quiet", *args, "--", *requirements]
        proc = _run(cmd, _pip_env(), timeout, "pip")
        stderr = proc.stderr
        if proc.returncode != 0:
            raise CowfsError(_pip_error(stderr, proc.returncode))
        if not quiet:
            for line in stderr.splitlines():
                if line.startswith("WARNING:"):
                    print(f"cowfs: pip: {line}", file=sys.stderr)
        try:
            doc = json.loads(report.read_text())
        except (OSError, ValueError) as exc:
            raise CowfsError(f"pip wrote no readable report: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("install"), list):
        raise CowfsError("pip's report has no 'install' list")
    return doc


def _pins_from_report(doc: Mapping[str, Any]) -> list[Pin]:
    pins = []
    for item in doc["install"]:
        try:
            meta, info = item["metadata"], item["download_info"]
            name, version, url = canonicalize_name(meta["name"]), meta["version"], info["url"]
            if "vcs_info" in info or "dir_info" in info:
                raise CowfsError(f"'{name}' comes from a source tree or VCS ({url}); cowfs "
                                 "installs wheels only: build a wheel first")
            archive = info.get("archive_info") or {}
            sha256 = (archive.get("hashes") or {}).get("sha256")
            if sha256 is None and str(archive.get("hash", "")).startswith("sha256="):
                sha256 = archive["hash"][len("sha256="):]
            filename = _filename_of(url)
            _check_wheel_name(filename, name, version, f"pip's report for '{name}'")
            pins.append(Pin(
                name=name, version=version, url=url, filename=filename, sha256=sha256,
                requested=bool(item.get("requested")),
                direct_url=dict(info) if item.get("is_direct") else None,
                requires_dist=tuple(meta.get("requires_dist") or ()),
                requires_python=meta.get("requires_python"),
            ))
        except (KeyError, TypeError, AttributeError) as exc:
            raise CowfsError(f"pip's report is malformed near {exc!s}") from None
    return pins


def _check_wheel_name(filename: str, name: str, version: str | None, where: str) -> frozenset[Tag]:
    """The wheel's tags, after checking its filename belongs to name (and version)."""
    try:
        wname, wversion, _, tags = parse_wheel_filename(filename)
    except InvalidWheelFilename:
        raise CowfsError(
            f"{where}: {filename!r} is not a wheel; cowfs installs wheels only"
        ) from None
    if wname != canonicalize_name(name):
        raise CowfsError(f"{where}: wheel {filename} is not a wheel of '{name}'")
    if version is not None and _version(version) != wversion:
        raise CowfsError(f"{where}: wheel {filename} is not version {version}")
    return tags


def _version(text: str) -> Version | str:
    try:
        return Version(text)
    except InvalidVersion:
        return text


def find_uv() -> str | None:
    """uv next to this interpreter (installed in the same environment), else on PATH."""
    import shutil

    beside = Path(sys.executable).parent / "uv"
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("uv")


def choose_resolver(resolver: str | None) -> tuple[str, str | None]:
    """("uv", path) or ("pip", None): COWFS_RESOLVER=uv|pip forces one, else uv if found."""
    wanted = resolver or os.environ.get("COWFS_RESOLVER") or "auto"
    if wanted not in ("auto", "uv", "pip"):
        raise CowfsError(f"COWFS_RESOLVER must be uv, pip or auto, not {wanted!r}")
    if wanted == "pip":
        return "pip", None
    uv = find_uv()
    if uv is None and wanted == "uv":
        raise CowfsError("COWFS_RESOLVER=uv but no uv was found (next to "
                         f"{sys.executable} or on PATH)")
    return ("uv", uv) if uv else ("pip", None)


def _uv_error(stderr: str, returncode: int) -> str:
    """uv's explanation as one line, worded like `_pip_error`'s for the common cases."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    parts: list[str] = []
    for ln in lines:
        if ln.startswith(("warning:", "hint:", "help:")):
            break
        text = ln.lstrip("\u00d7\u2570\u2500\u25b6\u2502 ")  # uv's tree of causes
        text = text.removeprefix("error:").removeprefix("Caused by:").strip()
        if text:
            parts.append(text)
    message = re.sub(r" in `[^`]*requirements\.in`", "", " ".join(parts).rstrip(":"))
    why = message[message.find("Because "):] if "Because " in message else message
    if m := re.search(r"Because (\S+?)(?:==\S+)? has no usable wheels", why):
        return (f"no version of '{m[1]}' satisfies the requirements: only source "
                "distributions, which cowfs does not build")
    if m := re.fullmatch(r"Because (\S+) was not found in the (.+?) and you require \1, .*",
                         why):
        return f"no version of '{m[1]}' satisfies the requirements: not found in the {m[2]}"
    if m := re.fullmatch(r"Because (?:only )?(\S+?)([<>=!~]\S*)? (?:is|are) available and "
                         r"you require (\1\S*), .*", why):
        return f"no version of '{m[1]}' satisfies '{m[3]}' (uv: {why.split(', ')[0]})"
    if why.endswith("your requirements are unsatisfiable."):
        return f"conflicting requirements: {why}"
    if message.startswith("Couldn't parse requirement"):
        return f"Invalid requirement: {message}"
    return message or f"uv failed with exit status {returncode}"


def _run(cmd: list[str], env: dict[str, str], timeout: float | None, what: str,
         on_log: Callable[[str], None] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a resolver in its own session, so that a timeout kills it with its children.
    on_log: gets each line of the resolver's log as it comes; stderr is the rest."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE if on_log is None else subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    kept: list[str] = []
    reader = None
    if on_log is not None:
        assert proc.stderr is not None
        reader = threading.Thread(target=_split_log, args=(proc.stderr, on_log, kept),
                                  name="cowfs-resolver-log", daemon=True)
        reader.start()
    try:
        if reader is None:
            stdout, stderr = proc.communicate(timeout=timeout)
        else:
            proc.wait(timeout=timeout)
            reader.join()
            stdout, stderr = "", "".join(kept)
    except BaseException as exc:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if reader is None:
            proc.communicate()
        else:
            proc.wait()
            reader.join()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise CowfsError(f"{what} did not finish resolving within {timeout:g} s") from None
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _split_log(stream: IO[str], on_log: Callable[[str], None], kept: list[str]) -> None:
    with stream:
        for line in stream:
            if not _LOG_LINE.match(line):
                kept.append(line)
                continue
            try:
                on_log(line.rstrip("\n"))
            except Exception:  # following the log is a speculation: it never fails a resolve
                pass


def _absolute_paths(requirements: Sequence[str]) -> list[str]:
    """Local wheel paths made absolute: uv reads them from a file in another directory."""
    out = []
    for req in requirements:
        path = local_path(req) if "://" in req or req.endswith(".whl") else None
        out.append(str(path.absolute()) if path is not None and path.exists() else req)
    return out


def _lock_command(kind: str, uv: str | None, python: Path, out: Path, tmp: Path,
                  requirements: Sequence[str], files: Sequence[Path],
                  constraints: Sequence[Path], config: IndexConfig,
                  offline: bool) -> tuple[list[str], dict[str, str]]:
    """The command that writes a pylock.toml of the resolution to `out`, and its env."""
    if kind == "uv":
        assert uv is not None
        source = tmp / "requirements.in"
        source.write_text("".join(f"{r}\n" for r in _absolute_paths(requirements)))
        cmd = [uv, "pip", "compile", "--python", str(python), "--only-binary", ":all:",
               "--format", "pylock.toml", "-o", str(out), "--quiet", "--no-header",
               *config.uv_args(), *(["--offline"] if offline else [])]
        for constraint in constraints:
            cmd += ["-c", str(constraint)]
        cmd += [str(source), *map(str, files)]
        return cmd, config.uv_env(os.environ)
    options = list(config.pip_extra_args)
    if config.no_index:
        options.append("--no-index")
    elif config.index_url:
        options += ["--index-url", config.index_url]
    for link in config.find_links:
        options += ["--find-links", link]
    for path in files:
        options += ["-r", str(path)]
    for constraint in constraints:
        options += ["-c", str(constraint)]
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "lock", "--only-binary",
           ":all:", "-o", str(out), "--quiet", *options, "--", *requirements]
    return cmd, _pip_env()


def _pip_env() -> dict[str, str]:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
               PIP_REQUIRE_VIRTUALENV="0")
    env.pop("_PIP_RUNNING_IN_SUBPROCESS", None)  # set, it would make pip ignore --python
    return env


_INLINE_ARCHIVE = re.compile(r'^archive = (\{.*\.whl".*\})$', re.M)  # uv's form
_ARCHIVE_TABLE = re.compile(r'^\[packages\.archive(\.hashes)?\]$', re.M)  # pip's form


def _archives_as_wheels(text: str) -> str:
    """A direct wheel requirement is locked as an `archive` (PEP 751 allows a wheel there);
    listed as the package's one wheel, read_lock picks and checks it like any other."""
    text = _INLINE_ARCHIVE.sub(r"wheels = [\1]", text)
    if ".whl" in text:
        text = _ARCHIVE_TABLE.sub(lambda m: "[packages.wheels.hashes]" if m[1]
                                  else "[[packages.wheels]]", text)
    return text


def _requested(requirements: Sequence[str], files: Sequence[Path]) -> dict[str, bool]:
    """Canonical names the user asked for -> whether as a direct wheel URL or path."""
    from packaging.requirements import InvalidRequirement, Requirement

    names: dict[str, bool] = {}
    for req in requirements:
        try:
            parsed = Requirement(req)
            names[canonicalize_name(parsed.name)] = parsed.url is not None
        except InvalidRequirement:
            try:  # a wheel path or URL on its own
                names[parse_wheel_filename(_filename_of(req))[0]] = True
            except (InvalidWheelFilename, CowfsError):
                pass
    if files:
        from installer.resolve.locks import _env, _read_requirement_file

        for path in files:
            try:
                for line in _read_requirement_file(path, _env(None)):
                    names[canonicalize_name(line.req.name)] = line.req.url is not None
            except CowfsError:
                pass  # the resolver has read it: only the REQUESTED marks are at stake
    return names


def resolve(
    requirements: Sequence[str],
    *,
    python: Path,
    requirement_files: Sequence[Path] = (),
    find_links: Sequence[str] = (),
    no_index: bool = False,
    offline: bool = False,
    index_url: str | None = None,
    extra_index_urls: Sequence[str] = (),
    constraints: Sequence[Path] = (),
    timeout: float | None = PIP_TIMEOUT,
    quiet: bool = False,
    resolver: str | None = None,
    supported_tags: Sequence[str] | None = None,
    markers: Mapping[str, str] | None = None,
    log: ResolverLog | None = None,
) -> list[Pin]:
    """Every wheel an install of `requirements` into `python` needs.

    uv resolves when it is installed (`uv pip compile`), else pip (`pip lock`); both write a
    PEP 751 pylock.toml for the target interpreter, which `installer.resolve.locks.read_lock` turns
    into pins (one parser for both). Indexes, find-links and credentials come from the
    arguments and the environment (installer.resolve.index_config). offline: no network at all, so
    every wheel must come from a local find-links directory. constraints are `-c` files.
    quiet: do not forward the resolver's warnings. Errors are one-line CowfsErrors.
    supported_tags/markers: the target's, to pick a wheel of the lock (default: queried).
    log: follows uv's log while it resolves, if it wants to (never pip's, nor offline).
    """
    if not requirements and not requirement_files:
        return []
    if offline:
        if not find_links:
            raise CowfsError("--offline needs a local wheel directory: pass --find-links DIR")
        for link in find_links:
            path = local_path(str(link))
            if path is None:
                raise CowfsError(f"--offline cannot use remote find-links {link}")
            if not path.exists():
                raise CowfsError(f"find-links location {path} does not exist")
        no_index = True
    python = Path(python)
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise CowfsError(f"interpreter {python} does not exist or is not executable")
    config = effective(index_url=index_url, extra_index_urls=extra_index_urls,
                       find_links=[str(link) for link in find_links], no_index=no_index)
    kind, uv = choose_resolver(resolver)
    import tempfile  # the resolver runs only on the cold path

    with tempfile.TemporaryDirectory(prefix="cowfs-resolve-") as tmp:
        out = Path(tmp, "pylock.toml")
        cmd, env = _lock_command(kind, uv, python, out, Path(tmp), requirements,
                                 requirement_files, constraints, config, offline)
        follow = log is not None and kind == "uv" and not offline and log.begin(config)
        on_log = log.line if follow and log is not None else None
        if on_log is not None:
            env["RUST_LOG"] = UV_LOG
        proc = _run(cmd, env, timeout, kind, on_log)
        if proc.returncode != 0:
            error = _uv_error if kind == "uv" else _pip_error
            raise CowfsError(error(proc.stderr, proc.returncode))
        if not quiet:
            for line in proc.stderr.splitlines():
                if line.startswith(("WARNING:", "warning:")) and "experimental" not in line:
                    print(f"cowfs: {kind}: {line}", file=sys.stderr)
        if supported_tags is None or markers is None:
            from installer.interpreters import query_interpreter

            info = query_interpreter(str(python))
            supported_tags, markers = info.tags, info.markers
        from installer.resolve.locks import read_lock

        out.write_text(_archives_as_wheels(out.read_text(encoding="utf-8")), encoding="utf-8")
        try:
            pins = read_lock(out, markers=dict(markers), supported_tags=supported_tags)
        except CowfsError as exc:
            raise CowfsError(f"{kind}'s resolution: {exc}".replace(str(out), "lock")) from None
    requested = _requested(requirements, requirement_files)
    sources = config.urls()
    return [_finish(p, requested, sources) for p in pins]


def _finish(pin: Pin, requested: Mapping[str, bool], sources: Sequence[str]) -> Pin:
    """A resolved pin with its REQUESTED mark, PEP 610 data and the index's credentials."""
    from dataclasses import replace

    direct = None
    if requested.get(pin.name):
        archive = {"hashes": {"sha256": pin.sha256}} if pin.sha256 else {}
        direct = {"url": pin.url, "archive_info": archive}
    return replace(pin, requested=pin.name in requested, direct_url=direct,
                   url=with_credentials(pin.url, sources))


# read_lock, locate and pins_from_local_wheels live in installer.resolve.locks, which builds on this
# module; they are importable from here too, lazily, to avoid a circular import.
_LOCKS_API = frozenset({"read_lock", "locate", "pins_from_local_wheels", "wheel_metadata"})


def __getattr__(name: str) -> Any:
    if name in _LOCKS_API:
        from installer.resolve import locks

        return getattr(locks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
