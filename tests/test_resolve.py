"""installer.resolve.resolve / installer.resolve.locks against real uv and pip, on synthetic
wheels: no network.

Wheels are built with zipfile into a find-links directory; uv and pip (the `resolver`
fixture runs a test with each) resolve with --no-index for a real `venv --without-pip`
interpreter, with the user's pip configuration switched off so that only those wheels are
visible.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.tags import sys_tags

from cowfs.errors import CowfsError
from installer.resolve import locks
from installer.resolve.resolve import (
    Pin,
    _pip_error,
    locate,
    pins_from_local_wheels,
    read_lock,
    resolve,
)

TAGS = [str(t) for t in sys_tags()]
ENV = dict(default_environment())


def make_wheel(d: Path, name: str, version: str, requires: Sequence[str] = (), *,
               tag: str = "py3-none-any", requires_python: str | None = None) -> Path:
    dist = f"{name.replace('-', '_')}-{version}"
    headers = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    headers += [f"Requires-Python: {requires_python}"] if requires_python else []
    extras = sorted({r.split("extra ==")[1].strip(" '\"") for r in requires if "extra ==" in r})
    headers += [f"Provides-Extra: {e}" for e in extras]
    headers += [f"Requires-Dist: {r}" for r in requires]
    path = d / f"{dist}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name.replace('-', '_')}/__init__.py", f"VERSION = {version!r}\n")
        zf.writestr(f"{dist}.dist-info/METADATA", "\n".join(headers) + "\n\nA test wheel.\n")
        zf.writestr(f"{dist}.dist-info/WHEEL",
                    f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _no_pip_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the test's wheels: no config file, no find-links or index from the environment."""
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    for var in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(params=["uv", "pip"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both resolvers, through the same parsing of their pylock.toml."""
    monkeypatch.setenv("COWFS_RESOLVER", request.param)
    return str(request.param)


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    return venv / "bin" / "python"


@pytest.fixture(scope="module")
def links(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("links")
    make_wheel(d, "cwt-alpha", "1.0", ["cwt-beta>=1", "cwt-gamma; python_version < '3'",
                                       "cwt-eps; python_version >= '3'",
                                       "cwt-delta; extra == 'x'"])
    for version in ("0.5", "1.1", "1.2"):
        make_wheel(d, "cwt-beta", version)
    make_wheel(d, "cwt-gamma", "1.0")
    make_wheel(d, "cwt-delta", "2.0")
    make_wheel(d, "cwt-eps", "3.0")
    (d / "cwt_sdistonly-1.0.tar.gz").write_bytes(b"not really an sdist")
    return d


def run(reqs: Sequence[str], python: Path, links: Path, **kw: object) -> dict[str, Pin]:
    pins = resolve(reqs, python=python, find_links=[str(links)], no_index=True, **kw)
    return {p.name: p for p in pins}


# -- resolve (real pip) ----------------------------------------------------------------------


def test_resolve_follows_dependencies_and_markers(venv_python: Path, links: Path,
                                                  resolver: str) -> None:
    pins = run(["cwt-alpha"], venv_python, links)
    assert set(pins) == {"cwt-alpha", "cwt-beta", "cwt-eps"}  # gamma's marker is false
    assert pins["cwt-beta"].version == "1.2"
    assert pins["cwt-alpha"].requested and not pins["cwt-beta"].requested
    beta = links / "cwt_beta-1.2-py3-none-any.whl"
    assert pins["cwt-beta"].url == beta.as_uri()
    assert pins["cwt-beta"].filename == beta.name
    assert pins["cwt-beta"].sha256 == sha256(beta)
    assert pins["cwt-alpha"].direct_url is None


def test_resolve_extras_and_canonical_names(venv_python: Path, links: Path,
                                            resolver: str) -> None:
    pins = run(["CWT_Alpha[x]"], venv_python, links, quiet=True)
    assert set(pins) == {"cwt-alpha", "cwt-beta", "cwt-eps", "cwt-delta"}


def test_requirement_and_constraint_files(venv_python: Path, links: Path,
                                          tmp_path: Path, resolver: str) -> None:
    (tmp_path / "req.txt").write_text("# deps\ncwt-alpha\n")
    (tmp_path / "c.txt").write_text("cwt-beta==1.1\n")
    pins = resolve([], python=venv_python, requirement_files=[tmp_path / "req.txt"],
                   constraints=[tmp_path / "c.txt"], find_links=[str(links)], offline=True)
    assert pins and {p.name: p.version for p in pins}["cwt-beta"] == "1.1"
    assert {p.name for p in pins if p.requested} == {"cwt-alpha"}


def test_direct_wheel_path_records_pep610_data(venv_python: Path, links: Path,
                                               resolver: str) -> None:
    wheel = links / "cwt_delta-2.0-py3-none-any.whl"
    (pin,) = resolve([str(wheel)], python=venv_python, no_index=True)
    assert pin.name == "cwt-delta" and pin.requested
    assert pin.direct_url is not None and pin.direct_url["url"] == wheel.as_uri()
    assert pin.direct_url["archive_info"]["hashes"]["sha256"] == sha256(wheel)


@pytest.mark.parametrize(("reqs", "message"), [
    (["nonexistent-pkg-xyz"], "no version of 'nonexistent-pkg-xyz' satisfies the requirements"),
    (["cwt-beta>5"], "no version of 'cwt-beta' satisfies 'cwt-beta>5' ("),
    (["cwt-alpha", "cwt-beta<1"], "conflicting requirements"),
    (["cwt-sdistonly"], "only source distributions"),
    (["not a requirement!"], "Invalid requirement"),
])
def test_pip_failures_become_one_line(venv_python: Path, links: Path, reqs: list[str],
                                      message: str, resolver: str) -> None:
    with pytest.raises(CowfsError, match=r"^[^\n]+$") as err:
        run(reqs, venv_python, links)
    assert message in str(err.value)


def test_offline_needs_local_find_links(venv_python: Path, links: Path,
                                        resolver: str) -> None:
    with pytest.raises(CowfsError, match="--offline needs a local wheel directory"):
        resolve(["x"], python=venv_python, offline=True)
    with pytest.raises(CowfsError, match="remote find-links"):
        resolve(["x"], python=venv_python, offline=True, find_links=["https://example.com/"])
    assert "cwt-eps" in {p.name for p in resolve(["cwt-eps"], python=venv_python,
                                                 offline=True, find_links=[links.as_uri()])}


def test_bad_interpreter_and_timeout(venv_python: Path, links: Path, tmp_path: Path,
                                     resolver: str) -> None:
    with pytest.raises(CowfsError, match="does not exist or is not executable"):
        resolve(["x"], python=tmp_path / "nope")
    # (1 us: uv resolved this local set within 10 ms once, in a container)
    with pytest.raises(CowfsError, match=r"did not finish resolving within 1e-06 s"):
        run(["cwt-alpha"], venv_python, links, timeout=1e-6)


def test_pip_error_line_extraction() -> None:
    retry = ("WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError'\n"
             "ERROR: Could not find a version that satisfies the requirement six "
             "(from versions: none)\nERROR: No matching distribution found for six\n")
    assert _pip_error(retry, 1) == "could not reach the package index while looking for 'six'"
    assert _pip_error("This version of pip does not support python 3.6 (requires >=3.7).\n",
                      1).startswith("This version of pip does not support")
    assert "ensurepip" in _pip_error("/x/python: No module named pip\n", 1)
    old_pip = _pip_error('ERROR: unknown command "lock"\n', 1)  # pip < 25.1 (Debian's 23)
    assert "pip >= 25.1" in old_pip and "pip install uv" in old_pip and "\n" not in old_pip
    assert _pip_error("", 2) == "pip failed with exit status 2"


# -- requirements locks --------------------------------------------------------------------

H1, H2, H3 = "1" * 64, "2" * 64, "3" * 64


def test_pinned_requirements_lock(tmp_path: Path) -> None:
    (tmp_path / "base.txt").write_text("cwt-eps==3.0\n")
    lock = tmp_path / "lock.txt"
    lock.write_text(
        "# generated\n--index-url https://example.invalid/simple\n-r base.txt\n"
        f"cwt-alpha==1.0 \\\n    --hash=sha256:{H1} \\\n    --hash sha256:{H2}  # via x\n"
        f"CWT.Beta==1.2 ; python_version >= '3' --hash=sha256:{H3}\n"
        "cwt-gamma==9.9 ; python_version < '3'\n\n"
        "cwt-delta @ https://files.example/cwt_delta-2.0-py3-none-any.whl\n")
    pins = {p.name: p for p in read_lock(lock, markers=ENV)}
    assert list(pins) == ["cwt-eps", "cwt-alpha", "cwt-beta", "cwt-delta"]
    assert pins["cwt-alpha"].hashes == (H1, H2) and pins["cwt-alpha"].sha256 is None
    assert pins["cwt-beta"].sha256 == H3 and pins["cwt-beta"].version == "1.2"
    assert pins["cwt-alpha"].url == "" and all(p.requested for p in pins.values())
    delta = pins["cwt-delta"]
    assert (delta.version, delta.filename) == ("2.0", "cwt_delta-2.0-py3-none-any.whl")
    assert delta.direct_url == {"url": delta.url, "archive_info": {}}


@pytest.mark.parametrize(("text", "message"), [
    ("cwt-alpha==1.0\ncwt-beta>=1\n", "lock.txt:2: 'cwt-beta>=1' is not pinned"),
    ("cwt-alpha==1.*\n", "lock.txt:1: 'cwt-alpha==1.*' is not pinned"),
    ("-e ./src\n", "editable requirements are not supported"),
    ("cwt-alpha==1.0 --hash=md5:abc\n", "lock.txt:1: unsupported option"),
    ("cwt-alpha==1.0\ncwt_alpha==1.0\n", "'cwt-alpha' is pinned twice"),
    ("cwt-alpha==1.0 ; python_version <<< '3'\n", "lock.txt:1: invalid requirement"),
    ("cwt-x @ https://h/cwt_x-1.0.tar.gz\n", "is not a wheel"),
    ("--frobnicate\n", "unsupported option --frobnicate"),
])
def test_broken_requirements_lock(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "lock.txt").write_text(text)
    with pytest.raises(CowfsError, match=r"^[^\n]+$") as err:
        read_lock(tmp_path / "lock.txt", markers=ENV)
    assert message in str(err.value)


def test_locate_prefers_local_wheels_without_pip(links: Path, tmp_path: Path) -> None:
    beta = links / "cwt_beta-1.1-py3-none-any.whl"
    pins = [Pin("cwt-beta", "1.1", "", "", hashes=(H1, sha256(beta))),
            Pin("cwt-eps", "3.0", "", "")]
    # An interpreter that cannot run proves pip was never spawned.
    located = locate(pins, tmp_path / "no-python", [str(links)], True, supported_tags=TAGS)
    assert [p.url for p in located] == [beta.as_uri(),
                                        (links / "cwt_eps-3.0-py3-none-any.whl").as_uri()]
    assert located[0].sha256 == sha256(beta)
    with pytest.raises(CowfsError, match="does not exist"):  # hash fits no local file: pip
        locate([Pin("cwt-beta", "1.1", "", "", hashes=(H1,))], tmp_path / "no-python",
               [str(links)], True, supported_tags=TAGS)


def test_locate_through_pip_checks_lock_hashes(venv_python: Path, links: Path) -> None:
    beta = links / "cwt_beta-1.2-py3-none-any.whl"
    pins = [Pin("cwt-beta", "1.2", "", "", hashes=(sha256(beta),)),
            Pin("cwt-eps", "3.0", "", ""), Pin("cwt-delta", "2.0", "https://h/x.whl", "x.whl")]
    located = locate(pins, venv_python, [str(links)], True)
    assert located[0].url == beta.as_uri() and located[0].sha256 == sha256(beta)
    assert located[1].filename == "cwt_eps-3.0-py3-none-any.whl"
    assert located[2] is pins[2]  # already had a URL
    with pytest.raises(CowfsError, match="not one of the lock's hashes"):
        locate([Pin("cwt-eps", "3.0", "", "", hashes=(H1,)), Pin("cwt-beta", "1.2", "", "")],
               venv_python, [str(links)], True)


# -- pylock.toml -------------------------------------------------------------------------

PYLOCK = """\
lock-version = "1.0"
requires-python = ">=3.8"
created-by = "test"

[[packages]]
name = "cwt-alpha"
version = "1.0"

[[packages.wheels]]
name = "cwt_alpha-1.0-py3-none-any.whl"
url = "https://h/generic"
hashes = {sha256 = "%(h1)s"}

[[packages.wheels]]
url = "https://h/cwt_alpha-1.0-%(tag)s.whl"
hashes = {sha256 = "%(h2)s"}

[[packages]]
name = "cwt-gamma"
version = "1.0"
marker = "python_version < '3'"
sdist = {url = "https://h/cwt_gamma-1.0.tar.gz", hashes = {sha256 = "%(h1)s"}}

[[packages]]
name = "cwt-beta"
version = "1.2"
marker = "'dev' in dependency_groups"
wheels = [{path = "w/cwt_beta-1.2-py3-none-any.whl", hashes = {sha256 = "%(h3)s"}}]
"""


def test_pylock(tmp_path: Path) -> None:
    lock = tmp_path / "pylock.toml"
    text = PYLOCK % {"h1": H1, "h2": H2, "h3": H3, "tag": TAGS[0]}
    lock.write_text(text)
    # The wheel with the better tag wins, wherever it is listed.
    (alpha,) = read_lock(lock, markers=ENV, supported_tags=TAGS)
    assert (alpha.name, alpha.version, alpha.sha256) == ("cwt-alpha", "1.0", H2)
    assert alpha.url == f"https://h/cwt_alpha-1.0-{TAGS[0]}.whl"
    assert alpha.filename == f"cwt_alpha-1.0-{TAGS[0]}.whl"
    (alpha,) = read_lock(lock, markers=ENV, supported_tags=["py3-none-any"])
    assert (alpha.sha256, alpha.url) == (H1, "https://h/generic")  # named by 'name'
    lock.write_text(text.replace(
        'created-by = "test"', 'created-by = "test"\ndefault-groups = ["dev"]'))
    beta = {p.name: p for p in read_lock(lock, markers=ENV, supported_tags=TAGS)}["cwt-beta"]
    assert beta.url == (tmp_path / "w" / "cwt_beta-1.2-py3-none-any.whl").as_uri()


WHEEL = f'{{url = "https://h/cwt_a-1.0-py3-none-any.whl", hashes = {{sha256 = "{H1}"}}}}'

WIN_WHEEL = WHEEL.replace("py3-none-any", "cp27-cp27m-win32")


@pytest.mark.parametrize(("text", "message"), [
    ("lock-version = \n", "not valid TOML"),
    ("[[packages]]\nname = 'x'\n", "'lock-version' is missing"),
    ("lock-version = '2.0'\npackages = []\n", "unsupported lock-version '2.0'"),
    ("lock-version = '1.0'\n", "'packages' is missing"),
    ("lock-version = '1.0'\n[[packages]]\nversion = '1'\n", "packages[0].'name' is missing"),
    ("lock-version = '1.0'\n[[packages]]\nname = 'cwt-a'\nwheels = 3\n",
     "package 'cwt-a': 'wheels' has the wrong type (int)"),
    ("lock-version = '1.0'\n[[packages]]\nname = 'cwt-a'\nsdist = {url = 'https://h/a.tgz'}\n",
     "package 'cwt-a': no wheel in the lock (only sdist)"),
    ("lock-version = '1.0'\n[[packages]]\nname = 'cwt-a'\n"
     "wheels = [{url = 'https://h/cwt_a-1.0-py3-none-any.whl'}]\n", "'hashes' is missing"),
    (f"lock-version = '1.0'\n[[packages]]\nname = 'cwt-a'\nversion = '2.0'\nwheels = [{WHEEL}]",
     "is not version 2.0"),
    (f"lock-version = '1.0'\n[[packages]]\nname = 'cwt-b'\nwheels = [{WHEEL}]\n",
     "is not a wheel of 'cwt-b'"),
    (f"lock-version = '1.0'\n[[packages]]\nname = 'cwt-a'\nwheels = [{WIN_WHEEL}]\n",
     "none of its 1 wheels fits"),
    ("lock-version = '1.0'\nenvironments = [\"sys_platform == 'win32'\"]\npackages = []\n",
     "does not cover this environment"),
    ("lock-version = '1.0'\nrequires-python = '<3'\npackages = []\n", "requires Python <3"),
    ("lock-version = '1.0'\n[[packages]]\nname = 'cwt-a'\nmarker = 'nonsense ='\n",
     "invalid marker"),
])
def test_broken_pylock(tmp_path: Path, text: str, message: str) -> None:
    lock = tmp_path / "pylock.toml"
    lock.write_text(text)
    with pytest.raises(CowfsError, match=r"^[^\n]+$") as err:
        read_lock(lock, markers=ENV, supported_tags=TAGS)
    assert str(err.value).startswith(f"{lock}: ") and message in str(err.value)


# -- pins_from_local_wheels ----------------------------------------------------------------

CLOSED = ["cwt-alpha==1.0", "cwt-beta==1.2", "cwt-eps==3.0"]


def test_fast_path_accepts_a_closed_set(links: Path, venv_python: Path) -> None:
    fast = pins_from_local_wheels(CLOSED, [links], TAGS, ENV)
    assert fast is not None
    slow = resolve(CLOSED, python=venv_python, find_links=[str(links)], no_index=True)
    # Same wheels as the resolver picks for the same pins.
    assert {(p.name, p.version, p.url) for p in fast} == {(p.name, p.version, p.url)
                                                          for p in slow}
    assert all(p.requested for p in fast) and all(p.requested for p in slow)
    assert "cwt-beta>=1" in {p.name: p for p in fast}["cwt-alpha"].requires_dist


@pytest.mark.parametrize("reqs", [
    ["cwt-alpha==1.0", "cwt-beta==1.2"],  # cwt-eps missing from the set
    ["cwt-alpha==1.0", "cwt-beta==0.5", "cwt-eps==3.0"],  # beta outside >=1
    ["cwt-alpha[x]==1.0", "cwt-beta==1.2", "cwt-eps==3.0"],  # the extra needs cwt-delta
    ["cwt-alpha==1.0", "cwt-beta>=1.2", "cwt-eps==3.0"],  # not pinned
    ["cwt-alpha==1.0", "cwt-beta==1.3", "cwt-eps==3.0"],  # no such wheel
    ["cwt-alpha==1.0", "cwt-beta==1.2", "cwt-eps==3.0", "./some/path.whl"],  # not a name
])
def test_fast_path_declines(links: Path, reqs: list[str]) -> None:
    assert pins_from_local_wheels(reqs, [links], TAGS, ENV) is None


def test_fast_path_extras_files_markers_and_python(links: Path, tmp_path: Path) -> None:
    req = tmp_path / "r.txt"
    req.write_text("cwt-beta==1.2\ncwt-eps==3.0\ncwt-gamma==7 ; python_version < '3'\n")
    pins = pins_from_local_wheels(["cwt-alpha[x]==1.0", "cwt-delta==2.0"], [links], TAGS, ENV,
                                  requirement_files=[req])
    assert pins is not None and {p.name for p in pins} == {"cwt-alpha", "cwt-beta", "cwt-eps",
                                                           "cwt-delta"}
    old = tmp_path / "old"
    old.mkdir()
    make_wheel(old, "cwt-zeta", "1.0", requires_python=">=3.99")
    assert pins_from_local_wheels(["cwt-zeta==1.0"], [old], TAGS, ENV) is None


def test_fast_path_tag_priority_and_metadata_cache(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    generic = make_wheel(a, "cwt-t", "1.0")
    specific = make_wheel(b, "cwt-t", "1.0", tag=f"{TAGS[0]}")
    make_wheel(a, "cwt-t", "1.0", tag="cp27-cp27m-win32")  # unusable here
    (pin,) = pins_from_local_wheels(["cwt-t==1.0"], [a, b], TAGS, ENV) or ()
    assert pin.url == specific.as_uri()
    (pin,) = pins_from_local_wheels(["cwt-t==1.0"], [a], TAGS, ENV) or ()
    assert pin.url == generic.as_uri()
    before = locks._metadata_cached.cache_info()
    pins_from_local_wheels(["cwt-t==1.0"], [a], TAGS, ENV)
    after = locks._metadata_cached.cache_info()
    # Answered by the store's persistent wheel index: the zip was not opened again.
    assert (after.hits, after.misses) == (before.hits, before.misses)
    make_wheel(a, "cwt-t", "1.0", ["cwt-missing"])  # rewritten: the cache must not hide it
    assert pins_from_local_wheels(["cwt-t==1.0"], [a], TAGS, ENV) is None
