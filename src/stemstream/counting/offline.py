"""Offline counting: raw module files on disk -> counted sparse HDF5 (what ``stemstream count`` runs).

Two stages overlap: the calling thread reads and counts batches of frames in compiled code (each
numba thread ``pread``s a frame into its own scratch frame and counts it at once, GIL released; see
counting.from_files), and a writer thread appends the events to the HDF5 file. Memory is one
scratch frame per thread, the event rows of one batch and the writer's buffer, whatever the scan
size. Calibration reads its sample frames the same way.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np

from stemstream.core.config import COUNTING_METHODS
from stemstream.core.version import SOFTWARE_VERSION
from stemstream.counting.cluster_counter import CLUSTER_FRAMES, ClusterCounter, calibrate_cluster_model
from stemstream.counting.from_files import RawFrameWorker
from stemstream.counting.kernel import ElectronCounter
from stemstream.counting.thresholds import (
    PixelHistogram,
    Thresholds,
    draw_sample_weights,
    fixed_thresholds,
    thresholds_from_histogram,
)
from stemstream.formats.raw import FRAME_SHAPE
from stemstream.formats.raw_pread import raise_read_error
from stemstream.formats.reference_images import load_reference_image
from stemstream.formats.sparse_h5 import SparseCountsWriter
from stemstream.formats.ledger import ScanLedger
from stemstream.formats.raw_scan import RawScan

log = logging.getLogger(__name__)


@dataclass
class CountOptions:
    """How to count. Thresholds are fixed when both background and xray are given (ADU),
    otherwise calibrated from ``samples`` frames drawn from the first ``calibration_frames``
    complete frames, with ``background_n_sigma`` / ``xray_n_sigma`` (stempy's production
    settings are the defaults). ``method``: "maxima" (stempy's strict 3 x 3 maxima) or
    "clusters" (counting.clusters: coincident electrons counted, sub-pixel positions written;
    its single-electron model is calibrated from the first ``cluster_frames`` complete frames)."""

    background: float | None = None
    xray: float | None = None
    background_n_sigma: float = 4.0
    xray_n_sigma: float = 175.0
    samples: int = 1200
    calibration_frames: int = 640
    dark: Path | None = None
    gain: Path | None = None
    row_dark: bool = False
    workers: int | None = None  # counting threads; None: all cores
    batch_size: int = 256  # frames per compiled call (a progress step); event rows of 331 kB each, only written pages resident
    seed: int | None = 0
    method: str = "maxima"
    cluster_frames: int = CLUSTER_FRAMES

    def __post_init__(self):
        if self.method not in COUNTING_METHODS:
            raise ValueError(f"--method must be one of {', '.join(COUNTING_METHODS)}, got {self.method!r}")
        if self.method == "clusters" and (self.gain is not None or self.row_dark):
            raise ValueError("--method clusters takes a dark reference but not --gain or --row-dark (yet)")
        if (self.background is None) != (self.xray is None):
            raise ValueError("give both --background-threshold and --xray-threshold, or neither (to calibrate)")
        if self.background is not None:
            fixed_thresholds(self.background, self.xray)  # raises for thresholds in the wrong order
        if self.samples < 1:
            raise ValueError(f"--samples must be at least 1, got {self.samples}")
        if self.batch_size < 1:
            raise ValueError(f"the batch size must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")


@dataclass
class CountResult:
    output: Path
    ledger: ScanLedger
    thresholds: Thresholds
    n_events: int
    seconds: float
    seconds_calibrating: float
    frames_per_position: int
    files: list[Path] = field(default_factory=list)

    @property
    def frames_per_second(self) -> float:
        return self.ledger.frames_received / self.seconds if self.seconds > 0 else 0.0


def calibrate_from_scan(scan: RawScan, options: CountOptions, dark: np.ndarray | None,
                        worker: RawFrameWorker | None = None) -> Thresholds:
    """stempy's calibration over this scan's first complete frames (see thresholds.py)."""
    complete = np.flatnonzero(scan.table.complete)[: options.calibration_frames]
    weights = draw_sample_weights(len(complete), options.samples, options.seed)
    chosen = complete[weights > 0]
    hist = PixelHistogram()
    (worker or RawFrameWorker(scan)).histogram(hist, chosen, weights[weights > 0], dark)
    return thresholds_from_histogram(hist, options.background_n_sigma, options.xray_n_sigma)


def count_raw_scan(
    paths: list[str | Path],
    output: str | Path,
    options: CountOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> CountResult:
    """Count a scan's raw files into ``output`` (stempy sparse HDF5, version 3).

    ``progress(done, total)`` is called after each batch. Raises RawFormatError (unreadable input),
    ReferenceImageError (bad dark/gain file), CalibrationError, OSError (output not writable).
    """
    options = options or CountOptions()
    output = Path(output)
    t0 = time.perf_counter()
    dark = load_reference_image(options.dark, "dark reference") if options.dark else None
    gain = load_reference_image(options.gain, "gain map") if options.gain else None
    scan = RawScan(paths)
    previous_threads = numba.get_num_threads()
    try:
        if options.workers:
            numba.set_num_threads(min(options.workers, numba.config.NUMBA_NUM_THREADS))
        worker = RawFrameWorker(scan)
        t_cal = time.perf_counter()
        if options.background is not None:
            thresholds = fixed_thresholds(options.background, options.xray)
        else:
            thresholds = calibrate_from_scan(scan, options, dark, worker)
        log.info("thresholds: background %.2f ADU, X-ray %.1f ADU", thresholds.background, thresholds.xray)
        if options.method == "clusters":
            model = calibrate_cluster_model(scan.read_frames(np.flatnonzero(scan.table.complete)[: options.cluster_frames]),
                                            thresholds, dark)
            log.info("one electron: %.1f ADU on average, gamma shape %.2f", model.mean, model.shape)
            counter = _ClusterWorker(ClusterCounter(thresholds.background, thresholds.xray, model, FRAME_SHAPE, dark),
                                     worker)
        else:
            counter = ElectronCounter(
                thresholds.background, thresholds.xray, FRAME_SHAPE, dark, gain,
                row_dark=options.row_dark, optimized_mean=thresholds.optimized_mean,
            )
        seconds_calibrating = time.perf_counter() - t_cal
        # Flushing every 1024 frames bounds the events held for the file to ~2.5 MB at 0.002 e/px
        # (twice that while h5py converts them), see benchmarks/bench_count_memory.py.
        writer = SparseCountsWriter(output, scan.scan_shape, FRAME_SHAPE, scan.frames_per_position,
                                    overwrite=overwrite, flush_frames=1024,
                                    subpixel_positions=options.method == "clusters")
        n_events = _count_all(scan, worker, counter, writer, thresholds, options, progress, t0)
    finally:
        numba.set_num_threads(previous_threads)
        scan.close()
    seconds = time.perf_counter() - t0
    ledger = scan.ledger
    return CountResult(output, ledger, thresholds, n_events, seconds, seconds_calibrating,
                       scan.frames_per_position, list(scan.paths))


def _count_all(scan, worker, counter, writer, thresholds, options, progress, t0) -> int:
    ledger = scan.ledger
    n_total = scan.n_frames
    # The writer thread holds the GIL only in h5py and numpy calls, while counting runs in
    # compiled code without it; a short queue bounds the events waiting to be written.
    to_write: queue.Queue = queue.Queue(maxsize=4)
    failure: list[BaseException] = []
    stop = threading.Event()

    def write() -> None:
        try:
            while (item := to_write.get()) is not None:
                if stop.is_set():
                    continue  # drain, so that the counting thread never blocks on a full queue
                slots, counted = item
                writer.write_flat(slots, counted.events, counted.offsets, getattr(counted, "positions", None))
        except BaseException as exc:  # handed to the main thread
            failure.append(exc)
            stop.set()
            while to_write.get() is not None:
                pass

    writer_thread = threading.Thread(target=write, name="h5-writer", daemon=True)
    writer_thread.start()
    n_events = 0
    try:
        for s in range(0, n_total, options.batch_size):
            if stop.is_set():
                break
            idx = np.arange(s, min(s + options.batch_size, n_total))
            counted = counter.count_indices(idx) if isinstance(counter, _ClusterWorker) else worker.count(counter, idx)
            n_events += len(counted.events)
            to_write.put((scan.table.slots[idx], counted))
            if progress:
                progress(int(idx[-1]) + 1, n_total)
        to_write.put(None)
        writer_thread.join()
        if failure:
            raise failure[0]
    except BaseException:
        # Stop the writer and discard the partial file: a failed count never leaves a file that
        # looks finished.
        stop.set()
        to_write.put(None)
        writer_thread.join(5)
        writer.abort()
        raise

    complete = scan.table.complete
    ledger.frames_complete = int(complete.sum())
    ledger.frames_incomplete = int((~complete).sum())
    elapsed = time.perf_counter() - t0
    writer.set_metadata("electron_counting", thresholds.stempy_attributes())
    writer.set_metadata("stemstream", {
        "software": "stemstream",
        "software_version": SOFTWARE_VERSION,
        "mode": "offline",
        "scan_number": scan.scan_number,
        "seconds": elapsed,
        "frames_per_second": ledger.frames_received / elapsed if elapsed > 0 else 0.0,
        "events": n_events,
        "counting_method": options.method,
        "row_dark": options.row_dark,
        "dark_reference": str(options.dark) if options.dark else "",
        "gain_map": str(options.gain) if options.gain else "",
        "source_files": [str(p) for p in scan.paths],
        "ledger": ledger.as_dict(),
    })
    if isinstance(counter, _ClusterWorker):
        writer.set_metadata("stemstream/cluster_model", counter.counter.model.attributes())
    writer.close()
    return n_events


class _ClusterWorker:
    """A ClusterCounter reading the scan's raw files as RawFrameWorker does for the maxima kernel
    (one scratch frame per numba thread, read and counted in compiled code)."""

    def __init__(self, counter: ClusterCounter, worker: RawFrameWorker):
        self.counter = counter
        self.scan = worker.scan
        self._fds = worker.scan.file_descriptors()
        self._frames = np.empty((worker.threads, *FRAME_SHAPE), np.uint16)

    def count_indices(self, indices: np.ndarray):
        """ClusteredFrames of the frames at FrameTable ``indices``; OSError when a read fails."""
        indices = np.ascontiguousarray(indices, np.int64)
        failed = np.empty(len(indices), np.int64)
        table = self.scan.table
        counted = self.counter.read_count(self._fds, table, indices, self._frames, failed)
        bad = np.flatnonzero(failed >= 0)
        if bad.size:
            raise_read_error(self.scan.paths, self._fds, table.source_file, table.source_record,
                             int(indices[bad[0]]), int(failed[bad[0]]))
        return counted
