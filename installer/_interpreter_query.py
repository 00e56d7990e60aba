"""Runs INSIDE the interpreter being queried and prints one JSON document on stdout.

Invoked as `<python> -I -B -c <this file's text> <shim dir>`. The shim dir holds a symlink
named `packaging` to the host's copy, so a bare venv without packaging can answer, and the
tags come from the same packaging version the host compares them with. The code must run on
every Python that packaging supports (3.8+): annotations are never evaluated and nothing
newer than 3.8 is used at runtime.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import sysconfig

PATH_KEYS = ("purelib", "platlib", "scripts", "data", "include", "stdlib")


def _libpython() -> str | None:
    """The shared libpython this process really loaded, or None for a static build."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(None, 5)
                if len(fields) == 6:
                    path = fields[5].strip()
                    if os.path.basename(path).startswith("libpython"):
                        return path
        return None  # the mappings are authoritative: nothing mapped means static
    except OSError:
        pass  # no /proc (macOS, BSD): fall back to what the build says
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") and not sysconfig.get_config_var(
        "PYTHONFRAMEWORK"
    ):
        return None
    dirs = [sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("PYTHONFRAMEWORKPREFIX")]
    names = [sysconfig.get_config_var("INSTSONAME"), sysconfig.get_config_var("LDLIBRARY")]
    for d in dirs:
        for name in names:
            if d and name and not name.endswith(".a"):
                candidate = os.path.join(d, name)
                if os.path.isfile(candidate):
                    return candidate
    return None


def main() -> None:
    # Never leave .pyc files for this Python inside the host's packaging directory.
    sys.dont_write_bytecode = True
    if len(sys.argv) > 1 and sys.argv[1]:
        sys.path.insert(0, sys.argv[1])
        # A .pth file may already have imported the target's own packaging: use the host's.
        for name in list(sys.modules):
            if name == "packaging" or name.startswith("packaging."):
                del sys.modules[name]
    from packaging import markers, tags

    paths = sysconfig.get_paths()
    doc = {
        "version": platform.python_version(),
        "version_info": list(sys.version_info[:3]),
        "implementation": sys.implementation.name,
        "sys_executable": sys.executable,
        "sys_prefix": sys.prefix,
        "base_prefix": getattr(sys, "base_prefix", sys.prefix),
        "is_venv": sys.prefix != getattr(sys, "base_prefix", sys.prefix),
        "paths": {key: paths[key] for key in PATH_KEYS},
        "markers": dict(markers.default_environment()),
        "tags": [str(tag) for tag in tags.sys_tags()],
        "abiflags": getattr(sys, "abiflags", ""),
        "soabi": sysconfig.get_config_var("SOABI"),
        "platform": sysconfig.get_platform(),
        "libpython": _libpython(),
    }
    sys.stdout.write(json.dumps(doc))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
