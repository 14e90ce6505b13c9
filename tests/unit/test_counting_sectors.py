"""Counting straight from sector records equals counting the assembled frames."""

from __future__ import annotations

import numpy as np
import pytest

from stemstream.counting.kernel import ElectronCounter
from stemstream.counting.sectors import count_from_sectors
from stemstream.formats.raw import make_sector_records, sector_rows
from stemstream.sources.simulator import DetectorSimulator, SimulationConfig


@pytest.fixture(scope="module")
def frames():
    sim = DetectorSimulator(SimulationConfig(scan_shape=(4, 4), dose=0.01, seed=9))
    frames = sim.batch(0, 16).frames.copy()
    # events on the sector boundaries: blocked from across, kept, plateau across
    frames[:, 143, 10], frames[:, 144, 11] = 300, 301
    frames[:, 287, 20], frames[:, 288, 20] = 302, 100
    frames[:, 432, 30], frames[:, 431, 29] = 303, 303
    return frames


def test_equal_to_counting_assembled_frames(frames):
    counter = ElectronCounter(28.0, 1000.0)
    buffers = [make_sector_records(1, np.arange(16, dtype=np.uint32), (4, 4), np.arange(16), frames, m) for m in range(4)]
    index = np.tile(np.arange(16)[:, None], (1, 4))
    expected = counter.count(frames)
    got = count_from_sectors(counter, buffers, index)
    assert np.array_equal(got.offsets, expected.offsets) and np.array_equal(got.events, expected.events)


def test_missing_sectors_count_as_zero_rows(frames):
    counter = ElectronCounter(28.0, 1000.0)
    buffers = [make_sector_records(1, np.arange(16, dtype=np.uint32), (4, 4), np.arange(16), frames, m) for m in range(4)]
    index = np.tile(np.arange(16)[:, None], (1, 4))
    index[3, 1] = index[7, 2] = index[7, 3] = -1
    assembled = frames.copy()
    assembled[3, sector_rows(1)] = 0
    assembled[7, sector_rows(2)] = assembled[7, sector_rows(3)] = 0
    expected = counter.count(assembled)
    got = count_from_sectors(counter, buffers, index)
    assert np.array_equal(got.offsets, expected.offsets) and np.array_equal(got.events, expected.events)


def test_corrections_are_refused():
    counter = ElectronCounter(28.0, 1000.0, dark=np.zeros((576, 576), np.float32))
    with pytest.raises(ValueError, match="plain thresholds"):
        count_from_sectors(counter, [None] * 4, np.zeros((0, 4), np.int64))
