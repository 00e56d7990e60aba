"""Reading uv's lock file (`uv.lock`, version 1) for one interpreter, the way `uv sync` does.

uv.lock is universal: every package for every platform, the project's own dependency
graph with markers on its edges. The pins for a venv are what the workspace members (the
packages whose source is the project directory, editable or virtual) reach through their
dependencies, the dependency groups uv installs by default ("dev") included, each edge's
marker evaluated for the venv's interpreter, extras followed where an edge asks for them.
Each package gets the wheel that fits the interpreter best. The members themselves are not
wheels: `editables` names those uv installs in editable mode (cowfs has uv do that).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.markers import InvalidMarker, Marker
from packaging.utils import canonicalize_name, parse_wheel_filename

from cowfs.errors import CowfsError
from installer.resolve.locks import _evaluate, _rank, _tag_rank, load_toml_lock
from installer.resolve.resolve import Pin, _check_wheel_name, _filename_of

DEFAULT_GROUPS = ("dev",)  # what `uv sync` installs unless told otherwise


@dataclass
class UvLock:
    pins: list[Pin] = field(default_factory=list)
    editables: dict[str, Path] = field(default_factory=dict)  # member name -> project dir


def read_uv_lock(path: Path, markers: Mapping[str, Any],
                 supported_tags: Sequence[str] | None) -> UvLock:
    doc = load_toml_lock(path)
    if doc.get("version") != 1:
        raise CowfsError(f"{path}: unsupported uv.lock version {doc.get('version')!r} "
                         "(cowfs reads version 1)")
    packages = doc.get("package", [])
    if not isinstance(packages, list) or not all(isinstance(p, dict) for p in packages):
        raise CowfsError(f"{path}: 'package' is not a list of tables")
    return _Walk(path, packages, dict(markers), _tag_rank(supported_tags)).run()


def _source_dir(pkg: Mapping[str, Any]) -> str | None:
    source = pkg.get("source")
    if isinstance(source, dict):
        for kind in ("editable", "virtual"):
            if isinstance(source.get(kind), str):
                return str(source[kind])
    return None


class _Walk:
    def __init__(self, path: Path, packages: list[dict[str, Any]], env: dict[str, Any],
                 rank: Mapping[str, int]) -> None:
        self.path, self.env, self.rank = path, env, rank
        self.by_name: dict[str, list[dict[str, Any]]] = {}
        for pkg in packages:
            name = pkg.get("name")
            if not isinstance(name, str):
                raise self.bad("a package has no name")
            self.by_name.setdefault(str(canonicalize_name(name)), []).append(pkg)

    def bad(self, msg: str) -> CowfsError:
        return CowfsError(f"{self.path}: {msg}")

    def run(self) -> UvLock:
        out = UvLock()
        members = [p for ps in self.by_name.values() for p in ps if _source_dir(p) == "."]
        if not members:
            raise self.bad("no package has the project itself as its source "
                           "(source = { editable = \".\" } or { virtual = \".\" })")
        todo: list[tuple[dict[str, Any], frozenset[str]]] = []
        for m in members:
            name = str(canonicalize_name(m["name"]))
            if "editable" in m.get("source", {}):
                where = self.path.parent.absolute() / m["source"]["editable"]
                out.editables[name] = Path(os.path.normpath(where))
            todo.append((m, frozenset()))
            for group in DEFAULT_GROUPS:
                todo += self._edges(m.get("dev-dependencies", {}).get(group, []))
        seen: set[tuple[int, frozenset[str]]] = set()
        chosen: dict[str, dict[str, Any]] = {}
        while todo:
            pkg, extras = todo.pop()
            if (id(pkg), extras) in seen:
                continue
            seen.add((id(pkg), extras))
            name = str(canonicalize_name(pkg["name"]))
            if name in chosen and chosen[name] is not pkg:
                raise self.bad(f"two versions of '{name}' apply to this interpreter")
            chosen[name] = pkg
            todo += self._edges(pkg.get("dependencies", []))
            for extra in extras:
                todo += self._edges(pkg.get("optional-dependencies", {}).get(extra, []))
        for name, pkg in sorted(chosen.items()):
            if _source_dir(pkg) is None:
                out.pins.append(self._pin(name, pkg))
        return out

    def _edges(self, deps: Any) -> list[tuple[dict[str, Any], frozenset[str]]]:
        if not isinstance(deps, list):
            raise self.bad("a dependency list is not a list")
        out = []
        for dep in deps:
            if not isinstance(dep, dict) or not isinstance(dep.get("name"), str):
                raise self.bad(f"bad dependency entry {dep!r}")
            marker = dep.get("marker")
            try:
                if marker and not _evaluate(Marker(marker), self.env, lock_file=True):
                    continue
            except InvalidMarker as exc:
                raise self.bad(f"invalid marker {marker!r}: {exc}") from None
            out.append((self._target(dep), frozenset(dep.get("extra", ()))))
        return out

    def _target(self, dep: Mapping[str, Any]) -> dict[str, Any]:
        name = str(canonicalize_name(dep["name"]))
        candidates = self.by_name.get(name, [])
        if "version" in dep:  # a fork: several versions of it are locked
            candidates = [p for p in candidates if p.get("version") == dep["version"]]
        if len(candidates) != 1:
            raise self.bad(f"dependency '{name}' names {len(candidates)} locked packages")
        return candidates[0]

    def _pin(self, name: str, pkg: Mapping[str, Any]) -> Pin:
        version = str(pkg.get("version", ""))
        wheels = pkg.get("wheels") or []
        best: tuple[int, str, str, str | None] | None = None
        for wheel in wheels:
            if not isinstance(wheel, dict):
                raise self.bad(f"package '{name}': a wheel entry is not a table")
            url = wheel.get("url")
            if isinstance(wheel.get("path"), str):
                url = (self.path.parent / wheel["path"]).absolute().as_uri()
            if not isinstance(url, str):
                raise self.bad(f"package '{name}': a wheel has neither url nor path")
            filename = wheel.get("filename") or _filename_of(url)
            tags = _check_wheel_name(filename, name, version or None, f"{self.path}: {name}")
            hash_ = wheel.get("hash")
            sha256 = hash_.partition(":")[2] if isinstance(hash_, str) and \
                hash_.startswith("sha256:") else None
            r = _rank(tags, self.rank)
            if r is not None and (best is None or r < best[0]):
                best = (r, url, filename, sha256)
        if best is None:
            what = "no wheel (only a source distribution)" if not wheels else \
                f"none of its {len(wheels)} wheels fits this interpreter"
            raise self.bad(f"package '{name}' {version}: {what}; cowfs installs wheels only")
        _, url, filename, sha256 = best
        return Pin(name=name, version=version or str(parse_wheel_filename(filename)[1]),
                   url=url, filename=filename, sha256=sha256, requested=True,
                   hashes=(sha256,) if sha256 else ())


def find_uv() -> str | None:
    """uv next to this interpreter (the same environment as cowfs), else on PATH."""
    import shutil

    beside = Path(sys.executable).with_name("uv")
    return str(beside) if beside.is_file() else shutil.which("uv")


def editable_installed(site: Path, name: str, project: Path) -> bool:
    """An editable install of project (PEP 610 direct_url.json) is in site already."""
    import json

    for info in site.glob("*.dist-info"):
        if canonicalize_name(info.name.partition("-")[0]) != name:  # {name}-{version}.dist-info
            continue
        try:
            doc = json.loads((info / "direct_url.json").read_text())
        except (OSError, ValueError):
            return False
        return bool(doc.get("dir_info", {}).get("editable")) and \
            doc.get("url") == project.as_uri()
    return False


def install_editable(python: Path, project: Path, index_args: Sequence[str]) -> None:
    """The project itself, editable, as `uv sync` installs it: by uv (it builds the
    editable with the project's build backend), into the mounted venv, where it is then
    absorbed like anything else uv writes there."""
    import subprocess

    uv = find_uv()
    if uv is None:
        raise CowfsError(f"installing the project {project} itself (editable) needs uv: "
                         "pip install uv")
    proc = subprocess.run([uv, "pip", "install", "-q", "--no-deps", "--python", str(python),
                           "-e", str(project), *index_args], capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise CowfsError(f"installing the project {project} (editable) failed: {detail}")
