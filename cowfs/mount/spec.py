"""What a mount is made of (MountSpec), where mounts are registered, and a venv's state file.

A venv's overlay is described by `VENV/.cowfs/state.json` (written by the installer): the
store, the distributions installed, venv-local extra files, the site-packages mount point.
It lives in the venv so the automount hook can remount after a reboot. Live mounts are
registered in a runtime directory (gone after a reboot, like the mounts themselves) that
also holds the control sockets, whose paths must stay short (108-byte sun_path limit).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cowfs.errors import CowfsError
from cowfs.store.manifest import FileEntry, _rows

STATE_DIR = ".cowfs"
# The automount hook in the venv's real site-packages, underneath the mount point
# (written by installer.venv.automount; removed by the daemon when the venv is deleted).
HOOK_PTH = "_cowfs_automount.pth"
HOOK_MODULE = "_cowfs_automount.py"
STATE_FORMAT = 1


def runtime_dir() -> Path:
    if base := os.environ.get("COWFS_RUNTIME_DIR"):
        d = Path(base)
    elif os.geteuid() == 0:
        d = Path("/run/cowfs")
    elif xdg := os.environ.get("XDG_RUNTIME_DIR"):
        d = Path(xdg) / "cowfs"
    else:
        d = Path(f"/tmp/cowfs-{os.geteuid()}")
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def new_venv_id() -> str:
    return uuid.uuid4().hex


def legacy_id(venv: Path) -> str:
    return hashlib.sha256(os.fsencode(venv.absolute())).hexdigest()[:24]


def _venv_id(value: object) -> str:
    if not isinstance(value, str) or (value and not value.isalnum()):
        raise ValueError(f"bad venv id {value!r}")  # it names a file in the store
    return value


def mount_key(mountpoint: str) -> str:
    return hashlib.sha256(os.fsencode(os.path.abspath(mountpoint))).hexdigest()[:20]


@dataclass
class MountSpec:
    mountpoint: str
    upper: str
    work: str
    log: str
    lowerdirs: list[str] = field(default_factory=list)  # generic overlay mode
    venv: str | None = None  # store mode: the lower comes from this venv's state
    allow_other: bool = False

    @property
    def key(self) -> str:
        return mount_key(self.mountpoint)

    @property
    def socket(self) -> Path:
        return runtime_dir() / f"{self.key}.sock"

    @property
    def registry_file(self) -> Path:
        return runtime_dir() / f"{self.key}.json"

    def save(self) -> Path:
        path = self.registry_file
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> MountSpec:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, RecursionError) as exc:
            raise CowfsError(f"unreadable mount description {path}: {exc}") from None

    @classmethod
    def for_mountpoint(cls, mountpoint: str) -> MountSpec | None:
        path = runtime_dir() / f"{mount_key(mountpoint)}.json"
        return cls.load(path) if path.exists() else None


@dataclass
class VenvState:
    """The installer's record of a cowfs venv (VENV/.cowfs/state.json)."""

    venv: Path
    site_packages: Path
    store: Path
    python: str = ""
    cowfs_exe: str = ""
    dists: list[str] = field(default_factory=list)  # distribution ids in install order
    bytecode: list[str] = field(default_factory=list)  # shared-pyc manifests for these dists
    extra: list[FileEntry] = field(default_factory=list)  # venv-local files (REQUESTED...)
    requested: list[str] = field(default_factory=list)  # names the user asked for
    scripts: dict[str, list[str]] = field(default_factory=dict)  # dist id -> files in venv
    # Names the venv's gc root; random, since a path is not unique across containers.
    # States from before ids had roots keyed by a hash of the path: that key is kept.
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = legacy_id(self.venv)

    @staticmethod
    def state_dir(venv: Path) -> Path:
        return venv / STATE_DIR

    @classmethod
    def path_for(cls, venv: Path) -> Path:
        return cls.state_dir(venv) / "state.json"

    def may_hold_foreign_dists(self) -> bool:
        """One listing: another installer (pip, uv) leaves a dist-info entry (a directory,
        or the whiteout of one it removed) at the top of the upper layer; cowfs never does.
        Then installer.venv.absorb has work to do."""
        try:
            return any(".dist-info" in n for n in os.listdir(self.upper))
        except FileNotFoundError:
            return False

    @property
    def upper(self) -> Path:
        return self.state_dir(self.venv) / "upper"

    @property
    def work(self) -> Path:
        return self.state_dir(self.venv) / "work"

    @property
    def log(self) -> Path:
        return self.state_dir(self.venv) / "daemon.log"

    def mount_spec(self) -> MountSpec:
        return MountSpec(mountpoint=str(self.site_packages), upper=str(self.upper),
                         work=str(self.work), log=str(self.log), venv=str(self.venv))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "id": self.id,
            "venv": str(self.venv),
            "site_packages": str(self.site_packages),
            "store": str(self.store),
            "python": self.python,
            "cowfs_exe": self.cowfs_exe,
            "dists": self.dists,
            "bytecode": self.bytecode,
            "extra": [[e.path, e.digest, e.size, e.mode] for e in self.extra],
            "requested": self.requested,
            "scripts": self.scripts,
        }

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), indent=1).encode()

    def check_location(self, here: Path) -> None:
        """A venv directory moved elsewhere keeps a state naming its old place (mount point,
        private layer): say so, instead of serving or reporting the old location."""
        if os.path.realpath(self.venv) != os.path.realpath(here):
            raise CowfsError(
                f"{here} was made as a cowfs venv at {self.venv} and then moved; cowfs venvs "
                f"record their location: move it back, or make a new one here (rm -rf "
                f"{here} && cowfs venv {here})")


    def save(self) -> None:
        path = self.path_for(self.venv)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(self.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, venv: Path) -> VenvState:
        path = cls.path_for(venv)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise CowfsError(f"{venv} is not a cowfs venv (no {path})") from None
        except (OSError, ValueError, RecursionError) as exc:
            raise CowfsError(f"unreadable venv state {path}: {exc}") from None
        try:
            if not isinstance(doc, dict):
                raise TypeError("not a JSON object")
            if doc.get("format") != STATE_FORMAT:
                raise ValueError(f"unsupported format {doc.get('format')!r}")
            return cls(
                venv=Path(doc["venv"]), site_packages=Path(doc["site_packages"]),
                store=Path(doc["store"]), python=str(doc.get("python", "")),
                cowfs_exe=str(doc.get("cowfs_exe", "")), dists=list(doc.get("dists", [])),
                bytecode=list(doc.get("bytecode", [])),
                extra=list(_rows(doc.get("extra", []))),
                requested=list(doc.get("requested", [])),
                scripts=dict(doc.get("scripts", {})),
                id=_venv_id(doc.get("id", "")),
            )
        except (KeyError, TypeError, ValueError, CowfsError) as exc:
            raise CowfsError(f"corrupt venv state {path}: {exc}") from None
