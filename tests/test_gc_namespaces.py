"""One store, venvs in other mount namespaces (what a container is to the kernel), gc on the host.

The venv lives on a tmpfs mounted inside a private mount (and pid) namespace made by
`unshare`, so the host sees an empty directory where the venv is: exactly the view gc on
the host has of a container's venv. gc must keep what that venv's live mount serves, keep
its root for the retention period once it is unmounted, and collect it after that.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cowfs.store.store import Store
from tests.conftest import PKG, UDDER, cowfs, install, unmount_venv
from tests.wheelbuild import build

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None, reason="no unshare(1)")

# Runs inside the namespace; stdin lines are the host's go-aheads.
NS_SCRIPT = r"""
set -eu
mount -t tmpfs cowfs-test "$D"
mkdir -p "$COWFS_RUNTIME_DIR"
if [ -n "$NEW" ]; then  # the store as a read-only volume, as `-v store:/cache:ro` gives
    mount --bind "$COWFS_HOME" "$COWFS_HOME"
    mount -o remount,bind,ro "$COWFS_HOME"
fi
"$PY" -m cowfs venv "$D/.venv" >/dev/null
"$PY" -m cowfs install --venv "$D/.venv" "$PKG" --no-index --find-links "$W" -q
if [ -n "$NEW" ]; then
    "$PY" -m cowfs install --venv "$D/.venv" newpkg --no-index --find-links "$NEW" 2>&1 \
        && echo "installed into a read-only store" || true
fi
echo mounted
read -r _
"$D/.venv/bin/pycowsay" moo | grep -F -- '||--'
echo imported
read -r _
"$PY" -m cowfs umount "$D/.venv"
echo unmounted
"""


class Namespace:
    """A shell in private mount + pid namespaces; killing it tears down all it mounted."""

    def __init__(self, tmp: Path, wheels: Path, new_wheels: Path | None = None) -> None:
        self.venv_dir = tmp / "ns-project"
        self.venv_dir.mkdir()
        env = {"D": str(self.venv_dir), "PY": sys.executable, "PKG": PKG, "W": str(wheels),
               "NEW": str(new_wheels or ""),
               "COWFS_RUNTIME_DIR": f"/tmp/cowfs-rt-ns-{tmp.name[-12:]}"}
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
             "--kill-child", "--mount-proc", "bash", "-c", NS_SCRIPT],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, **env})

    def expect(self, word: str) -> list[str]:
        assert self.proc.stdout is not None
        lines = []
        for line in self.proc.stdout:
            if line.strip() == word:
                return lines
            lines.append(line.strip())
        err = self.proc.stderr.read() if self.proc.stderr else ""
        raise AssertionError(f"namespace ended before {word!r}: {lines} {err}")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        self.proc.kill()  # --kill-child: the namespace's processes (daemon too) go with it
        self.proc.wait(timeout=30)


@pytest.fixture
def namespace(tmp_path: Path, wheels: Path) -> Iterator[Namespace]:
    ns = Namespace(tmp_path, wheels)
    try:
        yield ns
    finally:
        ns.close()


def _gc(*args: str) -> dict[str, object]:
    return json.loads(cowfs("store", "gc", "--json", *args).stdout)


def _pkg_manifests(store: Store) -> set[str]:
    return {p.stem for p in store.dists.glob("pycowsay-*.json")}


def test_host_gc_keeps_a_venv_mounted_in_another_namespace(namespace: Namespace) -> None:
    namespace.expect("mounted")
    store = Store()
    assert not any(namespace.venv_dir.iterdir())  # the host cannot see the venv
    before = _pkg_manifests(store)
    assert before
    dry = _gc("--dry-run")
    assert dry["dead_roots"] == [] and len(dry["unseen_roots"]) == 1  # type: ignore[arg-type]
    text = cowfs("store", "gc").stdout
    assert "kept root:" in text and "not visible here" in text
    assert _pkg_manifests(store) == before
    # Dropping the root on request still keeps what the live mount serves: its lease.
    dropped = _gc("--drop-unseen")
    assert len(dropped["dead_roots"]) == 1  # type: ignore[arg-type]
    assert set(dropped["manifests_in_use"]) >= before  # type: ignore[arg-type]
    assert _pkg_manifests(store) == before and dropped["objects_deleted"] == 0
    namespace.go()
    assert UDDER in "\n".join(namespace.expect("imported"))  # first import after the gcs
    assert cowfs("store", "verify", check=False).returncode == 0
    namespace.go()
    namespace.expect("unmounted")
    # Unmounted, and no root any more (dropped above): now it is garbage.
    done = _gc()
    assert before <= set(done["manifests_deleted"])  # type: ignore[arg-type]
    assert not _pkg_manifests(store)


def test_an_unseen_root_is_kept_for_the_retention_period(namespace: Namespace) -> None:
    namespace.expect("mounted")
    store = Store()
    before = _pkg_manifests(store)
    namespace.go()
    namespace.expect("imported")
    namespace.go()
    namespace.expect("unmounted")  # gone from every namespace; its root stays
    kept = _gc()
    (unseen,) = kept["unseen_roots"]  # type: ignore[misc]
    assert unseen["kept_until"] > unseen["last_used"]
    assert kept["manifests_deleted"] == [] and _pkg_manifests(store) == before
    assert _gc("--retention", "30d")["manifests_deleted"] == []
    bad = cowfs("store", "gc", "--retention", "soon", check=False)
    assert bad.returncode == 2 and "bad retention" in bad.stderr
    done = _gc("--retention", "0")
    assert len(done["dead_roots"]) == 1 and "unused for" in str(done["dead_reasons"])
    assert before <= set(done["manifests_deleted"])  # type: ignore[arg-type]
    assert not any(store.roots.glob("*.json"))


def test_a_read_only_store_serves_what_it_holds_and_its_mounts_are_leased(
        tmp_path: Path, wheels: Path, venvs: Callable[[str], Path]) -> None:
    a = venvs("A")
    install(a, wheels)  # the host seeds the store, then drops its venv
    unmount_venv(a)
    shutil.rmtree(a)
    store = Store()
    seeded = _pkg_manifests(store)
    registered = set(store.roots.glob("*.json"))  # A's, dead: collected by the gc below
    new = tmp_path / "new"
    new.mkdir()
    build(new, {"newpkg/__init__.py": b"V = 1\n"}, name="newpkg", meta_extra="")
    ns = Namespace(tmp_path, wheels, new_wheels=new)
    try:
        said = ns.expect("mounted")
        (line,) = said  # the new distribution: one line, nothing installed
        assert line.startswith("cowfs: error: the store") and "read-only" in line
        assert "newpkg==1.0" in line
        assert set(store.roots.glob("*.json")) == registered  # a read-only store: no root
        done = _gc()  # only the mount's lease protects it now
        assert set(done["manifests_in_use"]) >= seeded  # type: ignore[arg-type]
        assert done["objects_deleted"] == 0  # its venv-local objects too (leased)
        ns.go()
        assert UDDER in "\n".join(ns.expect("imported"))
        ns.go()
        ns.expect("unmounted")
    finally:
        ns.close()
    assert seeded <= set(_gc()["manifests_deleted"])  # type: ignore[arg-type]
