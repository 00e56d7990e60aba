"""`cowfs status`, `cowfs diff`, `cowfs reset` on real mounted venvs (and the classifier on a
hand-built upper layer, in both whiteout formats)."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cowfs.mount import mount as mounting
from cowfs.mount.spec import VenvState
from cowfs.overlay.upper import OPAQUE_XATTR, WHITEOUT_XATTR
from cowfs.store.manifest import FileEntry, Manifest, write_manifest
from cowfs.store.store import Store
from installer.cli.diff import diff_lines
from installer.venv import changes
from tests.conftest import EDITED, UDDER, cow, cowfs, install, one_line_error, site
from tests.wheelbuild import build

MAIN = "pycowsay/main.py"


def status(venv: Path) -> dict[str, dict[str, str]]:
    """path -> {"kind", "owner"} from `cowfs status --json`."""
    doc = json.loads(cowfs("status", "--venv", str(venv), "--json").stdout)
    return {c["path"]: c for g in doc["groups"] for c in g["changes"]}


def test_status_diff_reset_on_a_live_mount(venvs: Callable[[str], Path], wheels: Path) -> None:
    a = venvs("A")
    install(a, wheels)
    clean = cowfs("status", "--venv", str(a))
    assert clean.stdout.count("\n") == 1 and "no private changes" in clean.stdout
    sp = site(a)
    main = sp / MAIN
    main.write_text(main.read_text().replace(UDDER, EDITED))
    (sp / "pycowsay" / "__init__.py").chmod(0o755)
    os.utime(sp / "pycowsay" / "__main__.py")  # copied up, content and mode unchanged
    (sp / "pycowsay-0.0.0.2.dist-info" / "INSTALLER").unlink()
    (sp / "notes.txt").write_text("mine\n")
    got = status(a)
    assert {p: c["kind"] for p, c in got.items()} == {
        MAIN: "modified", "pycowsay/__init__.py": "mode", "pycowsay/__main__.py": "metadata",
        "pycowsay-0.0.0.2.dist-info/INSTALLER": "deleted", "notes.txt": "added"}
    assert got[MAIN]["owner"] == "pycowsay" and got["notes.txt"]["owner"] is None
    text = cowfs("status", "--venv", str(a)).stdout
    assert "\x1b[" not in text  # no colour when stdout is not a terminal
    assert "pycowsay 0.0.0.2\n" in text and "  M pycowsay/main.py\n" in text
    assert "no distribution\n  A notes.txt" in text

    diff = cowfs("diff", "--venv", str(a)).stdout.splitlines()
    assert "--- a/pycowsay/main.py" in diff and "+++ b/pycowsay/main.py" in diff
    assert f"-               {UDDER}" in diff and f"+               {EDITED}" in diff
    assert "mode change 644 => 755 pycowsay/__init__.py" in diff
    assert "+++ /dev/null" in diff and "-cowfs" in diff  # the deleted INSTALLER
    only = cowfs("diff", "--venv", str(a), str(main)).stdout  # an absolute PATH
    assert "main.py" in only and "INSTALLER" not in only and "notes.txt" not in only

    # A process holding main.py open sees the pristine file on its next open.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nf = open(sys.argv[1])\nprint(f.read().count("
         "sys.argv[2]), flush=True)\nsys.stdin.readline()\nprint(open(sys.argv[1]).read()"
         ".count(sys.argv[2]), flush=True)", str(main), EDITED],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "1"
        out = cowfs("reset", "--venv", str(a), "pycowsay", "-y").stdout
        assert "reset 4 changes" in out and "live mount" in out
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "0"
    finally:
        holder.kill()
        holder.wait()
    assert cow(a) == UDDER
    assert (sp / "pycowsay-0.0.0.2.dist-info" / "INSTALLER").read_text() == "cowfs\n"
    assert set(status(a)) == {"notes.txt"}
    one_line_error(cowfs("reset", "--venv", str(a), "nosuchpkg", "-y", check=False),
                   "unknown package or path: nosuchpkg")
    one_line_error(cowfs("diff", "--venv", str(a), "/etc/passwd", check=False),
                   "is not inside")
    cowfs("reset", "--venv", str(a), "--all", "-y")
    assert not (sp / "notes.txt").exists()
    assert "no private changes" in cowfs("status", "--venv", str(a)).stdout
    upper = a / ".cowfs" / "upper"
    assert not [p for p in upper.rglob("*") if not p.is_dir()]


def _pty_run(args: list[str], answer: bytes | None) -> tuple[int, str]:
    """Run cowfs with stdin/stdout on a pseudo terminal; type `answer` at the prompt."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "cowfs", *args], stdin=slave, stdout=slave,
                            stderr=slave, close_fds=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
                if answer is not None and b"[y/N]" in out:
                    os.write(master, answer + b"\n")
                    answer = None
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        proc.wait(timeout=10)
    return proc.returncode, out.decode(errors="replace")


def test_reset_confirms_on_a_terminal_and_refuses_without_one(
        venvs: Callable[[str], Path], wheels: Path) -> None:
    a = venvs("A")
    install(a, wheels)
    main = site(a) / MAIN
    main.write_text(main.read_text().replace(UDDER, EDITED))
    refused = cowfs("reset", "--venv", str(a), "--all", check=False)
    one_line_error(refused, "pass -y")
    assert cow(a) == EDITED
    rc, out = _pty_run(["status", "--venv", str(a)], None)
    assert rc == 0 and "\x1b[" in out  # coloured on a terminal
    rc, out = _pty_run(["reset", "--venv", str(a), MAIN], b"n")
    assert rc == 1 and "Aborted" in out and cow(a) == EDITED
    rc, out = _pty_run(["reset", "--venv", str(a), MAIN], b"y")
    assert rc == 0 and "reset 1 change" in out, out
    assert cow(a) == UDDER


def test_deleted_and_opaque_directories(venvs: Callable[[str], Path], wheels: Path) -> None:
    a = venvs("A")
    install(a, wheels)
    pkg = site(a) / "pycowsay"
    shutil.rmtree(pkg)
    got = status(a)
    assert {p for p, c in got.items() if c["kind"] == "deleted"} >= {
        MAIN, "pycowsay/__init__.py", "pycowsay/__main__.py"}
    assert all(c["reset_path"] == "pycowsay" for c in got.values())
    pkg.mkdir()  # over a whiteout: an opaque directory that hides the lower one
    (pkg / "new.py").write_text("X = 1\n")
    got = status(a)
    assert got["pycowsay/new.py"]["kind"] == "added"
    assert got[MAIN]["kind"] == "deleted" and got[MAIN]["reset_path"] == "pycowsay"
    diff = cowfs("diff", "--venv", str(a), "pycowsay/").stdout
    assert "+++ b/pycowsay/new.py" in diff and "--- a/pycowsay/main.py" in diff
    cowfs("reset", "--venv", str(a), "pycowsay", "-y")  # the package: its whole directory
    assert cow(a) == UDDER and not (pkg / "new.py").exists()
    assert "no private changes" in cowfs("status", "--venv", str(a)).stdout


def test_uv_installed_distribution_is_grouped_and_reset(
        venvs: Callable[[str], Path], wheels: Path, tmp_path: Path) -> None:
    uv = Path(sys.executable).parent / "uv"
    if not uv.exists():
        pytest.skip("uv is not installed (test extra)")
    a = venvs("A")
    install(a, wheels)
    extra = tmp_path / "extra"
    extra.mkdir()
    build(extra, {"localpkg/__init__.py": b"X = 42\n", "localpkg/sub/m.py": b"Y = 1\n"},
          name="localpkg", meta_extra="")
    proc = subprocess.run([str(uv), "pip", "install", "--python", str(a / "bin" / "python"),
                           "--no-index", "--find-links", str(extra), "localpkg"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(cowfs("status", "--venv", str(a), "--json").stdout)
    groups = {g["distribution"]: g for g in doc["groups"]}
    assert groups["localpkg"]["installer"] == "installed by uv"
    paths = {c["path"] for c in groups["localpkg"]["changes"]}
    assert {"localpkg/__init__.py", "localpkg/sub/m.py",
            "localpkg-1.0.dist-info/RECORD"} <= paths
    assert "pycowsay" not in groups  # uv left the cowfs distribution alone
    cowfs("reset", "--venv", str(a), "localpkg", "-y")
    # No empty directory may stay behind: it would import as a namespace package.
    assert not (site(a) / "localpkg").exists()
    assert not (a / ".cowfs" / "upper" / "localpkg").exists()
    gone = subprocess.run([str(a / "bin" / "python"), "-c", "import localpkg"],
                          capture_output=True, text=True)
    assert gone.returncode != 0


def test_reset_of_an_unmounted_venv_edits_the_upper_dir(
        venvs: Callable[[str], Path], wheels: Path) -> None:
    a = venvs("A")
    install(a, wheels)
    main = site(a) / MAIN
    main.write_text(main.read_text().replace(UDDER, EDITED))
    cowfs("umount", str(a))
    assert mounting.find_mount(str(site(a))) is None
    assert set(status(a)) == {MAIN}  # status needs no mount: it reads the upper dir
    out = cowfs("reset", "--venv", str(a), MAIN, "-y").stdout
    assert "not mounted" in out
    assert not (a / ".cowfs" / "upper" / MAIN).exists()
    cowfs("mount", str(a))
    assert cow(a) == UDDER


def test_bad_venvs_give_one_line(tmp_path: Path) -> None:
    one_line_error(cowfs("status", "--venv", str(tmp_path / "nope"), check=False),
                   "no cowfs venv at")
    broken = tmp_path / "broken"
    (broken / ".cowfs").mkdir(parents=True)
    (broken / ".cowfs" / "state.json").write_text("{not json")
    for cmd in (["status"], ["diff"], ["reset", "--all", "-y"]):
        one_line_error(cowfs(*cmd, "--venv", str(broken), check=False), "venv state")
    usage = cowfs("reset", "--venv", str(broken), check=False)
    one_line_error(usage, "or use --all")


# -- the classifier on a hand-built upper layer (no mount) ----------------------------------


def _fake_venv(tmp_path: Path) -> VenvState:
    store = Store(tmp_path / "store").ensure()
    files = {"pkg/__init__.py": b"", "pkg/a.py": b"A = 1\n", "pkg/sub/b.py": b"B = 2\n",
             "pkg/data.bin": b"\0\1\2", "pkg-1.0.dist-info/RECORD": b"pkg/a.py,,\n",
             "pkg/typed.py": b"T = 1\n", "lone/c.py": b"C = 3\n"}
    rows = tuple(FileEntry(p, store.put_bytes(d), len(d), 0o644) for p, d in files.items())
    write_manifest(store, Manifest(id="pkg-1.0-x", name="pkg", version="1.0", files=rows,
                                   dist_info="pkg-1.0.dist-info"))
    venv = tmp_path / "venv"
    sp = venv / "lib" / "site-packages"
    sp.mkdir(parents=True)
    state = VenvState(venv=venv, site_packages=sp, store=store.root, dists=["pkg-1.0-x"])
    state.save()
    state.upper.mkdir(parents=True)
    return state


@pytest.mark.parametrize("xattrs", [True, False], ids=["xattr-markers", "wh-markers"])
def test_classifier_on_both_marker_formats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           xattrs: bool) -> None:
    state = _fake_venv(tmp_path)
    monkeypatch.setattr(changes, "supports_user_xattrs", lambda path: xattrs)
    up = state.upper
    (up / "pkg" / "sub").mkdir(parents=True)
    (up / "pkg" / "a.py").write_text("A = 1\n")  # same content, same mode
    (up / "pkg" / "a.py").chmod(0o644)
    (up / "pkg" / "data.bin").write_bytes(b"\0\1\3")
    (up / "pkg" / "data.bin").chmod(0o644)
    (up / "pkg" / "__pycache__").mkdir()
    (up / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"pyc")
    (up / "newdir").mkdir()
    (up / "pkg" / "typed.py").mkdir()  # a directory where a file was
    (up / "pkg" / "typed.py" / "x.txt").write_text("x\n")
    (up / "lone").write_text("a file where a directory was\n")
    if xattrs:
        wh = up / "pkg" / "__init__.py"
        wh.touch()
        os.setxattr(wh, WHITEOUT_XATTR, b"y")
        os.setxattr(up / "pkg", OPAQUE_XATTR, b"x")  # "holds whiteouts": not opaque
        os.setxattr(up / "pkg" / "sub", OPAQUE_XATTR, b"y")
    else:
        (up / "pkg" / ".wh.__init__.py").touch()
        (up / "pkg" / "sub" / ".wh..wh..opq").touch()
    report = changes.scan(state)
    got = {c.path: (c.kind, c.owner, c.reset_path) for c in report.changes}
    assert got == {
        "pkg/a.py": ("metadata", "pkg", "pkg/a.py"),
        "pkg/data.bin": ("modified", "pkg", "pkg/data.bin"),
        "pkg/__init__.py": ("deleted", "pkg", "pkg/__init__.py"),
        "pkg/sub/b.py": ("deleted", "pkg", "pkg/sub"),
        "pkg/__pycache__/a.cpython-311.pyc": ("added", "pkg", "pkg/__pycache__/a.cpython-311.pyc"),
        "newdir": ("added", "", "newdir"),
        "pkg/typed.py": ("type", "pkg", "pkg/typed.py"),
        "pkg/typed.py/x.txt": ("added", "", "pkg/typed.py/x.txt"),
        "lone": ("type", "pkg", "lone"),
        "lone/c.py": ("deleted", "pkg", "lone"),
    }
    assert len(report.changes) == len(got)  # one change per path
    diff = list(diff_lines(report, report.changes))
    assert "Binary files a/pkg/data.bin and b/pkg/data.bin differ" in diff
    assert "new empty directory: newdir/" in diff
    assert "type change: pkg/typed.py is now a directory" in diff
    # Offline reset (no daemon serves this venv) removes exactly the upper entries.
    result = changes.reset(report, changes.select(report, ["pkg"]))
    assert not result.live and "pkg/sub" in result.removed
    assert not (up / "pkg" / "sub").exists() and not (up / "pkg" / "data.bin").exists()
    assert [c.path for c in changes.scan(state).changes] == ["newdir"]


def test_paths_relative_to_the_working_directory(venvs: Callable[[str], Path],
                                                 wheels: Path) -> None:
    """A user in the package's directory names a file as the shell completes it; from the
    project, as `.venv/lib/...`. Both used to be taken as site-packages-relative: unknown."""
    a = venvs("A")
    install(a, wheels)
    sp = site(a)
    main = sp / MAIN
    main.write_text(main.read_text().replace(UDDER, EDITED))
    (sp / "notes.txt").write_text("mine\n")
    inside = cowfs("diff", "--venv", str(a), "main.py", cwd=sp / "pycowsay").stdout
    assert "+++ b/pycowsay/main.py" in inside and "notes.txt" not in inside
    project = os.path.relpath(main, a.parent)
    assert project.startswith(".venv/lib/")
    assert "+++ b/pycowsay/main.py" in cowfs("diff", "--venv", str(a), project,
                                             cwd=a.parent).stdout
    assert "notes.txt" in cowfs("diff", "--venv", str(a), "notes.txt", cwd=a.parent).stdout
    cowfs("reset", "--venv", str(a), "-y", "main.py", cwd=sp / "pycowsay")
    assert cow(a) == UDDER and set(status(a)) == {"notes.txt"}
    bad = cowfs("diff", "--venv", str(a), "../../../../x", cwd=sp / "pycowsay", check=False)
    one_line_error(bad, "is not inside")
    (sp / "pycowsay" / "__init__.py").unlink()
    (sp / "pycowsay" / "__init__.py").symlink_to("main.py")  # once had a bogus mode change
    assert cowfs("diff", "--venv", str(a), "__init__.py", cwd=sp / "pycowsay").stdout == \
        "type change: pycowsay/__init__.py is now a symlink\n"
