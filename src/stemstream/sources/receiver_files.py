"""A simulated scan written to disk as the 4D Camera's receivers write a real one: one module's
raw files and receiver status file per receiver (formats.raw), for offline counting and replay.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stemstream.core.detector import N_MODULES
from stemstream.formats.raw import RawModuleWriter, make_sector_records, write_status_file
from stemstream.sources.detector_simulator import DetectorSimulator, FrameBatch, SimulationConfig


@dataclass(frozen=True)
class SimulationSummary:
    """What simulate_to_directory wrote."""

    out_dir: Path
    paths: list[Path]  # raw files, module 0 first, each module's files in order
    status_paths: list[Path]  # one receiver status JSON per module
    n_frames: int
    n_sectors_written: int
    n_sectors_dropped: int
    n_electrons: int  # electrons drawn
    n_true_events: int  # distinct landing pixels summed over frames: the ideal counting result
    seconds: float
    frames_per_second: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "frames_per_second", self.n_frames / self.seconds if self.seconds > 0 else 0.0)


def _write_sectors(
    writers: list[RawModuleWriter], config: SimulationConfig, batch: FrameBatch, dropped: np.ndarray
) -> None:
    """Write each module's sectors of the batch's frames to its writer, but for the dropped ones
    (dropped: (n, N_MODULES) bool)."""
    for m, writer in enumerate(writers):
        keep = ~dropped[:, m]
        if not keep.any():
            continue
        numbers, positions, frames = batch.frame_numbers, batch.positions, batch.frames
        if not keep.all():  # (a boolean index copies the frames: only when some sector is dropped)
            numbers, positions, frames = numbers[keep], positions[keep], frames[keep]
        writer.write(make_sector_records(config.scan_number, numbers, config.scan_shape, positions, frames, m))


def simulate_to_directory(
    out_dir: str | Path,
    config: SimulationConfig,
    records_per_file: int = 4096,
    progress: Callable[[int], None] | None = None,
    batch_size: int = 32,
) -> SimulationSummary:
    """Write a simulated scan as the receivers (one per module) would: raw files
    ``data_scan..._module{m}_dst0_file{f}.data`` (``records_per_file`` sector records each; dropped
    sectors are not written) and status files ``4dstem_rec_status_{m}_scan_{N}.json`` (progress 0
    at the start, every 10 %, 100 at the end).

    Creates ``out_dir`` if needed; existing files of the same names are overwritten. ``progress`` is
    called with the number of frames done after each batch of ``batch_size`` frames (32 frames = 21 MB:
    glibc reuses blocks this size, while blocks over 32 MB are fresh memory every time and
    page-faulting them costs about as much as generating the frames).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sim = DetectorSimulator(config)
    run_ids = [str(uuid.uuid4()) for _ in range(N_MODULES)]
    status_paths = [write_status_file(out_dir, m, config.scan_number, 0, run_ids[m]) for m in range(N_MODULES)]
    writers = [RawModuleWriter(out_dir, config.scan_number, m, records_per_file) for m in range(N_MODULES)]
    n_done = n_dropped = n_electrons = n_true = 0
    last_percent = 0
    try:
        for batch in sim.batches(batch_size):
            dropped = sim.dropped_sectors(batch)
            _write_sectors(writers, config, batch, dropped)
            n_done += len(batch)
            n_dropped += int(dropped.sum())
            n_electrons += int(batch.electron_counts.sum())
            n_true += sum(len(e) for e in batch.true_events)
            percent = 100 * n_done // sim.n_frames
            if percent // 10 > last_percent // 10 and percent < 100:
                for m in range(N_MODULES):
                    write_status_file(out_dir, m, config.scan_number, percent, run_ids[m])
                last_percent = percent
            if progress is not None:
                progress(n_done)
    finally:
        for writer in writers:
            writer.close()
    for m in range(N_MODULES):
        write_status_file(out_dir, m, config.scan_number, 100, run_ids[m])
    return SimulationSummary(
        out_dir=out_dir,
        paths=[p for w in writers for p in w.paths],
        status_paths=status_paths,
        n_frames=sim.n_frames,
        n_sectors_written=sum(w.records_written for w in writers),
        n_sectors_dropped=n_dropped,
        n_electrons=n_electrons,
        n_true_events=n_true,
        seconds=time.perf_counter() - t0,
    )
