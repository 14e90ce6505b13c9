"""Small msgpack maps: the envelopes of data-path messages and every control-path request and
reply. Decoding never trusts its input: garbage, a wrong type or an oversized map raises
MessageError, whose ``reason`` is the key of the receiver's rejection counter."""

from __future__ import annotations

from typing import Any

import msgpack

# Envelopes and control messages are tiny; anything bigger is garbage or an attack.
MAX_ENVELOPE_BYTES = 64 * 1024


class MessageError(ValueError):
    """A message that cannot be used. ``reason`` is a short snake_case key for counters."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def pack_map(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack_map(frame, limit: int = MAX_ENVELOPE_BYTES) -> dict:
    """Decode one msgpack map (bytes, or a zmq Frame) of at most ``limit`` bytes; MessageError
    when it is not one or is too big."""
    data = bytes(frame.buffer if hasattr(frame, "buffer") else frame)
    if len(data) > limit:
        raise MessageError("envelope_too_big", f"{len(data)} bytes")
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types on garbage
        raise MessageError("undecodable_envelope", type(exc).__name__) from None
    if not isinstance(message, dict):
        raise MessageError("undecodable_envelope", "not a map")
    return message


def pack_control(message: dict[str, Any]) -> bytes:
    """A control-path message (requests and replies are small msgpack maps)."""
    return pack_map(message)


def unpack_control(data: bytes) -> dict:
    """Decode a control-path message; raises MessageError on garbage."""
    return unpack_map(data)
