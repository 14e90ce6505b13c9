"""Free TCP ports on loopback, for pipelines that must not collide with others on the machine
(tests, benchmarks)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Below the kernel's ephemeral range: a port there is never handed out for an outgoing connection
# or a bind to port 0. A block taken from inside that range could be grabbed by any connection
# (another role's heartbeat, mpirun's daemons) between choosing it and binding it.
LOWEST_PORT = 10000


def ephemeral_range() -> tuple[int, int]:
    """(first, last) of the kernel's ephemeral ports; Linux's default when it cannot be read."""
    try:
        first, last = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(first), int(last)
    except (OSError, ValueError):
        return 32768, 60999


def free_port_block(size: int) -> int:
    """A base port with ``size`` consecutive ports after it free on 127.0.0.1, checked by binding
    each (a pipeline config takes control, writer, gateway and node-group ports from one block).
    The block lies below the ephemeral range, or above it where that leaves no room."""
    first, last = ephemeral_range()
    windows = [(LOWEST_PORT, first - size), (last + 1, 65535 - size)]
    windows = [(lo, hi) for lo, hi in windows if hi > lo]
    if not windows:
        raise RuntimeError(f"no room for {size} ports outside the ephemeral range {first}-{last}")
    chooser = random.Random()
    for _ in range(200):
        lo, hi = chooser.choice(windows)
        base = chooser.randint(lo, hi)
        taken = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                taken.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in taken:
                s.close()
    raise RuntimeError(f"no block of {size} free ports on 127.0.0.1")
