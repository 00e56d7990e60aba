"""Text rendering of the scale and profile sections."""

from __future__ import annotations

from typing import Any


def render(section: str, data: Any) -> str:
    if section == "scale":
        return _scale(data)
    if section == "profile":
        return _profile(data)
    return ""


def _scale(data: dict[str, Any]) -> str:
    lines = ["", "scale run (targets: daemon RSS <= 200 MB, mount <= 1.5 s):"]
    head = (f"  {'case':<16}{'files':>9}{'mount CLI':>11}{'mount API':>11}{'RSS after walk':>16}"
            f"{'walk':>9}{'nodes':>9}{'fds':>6}")
    lines.append(head)
    for case, d in data.get("cases", {}).items():
        def s(key: str, fmt: str = "{:.3f}s", d: dict[str, Any] = d) -> str:
            v = d.get(key)
            return "-" if v is None else fmt.format(v)

        lines.append(f"  {case:<16}{d.get('files', 0):>9}{s('mount_time_s'):>11}"
                     f"{s('mount_time_api_s'):>11}{s('daemon_rss_mb', '{:.1f}MB'):>16}"
                     f"{s('walk_s'):>9}{d.get('nodes', '-'):>9}{s('daemon_fds', '{}'):>6}")
        if d.get("fuse_overlayfs"):
            fo = d["fuse_overlayfs"]
            lines.append(f"    fuse-overlayfs, same lower: mount {fo['mount_time_s']:.3f}s, walk "
                         f"{fo['walk_s']:.3f}s, RSS {fo['daemon_rss_mb']:.1f}MB")
        if d.get("note"):
            lines.append(f"    note: {d['note']}")
    return "\n".join(lines)


def _profile(data: dict[str, Any]) -> str:
    lines = ["", "FUSE request profile of the cowfs daemon (instrumented CowfsOperations):"]
    for op, d in data.get("operations", {}).items():
        lines.append(f"  {op}: {d.get('requests', 0)} requests, "
                     f"{d.get('handler_us_per_request', 0):.1f} us/request in handlers, "
                     f"daemon CPU {d.get('daemon_cpu_s', 0) * 1000:.0f} ms "
                     f"({d.get('daemon_cpu_us_per_request', 0):.1f} us/request all-in); "
                     f"wall {d.get('wall_s', 0) * 1000:.0f} ms vs native "
                     f"{(d.get('native_wall_s') or 0) * 1000:.0f} ms")
        top = sorted(d.get("by_handler", {}).items(), key=lambda kv: -kv[1]["n"])[:8]
        lines.append("    " + ", ".join(f"{h} {v['n']} ({v['us']:.0f}us)" for h, v in top))
        for key, value in d.get("notes", {}).items():
            lines.append(f"    {key}: {value}")
    kernel = data.get("kernel") or {}
    if kernel.get("skipped"):
        lines.append(f"  kernel view (fuse tracepoints): skipped: {kernel['skipped']}")
    elif kernel:
        lines.append("  kernel view (fuse tracepoints; normal daemons; round trip = send to "
                     "reply; 'waited' leaves out release/releasedir, which run in the background):")
        for op, per_peer in kernel.items():
            for peer, r in per_peer.items():
                top = ", ".join(f"{o} {v['n']} ({v['us']:.0f}us)"
                                for o, v in list(r.get("by_op", {}).items())[:6])
                lines.append(f"    {op:<12} {peer:<15} {r.get('requests', 0):>6} requests, "
                             f"{r.get('round_trip_us', 0):>6.1f} us mean round trip, "
                             f"{r.get('waited_s', 0) * 1000:.0f} ms waited of "
                             f"{r.get('wall_s', 0) * 1000:.0f} ms wall: {top}")
    return "\n".join(lines)
