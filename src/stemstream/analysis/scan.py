"""The analyses of one scan: :class:`ScanAnalyses` accumulates batches, and moves partials between
processes as the frames of stemstream.formats.partials.

A node group accumulates each counted batch and, every so often, takes what was added since the
last take (:meth:`ScanAnalyses.take_partials`); the writer merges those messages
(:meth:`ScanAnalyses.merge_parts`), validated like every wire message: a peer's garbage or a
differently configured sender raises :class:`~stemstream.transport.messages.MessageError` and
changes nothing. :func:`fingerprint` is how both ends tell that they built the same analyses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

import numpy as np

from stemstream.analysis.batch import check_points, checked_batch, pixel_centres, select_frames
from stemstream.analysis.checks import check_shape
from stemstream.analysis.interface import Analysis
from stemstream.analysis.views import View
from stemstream.core.detector import FRAME_SHAPE
from stemstream.formats.partials import PartialsMessage, decode_partials, encode_partials
from stemstream.transport.messages import MessageError


def fingerprint(analyses: Iterable[Analysis]) -> str:
    """A short digest of the analyses' names, classes, frame shape and parameters: equal on a node
    group and the writer when both built the same analyses."""
    desc = [
        [a.name, f"{type(a).__module__}.{type(a).__qualname__}", list(a.frame_shape), a.params] for a in analyses
    ]
    text = json.dumps(desc, sort_keys=True, default=repr)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class ScanAnalyses:
    """The analyses of one scan of ``scan_shape`` (rows, cols) and their partial results.

    - node group, per batch of counted frames: :meth:`accumulate`; every so often
      :meth:`take_partials` (encodes what was added since the last take, then resets it);
    - writer: :meth:`merge_parts` for each message (validated; a bad one raises MessageError and
      changes nothing), then :meth:`finish` / :meth:`views` for live images or the end;
    - offline and tests: :meth:`accumulate` then :meth:`finish`; :meth:`merge` combines two.

    Frames whose position lies outside the scan are skipped and counted (``frames_skipped``).
    """

    def __init__(self, analyses: Iterable[Analysis], scan_shape: tuple[int, int], window: int | None = None):
        """``window``: hold the per-position partials of at most this many consecutive positions
        (a node group, which sends what it added every fraction of a second: its memory then
        does not grow with the scan); None: of the whole scan (the writer, offline)."""
        self.analyses = list(analyses)
        names = [a.name for a in self.analyses]
        if len(set(names)) != len(names):
            raise ValueError(f"analysis names must be unique, got {names}")
        shapes = {a.frame_shape for a in self.analyses}
        if len(shapes) > 1:
            raise ValueError(f"analyses disagree on the frame shape: {sorted(shapes)}")
        self.frame_shape = shapes.pop() if shapes else FRAME_SHAPE
        self.n_pixels = self.frame_shape[0] * self.frame_shape[1]
        self.scan_shape = check_shape("scan_shape", scan_shape)
        self.n_positions = self.scan_shape[0] * self.scan_shape[1]
        # per-position partials hold positions base .. base + rows - 1 (all of them without a window)
        rows = self.n_positions if window is None else max(1, min(int(window), self.n_positions))
        self.base = 0
        held = self.scan_shape if rows == self.n_positions else (1, rows)
        self.partials = {a.name: a.new_partial(held) for a in self.analyses}
        for a in self.analyses:
            for key in a.per_position:
                arr = self.partials[a.name].get(key)
                if arr is None or arr.ndim < 1 or arr.shape[0] != rows:
                    raise ValueError(f"{a.name}: per-position partial {key!r} must have {rows} rows")
        self.rows = rows
        self.frames = 0
        self.events = 0
        self.frames_skipped = 0
        self.fingerprint = fingerprint(self.analyses)
        self._wants_points = any(a.subpixel for a in self.analyses)
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

    def accumulate(self, positions, events, offsets, points=None) -> None:
        """Add a batch of counted frames to every analysis (checked once; ValueError if bad).
        ``points``: the events' sub-pixel (row, col), (events, 2), for the analyses that want
        them (Analysis.subpixel); None: the events' pixel centres (strict maxima's events)."""
        positions, events, offsets, stats = checked_batch(positions, events, offsets, self.n_pixels, self.n_positions)
        n = len(positions)
        if n == 0:
            return
        wanted = self._wants_points and points is not None
        points = check_points(points, len(events), self.frame_shape) if wanted else None
        n_in, lo, hi, n_events = stats
        skipped = n - n_in
        if skipped:
            inside = (positions >= 0) & (positions < self.n_positions)
            positions, events, offsets, points = select_frames(positions, events, offsets, inside, points)
        if n_in:
            held = self._held_positions(positions, lo, hi)
            if self._wants_points and points is None:
                points = pixel_centres(events, self.frame_shape[1])
            for a in self.analyses:
                if a.subpixel:
                    a.update(self.partials[a.name], held, events, offsets, points)
                else:
                    a.update(self.partials[a.name], held, events, offsets)
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

    def fits(self, positions) -> bool:
        """Whether a batch at ``positions`` can be accumulated without a :meth:`take_partials`
        first: always without a window; with one, when nothing is pending or the batch's
        positions lie in the window with what is."""
        if self.rows == self.n_positions or self.pending == 0:
            return True
        inside = np.asarray(positions)
        inside = inside[(inside >= 0) & (inside < self.n_positions)]
        return inside.size == 0 or (int(inside.min()) >= self.base and int(inside.max()) < self.base + self.rows)

    def _held_positions(self, positions: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """``positions`` as rows of the held partials, moving the window to ``lo`` when nothing is
        pending. ValueError for a batch that does not fit (:meth:`fits` says so beforehand)."""
        if self.rows == self.n_positions:
            return positions
        if self.pending == 0:
            self.base = lo  # the held partials are all zero: they may stand for other positions
        if lo < self.base or hi > self.base + self.rows:
            raise ValueError(f"positions {lo}..{hi - 1} do not fit the window of {self.rows} positions from "
                             f"{self.base}: take the partials first")
        return positions - self.base

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
                    v[key] = arr[lo - self.base:hi - self.base] if hi > lo else arr[0:0]
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
        self._check_whole("merge_parts")
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
        self._check_whole("merge")
        if other.names != self.names or other.scan_shape != self.scan_shape:
            raise ValueError("can only merge the same analyses over the same scan shape")
        for a in self.analyses:
            a.merge(self.partials[a.name], other.partials[a.name])
        self.frames += other.frames
        self.events += other.events
        self.frames_skipped += other.frames_skipped

    def finish(self) -> dict[str, dict[str, np.ndarray]]:
        """Final results of every analysis (partials untouched: call it as often as you like)."""
        self._check_whole("finish")
        return {a.name: a.finish(self.partials[a.name], self.scan_shape) for a in self.analyses}

    def views(self, results: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> dict[str, dict[str, View]]:
        """What each analysis shows, from ``results`` (default: :meth:`finish` now)."""
        results = self.finish() if results is None else results
        return {a.name: a.show(results[a.name]) for a in self.analyses}

    def _check_whole(self, what: str) -> None:
        if self.rows != self.n_positions:
            raise ValueError(f"{what} needs the partials of the whole scan; these hold a window of {self.rows} positions")

    def info(self) -> dict[str, int]:
        return {"frames": self.frames, "events": self.events, "frames_skipped": self.frames_skipped}
