"""Bad input on the command line: every command answers an unknown option with click's usage
error (exit 2) and a bad value with exactly one line `cowfs: error: ...` (exit 1), without a
traceback and without changing anything on disk. Plus venv paths with spaces, non-ASCII
and shell metacharacters, end to end on the real pycowsay wheel.

The table runs in-process (click's CliRunner: ~50 cases in well under a second each); a few
cases run through `python -m cowfs` too, so the real entry point is covered.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cowfs.cli import main
from cowfs.mount.spec import VenvState
from tests.conftest import EDITED, PKG, UDDER, cowfs, unmount_venv

COMMANDS = [["venv"], ["install"], ["uninstall", "x"], ["sync", "lock.txt"], ["mount"],
            ["umount", "x"], ["mounts"], ["python", "info"], ["python"], ["cache", "clean"],
            ["cache"], ["status"], ["diff"], ["reset"], ["store", "verify"], ["store", "gc"],
            ["store", "du"], ["store", "info"], ["store"], ["adopt", "x"],
            ["store", "remote"], ["store", "remote", "add", "a", "b"], ["store", "push"],
            ["store", "pull"]]

# (case id, argv, expected start of the error line); {v} is the module's cowfs venv.
BAD_VALUES = [
    ("venv-on-file", ["venv", "afile"], "afile exists and is not an empty directory"),
    ("venv-under-file", ["venv", "afile/x"], "Not a directory"),
    ("venv-nonempty-dir", ["venv", "nonempty"], "nonempty exists and is not an empty"),
    ("venv-plain-venv", ["venv", "plainvenv"], "plainvenv is already a venv (not made by"),
    ("venv-missing-python", ["venv", "n1", "--python", "/nonexistent/python"],
     "cannot query python interpreter /nonexistent/python: not found", "freshstore"),
    ("venv-python-not-python", ["venv", "n2", "--python", "/etc/hostname"],
     "cannot query python interpreter /etc/hostname"),
    ("venv-python-dir", ["venv", "n3", "-p", "/tmp"], "cannot query python interpreter /tmp"),
    ("venv-in-proc", ["venv", "/proc/cowfs-test-venv"],
     "cannot create /proc/cowfs-test-venv: its filesystem (/proc) takes no new files"),
    ("install-nothing", ["install", "--venv", "{v}"], "nothing to install"),
    ("install-missing-reqfile", ["install", "--venv", "{v}", "-r", "missing.txt"],
     "requirements file missing.txt not found"),
    ("install-no-venv", ["install", "--venv", "nope", "x"], "no cowfs venv at"),
    ("install-plain-venv", ["install", "--venv", "plainvenv", "x"],
     "{cwd}/plainvenv is a venv but not a cowfs venv"),
    ("install-bad-req", ["install", "--venv", "{v}", "not a valid req!!", "--no-index",
                         "--find-links", "nonempty"], "Invalid requirement"),
    ("uninstall-not-installed", ["uninstall", "--venv", "{v}", "nothere"],
     "not installed in"),
    ("uninstall-no-venv", ["uninstall", "--venv", "nope", "x"], "no cowfs venv at"),
    ("sync-missing-lock", ["sync", "missing.lock", "--venv", "{v}"],
     "lock file missing.lock not found"),
    ("sync-unpinned", ["sync", "unpinned.txt", "--venv", "{v}"], "unpinned.txt:1: 'pkg>=1'"),
    ("sync-bad-toml", ["sync", "pylock.toml", "--venv", "{v}"], "pylock.toml: not valid TOML"),
    ("sync-editable", ["sync", "editable.txt", "--venv", "{v}"],
     "editable.txt:1: editable requirements are not supported"),
    ("mount-empty-option", ["mount", "-o", "lowerdir=", "a", "b"],
     "mount option lowerdir needs a value"),
    ("mount-unknown-option", ["mount", "-o", "lowerdir=/x,bogus=1", "a", "b"],
     "unknown mount option 'bogus=1'"),
    ("mount-one-arg", ["mount", "-o", "lowerdir=/x", "a"], "usage: cowfs mount -o"),
    ("mount-missing-options", ["mount", "-o", "lowerdir=/x,upperdir=/y", "a", "b"],
     "missing mount option(s): workdir"),
    ("mount-missing-lower", ["mount", "-o", "lowerdir=nope,upperdir=u,workdir=w", "s",
                             "nonempty"], "lowerdir {cwd}/nope is not a directory"),
    ("mount-no-venv", ["mount", "/nonexistent"], "/nonexistent is not a cowfs venv"),
    ("mount-two-args", ["mount", "a", "b"], "usage: cowfs mount VENV"),
    ("umount-not-mounted", ["umount", "nonempty"], "{cwd}/nonempty is not mounted"),
    ("umount-foreign", ["umount", "/"], "/ is not a cowfs mount"),
    ("python-info-missing", ["python", "info", "/nonexistent/python"], "cannot query python"),
    ("python-info-dir", ["python", "info", "/tmp"], "cannot query python interpreter /tmp"),
    ("status-no-venv", ["status", "--venv", "nope"], "no cowfs venv at"),
    ("diff-no-venv", ["diff", "--venv", "nope"], "no cowfs venv at"),
    ("diff-unknown", ["diff", "--venv", "{v}", "nopkg"], "unknown package or path: nopkg"),
    ("reset-nothing", ["reset", "--venv", "{v}"], "name what to reset"),
    ("reset-outside", ["reset", "--venv", "{v}", "/etc/hostname", "-y"],
     "/etc/hostname is not inside"),
    ("adopt-missing", ["adopt", "/nonexistent"], "/nonexistent is not a venv"),
    ("adopt-not-venv", ["adopt", "nonempty"], "{cwd}/nonempty is not a venv"),
    ("store-verify-file", ["store", "verify"], "no store at", "afile"),
    ("store-verify-missing", ["store", "verify"], "no store at", "nostore"),
    # COWFS_HOME naming a file (or a path below one) is an error, not an empty store.
    ("store-gc-file", ["store", "gc"], "store {cwd}/afile is not a directory", "afile"),
    ("store-gc-dry-run-file", ["store", "gc", "--dry-run"], "store {cwd}/afile is not a dir",
     "afile"),
    ("store-du-file", ["store", "du"], "store {cwd}/afile is not a directory", "afile"),
    ("store-du-json-file", ["store", "du", "--json"], "store {cwd}/afile is not a directory",
     "afile"),
    ("store-info-file", ["store", "info"], "store {cwd}/afile is not a directory", "afile"),
    ("store-info-under-file", ["store", "info"],
     "store {cwd}/afile/sub cannot exist: {cwd}/afile is not a directory", "afile/sub"),
    ("remote-add-bad-url", ["store", "remote", "add", "x", "ftp://h/p"],
     "bad remote URL 'ftp://h/p'"),
    ("remote-add-bad-name", ["store", "remote", "add", "a:b", "https://h/p"],
     "bad remote name 'a:b'"),
    ("remote-remove-unknown", ["store", "remote", "remove", "x"], "no remote named 'x'"),
    ("push-no-remote", ["store", "push"], "no remote configured"),
    ("push-no-store", ["store", "push", "/srv/x"], "no store at", "nostore"),
    ("push-http", ["store", "push", "http://127.0.0.1:9/x"], "read-only over HTTP"),
    ("pull-no-venv", ["store", "pull", "--venv", "nope"], "no cowfs venv at"),
    ("pull-lock-no-remote", ["store", "pull", "nolock.txt", "--venv", "{v}"],
     "no remote configured"),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A cwd with odd things in it, one cowfs venv, its store: built once, never changed."""
    d = tmp_path_factory.mktemp("cli")
    env = {"store": d / "store", "run": Path(f"/tmp/cowfs-rt-cli-{os.getpid()}")}
    cwd = d / "cwd"
    cwd.mkdir()
    (cwd / "afile").write_text("a file\n")
    (cwd / "nonempty" / "x").mkdir(parents=True)
    (cwd / "unpinned.txt").write_text("pkg>=1\n")
    (cwd / "editable.txt").write_text("-e .\n")
    (cwd / "pylock.toml").write_text("[[[\n")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(cwd / "plainvenv")],
                   check=True)
    venv = cwd / "v"
    cowfs("venv", str(venv), env=dict(os.environ, COWFS_HOME=str(env["store"]),
                                      COWFS_RUNTIME_DIR=str(env["run"])))
    try:
        yield {"cwd": cwd, "venv": venv, "root": d, **env}
    finally:
        unmount_venv(venv)
        subprocess.run(["rm", "-rf", str(env["run"])], check=False)


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            p = Path(dirpath) / name
            st = p.lstat()
            data = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) \
                else os.readlink(p) if stat.S_ISLNK(st.st_mode) else ""
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, data)
    return out


def invoke(base: dict[str, Path], argv: list[str], store: Path | None = None) -> Any:
    runner = CliRunner()
    cwd = os.getcwd()
    os.chdir(base["cwd"])
    try:
        return runner.invoke(main, argv, env={
            "COWFS_HOME": str(store or base["store"]), "COWFS_RUNTIME_DIR": str(base["run"]),
            "VIRTUAL_ENV": None})
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: "-".join(c))
def test_unknown_option_is_a_usage_error(base: dict[str, Path], command: list[str]) -> None:
    before = snapshot(base["root"])
    result = invoke(base, [*command, "--no-such-option"])
    assert result.exit_code == 2, result.output
    assert "Usage: " in result.stderr and "No such option" in result.stderr
    assert snapshot(base["root"]) == before


@pytest.mark.parametrize("case", BAD_VALUES, ids=lambda c: c[0])
def test_bad_value_is_one_error_line(base: dict[str, Path], case: tuple[str, ...]) -> None:
    _, argv, message, *store = case
    fill = {"v": str(base["venv"]), "cwd": str(base["cwd"])}
    argv = [a.format(**fill) for a in argv]
    before = snapshot(base["root"])
    result = invoke(base, argv, base["cwd"] / store[0] if store else None)
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{type(result.exception).__name__}: {result.exception}"
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cowfs: error: "), result.stderr
    assert message.format(**fill) in lines[0]
    assert snapshot(base["root"]) == before, "a refused command changed something on disk"


@pytest.mark.parametrize("command", [["store", "gc"], ["store", "du"], ["store", "info"],
                                     ["store", "gc", "--dry-run"], ["cache", "clean"],
                                     ["store", "remote", "list"], ["store", "push", "-n"]],
                         ids=lambda c: "-".join(c))
def test_store_commands_on_no_store_create_nothing(base: dict[str, Path],
                                                   command: list[str]) -> None:
    before = snapshot(base["root"])
    result = invoke(base, command, base["cwd"] / "nostore" / "sub")
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.exit_code in (0, 1) and "Traceback" not in result.output
    assert snapshot(base["root"]) == before


def test_real_entry_point_exit_codes(base: dict[str, Path]) -> None:
    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return cowfs(*argv, check=False, cwd=base["cwd"],
                     env=dict(os.environ, COWFS_HOME=str(base["store"]),
                              COWFS_RUNTIME_DIR=str(base["run"])))

    before = snapshot(base["root"])
    usage = run("frobnicate")
    assert usage.returncode == 2 and "No such command 'frobnicate'" in usage.stderr
    bad = run("install", "--venv", "nope", "x")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("cowfs: error: no cowfs venv at")
    assert run("--version").stdout.startswith("cowfs")
    assert snapshot(base["root"]) == before


# -- odd venv paths, end to end ---------------------------------------------------------------


def test_venv_path_with_spaces_and_non_ascii(tmp_path: Path, wheels: Path) -> None:
    """`cowfs venv "/tmp/x/my proj/\u00fcn\u00ef"`, one level deeper with shell quoting
    hazards too (the launchers' sh stanza, the automount hook, mountinfo escapes)."""
    venv = tmp_path / "x" / "my proj" / "\u00fcn\u00ef" / "it's \"q\" $HOME `id` \\ \u00e9t\u00e9"
    try:
        cowfs("venv", str(venv))
        cowfs("install", "--venv", str(venv), PKG, "--no-index", "--find-links", str(wheels))
        out = subprocess.run([str(venv / "bin" / "pycowsay"), "m\u00f6\u00f6"],
                             capture_output=True, text=True, check=True).stdout
        assert "< m\u00f6\u00f6 >" in out and UDDER in out
        site = VenvState.load(venv).site_packages
        assert str(venv) in cowfs("mounts").stdout
        cowfs("umount", str(venv))  # then the automount hook, with this path, mounts it
        proc = subprocess.run([str(venv / "bin" / "python"), "-c", "import pycowsay.main"],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        main_py = site / "pycowsay" / "main.py"
        main_py.write_text(main_py.read_text().replace(UDDER, EDITED))
        assert "pycowsay/main.py" in cowfs("status", "--venv", str(venv)).stdout
        cowfs("reset", "--venv", str(venv), "--all", "-y")
        assert UDDER in main_py.read_text()
    finally:
        unmount_venv(venv)


def test_an_interrupt_inside_trio_is_a_plain_interrupt() -> None:
    """Ctrl-C during downloads reaches the CLI wrapped in trio's exception group: it is
    answered like any Ctrl-C ("Aborted!"), anything else in the group is not hidden."""
    import builtins

    from cowfs.cli import _only_interrupts

    group_of = getattr(builtins, "BaseExceptionGroup", None) \
        or pytest.importorskip("exceptiongroup").BaseExceptionGroup  # trio's, before 3.11
    group = group_of("nursery", [KeyboardInterrupt(),
                                 group_of("inner", [KeyboardInterrupt()])])
    assert _only_interrupts(group) and _only_interrupts(KeyboardInterrupt())
    assert not _only_interrupts(group_of("mixed", [KeyboardInterrupt(), ValueError()]))
    assert not _only_interrupts(ValueError())
