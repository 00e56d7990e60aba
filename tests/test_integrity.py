"""fsx-style data integrity: seeded random read/write/truncate/mmap sequences on one file,
checked against an in-memory model after every operation, then after a remount.

The file starts in the lower layer (copied up by the first write; with kernel opens a
read-only descriptor opened before that must follow the copy-up; with passthrough, where a
writer of a lower file open read-only is refused (tests/test_passthrough.py), it is opened
after the first write's open) or in the upper layer (created through the mount), on both
kinds of mount. Every check reads the whole file three ways: the read-only descriptor, the
writable one (fstat size) and the path (stat size). A failure names the seed and the last operations
so that the sequence can be replayed.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import fingerprint

from cowfs.mount import control, mount as mounting

MAXLEN = 256 * 1024
MAXIO = 32 * 1024
OPS = 300
WEIGHTS = {"read": 12, "write": 14, "append": 3, "truncate": 4, "ftruncate": 4, "mapread": 5,
           "mapwrite": 6, "fsync": 2, "reopen": 2, "reopen_trunc": 1, "second_fd_write": 4}


class Fsx:
    def __init__(self, path: Path, model: bytes, seed: int, ro_first: bool = True) -> None:
        self.path = path
        self.model = bytearray(model)
        self.rng = random.Random(seed)
        self.seed = seed
        self.rw: int | None = None  # opened by the first mutating operation
        if not ro_first:
            self.writable()  # copies a lower file up
        self.ro = os.open(path, os.O_RDONLY)  # else opened before any copy-up
        self.log: list[str] = []
        self.counts: dict[str, int] = dict.fromkeys(WEIGHTS, 0)

    def close(self) -> None:
        for fd in (self.ro, self.rw):
            if fd is not None:
                os.close(fd)
        self.rw = None

    def writable(self) -> int:
        if self.rw is None:
            self.rw = os.open(self.path, os.O_RDWR)
        return self.rw

    def data(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def put(self, off: int, data: bytes) -> None:
        if off > len(self.model):
            self.model.extend(bytes(off - len(self.model)))
        self.model[off:off + len(data)] = data

    def resize(self, n: int) -> None:
        if n < len(self.model):
            del self.model[n:]
        else:
            self.model.extend(bytes(n - len(self.model)))

    def step(self) -> None:
        op = self.rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
        size = len(self.model)
        rng = self.rng
        if op == "read":
            off, n = rng.randrange(0, size + 4096), rng.randrange(1, MAXIO)
            got = os.pread(self.ro if rng.random() < 0.5 else self.writable(), n, off)
            self.log.append(f"read {off}+{n}")
            assert got == bytes(self.model[off:off + n]), "short or wrong read"
        elif op in ("write", "second_fd_write"):
            off, data = rng.randrange(0, MAXLEN - MAXIO), self.data(rng.randrange(1, MAXIO))
            self.log.append(f"{op} {off}+{len(data)}")
            if op == "write":
                assert os.pwrite(self.writable(), data, off) == len(data)
            else:
                fd = os.open(self.path, os.O_WRONLY)
                try:
                    assert os.pwrite(fd, data, off) == len(data)
                finally:
                    os.close(fd)
            self.put(off, data)
        elif op == "append":
            data = self.data(rng.randrange(1, 4096))
            self.log.append(f"append {len(data)}")
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            self.put(size, data)
        elif op in ("truncate", "ftruncate"):
            n = rng.randrange(0, MAXLEN)
            self.log.append(f"{op} {n}")
            os.truncate(self.path, n) if op == "truncate" else os.ftruncate(self.writable(), n)
            self.resize(n)
        elif op == "mapread" and size:
            off = rng.randrange(0, size)
            n = rng.randrange(1, size - off + 1)
            self.log.append(f"mapread {off}+{n}")
            with mmap.mmap(self.ro, size, prot=mmap.PROT_READ) as m:
                assert m[off:off + n] == bytes(self.model[off:off + n]), "mmap read differs"
        elif op == "mapwrite" and size:
            off = rng.randrange(0, size)
            data = self.data(rng.randrange(1, min(MAXIO, size - off) + 1))
            self.log.append(f"mapwrite {off}+{len(data)}")
            with mmap.mmap(self.writable(), size, flags=mmap.MAP_SHARED,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE) as m:
                m[off:off + len(data)] = data
                m.flush()
            self.put(off, data)
        elif op == "fsync":
            self.log.append("fsync")
            os.fsync(self.writable())
        elif op in ("reopen", "reopen_trunc"):
            self.log.append(op)
            if self.rw is not None:
                os.close(self.rw)
            trunc = os.O_TRUNC if op == "reopen_trunc" else 0
            self.rw = os.open(self.path, os.O_RDWR | trunc)
            if trunc:
                self.resize(0)
        else:
            return  # a map operation on an empty file: nothing to do
        self.counts[op] += 1
        self.check()

    def check(self) -> None:
        want = bytes(self.model)
        assert os.stat(self.path).st_size == len(want), "stat size differs"
        if self.rw is not None:
            assert os.fstat(self.rw).st_size == len(want), "fstat size differs"
        got = os.pread(self.ro, len(want) + 1, 0)
        assert got == want, first_difference(got, want)

    def where(self) -> str:
        return f"seed {self.seed}, op {len(self.log)}: ... " + "; ".join(self.log[-8:])


def first_difference(got: bytes, want: bytes) -> str:
    n = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
             min(len(got), len(want)))
    return f"content differs at byte {n} (got {len(got)} bytes, model {len(want)})"


def run(fsx: Fsx, ops: int) -> None:
    try:
        fsx.check()
        for _ in range(ops):
            fsx.step()
    except (AssertionError, OSError) as exc:
        raise AssertionError(f"{exc} [{fsx.where()}]") from exc


@pytest.mark.parametrize(("start", "seed", "opens"), [
    ("lower", 1, "kernel"), ("lower", 2, "passthrough"), ("upper", 3, "passthrough"),
    ("upper", 4, "kernel")])
def test_fsx_random_io_against_a_model(tmp_path: Path, overlay_mount: Any, start: str,
                                       seed: int, opens: str,
                                       monkeypatch: pytest.MonkeyPatch,
                                       passthrough_refused: str | None) -> None:
    if opens == "passthrough" and passthrough_refused is not None:
        pytest.skip(f"passthrough falls back here: {passthrough_refused}")
    monkeypatch.setenv("COWFS_PASSTHROUGH", "0" if opens == "kernel" else "1")
    lower = tmp_path / "lower"
    lower.mkdir()
    initial = random.Random(seed * 7919).randbytes(100_000 + seed * 4097)
    (lower / "pkg").mkdir()
    if start == "lower":
        (lower / "pkg" / "file.bin").write_bytes(initial)
    before = fingerprint(lower)
    m = overlay_mount(lower)
    path = m.mnt / "pkg" / "file.bin"
    if start == "upper":
        path.write_bytes(initial)
    fsx = Fsx(path, initial, seed, ro_first=opens == "kernel")
    try:
        run(fsx, OPS)
        assert control.request(m.spec.socket, "status")["opens"] == opens
    finally:
        fsx.close()
    want = bytes(fsx.model)
    print(f"\nfsx seed {seed} ({start}): {sum(fsx.counts.values())} ops {fsx.counts}, "
          f"final size {len(want)}")
    assert sum(fsx.counts.values()) >= OPS * 0.9
    assert (m.upper / "pkg" / "file.bin").read_bytes() == want, "upper file != model"
    mounting.umount(str(m.mnt))
    mounting.mount(m.spec)
    assert path.read_bytes() == want, "content changed across the remount"
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(want).digest()
    # A second round on the remounted (now upper) file, then once more across a remount.
    fsx2 = Fsx(path, want, seed + 100)
    try:
        run(fsx2, OPS // 3)
    finally:
        fsx2.close()
    mounting.umount(str(m.mnt))
    mounting.mount(m.spec)
    assert path.read_bytes() == bytes(fsx2.model)
    assert fingerprint(lower) == before, "the lower layer was modified"
    assert os.listdir(m.work) == []
