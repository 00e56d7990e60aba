"""Docker for the container figures and tests: an image with cowfs (and uv) built from the
checkout, keyed by a hash of what goes into it, and containers and volumes that are always
removed again.

The image is small and dedicated (not the project's test image): Debian's fuse3 and the
headers pyfuse3 and the kernel-cache extension build against, cowfs installed from the
working tree into /opt/cowfs (the base's Python may be externally managed), and uv. `cowfs`
and `uv` are on PATH; python3 stays the base interpreter venvs are made from. Containers run
with /dev/fuse and the privileges a FUSE mount needs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("COWFS_DOCKER_BASE", "python:3.11-slim-bookworm")
IMAGE_REPO = "cowfs-e2e"
FUSE_ARGS = ("--device", "/dev/fuse", "--cap-add", "SYS_ADMIN",
             "--security-opt", "apparmor=unconfined")
# What `pip install .` needs from the checkout (the working tree, untracked files too).
SOURCES = ("pyproject.toml", "README.md", "cowfs", "installer")
SKIP_SUFFIXES = (".pyc", ".pyo", ".so")

DOCKERFILE = """\
FROM {base}
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \\
    && apt-get install -y --no-install-recommends fuse3 libfuse3-dev pkg-config gcc \\
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/cowfs \\
    && /opt/cowfs/bin/pip install -q "setuptools>=77" "pyfuse3>=3.3" "trio>=0.22" \\
        "xxhash>=3.0" "packaging>=23.0" "click>=8.0" {uv} \\
    && ln -s /opt/cowfs/bin/uv /usr/local/bin/uv
COPY src /src
RUN /opt/cowfs/bin/pip install -q --no-deps --no-build-isolation /src \\
    && rm -rf /src && ln -s /opt/cowfs/bin/cowfs /usr/local/bin/cowfs \\
    && /opt/cowfs/bin/python -c "import cowfs.fuse._fuse_shim"
"""


class DockerError(RuntimeError):
    pass


def unavailable(timeout: float = 20.0) -> str | None:
    """Why no Docker engine can be used here, or None when one answers."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"`docker info` did not answer within {timeout:.0f} s"
    if proc.returncode != 0 or not proc.stdout.strip():
        err = (proc.stderr.strip().splitlines() or ["no server version"])[-1]
        return f"no Docker engine answers (`docker info`: {err})"
    return None


def docker(*args: str, check: bool = True, timeout: float | None = 600,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-20:]
        raise DockerError(f"`docker {' '.join(args[:3])} ...` failed ({proc.returncode}):\n"
                          + "\n".join(tail))
    return proc


# -- the image ---------------------------------------------------------------------------------


def _source_files() -> list[Path]:
    out: list[Path] = []
    for name in SOURCES:
        top = ROOT / name
        if top.is_file():
            out.append(top)
            continue
        for path in sorted(top.rglob("*")):
            if (path.is_file() and "__pycache__" not in path.parts
                    and not path.name.endswith(SKIP_SUFFIXES)):
                out.append(path)
    return out


def uv_requirement() -> str:
    """uv pinned to the host's version when there is one (same behaviour inside and out)."""
    for uv in (shutil.which("uv"), str(Path(sys.executable).parent / "uv")):
        if uv and Path(uv).exists():
            proc = subprocess.run([uv, "--version"], capture_output=True, text=True)
            parts = proc.stdout.split()
            if proc.returncode == 0 and len(parts) >= 2:
                return f"uv=={parts[1]}"
    return "uv"


def ensure_image(log: Callable[[str], None] | None = None) -> str:
    """The image tag for the checkout as it is now; built unless one with the same content
    hash exists. Older tags of the same repository are removed after a build."""
    dockerfile = DOCKERFILE.format(base=BASE_IMAGE, uv=uv_requirement())
    files = _source_files()
    h = hashlib.sha256(dockerfile.encode())
    for path in files:
        h.update(str(path.relative_to(ROOT)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    tag = f"{IMAGE_REPO}:{h.hexdigest()[:16]}"
    if docker("image", "inspect", tag, check=False, timeout=60).returncode == 0:
        return tag
    if log is not None:
        log(f"building {tag} (from {BASE_IMAGE})")
    with tempfile.TemporaryDirectory(prefix="cowfs-image-") as ctx:
        (Path(ctx) / "Dockerfile").write_text(dockerfile)
        for path in files:
            dest = Path(ctx) / "src" / path.relative_to(ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        docker("build", "-q", "-t", tag, ctx, timeout=1800)
    old = docker("image", "ls", "--format", "{{.Repository}}:{{.Tag}}", IMAGE_REPO,
                 check=False).stdout.split()
    stale = [t for t in old if t != tag]
    if stale:
        docker("image", "rm", *stale, check=False)
    return tag


# -- containers and volumes that never outlive their owner --------------------------------------


@dataclass
class Docker:
    """Every container and volume made through it is removed by close() (also on failure:
    use it as a context manager). Names carry a random run id."""

    image: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    containers: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)

    def __enter__(self) -> Docker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def volume(self, what: str) -> str:
        name = f"cowfs-{what}-{self.run_id}"
        self.volumes.append(name)
        docker("volume", "create", name, timeout=60)
        return name

    def volume_path(self, name: str) -> Path | None:
        """The volume's directory on this machine, when the engine runs here."""
        out = docker("volume", "inspect", "--format", "{{.Mountpoint}}", name).stdout.strip()
        return Path(out) if out and Path(out).is_dir() else None

    def _args(self, name: str, volumes: Sequence[str], env: dict[str, str]) -> list[str]:
        args = ["--name", name, *FUSE_ARGS]
        for v in volumes:
            args += ["-v", v]
        for k, val in env.items():
            args += ["-e", f"{k}={val}"]
        return args

    def start(self, what: str, volumes: Sequence[str] = (), env: dict[str, str] | None = None
              ) -> str:
        """A detached container idling (`sleep infinity` under an init) for docker exec."""
        name = f"cowfs-{what}-{self.run_id}"
        self.containers.append(name)
        docker("run", "-d", "--init", *self._args(name, volumes, env or {}), self.image,
               "sleep", "infinity", timeout=120)
        return name

    def run(self, what: str, cmd: Sequence[str], volumes: Sequence[str] = (),
            env: dict[str, str] | None = None, timeout: float = 1800
            ) -> tuple[subprocess.CompletedProcess[str], float, str]:
        """A new container running cmd to its end (kept until close() or remove(), so its
        writable layer can be measured): (process, wall seconds of `docker run`, name)."""
        name = f"cowfs-{what}-{self.run_id}-{len(self.containers)}"
        self.containers.append(name)
        start = time.perf_counter()
        proc = docker("run", "--init", *self._args(name, volumes, env or {}), self.image,
                      *cmd, check=False, timeout=timeout)
        return proc, time.perf_counter() - start, name

    def exec(self, container: str, cmd: Sequence[str], timeout: float = 600
             ) -> subprocess.CompletedProcess[str]:
        return docker("exec", container, *cmd, check=False, timeout=timeout)

    def layer_bytes(self, container: str) -> int:
        """Size of the container's writable layer (what `docker ps -s` calls size)."""
        out = docker("container", "inspect", "--size", "--format", "{{.SizeRw}}",
                     container).stdout.strip()
        return int(out or 0)

    def remove(self, container: str) -> None:
        docker("rm", "-f", "-v", container, check=False, timeout=120)
        if container in self.containers:
            self.containers.remove(container)

    def close(self) -> None:
        errors = []
        for name in reversed(self.containers):
            proc = docker("rm", "-f", "-v", name, check=False, timeout=120)
            if proc.returncode != 0 and "No such container" not in proc.stderr:
                errors.append(f"container {name}: {proc.stderr.strip()}")
        self.containers.clear()
        for name in reversed(self.volumes):
            proc = docker("volume", "rm", "-f", name, check=False, timeout=120)
            if proc.returncode != 0:
                errors.append(f"volume {name}: {proc.stderr.strip()}")
        self.volumes.clear()
        if errors:
            raise DockerError("cleanup failed: " + "; ".join(errors))
