"""Counting and calibrating straight from a scan's raw files.

Each numba thread reads a frame with ``pread`` into its own scratch frame and works on it at once
(counts it, or adds it to the calibration histogram), then takes the next frame not yet taken (a
shared atomic counter: a thread that the machine deschedules holds no share of the work). There
is no reader thread and no batch buffer: a frame crosses main memory once, the scratch frame stays
in the thread's cache, and all cores share reading and counting alike. Python only hands out
ranges of frames and collects the events.
"""

from __future__ import annotations

import numba
import numpy as np

from stemstream.counting.kernel import CountedFrames, ElectronCounter, read_count
from stemstream.counting.thresholds import PixelHistogram, read_accumulate
from stemstream.formats.raw import FRAME_SHAPE
from stemstream.formats.raw_pread import raise_read_error
from stemstream.formats.raw_scan import RawScan


class RawFrameWorker:
    """Counts (or histograms) frames of an open RawScan by their FrameTable indices, using
    ``threads`` numba threads (default: numba's current setting); one scratch frame per thread."""

    def __init__(self, scan: RawScan, threads: int | None = None):
        self.scan = scan
        self.threads = threads or numba.get_num_threads()
        self._fds = scan.file_descriptors()
        self._frames = np.empty((self.threads, *FRAME_SHAPE), np.uint16)
        self._failed = np.empty(0, np.int64)

    def _failures(self, n: int) -> np.ndarray:
        if self._failed.shape[0] < n:
            self._failed = np.empty(n, np.int64)
        return self._failed[:n]

    def _check(self, indices: np.ndarray, failed: np.ndarray) -> None:
        bad = np.flatnonzero(failed >= 0)
        if bad.size:
            table = self.scan.table
            raise_read_error(self.scan.paths, self._fds, table.source_file, table.source_record,
                             int(indices[bad[0]]), int(failed[bad[0]]))

    def count(self, counter: ElectronCounter, indices: np.ndarray) -> CountedFrames:
        """Events of the frames at ``indices`` (FrameTable rows), in that order. Raises OSError
        when a file cannot be read."""
        indices = np.ascontiguousarray(indices, np.int64)
        n = len(indices)
        out, counts = counter.event_buffers(n)
        failed = self._failures(n)
        if n:
            table = self.scan.table
            read_count(self._fds, table.source_file, table.source_record, indices, counter.params,
                        self._frames, out, counts, failed, min(n, self.threads))
            self._check(indices, failed)
        return counter.compact(n)

    def histogram(self, histogram: PixelHistogram, indices: np.ndarray, weights: np.ndarray,
                  dark: np.ndarray | None = None) -> None:
        """Add the frames at ``indices``, frame ``i`` ``weights[i]`` times, to ``histogram``."""
        indices = np.ascontiguousarray(indices, np.int64)
        weights = np.ascontiguousarray(weights, np.int64)
        n = len(indices)
        if n == 0:
            return
        if dark is None:
            dark_int, use_dark = np.zeros((1, 1), np.int64), False
        else:
            dark_int, use_dark = np.asarray(dark, np.float32).astype(np.int64), True
        failed = self._failures(n)
        table = self.scan.table
        read_accumulate(self._fds, table.source_file, table.source_record, indices, weights, dark_int, use_dark,
                         self._frames, histogram.counts, failed, min(n, self.threads))
        self._check(indices, failed)
        histogram.n_frames += int(weights.sum())
