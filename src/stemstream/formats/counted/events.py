"""The events of a counted file read a block of scan positions at a time, as CSR arrays (an
offset per frame plus one flat array of pixel indices), and the array kernels the views share.

Reading per block keeps memory bounded by the block, not by the scan: a 1024 x 1024 scan is
never held whole unless a view asks for it. Version 3 files (ours and stempy's) are read
straight from ``/electron_events/frames``; versions 1 and 2 are small legacy files, converted
once in memory by :func:`~stemstream.formats.sparse_h5.read_counted`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numba
import numpy as np

from stemstream.formats.sparse_h5 import FORMAT_VERSION, read_counted
from stemstream.formats.sparse_h5.metadata import read_metadata
from stemstream.formats.sparse_h5.reader import event_datasets, event_shapes, format_version, open_counted, unreadable

# Scan positions per block when a view walks the whole scan: 4096 positions x a few hundred
# events is a few MB of indices (so peak memory does not grow with the scan), and h5py's
# per-call overhead is amortised.
POSITIONS_PER_BLOCK = 4096


@dataclass(frozen=True)
class EventBlock:
    """The events of positions [start, stop) of the scan (row-major).

    frame_offsets: int64 (n_frames + 1,), frame k of the block holds
    ``pixels[frame_offsets[k]:frame_offsets[k + 1]]``; frames run position-major, F per
    position. pixels: uint32 flat pixel indices ``row * frame_cols + col``.
    """

    start: int
    stop: int
    frames_per_position: int
    frame_offsets: np.ndarray
    pixels: np.ndarray

    @property
    def position_offsets(self) -> np.ndarray:
        """int64 (n_positions + 1,): position p's events (all its frames) are
        ``pixels[position_offsets[p]:position_offsets[p + 1]]``."""
        return self.frame_offsets[:: self.frames_per_position]

    def position_of_each_event(self) -> np.ndarray:
        """int64 (n_events,): the block-local position index of every event."""
        counts = np.diff(self.position_offsets)
        return np.repeat(np.arange(self.stop - self.start, dtype=np.int64), counts)


def lists_to_csr(lists) -> tuple[np.ndarray, np.ndarray]:
    """A sequence of 1-D integer arrays -> (int64 offsets (n + 1,), uint32 concatenation)."""
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    pixels = np.concatenate(lists).astype(np.uint32, copy=False) if len(lists) else np.empty(0, np.uint32)
    return offsets, pixels


class EventFile:
    """A counted file's facts, and its events read by blocks of scan positions.

    scan_shape and frame_shape are (rows, cols). The file is opened for each read, so an
    EventFile holds no handle and can be passed to dask workers.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open_counted(self.path) as f:
            self.version = format_version(self.path, f)
            frames_ds, positions_ds = event_datasets(self.path, f)
            self.scan_shape, self.frame_shape = event_shapes(self.path, frames_ds, positions_ds)
            self.metadata = read_metadata(f["metadata"]) if isinstance(f.get("metadata"), h5py.Group) else {}
            n_entries = frames_ds.shape[0]
        self.n_positions = self.scan_shape[0] * self.scan_shape[1]
        self._legacy = None
        if self.version == FORMAT_VERSION:
            if n_entries == 0 or n_entries % self.n_positions:
                raise unreadable(
                    self.path, f"/electron_events/frames has {n_entries} entries, "
                    f"not a multiple of the {self.n_positions} scan positions",
                )
            self.frames_per_position = n_entries // self.n_positions
        else:
            legacy = read_counted(self.path)
            self.frames_per_position = legacy.frames_per_position
            self._legacy = lists_to_csr(legacy.frames.ravel())

    def read(self, start: int, stop: int) -> EventBlock:
        """The events of scan positions [start, stop) (row-major indices)."""
        fpp = self.frames_per_position
        if self._legacy is not None:
            offsets, pixels = self._legacy
            lo, hi = offsets[start * fpp], offsets[stop * fpp]
            return EventBlock(start, stop, fpp, offsets[start * fpp : stop * fpp + 1] - lo, pixels[lo:hi])
        with h5py.File(self.path, "r") as f:
            lists = f["electron_events/frames"][start * fpp : stop * fpp]
        offsets, pixels = lists_to_csr(lists)
        return EventBlock(start, stop, fpp, offsets, pixels)

    def blocks(self, start: int = 0, stop: int | None = None, size: int = POSITIONS_PER_BLOCK):
        """EventBlocks covering positions [start, stop) in order, ``size`` positions each."""
        stop = self.n_positions if stop is None else stop
        for a in range(start, stop, size):
            yield self.read(a, min(a + size, stop))


def bin_pixels(pixels: np.ndarray, frame_shape: tuple[int, int], factor: int) -> np.ndarray:
    """Flat pixel indices of a (rows, cols) frame -> flat indices of the frame binned by
    ``factor`` on both axes, (rows // factor, cols // factor); uint32 either way (factor 1
    returns ``pixels`` itself: no copy)."""
    if factor == 1:
        return pixels
    out = np.empty(len(pixels), dtype=np.uint32)
    _bin_pixels(pixels, frame_shape[1], factor, out)
    return out


@numba.njit(cache=True, nogil=True)
def _bin_pixels(pixels: np.ndarray, cols: int, factor: int, out: np.ndarray) -> None:
    """A numba loop: numpy's version made four int64 temporaries the size of the events."""
    binned_cols = cols // factor
    for k in range(len(pixels)):
        p = np.int64(pixels[k])
        out[k] = (p // cols // factor) * binned_cols + (p % cols) // factor


def count_dtype(max_count: int) -> np.dtype:
    """The smallest unsigned dtype that holds counts up to ``max_count``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_count <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


@numba.njit(cache=True, nogil=True)
def densify(offsets: np.ndarray, pixels: np.ndarray, out: np.ndarray) -> None:
    """Add one to ``out[p, pixel]`` for every event of position p (``out`` is (n_positions,
    n_pixels), zeroed by the caller, in the view's count dtype: no int64 temporary the size of
    the dense block, as ``np.bincount`` would need). A numba loop: one pass over the events."""
    for p in range(len(offsets) - 1):
        for k in range(offsets[p], offsets[p + 1]):
            out[p, pixels[k]] += 1


@numba.njit(cache=True, nogil=True)
def is_canonical(offsets: np.ndarray, pixels: np.ndarray) -> bool:
    """Whether every position's pixels are strictly increasing (sorted, no repeats). A numba
    loop: one pass, no temporaries."""
    for p in range(len(offsets) - 1):
        for k in range(offsets[p] + 1, offsets[p + 1]):
            if pixels[k] <= pixels[k - 1]:
                return False
    return True


@numba.njit(cache=True, nogil=True)
def canonicalize(offsets: np.ndarray, pixels: np.ndarray):
    """Each position's pixels sorted, repeats merged: (offsets, unique pixels, counts). A numba
    loop sorting each position's few hundred events: numpy would sort all events of a block by a
    64-bit key."""
    new_offsets = np.zeros(len(offsets), dtype=np.int64)
    out_pixels = np.empty(len(pixels), dtype=np.uint32)
    counts = np.empty(len(pixels), dtype=np.uint32)
    n = 0
    for p in range(len(offsets) - 1):
        row = np.sort(pixels[offsets[p] : offsets[p + 1]])
        for k in range(len(row)):
            if k > 0 and row[k] == row[k - 1]:
                counts[n - 1] += 1
            else:
                out_pixels[n] = row[k]
                counts[n] = 1
                n += 1
        new_offsets[p + 1] = n
    return new_offsets, out_pixels[:n], counts[:n]
