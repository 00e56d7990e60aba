"""`cowfs mount`, `cowfs umount`, `cowfs mounts`: the filesystem's own commands."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from cowfs.errors import CowfsError
from cowfs.mount import mount as mounting
from cowfs.mount.spec import MountSpec, VenvState

# Generic mount(8) options that mean nothing to an overlay daemon and are accepted silently,
# so that `mount -t fuse.cowfs` style invocations work unchanged.
GENERIC_OPTIONS = {"rw", "defaults", "noatime", "atime", "relatime", "strictatime",
                   "nodiratime", "diratime", "nosuid", "suid", "nodev", "dev", "exec",
                   "noexec", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail",
                   "sync", "async", "lazytime", "nolazytime", "default_permissions"}


def parse_options(opts: tuple[str, ...]) -> dict[str, str]:
    """mount -o style: comma-separated key[=value]; generic options ignored."""
    out: dict[str, str] = {}
    for group in opts:
        for item in group.split(","):
            if not item:
                continue
            key, _, value = item.partition("=")
            if key in ("lowerdir", "upperdir", "workdir"):
                if not value:
                    raise CowfsError(f"mount option {key} needs a value")
                out[key] = value
            elif key == "allow_other":
                out[key] = "1"
            elif key in GENERIC_OPTIONS or key.startswith(("x-", "comment=")):
                continue
            else:
                raise CowfsError(f"unknown mount option {item!r}")
    return out


def spec_for_venv(target: Path) -> MountSpec:
    """A venv directory, or its .cowfs/state.json."""
    venv = (target.parent.parent if target.name == "state.json" else target).absolute()
    state = VenvState.load(venv)
    state.check_location(venv)
    return state.mount_spec()


@click.command("mount")
@click.argument("args", nargs=-1, type=click.Path())
@click.option("-o", "options", multiple=True, help="lowerdir=A[:B],upperdir=U,workdir=W,...")
@click.option("--foreground", "-f", is_flag=True, help="Run the daemon in this process.")
@click.option("--allow-other", is_flag=True, help="Let other users access the mount.")
def mount_cmd(args: tuple[str, ...], options: tuple[str, ...], foreground: bool,
              allow_other: bool) -> None:
    """Mount a venv's overlay (VENV), or a generic overlay (-o ... SRC MNT)."""
    opts = parse_options(options)
    if opts:
        if len(args) != 2:
            raise CowfsError("usage: cowfs mount -o lowerdir=A[:B],upperdir=U,workdir=W SRC MNT")
        missing = [k for k in ("lowerdir", "upperdir", "workdir") if k not in opts]
        if missing:
            raise CowfsError(f"missing mount option(s): {', '.join(missing)}")
        mp = os.path.abspath(args[1])
        spec = MountSpec(mountpoint=mp, upper=os.path.abspath(opts["upperdir"]),
                         work=os.path.abspath(opts["workdir"]),
                         log=os.path.abspath(opts["workdir"]) + ".log",
                         lowerdirs=[os.path.abspath(p) for p in opts["lowerdir"].split(":")],
                         allow_other=allow_other or "allow_other" in opts)
    else:
        if len(args) != 1:
            raise CowfsError("usage: cowfs mount VENV  |  cowfs mount -o OPTIONS SRC MNT")
        spec = spec_for_venv(Path(args[0]))
        spec.allow_other = allow_other
    result = mounting.mount(spec, foreground=foreground)
    click.echo(f"{result}: {spec.mountpoint} (log: {spec.log})")


@click.command("umount")
@click.argument("target", type=click.Path())
@click.option("--lazy", "-l", is_flag=True, help="Detach now, clean up when no longer busy.")
def umount_cmd(target: str, lazy: bool) -> None:
    """Unmount a cowfs mount point (or a venv's site-packages)."""
    path = Path(target).absolute()
    venv: Path | None = None
    if (VenvState.path_for(path)).exists():
        venv, path = path, VenvState.load(path).site_packages
    elif (spec := MountSpec.for_mountpoint(str(path))) is not None and spec.venv:
        venv = Path(spec.venv)
    if venv is not None and not lazy:
        # The shared bytecode of an install that just returned is still being compiled
        # through the mount: `cowfs install X && cowfs umount .venv` found it busy.
        from installer.wheel.bytecode_bg import wait

        wait(venv, 300)
    mounting.umount(str(path), lazy=lazy)
    click.echo(f"unmounted: {path}")


@click.command("mounts")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def mounts_cmd(as_json: bool) -> None:
    """List cowfs mounts and whether their daemons are alive."""
    rows = mounting.list_mounts()
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo("no cowfs mounts")
    for row in rows:
        extra = ""
        if "pid" in row:
            opens = row.get("opens") or ("kernel" if row.get("kernel_cache") else "daemon")
            why = f" ({row['opens_why']})" if row.get("opens_why") else ""
            extra = f" pid={row['pid']} rss={int(row['max_rss_kb']) // 1024}MB opens={opens}{why}"
        src = row.get("venv") or ":".join(row.get("lowerdirs", []) or []) or "?"  # type: ignore[arg-type]
        click.echo(f"{row['mountpoint']}  {row['state']}{extra}  ({src})")


COMMANDS = [mount_cmd, umount_cmd, mounts_cmd]
