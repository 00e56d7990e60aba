"""Lookups answered by the C reader (cowfs/fuse/fastlookup.py, cowfs/fuse/_fuse_fastlookup.c).

Once the daemon answered a LOOKUP in a lower-only directory, the reader answers the LOOKUPs
and GETATTRs of that directory's files. These tests check that it gives the daemon's own
answers, stops before anything in the directory changes, and that its lookups count when
the kernel forgets a node or a file open in the kernel loses its last name. Each runs on
kernel opens and on passthrough.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from cowfs.mount import control
from tests.conftest import drop_page_cache


def status(spec: Any) -> dict[str, Any]:
    return dict(control.request(spec.socket, "status"))


@pytest.fixture(params=["kernel", "passthrough"])
def mounted(request: pytest.FixtureRequest, tmp_path: Path, overlay_mount: Any,
            monkeypatch: pytest.MonkeyPatch, passthrough_refused: str | None) -> Any:
    if request.param == "passthrough" and passthrough_refused is not None:
        pytest.skip(f"passthrough falls back here: {passthrough_refused}")
    monkeypatch.setenv("COWFS_PASSTHROUGH", "1" if request.param == "passthrough" else "0")
    lower = tmp_path / "lower"
    (lower / "pkg" / "__pycache__").mkdir(parents=True)
    for i in range(6):
        (lower / "pkg" / f"m{i}.py").write_text(f"V = {i}\n")
        (lower / "pkg" / "__pycache__" / f"m{i}.pyc").write_bytes(bytes([i]) * (100 + i))
    os.chmod(lower / "pkg" / "m5.py", 0o600)
    return overlay_mount(lower), lower


def test_the_reader_answers_as_the_daemon_would(mounted: Any) -> None:
    m, lower = mounted
    cache = m.mnt / "pkg" / "__pycache__"
    os.stat(cache / "m0.pyc")  # the daemon's answer: the directory is published
    before = status(m.spec)
    assert before["lookups_published"] >= 6
    for i in range(1, 6):
        mine, theirs = os.stat(cache / f"m{i}.pyc"), os.stat(lower / "pkg" / "__pycache__"
                                                                  / f"m{i}.pyc")
        assert (mine.st_size, mine.st_mode, mine.st_mtime_ns, mine.st_nlink) == \
            (theirs.st_size, theirs.st_mode, theirs.st_mtime_ns, theirs.st_nlink)
        assert (cache / f"m{i}.pyc").read_bytes() == bytes([i]) * (100 + i)
    assert status(m.spec)["lookups_in_c"] - before["lookups_in_c"] == 5
    os.stat(m.mnt / "pkg" / "m0.py")
    assert stat.S_IMODE(os.stat(m.mnt / "pkg" / "m5.py").st_mode) == 0o600


def test_a_change_in_the_directory_stops_it(mounted: Any) -> None:
    m, lower = mounted
    pkg = m.mnt / "pkg"
    os.stat(pkg / "m0.py")
    assert (pkg / "m1.py").read_text() == "V = 1\n"  # looked up (passthrough: opened) in C
    assert (pkg / "m4.py").read_text() == "V = 4\n"
    in_c = status(m.spec)["lookups_in_c"]
    (pkg / "m1.py").write_text("V = 'edited'\n")  # a copy-up in pkg/
    os.chmod(pkg / "m0.py", 0o640)
    os.unlink(pkg / "m2.py")
    os.rename(pkg / "m3.py", pkg / "m4.py")
    assert (pkg / "m1.py").read_text() == "V = 'edited'\n"
    assert stat.S_IMODE(os.stat(pkg / "m0.py").st_mode) == 0o640
    assert not (pkg / "m2.py").exists() and not (pkg / "m3.py").exists()
    assert (pkg / "m4.py").read_text() == "V = 3\n"  # (its old name had an entry)
    assert os.stat(pkg / "m4.py").st_size == 6
    assert stat.S_IMODE(os.stat(pkg / "m5.py").st_mode) == 0o600  # first asked now: daemon
    assert status(m.spec)["lookups_in_c"] == in_c  # nothing answered from before the change
    assert sorted(os.listdir(pkg)) == ["__pycache__", "m0.py", "m1.py", "m4.py", "m5.py"]
    assert (lower / "pkg" / "m2.py").read_text() == "V = 2\n"  # the lower untouched


def test_names_a_published_directory_lacks_are_absent_until_made(mounted: Any) -> None:
    """An import probes `__init__` with three extension suffixes in every package: the reader
    answers those misses too, and a name made later is not hidden by them."""
    m, lower = mounted
    pkg = m.mnt / "pkg"
    os.stat(pkg / "m0.py")  # the daemon's answer: pkg/ (and its __pycache__/) published
    before = status(m.spec)
    probes = [pkg / "__init__.cpython-311-x86_64-linux-gnu.so", pkg / "__init__.abi3.so",
              pkg / "__pycache__" / "m9.cpython-311.pyc", pkg / "__pycache__" / "m9.pyc"]
    for p in probes:
        assert not p.exists()
    after = status(m.spec)
    assert after["negative_lookups_in_c"] - before["negative_lookups_in_c"] == len(probes)
    for p in probes:  # made through the mount: each visible at once, with its content
        p.write_bytes(p.name.encode())
    assert all(p.read_bytes() == p.name.encode() for p in probes)
    listed = set(os.listdir(pkg)) | set(os.listdir(pkg / "__pycache__"))
    assert {p.name for p in probes} <= listed
    assert not (lower / "pkg" / "__init__.abi3.so").exists()


def test_subdirectories_are_answered_with_their_link_counts_until_they_change(
        mounted: Any) -> None:
    m, lower = mounted
    (lower / "pkg" / "sub" / "deeper").mkdir(parents=True)
    (lower / "pkg" / "sub" / "x.py").write_text("x\n")
    pkg = m.mnt / "pkg"
    os.stat(pkg / "m0.py")  # publishes pkg/: its subdirectories with it
    before = status(m.spec)
    for d in ("sub", "__pycache__"):
        mine, theirs = os.stat(pkg / d), os.stat(lower / "pkg" / d)
        assert (mine.st_mode, mine.st_nlink, mine.st_mtime_ns) == \
            (theirs.st_mode, theirs.st_nlink, theirs.st_mtime_ns)
    assert status(m.spec)["lookups_in_c"] - before["lookups_in_c"] == 2
    nlink = os.stat(pkg / "sub").st_nlink
    os.mkdir(pkg / "sub" / "made")  # copies sub/ up: its published entry must go
    assert os.stat(pkg / "sub").st_nlink == nlink + 1
    os.rmdir(pkg / "sub" / "deeper")
    assert os.stat(pkg / "sub").st_nlink == nlink
    assert sorted(os.listdir(pkg / "sub")) == ["made", "x.py"]
    assert (pkg / "sub" / "x.py").read_text() == "x\n"
    assert sorted(os.listdir(lower / "pkg" / "sub")) == ["deeper", "x.py"]


def test_lookups_the_reader_answered_count_when_the_kernel_forgets(mounted: Any) -> None:
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        pytest.skip("the kernel cannot be made to forget here (/proc/sys is read-only)")
    m, _ = mounted
    cache = m.mnt / "pkg" / "__pycache__"
    os.stat(cache / "m0.pyc")
    fd = os.open(cache / "m1.pyc", os.O_RDONLY)  # looked up by the reader
    try:
        os.unlink(cache / "m1.pyc")  # the file's last name: the open must keep it
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")  # dentries and inodes: FORGETs of everything not open
        assert os.pread(fd, 1000, 0) == bytes([1]) * 101
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    for i in (0, 2, 3):  # looked up again after the forget: the same answers
        assert (cache / f"m{i}.pyc").read_bytes() == bytes([i]) * (100 + i)
    assert not (cache / "m1.pyc").exists()
    assert status(m.spec)["lookups_in_c"] >= 1


def test_reads_of_kernel_opens_come_from_the_reader_until_a_copy_up(mounted: Any) -> None:
    m, lower = mounted
    if os.environ.get("COWFS_PASSTHROUGH") == "1":
        pytest.skip("passthrough: the kernel reads store objects itself, no READ requests")
    big = os.urandom(3 << 20)  # several READs, the last one short
    (lower / "pkg" / "big.bin").write_bytes(big)
    pkg = m.mnt / "pkg"
    os.listdir(pkg)  # the daemon's first listing publishes pkg/
    before = status(m.spec)
    assert (pkg / "big.bin").read_bytes() == big
    with open(pkg / "big.bin", "rb") as f:
        f.seek(len(big) - 10)
        assert f.read(100) == big[-10:]
    for i in range(6):
        assert (pkg / f"m{i}.py").read_text() == f"V = {i}\n"
    after = status(m.spec)
    assert after["reads_in_c"] - before["reads_in_c"] >= 7
    assert after["served"]["reads"] == before["served"]["reads"]  # none reached Python

    with open(pkg / "big.bin", "r+b") as f:  # a copy-up: pkg/ stops
        f.write(b"EDIT")
    drop_page_cache([pkg / "big.bin", pkg / "m1.py"])
    in_c = status(m.spec)["reads_in_c"]
    assert (pkg / "big.bin").read_bytes() == b"EDIT" + big[4:]
    assert (pkg / "m1.py").read_text() == "V = 1\n"
    end = status(m.spec)
    assert end["reads_in_c"] == in_c  # the daemon answers what changed, and its neighbours
    assert end["served"]["reads"] > after["served"]["reads"]
    assert (lower / "pkg" / "big.bin").read_bytes() == big  # the lower untouched


def _drop_caches(what: str) -> None:
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        pytest.skip("the kernel cannot be made to drop its caches here (/proc/sys read-only)")
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write(what + "\n")


def _listing(d: Path) -> list[tuple[str, int, int, int, int]]:
    """What a READDIRPLUS gives: names, inode numbers, types, and the attributes it plants."""
    out = []
    for e in sorted(os.scandir(d), key=lambda e: e.name):
        st = e.stat(follow_symlinks=False)
        out.append((e.name, e.inode(), st.st_mode, st.st_size, st.st_nlink))
    return out


def test_listings_come_from_the_reader_until_the_directory_changes(mounted: Any) -> None:
    m, lower = mounted
    (lower / "pkg" / "sub").mkdir()
    (lower / "pkg" / "sub" / "x.py").write_text("x\n")
    many = lower / "many"
    many.mkdir()
    for i in range(300):  # more than one READDIRPLUS reply of a page
        (many / f"{'n' * 60}{i:03d}").write_text(str(i))
    pkg = m.mnt / "pkg"
    first = {d: _listing(m.mnt / d) for d in ("pkg", "many")}  # the daemon's (publishes)
    assert [n for n, *_ in first["pkg"]] == sorted(os.listdir(lower / "pkg"))
    before = status(m.spec)
    _drop_caches("3")  # the kernel's cached listings, dentries and inodes: FORGETs too
    assert {d: _listing(m.mnt / d) for d in ("pkg", "many")} == first
    after = status(m.spec)
    assert after["listings_in_c"] - before["listings_in_c"] >= 4  # each: entries, then end
    assert after["served"]["listings"] == before["served"]["listings"]
    # The entries it planted were counted: a file opened by such an entry (no LOOKUP) keeps
    # its data after its last unlink and the kernel's FORGETs.
    fd = os.open(m.mnt / "many" / f"{'n' * 60}007", os.O_RDONLY)
    try:
        os.unlink(m.mnt / "many" / f"{'n' * 60}007")
        _drop_caches("2")
        assert os.pread(fd, 100, 0) == b"7"
    finally:
        os.close(fd)
    assert (pkg / "sub" / "x.py").read_text() == "x\n"

    (pkg / "new.py").write_text("new\n")  # pkg/ changes: the daemon lists it from now on
    _drop_caches("3")
    names = [n for n, *_ in _listing(pkg)]
    assert "new.py" in names and names == sorted([*os.listdir(lower / "pkg"), "new.py"])
    assert status(m.spec)["served"]["listings"] > after["served"]["listings"]
    assert not (lower / "pkg" / "new.py").exists()


def _cached(path: Path) -> bool:
    """Whether path's first page is in the page cache: mincore(2) of a mapping, which reads
    nothing (a read with RWF_NOWAIT would start the very read-ahead it should detect)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 4096, access=mmap.ACCESS_COPY) as m:
        page = (ctypes.c_char * 4096).from_buffer(m)
        vec = (ctypes.c_ubyte * 1)()
        try:
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(page)), ctypes.c_size_t(4096),
                            vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del page
        return bool(vec[0] & 1)


@pytest.mark.parametrize("opens,readahead", [("kernel", "on"), ("kernel", "off"),
                                             ("passthrough", "on")])
def test_a_first_read_in_a_directory_reads_ahead_what_a_walk_reads_next(
        tmp_path: Path, overlay_mount: Any, monkeypatch: pytest.MonkeyPatch,
        passthrough_refused: str | None, opens: str, readahead: str) -> None:
    """At the first READ in a directory (kernel opens), or its first open in C
    (passthrough), the reader queues the backing files of the directory's other files and
    of the directories a top-down walk reads next, and threads read them into the page
    cache (cowfs/fuse/_fuse_prefetch.c). Off (COWFS_READAHEAD=0) they stay out: the control
    that shows the check can fail."""
    if opens == "passthrough" and passthrough_refused is not None:
        pytest.skip(f"passthrough falls back here: {passthrough_refused}")
    monkeypatch.setenv("COWFS_PASSTHROUGH", "1" if opens == "passthrough" else "0")
    if readahead == "off":
        monkeypatch.setenv("COWFS_READAHEAD", "0")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("no read-ahead threads with one CPU")
    lower = tmp_path / "lower"
    names = {"pkg": ["a0", "a1", "a2"], "pkg/sub": ["b0", "b1"], "pkg/sub/deep": ["c0"],
             "pkg/zz": ["d0"], "other": ["e0"]}
    for d, files in names.items():
        (lower / d).mkdir(parents=True)
        for f in files:
            (lower / d / f).write_bytes(os.urandom(20000))
    m = overlay_mount(lower)
    walked = [Path(r) / f for r, _, fs in os.walk(m.mnt) for f in fs]  # lists every directory
    assert len(walked) == 8
    backing = [lower / d / f for d, files in names.items() for f in files]
    os.sync()  # dirty pages stay cached
    # (passthrough: the mount's pages are the backing files'; opening its files here would
    # be first opens, which read ahead themselves)
    drop_page_cache(backing if opens == "passthrough" else [*backing, *walked])
    if any(_cached(p) for p in backing):
        pytest.skip("this filesystem keeps the pages of the lower files (tmpfs?)")
    assert (m.mnt / "pkg" / "a0").read_bytes() == (lower / "pkg" / "a0").read_bytes()
    ahead = [p for p in backing if p.name != "a0" and p.parent.name != "other"]
    deadline = time.monotonic() + 10
    while readahead == "on" and not all(_cached(p) for p in ahead) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    if readahead == "off":
        time.sleep(0.5)
        assert [p for p in ahead if _cached(p)] == []
        assert status(m.spec)["read_ahead"] == 0
        return
    assert all(_cached(p) for p in ahead)  # pkg's other files, then sub, sub/deep, zz
    # (a thread counts a file once its pread returned: the pages can be seen a bit earlier)
    while status(m.spec)["read_ahead"] < len(ahead) and time.monotonic() < deadline + 1:
        time.sleep(0.01)
    assert status(m.spec)["read_ahead"] >= len(ahead)
    for p in walked:  # and reads through the mount are the lower's bytes, as always
        assert p.read_bytes() == (lower / p.relative_to(m.mnt)).read_bytes()


def test_an_unlisted_directory_reads_ahead_only_its_own_files(
        tmp_path: Path, overlay_mount: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An import looks up bytecode in `__pycache__` without listing it: a first READ there
    reads ahead the bytecode next door, not the directories a walk would read next (the
    modules of other packages, read for nothing)."""
    monkeypatch.setenv("COWFS_PASSTHROUGH", "0")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("no read-ahead threads with one CPU")
    lower = tmp_path / "lower"
    for d, files in {"pkg/__pycache__": ["m0.pyc", "m1.pyc", "m2.pyc"],
                     "pkg/zsub": ["z0.py"]}.items():
        (lower / d).mkdir(parents=True)
        for f in files:
            (lower / d / f).write_bytes(os.urandom(20000))
    m = overlay_mount(lower)
    os.listdir(m.mnt / "pkg")  # as importlib lists a package, never its __pycache__
    os.listdir(m.mnt / "pkg" / "zsub")
    for name in ("m0.pyc", "m1.pyc", "m2.pyc"):
        os.stat(m.mnt / "pkg" / "__pycache__" / name)
    backing = [*(lower / "pkg" / "__pycache__").iterdir(), lower / "pkg" / "zsub" / "z0.py"]
    os.sync()
    drop_page_cache(backing)
    assert not any(_cached(p) for p in backing)
    (m.mnt / "pkg" / "__pycache__" / "m0.pyc").read_bytes()
    nextdoor = [lower / "pkg" / "__pycache__" / n for n in ("m1.pyc", "m2.pyc")]
    deadline = time.monotonic() + 10
    while not all(_cached(p) for p in nextdoor) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_cached(p) for p in nextdoor)
    time.sleep(0.3)
    assert not _cached(lower / "pkg" / "zsub" / "z0.py")
