"""Sockets of the data path: bounded queues and large kernel buffers."""

from __future__ import annotations

import zmq

# Kernel socket buffers of the data path: a few MB cut the system calls per message of sectors.
KERNEL_BUFFER_BYTES = 4 * 1024 * 1024


def data_socket(context: zmq.Context, kind: int, hwm: int, curve=None, linger_ms: int = 0) -> zmq.Socket:
    """A PUSH or PULL socket for blocks of sectors or events (a few MB each): a high-water mark of
    ``hwm`` messages, so a slow peer pushes back instead of filling memory, and big kernel buffers.
    With ``curve`` (transport.curve.Curve) a PULL socket (they all bind) is a CURVE server, a PUSH
    socket (they all connect) a client."""
    sock = context.socket(kind)
    if curve is not None:
        curve.server(sock) if kind == zmq.PULL else curve.client(sock)
    sock.setsockopt(zmq.SNDHWM if kind == zmq.PUSH else zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.SNDBUF if kind == zmq.PUSH else zmq.RCVBUF, KERNEL_BUFFER_BYTES)
    sock.setsockopt(zmq.LINGER, linger_ms)
    return sock
