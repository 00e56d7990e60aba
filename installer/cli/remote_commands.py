"""`cowfs store remote add|list|remove`, `cowfs store push`, `cowfs store pull`: the command
line only; the logic lives in cowfs.store.remote and installer.resolve.remote_install."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cowfs.errors import CowfsError
from cowfs.mount.spec import VenvState
from cowfs.store.remote import config
from cowfs.store.remote.pull import RemoteDist, materialize, read_origin
from cowfs.store.remote.push import PushSummary, push
from cowfs.store.store import Store
from installer.cli.maintenance_commands import plural, store_group
from installer.venv.venv import find_venv


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@store_group.group("remote")
def remote_group() -> None:
    """Name the remotes this store pushes to and installs from."""


@remote_group.command("add")
@click.argument("name")
@click.argument("url")
def remote_add_cmd(name: str, url: str) -> None:
    """Add a remote: https://..., http://..., s3://BUCKET/PREFIX or a directory."""
    if "://" not in url and url:
        url = str(Path(url).expanduser().absolute())  # a directory: valid from anywhere
    remote = config.add(Store(), name, url)
    click.echo(f"added remote {remote.label}")


@remote_group.command("remove")
@click.argument("name")
def remote_remove_cmd(name: str) -> None:
    """Forget a remote (nothing on it or in the store is deleted)."""
    remote = config.remove(Store(), name)
    click.echo(f"removed remote {remote.label}")


@remote_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def remote_list_cmd(as_json: bool) -> None:
    """The configured remotes, in the order installs try them."""
    remotes = config.load(Store())
    if as_json:
        click.echo(json.dumps([{"name": r.name, "url": r.url} for r in remotes]))
        return
    if not remotes:
        click.echo("no remotes (add one: cowfs store remote add NAME URL)")
    for r in remotes:
        click.echo(f"{r.name}\t{r.url}")


@store_group.command("push")
@click.argument("remote", required=False)
@click.option("--dry-run", "-n", is_flag=True, help="Say what would be uploaded, upload nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
def push_cmd(remote: str | None, dry_run: bool, as_json: bool) -> None:
    """Upload the distributions (manifests, compiled layers, objects) a remote lacks.
    REMOTE: a configured name, a URL, or a directory to be served by a web server."""
    store = Store()
    if not store.exists():
        raise CowfsError(f"no store at {store.root}: nothing to push")
    target = config.for_push(store, remote)
    tty = sys.stderr.isatty() and not as_json

    def progress(s: PushSummary, i: int, n: int) -> None:
        sys.stderr.write(f"\r\x1b[Kcowfs: pushing {i + 1}/{n} distributions, "
                         f"{s.objects} objects ({_mb(s.bytes)})")

    summary = push(store, target, dry_run=dry_run, progress=progress if tty else None)
    if tty:
        sys.stderr.write("\n")
    if as_json:
        click.echo(json.dumps(summary.to_json()))
        return
    verb = "would push" if dry_run else "pushed"
    click.echo(f"{verb} {plural(len(summary.dists), 'distribution')} "
               f"({plural(summary.objects, 'object')}, {_mb(summary.bytes)}) to "
               f"{summary.remote}; {plural(summary.present, 'distribution')} and "
               f"{plural(summary.objects_present, 'object')} were there already")


@store_group.command("pull")
@click.argument("lock", required=False, type=click.Path())
@click.option("--venv", "venv_opt", type=click.Path(), help="The venv (default: as install).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
def pull_cmd(lock: str | None, venv_opt: str | None, as_json: bool) -> None:
    """Fetch ahead of time everything the venv's distributions need (or, with LOCK, what a
    lock file pins, for the venv's interpreter) from the remotes into the store."""
    state = VenvState.load(find_venv(venv_opt))
    store = Store(state.store)
    dists = _lock_dists(state, store, Path(lock)) if lock else _venv_dists(state, store)
    with store.lock():
        count, size = materialize(store, dists)
    if as_json:
        click.echo(json.dumps({"distributions": len(dists), "objects": count, "bytes": size}))
        return
    click.echo(f"pulled {count} objects ({_mb(size)}) for {len(dists)} distributions")


def _venv_dists(state: VenvState, store: Store) -> list[RemoteDist]:
    """The venv's distributions that a lazy install left partly on their remote (the one
    recorded at install time: no configuration needed)."""
    from cowfs.store.gc import manifest_rows
    from cowfs.store.manifest import read_manifest

    out = []
    for ident in state.dists:
        origin = read_origin(store, ident)
        if origin is None:
            continue  # not from a remote: its objects came with it
        m = read_manifest(store, ident)
        if not all(store.has(fe.digest) for fe in manifest_rows(m)):
            remote = config.Remote(origin[0], origin[0])
            out.append(RemoteDist(remote, remote.open(), m, origin[1]))
    return out


def _lock_dists(state: VenvState, store: Store, lock: Path) -> list[RemoteDist]:
    from installer.interpreters import query_interpreter
    from installer.resolve.locks import read_lock
    from installer.resolve.remote_install import prepare

    if not config.for_reading(store):
        raise CowfsError("no remote configured: `cowfs store remote add NAME URL` "
                         f"or ${config.ENV}")
    if not lock.is_file():
        raise CowfsError(f"lock file {lock} not found")
    info = query_interpreter(state.python, store)
    pins = read_lock(lock, markers=info.markers, supported_tags=info.tags)
    rest, prepared = prepare(store, pins, info.tags)
    if rest:
        raise CowfsError("not on any remote (by the lock's hashes): "
                         + ", ".join(f"{p.name}=={p.version}" for p in rest))
    return list(prepared.remote.values())


COMMANDS: list[click.Command] = []  # all of them hang off `cowfs store`
