"""Counting finds the simulator's true electrons: sane lower bounds at the lowest dose, and the
matching that measures it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from stemstream.counting.accuracy import compare_with_electrons, compare_with_truth
from stemstream.counting.kernel import ElectronCounter
from stemstream.counting.thresholds import PixelHistogram, draw_sample_weights, thresholds_from_histogram
from stemstream.sources.simulator import DetectorSimulator, SimulationConfig


@pytest.fixture(scope="module")
def low_dose_batch():
    sim = DetectorSimulator(SimulationConfig(scan_shape=(1, 64), dose=0.001, seed=3))
    return sim.batch(0, 64)


def calibrated_counter(frames) -> ElectronCounter:
    # As `stemstream count` calibrates (production settings), from these frames.
    histogram = PixelHistogram()
    histogram.add_frames(frames, draw_sample_weights(len(frames), 1200, seed=0))
    t = thresholds_from_histogram(histogram, 4.0, 175.0)
    return ElectronCounter(t.background, t.xray)


def test_counting_recovers_the_true_electrons_at_low_dose(low_dose_batch):
    # Measured (benchmarks/bench_accuracy.py, 64 frames at 0.001): recall 0.932, precision 0.972,
    # isolated electrons found 0.999. Thresholds 2 ADU too low drop precision to 0.6; 45 ADU
    # instead of 28 drops the isolated recall to 0.97.
    counted = calibrated_counter(low_dose_batch.frames).count(low_dose_batch.frames)
    acc = compare_with_truth(counted.events, counted.offsets, low_dose_batch.true_events)
    assert acc.true > 20_000
    assert acc.recall >= 0.90
    assert acc.precision >= 0.95
    assert acc.isolated_recall >= 0.99


@pytest.mark.parametrize("background", [26.0, 45.0])
def test_the_bounds_catch_wrong_thresholds(low_dose_batch, background):
    counted = ElectronCounter(background, 1000.0).count(low_dose_batch.frames)
    acc = compare_with_truth(counted.events, counted.offsets, low_dose_batch.true_events)
    assert acc.precision < 0.95 or acc.isolated_recall < 0.99


def test_matching_is_exact_first_then_one_to_one_within_a_pixel():
    cols = 10
    truth = [np.array([0 * cols + 0, 5 * cols + 5, 8 * cols + 8], np.uint32), np.array([3], np.uint32)]
    # frame 0: one exact hit, two events next to the electron at (5, 5) (only one may match it),
    # one event far from everything; frame 1: no event.
    events = np.array([0, 5 * cols + 6, 6 * cols + 5, 2 * cols + 8], np.uint32)
    offsets = np.array([0, 4, 4])
    acc = compare_with_truth(events, offsets, truth, (10, 10))
    assert (acc.events, acc.true, acc.matched, acc.matched_within_1) == (4, 4, 1, 2)
    assert acc.recall == 0.25 and acc.precision_within_1 == 0.5
    assert (acc.isolated, acc.isolated_found) == (4, 1)
    with pytest.raises(ValueError, match="frames of truth"):
        compare_with_truth(events, offsets, truth[:1], (10, 10))


def test_maximum_matching_finds_the_pairs_greedy_misses():
    cols = 10
    # Electrons at (5, 5) and (5, 7); an event at (5, 6) next to both comes first and greedy gives
    # it (5, 5), the only electron the event at (5, 4) can reach. Two at one pixel are two.
    electrons = [np.array([5 * cols + 5, 5 * cols + 7], np.uint32), np.array([33, 33], np.uint32)]
    events = np.array([5 * cols + 6, 5 * cols + 4, 34, 43, 99], np.uint32)
    offsets = np.array([0, 2, 5])
    greedy = compare_with_electrons(events, offsets, electrons, (10, 10), matching="greedy")
    best = compare_with_electrons(events, offsets, electrons, (10, 10), matching="maximum")
    assert (greedy.matched_within_1, best.matched_within_1) == (3, 4)
    assert greedy.matched == best.matched == 0 and best.events == 5 and best.true == 4
    with pytest.raises(ValueError, match="matching"):
        compare_with_electrons(events, offsets, electrons, (10, 10), matching="best")


def test_maximum_matching_equals_an_optimal_assignment():
    # On random dense frames (where greedy and maximum differ), the pairs within 1 px equal those
    # of scipy's optimal assignment with cost 0 within 1 px and 1 beyond: an independent solver.
    rng = np.random.default_rng(5)
    shape = (12, 12)
    for _ in range(40):
        truth = rng.integers(0, 144, rng.integers(0, 30))
        events = rng.integers(0, 144, rng.integers(0, 30))
        got = compare_with_electrons(events.astype(np.uint32), np.array([0, len(events)]), [truth.astype(np.uint32)],
                                     shape, matching="maximum").matched_within_1
        far = (np.abs(events[:, None] // 12 - truth[None, :] // 12) > 1) | (
            np.abs(events[:, None] % 12 - truth[None, :] % 12) > 1)
        i, j = linear_sum_assignment(far.astype(float)) if len(events) and len(truth) else ([], [])
        assert got == int((~far[i, j]).sum()) if len(i) else got == 0
        greedy = compare_with_electrons(events.astype(np.uint32), np.array([0, len(events)]), [truth.astype(np.uint32)],
                                        shape).matched_within_1
        assert greedy <= got


def test_maximum_matching_on_a_crowded_frame():
    # As crowded as a bright-field disc at 0.05 e/px/frame (~1 electron a pixel): one component
    # of nearly everything, where augmenting paths are long. The same pairs as scipy's optimal
    # assignment.
    rng = np.random.default_rng(8)
    shape = (30, 30)
    truth = rng.integers(0, 900, 900)
    events = np.unique(np.clip(truth[:800] + rng.integers(-1, 2, 800) * 30 + rng.integers(-1, 2, 800), 0, 899))
    got = compare_with_electrons(events.astype(np.uint32), np.array([0, len(events)]), [truth.astype(np.uint32)],
                                 shape, matching="maximum").matched_within_1
    far = (np.abs(events[:, None] // 30 - truth[None, :] // 30) > 1) | (np.abs(events[:, None] % 30 - truth[None, :] % 30) > 1)
    i, j = linear_sum_assignment(far.astype(float))
    assert got == int((~far[i, j]).sum())
