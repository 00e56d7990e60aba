"""Run one of cowfs's own modules in a child interpreter, from wherever the caller stands.

`python -m MODULE` puts the working directory first on sys.path, so a directory there named
like one of our packages shadows the installed one: a container with the project checked
out at /cowfs, and a daemon whose working directory is /, imported /cowfs as a namespace
package named cowfs and failed. -P (3.11+) leaves the working directory out; 3.10 has no
-P, so there a tiny -c program drops it before running the module.
"""

from __future__ import annotations

import sys

_RUN = "import runpy, sys; del sys.path[0]; runpy.run_module({!r}, run_name='__main__', " \
       "alter_sys=True)"


def python_module(module: str, *args: str) -> list[str]:
    """argv for `python -m module args...` without the working directory on sys.path (and
    isolated like the caller, when it is)."""
    flags = ["-I"] if sys.flags.isolated else []
    if sys.version_info >= (3, 11):
        return [sys.executable, *flags, "-P", "-m", module, *args]
    return [sys.executable, *flags, "-c", _RUN.format(module), *args]


__all__ = ["python_module"]
