"""The `cowfs` command line: one click group; each concern registers its own commands."""

from __future__ import annotations

import importlib
import sys

import click

from cowfs import __version__
from cowfs.errors import CowfsError

# Modules that export COMMANDS: list[click.Command]. Imported lazily so that a broken
# optional part cannot take down unrelated commands.
COMMAND_MODULES = (
    "cowfs.commands",
    "installer.commands",
    "installer.interpreter_commands",
)


class CowfsGroup(click.Group):
    """Turns CowfsError (and OS errors) into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except CowfsError as exc:
            click.echo(f"cowfs: error: {exc}", err=True)
            sys.exit(1)
        except OSError as exc:
            where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            click.echo(f"cowfs: error: {exc.strerror or exc}{where}", err=True)
            sys.exit(1)


@click.group(cls=CowfsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cowfs")
def main() -> None:
    """Copy-on-write package storage for Python environments."""


def _register() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        for command in getattr(module, "COMMANDS", ()):
            main.add_command(command)


_register()
