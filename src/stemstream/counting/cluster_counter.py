"""Cluster counting as its callers use it: :class:`ClusterCounter` counts batches of frames
(in memory, from sector records on the stream, or read from raw files) with the compiled kernel
of counting.clusters, and :func:`calibrate_cluster_model` fits its single-electron model (from
frames in hand, or gathered block by block on the stream by :class:`ClusterSample`).

Its results are :class:`ClusteredFrames`: the events of counting.kernel.CountedFrames (one pixel
per electron, stempy's layout) plus each electron's sub-pixel position.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numba
import numpy as np
from numba import njit, prange

from stemstream.core.detector import FRAME_SHAPE
from stemstream.core.thresholds import Thresholds
from stemstream.counting.cluster_model import (
    PATCH_HALF,
    ClusterCalibrationError,
    SingleElectronModel,
    model_from_charges,
    pedestal_of,
)
from stemstream.counting.cluster_singles import single_electron_charges
from stemstream.counting.clusters import LABELS, count_clusters_frame
from stemstream.counting.kernel import CountedFrames, _compact, _integer_window, _sparse_rows, max_events_per_frame
from stemstream.counting.sectors import sector_words
from stemstream.formats.raw import FRAME_COLS, HEADER_BYTES, N_MODULES, RECORD_BYTES, SECTOR_PIXELS
from stemstream.formats.raw_pread import fetch_add, read_frame

_RECORD_WORDS = RECORD_BYTES // 2
_HEADER_WORDS = HEADER_BYTES // 2
# Complete frames whose isolated clusters calibrate the single-electron model: the scan's first
# ones offline, the first ones of its share on each node group (pipeline.node.assembly).
CLUSTER_FRAMES = 64
# A pixel at or above the background threshold in at least this fraction of the calibration
# frames, when there are at least HOT_MIN_FRAMES of them, is hot (hot_pixels).
HOT_FRACTION = 0.95
HOT_MIN_FRAMES = 16


@dataclass
class ClusteredFrames(CountedFrames):
    """CountedFrames plus ``positions`` (total, 2) float32: event k's electron at sub-pixel
    (row, col) of its frame, pixel centres at integers."""

    positions: np.ndarray | None = None

    def frame_positions(self, i: int) -> np.ndarray:
        return self.positions[self.offsets[i] : self.offsets[i + 1]]


def _scratch(frame_shape: tuple[int, int]) -> tuple:
    """One thread's arrays for the kernel (see clusters.count_clusters_frame): the label image
    (uint16: the basins' numbers, counting.cluster_basins; the calibration's cluster labels,
    counting.cluster_singles) and the used image (the basins' ways up, then the electrons'
    pixels), the pixel list (basins' pixels, by basin), the members' list (run records for the
    calibration's labelling, counting.cluster_labels; the extras' heap), per-basin tables
    (start, size, peaks, electrons; charge sums and moments, spread bin, log rate of hidden
    electrons, log charge; score gains), a position."""
    pixels = frame_shape[0] * frame_shape[1]
    most = max_events_per_frame(frame_shape)  # clusters are never adjacent, as strict maxima
    most = min(most, LABELS)
    return (np.zeros(pixels, np.uint16), np.zeros(pixels, np.uint8), np.empty(pixels, np.int64),
            np.empty(pixels, np.int64), np.empty((most, 4), np.int64), np.empty((most, 8), np.float64),
            np.empty(most, np.float64), np.empty(2, np.float64))


@njit(nogil=True, cache=True)
def _prepare(frame, dark_int, use_dark, scratch_u16):
    # The frame the kernel counts: itself, or minus the dark reference with stempy's uint16
    # wrap-around (counting.kernel), so a negative value becomes huge and the X-ray cut drops it.
    if not use_dark:
        return frame
    flat, dark, out = frame.reshape(-1), dark_int.reshape(-1), scratch_u16.reshape(-1)
    for i in range(flat.shape[0]):
        out[i] = np.uint16((np.int64(flat[i]) - dark[i]) & 0xFFFF)
    return scratch_u16


@njit(nogil=True, parallel=True, cache=True)
def _count_batch(frames, lo, hi, model, hot, dark_int, use_dark, scratches, out, positions, counts, n_chunks):
    n, rows, cols = frames.shape
    for k in prange(n_chunks):
        scratch_u16 = np.empty((rows, cols), np.uint16)
        for i in range(k, n, n_chunks):
            frame = _prepare(frames[i], dark_int, use_dark, scratch_u16)
            counts[i] = count_clusters_frame(frame, lo, hi, model, hot, scratches[np.int64(k)], out[i], positions[i])


@njit(nogil=True, parallel=True, cache=True)
def _read_count(fds, source_file, source_record, indices, lo, hi, model, hot, dark_int, use_dark, frames, scratches,
                out, positions, counts, failed, n_chunks):
    # As counting.kernel.read_count: each thread preads a frame into its own scratch frame and
    # counts it while it is in the thread's cache, taking the next frame when free.
    n = indices.shape[0]
    next_frame = np.zeros(1, np.int64)
    for k in prange(n_chunks):  # (k is unsigned in a prange: the typed list takes a signed index)
        frame = frames[k]
        scratch_u16 = np.empty(frame.shape, np.uint16)
        while True:
            i = fetch_add(next_frame, 0, 1)
            if i >= n:
                break
            failed[i] = read_frame(fds, source_file, source_record, indices[i], frame)
            if failed[i] >= 0:
                counts[i] = 0
                continue
            counts[i] = count_clusters_frame(_prepare(frame, dark_int, use_dark, scratch_u16), lo, hi, model, hot,
                                             scratches[np.int64(k)], out[i], positions[i])


@njit(nogil=True, cache=True)
def _count_sectors(b0, b1, b2, b3, records, lo, hi, model, hot, scratch, frame, out, positions, counts):
    # Clusters cross sector boundaries, so each frame is assembled (a missing sector is zero
    # rows, as in counting.sectors) and counted whole: one copy of the frame, ~2 % of its count.
    sector_rows = SECTOR_PIXELS // FRAME_COLS
    for i in range(records.shape[0]):
        for m in range(N_MODULES):
            rows = frame[m * sector_rows : (m + 1) * sector_rows].reshape(-1)
            r = records[i, m]
            if r < 0:
                rows[:] = 0
                continue
            buffer = b0 if m == 0 else (b1 if m == 1 else (b2 if m == 2 else b3))
            start = r * _RECORD_WORDS + _HEADER_WORDS
            rows[:] = buffer[start : start + SECTOR_PIXELS]
        counts[i] = count_clusters_frame(frame, lo, hi, model, hot, scratch, out[i], positions[i])


class ClusterCounter:
    """Counts batches of frames by clusters with fixed thresholds and a single-electron model.

    background and xray: ADU (as counting.kernel.ElectronCounter); dark: an optional (rows, cols)
    reference in ADU, truncated to integers as stempy does. Gain maps and row-dark correction are
    the maxima method's only (ValueError here)."""

    method = "clusters"

    def __init__(self, background: float, xray: float, model: SingleElectronModel,
                 frame_shape: tuple[int, int] = FRAME_SHAPE, dark: np.ndarray | None = None):
        self.background, self.xray = float(background), float(xray)
        self.model = model
        self.frame_shape = tuple(frame_shape)
        self._lo, self._hi = _integer_window(self.background, self.xray)
        if dark is not None and tuple(dark.shape) != self.frame_shape:
            raise ValueError(f"dark reference has shape {tuple(dark.shape)}, frames have {self.frame_shape} (rows, cols)")
        self._use_dark = dark is not None
        self._dark_int = np.zeros((1, 1), np.int64) if dark is None else np.asarray(dark, np.float32).astype(np.int64)
        self._hot = hot_flags(model.hot_pixels, self.frame_shape)
        self._scratches: list = []
        self._out = np.empty((0, max_events_per_frame(self.frame_shape)), np.uint32)
        self._positions = np.empty((0, self._out.shape[1], 2), np.float32)
        self._counts = np.empty(0, np.int64)

    def scratches(self, n: int) -> numba.typed.List:
        """The arrays of n threads (kept between batches: the label images are never cleared)."""
        while len(self._scratches) < n:
            self._scratches.append(_scratch(self.frame_shape))
        typed = numba.typed.List()
        for s in self._scratches[:n]:
            typed.append(s)
        return typed

    def buffers(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Event rows (n, capacity) uint32, positions (n, capacity, 2) float32, counts (n,)
        int64 for a batch of n frames; only the pages written become resident."""
        if self._out.shape[0] < n:
            self._out = _sparse_rows((n, self._out.shape[1]), np.uint32)
            self._positions = _sparse_rows((n, self._out.shape[1] * 2), np.float32).reshape(n, -1, 2)
            self._counts = np.empty(n, np.int64)
        return self._out[:n], self._positions[:n], self._counts[:n]

    def count(self, frames: np.ndarray) -> ClusteredFrames:
        """Count a batch of frames, shape (n, rows, cols) uint16."""
        frames = frames[np.newaxis] if frames.ndim == 2 else frames
        if frames.dtype != np.uint16 or tuple(frames.shape[1:]) != self.frame_shape:
            raise ValueError(f"frames must be uint16 of shape (n, {self.frame_shape[0]}, {self.frame_shape[1]}), "
                             f"got {frames.dtype} {frames.shape}")
        n = len(frames)
        out, positions, counts = self.buffers(n)
        if n:
            chunks = min(n, numba.get_num_threads())
            _count_batch(np.ascontiguousarray(frames), self._lo, self._hi, self.model.params, self._hot, self._dark_int,
                         self._use_dark, self.scratches(chunks), out, positions, counts, chunks)
        return self.compact(n)

    def count_sectors(self, buffers: list, records: np.ndarray) -> ClusteredFrames:
        """Count n frames given as sector records, as counting.sectors.count_from_sectors takes
        them: ``buffers[k]`` module k's RECORD_DTYPE array (or None), ``records`` (n, 4)."""
        if self._use_dark:
            raise ValueError("counting from sectors supports plain thresholds only (no dark reference)")
        words = sector_words(buffers)
        n = len(records)
        out, positions, counts = self.buffers(n)
        if n:
            frame = np.empty(self.frame_shape, np.uint16)
            _count_sectors(words[0], words[1], words[2], words[3], np.ascontiguousarray(records, np.int64),
                           self._lo, self._hi, self.model.params, self._hot, self.scratches(1)[0], frame, out,
                           positions, counts)
        return self.compact(n)

    def read_count(self, fds, table, indices: np.ndarray, frames: np.ndarray, failed: np.ndarray) -> ClusteredFrames:
        """Read the frames at FrameTable ``indices`` (``fds``: the scan's open files) into the
        threads' scratch ``frames`` (threads, rows, cols) and count them; ``failed[i]``: -1 or
        the module whose read failed (the caller reports it)."""
        n = len(indices)
        out, positions, counts = self.buffers(n)
        if n:
            chunks = min(n, len(frames))
            _read_count(fds, table.source_file, table.source_record, indices, self._lo, self._hi, self.model.params,
                        self._hot, self._dark_int, self._use_dark, frames, self.scratches(chunks), out, positions,
                        counts, failed, chunks)
        return self.compact(n)

    def compact(self, n: int) -> ClusteredFrames:
        counts = self._counts[:n]
        offsets = np.empty(n + 1, np.int64)
        flat = np.empty(int(counts.sum()), np.uint32)
        _compact(self._out, counts, flat, offsets)
        positions = np.empty((len(flat), 2), np.float32)
        for i in range(n):  # per frame: a batch holds a few hundred frames
            positions[offsets[i] : offsets[i + 1]] = self._positions[i, : counts[i]]
        return ClusteredFrames(flat, offsets, positions)


def hot_pixels(frames: np.ndarray, lo: int) -> np.ndarray:
    """Flat indices of the hot pixels of (n, rows, cols) ``frames`` (none when n <
    HOT_MIN_FRAMES): at or above ``lo`` in at least HOT_FRACTION of them while none of their 8
    neighbours is in half of them, as a dark current lights a pixel of its own; where electrons
    light a pixel that often (a bright-field disc at high dose), its neighbours are lit too. Each
    hot pixel made a one-pixel cluster that passed for an isolated single electron (5 in 64
    simulated frames were 320 of 2,000-10,000 "singles" and raised the fitted mean charge by
    1-30 %, by how many real ones the sample held), and electrons in every frame counted."""
    from scipy import ndimage  # here: 0.12 s of import that a node group counting by maxima never needs

    n = len(frames)
    if n < HOT_MIN_FRAMES:
        return np.zeros(0, np.int64)
    lit = np.count_nonzero(frames >= lo, axis=0) / n
    ring = np.ones((3, 3), bool)
    ring[1, 1] = False
    neighbours = ndimage.maximum_filter(lit, footprint=ring, mode="constant", cval=0.0)
    return np.flatnonzero((lit >= HOT_FRACTION) & (neighbours < 0.5))


def hot_flags(hot: tuple, frame_shape: tuple[int, int]) -> np.ndarray:
    """The kernel's form of ``hot`` (flat pixel indices): a uint8 flag per pixel of frame_shape
    (rows, cols), or an empty array when there are none (ValueError for an index off the frame)."""
    pixels = frame_shape[0] * frame_shape[1]
    index = np.asarray(hot, np.int64)
    if index.size and not (index.min() >= 0 and index.max() < pixels):
        raise ValueError(f"hot pixels outside the frame of {tuple(frame_shape)} (rows, cols)")
    flags = np.zeros(pixels if index.size else 0, np.uint8)
    flags[index] = 1
    return flags


def calibrate_cluster_model(frames: np.ndarray, thresholds: Thresholds,
                            dark: np.ndarray | None = None) -> SingleElectronModel:
    """The single-electron model of (n, rows, cols) uint16 sample frames (counting.cluster_model);
    raises ClusterCalibrationError when they hold too few isolated single electrons."""
    frames = frames[np.newaxis] if frames.ndim == 2 else frames
    lo, hi = _integer_window(thresholds.background, thresholds.xray)
    if dark is not None:
        dark_int = np.asarray(dark, np.float32).astype(np.int64)
        frames = ((frames.astype(np.int64) - dark_int) & 0xFFFF).astype(np.uint16)
    pedestal = pedestal_of(thresholds, frames)
    hot = hot_pixels(frames, lo)
    if len(hot):  # read as empty pixels
        shape = frames.shape
        frames = frames.reshape(len(frames), -1).copy()
        frames[:, hot] = min(max(round(pedestal), 0), lo - 1)
        frames = frames.reshape(shape)
    scratch = _scratch(tuple(frames.shape[1:]))
    charges = np.empty(len(scratch[4]), np.float64)
    patches = np.empty((len(charges), 2 * PATCH_HALF + 1, 2 * PATCH_HALF + 1), np.float64)
    found, found_patches = [], []
    for frame in frames:
        n = single_electron_charges(np.ascontiguousarray(frame), lo, hi, pedestal, scratch, charges, patches)
        found.append(charges[:n].copy())
        found_patches.append(patches[:n].copy())
    model = model_from_charges(np.concatenate(found), pedestal, thresholds.background, np.concatenate(found_patches),
                               (lo - pedestal, hi - pedestal))
    return replace(model, hot_pixels=tuple(int(p) for p in hot))


class ClusterSample:
    """The frames a node group calibrates the single-electron model from, gathered a block at a
    time as they arrive: the first ``size`` complete frames it is given."""

    def __init__(self, frame_shape: tuple[int, int] = FRAME_SHAPE, size: int = CLUSTER_FRAMES):
        self.frame_shape, self.size = tuple(frame_shape), size
        self.n = 0
        self._frames: np.ndarray | None = None  # (size, rows, cols), allocated at the first frames

    @property
    def full(self) -> bool:
        return self.n >= self.size

    def add(self, frames: np.ndarray) -> None:
        """Keep the first of (n, rows, cols) uint16 ``frames`` that fit."""
        if self._frames is None:
            self._frames = np.empty((self.size, *self.frame_shape), np.uint16)
        take = frames[: self.size - self.n]
        self._frames[self.n : self.n + len(take)] = take
        self.n += len(take)

    def counter(self, thresholds: Thresholds) -> ClusterCounter:
        """A counter with the model the frames gathered give (calibrate_cluster_model); the frames
        are let go. Raises ClusterCalibrationError when they hold too few single electrons."""
        frames, self._frames = self._frames, None
        if not self.n:
            raise ClusterCalibrationError("no complete frame came to calibrate the single-electron model from")
        model = calibrate_cluster_model(frames[: self.n], thresholds)
        return ClusterCounter(thresholds.background, thresholds.xray, model, self.frame_shape)
