"""What a producer streams: one module's sector records, grouped by routing block.

A source yields ``(block, records)``: all of this module's records of one routing block (frames
``block * block_frames`` to ``(block + 1) * block_frames - 1``), in frame order, exactly once per
block that has any frame of the scan. The simulator yields every block, with no record when every
sector of the block was dropped (the node group then knows not to wait for it); a replay yields
the blocks its files hold records of (SourceError when they hold other scans' records only: a
scan number asked of files that do not hold it). ``blocks(buffer_for)`` asks
``buffer_for(n)`` for the array to put a block's ``n`` records in (the producer's shared-memory
slot, so they are written once); when it returns None the source allocates its own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from stemstream.core.scan_spec import ScanSpec
from stemstream.formats.raw import RECORD_BYTES, RECORD_DTYPE, discover_raw_files, inspect_raw_file
from stemstream.formats.raw_pread import read_headers
from stemstream.sources.protocol import SourceError
from stemstream.sources.simulator import DetectorSimulator, SimulationConfig


class SimulatedModule:
    """One module of the detector simulator, live: ``rate`` frames/s (0: as fast as possible)."""

    def __init__(self, spec: ScanSpec, module: int, dose: float = 0.002, seed: int = 0, rate: float = 0.0,
                 drop_sector_probability: float = 0.0):
        self.config = SimulationConfig(
            scan_shape=spec.shape, frames_per_position=spec.frames_per_position, dose=dose,
            seed=seed, scan_number=spec.number, first_frame_number=0,
            drop_sector_probability=drop_sector_probability,
        )
        self.simulator = DetectorSimulator(self.config)
        self.module = module
        self.block_frames = spec.block_frames
        self.rate = rate

    def blocks(self, buffer_for: Callable[[int], np.ndarray | None] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        n = self.simulator.n_frames
        t0 = time.monotonic()
        # first_frame_number = 0, so frame index == frame number and blocks start at index 0
        for start in range(0, n, self.block_frames):
            count = min(self.block_frames, n - start)
            if self.rate > 0:
                delay = t0 + start / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            out = buffer_for(count) if buffer_for is not None else None
            yield start // self.block_frames, self.simulator.records(start, count, self.module, out=out)


class ReplayModule:
    """One module's raw files (any order, several files), re-read in frame order, block by block.

    Only headers are read up front (16 bytes per record); pixels are read block by block.
    """

    def __init__(self, paths: list[str | Path], module: int, block_frames: int, scan_number: int | None = None):
        files = [p for p in discover_raw_files(paths) if inspect_raw_file(p).module == module]
        self.module = module
        self.block_frames = block_frames
        self.paths = files
        file_ids, recs, numbers, held = [], [], [], set()
        all_headers = read_headers(files, [inspect_raw_file(path).n_records for path in files])
        for i, headers in enumerate(all_headers):
            keep = np.ones(len(headers), bool) if scan_number is None else headers["scan_number"] == scan_number
            file_ids.append(np.full(int(keep.sum()), i, np.int32))
            recs.append(np.flatnonzero(keep))
            numbers.append(headers["frame_number"][keep])
            held.update(np.unique(headers["scan_number"]).tolist())
        if scan_number is not None and held and scan_number not in held:
            shown = ", ".join(map(str, sorted(held)[:5])) + (", ..." if len(held) > 5 else "")
            raise SourceError(f"the raw files of module {module} hold no record of scan {scan_number} "
                              f"(they hold scan(s) {shown})")
        self.file_ids = np.concatenate(file_ids) if file_ids else np.empty(0, np.int32)
        self.recs = np.concatenate(recs) if recs else np.empty(0, np.int64)
        self.frame_numbers = np.concatenate(numbers) if numbers else np.empty(0, np.uint32)
        order = np.argsort(self.frame_numbers, kind="stable")
        self.file_ids, self.recs, self.frame_numbers = self.file_ids[order], self.recs[order], self.frame_numbers[order]

    def blocks(self, buffer_for: Callable[[int], np.ndarray | None] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        if not len(self.frame_numbers):  # no record of this scan in the files: nothing to stream
            return
        fds = [os.open(p, os.O_RDONLY) for p in self.paths]
        try:
            block_ids = self.frame_numbers // self.block_frames
            bounds = np.flatnonzero(np.r_[True, block_ids[1:] != block_ids[:-1], True])
            for a, b in zip(bounds[:-1], bounds[1:]):
                records = buffer_for(b - a) if buffer_for is not None else None
                if records is None:
                    records = np.empty(b - a, RECORD_DTYPE)
                view = memoryview(records).cast("B")
                for k in range(a, b):
                    offset = int(self.recs[k]) * RECORD_BYTES
                    os.preadv(fds[self.file_ids[k]], [view[(k - a) * RECORD_BYTES:(k - a + 1) * RECORD_BYTES]], offset)
                yield int(block_ids[a]), records
        finally:
            for fd in fds:
                os.close(fd)
