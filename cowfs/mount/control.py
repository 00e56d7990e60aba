"""The per-mount control socket: one JSON request line, one JSON response line.

Requests: {"op": "status"}, {"op": "reload"}, {"op": "reset", "paths": [...],
"expect": {path: identity} (optional, cowfs.overlay.reset)},
{"op": "unmount"}. The client side is synchronous (plain sockets) so any command can use it.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from cowfs.errors import CowfsError


def request(sock_path: Path, op: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
    """Send one request; raises ConnectionError when no daemon answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise ConnectionError(f"no answer from {sock_path}")
    reply = json.loads(data)
    if not reply.get("ok"):
        raise CowfsError(reply.get("error", "the mount daemon refused the request"))
    return reply


def try_request(sock_path: Path, op: str, timeout: float = 30.0,
                **args: Any) -> dict[str, Any] | None:
    """Like request(), but None when there is no daemon behind the socket."""
    try:
        return request(sock_path, op, timeout, **args)
    except (OSError, ValueError):
        return None
