"""Free TCP ports on loopback, for pipelines that must not collide with others on the machine
(tests, benchmarks)."""

from __future__ import annotations

import socket


def free_port_block(size: int) -> int:
    """A base port with ``size`` consecutive ports after it free on 127.0.0.1, checked by binding
    each (a pipeline config takes control, writer, gateway and node-group ports from one block)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + size >= 65000:
            continue
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
