"""The analysis interface: one analysis = a partial result, a merge, a finish and a view.

Architecture rule 5 (one code path for files and streams): an analysis is written once and runs on
node groups (live, per batch of counted frames), in the writer (merging the node groups' partials),
offline on a counted file, and in tests, always through the same four steps:

1. ``new_partial(scan_shape)``: zeroed arrays (a dict of numpy arrays) that hold everything the
   analysis needs to accumulate, e.g. per-position sums and counts;
2. ``update(partial, positions, events, offsets)``: add a batch of counted frames, frame ``i`` at
   flat scan position ``positions[i]`` with electrons ``events[offsets[i]:offsets[i + 1]]`` (flat
   pixel indices ``row * frame_cols + col``, the counting kernel's layout). A numba kernel that
   releases the GIL; no Python per frame or per electron;
3. ``merge(into, other)``: combine two partials (default: add the arrays). Partials of any split of
   the frames, merged in any order, give exactly the partial of one pass (integer sums);
4. ``finish(partial, scan_shape)``: the final results (e.g. CoM = sums / counts), and
   ``show(results)``: which of them to render as images, and how.

:class:`ScanAnalyses` holds the analyses of one scan with their partials, counts what went in,
and moves partials between processes (:meth:`ScanAnalyses.take_partials` on a node group,
:meth:`ScanAnalyses.merge_parts` in the writer) with :func:`encode_partials` /
:func:`decode_partials`: a msgpack header plus raw array buffers, validated like
``formats.wire`` messages (a peer's garbage raises :class:`~stemstream.formats.wire.MessageError`).

The registry of analysis classes (:data:`ANALYSES`, :func:`register`) lives here too, so that
analysis modules can register themselves without importing the package's ``__init__``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import numpy as np
from numba import njit

from stemstream.core.detector import FRAME_SHAPE
from stemstream.transport.messages import MessageError

DEFAULT_FRAME_SHAPE = FRAME_SHAPE  # (rows, cols)

#: Kinds of colour scaling :func:`stemstream.analysis.run.render_png` knows.
VIEW_KINDS = ("sequential", "diverging", "log")

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


def check_name(what: str, name: Any) -> str:
    """``name`` if it can be an HDF5 group name and part of a PNG file name, else ValueError."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"{what} {name!r} must start with a letter and hold only letters, digits and '_' (at most 64)"
        )
    return name


def check_shape(what: str, shape: Any) -> tuple[int, int]:
    """(rows, cols) as two positive ints, else ValueError."""
    try:
        rows, cols = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be (rows, cols), two positive integers, got {shape!r}") from None
    if rows <= 0 or cols <= 0:
        raise ValueError(f"{what} must be (rows, cols), two positive integers, got {shape!r}")
    return rows, cols


def check_point(what: str, value: Any) -> tuple[float, float]:
    """A (row, col) point in pixels as two finite floats, else ValueError."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be (row, col) in pixels, two numbers, got {value!r}") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return a, b


def check_radii(what: str, value: Any) -> tuple[float, float]:
    """(inner, outer) radii in pixels with 0 <= inner < outer, else ValueError."""
    try:
        inner, outer = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be (inner, outer) radii in pixels, two numbers, got {value!r}") from None
    if not (math.isfinite(inner) and math.isfinite(outer)) or inner < 0:
        raise ValueError(f"{what} radii must be finite and >= 0, got {value!r}")
    if not inner < outer:
        raise ValueError(f"{what}: the inner radius must be smaller than the outer one, got {value!r}")
    return inner, outer


def default_center(frame_shape: tuple[int, int]) -> tuple[float, float]:
    """stempy's default centre: (round(rows / 2), round(cols / 2)), halves rounded up (C++ round)."""
    return tuple(float(math.floor(n / 2 + 0.5)) for n in frame_shape)  # type: ignore[return-value]


@dataclass(frozen=True)
class View:
    """A 2-D image to render and how to scale it: 'sequential' (grey, percentile clipped),
    'diverging' (blue-white-red about the median) or 'log' (grey, log scale)."""

    image: np.ndarray
    kind: str = "sequential"

    def __post_init__(self) -> None:
        if self.kind not in VIEW_KINDS:
            raise ValueError(f"view kind must be one of {VIEW_KINDS}, got {self.kind!r}")
        if np.ndim(self.image) != 2:
            raise ValueError(f"a view must be a 2-D image, got shape {np.shape(self.image)}")


class Analysis:
    """Base class of analyses. Subclass it, set :attr:`name`, and write :meth:`new_partial`,
    :meth:`update` and :meth:`finish` (and :meth:`show` if the default does not suit).

    An instance holds its parameters (checked in ``__init__``, raising ValueError with a clear
    message) for frames of ``frame_shape`` (rows, cols); it is reused for every scan. ``params``
    is a plain dict (numbers, strings, lists, dicts) stored as attributes next to the results.
    """

    #: Unique name: the HDF5 group ``/analysis/<name>`` and part of the PNG file names.
    name: ClassVar[str] = ""
    #: Keys of partial arrays whose first axis is the flat scan position (n_positions, ...).
    #: Only the rows touched since the last send travel from node groups to the writer; other
    #: arrays travel whole. Leaving a key out is always correct, just bigger on the wire.
    per_position: ClassVar[tuple[str, ...]] = ()
    #: One line per result, stored as the dataset's 'description' attribute.
    descriptions: ClassVar[dict[str, str]] = {}

    def __init__(self, frame_shape: tuple[int, int] = DEFAULT_FRAME_SHAPE):
        check_name("analysis name", self.name)
        self.frame_shape = check_shape("frame_shape", frame_shape)
        self.n_pixels = self.frame_shape[0] * self.frame_shape[1]
        self.params: dict[str, Any] = {}

    # -- to write ---------------------------------------------------------------------------------

    def new_partial(self, scan_shape: tuple[int, int]) -> dict[str, np.ndarray]:
        """Zeroed partial arrays for a scan of ``scan_shape`` (rows, cols)."""
        raise NotImplementedError

    def update(self, partial: dict[str, np.ndarray], positions: np.ndarray, events: np.ndarray, offsets: np.ndarray) -> None:
        """Add a batch of frames to ``partial`` in place (a compiled kernel).

        positions (n,) int64 flat scan positions; events uint32 flat pixel indices; offsets (n + 1,)
        int64. Called by :meth:`accumulate` / :class:`ScanAnalyses` after the batch was checked
        (offsets monotonic and inside events, every pixel inside the frame). Positions are *not*
        checked: a kernel must skip frames whose position lies outside ``0 .. n_positions - 1``
        (e.g. ``if p < 0 or p >= n: continue``), which keeps it memory safe whoever calls it.
        """
        raise NotImplementedError

    def finish(self, partial: dict[str, np.ndarray], scan_shape: tuple[int, int]) -> dict[str, np.ndarray]:
        """Final results from a (merged) partial; must not modify ``partial``."""
        raise NotImplementedError

    # -- defaults ---------------------------------------------------------------------------------

    def merge(self, into: dict[str, np.ndarray], other: Mapping[str, np.ndarray]) -> None:
        """Merge ``other`` into ``into`` in place. Default: add array by array. ``into``'s
        per-position arrays may be views on a window of rows, matching ``other``'s."""
        for key, value in other.items():
            into[key] += value

    def reset(self, partial: dict[str, np.ndarray]) -> None:
        """Make ``partial`` the identity of :meth:`merge` again (default: zeros). Per-position
        arrays may be views on a window of rows."""
        for value in partial.values():
            value.fill(0)

    def show(self, results: Mapping[str, np.ndarray]) -> dict[str, View]:
        """Images to render, by name (a PNG each). Default: every 2-D result, grey scale."""
        return {key: View(value) for key, value in results.items() if np.ndim(value) == 2}

    def result_attrs(self, results: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
        """Extra attributes per result dataset (e.g. a detector's radii). Default: none."""
        return {}

    # -- provided ---------------------------------------------------------------------------------

    def accumulate(self, partial: dict[str, np.ndarray], positions, events, offsets) -> None:
        """Check a batch (ValueError if it is inconsistent) and :meth:`update` ``partial`` with it.
        Frames outside the scan are left to the kernel here; :class:`ScanAnalyses` drops them."""
        positions, events, offsets = check_batch(positions, events, offsets, self.n_pixels)
        if len(positions):
            self.update(partial, positions, events, offsets)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}(frame_shape={self.frame_shape}, {params})"


@njit(nogil=True, cache=True)
def _batch_stats(positions, events, offsets, n_positions):
    """One pass over a batch: (offsets_ok, min event, max event, frames inside the scan, lowest and
    highest position inside, events of frames inside)."""
    n = positions.shape[0]
    ok = offsets[0] >= 0 and offsets[n] <= events.shape[0]
    for i in range(n):
        if offsets[i + 1] < offsets[i]:
            ok = False
    if not ok:
        return False, 0, 0, 0, 0, 0, 0
    ev_min = np.int64(0)
    ev_max = np.int64(0)
    if offsets[n] > offsets[0]:
        first = np.uint64(offsets[0])
        ev_min = np.int64(events[first])
        ev_max = ev_min
        for j in range(np.uint64(offsets[n]) - first):  # unsigned indices: the loop vectorises
            e = np.int64(events[first + j])
            ev_min = min(ev_min, e)
            ev_max = max(ev_max, e)
    n_in = 0
    lo = n_positions
    hi = -1
    n_events = np.int64(0)
    for i in range(n):
        p = positions[i]
        if p >= 0 and p < n_positions:
            n_in += 1
            lo = min(lo, p)
            hi = max(hi, p)
            n_events += offsets[i + 1] - offsets[i]
    return True, ev_min, ev_max, n_in, lo, hi + 1, n_events


def _checked(positions, events, offsets, n_pixels: int, n_positions: int):
    positions = np.asarray(positions)
    events = np.asarray(events)
    offsets = np.asarray(offsets)
    if positions.ndim != 1 or (positions.size and positions.dtype.kind not in "iu"):
        raise ValueError(f"positions must be a 1-D integer array, got dtype {positions.dtype} shape {positions.shape}")
    if events.ndim != 1 or (events.size and events.dtype.kind not in "iu"):
        raise ValueError(f"events must be a 1-D integer array, got dtype {events.dtype} shape {events.shape}")
    if offsets.ndim != 1 or len(offsets) != len(positions) + 1 or (offsets.size and offsets.dtype.kind not in "iu"):
        raise ValueError(f"offsets must be {len(positions) + 1} integers (one more than positions), got shape {offsets.shape}")
    positions = np.ascontiguousarray(positions, np.int64)
    offsets = np.ascontiguousarray(offsets, np.int64)
    if events.dtype.kind == "u" and events.dtype.itemsize > 4:
        events = events.astype(np.int64)  # uint64: numba would mix signs; values are checked below
    events = np.ascontiguousarray(events)
    stats = _batch_stats(positions, events, offsets, n_positions)
    if not stats[0]:
        raise ValueError("offsets must be non-decreasing and within events")
    if stats[1] < 0 or stats[2] >= n_pixels:
        raise ValueError(f"an event's pixel index lies outside the frame of {n_pixels} pixels")
    if events.dtype != np.uint32:
        events = events.astype(np.uint32)
    return positions, events, offsets, stats


def check_batch(positions, events, offsets, n_pixels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch of counted frames as contiguous int64 / uint32 / int64 arrays; ValueError if the
    arrays disagree, offsets are not monotonic or leave ``events``, or a pixel is outside the frame."""
    positions, events, offsets, _ = _checked(positions, events, offsets, n_pixels, 0)
    return positions, events, offsets


def select_frames(positions: np.ndarray, events: np.ndarray, offsets: np.ndarray, keep: np.ndarray):
    """The frames of a checked batch where ``keep`` (n,) bool is set, as new arrays."""
    counts = np.diff(offsets)
    first = offsets[0]
    event_keep = np.repeat(keep, counts)
    new_offsets = np.zeros(int(np.count_nonzero(keep)) + 1, np.int64)
    np.cumsum(counts[keep], out=new_offsets[1:])
    return positions[keep], events[first : offsets[-1]][event_keep], new_offsets


@njit(nogil=True, cache=True, inline="always")
def pixel_row_col(e, cols, inv_cols):
    """(row, col) of flat pixel index ``e`` in frames of ``cols`` columns, ``inv_cols = 1.0 / cols``.

    For kernels: a multiply instead of an integer division (several times slower). Exact:
    ``(e + 0.5) / cols`` is at least ``0.5 / cols`` away from an integer, far more than the
    rounding error of the product for any ``e`` below 2**50."""
    e = np.int64(e)
    r = np.int64((e + 0.5) * inv_cols)
    return r, e - r * cols


# ------------------------------------------------------------------------------------------------
# registry

#: Analysis classes by name. Fill it with :func:`register`.
ANALYSES: dict[str, type[Analysis]] = {}


def register(analysis: type[Analysis]) -> type[Analysis]:
    """Register an analysis class under its ``name`` (usable as a class decorator); returns it.

    Registering another class under a taken name raises ValueError (re-registering the same
    class, e.g. on a module reload, replaces it)."""
    if not (isinstance(analysis, type) and issubclass(analysis, Analysis)):
        raise ValueError(f"register() takes an Analysis subclass, got {analysis!r}")
    name = check_name("analysis name", analysis.name)
    old = ANALYSES.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (analysis.__module__, analysis.__qualname__):
        raise ValueError(f"an analysis named {name!r} is already registered ({old.__module__}.{old.__qualname__})")
    ANALYSES[name] = analysis
    return analysis


# ------------------------------------------------------------------------------------------------
# partials on the wire

PARTIALS_FORMAT = 1
MAX_PARTIAL_HEADER_BYTES = 256 * 1024
MAX_PARTIAL_ARRAYS = 1024
_WIRE_DTYPES = {np.dtype(t).str: np.dtype(t) for t in ("<i8", "<u8", "<f8", "<f4", "<i4", "<u4", "<i2", "<u2", "i1", "u1", "?")}


def _buffer(part) -> memoryview:
    buf = part.buffer if hasattr(part, "buffer") else memoryview(part)
    return buf.cast("B") if buf.ndim != 1 or buf.format != "B" else buf


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
    """Parts of a partials message: ``[header, array_0, array_1, ...]``; the header is msgpack,
    the arrays travel as raw buffers (no copy for contiguous arrays). ``windowed`` names the
    (analysis, key) arrays that hold rows ``window[0]:window[1]`` of a per-position array.
    ``fingerprint`` (a short string, see :func:`fingerprint`) lets the receiver check that both
    sides configured the same analyses. The caller puts its own envelope (kind, scan, node) in front."""
    windowed = set(windowed)
    entries = []
    buffers = []
    for name, partial in partials.items():
        for key, value in partial.items():
            arr = np.ascontiguousarray(value)
            dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
            if dtype.str not in _WIRE_DTYPES:
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
    return [msgpack.packb(header, use_bin_type=True), *buffers]


def decode_partials(parts: list) -> PartialsMessage:
    """Validate and decode :func:`encode_partials`' parts. Raises MessageError (reason keys:
    ``wrong_part_count``, ``undecodable_envelope``, ``envelope_too_big``, ``bad_envelope``,
    ``bad_dtype``, ``wrong_payload_size``) on anything a peer could get wrong."""
    if not parts:
        raise MessageError("wrong_part_count", "no parts")
    head = bytes(_buffer(parts[0]))
    if len(head) > MAX_PARTIAL_HEADER_BYTES:
        raise MessageError("envelope_too_big", f"{len(head)} bytes")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types on garbage
        raise MessageError("undecodable_envelope", type(exc).__name__) from None
    if not isinstance(header, dict) or header.get("format") != PARTIALS_FORMAT:
        raise MessageError("bad_envelope", "not a partials header of format 1")
    entries = header.get("arrays")
    info = header.get("info", {})
    window = header.get("window")
    if not isinstance(entries, list) or len(entries) > MAX_PARTIAL_ARRAYS:
        raise MessageError("bad_envelope", "arrays must be a list of at most 1024 entries")
    if not isinstance(info, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in info.items()
    ):
        raise MessageError("bad_envelope", "info must map names to integers")
    if window is not None:
        if (
            not isinstance(window, list)
            or len(window) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in window)
            or not 0 <= window[0] <= window[1] <= 2**40
        ):
            raise MessageError("bad_envelope", f"window {window!r} is not [lo, hi] with 0 <= lo <= hi")
        window = (window[0], window[1])
    fp = header.get("fingerprint")
    if fp is not None and not (isinstance(fp, str) and len(fp) <= 64):
        raise MessageError("bad_envelope", "fingerprint must be a short string")
    if len(parts) != 1 + len(entries):
        raise MessageError("wrong_part_count", f"{len(parts)} parts for {len(entries)} arrays")
    out: dict[str, dict[str, np.ndarray]] = {}
    windowed: set[tuple[str, str]] = set()
    for entry, part in zip(entries, parts[1:]):
        if not (isinstance(entry, list) and len(entry) == 5):
            raise MessageError("bad_envelope", "an array entry is not [analysis, key, dtype, shape, windowed]")
        name, key, dtype, shape, is_windowed = entry
        if not (isinstance(name, str) and _NAME_RE.match(name) and isinstance(key, str) and _NAME_RE.match(key)):
            raise MessageError("bad_envelope", "analysis and array names must be short identifiers")
        if name in out and key in out[name]:
            raise MessageError("bad_envelope", f"{name}/{key} appears twice")
        if not isinstance(dtype, str) or dtype not in _WIRE_DTYPES:
            raise MessageError("bad_dtype", f"{name}/{key}: {dtype!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 2**40 for n in shape)
        ):
            raise MessageError("bad_envelope", f"{name}/{key}: shape {shape!r}")
        if not isinstance(is_windowed, bool):
            raise MessageError("bad_envelope", f"{name}/{key}: windowed must be a boolean")
        dt = _WIRE_DTYPES[dtype]
        buf = _buffer(part)
        expected = math.prod(shape) * dt.itemsize
        if buf.nbytes != expected:
            raise MessageError("wrong_payload_size", f"{name}/{key}: {buf.nbytes} bytes, shape says {expected}")
        if is_windowed:
            if window is None or not shape or shape[0] != window[1] - window[0]:
                raise MessageError("bad_envelope", f"{name}/{key}: windowed rows do not match the window")
            windowed.add((name, key))
        out.setdefault(name, {})[key] = np.frombuffer(buf, dt).reshape(shape)
    return PartialsMessage(out, window, windowed, info, fp)


def fingerprint(analyses: Iterable[Analysis]) -> str:
    """A short digest of the analyses' names, classes, frame shape and parameters: equal on a node
    group and the writer when both built the same analyses."""
    desc = [
        [a.name, f"{type(a).__module__}.{type(a).__qualname__}", list(a.frame_shape), a.params] for a in analyses
    ]
    text = json.dumps(desc, sort_keys=True, default=repr)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# the analyses of one scan


class ScanAnalyses:
    """The analyses of one scan and their partial results.

    - node group, per batch of counted frames: :meth:`accumulate`; every so often
      :meth:`take_partials` (encodes what was added since the last take, then resets it);
    - writer: :meth:`merge_parts` for each message (validated; a bad one raises MessageError and
      changes nothing), then :meth:`finish` / :meth:`views` for live images or the end;
    - offline and tests: :meth:`accumulate` then :meth:`finish`; :meth:`merge` combines two.

    Frames whose position lies outside the scan are skipped and counted (``frames_skipped``).
    """

    def __init__(self, analyses: Iterable[Analysis], scan_shape: tuple[int, int]):
        self.analyses = list(analyses)
        names = [a.name for a in self.analyses]
        if len(set(names)) != len(names):
            raise ValueError(f"analysis names must be unique, got {names}")
        shapes = {a.frame_shape for a in self.analyses}
        if len(shapes) > 1:
            raise ValueError(f"analyses disagree on the frame shape: {sorted(shapes)}")
        self.frame_shape = shapes.pop() if shapes else DEFAULT_FRAME_SHAPE
        self.n_pixels = self.frame_shape[0] * self.frame_shape[1]
        self.scan_shape = check_shape("scan_shape", scan_shape)
        self.n_positions = self.scan_shape[0] * self.scan_shape[1]
        self.partials = {a.name: a.new_partial(self.scan_shape) for a in self.analyses}
        for a in self.analyses:
            for key in a.per_position:
                arr = self.partials[a.name].get(key)
                if arr is None or arr.ndim < 1 or arr.shape[0] != self.n_positions:
                    raise ValueError(f"{a.name}: per-position partial {key!r} must have {self.n_positions} rows")
        self.frames = 0
        self.events = 0
        self.frames_skipped = 0
        self.fingerprint = fingerprint(self.analyses)
        self._since = self._empty_delta()

    @staticmethod
    def _empty_delta() -> dict:
        return {"lo": None, "hi": None, "frames": 0, "events": 0, "skipped": 0}

    def __getitem__(self, name: str) -> Analysis:
        for a in self.analyses:
            if a.name == name:
                return a
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.analyses]

    # -- node group / offline -----------------------------------------------------------------------

    def accumulate(self, positions, events, offsets) -> None:
        """Add a batch of counted frames to every analysis (checked once; ValueError if bad)."""
        positions, events, offsets, stats = _checked(positions, events, offsets, self.n_pixels, self.n_positions)
        n = len(positions)
        if n == 0:
            return
        _, _, _, n_in, lo, hi, n_events = stats
        skipped = n - n_in
        if skipped:
            positions, events, offsets = select_frames(positions, events, offsets, (positions >= 0) & (positions < self.n_positions))
        if n_in:
            for a in self.analyses:
                a.update(self.partials[a.name], positions, events, offsets)
        self.frames += n_in
        self.events += n_events
        self.frames_skipped += skipped
        d = self._since
        d["frames"] += n_in
        d["events"] += n_events
        d["skipped"] += skipped
        if n_in:
            d["lo"] = lo if d["lo"] is None else min(d["lo"], lo)
            d["hi"] = hi if d["hi"] is None else max(d["hi"], hi)

    @property
    def pending(self) -> int:
        """Frames (and skipped frames) accumulated since the last :meth:`take_partials`: 0 means
        a take would only send zeros, so a timer may skip it."""
        return self._since["frames"] + self._since["skipped"]

    def take_partials(self) -> list:
        """Encode what was accumulated since the last take (per-position arrays only for the
        window of positions touched) and reset it. Returns the parts of :func:`encode_partials`;
        ``info`` carries frames, events and skipped frames of the delta."""
        d = self._since
        lo, hi = (d["lo"], d["hi"]) if d["lo"] is not None else (0, 0)
        views, windowed = self._views(lo, hi)
        info = {"frames": d["frames"], "events": d["events"], "skipped": d["skipped"]}
        parts = encode_partials(views, window=(lo, hi), windowed=windowed, info=info, fingerprint=self.fingerprint)
        # encode_partials shares contiguous buffers: copy before resetting them
        parts = [parts[0]] + [bytes(p) if not isinstance(p, bytes) else p for p in parts[1:]]
        for a in self.analyses:
            a.reset(views[a.name])
        self._since = self._empty_delta()
        return parts

    def _views(self, lo: int, hi: int) -> tuple[dict[str, dict[str, np.ndarray]], set[tuple[str, str]]]:
        views: dict[str, dict[str, np.ndarray]] = {}
        windowed: set[tuple[str, str]] = set()
        for a in self.analyses:
            partial = self.partials[a.name]
            v = {}
            for key, arr in partial.items():
                if key in a.per_position:
                    v[key] = arr[lo:hi]
                    windowed.add((a.name, key))
                else:
                    v[key] = arr
            views[a.name] = v
        return views, windowed

    # -- writer ---------------------------------------------------------------------------------

    def merge_parts(self, parts: list) -> PartialsMessage:
        """Decode a node group's partials and merge them. Everything is checked against this
        scan's analyses (names, keys, dtypes, shapes, window) before anything is merged: a
        mismatch raises MessageError('partial_mismatch') and leaves the partials unchanged."""
        msg = decode_partials(parts)
        if msg.fingerprint is not None and msg.fingerprint != self.fingerprint:
            raise MessageError("partial_mismatch", "the sender's analyses are configured differently")
        lo, hi = msg.window if msg.window is not None else (0, 0)
        if hi > self.n_positions:
            raise MessageError("partial_mismatch", f"window {lo}..{hi} beyond {self.n_positions} positions")
        views, windowed = self._views(lo, hi)
        if set(msg.partials) != set(views):
            raise MessageError("partial_mismatch", f"analyses {sorted(msg.partials)} != {sorted(views)}")
        for name, mine in views.items():
            theirs = msg.partials[name]
            if set(theirs) != set(mine):
                raise MessageError("partial_mismatch", f"{name}: arrays {sorted(theirs)} != {sorted(mine)}")
            for key, arr in mine.items():
                other = theirs[key]
                if ((name, key) in windowed) != ((name, key) in msg.windowed):
                    raise MessageError("partial_mismatch", f"{name}/{key}: windowed or not")
                if other.dtype != arr.dtype or other.shape != arr.shape:
                    raise MessageError(
                        "partial_mismatch", f"{name}/{key}: {other.dtype}{other.shape} != {arr.dtype}{arr.shape}"
                    )
        for a in self.analyses:
            a.merge(views[a.name], msg.partials[a.name])
        self.frames += msg.info.get("frames", 0)
        self.events += msg.info.get("events", 0)
        self.frames_skipped += msg.info.get("skipped", 0)
        return msg

    def merge(self, other: ScanAnalyses) -> None:
        """Merge another ScanAnalyses of the same analyses and scan shape into this one."""
        if other.names != self.names or other.scan_shape != self.scan_shape:
            raise ValueError("can only merge the same analyses over the same scan shape")
        for a in self.analyses:
            a.merge(self.partials[a.name], other.partials[a.name])
        self.frames += other.frames
        self.events += other.events
        self.frames_skipped += other.frames_skipped

    def finish(self) -> dict[str, dict[str, np.ndarray]]:
        """Final results of every analysis (partials untouched: call it as often as you like)."""
        return {a.name: a.finish(self.partials[a.name], self.scan_shape) for a in self.analyses}

    def views(self, results: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> dict[str, dict[str, View]]:
        """What each analysis shows, from ``results`` (default: :meth:`finish` now)."""
        results = self.finish() if results is None else results
        return {a.name: a.show(results[a.name]) for a in self.analyses}

    def info(self) -> dict[str, int]:
        return {"frames": self.frames, "events": self.events, "frames_skipped": self.frames_skipped}


def warm_up(analyses: Iterable[Analysis]) -> None:
    """Run every step once on a one-electron scan, so numba compiles (or loads its cache) before
    the first real batch: call it when a node group or the writer starts."""
    analyses = list(analyses)
    node = ScanAnalyses(analyses, (1, 1))
    node.accumulate(np.zeros(1, np.int64), np.zeros(1, np.uint32), np.array([0, 1], np.int64))
    writer = ScanAnalyses(analyses, (1, 1))
    writer.merge_parts(node.take_partials())
    writer.views()
