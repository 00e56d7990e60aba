"""Where packages come from: cowfs's options, pip's and uv's environment and pip.conf, as one.

Both resolvers (installer.resolve.resolve: uv when present, else pip) must see the same indexes. pip
reads its own configuration; uv reads none of it. So the effective settings are computed
here, once, in pip's order of precedence: command line > `PIP_*` environment > pip.conf
files (global, user, site; `[install]` over `[global]`), with uv's `UV_DEFAULT_INDEX`,
`UV_INDEX_URL`, `UV_INDEX`, `UV_EXTRA_INDEX_URL`, `UV_FIND_LINKS`, `UV_NO_INDEX` taken where
pip's settings say nothing. As with pip, `--extra-index-url` and `--find-links` given on the
command line add to the configured ones; `--index-url` replaces.

Credentials: a URL may carry `user:password@`, and ~/.netrc (or $NETRC) is consulted for a
host without them. uv's lock output drops credentials, so `with_credentials` puts back those
of the index a file URL shares its host with; installer.resolve.fetch turns them into a header.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

_TRUE = frozenset({"1", "true", "yes", "on"})


@dataclass(frozen=True)
class IndexConfig:
    index_url: str | None = None  # None: the resolver's default (PyPI)
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    no_index: bool = False
    constraints: tuple[str, ...] = ()  # pip.conf / PIP_CONSTRAINT constraint files
    cert: str | None = None
    trusted_hosts: tuple[str, ...] = ()
    timeout: str | None = None
    # what pip would not find in its own configuration (uv's variables), for the pip fallback
    pip_extra_args: tuple[str, ...] = field(default=(), compare=False)

    def uv_args(self) -> list[str]:
        args: list[str] = []
        if self.no_index:
            args.append("--no-index")
        elif self.index_url:
            args += ["--index-url", self.index_url]
        for url in self.extra_index_urls if not self.no_index else ():
            args += ["--extra-index-url", url]
        if self.extra_index_urls and not self.no_index:
            args += ["--index-strategy", "unsafe-best-match"]  # pip's: best version anywhere
        for link in self.find_links:
            args += ["--find-links", link]
        for constraint in self.constraints:
            args += ["-c", constraint]
        for host in self.trusted_hosts:
            args += ["--allow-insecure-host", host]
        return args

    def uv_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """uv's environment: the index variables are passed as options instead."""
        env = {k: v for k, v in environ.items() if k not in _UV_INDEX_VARS}
        if self.cert and "SSL_CERT_FILE" not in env:
            env["SSL_CERT_FILE"] = self.cert
        if self.timeout and "UV_HTTP_TIMEOUT" not in env:
            env["UV_HTTP_TIMEOUT"] = self.timeout
        return env

    def urls(self) -> list[str]:
        return [u for u in (self.index_url, *self.extra_index_urls, *self.find_links) if u]


_UV_INDEX_VARS = frozenset({"UV_DEFAULT_INDEX", "UV_INDEX_URL", "UV_INDEX", "UV_EXTRA_INDEX_URL",
                            "UV_FIND_LINKS", "UV_NO_INDEX"})


def _config_files(environ: Mapping[str, str]) -> list[Path]:
    """pip's configuration files in the order pip loads them (later ones win)."""
    chosen = environ.get("PIP_CONFIG_FILE")
    if chosen == os.devnull:
        return []
    xdg_dirs = environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(os.pathsep)
    files = [Path(d, "pip", "pip.conf") for d in xdg_dirs if d] + [Path("/etc/pip.conf")]
    home = Path(environ.get("HOME", "~")).expanduser()
    config_home = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
    files += [home / ".pip" / "pip.conf", config_home / "pip" / "pip.conf"]
    files.append(Path(sys.prefix, "pip.conf"))
    if chosen:
        files.append(Path(chosen))
    return files


def pip_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """pip's effective install settings: files, then `PIP_<KEY>` variables."""
    import configparser  # cold path only

    environ = os.environ if environ is None else environ
    settings: dict[str, str] = {}
    for path in _config_files(environ):
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError, OSError):
            continue  # pip fails on such a file itself when it runs; uv never reads it
        for section in ("global", "install"):
            if parser.has_section(section):
                settings.update({k.replace("_", "-"): v for k, v in parser.items(section)})
    for key, value in environ.items():
        if key.startswith("PIP_") and key != "PIP_CONFIG_FILE":
            settings[key[4:].lower().replace("_", "-")] = value
    return settings


def _uv_index_list(value: str) -> list[str]:
    # UV_INDEX entries may be named: "name=https://..."
    out = []
    for item in value.split():
        name, sep, rest = item.partition("=")
        out.append(rest if sep and "://" not in name and "/" not in name else item)
    return out


def effective(*, index_url: str | None = None, extra_index_urls: Sequence[str] = (),
              find_links: Sequence[str] = (), no_index: bool = False,
              environ: Mapping[str, str] | None = None) -> IndexConfig:
    """The settings a resolve uses, from cowfs's options and the environment."""
    environ = os.environ if environ is None else environ
    pip = pip_settings(environ)
    pip_extra: list[str] = []
    url = index_url or pip.get("index-url")
    if not url:
        url = environ.get("UV_DEFAULT_INDEX") or environ.get("UV_INDEX_URL") or None
        if url:
            pip_extra += ["--index-url", url]
    uv_extras = (_uv_index_list(environ.get("UV_INDEX", ""))
                 + environ.get("UV_EXTRA_INDEX_URL", "").split())
    uv_links = environ.get("UV_FIND_LINKS", "").replace(",", " ").split()
    for flag, values in (("--extra-index-url", uv_extras), ("--find-links", uv_links)):
        for value in values:
            pip_extra += [flag, value]
    uv_no_index = environ.get("UV_NO_INDEX", "").lower() in _TRUE
    if uv_no_index:
        pip_extra.append("--no-index")
    return IndexConfig(
        index_url=url,
        extra_index_urls=tuple(_dedup([*pip.get("extra-index-url", "").split(), *uv_extras,
                                       *extra_index_urls])),
        find_links=tuple(_dedup([*pip.get("find-links", "").split(), *uv_links,
                                 *find_links])),
        no_index=no_index or pip.get("no-index", "").lower() in _TRUE or uv_no_index,
        constraints=tuple(pip.get("constraint", "").split()),
        cert=pip.get("cert") or None,
        trusted_hosts=tuple(pip.get("trusted-host", "").split()),
        timeout=pip.get("timeout") or pip.get("default-timeout") or None,
        pip_extra_args=tuple(pip_extra),
    )


def _dedup(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


# -- credentials -----------------------------------------------------------------------------


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """(url without user:password@, (user, password) or None)."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    bare = urlunsplit(parts._replace(netloc=netloc))
    return bare, (unquote(parts.username), unquote(parts.password or ""))


def redact(url: str) -> str:
    """The URL as it may be shown: a password never appears in a message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username}:****@"
                                     + parts.netloc.rpartition("@")[2]))


def with_credentials(url: str, sources: Sequence[str]) -> str:
    """url with the credentials of the first of sources on the same host and port."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.username is not None:
        return url
    for source in sources:
        src = urlsplit(source)
        if src.username is not None and (src.hostname, src.port) == (parts.hostname,
                                                                     parts.port):
            return urlunsplit(parts._replace(netloc=src.netloc))
    return url


def netrc_credentials(host: str, environ: Mapping[str, str] | None = None) -> \
        tuple[str, str] | None:
    """(login, password) for host from $NETRC or ~/.netrc, None when there is none."""
    environ = os.environ if environ is None else environ
    path = environ.get("NETRC") or os.path.join(environ.get("HOME", "~"), ".netrc")
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        return None
    import netrc

    try:
        found = netrc.netrc(path).authenticators(host)
    except (netrc.NetrcParseError, OSError):
        return None
    if not found:
        return None
    login, _, password = found
    return login or "", password or ""
