"""Remotes on real engines: two stores on one machine play two hosts. Host 1 installs the
real wheel and pushes its store (to a directory served by nginx, to moto's S3 server); host
2 installs from the remote with no index and no wheel, every object sha256-checked. Faults
(unreachable, 503, truncated, corrupt, missing, a manifest for another wheel) end in one
error line with the venv unchanged and nothing unverified kept."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import xxhash

from cowfs.mount.spec import VenvState
from cowfs.store.gc import manifest_rows
from cowfs.store.manifest import iter_manifests, read_manifest
from cowfs.store.remote.push import publishable
from cowfs.store.store import Store
from tests.conftest import EDITED, PKG, UDDER, cow, cowfs, one_line_error, serving, unmount_venv
from tests.remote_servers import FaultServer, free_port, moto_s3, nginx


@dataclass
class Host:
    """One store and one venv: what a machine of the fleet has."""

    store: Store
    venv: Path
    env: dict[str, str]

    def run(self, *args: str, check: bool = True, **env: str) -> Any:
        return cowfs(*args, check=check, env={**self.env, **env})

    def state(self) -> bytes:
        return VenvState.path_for(self.venv).read_bytes()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Callable[..., Host]]:
    made: list[Path] = []

    def make(name: str, **extra: str) -> Host:
        env = {**os.environ, "COWFS_HOME": str(tmp_path / name / "store"), **extra}
        env.pop("COWFS_REMOTE", None)
        venv = tmp_path / name / ".venv"
        made.append(venv)
        cowfs("venv", str(venv), env=env)
        return Host(Store(env["COWFS_HOME"]), venv, env)

    try:
        yield make
    finally:
        for venv in made:
            unmount_venv(venv)


@pytest.fixture
def host1(hosts: Callable[[str], Host], wheels: Path) -> Host:
    h = hosts("host1")
    h.run("install", "--venv", str(h.venv), PKG, "--no-index", "--find-links", str(wheels),
          "-q")
    return h


@pytest.fixture
def lock(tmp_path: Path, wheels: Path) -> Path:
    """A hashed lock of PKG: what host 2 trusts the remote's manifest by."""
    wheel = next(wheels.glob("pycowsay-0.0.0.2-*.whl"))
    path = tmp_path / "requirements.lock"
    path.write_text(f"{PKG} --hash=sha256:{hashlib.sha256(wheel.read_bytes()).hexdigest()}\n")
    return path


def dist_of(store: Store) -> str:
    [ident] = publishable(store)  # the wheel's manifest (not its shared bytecode's)
    return ident


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in root.rglob("*") if p.is_file()}


def test_remote_commands_and_bad_input(tmp_path: Path) -> None:
    assert "no remotes" in cowfs("store", "remote", "list").stdout
    cowfs("store", "remote", "add", "origin", "https://cdn.example/cowfs")
    cowfs("store", "remote", "add", "bucket", "s3://b/prefix")
    cowfs("store", "remote", "add", "dir", str(tmp_path / "r"))
    listed = json.loads(cowfs("store", "remote", "list", "--json").stdout)
    assert listed == [{"name": "origin", "url": "https://cdn.example/cowfs"},
                      {"name": "bucket", "url": "s3://b/prefix"},
                      {"name": "dir", "url": str(tmp_path / "r")}]
    store = Store()
    before = (store.root / "remotes.json").read_bytes()
    for args, text in [
        (("add", "origin", "https://other"), "remote 'origin' exists already"),
        (("add", "-bad", "https://x"), "No such option"),
        (("add", "a/b", "https://x"), "bad remote name 'a/b'"),
        (("add", "x", "ftp://host/p"), "bad remote URL 'ftp://host/p'"),
        (("add", "x", "http://"), "bad remote URL 'http://'"),
        (("add", "x", "s3://"), "bad remote URL 's3://'"),
        (("remove", "nope"), "no remote named 'nope'"),
    ]:
        proc = cowfs("store", "remote", *args, check=False)
        if text == "No such option":
            assert proc.returncode == 2
        else:
            one_line_error(proc, text)
    assert (store.root / "remotes.json").read_bytes() == before
    one_line_error(cowfs("store", "push", check=False), "name the remote to push to")
    one_line_error(cowfs("store", "push", "nope", check=False), "no remote named 'nope'")
    one_line_error(cowfs("store", "push", "origin", check=False),
                   "read-only over HTTP: push to the directory")
    cowfs("store", "remote", "remove", "origin")
    cowfs("store", "remote", "remove", "bucket")
    assert json.loads(cowfs("store", "remote", "list", "--json").stdout) == [
        {"name": "dir", "url": str(tmp_path / "r")}]
    (store.root / "remotes.json").write_text("{not json")
    one_line_error(cowfs("store", "remote", "list", check=False), "unreadable remote list")


def test_push_to_a_directory_is_complete_and_idempotent(host1: Host, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    out = host1.run("store", "push", str(remote), "--dry-run").stdout
    assert out.startswith("would push 1 distribution (11 objects"), out
    assert not remote.exists()
    out = host1.run("store", "push", str(remote)).stdout
    assert out.startswith("pushed 1 distribution (11 objects"), out
    ident = dist_of(host1.store)
    manifest = read_manifest(host1.store, ident)
    assert json.loads((remote / "cowfs-remote.json").read_text()) == {"format": 1}
    assert (remote / "dists" / f"{ident}.json").read_bytes() == \
        (host1.store.dists / f"{ident}.json").read_bytes()
    assert (remote / "dists" / f"{ident}.layer").is_file()
    trust = json.loads((remote / "dists" / f"{ident}.sha256").read_text())
    for fe in manifest_rows(manifest):
        data = (remote / "objects" / fe.digest[:2] / fe.digest[2:]).read_bytes()
        assert xxhash.xxh3_128_hexdigest(data) == fe.digest
        assert trust["objects"][fe.digest] == hashlib.sha256(data).hexdigest()
    assert not [p for p in remote.rglob(".*")]  # no temporary file left
    before = tree(remote)
    out = json.loads(host1.run("store", "push", str(remote), "--json").stdout)
    assert out["pushed"] == [] and out["present"] == 1 and out["objects"] == 0
    after = tree(remote)
    assert {k: v for k, v in after.items() if k != "cowfs-remote.json"} == \
        {k: v for k, v in before.items() if k != "cowfs-remote.json"}
    # Many hosts at once onto one empty remote: every push succeeds, one complete copy.
    shared = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, "-m", "cowfs", "store", "push", str(shared)],
                              env=host1.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(3)]
    assert [p.wait(60) for p in procs] == [0, 0, 0], [p.stderr.read() for p in procs if p.stderr]
    assert tree(shared).keys() == after.keys()
    assert all((shared / k).read_bytes() == (remote / k).read_bytes() for k in after)


def test_host2_syncs_from_nginx_without_index_or_wheel(
        host1: Host, hosts: Callable[[str], Host], lock: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    host1.run("store", "remote", "add", "fleet", str(remote))
    host1.run("store", "push")
    host2 = hosts("host2")
    with nginx(remote, tmp_path / "nginx") as url:
        host2.run("store", "remote", "add", "origin", url)
        started = time.perf_counter()
        host2.run("sync", str(lock), "--venv", str(host2.venv), "--no-index",
                  COWFS_REMOTE_FETCH="eager")
        seconds = time.perf_counter() - started
        log = (tmp_path / "nginx" / "access.log").read_text()
    print(f"host 2 sync from nginx: {seconds:.2f} s")
    assert cow(host2.venv) == UDDER
    ident = dist_of(host1.store)
    assert dist_of(host2.store) == ident
    assert not list(host2.store.wheels.iterdir())  # no wheel was needed
    assert f"GET /dists/{ident}.json" in log and "GET /objects/" in log
    assert {fe.digest for fe in manifest_rows(read_manifest(host1.store, ident))} <= \
        {d for d, _ in host2.store.iter_objects()}
    verify = host2.run("store", "verify", "--json")
    assert json.loads(verify.stdout)["ok"]
    # Now in host 2's store: another venv needs no remote at all (it is unreachable).
    third = host2.venv.parent / "other" / ".venv"
    host2.run("venv", str(third))
    try:
        host2.run("sync", str(lock), "--venv", str(third), "--no-index",
                  COWFS_REMOTE=f"http://127.0.0.1:{free_port()}")
        assert cow(third) == UDDER
        # The two-projects scenario on host 2: an edit in one venv stays in it.
        main = VenvState.load(host2.venv).site_packages / "pycowsay" / "main.py"
        main.write_text(main.read_text().replace(UDDER, EDITED))
        assert cow(host2.venv) == EDITED and cow(third) == UDDER
        assert json.loads(host2.run("store", "verify", "--json").stdout)["ok"]
    finally:
        unmount_venv(third)
    out = host2.run("store", "pull", "--venv", str(host2.venv)).stdout
    assert out.startswith("pulled 0 objects"), out


def test_pull_a_lock_ahead_then_sync_offline(
        host1: Host, hosts: Callable[[str], Host], lock: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    host1.run("store", "push", str(remote))
    host2 = hosts("host2")
    host2.run("store", "remote", "add", "origin", str(remote))
    out = host2.run("store", "pull", str(lock), "--venv", str(host2.venv)).stdout
    assert out.startswith("pulled 11 objects"), out
    assert VenvState.load(host2.venv).dists == []  # the venv is not changed by a pull
    shutil.rmtree(remote)  # from now on nothing outside is reachable
    host2.run("sync", str(lock), "--venv", str(host2.venv), "--offline")
    assert cow(host2.venv) == UDDER
    assert json.loads(host2.run("store", "verify", "--json").stdout)["on_remote"] == 0


def test_s3_push_from_host1_install_on_host2(
        host1: Host, hosts: Callable[[str], Host], lock: Path, tmp_path: Path) -> None:
    import boto3

    host2 = hosts("host2")
    with moto_s3(tmp_path / "moto") as aws:
        s3 = boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket="fleet")
        url = "s3://fleet/cowfs/v1"
        out = host1.run("store", "push", url, **aws).stdout
        assert out.startswith("pushed 1 distribution (11 objects"), out
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="fleet")["Contents"]}
        ident = dist_of(host1.store)
        assert {f"cowfs/v1/dists/{ident}.json", f"cowfs/v1/dists/{ident}.sha256",
                "cowfs/v1/cowfs-remote.json"} <= keys
        assert len([k for k in keys if k.startswith("cowfs/v1/objects/")]) == 11
        again = json.loads(host1.run("store", "push", url, "--json", **aws).stdout)
        assert again["pushed"] == [] and again["objects"] == 0
        # The daemon fetches lazily: it needs the AWS configuration too (here: variables).
        host2.run("umount", str(host2.venv))
        host2.run("mount", str(host2.venv), **aws)
        host2.run("sync", str(lock), "--venv", str(host2.venv), "--no-index",
                  COWFS_REMOTE=url, **aws)
        assert cow(host2.venv) == UDDER
        one_line_error(host2.run("store", "push", "s3://no-such-bucket/x", check=False, **aws),
                       "NoSuchBucket")
    assert dist_of(host2.store) == ident


@pytest.fixture
def faulty(host1: Host, tmp_path: Path) -> Iterator[tuple[FaultServer, Path, str]]:
    remote = tmp_path / "remote"
    host1.run("store", "push", str(remote))
    ident = dist_of(host1.store)
    with FaultServer(remote).running() as srv:
        yield srv, remote, ident


def test_faults_are_one_line_and_change_nothing(
        faulty: tuple[FaultServer, Path, str], hosts: Callable[[str], Host],
        lock: Path) -> None:
    srv, remote, ident = faulty
    host2 = hosts("host2")
    state = host2.state()
    manifest = json.loads((remote / "dists" / f"{ident}.json").read_text())
    big = max(manifest["files"], key=lambda r: r[2])[1]  # pycowsay's main module
    big_key = f"objects/{big[:2]}/{big[2:]}"
    big_path = remote / big_key
    good = big_path.read_bytes()

    def refused(text: str, url: str = srv.url, timeout: str = "30") -> None:
        proc = host2.run("sync", str(lock), "--venv", str(host2.venv), "--no-index",
                         check=False, COWFS_REMOTE=url, COWFS_REMOTE_FETCH="eager",
                         COWFS_REMOTE_TIMEOUT=timeout)
        one_line_error(proc, text)
        assert host2.state() == state
        assert not iter_manifests(host2.store)
        assert not host2.store.has(big)

    refused("Connection refused", f"http://127.0.0.1:{free_port()}")
    one_line_error(host2.run("sync", str(lock), "--venv", str(host2.venv), "--no-index",
                             check=False, COWFS_REMOTE=srv.url, COWFS_REMOTE_FETCH="sometimes"),
                   "$COWFS_REMOTE_FETCH must be lazy or eager, not 'sometimes'")
    srv.stall[big_key] = 1.0  # slower than the timeout: retried, then one line
    refused(f"{big_key}: timed out (after 4 attempts)", timeout="0.3")
    srv.stall.clear()
    srv.requests.clear()
    srv.truncate.add(big_key)
    refused("connection closed after")
    assert srv.requests.count(big_key) == 4  # retried with backoff
    srv.truncate.clear()
    big_path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    refused("content does not match its sha256")
    big_path.unlink()
    refused(f"{big_key} is missing")
    big_path.write_bytes(good)
    shutil.copy(remote / "dists" / f"{ident}.json", remote / "saved.json")
    (remote / "dists" / f"{ident}.json").write_text(json.dumps(
        {**manifest, "wheel_sha256": "0" * 64}))
    refused("names another wheel")
    shutil.copy(remote / "saved.json", remote / "dists" / f"{ident}.json")
    # 503 twice, then the file: retried, installed.
    srv.requests.clear()
    srv.fail[big_key] = 2
    host2.run("sync", str(lock), "--venv", str(host2.venv), "--no-index", COWFS_REMOTE=srv.url,
              COWFS_REMOTE_FETCH="eager")
    assert srv.requests.count(big_key) == 3
    assert cow(host2.venv) == UDDER
    assert json.loads(host2.run("store", "verify", "--json").stdout)["ok"]


def test_install_resolves_on_the_index_and_takes_files_from_the_remote(
        host1: Host, hosts: Callable[[str], Host], wheels: Path, tmp_path: Path) -> None:
    """An index that lists the wheel but cannot serve it: the remote's manifest does."""
    from tests.test_install_network import Index

    remote = tmp_path / "remote"
    host1.run("store", "push", str(remote))
    index = Index([next(wheels.glob("pycowsay-0.0.0.2-*.whl"))])
    index.broken = {w for w in index.files}
    host2 = hosts("host2")
    env = {k: v for k, v in host2.env.items() if not k.startswith(("UV_", "PIP_"))}
    env.update(PIP_CONFIG_FILE=os.devnull, UV_CACHE_DIR=str(tmp_path / "uv-cache"),
               UV_NO_CONFIG="1", COWFS_REMOTE=str(remote))
    with serving(index.httpd):
        cowfs("install", "--venv", str(host2.venv), PKG, "--index-url", index.url, env=env)
    assert cow(host2.venv) == UDDER
    assert not list(host2.store.wheels.iterdir())


# -- lazy installs: objects fetched by the mount daemon on first read ----------------------


@pytest.fixture
def lazy_host2(faulty: tuple[FaultServer, Path, str], hosts: Callable[[str], Host],
               lock: Path) -> tuple[Host, FaultServer, Path, Any]:
    """Host 2 synced lazily from the fault server: only RECORD and data files fetched, and
    (its daemon mounted with COWFS_REMOTE_PREFETCH=0) each other object only when opened."""
    srv, remote, ident = faulty
    host2 = hosts("host2", COWFS_REMOTE_PREFETCH="0")  # the daemon mounts with it
    host2.run("sync", str(lock), "--venv", str(host2.venv), "--no-index", COWFS_REMOTE=srv.url)
    return host2, srv, remote, read_manifest(host2.store, ident)


def test_a_first_fetch_prefetches_the_rest_of_its_distribution(
        faulty: tuple[FaultServer, Path, str], hosts: Callable[[str], Host],
        lock: Path) -> None:
    """Fetching each file only when opened, one after the other, made a first import slow:
    the first fetch in a package directory now fetches the directory's other files in the
    background, once each, without the open waiting for them; other directories (the
    dist-info here) are left to their own opens."""
    srv, remote, ident = faulty
    host2 = hosts("host2")
    host2.run("sync", str(lock), "--venv", str(host2.venv), "--no-index", COWFS_REMOTE=srv.url)
    files = {fe.path: fe.digest for fe in read_manifest(host2.store, ident).files}
    lazy = [d for p, d in files.items() if p.startswith("pycowsay/") and not host2.store.has(d)]
    elsewhere = [d for p, d in files.items() if not p.startswith("pycowsay/")
                 and not host2.store.has(d)]
    assert files["pycowsay/main.py"] in lazy and len(lazy) >= 2 and elsewhere
    other = files["pycowsay/__main__.py"]
    srv.stall[key_of(other)] = 3.0  # a slow prefetch does not hold up the open
    srv.requests.clear()
    site = VenvState.load(host2.venv).site_packages
    started = time.monotonic()
    data = (site / "pycowsay/main.py").read_bytes()
    assert time.monotonic() - started < 2.5
    assert data == (remote / key_of(files["pycowsay/main.py"])).read_bytes()
    deadline = time.monotonic() + 20
    while not all(host2.store.has(d) for d in lazy) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [d for d in lazy if not host2.store.has(d)] == []
    assert sorted(srv.requests) == sorted(key_of(d) for d in set(lazy))  # each once
    assert cow(host2.venv) == UDDER and not srv.requests[len(lazy):]
    assert not any(host2.store.has(d) for d in elsewhere)


def key_of(digest: str) -> str:
    return f"objects/{digest[:2]}/{digest[2:]}"


def test_lazy_install_fetches_each_object_on_first_read_without_blocking_others(
        lazy_host2: tuple[Host, FaultServer, Path, Any]) -> None:
    host2, srv, remote, manifest = lazy_host2
    files = {fe.path: fe.digest for fe in manifest.files}
    main, meta = files["pycowsay/main.py"], files["pycowsay-0.0.0.2.dist-info/METADATA"]
    record = files["pycowsay-0.0.0.2.dist-info/RECORD"]
    assert host2.store.has(record) and not host2.store.has(main)
    assert all(host2.store.has(fe.digest) for rows in manifest.data.values() for fe in rows)
    verify = json.loads(host2.run("store", "verify", "--json").stdout)
    assert verify["ok"] and verify["on_remote"] >= 5, verify
    site = VenvState.load(host2.venv).site_packages
    srv.stall[key_of(main)] = 2.0
    srv.requests.clear()
    got: dict[str, bytes] = {}
    slow = threading.Thread(target=lambda: got.update(main=(site / "pycowsay/main.py")
                                                      .read_bytes()))
    started = time.monotonic()
    slow.start()
    time.sleep(0.3)  # the first read of main.py is waiting on the remote now
    meta_bytes = (site / "pycowsay-0.0.0.2.dist-info/METADATA").read_bytes()
    listing = sorted(os.listdir(site / "pycowsay"))
    other = time.monotonic() - started
    slow.join(10)
    assert other < 1.5, f"another file's first read waited {other:.2f} s for main.py's"
    assert time.monotonic() - started >= 2.0
    assert got["main"] == (remote / key_of(main)).read_bytes()
    assert meta_bytes == (remote / key_of(meta)).read_bytes()
    assert listing == ["__init__.py", "__main__.py", "main.py"]
    assert srv.requests.count(key_of(main)) == 1
    assert host2.store.has(main) and host2.store.has(meta)
    assert cow(host2.venv) == UDDER
    # A first write copies up: the object is fetched for it, the store object stays intact.
    main_py = site / "pycowsay/__main__.py"
    main_obj = files["pycowsay/__main__.py"]
    assert not host2.store.has(main_obj)
    with open(main_py, "a") as f:
        f.write("# edited\n")
    assert main_py.read_bytes() == (remote / key_of(main_obj)).read_bytes() + b"# edited\n"
    assert host2.store.object_path(main_obj).read_bytes() == \
        (remote / key_of(main_obj)).read_bytes()
    # Everything else ahead of time (offline use), then nothing is left on the remote.
    out = host2.run("store", "pull", "--venv", str(host2.venv)).stdout
    assert out.startswith("pulled "), out
    verify = json.loads(host2.run("store", "verify", "--json").stdout)
    assert verify["ok"] and verify["on_remote"] == 0, verify
    assert all(host2.store.has(d) for d in files.values())


def test_lazy_read_of_an_unfetchable_file_is_eio_and_nothing_else_breaks(
        lazy_host2: tuple[Host, FaultServer, Path, Any]) -> None:
    host2, _, remote, manifest = lazy_host2
    files = {fe.path: fe.digest for fe in manifest.files}
    meta, wheel = files["pycowsay-0.0.0.2.dist-info/METADATA"], \
        files["pycowsay-0.0.0.2.dist-info/WHEEL"]
    site = VenvState.load(host2.venv).site_packages
    log = Path(VenvState.load(host2.venv).mount_spec().log)
    saved = (remote / key_of(meta)).read_bytes()
    (remote / key_of(meta)).unlink()
    good = (remote / key_of(wheel)).read_bytes()
    (remote / key_of(wheel)).write_bytes(good.replace(b"Wheel", b"Whee!"))
    for name in ("METADATA", "WHEEL"):
        with pytest.raises(OSError) as caught:
            (site / f"pycowsay-0.0.0.2.dist-info/{name}").read_bytes()
        assert caught.value.errno == errno.EIO
    with pytest.raises(OSError):  # at once again: no retry storm, no second log line
        (site / "pycowsay-0.0.0.2.dist-info/METADATA").read_bytes()
    lines = [ln for ln in log.read_text().splitlines() if "cannot fetch" in ln]
    assert len(lines) == 2, lines
    assert "dist-info/METADATA" in lines[0] and "is missing" in lines[0]
    assert "dist-info/WHEEL" in lines[1] and "does not match its sha256" in lines[1]
    assert not host2.store.has(meta) and not host2.store.has(wheel)  # nothing unverified
    assert cow(host2.venv) == UDDER  # everything else works
    (remote / key_of(meta)).write_bytes(saved)
    time.sleep(2.2)  # RETRY_AFTER_S: then the next read tries again
    assert (site / "pycowsay-0.0.0.2.dist-info/METADATA").read_bytes() == saved


def test_concurrent_first_opens_share_one_fetch(
        lazy_host2: tuple[Host, FaultServer, Path, Any]) -> None:
    import trio

    from cowfs.store.remote.lazy import LazyObjects

    host2, srv, remote, manifest = lazy_host2
    main = next(fe.digest for fe in manifest.files if fe.path == "pycowsay/main.py")
    srv.stall[key_of(main)] = 0.5
    srv.requests.clear()
    lazy = LazyObjects(host2.store)
    source = str(host2.store.object_path(main))
    results: list[bool] = []

    async def opens() -> None:
        async def one() -> None:
            results.append(await lazy.fetch(source, "pycowsay/main.py"))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)

    trio.run(opens)
    assert results == [True] * 8
    assert srv.requests.count(key_of(main)) == 1
    assert (host2.store.object_path(main)).read_bytes() == (remote / key_of(main)).read_bytes()
    stray = host2.store.object_path("0" * 32)  # not a lazily installed object: not fetched
    assert trio.run(lazy.fetch, str(stray), "x") is False


def test_gc_keeps_a_lazy_install_and_drops_its_origin_with_it(
        lazy_host2: tuple[Host, FaultServer, Path, Any]) -> None:
    host2, _, _, manifest = lazy_host2
    origin = host2.store.dists / f"{manifest.id}.remote"
    assert origin.is_file()
    host2.run("store", "gc")
    assert origin.is_file() and (host2.store.dists / f"{manifest.id}.json").is_file()
    assert cow(host2.venv) == UDDER  # fetched after the gc: nothing it needs was dropped
    host2.run("uninstall", "--venv", str(host2.venv), "pycowsay")
    host2.run("store", "gc")
    assert not origin.exists() and not (host2.store.dists / f"{manifest.id}.json").exists()
    assert not any(host2.store.has(fe.digest) for fe in manifest.files if fe.size > 100)
