"""installer.resolve.index_config: pip.conf, PIP_* and UV_* settings as one; credentials. No
network."""

from __future__ import annotations

from pathlib import Path

from installer.resolve.index_config import (
    effective,
    netrc_credentials,
    redact,
    split_credentials,
    with_credentials,
)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nextra-index-url = file:///a/simple file:///b/simple\n"
                    "find-links = /wheels\ncert = /ca.pem\ntimeout = 33\n"
                    "constraint = /c.txt\n[install]\ntrusted-host = h.example\n")
    return {"HOME": str(tmp_path), "XDG_CONFIG_DIRS": str(tmp_path / "none"),
            "PIP_CONFIG_FILE": str(conf), **extra}


def test_pip_configuration_is_passed_to_uv(tmp_path: Path) -> None:
    cfg = effective(index_url=None, extra_index_urls=["https://x/simple"],
                    find_links=["/more"], environ=_env(tmp_path))
    assert cfg.extra_index_urls == ("file:///a/simple", "file:///b/simple", "https://x/simple")
    assert cfg.find_links == ("/wheels", "/more") and cfg.constraints == ("/c.txt",)
    args = cfg.uv_args()
    assert args[args.index("--index-strategy") + 1] == "unsafe-best-match"
    assert args[-2:] == ["--allow-insecure-host", "h.example"]
    env = cfg.uv_env({"UV_INDEX_URL": "https://dropped/simple", "PATH": "/bin"})
    assert env == {"PATH": "/bin", "SSL_CERT_FILE": "/ca.pem", "UV_HTTP_TIMEOUT": "33"}
    assert cfg.pip_extra_args == ()  # pip reads all of this itself


def test_precedence_and_uv_variables(tmp_path: Path) -> None:
    env = _env(tmp_path, PIP_INDEX_URL="https://pip/simple", UV_DEFAULT_INDEX="https://uv/s",
               UV_INDEX="named=https://named/simple", UV_NO_INDEX="0")
    cfg = effective(environ=env)
    assert cfg.index_url == "https://pip/simple"  # PIP_* over UV_*
    assert "https://named/simple" in cfg.extra_index_urls
    assert cfg.pip_extra_args == ("--extra-index-url", "https://named/simple")
    assert effective(index_url="https://cli/simple", environ=env).index_url == "https://cli/simple"
    del env["PIP_INDEX_URL"]
    cfg = effective(environ=env)
    assert cfg.index_url == "https://uv/s" and cfg.pip_extra_args[:2] == ("--index-url",
                                                                          "https://uv/s")
    assert effective(environ={"PIP_CONFIG_FILE": "/dev/null", "UV_NO_INDEX": "1"}).no_index
    assert effective(environ={"PIP_CONFIG_FILE": "/dev/null"}).uv_args() == []


def test_credentials(tmp_path: Path) -> None:
    url = "https://u%40x:p%3Ass@idx.example:8443/simple/"
    assert split_credentials(url) == ("https://idx.example:8443/simple/", ("u@x", "p:ss"))
    assert "p%3Ass" not in redact(url) and "****" in redact(url)
    assert with_credentials("https://idx.example:8443/f/a.whl", [url]).startswith(
        "https://u%40x:p%3Ass@idx.example:8443/")
    assert with_credentials("https://other/a.whl", [url]) == "https://other/a.whl"
    (tmp_path / "netrc").write_text("machine idx.example login me password secret\n")
    env = {"NETRC": str(tmp_path / "netrc")}
    assert netrc_credentials("idx.example", env) == ("me", "secret")
    assert netrc_credentials("elsewhere", env) is None
