"""Synthetic wheels for tests: correct by default, easy to break one thing at a time."""

from __future__ import annotations

import base64
import hashlib
import stat
import zipfile
from pathlib import Path

DATE = (2021, 3, 4, 5, 6, 8)  # even seconds: zip (DOS) time has 2 s steps
Member = tuple[zipfile.ZipInfo, bytes]


def zinfo(name: str, mode: int = 0o644, kind: int = stat.S_IFREG) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, DATE)
    info.external_attr = (kind | mode) << 16
    info.compress_type = zipfile.ZIP_STORED  # plain bytes, so tests can patch them in place
    return info


def record_row(name: str, data: bytes, algo: str = "sha256") -> str:
    digest = base64.urlsafe_b64encode(hashlib.new(algo, data).digest()).rstrip(b"=").decode()
    return f"{name},{algo}={digest},{len(data)}"


def members(
    files: dict[str, bytes | tuple[bytes, int]] | None = None,
    *,
    name: str = "demo",
    version: str = "1.0",
    purelib: bool = True,
    wheel_version: str = "1.0",
    meta_name: str | None = None,
    meta_extra: str = "Requires-Dist: attrs>=20\nRequires-Python: >=3.8\n",
    entry_points: str | None = None,
    algo: str = "sha256",
) -> list[Member]:
    """Members of a valid wheel, RECORD last and listing everything else."""
    info_dir = f"{name}-{version}.dist-info"
    if files is None:
        files = {"demo/__init__.py": b"VALUE = 1\n"}
    out: list[Member] = []
    for path, content in files.items():
        data, mode = content if isinstance(content, tuple) else (content, 0o644)
        out.append((zinfo(path, mode), data))
    wheel = f"Wheel-Version: {wheel_version}\nRoot-Is-Purelib: {str(purelib).lower()}\n"
    metadata = f"Metadata-Version: 2.1\nName: {meta_name or name}\nVersion: {version}\n"
    out.append((zinfo(f"{info_dir}/WHEEL"), wheel.encode()))
    out.append((zinfo(f"{info_dir}/METADATA"), (metadata + meta_extra).encode()))
    if entry_points is not None:
        out.append((zinfo(f"{info_dir}/entry_points.txt"), entry_points.encode()))
    return with_record(out, info_dir, algo=algo)


def with_record(out: list[Member], info_dir: str, algo: str = "sha256") -> list[Member]:
    rows = [record_row(i.filename, d, algo) for i, d in out]
    record = "\n".join([*dict.fromkeys(rows), f"{info_dir}/RECORD,,"]) + "\n"
    return [*out, (zinfo(f"{info_dir}/RECORD"), record.encode())]


def write(path: Path, content: list[Member]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in content:
            zf.writestr(info, data)
    return path


def build(
    tmp: Path,
    files: dict[str, bytes | tuple[bytes, int]] | None = None,
    *,
    tag: str = "py3-none-any",
    name: str = "demo",
    version: str = "1.0",
    **kw: object,
) -> Path:
    content = members(files, name=name, version=version, **kw)  # type: ignore[arg-type]
    return write(tmp / f"{name}-{version}-{tag}.whl", content)


def bench_workload(tmp: Path, prefix: str, imports_util: bool = False) -> tuple[Path, Path]:
    """Three small wheels PREFIX_a/_b/_c in tmp/wheels and tmp/workload.txt pinning them
    (names spelled three ways, as people write them): a workload for scripts/bench runs."""
    wheels = tmp / "wheels"
    wheels.mkdir()
    for i, name in enumerate(f"{prefix}_{c}" for c in "abc"):
        head = f"from {name} import util\n" if imports_util else ""
        build(wheels, {f"{name}/__init__.py": f"{head}VALUE = {i}\n".encode(),
                       f"{name}/util.py": b"def f(x):\n    return x * 2\n" * 20,
                       f"{name}/data/blob.bin": bytes(range(256)) * 16},
              name=name, version="1.0", meta_extra="")
    workload = tmp / "workload.txt"
    workload.write_text(f"# synthetic\n{prefix}-a==1.0\n{prefix}_b==1.0\n{prefix}-c==1.0\n")
    return wheels, workload
