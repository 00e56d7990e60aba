"""A store's named remotes (`remotes.json` in the store) and which ones a command uses."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cowfs.store.remote import RemoteError
from cowfs.store.store import Store

if TYPE_CHECKING:  # not imported by installs while no remote is configured
    from cowfs.store.remote.transport import Transport


def check_url(url: str) -> str:
    from cowfs.store.remote.transport import check_url

    return check_url(url)

ENV = "COWFS_REMOTE"  # a URL or a remote's name: the one remote to read from (empty: none)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Remote:
    name: str
    url: str

    def open(self) -> Transport:
        from cowfs.store.remote.transport import open_transport

        return open_transport(self.url)

    @property
    def label(self) -> str:
        return self.url if self.name == self.url else f"{self.name} ({self.url})"


def _path(store: Store) -> Path:
    return store.root / "remotes.json"


def load(store: Store) -> list[Remote]:
    try:
        doc = json.loads(_path(store).read_bytes())
        rows = doc["remotes"]
        return [Remote(check_name(r["name"]), check_url(r["url"])) for r in rows]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError, RemoteError) as exc:
        raise RemoteError(f"unreadable remote list {_path(store)}: {exc}") from None


def _save(store: Store, remotes: list[Remote]) -> None:
    store.ensure()
    store.write_json(_path(store),
                     {"format": 1, "remotes": [{"name": r.name, "url": r.url} for r in remotes]})


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RemoteError(f"bad remote name {name!r}: letters, digits, '.', '_' and '-', "
                          "starting with a letter or digit")
    return name


def add(store: Store, name: str, url: str) -> Remote:
    remote = Remote(check_name(name), check_url(url))
    with store.lock():
        remotes = load(store)
        if any(r.name == name for r in remotes):
            raise RemoteError(f"remote {name!r} exists already (remove it first)")
        _save(store, [*remotes, remote])
    return remote


def remove(store: Store, name: str) -> Remote:
    with store.lock():
        remotes = load(store)
        gone = [r for r in remotes if r.name == name]
        if not gone:
            raise RemoteError(f"no remote named {name!r}")
        _save(store, [r for r in remotes if r.name != name])
    return gone[0]


def find(store: Store, name_or_url: str) -> Remote:
    """A configured remote by name, else a URL or directory given directly."""
    for r in load(store):
        if r.name == name_or_url:
            return r
    if "/" not in name_or_url:
        raise RemoteError(f"no remote named {name_or_url!r} (see `cowfs store remote list`)")
    return Remote(name_or_url, check_url(os.path.abspath(name_or_url)
                                         if "://" not in name_or_url else name_or_url))


def for_reading(store: Store) -> list[Remote]:
    """What installs read from: $COWFS_REMOTE when set, else every configured remote."""
    env = os.environ.get(ENV)
    if env is not None:
        return [find(store, env)] if env else []
    return load(store)


def for_push(store: Store, name_or_url: str | None) -> Remote:
    if name_or_url:
        return find(store, name_or_url)
    remotes = for_reading(store)
    if len(remotes) != 1:
        raise RemoteError("name the remote to push to" if remotes else
                          "no remote configured: `cowfs store remote add NAME URL`, or "
                          "give a URL or directory")
    return remotes[0]
