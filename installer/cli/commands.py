"""`cowfs venv`, `cowfs install`, `cowfs uninstall`, `cowfs sync`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cowfs.errors import CowfsError
from cowfs.mount.spec import VenvState
from cowfs.store.store import Store
from installer.interpreters import query_interpreter
from installer.resolve import remote_install
from installer.resolve.locks import locate, read_lock
from installer.resolve.prefetch import Prefetch
from installer.venv import sync
from installer.venv.venv import create_venv, ensure_mounted, find_venv


def _report(summary: sync.Summary, as_json: bool, quiet: bool, verb: str) -> None:
    if as_json:
        click.echo(json.dumps(summary.to_json()))
        return
    if quiet:
        return
    for name, version in summary.removed:
        click.echo(f" - {name}=={version}")
    for name, version in summary.installed:
        click.echo(f" + {name}=={version}")
    n = len(summary.installed) if verb != "Uninstalled" else len(summary.removed)
    click.echo(f"{verb} {n} package{'s' if n != 1 else ''} in {summary.seconds:.2f}s"
               + (f" ({summary.unchanged} unchanged)" if summary.unchanged else ""))


def _state(venv_opt: str | None) -> tuple[VenvState, Store]:
    venv = find_venv(venv_opt)
    state = VenvState.load(venv)
    ensure_mounted(state)
    return state, Store(state.store)


@click.command("venv")
@click.argument("path", default=".venv", type=click.Path())
@click.option("--python", "-p", "python", help="Interpreter to base the venv on.")
def venv_cmd(path: str, python: str | None) -> None:
    """Create a venv whose site-packages is a cowfs mount (default: .venv)."""
    store = Store()  # create_venv makes it once the interpreter is known to be good
    state, how = create_venv(Path(path), python, store)
    click.echo(f"venv {state.venv}: site-packages {how} ({state.site_packages})")
    click.echo(f"activate with: source {state.venv}/bin/activate")


_install_options = [
    click.option("--venv", "venv_opt", type=click.Path(), help="Target venv."),
    click.option("--find-links", "-f", multiple=True, help="Directory or URL of wheels."),
    click.option("--no-index", is_flag=True, help="Ignore the package index."),
    click.option("--index-url", "-i", help="Base URL of the package index."),
    click.option("--extra-index-url", "extra_index_urls", multiple=True,
                 help="Extra index URL (also from pip.conf, PIP_/UV_ variables)."),
    click.option("--offline", is_flag=True, help="No network at all."),
    click.option("--quiet", "-q", is_flag=True, help="No progress or listing."),
    click.option("--json", "as_json", is_flag=True, help="Print a JSON summary."),
    click.option("--no-compile", is_flag=True,
                 help="Do not compile shared bytecode into the store."),
]


def install_options(fn):  # type: ignore[no-untyped-def]
    for option in reversed(_install_options):
        fn = option(fn)
    return fn


@click.command("install")
@click.argument("requirements", nargs=-1)
@click.option("-r", "--requirement", "req_files", multiple=True, type=click.Path(),
              help="Requirements file.")
@install_options
def install_cmd(requirements: tuple[str, ...], req_files: tuple[str, ...], venv_opt: str | None,
                find_links: tuple[str, ...], no_index: bool, index_url: str | None,
                extra_index_urls: tuple[str, ...], offline: bool, quiet: bool, as_json: bool,
                no_compile: bool) -> None:
    """Install packages into a cowfs venv (resolution by uv or pip, files by reference)."""
    if not requirements and not req_files:
        raise CowfsError("nothing to install: give requirements or -r FILE")
    for f in req_files:
        if not Path(f).is_file():
            raise CowfsError(f"requirements file {f} not found")
    state, store = _state(venv_opt)
    info = query_interpreter(state.python, store)
    request = sync.Request(requirements=requirements,
                           requirement_files=[Path(f) for f in req_files],
                           find_links=find_links, no_index=no_index, offline=offline,
                           index_url=index_url, extra_index_urls=extra_index_urls,
                           quiet=quiet or as_json)
    # Wheels are downloaded and ingested while uv resolves; the store lock it takes is held
    # until apply has recorded the venv's new state.
    with Prefetch(store, info) as prefetch:
        pins, how = sync.plan(request, info, store, Path(state.python), prefetch)
        _, prepared = remote_install.prepare(store, pins, info.tags, offline=offline)
        summary = sync.apply(state, store, info, pins, exact=False, quiet=quiet or as_json,
                             resolver=how, compile_bytecode=not no_compile,
                             prepared=prepared, ingestor=prefetch.ingest)
    _report(summary, as_json, quiet, "Installed")


@click.command("uninstall")
@click.argument("names", nargs=-1, required=True)
@click.option("--venv", "venv_opt", type=click.Path(), help="Target venv.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def uninstall_cmd(names: tuple[str, ...], venv_opt: str | None, as_json: bool) -> None:
    """Remove distributions from a cowfs venv."""
    state, store = _state(venv_opt)
    _report(sync.uninstall(state, store, names), as_json, False, "Uninstalled")


@click.command("sync")
@click.argument("lock", type=click.Path())
@install_options
def sync_cmd(lock: str, venv_opt: str | None, find_links: tuple[str, ...], no_index: bool,
             index_url: str | None, extra_index_urls: tuple[str, ...], offline: bool,
             quiet: bool, as_json: bool, no_compile: bool) -> None:
    """Make the venv hold exactly what LOCK pins (pinned requirements, pylock.toml, or a uv
    project's uv.lock: its dependencies and default groups for this venv's interpreter,
    and the project itself editable, installed by uv, as `uv sync` would)."""
    if not Path(lock).is_file():
        raise CowfsError(f"lock file {lock} not found")
    state, store = _state(venv_opt)
    info = query_interpreter(state.python, store)
    editables: dict[str, Path] = {}
    if Path(lock).name == "uv.lock":
        from installer.resolve import uv_lock

        ul = uv_lock.read_uv_lock(Path(lock), info.markers, info.tags)
        pins, editables = ul.pins, ul.editables
    else:
        pins = read_lock(Path(lock), markers=info.markers, supported_tags=info.tags)
    # What the store or a remote holds by the lock's hashes needs no index and no wheel.
    rest, prepared = remote_install.prepare(store, pins, info.tags, offline=offline)
    located = locate(rest, Path(state.python), [str(store.wheels), *find_links],
                     no_index=no_index, supported_tags=info.tags, index_url=index_url,
                     offline=offline)
    pins = [*located, *(p for p in pins if p not in rest)]
    summary = sync.apply(state, store, info, pins, exact=True, quiet=quiet or as_json,
                         resolver="lock", compile_bytecode=not no_compile,
                         keep=list(editables), prepared=prepared)
    for name, project in editables.items():
        if not uv_lock.editable_installed(state.site_packages, name, project):
            index_args = [*(a for f in find_links for a in ("--find-links", f)),
                          *(["--no-index"] if no_index else []),
                          *(["--index-url", index_url] if index_url else []),
                          *(["--offline"] if offline else [])]
            uv_lock.install_editable(Path(state.python), project, index_args)
            with sync.venv_lock(state.venv):
                sync.refresh_state(state)
                sync.absorb_foreign(state, store, not no_compile)
            summary.installed.append((name, "editable"))
    _report(summary, as_json, quiet, "Synced")


COMMANDS = [venv_cmd, install_cmd, uninstall_cmd, sync_cmd]
