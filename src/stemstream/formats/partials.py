"""Analyses' partial results as message frames: the payload of an ANALYSIS message.

An ANALYSIS message is ``[b"A", envelope, header, array_0, array_1, ...]``: :mod:`.wire` owns the
kind byte and the envelope (scan, node, stream); this module owns the rest. The header is a
msgpack map::

    {"format": 1, "window": [lo, hi] | None, "info": {name: int}, "fingerprint": str | None,
     "arrays": [[analysis, key, dtype, shape, windowed], ...]}

and each array follows as one raw little-endian buffer, never inside msgpack, so it travels
without a copy. A ``windowed`` array holds only rows ``lo:hi`` of an array whose first axis is the
flat scan position. ``info`` carries small counts (frames, events, skipped frames), ``fingerprint``
a digest of the sender's analysis configuration (see stemstream.analysis.scan).

:func:`decode_partials` validates everything a peer could get wrong and raises MessageError with a
short reason; it never trusts sizes from the header.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from stemstream.transport.messages import MessageError, pack_map, unpack_map

PARTIALS_FORMAT = 1
MAX_PARTIAL_HEADER_BYTES = 256 * 1024
MAX_PARTIAL_ARRAYS = 1024
#: Largest length of an array axis and end of a window (far beyond any scan or frame).
_MAX_EXTENT = 2**40
_MAX_DIMS = 8
_MAX_FINGERPRINT = 64
#: dtypes an array may travel as (little endian, so both ends read the bytes the same way).
WIRE_DTYPES = {
    np.dtype(t).str: np.dtype(t) for t in ("<i8", "<u8", "<f8", "<f4", "<i4", "<u4", "<i2", "<u2", "i1", "u1", "?")
}
#: Names of analyses and of their arrays: they become HDF5 group and dataset names and parts of
#: PNG file names, so letters, digits and '_', starting with a letter, at most 64.
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


@dataclass
class PartialsMessage:
    """A decoded partials message. ``partials[analysis][key]`` are read-only arrays on the
    received buffers; keys in ``windowed`` hold only rows ``window[0]:window[1]`` of a
    per-position array. ``info``: small integers (frames, events, skipped)."""

    partials: dict[str, dict[str, np.ndarray]]
    window: tuple[int, int] | None = None
    windowed: set[tuple[str, str]] = field(default_factory=set)
    info: dict[str, int] = field(default_factory=dict)
    fingerprint: str | None = None


def encode_partials(
    partials: Mapping[str, Mapping[str, np.ndarray]],
    *,
    window: tuple[int, int] | None = None,
    windowed: Iterable[tuple[str, str]] = (),
    info: Mapping[str, int] | None = None,
    fingerprint: str | None = None,
) -> list:
    """Parts of a partials message: ``[header, array_0, array_1, ...]``; the arrays travel as raw
    buffers (no copy for contiguous little-endian arrays, so the caller must not change them
    before they are sent). ``windowed`` names the (analysis, key) arrays that hold rows
    ``window[0]:window[1]`` of a per-position array. ValueError for an array whose dtype cannot
    travel. The caller puts its own envelope (kind, scan, node) in front."""
    windowed = set(windowed)
    entries = []
    buffers = []
    for name, partial in partials.items():
        for key, value in partial.items():
            arr = np.ascontiguousarray(value)
            dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
            if dtype.str not in WIRE_DTYPES:
                raise ValueError(f"partial {name}/{key} has dtype {arr.dtype}, not one that travels")
            arr = arr.astype(dtype, copy=False)
            entries.append([name, key, dtype.str, list(arr.shape), (name, key) in windowed])
            buffers.append(arr.reshape(-1).view(np.uint8) if arr.size else b"")
    header = {
        "format": PARTIALS_FORMAT,
        "window": None if window is None else [int(window[0]), int(window[1])],
        "info": {str(k): int(v) for k, v in (info or {}).items()},
        "fingerprint": fingerprint,
        "arrays": entries,
    }
    return [pack_map(header), *buffers]


def decode_partials(parts: list) -> PartialsMessage:
    """Validate and decode :func:`encode_partials`' parts. Raises MessageError (reason keys:
    ``wrong_part_count``, ``undecodable_envelope``, ``envelope_too_big``, ``bad_envelope``,
    ``bad_dtype``, ``wrong_payload_size``) on anything a peer could get wrong."""
    if not parts:
        raise MessageError("wrong_part_count", "no parts")
    header = _header(parts[0])
    entries = header["arrays"]
    window = _window(header.get("window"))
    if len(parts) != 1 + len(entries):
        raise MessageError("wrong_part_count", f"{len(parts)} parts for {len(entries)} arrays")
    out: dict[str, dict[str, np.ndarray]] = {}
    windowed: set[tuple[str, str]] = set()
    for entry, part in zip(entries, parts[1:]):
        name, key, array, is_windowed = _array(entry, part)
        if key in out.get(name, {}):
            raise MessageError("bad_envelope", f"{name}/{key} appears twice")
        if is_windowed:
            if window is None or not array.ndim or array.shape[0] != window[1] - window[0]:
                raise MessageError("bad_envelope", f"{name}/{key}: windowed rows do not match the window")
            windowed.add((name, key))
        out.setdefault(name, {})[key] = array
    return PartialsMessage(out, window, windowed, header["info"], header.get("fingerprint"))


def _buffer(part) -> memoryview:
    """A received part (zmq Frame, bytes, array) as a flat byte view."""
    buf = part.buffer if hasattr(part, "buffer") else memoryview(part)
    return buf.cast("B") if buf.ndim != 1 or buf.format != "B" else buf


def _is_int(value) -> bool:
    """An int (not a bool) in 0 .. _MAX_EXTENT: an axis length or a window end."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_EXTENT


def _header(part) -> dict:
    """The msgpack header, with its arrays list, info map and fingerprint checked."""
    header = unpack_map(bytes(_buffer(part)), limit=MAX_PARTIAL_HEADER_BYTES)
    if header.get("format") != PARTIALS_FORMAT:
        raise MessageError("bad_envelope", f"not a partials header of format {PARTIALS_FORMAT}")
    entries = header.get("arrays")
    if not isinstance(entries, list) or len(entries) > MAX_PARTIAL_ARRAYS:
        raise MessageError("bad_envelope", f"arrays must be a list of at most {MAX_PARTIAL_ARRAYS} entries")
    info = header.setdefault("info", {})
    if not isinstance(info, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in info.items()
    ):
        raise MessageError("bad_envelope", "info must map names to integers")
    fp = header.get("fingerprint")
    if fp is not None and not (isinstance(fp, str) and len(fp) <= _MAX_FINGERPRINT):
        raise MessageError("bad_envelope", "fingerprint must be a short string")
    return header


def _window(window) -> tuple[int, int] | None:
    if window is None:
        return None
    if not (isinstance(window, list) and len(window) == 2 and all(_is_int(v) for v in window) and window[0] <= window[1]):
        raise MessageError("bad_envelope", f"window {window!r} is not [lo, hi] with 0 <= lo <= hi")
    return window[0], window[1]


def _array(entry, part) -> tuple[str, str, np.ndarray, bool]:
    """(analysis, key, array on the part's buffer, windowed) of one header entry and its part."""
    if not (isinstance(entry, list) and len(entry) == 5):
        raise MessageError("bad_envelope", "an array entry is not [analysis, key, dtype, shape, windowed]")
    name, key, dtype, shape, is_windowed = entry
    if not (isinstance(name, str) and NAME_RE.match(name) and isinstance(key, str) and NAME_RE.match(key)):
        raise MessageError("bad_envelope", "analysis and array names must be short identifiers")
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        raise MessageError("bad_dtype", f"{name}/{key}: {dtype!r}")
    if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS and all(_is_int(n) for n in shape)):
        raise MessageError("bad_envelope", f"{name}/{key}: shape {shape!r}")
    if not isinstance(is_windowed, bool):
        raise MessageError("bad_envelope", f"{name}/{key}: windowed must be a boolean")
    dt = WIRE_DTYPES[dtype]
    buf = _buffer(part)
    expected = math.prod(shape) * dt.itemsize
    if buf.nbytes != expected:
        raise MessageError("wrong_payload_size", f"{name}/{key}: {buf.nbytes} bytes, shape says {expected}")
    return name, key, np.frombuffer(buf, dt).reshape(shape), is_windowed
