"""`cowfs python info` and `cowfs cache clean`: the interpreter cache on the command line."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import click

from cowfs.errors import CowfsError
from cowfs.store.store import Store
from installer.interpreters import InterpreterInfo, clean_interpreter_cache, query_interpreter

SHOWN_TAGS = 5


def default_python() -> str:
    """$VIRTUAL_ENV/bin/python, else ./.venv/bin/python, else python3 on PATH."""
    if venv := os.environ.get("VIRTUAL_ENV"):
        return str(Path(venv) / "bin" / "python")
    local = Path(".venv") / "bin" / "python"
    if local.exists():
        return str(local.absolute())
    found = shutil.which("python3")
    if found is None:
        raise CowfsError("no python given, no virtual environment active and no python3 on PATH")
    return found


def _text(info: InterpreterInfo) -> str:
    tags = ", ".join(info.tags[:SHOWN_TAGS])
    if len(info.tags) > SHOWN_TAGS:
        tags += f" (+{len(info.tags) - SHOWN_TAGS} more)"
    rows = [
        ("executable", info.executable),
        ("canonical", info.canonical),
        ("version", f"{info.version} ({info.implementation})"),
        ("venv", f"yes, base {info.base_prefix}" if info.is_venv else "no"),
        ("prefix", info.sys_prefix),
        *((key, info.paths[key]) for key in ("purelib", "platlib", "scripts", "stdlib")),
        ("libpython", info.libpython or "(static)"),
        ("platform", info.platform),
        ("tags", tags),
        ("cache", "hit" if info.from_cache else "miss (queried the interpreter)"),
    ]
    if not info.sys_executable or os.path.realpath(info.sys_executable) != info.canonical:
        rows.append(("runs", f"{info.sys_executable} (a wrapper: never cached)"))
    return "\n".join(f"{name:<11} {value}" for name, value in rows)


@click.group("python")
def python_group() -> None:
    """Inspect Python interpreters."""


@python_group.command("info")
@click.argument("python", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the full answer as JSON.")
@click.option("--no-cache", is_flag=True, help="Query the interpreter; neither read nor write.")
def info_command(python: str | None, as_json: bool, no_cache: bool) -> None:
    """Show what PYTHON is (default: the active venv, ./.venv, or python3 on PATH)."""
    info = query_interpreter(python or default_python(), Store(), use_cache=not no_cache)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(info), indent=2))
    else:
        click.echo(_text(info))


@click.group("cache")
def cache_group() -> None:
    """Manage cowfs caches."""


@cache_group.command("clean")
@click.option("--interpreters", is_flag=True, help="Remove cached interpreter answers.")
def clean_command(interpreters: bool) -> None:
    """Remove cached data (everything when no kind is named)."""
    # Interpreters are the only kind so far; no flag means every kind.
    store = Store()
    removed = clean_interpreter_cache(store)
    click.echo(
        f"removed {removed} interpreter cache entr{'y' if removed == 1 else 'ies'}"
        f" from {store.interpreters}"
    )


COMMANDS: list[click.Command] = [python_group, cache_group]
