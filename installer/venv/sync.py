"""Desired set of distributions vs installed set -> new venv state -> live reload.

Installing never copies package files into the venv: wheels are ingested into the store once,
the venv's state lists distribution ids, and the mount daemon swaps in a new lower layer.
A warm install therefore costs O(distributions), not O(files). Only per-venv files (console
scripts with this venv's interpreter in their shebang, REQUESTED, direct_url.json) are
written per venv.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from packaging.utils import canonicalize_name

from cowfs.errors import CowfsError
from cowfs.mount import control, mount as mounting
from cowfs.mount.spec import VenvState
from cowfs.store import roots
from cowfs.store.layer import ensure_layer, read_head
from cowfs.store.manifest import Dist, FileEntry
from cowfs.store.store import Store
from installer.resolve import plan_cache
from installer.wheel import wheel_index
from installer.wheel.bytecode import bytecode_if_compiled, ensure_bytecode
from installer.resolve.fetch import fetch, warm_up
from installer.wheel.ingest import Ingestor
from installer.interpreters import InterpreterInfo
from installer.resolve.locks import pins_from_local_wheels
from installer.resolve.resolve import Pin, choose_resolver, local_path, resolve
from installer.wheel.scripts import (
    VenvFiles,
    install_venv_files,
    remove_recorded_outside,
    remove_venv_files,
)
from installer.venv.venv import ensure_mounted
from installer.wheel.wheel import venv_extra_files

if TYPE_CHECKING:
    from installer.resolve.prefetch import Prefetch
    from installer.resolve.remote_install import Prepared


@dataclass
class Request:
    requirements: Sequence[str] = ()
    requirement_files: Sequence[Path] = ()
    find_links: Sequence[str] = ()
    no_index: bool = False
    offline: bool = False
    index_url: str | None = None
    quiet: bool = False
    extra_index_urls: Sequence[str] = ()


@dataclass
class Summary:
    installed: list[tuple[str, str]] = field(default_factory=list)
    removed: list[tuple[str, str]] = field(default_factory=list)
    unchanged: int = 0
    resolver: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {"installed": [f"{n}=={v}" for n, v in self.installed],
                "removed": [f"{n}=={v}" for n, v in self.removed],
                "unchanged": self.unchanged, "resolver": self.resolver,
                "seconds": round(self.seconds, 4)}


@contextlib.contextmanager
def venv_lock(venv: Path) -> Iterator[None]:
    """One writer of the venv's state at a time (installs, absorb, reset, the bytecode job;
    different venvs proceed in parallel). flock on the state directory itself: nothing is
    created, so a refused command leaves the venv exactly as it was."""
    fd = os.open(VenvState.state_dir(venv), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def plan(request: Request, info: InterpreterInfo, store: Store, python: Path,
         prefetch: Prefetch | None = None) -> tuple[list[Pin], str]:
    """Pins for the request: the local pip-sync fast path when it applies, else uv or pip.
    prefetch: starts on wheels while uv resolves (pass its `ingest` to apply)."""
    local = (local_path(p) for p in request.find_links)
    wheel_dirs = [store.wheels] + [p for p in local if p is not None and p.is_dir()]
    key = (list(request.requirements), request.requirement_files, wheel_dirs, info.tags,
           info.markers)
    if (pins := plan_cache.lookup(store, *key)) is not None:
        return pins, "local"
    wheels = plan_cache.wheels_state(wheel_dirs)
    read: list[tuple[Path, str]] = []
    pins = pins_from_local_wheels(list(request.requirements), wheel_dirs, info.tags,
                                  info.markers, requirement_files=request.requirement_files,
                                  read=read)
    if pins is not None:
        plan_cache.record(store, *key, wheels=wheels, read=read, pins=pins)
        return pins, "local"
    kind, _ = choose_resolver(None)
    if not request.offline:  # downloads follow the resolution: prepare them meanwhile
        # (with a prefetch following uv, they mostly happen during it, without trio)
        warm_up(event_loop=not (kind == "uv" and prefetch is not None and prefetch.enabled()))
    pins = resolve(list(request.requirements), python=python,
                   requirement_files=request.requirement_files,
                   find_links=request.find_links, no_index=request.no_index,
                   offline=request.offline, index_url=request.index_url,
                   extra_index_urls=request.extra_index_urls, quiet=request.quiet,
                   resolver=kind, supported_tags=info.tags, markers=info.markers,
                   log=prefetch)
    if prefetch is not None:
        prefetch.settle(pins)
    return pins, kind


def _dist_info_prefix(m: Dist) -> str:
    return f"{m.dist_info}/"


def shared_bytecode_for(store: Store, manifests: Sequence[Dist], info: InterpreterInfo,
              python: Path, venv: Path | None = None) -> list[str]:
    """Shared pyc manifests for these distributions; compiled once per interpreter.

    With venv, those not compiled yet are left to a background job (installer.wheel.bytecode_bg)
    that publishes them into the venv after the install has returned, unless
    COWFS_BYTECODE=inline."""
    known = {m.id: bytecode_if_compiled(store, m, info) for m in manifests}
    cold = [m for m in manifests if known[m.id] is None]
    background = venv is not None and os.environ.get("COWFS_BYTECODE", "") != "inline"
    if cold and background and store.writable():
        from installer.wheel.bytecode_bg import schedule

        if schedule(venv, store.root, python, [m.id for m in cold]):
            cold = []
    if cold:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
            ids = pool.map(lambda m: ensure_bytecode(store, m, info, python), cold)
            known.update(zip([m.id for m in cold], ids, strict=True))
    return [i for i in known.values() if i is not None]


def apply(state: VenvState, store: Store, info: InterpreterInfo, pins: Sequence[Pin], *,
          exact: bool, quiet: bool = False, resolver: str = "",
          compile_bytecode: bool = True, keep: Sequence[str] = (),
          prepared: Prepared | None = None, ingestor: Ingestor | None = None) -> Summary:
    """Make the venv hold pins (plus what it had, unless exact) and reload the mount.
    Pins in prepared come from the store or a remote (installer.resolve.remote_install), not wheels.
    ingestor: one that may hold ingestions of the pins' wheels already (installer.resolve.prefetch);
    the caller then holds the store lock from before those started."""
    started = time.perf_counter()
    # One state writer at a time (the daemon's absorb is another): read it fresh under the
    # lock, so that nothing another writer recorded meanwhile is written over.
    with venv_lock(state.venv):
        refresh_state(state)
        absorb_foreign(state, store, compile_bytecode)
        # Shared store lock from the first new object until the venv state names it: a gc
        # in between would otherwise collect what no root references yet.
        with store.lock():
            summary = _apply_locked(state, store, info, pins, exact=exact, keep=keep,
                                    quiet=quiet, resolver=resolver,
                                    compile_bytecode=compile_bytecode, prepared=prepared,
                                    ingestor=ingestor)
        reload(state)
    summary.seconds = time.perf_counter() - started
    return summary


def refresh_state(state: VenvState) -> None:
    """The state as its last writer left it (in place: callers hold this object)."""
    for f, value in vars(VenvState.load(state.venv)).items():
        setattr(state, f, value)


def _apply_locked(state: VenvState, store: Store, info: InterpreterInfo, pins: Sequence[Pin],
                  *, exact: bool, keep: Sequence[str], quiet: bool, resolver: str,
                  compile_bytecode: bool, prepared: Prepared | None,
                  ingestor: Ingestor | None = None) -> Summary:
    summary = Summary(resolver=resolver)
    ready = prepared.materialize(store, progress=not quiet) if prepared else {}
    # ensure() only for a new store: an existing read-only one serves what it holds already
    # (anything new fails with one clear error where it would be written). Its downloads
    # go to a private directory: a wheel the store has the manifest of installs all the same.
    with contextlib.ExitStack() as stack:
        if store.exists() and not store.writable():
            import tempfile

            dest = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cowfs-")))
        else:
            dest = (store if store.exists() else store.ensure()).wheels
        ingest = ingestor or Ingestor(store, info)
        stack.callback(ingest.close)
        rest = [p for p in pins if p.name not in ready]
        # Local wheels are hash-checked by their ingestion (ingest.results), not twice.
        fetch(rest, dest, progress=not quiet, on_ready=ingest.submit,
              known=partial(wheel_index.sha256, store), check_local=False)
        new = {**ready, **ingest.results(rest, progress=not quiet)}
    current = {canonicalize_name(m.name): m for m in (read_head(store, d)
                                                        for d in state.dists)}
    # exact: only the pins stay, and those named in keep (a uv project's own editable).
    wanted: dict[str, Dist] = {n: current[n] for n in keep if n in current} if exact \
        else dict(current)
    for name, manifest in new.items():
        wanted[canonicalize_name(name)] = manifest
    requested = {canonicalize_name(n) for n in state.requested}
    requested |= {p.name for p in pins if p.requested}
    if exact:
        requested &= set(wanted)
    python = Path(state.python)
    extra = [e for e in state.extra]
    for name, old in current.items():
        if name not in wanted or wanted[name].id != old.id:
            _remove_outside_site(state, old)
            extra = [e for e in extra if not e.path.startswith(_dist_info_prefix(old))]
            summary.removed.append((old.name, old.version))
    direct = {p.name: p.direct_url for p in pins}
    # One batch for every script and, last, the state file: one round of fsyncs, and
    # nothing appears unless everything was written (the state is renamed last).
    files = VenvFiles()
    try:
        for name, m in wanted.items():
            if name in current and current[name].id == m.id:
                summary.unchanged += 1
                continue
            install_venv_files(store, m, state.venv, python, purelib=state.site_packages,
                               files=files)
            extra = [e for e in extra if not e.path.startswith(_dist_info_prefix(m))]
            extra.extend(venv_extra_files(store, m, requested=name in requested,
                                          direct_url=direct.get(name)))
            summary.installed.append((m.name, m.version))
        state.dists = [m.id for m in wanted.values()]
        if compile_bytecode:
            state.bytecode = shared_bytecode_for(store, list(wanted.values()), info, python,
                                       state.venv)
        else:
            state.bytecode = [b for b in state.bytecode if b.rpartition(".")[0] in state.dists]
        state.extra = _dedup(extra)
        state.requested = sorted(requested)
        for ident in [*state.bytecode, *state.dists]:
            ensure_layer(store, ident)  # what the daemon loads (else it reads the manifest)
        store.sync_objects()  # the state names venv-local objects (RECORD, INSTALLER...)
        files.write(VenvState.path_for(state.venv), [state.encode()], 0o644)
        files.commit()
        roots.record(store, state)  # still under the store lock: gc sees what it names
    finally:
        files.abort()
    return summary


def _dedup(rows: list[FileEntry]) -> list[FileEntry]:
    return list({e.path: e for e in rows}.values())


def absorb_foreign(state: VenvState, store: Store, compile_bytecode: bool = True) -> None:
    """What pip or uv installed into the venv becomes store-backed first (installer.venv.absorb),
    so that installing over it or removing it replaces it cleanly."""
    if state.may_hold_foreign_dists():  # the caller holds venv_lock
        from installer.venv.absorb import absorb  # rarely needed: not on the warm path

        absorb(state, store, Path(state.python) if compile_bytecode else None)


def uninstall(state: VenvState, store: Store, names: Sequence[str]) -> Summary:
    with venv_lock(state.venv):
        refresh_state(state)
        absorb_foreign(state, store)
        return _uninstall_locked(state, store, names)


def _uninstall_locked(state: VenvState, store: Store, names: Sequence[str]) -> Summary:
    summary = Summary()
    wanted = {canonicalize_name(n) for n in names}
    before = list(state.dists)
    keep: list[str] = []
    extra = list(state.extra)
    found: set[str] = set()
    for dist_id in state.dists:
        m = read_head(store, dist_id)
        name = canonicalize_name(m.name)
        if name in wanted:
            found.add(name)
            _remove_outside_site(state, m)
            extra = [e for e in extra if not e.path.startswith(_dist_info_prefix(m))]
            summary.removed.append((m.name, m.version))
        else:
            keep.append(dist_id)
    missing = sorted(wanted - found)
    if missing:
        raise CowfsError(f"not installed in {state.venv}: {', '.join(missing)}")
    state.dists, state.extra = keep, extra
    state.bytecode = [b for b in state.bytecode if b.rpartition(".")[0] in keep]
    state.requested = [n for n in state.requested if canonicalize_name(n) not in wanted]
    state.save()
    roots.record(store, state)
    reload(state)
    _drop_emptied_dirs(state, store, [i for i in before if i not in keep])
    return summary


def _remove_outside_site(state: VenvState, m: Dist) -> None:
    """A removed distribution's files outside site-packages: what cowfs installed, and
    what pip or uv did (absorbed distributions have no manifest data, their RECORD lists it)."""
    remove_venv_files(m, state.venv)
    with contextlib.suppress(OSError):
        record = (state.site_packages / m.dist_info / "RECORD").read_bytes()
        remove_recorded_outside(record, state.site_packages, state.venv)


def _drop_emptied_dirs(state: VenvState, store: Store, removed: list[str]) -> None:
    """Directories of removed distributions that a copy-up left in the private layer, empty
    now (or holding only whiteouts of their files): without the lower they showed as empty
    packages (`import pkg` found a namespace package, a dist-info without METADATA)."""
    from installer.venv.absorb import emptied_dirs, paths_of

    paths = paths_of(store, removed)
    dirs = emptied_dirs(state.upper, sorted(paths))
    if dirs:
        control.request(state.mount_spec().socket, "reset", paths=dirs)


def reload(state: VenvState) -> None:
    """Tell a live daemon to swap in the new lower; mount when nothing is mounted."""
    spec = state.mount_spec()
    if mounting.mount_state(spec.mountpoint) == "live":
        try:
            control.request(spec.socket, "reload")
            return
        except (OSError, ValueError) as exc:
            raise CowfsError(f"the mount daemon of {state.venv} did not reload: {exc}") \
                from None
    ensure_mounted(state)
