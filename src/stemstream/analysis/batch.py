"""Batches of counted frames as analyses take them, and the checks that make kernels safe.

A batch is three arrays: ``positions`` (n,) int64 flat scan positions, ``events`` uint32 flat pixel
indices ``row * frame_cols + col`` (the counting kernel's layout) and ``offsets`` (n + 1,) int64,
frame ``i`` holding ``events[offsets[i]:offsets[i + 1]]``. :func:`check_batch` makes sure a batch
is consistent before any kernel indexes with it; :func:`pixel_row_col` turns an event back into
(row, col) inside a kernel.

An analysis that wants them (``Analysis.subpixel``) also gets ``points`` (events, 2) float32: each
event's (row, col) in its frame, pixel centres at integers, the cluster method's sub-pixel
positions (docs/counting.md) or, where the counting gave none, the event's pixel centre
(:func:`pixel_centres`); :func:`check_points` checks them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from stemstream.core.detector import FRAME_COLS


class BatchStats(NamedTuple):
    """What :func:`checked_batch` learnt in its one pass: frames inside the scan, the range
    ``lo:hi`` of their positions and their electrons."""

    frames_inside: int
    lo: int
    hi: int
    events_inside: int


@njit(nogil=True, cache=True)
def _batch_stats(positions, events, offsets, n_positions):
    """One pass over a batch: (offsets_ok, min event, max event, frames inside the scan, lowest and
    highest position inside + 1, events of frames inside)."""
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


def checked_batch(positions, events, offsets, n_pixels: int, n_positions: int):
    """(positions, events, offsets, :class:`BatchStats`): the batch as contiguous int64 / uint32 /
    int64 arrays and what a scan of ``n_positions`` positions needs to know of it. ValueError if
    the arrays disagree, offsets are not monotonic or leave ``events``, or a pixel lies outside
    frames of ``n_pixels`` pixels. Positions outside the scan are counted, not refused."""
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
    ok, ev_min, ev_max, n_in, lo, hi, n_events = _batch_stats(positions, events, offsets, n_positions)
    if not ok:
        raise ValueError("offsets must be non-decreasing and within events")
    if ev_min < 0 or ev_max >= n_pixels:
        raise ValueError(f"an event's pixel index lies outside the frame of {n_pixels} pixels")
    if events.dtype != np.uint32:
        events = events.astype(np.uint32)
    return positions, events, offsets, BatchStats(int(n_in), int(lo), int(hi), int(n_events))


def check_batch(positions, events, offsets, n_pixels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch of counted frames as contiguous int64 / uint32 / int64 arrays; ValueError if the
    arrays disagree, offsets are not monotonic or leave ``events``, or a pixel is outside the frame."""
    positions, events, offsets, _ = checked_batch(positions, events, offsets, n_pixels, 0)
    return positions, events, offsets


def select_frames(positions: np.ndarray, events: np.ndarray, offsets: np.ndarray, keep: np.ndarray,
                  points: np.ndarray | None = None):
    """The frames of a checked batch where ``keep`` (n,) bool is set, as new arrays: (positions,
    events, offsets, their points, or None without ``points``)."""
    counts = np.diff(offsets)
    new_offsets = np.zeros(int(np.count_nonzero(keep)) + 1, np.int64)
    np.cumsum(counts[keep], out=new_offsets[1:])
    event_keep = np.repeat(keep, counts)
    first, end = offsets[0], offsets[-1]
    return (positions[keep], events[first:end][event_keep], new_offsets,
            None if points is None else points[first:end][event_keep])


def pixel_centres(events: np.ndarray, cols: int = FRAME_COLS) -> np.ndarray:
    """(events, 2) float32: each event's pixel centre (row, col) in frames of ``cols`` columns,
    the position of an event counted without a sub-pixel one (a strict maximum is its pixel)."""
    events = np.asarray(events, np.int64)
    return np.stack([events // cols, events % cols], axis=1).astype(np.float32)


def points_of(points, events: np.ndarray, frame_shape: tuple[int, int]) -> np.ndarray:
    """What an analysis that wants sub-pixel positions gets for ``events``: ``points`` checked
    (:func:`check_points`), or the events' pixel centres when there are none."""
    return pixel_centres(events, frame_shape[1]) if points is None else check_points(points, len(events), frame_shape)


def check_points(points, n_events: int, frame_shape: tuple[int, int]) -> np.ndarray:
    """``points`` as a contiguous (n_events, 2) float32 array; ValueError unless there is one
    finite (row, col) an event inside the frame of ``frame_shape`` (rows, cols): within half a
    pixel of its edge pixels' centres."""
    points = np.asarray(points)
    if points.ndim != 2 or points.shape != (n_events, 2) or (points.size and points.dtype.kind != "f"):
        raise ValueError(f"points must be ({n_events}, 2) floats, one (row, col) an event, got shape {points.shape}")
    points = np.ascontiguousarray(points, np.float32)
    rows, cols = frame_shape
    if n_events and not (np.isfinite(points).all() and points.min() >= -0.5 and points[:, 0].max() <= rows - 0.5
                         and points[:, 1].max() <= cols - 0.5):
        raise ValueError(f"a point is not finite or lies outside the {rows} x {cols} frame")
    return points


@njit(nogil=True, cache=True, inline="always")
def pixel_row_col(e, cols, inv_cols):
    """(row, col) of flat pixel index ``e`` in frames of ``cols`` columns, ``inv_cols = 1.0 / cols``.

    For kernels: a multiply instead of an integer division (several times slower). Exact:
    ``(e + 0.5) / cols`` is at least ``0.5 / cols`` away from an integer, far more than the
    rounding error of the product for any ``e`` below 2**50."""
    e = np.int64(e)
    r = np.int64((e + 0.5) * inv_cols)
    return r, e - r * cols
