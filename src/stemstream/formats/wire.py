"""Messages on the data path, as ZeroMQ multipart messages.

Every message starts with a one-byte kind and a msgpack envelope (a small map); big arrays follow
as raw frames, never inside msgpack, so they travel zero-copy.

- ``SECTORS``  producer -> (gateway) -> node group: ``[b"S", envelope, records]`` where records are
  raw 4D Camera sector records (header v5, formats.md section 2) of one module, all from one
  routing block of frames. The payload is the receivers' own file format, so a producer that must
  spill writes it to disk unchanged, and a gateway forwards it without decoding.
  envelope: scan, module, block, node (the node group it is routed to), n (records), spilled
  (blocks for this node group that the producer spilled to disk since its last message to it).
- ``END``      producer -> each node group: ``[b"E", envelope]``: the module has sent everything
  for the scan. envelope: scan, module, node, sent (records sent to that node group), spilled
  (records the module spilled to disk instead of sending, all node groups together),
  spilled_blocks (this node group's blocks spilled since the module's last message to it).
- ``EVENTS``   node group -> writer: ``[b"V", envelope, frame_numbers u32, positions i64,
  present u8, offsets i64, events u32 (, subpixel f32)]``; present is a bit mask of the modules
  that arrived; subpixel (optional: counting methods that give it) is each event's sub-pixel
  (row, col) in its frame, pixel centres at integers, 2 floats an event in the events' order.
  envelope: scan, node, n (frames), block, stream, ledger: the block's sector counts
  (stemstream.formats.ledger.sector_tally), which the writer adds when it commits the block,
  and counting (optional, as DONE's: how these frames were counted).
- ``ANALYSIS`` node group -> writer: ``[b"A", envelope, *partials]``: live analyses' partial
  results since the last such message; envelope: scan, node, stream. The partials' layout is
  :mod:`stemstream.formats.partials`'s (a header and raw arrays).
- ``DONE``     node group -> writer: ``[b"D", envelope]``: the node group finished the scan;
  envelope: scan, node, ledger (the sector counts no EVENTS message carried, e.g. late
  sectors), lost (sectors a producer reported sent to this node group that never arrived),
  counting (optional: how it counted, ``{method, model}``, the cluster method's single-electron
  model as counting.cluster_model.SingleElectronModel.attributes gives it; pipeline.writer.counting).

Decoding validates everything a peer could get wrong and raises MessageError with a short reason
(used as the rejection counter's key); it never trusts sizes or counts from the envelope.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from stemstream.core.config import COUNTING_METHODS
from stemstream.core.detector import FRAME_SHAPE, MAX_NODE_ID, N_MODULES, RECORD_BYTES, RECORD_DTYPE
from stemstream.formats.ledger import SECTOR_COUNTS
from stemstream.transport.messages import MAX_ENVELOPE_BYTES, MessageError, pack_map, unpack_map  # noqa: F401

SECTORS = b"S"
END = b"E"
EVENTS = b"V"
DONE = b"D"
ANALYSIS = b"A"
_KINDS = (SECTORS, END, EVENTS, DONE, ANALYSIS)

MAX_RECORDS_PER_MESSAGE = 4096
NO_BLOCK = -1  # an EVENTS message not tied to one routing block

_pack = pack_map
_unpack_envelope = unpack_map


def _envelope_of(parts: list, n_parts: int, kind: str) -> dict:
    """The decoded envelope of a message that must have exactly ``n_parts`` parts."""
    if len(parts) != n_parts:
        raise MessageError("wrong_part_count", f"{len(parts)} parts, {kind} has {n_parts}")
    return _unpack_envelope(parts[1])


def _int_field(envelope: dict, name: str, low: int = 0, high: int = 2**32 - 1) -> int:
    value = envelope.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageError("bad_envelope", f"{name} must be an integer")
    if not low <= value <= high:
        raise MessageError("bad_envelope", f"{name}={value} outside {low}..{high}")
    return value


def kind_of(parts: list) -> bytes:
    """The kind byte of a multipart message; raises MessageError for an unknown one."""
    if not parts:
        raise MessageError("empty_message")
    kind = bytes(parts[0].buffer if hasattr(parts[0], "buffer") else parts[0])
    if kind not in _KINDS:
        raise MessageError("unknown_kind", repr(kind[:8]))
    return kind


# -- sectors ---------------------------------------------------------------------------------------


def encode_sectors(scan: int, module: int, block: int, node: int, records: np.ndarray,
                   spilled: list[int] | None = None, stream: int = 0, shm: dict | None = None) -> list:
    """Parts of a SECTORS message; ``records`` (RECORD_DTYPE) is sent without a copy. ``stream``
    is the scan's routing generation (see core.scan_spec): each (node group, stream, module)
    is a stream in block order. With ``shm`` (a shared-memory descriptor, see
    transport.shared_memory) the records stay where they are and the payload is empty."""
    envelope = {"scan": scan, "module": module, "block": block, "node": node, "n": len(records),
                "spilled": list(spilled or []), "stream": stream}
    if shm is not None:
        envelope["shm"] = shm
        return [SECTORS, _pack(envelope), b""]
    return [SECTORS, _pack(envelope), records]


@dataclass
class SectorsMessage:
    scan: int
    module: int
    block: int
    node: int
    records: np.ndarray | None  # RECORD_DTYPE, a view on the received buffer (None: see shm)
    spilled: list[int]
    stream: int = 0
    shm: dict | None = None  # where the records lie in shared memory: {name, offset, nbytes}


def sectors_envelope(parts: list) -> dict:
    """Validate just the envelope of a SECTORS message (what a gateway needs to route it)."""
    envelope = _envelope_of(parts, 3, "SECTORS")
    _int_field(envelope, "scan")
    _int_field(envelope, "module", 0, N_MODULES - 1)
    _int_field(envelope, "block")
    _int_field(envelope, "node", 0, MAX_NODE_ID)
    _int_field(envelope, "n", 0, MAX_RECORDS_PER_MESSAGE)
    envelope["spilled"] = _block_list(envelope, "spilled")
    envelope["stream"] = _stream_field(envelope)
    if "shm" in envelope:
        shm = envelope["shm"]
        if not isinstance(shm, dict) or not isinstance(shm.get("name"), str) or len(shm["name"]) > 200:
            raise MessageError("bad_descriptor", "shm must be a map with a segment name")
        _int_field(shm, "offset", 0, 2**48)
        if _int_field(shm, "nbytes", 0, MAX_RECORDS_PER_MESSAGE * RECORD_BYTES) != envelope["n"] * RECORD_BYTES:
            raise MessageError("wrong_record_count", f"envelope says {envelope['n']}, descriptor {shm['nbytes']} bytes")
    return envelope


def _stream_field(envelope: dict) -> int:
    """The routing generation a message belongs to (absent: 0, the scan's first)."""
    envelope.setdefault("stream", 0)
    return _int_field(envelope, "stream", 0, MAX_NODE_ID)


def _block_list(envelope: dict, name: str) -> list[int]:
    value = envelope.get(name, [])
    if not isinstance(value, list) or len(value) > 1_000_000 or not all(
            isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 2**32 for b in value):
        raise MessageError("bad_envelope", f"{name} must be a list of block numbers")
    return value


def decode_sectors(parts: list) -> SectorsMessage:
    """Validate and decode a SECTORS message (sizes, module, record count)."""
    envelope = sectors_envelope(parts)
    payload = parts[2].buffer if hasattr(parts[2], "buffer") else memoryview(parts[2])
    size = payload.nbytes
    if "shm" in envelope:
        if size:
            raise MessageError("wrong_payload_size", f"{size} bytes beside a shared-memory descriptor")
        return SectorsMessage(envelope["scan"], envelope["module"], envelope["block"], envelope["node"], None,
                              envelope["spilled"], envelope["stream"], envelope["shm"])
    if size % RECORD_BYTES:
        raise MessageError("wrong_payload_size", f"{size} bytes is not a whole number of {RECORD_BYTES}-byte records")
    if size // RECORD_BYTES != envelope["n"]:
        raise MessageError("wrong_record_count", f"envelope says {envelope['n']}, payload holds {size // RECORD_BYTES}")
    records = np.frombuffer(payload, RECORD_DTYPE)
    return SectorsMessage(envelope["scan"], envelope["module"], envelope["block"], envelope["node"], records,
                          envelope["spilled"], envelope["stream"])


# -- end of a module's scan -------------------------------------------------------------------------


def encode_end(scan: int, module: int, node: int, sent: int, spilled: int = 0,
               spilled_blocks: list[int] | None = None, stream: int = 0) -> list:
    envelope = {"scan": scan, "module": module, "node": node, "sent": int(sent), "spilled": int(spilled),
                "spilled_blocks": list(spilled_blocks or []), "stream": stream}
    return [END, _pack(envelope)]


@dataclass
class EndMessage:
    scan: int
    module: int
    node: int
    sent: int
    spilled: int
    spilled_blocks: list[int]
    stream: int = 0


def end_envelope(parts: list) -> dict:
    """Validate the envelope of an END message."""
    envelope = _envelope_of(parts, 2, "END")
    _int_field(envelope, "scan")
    _int_field(envelope, "module", 0, N_MODULES - 1)
    _int_field(envelope, "node", 0, MAX_NODE_ID)
    _int_field(envelope, "sent", 0, 2**40)
    _int_field(envelope, "spilled", 0, 2**40)
    envelope["spilled_blocks"] = _block_list(envelope, "spilled_blocks")
    _stream_field(envelope)
    return envelope


def decode_end(parts: list) -> EndMessage:
    e = end_envelope(parts)
    return EndMessage(e["scan"], e["module"], e["node"], e["sent"], e["spilled"], e["spilled_blocks"], e["stream"])


# -- counted events ---------------------------------------------------------------------------------


def encode_events(scan: int, node: int, frame_numbers, positions, present, offsets, events,
                  block: int = NO_BLOCK, stream: int = 0, ledger: dict | None = None, subpixel=None,
                  counting: dict | None = None) -> list:
    """An EVENTS message: the counted frames of routing ``block`` (NO_BLOCK: not tied to one),
    counted by ``node`` in routing generation ``stream``, with the block's sector counts and,
    when given, ``subpixel`` (events, 2): each event's sub-pixel (row, col), and ``counting``:
    how they were counted, as encode_done's (so that the file names the model of every frame in
    it, a failed-over node group's too: pipeline.writer.counting)."""
    envelope = {"scan": scan, "node": node, "n": len(frame_numbers), "block": block, "stream": stream}
    if ledger is not None:
        envelope["ledger"] = ledger
    if counting is not None:
        envelope["counting"] = counting
    parts = [
        EVENTS,
        _pack(envelope),
        np.ascontiguousarray(frame_numbers, np.uint32),
        np.ascontiguousarray(positions, np.int64),
        np.ascontiguousarray(present, np.uint8),
        np.ascontiguousarray(offsets, np.int64),
        np.ascontiguousarray(events, np.uint32),
    ]
    if subpixel is not None:
        parts.append(np.ascontiguousarray(subpixel, np.float32).reshape(-1))
    return parts


@dataclass
class EventsMessage:
    scan: int
    node: int
    frame_numbers: np.ndarray
    positions: np.ndarray
    present: np.ndarray
    offsets: np.ndarray
    events: np.ndarray
    block: int = -1
    stream: int = 0
    ledger: dict | None = None  # the block's sector counts (stemstream.formats.ledger.sector_tally)
    subpixel: np.ndarray | None = None  # (events, 2) float32 sub-pixel (row, col) of each event, if sent
    counting: dict | None = None  # how they were counted: {"method": ..., "model": {...} or None}, if said


def _tally_field(envelope: dict, others: tuple[str, ...] = ()) -> dict | None:
    """A message's sector counts (EVENTS: optional; DONE: with ``others`` fields besides),
    checked: per-module lists of counts, reasons mapped to counts, frames spilled."""
    tally = envelope.get("ledger")
    if tally is None:
        return None
    if not isinstance(tally, dict) or len(tally) > 8 + len(others):
        raise MessageError("bad_envelope", "ledger must be a small map")

    def count(v) -> bool:
        return type(v) is int and 0 <= v < 2**32  # (not bool, a subclass of int)

    for name, value in tally.items():
        if name in SECTOR_COUNTS:
            ok = type(value) is list and len(value) == N_MODULES and all([count(v) for v in value])
        elif name == "rejected_reasons":
            ok = isinstance(value, dict) and len(value) <= 64 and all(
                is_attribute_name(k) and count(v) for k, v in value.items())
        elif name == "frames_spilled":
            ok = count(value)
        elif name in others:
            continue
        else:
            ok = False
        if not ok:
            raise MessageError("bad_envelope", f"ledger field {name!r} is not a count of the right shape")
    return tally


def _array(part, dtype, what: str) -> np.ndarray:
    buf = part.buffer if hasattr(part, "buffer") else memoryview(part)
    if buf.nbytes % np.dtype(dtype).itemsize:
        raise MessageError("wrong_payload_size", f"{what}: {buf.nbytes} bytes")
    return np.frombuffer(buf, dtype)


def decode_events(parts: list, n_pixels: int, frame_shape: tuple[int, int] = FRAME_SHAPE) -> EventsMessage:
    """Validate an EVENTS message: consistent lengths, monotonic offsets, pixels inside the frame
    (``n_pixels`` of them), sub-pixel positions (if sent) finite and inside the (rows, cols)
    ``frame_shape``."""
    if len(parts) != 8:  # without the optional sub-pixel positions
        envelope = _envelope_of(parts, 7, "EVENTS")
    else:
        envelope = _unpack_envelope(parts[1])
    scan = _int_field(envelope, "scan")
    node = _int_field(envelope, "node", 0, MAX_NODE_ID)
    n = _int_field(envelope, "n", 0, 1 << 24)
    envelope.setdefault("block", NO_BLOCK)
    block = _int_field(envelope, "block", NO_BLOCK, 2**32 - 1)
    stream = _stream_field(envelope)
    tally = _tally_field(envelope)
    counting = counting_field(envelope)
    frame_numbers = _array(parts[2], np.uint32, "frame numbers")
    positions = _array(parts[3], np.int64, "positions")
    present = _array(parts[4], np.uint8, "present")
    offsets = _array(parts[5], np.int64, "offsets")
    events = _array(parts[6], np.uint32, "events")
    if not (len(frame_numbers) == len(positions) == len(present) == n and len(offsets) == n + 1):
        raise MessageError("inconsistent_lengths")
    # slices, not np.diff: 2 us a call against 20, once a message
    if n and (offsets[0] != 0 or offsets[-1] != len(events) or bool((offsets[1:] < offsets[:-1]).any())):
        raise MessageError("bad_offsets")
    if len(events) and int(events.max()) >= n_pixels:
        raise MessageError("pixel_outside_frame")
    if n and not _each_frame_ascending(events, offsets):
        raise MessageError("unsorted_events", "a frame's pixels must be strictly increasing (sorted, none twice)")
    subpixel = _subpixel(parts[7], len(events), frame_shape) if len(parts) == 8 else None
    return EventsMessage(scan, node, frame_numbers, positions, present, offsets, events, block, stream, tally,
                         subpixel, counting)


def _each_frame_ascending(events: np.ndarray, offsets: np.ndarray) -> bool:
    """Each frame's pixels strictly increasing, as the counting gives them and the file's layout
    needs them (stempy's sorted unique lists): a message that broke it passed decoding, failed
    the file's write at its commit and killed the writer, and, journaled by then, its restarted
    successor too. ``offsets`` checked already (from 0 to len(events), not decreasing)."""
    descending = events[1:] <= events[:-1]  # (no subtraction: unsigned)
    ends = offsets[1:-1]
    descending[ends[(ends > 0) & (ends < len(events))] - 1] = False  # a frame's last pixel to the next one's first
    return not bool(descending.any())


def _subpixel(part, n_events: int, frame_shape: tuple[int, int]) -> np.ndarray:
    """An EVENTS message's sub-pixel positions as (n_events, 2), checked: one (row, col) an
    event, finite, within the frame's pixels (whose centres are at integers)."""
    values = _array(part, np.float32, "sub-pixel positions")
    if len(values) != 2 * n_events:
        raise MessageError("bad_subpixel", f"{len(values)} values for {n_events} events")
    points = values.reshape(n_events, 2)
    if n_events and not (np.isfinite(points).all() and points.min() >= -0.5
                         and points[:, 0].max() <= frame_shape[0] - 0.5 and points[:, 1].max() <= frame_shape[1] - 0.5):
        raise MessageError("bad_subpixel", "a position is not a number or lies outside the frame")
    return points


def concat_events(messages: list[EventsMessage]) -> EventsMessage:
    """One message of the frames of several decoded EVENTS messages of one node group's stream,
    in their order (block NO_BLOCK, no sector counts: the caller keeps those per block). Their
    sub-pixel positions come along when every message with events has them, and the first's
    ``counting`` (one stream counts one way)."""
    first = messages[0]
    if len(messages) == 1:
        return EventsMessage(first.scan, first.node, first.frame_numbers, first.positions, first.present,
                             first.offsets, first.events, NO_BLOCK, first.stream, subpixel=first.subpixel,
                             counting=first.counting)
    bases = np.cumsum([0] + [int(m.offsets[-1]) for m in messages[:-1]])
    offsets = np.concatenate([np.zeros(1, np.int64)] + [m.offsets[1:] + base for m, base in zip(messages, bases)])
    events = np.concatenate([m.events for m in messages])
    subpixel = None
    with_events = [m for m in messages if len(m.events)]  # (a block without events may lack them)
    if any(m.subpixel is not None for m in messages) and all(m.subpixel is not None for m in with_events):
        subpixel = np.concatenate([np.empty((0, 2), np.float32)] +
                                  [m.subpixel for m in messages if m.subpixel is not None]).reshape(-1, 2)
    return EventsMessage(first.scan, first.node, *(np.concatenate([getattr(m, name) for m in messages])
                                                   for name in ("frame_numbers", "positions", "present")),
                         offsets, events, NO_BLOCK, first.stream, subpixel=subpixel, counting=first.counting)


# -- a node group's end of scan ---------------------------------------------------------------------


def encode_done(scan: int, node: int, ledger: dict, lost: list[int], stream: int = 0,
                counting: dict | None = None) -> list:
    """A DONE message; ``counting``: ``{"method": ..., "model": {...} or None}``, how ``node`` counted."""
    envelope = {"scan": scan, "node": node, "ledger": ledger, "lost": [int(x) for x in lost], "stream": stream}
    if counting is not None:
        envelope["counting"] = counting
    return [DONE, _pack(envelope)]


@dataclass
class DoneMessage:
    scan: int
    node: int
    ledger: dict
    lost: list[int]
    stream: int = 0
    counting: dict | None = None  # {"method": str, "model": {name: number} or None}


def decode_done(parts: list) -> DoneMessage:
    envelope = _envelope_of(parts, 2, "DONE")
    ledger = _tally_field(envelope, others=("modules_ended", "sectors_spilled_by_producers", "failed"))
    lost = envelope.get("lost")
    if not isinstance(ledger, dict) or not isinstance(lost, list) or len(lost) > N_MODULES or not all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**32 for x in lost):
        raise MessageError("bad_envelope", "ledger must be a map and lost a list of counts per module")
    return DoneMessage(_int_field(envelope, "scan"), _int_field(envelope, "node", 0, MAX_NODE_ID), ledger,
                       [int(x) for x in lost], _stream_field(envelope), counting_field(envelope))


def counting_field(envelope: dict) -> dict | None:
    """An EVENTS or DONE message's ``counting``, checked: a known method and a small map of numbers (or none)."""
    counting = envelope.get("counting")
    if counting is None:
        return None
    if not isinstance(counting, dict) or set(counting) - {"method", "model"} or \
            counting.get("method") not in COUNTING_METHODS:
        raise MessageError("bad_envelope", f"counting must name one of the methods {', '.join(COUNTING_METHODS)}")
    model = counting.get("model")
    if model is not None and not (isinstance(model, dict) and len(model) <= 8 and all(
            is_attribute_name(k) and type(v) in (int, float) for k, v in model.items())):
        raise MessageError("bad_envelope", "a counting model must be a small map of names to numbers")
    return {"method": counting["method"], "model": model}


def is_attribute_name(name) -> bool:
    """A name a message gives that the file keeps as an HDF5 attribute's (a counting model's
    numbers, a ledger's rejection reasons): an identifier of at most 64 characters. No attribute
    can be named with a '/' or a NUL, nor be unnamed: such a name, forged, failed the file's
    close and killed the writer, and, journaled with its block, the restarted writer too."""
    return isinstance(name, str) and _ATTRIBUTE_NAME.fullmatch(name) is not None


_ATTRIBUTE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


# -- partial analyses -------------------------------------------------------------------------------


def encode_analysis(scan: int, node: int, partial_parts: list, stream: int = 0) -> list:
    """Partial analyses of the frames ``node`` sent since its last ANALYSIS message of this
    (scan, stream), ``partial_parts`` from stemstream.formats.partials.encode_partials; the writer
    commits those frames when it arrives (see pipeline.writer.scan)."""
    return [ANALYSIS, _pack({"scan": scan, "node": node, "stream": stream}), *partial_parts]


def analysis_envelope(parts: list) -> dict:
    """Validate the envelope of an ANALYSIS message; the partials (parts[2:]) are decoded and
    checked by stemstream.formats.partials.decode_partials when the writer merges them."""
    if len(parts) < 3:
        raise MessageError("wrong_part_count", f"{len(parts)} parts, ANALYSIS has at least 3")
    envelope = _unpack_envelope(parts[1])
    _int_field(envelope, "scan")
    _int_field(envelope, "node", 0, MAX_NODE_ID)
    _stream_field(envelope)
    return envelope
