"""`cowfs status|diff|reset|adopt` and `cowfs store verify|gc|du|info`: the command line only;
the logic lives in installer.venv.changes, installer.venv.adopt and cowfs.store.gc."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from cowfs.errors import CowfsError
from cowfs.mount import mount as mounting
from cowfs.mount.spec import VenvState
from cowfs.store import gc, roots as gc_roots
from cowfs.store.store import Store
from installer.cli.diff import diff_lines
from installer.venv import changes
from installer.venv.venv import ensure_mounted, find_venv

COLOURS = {"M": "yellow", "?": "yellow", "P": "cyan", "t": "cyan", "T": "magenta",
           "A": "green", "D": "red"}
SHOWN_CONFIRM = 20  # paths listed before a reset confirmation


def _state(venv_opt: str | None) -> VenvState:
    """The venv; a mount whose daemon died (killed, OOM) is remounted first: its files gave
    "Transport endpoint is not connected" while status read the private layer as fine."""
    state = VenvState.load(find_venv(venv_opt))
    if mounting.mount_state(str(state.site_packages)) == "stale":
        ensure_mounted(state)
        click.echo(f"cowfs: the mount daemon of {state.venv} had stopped (its log: "
                   f"{state.mount_spec().log}); remounted", err=True)
    return state


def _filesystem(directory: Path) -> dict[str, object] | None:
    """Probed capabilities of the filesystem holding directory (a scratch dir is made in
    it, so never the live upper itself) and how cowfs copes there; None if not probeable."""
    from cowfs.overlay import fscaps, meta

    try:
        caps = meta.caps_for(str(directory))
        exchange = meta.can_exchange(str(directory))
    except OSError:
        return None
    why = meta.refusal(caps, str(directory))
    source = fscaps.mount_source(str(directory))
    return {**caps.to_json(), "source": source, "rename_exchange": exchange,
            "metadata": meta.for_upper(str(directory)).strategy if why is None else None,
            "refused": why, "summary": meta.describe(caps, source)}


def _fs_line(label: str, fs: dict[str, object] | None) -> str:
    if fs is None:
        return f"{label:<13}(not probed: not writable)"
    how = f"refused: {fs['refused']}" if fs["refused"] else f"metadata {fs['metadata']}"
    return f"{label:<13}{fs['summary']}; {how}"


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _is_bytecode(c: changes.Change) -> bool:
    return "__pycache__/" in c.path and c.path.endswith(".pyc") and c.kind in (
        "added", "modified", "metadata")


def _summary(report: changes.Report) -> str:
    counts = report.counts()
    return ", ".join(f"{n} {kind}" for kind, n in counts.items())


# -- status / diff / reset ------------------------------------------------------------------


def _opens(state: VenvState) -> dict[str, str]:
    """How the live mount serves opens (passthrough, kernel, daemon) and why; {} unmounted."""
    from cowfs.mount import control

    status = control.try_request(state.mount_spec().socket, "status")
    if not status or "opens" not in status:
        return {}
    return {"opens": str(status["opens"]), "opens_why": str(status.get("opens_why", ""))}


@click.command("status")
@click.option("--venv", "venv_opt", type=click.Path(), help="The venv (default: as install).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status_cmd(venv_opt: str | None, as_json: bool) -> None:
    """Show the venv's private changes against the pristine packages, by distribution."""
    state = _state(venv_opt)
    started = time.perf_counter()
    report = changes.scan(state)
    seconds = time.perf_counter() - started
    # Probed in the work dir: same filesystem as the upper, invisible in the mount.
    work = state.work if state.work.is_dir() else VenvState.state_dir(state.venv)
    fs = _filesystem(work)
    opens = _opens(state)
    if as_json:
        click.echo(json.dumps({**report.to_json(), "upper_filesystem": fs, **opens,
                               "seconds": round(seconds, 4)}, indent=1))
        return
    mode = f"; opens {opens['opens']}" + (f" ({opens['opens_why']})" if opens["opens_why"]
                                           else "") if opens else ""
    if not report.changes:
        click.echo(f"{state.venv}: no private changes (site-packages is pristine); "
                   f"upper fs {_fs_line('', fs).strip()}{mode}")
        return
    click.echo(f"{state.venv}: {_summary(report)} (private layer {state.upper})")
    click.echo(_fs_line("upper fs", fs) + mode)
    for dist, items in report.groups():
        title = dist.label if dist else "no distribution"
        click.echo(click.style(title, bold=True))
        pycs = [c for c in items if _is_bytecode(c)]
        for c in items:
            if c in pycs:
                continue
            code = changes.KINDS[c.kind]
            extra = f" ({c.mode_change[0]:o} -> {c.mode_change[1]:o})" if c.mode_change else ""
            if c.kind == "unknown-pristine":
                extra = " (edited before adoption; no pristine copy known)"
            name = c.path + ("/" if c.is_dir else "")
            click.echo(f"  {click.style(code, fg=COLOURS[code])} {name}{extra}")
        if pycs:
            click.echo(f"  {plural(len(pycs), 'bytecode file')} in __pycache__ "
                       "(regenerated by Python)")


@click.command("diff")
@click.argument("targets", nargs=-1)
@click.option("--venv", "venv_opt", type=click.Path(), help="The venv (default: as install).")
def diff_cmd(targets: tuple[str, ...], venv_opt: str | None) -> None:
    """Unified diff of the venv's changes (PKG or PATH...) against the pristine files."""
    report = changes.scan(_state(venv_opt))
    chosen = changes.select(report, targets) if targets else report.changes
    for line in diff_lines(report, chosen):
        if line.startswith(("---", "+++")):
            line = click.style(line, bold=True)
        elif line.startswith("@@"):
            line = click.style(line, fg="cyan")
        elif line.startswith("-"):
            line = click.style(line, fg="red")
        elif line.startswith("+"):
            line = click.style(line, fg="green")
        click.echo(line)


@click.command("reset")
@click.argument("targets", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Drop every private change.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--venv", "venv_opt", type=click.Path(), help="The venv (default: as install).")
def reset_cmd(targets: tuple[str, ...], all_: bool, yes: bool, venv_opt: str | None) -> None:
    """Drop private changes (PKG or PATH..., or --all), restoring the pristine files.

    Works on a live mount: a running process sees the pristine file on its next open.
    """
    if bool(targets) == all_:
        raise CowfsError("name what to reset (PKG or PATH...) or use --all, not both"
                         if all_ else "name what to reset (PKG or PATH...) or use --all")
    state = _state(venv_opt)
    report = changes.scan(state)
    chosen = report.changes if all_ else changes.select(report, targets)
    doable = [c for c in chosen if c.kind != "unknown-pristine"]
    if doable and not yes:
        if not sys.stdin.isatty():
            raise CowfsError(f"not resetting {plural(len(doable), 'path')} without "
                             "confirmation (stdin is not a terminal): pass -y")
        for c in doable[:SHOWN_CONFIRM]:
            click.echo(f"  {changes.KINDS[c.kind]} {c.path}")
        if len(doable) > SHOWN_CONFIRM:
            click.echo(f"  ... and {len(doable) - SHOWN_CONFIRM} more")
        click.confirm(f"Drop {plural(len(doable), 'private change')} in {state.venv}?",
                      abort=True)
    result = changes.reset(report, chosen)
    for c in result.kept:
        click.echo(f"kept {c.path}: no pristine copy is known (it was edited before "
                   "adoption); delete it yourself if you want it gone")
    if not doable:
        click.echo("nothing to reset" if not result.kept else "nothing else to reset")
        return
    how = "live mount" if result.live else "not mounted: upper layer edited directly"
    click.echo(f"reset {plural(len(doable), 'change')} in {state.venv} ({how})")


# -- store ---------------------------------------------------------------------------------


@click.group("store")
def store_group() -> None:
    """Check, collect and measure the shared store."""


def _invalidate_live_mounts(store: Store, digests: list[str]) -> None:
    """Repaired objects: live mounts must not keep serving the corrupt pages they cached."""
    if not digests:
        return
    from cowfs.mount import control

    for root in gc_roots.scan(store):
        if root.state is not None:
            control.try_request(root.state.mount_spec().socket, "invalidate", objects=digests)


@store_group.command("verify")
@click.option("--repair", is_flag=True, help="Re-ingest from cached wheels where possible.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def verify_cmd(ctx: click.Context, repair: bool, as_json: bool) -> None:
    """Rehash every object and check every manifest; exit 1 while problems remain."""
    from installer.wheel.wheel import ingest_wheel

    store = Store()
    if not store.exists():
        raise CowfsError(f"no store at {store.root}")
    with store.lock(exclusive=repair):
        rep = gc.verify(store)
        if repair:
            gc.repair(store, rep, lambda wheel: ingest_wheel(store, wheel, force=True),
                      lambda ident: _rebuild_bytecode(store, ident, rep.roots))
            _invalidate_live_mounts(store, [p.digest for p in rep.problems.values()
                                            if p.repaired])
    if as_json:
        click.echo(json.dumps({"store": str(store.root), **rep.to_json()}, indent=1))
    else:
        click.echo(f"store {store.root}: {plural(rep.objects, 'object')} and "
                   f"{plural(rep.manifests, 'manifest')} checked"
                   + (f" ({plural(rep.on_remote, 'file')} still on remotes: fetched on "
                      "first read)" if rep.on_remote else ""))
        for ident, why in sorted(rep.bad_manifests.items()):
            click.echo(f"bad manifest {ident}: {why}")
        for p in sorted(rep.problems.values(), key=lambda p: p.digest):
            click.echo(f"{p.kind} object {p.digest}: {p.detail}")
            if p.dists:
                click.echo(f"  distributions: {', '.join(p.dists)}")
            if p.venvs:
                click.echo(f"  venvs: {', '.join(p.venvs)}")
            if p.repair_note:
                mark = "repaired" if p.repaired else "NOT repaired"
                click.echo(f"  {mark}: {p.repair_note}")
        left = sum(not p.repaired for p in rep.problems.values()) + len(rep.bad_manifests)
        click.echo("store is intact" if not left and not rep.problems else
                   f"{plural(left, 'problem')} remain" if left else "all problems repaired")
    if not rep.ok:
        ctx.exit(1)


def _rebuild_bytecode(store: Store, ident: str, roots: list[gc_roots.Root]) -> bool | None:
    """Recompile a shared-bytecode manifest with the interpreter of a venv that uses it;
    None when ident is no bytecode manifest or no live venv uses it."""
    from cowfs.store.manifest import manifest_path, read_manifest
    from installer.interpreters import query_interpreter
    from installer.wheel.bytecode import cache_tag, ensure_bytecode

    m = read_manifest(store, ident)
    source = m.extra.get("bytecode_for")
    user = next((r.state for r in roots if r.state and ident in r.bytecode), None)
    if not isinstance(source, str) or user is None:
        return None
    info = query_interpreter(user.python, store)
    if cache_tag(info) != m.extra.get("cache_tag"):
        return False
    path = manifest_path(store, ident)
    aside = path.with_name(f".{path.name}.repair")
    path.rename(aside)  # ensure_bytecode compiles only when the manifest is absent
    try:
        done = ensure_bytecode(store, read_manifest(store, source), info,
                               Path(user.python)) == ident
    finally:
        if path.exists():
            aside.unlink()
        else:
            aside.rename(path)
    return done


def _retention(ctx: click.Context, param: click.Parameter, value: str | None) -> float:
    try:
        return gc_roots.parse_retention(value) if value else gc_roots.default_retention()
    except CowfsError as exc:
        raise click.BadParameter(str(exc)) from None


@store_group.command("gc")
@click.option("--dry-run", "-n", is_flag=True, help="Only report what would be deleted.")
@click.option("--retention", metavar="AGE", callback=_retention,
              help="Keep roots of venvs not visible from here (other containers or mount "
                   "namespaces) until unused this long: 30d, 12h, ... [default: "
                   "$COWFS_GC_RETENTION, else 30d].")
@click.option("--drop-unseen", is_flag=True,
              help="Also drop the roots of venvs not visible from here now (what a live "
                   "mount anywhere uses is kept all the same).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def gc_cmd(dry_run: bool, retention: float, drop_unseen: bool, as_json: bool) -> None:
    """Delete what no live venv references (dead roots, manifests, objects, old tmp files).

    Whatever a live mount serves, in any container or mount namespace on this machine, is
    kept: mounts hold a lock on the store files they use."""
    store = Store()
    rep = gc.collect(store, dry_run=dry_run, retention=retention, drop_unseen=drop_unseen)
    if as_json:
        click.echo(json.dumps({"store": str(store.root), **rep.to_json()}, indent=1))
        return
    verb = "would delete" if dry_run else "deleted"
    for venv, why in zip(rep.dead_roots, rep.dead_reasons, strict=True):
        click.echo(f"dead root: {venv} ({why + ', ' if why else ''}"
                   f"{'would be ' if dry_run else ''}removed)")
    for u in rep.unseen_roots:
        click.echo(f"kept root: {u['venv']} ({u['reason']}; last used "
                   f"{_ago(u['last_used'])}, kept until {_when(u['kept_until'])}; "
                   "--drop-unseen drops it)")
    if rep.manifests_in_use or rep.objects_in_use:
        click.echo(f"in use by live mounts not registered here: "
                   f"{plural(len(rep.manifests_in_use), 'manifest')}, "
                   f"{plural(rep.objects_in_use, 'venv-local object')} (kept)")
    for ident in rep.missing_manifests:
        click.echo(f"warning: a live venv names {ident}, which is not in the store")
    click.echo(f"{verb} {plural(len(rep.manifests_deleted), 'manifest')}, "
               f"{plural(rep.objects_deleted, 'object')} ({_size(rep.bytes_freed)}), "
               f"{plural(rep.tmp_deleted, 'tmp leftover')}; kept "
               f"{plural(rep.manifests_kept, 'manifest')} and "
               f"{plural(rep.objects_kept, 'object')} for "
               f"{plural(rep.live_roots, 'live venv')}"
               + (f" and {plural(len(rep.unseen_roots), 'unseen venv')}"
                  if rep.unseen_roots else ""))


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    return f"{s / 86400:.1f} days ago" if s >= 86400 else \
        f"{s / 3600:.1f} hours ago" if s >= 3600 else f"{int(s // 60)} minutes ago"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _usage_lines(u: dict[str, object], detail: bool) -> list[str]:
    o = u["objects"]
    roots = u["roots"]
    assert isinstance(o, dict) and isinstance(roots, dict)
    lines = [f"{'store':<13}{u['store']}",
             f"{'objects':<13}{o['count']} ({_size(o['bytes'])}, "
             f"{_size(o['disk_bytes'])} on disk)",
             f"{'manifests':<13}{u['manifests']}"]
    for part in ("dists", "wheels", "interpreters", "tmp"):
        d = u[part]
        assert isinstance(d, dict)
        lines.append(f"{part:<13}{plural(d['files'], 'file')}, {_size(d['bytes'])}")
    lines.append(f"{'roots':<13}" + ", ".join(f"{len(v)} {k}" for k, v in roots.items()
                                              if v or k != "unseen"))
    if detail:
        sizes = {v["venv"]: v for v in u["venvs"]}  # type: ignore[attr-defined]
        for status, venvs in roots.items():
            for venv in venvs:
                s = sizes.get(venv)
                more = f"  {s['files']} files, {_size(s['bytes'])}" if s else ""
                lines.append(f"  {status:<6}{venv}{more}")
    ratio = u["dedup_ratio"]
    lines.append(f"{'venvs':<13}{_size(u['logical_bytes'])} logical (sum over live venvs) -> "
                 f"{_size(u['physical_bytes'])} physical"  # type: ignore[arg-type]
                 + (f" (dedup {ratio:.2f}x)" if ratio else ""))
    return lines


@store_group.command("du")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def du_cmd(as_json: bool) -> None:
    """Store size by part, and how much sharing saves (logical vs physical)."""
    u = gc.usage(Store())
    click.echo(json.dumps(u, indent=1) if as_json else "\n".join(_usage_lines(u, False)))


@store_group.command("info")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info_cmd(as_json: bool) -> None:
    """Where the store is, what it holds, which venvs keep it alive, and what its
    filesystem can do."""
    store = Store()
    u = gc.usage(store)
    fs = _filesystem(store.tmp) if store.tmp.is_dir() else None
    if as_json:
        click.echo(json.dumps({**u, "filesystem": fs}, indent=1))
        return
    lines = _usage_lines(u, True)
    lines.insert(1, _fs_line("filesystem", fs))
    click.echo("\n".join(lines))


# -- adopt ---------------------------------------------------------------------------------


@click.command("adopt")
@click.argument("path", type=click.Path())
def adopt_cmd(path: str) -> None:
    """Turn an existing venv (pip, uv, ...) into a cowfs venv; edits stay private.

    On a cowfs venv: absorb what pip, uv or another installer wrote into it now (the mount
    daemon also does so by itself once the installer is done)."""
    from installer.venv.adopt import MARKER, adopt

    started = time.perf_counter()
    state_dir = VenvState.state_dir(Path(path).absolute())
    if (state_dir / "state.json").exists() and not (state_dir / MARKER).exists():
        _absorb_live(Path(path).absolute(), started)
        return
    result = adopt(Path(path), Store())
    state = result.state
    click.echo(f"adopted {state.venv}: {plural(len(result.dists), 'distribution')}, "
               f"{result.shared} files into the store, {result.private} kept private "
               f"({time.perf_counter() - started:.2f}s; site-packages {result.mounted})")
    for d in result.dists:
        m = d.manifest
        for p in d.private:
            click.echo(f"  {m.name} {m.version}: {p} was edited; `cowfs reset` restores it")
        for p in d.unknown:
            click.echo(f"  {m.name} {m.version}: {p} was edited; no pristine copy is known")
    if result.dropped_pycs:
        click.echo(f"  {plural(result.dropped_pycs, 'stale bytecode file')} dropped")


def _absorb_live(venv: Path, started: float) -> None:
    """`cowfs adopt` of a live cowfs venv: absorb what other installers wrote into it."""
    from installer.venv import absorb, sync

    state = VenvState.load(venv)
    store = Store(state.store)
    with sync.venv_lock(venv):
        state = VenvState.load(venv)  # as the last holder of the lock left it
        done = absorb.absorb(state, store, Path(state.python))
    if done is None:
        click.echo(f"{venv}: nothing to absorb (no distribution installed by another tool)")
        return
    if done.unfinished:  # the daemon tries again shortly (EX_TEMPFAIL)
        click.echo(f"{venv}: still being written, absorbed later: {', '.join(done.unfinished)}")
        if not done.manifests and not done.gone:
            sys.exit(75)
    click.echo(f"absorbed into {venv}: {plural(len(done.manifests), 'distribution')}, "
               f"{done.shared} files served from the store, {done.private} kept private "
               f"({time.perf_counter() - started:.2f}s)")
    for m in done.manifests:
        for p in done.edited.get(m.dist_info, []):
            click.echo(f"  {m.name} {m.version}: {p} differs from its RECORD; kept private")
    for what in done.gone:
        click.echo(f"  {what}: removed by another tool")
    if done.unfinished:
        sys.exit(75)


COMMANDS: list[click.Command] = [status_cmd, diff_cmd, reset_cmd, store_group, adopt_cmd]
