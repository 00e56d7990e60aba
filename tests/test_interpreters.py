"""The interpreter cache must never serve a stale answer, and must really be a cache.

Fake interpreters are padded shell scripts that ignore their arguments, count their runs in
a file and print a fixed answer, so that two "Pythons" can share a path, a size and an mtime.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import packaging.markers
import packaging.tags
import pytest

from cowfs.errors import CowfsError
from cowfs.store.store import Store
from installer import interpreters
from installer.interpreters import clean_interpreter_cache, query_interpreter

REPO = Path(__file__).resolve().parents[1]
FAKE_SIZE = 8192  # every fake is padded to this size


@dataclass(frozen=True)
class Fake:
    """A fake Python installation: prefix/bin/pythonX.Y, its stdlib os.py and libpython."""

    version: str
    short: str  # "3.12"
    prefix: Path
    exe: Path
    stdlib: Path
    libpython: Path
    counter: Path

    def runs(self) -> int:
        return len(self.counter.read_text().splitlines()) if self.counter.exists() else 0

    def doc(self, sys_executable: Path | None = None) -> dict[str, Any]:
        major, minor, micro = (int(n) for n in self.version.split("."))
        markers = dict(packaging.markers.default_environment())
        markers.update(python_version=self.short, python_full_version=self.version)
        site = str(self.stdlib / "site-packages")
        return {
            "version": self.version,
            "version_info": [major, minor, micro],
            "implementation": "cpython",
            "sys_executable": str(sys_executable or self.exe),
            "sys_prefix": str(self.prefix),
            "base_prefix": str(self.prefix),
            "is_venv": False,
            "paths": {
                "purelib": site,
                "platlib": site,
                "scripts": str(self.prefix / "bin"),
                "data": str(self.prefix),
                "include": str(self.prefix / "include"),
                "stdlib": str(self.stdlib),
            },
            "markers": markers,
            "tags": [f"cp{major}{minor}-cp{major}{minor}-manylinux_2_17_x86_64", "py3-none-any"],
            "abiflags": "",
            "soabi": f"cpython-{major}{minor}-x86_64-linux-gnu",
            "platform": "linux-x86_64",
            "libpython": str(self.libpython),
        }

    def script(self, sys_executable: Path | None = None) -> bytes:
        return fake_script(self.doc(sys_executable), self.counter)


def fake_script(answer: Any, counter: Path, body: str = "") -> bytes:
    """A /bin/sh script of exactly FAKE_SIZE bytes that logs a run and prints `answer`."""
    text = f"#!/bin/sh\necho run >> '{counter}'\n{body}"
    if answer is not None:
        text += f"cat <<'COWFS_EOF'\n{json.dumps(answer)}\nCOWFS_EOF\n"
    data = text.encode()
    assert len(data) < FAKE_SIZE
    return data + b"#" * (FAKE_SIZE - len(data) - 1) + b"\n"


def install(path: Path, data: bytes, *, like: os.stat_result | None = None) -> None:
    """Atomically put an executable file at path; `like` restores an old file's timestamps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    os.replace(tmp, path)
    if like is not None:
        os.utime(path, ns=(like.st_atime_ns, like.st_mtime_ns))


def make_fake(root: Path, version: str) -> Fake:
    short = ".".join(version.split(".")[:2])
    prefix = root / f"py{version}"
    lib = prefix / "lib"
    fake = Fake(
        version,
        short,
        prefix,
        exe=prefix / "bin" / f"python{short}",
        stdlib=lib / f"python{short}",
        libpython=lib / f"libpython{short}.so.1.0",
        counter=prefix / "runs",
    )
    install(fake.exe, fake.script())
    fake.stdlib.mkdir(parents=True, exist_ok=True)
    (fake.stdlib / "os.py").write_text(f"# os for {version}\n")
    fake.libpython.write_bytes(f"ELF {version}".encode().ljust(64, b"\0"))
    return fake


def point(link: Path, target: Path, *, like: os.stat_result | None = None) -> None:
    """Atomically (re)point a symlink, optionally with an old symlink's timestamps."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(link.name + ".new")
    tmp.symlink_to(target)
    os.replace(tmp, link)
    if like is not None:
        os.utime(link, ns=(like.st_atime_ns, like.st_mtime_ns), follow_symlinks=False)


def make_venv(venv: Path, fake: Fake) -> Path:
    point(venv / "bin" / "python", fake.exe)
    (venv / "pyvenv.cfg").write_text(f"home = {fake.prefix / 'bin'}\nversion = 3.x\n")
    return venv / "bin" / "python"


def rewrite_in_place(path: Path, data: bytes) -> None:
    """Same inode, same size, mtime put back: only the ctime or the content can tell."""
    st = path.stat()
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (st.st_ino, st.st_mtime_ns)


def coarse_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate a rewrite within one timestamp tick: ctime reads as the (restored) mtime."""
    real = interpreters._stat_key

    def stat_key(path: str) -> list[int] | None:
        key = real(path)
        return None if key is None else [*key[:4], key[3]]

    monkeypatch.setattr(interpreters, "_stat_key", stat_key)


def entries(store: Store) -> list[Path]:
    return sorted(store.interpreters.glob("*.json"))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


# -- the stale-answer failure and its relatives -------------------------------------------


def test_recreated_venv_with_same_timestamps_gets_the_new_python(
    tmp_path: Path, store: Store, py312: Fake, py39: Fake
) -> None:
    python = make_venv(tmp_path / "venv", py312)
    first = query_interpreter(python, store)
    assert (first.version, first.version_info, first.from_cache) == ("3.12.9", (3, 12, 9), False)
    assert first.executable == str(python) and first.canonical == str(py312.exe)
    assert query_interpreter(python, store).from_cache

    link_st, cfg_st = python.lstat(), (tmp_path / "venv" / "pyvenv.cfg").stat()
    cfg = (tmp_path / "venv" / "pyvenv.cfg").read_bytes()
    shutil.rmtree(tmp_path / "venv")
    point(python, py39.exe, like=link_st)
    (tmp_path / "venv" / "pyvenv.cfg").write_bytes(cfg)  # even an identical pyvenv.cfg
    os.utime(tmp_path / "venv" / "pyvenv.cfg", ns=(cfg_st.st_atime_ns, cfg_st.st_mtime_ns))
    assert python.lstat().st_mtime_ns == link_st.st_mtime_ns

    second = query_interpreter(python, store)
    assert (second.version, second.version_info, second.from_cache) == ("3.9.21", (3, 9, 21), False)
    assert second.executable == str(python) and second.canonical == str(py39.exe)
    assert second.markers["python_version"] == "3.9"
    assert second.tags[0] == "cp39-cp39-manylinux_2_17_x86_64"


def test_switching_back_reuses_the_still_valid_entry(
    tmp_path: Path, store: Store, py312: Fake, py39: Fake
) -> None:
    python = make_venv(tmp_path / "venv", py312)
    assert query_interpreter(python, store).version == "3.12.9"
    assert query_interpreter(python, store).from_cache
    link_st = python.lstat()

    point(python, py39.exe, like=link_st)
    assert query_interpreter(python, store).version == "3.9.21"
    point(python, py312.exe, like=link_st)
    back = query_interpreter(python, store)
    assert (back.version, back.from_cache) == ("3.12.9", True)
    point(python, py39.exe, like=link_st)
    assert query_interpreter(python, store).from_cache
    assert (py312.runs(), py39.runs()) == (1, 1)
    assert len(entries(store)) == 2


@pytest.mark.parametrize(
    ("how", "racy_ns"),
    [
        ("rename", interpreters.RACY_NS),
        ("in-place", interpreters.RACY_NS),
        ("in-place within one tick", interpreters.RACY_NS),
        ("rename", 0),
    ],
)
def test_copied_executable_replaced_by_same_size_same_mtime_copy(
    tmp_path: Path,
    store: Store,
    py312: Fake,
    py39: Fake,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
    racy_ns: int,
) -> None:
    # racy_ns=0 checks the stat fingerprint alone; the default also hashes fresh files, which
    # is what catches an in-place rewrite within one coarse timestamp tick.
    monkeypatch.setattr(interpreters, "RACY_NS", racy_ns)
    if how == "in-place within one tick":
        coarse_clock(monkeypatch)
    python = tmp_path / "venv" / "bin" / "python"  # a `--copies` venv: a regular file
    (tmp_path / "venv" / "pyvenv.cfg").parent.mkdir(parents=True)
    (tmp_path / "venv" / "pyvenv.cfg").write_text("home = /somewhere\n")
    install(python, py312.script(sys_executable=python))
    assert query_interpreter(python, store).version == "3.12.9"
    assert query_interpreter(python, store).from_cache

    st = python.stat()
    new = py39.script(sys_executable=python)
    if how == "rename":
        install(python, new, like=st)
    else:
        rewrite_in_place(python, new)
    assert (python.stat().st_size, python.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)

    info = query_interpreter(python, store)
    assert (info.version, info.from_cache, info.canonical) == ("3.9.21", False, str(python))


@pytest.mark.parametrize("change", ["edit", "edit within one tick", "remove", "add next to python"])
def test_pyvenv_cfg_change_invalidates(
    tmp_path: Path, store: Store, py312: Fake, change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    python = make_venv(tmp_path / "venv", py312)
    cfg = tmp_path / "venv" / "pyvenv.cfg"
    if change == "edit within one tick":  # and looking old: only its content hash can tell
        coarse_clock(monkeypatch)
        monkeypatch.setattr(interpreters, "RACY_NS", 0)
    query_interpreter(python, store)
    assert query_interpreter(python, store).from_cache
    if change.startswith("edit"):
        rewrite_in_place(cfg, cfg.read_bytes().replace(b"3.x", b"3.y"))
    elif change == "remove":
        cfg.unlink()
    else:
        (python.parent / "pyvenv.cfg").write_text("home = /elsewhere\n")
    assert not query_interpreter(python, store).from_cache
    assert py312.runs() == 2
    assert query_interpreter(python, store).from_cache


@pytest.mark.parametrize("target", ["libpython", "os.py"])
def test_in_place_upgrade_under_an_untouched_executable(
    store: Store, py312: Fake, target: str
) -> None:
    query_interpreter(py312.exe, store)
    assert query_interpreter(py312.exe, store).from_cache
    path = py312.libpython if target == "libpython" else py312.stdlib / "os.py"
    exe_st = py312.exe.stat()
    st = path.stat()
    data = path.read_bytes()
    install(path, data.replace(b"3.12.9", b"3.12.8"), like=st)  # same size, same mtime
    assert py312.exe.stat().st_ctime_ns == exe_st.st_ctime_ns
    assert not query_interpreter(py312.exe, store).from_cache
    assert py312.runs() == 2


def test_hashes_are_dropped_once_files_are_no_longer_racy(
    store: Store, py312: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    python = make_venv(tmp_path / "venv", py312)
    query_interpreter(python, store)
    [entry] = entries(store)
    hashed = {r["path"] for r in json.loads(entry.read_text())["files"] if "xxh3" in r}
    assert str(py312.exe) in hashed  # just written: its stat alone proves nothing yet
    assert str(tmp_path / "venv" / "pyvenv.cfg") in hashed

    monkeypatch.setattr(interpreters, "RACY_NS", 0)  # as if the files were now old
    assert query_interpreter(python, store).from_cache
    hashed = {r["path"] for r in json.loads(entry.read_text())["files"] if "xxh3" in r}
    assert hashed == {str(tmp_path / "venv" / "pyvenv.cfg")}  # always hashed: it is tiny
    assert query_interpreter(python, store).from_cache
    assert py312.runs() == 1


def test_wrapper_is_never_cached(
    tmp_path: Path, store: Store, py312: Fake, py39: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Like a pyenv shim: what it runs depends on the environment, which no fingerprint covers.
    shim = tmp_path / "shim" / "python3"
    install(shim, b'#!/bin/sh\nexec "$COWFS_TEST_TARGET" "$@"\n')
    monkeypatch.setenv("COWFS_TEST_TARGET", str(py312.exe))
    assert query_interpreter(shim, store).version == "3.12.9"
    monkeypatch.setenv("COWFS_TEST_TARGET", str(py39.exe))
    info = query_interpreter(shim, store)
    assert (info.version, info.from_cache, info.sys_executable) == ("3.9.21", False, str(py39.exe))
    assert entries(store) == []


def test_answer_is_not_cached_when_the_venv_changed_during_the_query(
    tmp_path: Path, store: Store, py312: Fake
) -> None:
    python = tmp_path / "venv" / "bin" / "python"
    cfg = tmp_path / "venv" / "pyvenv.cfg"
    python.parent.mkdir(parents=True)
    cfg.write_text("home = /somewhere\n")
    body = f"echo '# changed' >> '{cfg}'\n"  # e.g. a concurrent `python -m venv --clear`
    install(python, fake_script(py312.doc(sys_executable=python), py312.counter, body))
    assert query_interpreter(python, store).version == "3.12.9"
    assert entries(store) == []


# -- the cache itself ---------------------------------------------------------------------


def test_entry_is_keyed_and_complete(store: Store, py312: Fake) -> None:
    info = query_interpreter(py312.exe, store)
    [entry] = entries(store)
    doc = json.loads(entry.read_text())
    assert (doc["schema"], doc["executable"], doc["canonical"]) == (
        1,
        str(py312.exe),
        str(py312.exe),
    )
    assert [r["path"] for r in doc["files"]] == [
        str(py312.exe),
        str(py312.exe.parent / "pyvenv.cfg"),
        str(py312.prefix / "pyvenv.cfg"),
        str(py312.libpython),
        str(py312.stdlib / "os.py"),
    ]
    assert "from_cache" not in doc["info"]
    cached = query_interpreter(py312.exe, store)
    assert cached == info and cached.from_cache and not info.from_cache
    assert hash(cached) == hash(info)


@pytest.mark.parametrize(
    "corrupt",
    [
        b"",
        b'{"schema": 1, "files": [',
        b"\xff\xfe\x00garbage",
        b"[1, 2, 3]",
        lambda d: d.update(schema=999),
        lambda d: d["files"].pop(1),
        lambda d: d["info"].update(version_info="3.12"),
        lambda d: d.update(canonical="/somewhere/else"),
    ],
    ids=["empty", "truncated", "binary", "list", "schema", "files", "info", "key"],
)
def test_corrupt_entry_is_discarded_and_requeried(store: Store, py312: Fake, corrupt: Any) -> None:
    query_interpreter(py312.exe, store)
    [entry] = entries(store)
    if isinstance(corrupt, bytes):
        entry.write_bytes(corrupt)
    else:
        doc = json.loads(entry.read_text())
        corrupt(doc)
        entry.write_text(json.dumps(doc))
    info = query_interpreter(py312.exe, store)
    assert (info.version, info.from_cache, py312.runs()) == ("3.12.9", False, 2)
    assert query_interpreter(py312.exe, store).from_cache  # rewritten, valid again
    assert py312.runs() == 2


def test_clean_and_no_cache(store: Store, py312: Fake, py39: Fake) -> None:
    assert clean_interpreter_cache(store) == 0  # no store yet
    query_interpreter(py312.exe, store)
    query_interpreter(py39.exe, store)
    assert clean_interpreter_cache(store) == 2
    assert entries(store) == []
    assert not query_interpreter(py312.exe, store).from_cache
    assert not query_interpreter(py312.exe, store, use_cache=False).from_cache
    assert py312.runs() == 3


def test_bare_name_is_looked_up_on_path(
    store: Store, py312: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", f"{py312.exe.parent}{os.pathsep}{os.environ['PATH']}")
    info = query_interpreter(py312.exe.name, store)
    assert (info.executable, info.version) == (str(py312.exe), "3.12.9")
    with pytest.raises(CowfsError, match="not found on PATH"):
        query_interpreter("python-that-does-not-exist", store)


# -- broken interpreters ------------------------------------------------------------------


def _broken(tmp_path: Path, kind: str, counter: Path, good: dict[str, Any]) -> Path:
    exe = tmp_path / "broken" / "python"
    stderr = "echo 'Traceback (most recent call last):' >&2\necho 'ImportError: boom' >&2\n"
    answer, body = {
        "not executable": (good, ""),
        "exit status": (None, f"{stderr}exit 3\n"),
        "signal": (None, "kill -9 $$\n"),
        "garbage": (None, "echo 'Python 2.7.18'\necho 'more'\n"),
        "wrong shape": ({k: v for k, v in good.items() if k != "tags"}, ""),
        "not an object": (["3.12.9"], ""),
        "bad markers": ({**good, "markers": {"python_version": "3.12"}}, ""),
    }.get(kind, (None, ""))
    if kind == "directory":
        exe.mkdir(parents=True)
    elif kind == "bad #! line":
        install(exe, b"#!/nonexistent/interpreter\n")
    elif kind != "missing":
        install(exe, fake_script(answer, counter, body))
    if kind == "not executable":
        exe.chmod(0o644)
    return exe


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "not found"),
        ("directory", "is a directory"),
        ("bad #! line", "cannot be executed"),
        ("not executable", "not executable"),
        ("exit status", "exit status 3: ImportError: boom"),
        ("signal", "killed by signal 9"),
        ("garbage", "unexpected output: more"),
        ("wrong shape", "unexpected answer: missing tags"),
        ("not an object", "unexpected answer: not a JSON object"),
        ("bad markers", "unexpected answer: markers lacks"),
    ],
)
def test_broken_interpreter_gives_one_clear_error(
    tmp_path: Path, store: Store, py312: Fake, kind: str, message: str
) -> None:
    exe = _broken(tmp_path, kind, tmp_path / "runs", py312.doc())
    with pytest.raises(CowfsError) as excinfo:
        query_interpreter(exe, store)
    text = str(excinfo.value)
    assert text.startswith(f"cannot query python interpreter {exe}: ")
    assert message in text
    assert "\n" not in text
    assert entries(store) == []


def _alive(pid: int) -> bool:
    """Neither gone nor a zombie waiting for its reaper (the state follows the name's ")")."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_timeout_kills_the_interpreter_and_its_children(tmp_path: Path, store: Store) -> None:
    exe = tmp_path / "slow" / "python"
    pidfile = tmp_path / "child.pid"
    install(exe, fake_script(None, tmp_path / "runs", f"sleep 30 &\necho $! > '{pidfile}'\nwait\n"))
    start = time.monotonic()
    with pytest.raises(CowfsError, match=r"timed out after 0\.5 s$"):
        query_interpreter(exe, store, timeout=0.5)
    assert time.monotonic() - start < 5
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(child):
        if time.monotonic() > deadline:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the interpreter's child survived the timeout")
        time.sleep(0.05)
