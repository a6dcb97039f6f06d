"""Free TCP ports for tests that start servers (gloo rendezvous, Ray nodes, Slurm daemons).

Ports handed out together are distinct: each socket stays bound until all are chosen. A port
*range* (Ray's worker ports) is taken below the kernel's ephemeral range, where `bind(0)` —
ours and the servers' own "pick a free port" — never lands, so single ports chosen here or by
Ray cannot fall inside it.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path


def free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            s = held.enter_context(socket.socket())
            s.bind(("", 0))
            ports.append(s.getsockname()[1])
        return ports


def free_port() -> int:
    return free_ports(1)[0]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
        return True


def free_port_range(width: int) -> tuple[int, int]:
    """(first, last), `width` free ports below the ephemeral range and above Ray's default
    worker ports (10002-19999), which other Ray runs on this machine may be using."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for first in range(low - width, 20000, -width):
        if all(_bindable(p) for p in range(first, first + width)):
            return first, first + width - 1
    raise RuntimeError(f"no {width} consecutive free ports between 20000 and {low}")
