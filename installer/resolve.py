"""Requirements -> pinned wheels.

Resolution is pip's: `pip --python TARGET install --dry-run --ignore-installed --report`, run by
the host pip against the target interpreter, so markers and wheel tags are the target's and the
target venv needs no pip of its own. This module only builds the command, turns pip's failures
into one line, and parses the JSON report into `Pin`s.

The paths that avoid spawning pip (~0.8 s) live in installer.locks and are importable from
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from packaging.tags import Tag
from packaging.utils import (
    InvalidWheelFilename,
    canonicalize_name,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from cowfs.errors import CowfsError

PIP_TIMEOUT = 900.0  # seconds for one pip run; a resolve against a slow index can take minutes


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
        env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
                   PIP_REQUIRE_VIRTUALENV="0")
        env.pop("_PIP_RUNNING_IN_SUBPROCESS", None)  # set, it would make pip ignore --python
        # pip --python re-runs pip under the target: a session lets a timeout kill both.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except BaseException as exc:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise CowfsError(f"pip did not finish resolving within {timeout:g} s") from None
            raise
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


def resolve(
    requirements: Sequence[str],
    *,
    python: Path,
    requirement_files: Sequence[Path] = (),
    find_links: Sequence[str] = (),
    no_index: bool = False,
    offline: bool = False,
    index_url: str | None = None,
    constraints: Sequence[Path] = (),
    timeout: float | None = PIP_TIMEOUT,
    quiet: bool = False,
) -> list[Pin]:
    """Every wheel an install of `requirements` into `python` needs, as pip resolves it.

    offline: no network at all, so every wheel must come from a local find-links directory
    (the caller passes the store's wheels/ cache there). constraints are `-c` files.
    quiet: do not forward pip's warnings to stderr. Errors are one-line CowfsErrors.
    """
    if not requirements and not requirement_files:
        return []
    options: list[str] = []
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
    if no_index:
        options.append("--no-index")
    elif index_url:
        options += ["--index-url", index_url]
    for link in find_links:
        options += ["--find-links", str(link)]
    for req_file in requirement_files:
        options += ["-r", str(req_file)]
    for constraint in constraints:
        options += ["-c", str(constraint)]
    doc = _run_pip(requirements, Path(python), options, timeout=timeout, quiet=quiet)
    return _pins_from_report(doc)


# read_lock, locate and pins_from_local_wheels live in installer.locks, which builds on this
# module; they are importable from here too, lazily, to avoid a circular import.
_LOCKS_API = frozenset({"read_lock", "locate", "pins_from_local_wheels", "wheel_metadata"})


def __getattr__(name: str) -> Any:
    if name in _LOCKS_API:
        from installer import locks

        return getattr(locks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
