"""The `cowfs` command line: one click group; each concern registers its own commands."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from cowfs import __version__
from cowfs.errors import CowfsError

# Modules that export COMMANDS: list[click.Command]. Imported only when one of their commands
# runs (or for --help), so `cowfs install` does not pay for importing everything else.
COMMAND_MODULES = (
    "cowfs.commands",
    "installer.cli.commands",
    "installer.cli.interpreter_commands",
    "installer.cli.maintenance_commands",
    "installer.cli.remote_commands",
)
# Where the hot commands live; anything not listed is found by importing every module.
COMMAND_INDEX = {
    "mount": "cowfs.commands", "umount": "cowfs.commands", "mounts": "cowfs.commands",
    "venv": "installer.cli.commands", "install": "installer.cli.commands",
    "uninstall": "installer.cli.commands", "sync": "installer.cli.commands",
}


def _commands(module_name: str) -> list[click.Command]:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return []
    return list(getattr(module, "COMMANDS", ()))


class CowfsGroup(click.Group):
    """Lazy command loading; CowfsError (and OS errors) become one line and exit status 1."""

    def _load(self, module_name: str) -> None:
        for command in _commands(module_name):
            if command.name not in self.commands:
                self.add_command(command)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMAND_INDEX:
            self._load(COMMAND_INDEX[cmd_name])
        if cmd_name not in self.commands:
            for module_name in COMMAND_MODULES:
                self._load(module_name)
        return self.commands.get(cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        for module_name in COMMAND_MODULES:
            self._load(module_name)
        return sorted(self.commands)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if args is not None or not standalone_mode:  # called from Python (CliRunner...)
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        args = mount_helper_args(sys.argv[1:])
        # The real command line: once the command is done, skip the interpreter's teardown
        # of ~300 modules (5-10 ms of a ~130 ms warm install). Nothing of cowfs runs at exit:
        # files, executors and temporary directories are all closed by then; the standard
        # streams are flushed here.
        try:
            super().main(args, prog_name, complete_var, standalone_mode, **extra)
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            code = 120  # what Python exits with when flushing stdout fails at shutdown
        os._exit(code)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except CowfsError as exc:
            click.echo(f"cowfs: error: {exc}", err=True)
            sys.exit(1)
        except BrokenPipeError:
            # `cowfs status | head`: the reader is gone; say nothing more, like coreutils.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except OSError as exc:
            where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            click.echo(f"cowfs: error: {exc.strerror or exc}{where}", err=True)
            sys.exit(1)
        except BaseException as exc:
            # Ctrl-C inside trio (downloads) arrives wrapped in an exception group: make it
            # the plain interrupt click answers with "Aborted!", not a 48-line traceback.
            if _only_interrupts(exc):
                raise KeyboardInterrupt from None
            raise


def _only_interrupts(exc: BaseException) -> bool:
    subs = getattr(exc, "exceptions", None)
    if isinstance(subs, tuple) and subs:
        return all(_only_interrupts(e) for e in subs)
    return isinstance(exc, KeyboardInterrupt)


def mount_helper_args(argv: list[str]) -> list[str]:
    """`mount -t fuse.cowfs SRC MNT -o lowerdir=...,upperdir=...,workdir=...` (and that line
    in /etc/fstab): mount.fuse3 runs `cowfs SRC MNT -o OPTS`; that is `cowfs mount`."""
    positional = [a for i, a in enumerate(argv)
                  if not a.startswith("-") and (i == 0 or argv[i - 1] != "-o")]
    options = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-o"]
    if len(positional) == 2 and positional[0] not in COMMAND_INDEX and any(
            "lowerdir=" in o for o in options):
        return ["mount", *(x for o in options for x in ("-o", o)), *positional]
    return argv


@click.group(cls=CowfsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cowfs")
def main() -> None:
    """Copy-on-write package storage for Python environments."""
