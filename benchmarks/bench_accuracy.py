"""Counting accuracy against the simulator's true electrons, at several doses.

For each dose, simulate --frames frames (576 x 576, the detector simulator's defaults: pedestal
20 ADU, read noise 2 ADU, gamma-distributed charge of 120 ADU on average shared over 3 x 3 pixels,
X-rays, hot and dead pixels), calibrate the thresholds exactly as ``stemstream count`` does
(stempy's method with production settings: 1200 frames drawn from the first 640, background =
fitted pedestal + 4 sigma, X-ray = mean + 175 std), count with the compiled kernel, and match the
events to the true landing pixels (``FrameBatch.true_events``):

- recall    = true electrons with an event at their pixel / true electrons
- precision = events at a true electron's pixel / events
- "within 1 px": unmatched events may also match an unmatched electron among the 8 neighbours.

True electrons are distinct landing pixels: two electrons on one pixel are one (counting cannot
tell them apart); the ``electrons`` column counts them all. ``isolated`` is the fraction of true
electrons with no other within 2 pixels, and ``recall isolated`` the recall among those: the gap
between it and the overall recall is coincidence loss (two electrons whose 3 x 3 neighbourhoods
overlap give one strict maximum or none), which grows with the local dose in the diffraction discs.

    PYTHONPATH=src python benchmarks/bench_accuracy.py [--frames 512] [--doses 0.001 0.005 0.02]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from stemstream.counting.accuracy import compare_with_truth
from stemstream.counting.kernel import ElectronCounter
from stemstream.counting.thresholds import PixelHistogram, draw_sample_weights, thresholds_from_histogram
from stemstream.sources.simulator import DetectorSimulator, SimulationConfig


def measure(dose: float, n_frames: int, seed: int, samples: int, calibration_frames: int):
    config = SimulationConfig(scan_shape=(max(1, -(-n_frames // 64)), 64), dose=dose, seed=seed)
    sim = DetectorSimulator(config)
    frames = np.empty((n_frames, 576, 576), np.uint16)
    true_events: list[np.ndarray] = []
    electrons = 0
    for start in range(0, n_frames, 32):
        count = min(32, n_frames - start)
        batch = sim.batch(start, count, out=frames[start : start + count])
        true_events.extend(batch.true_events)
        electrons += int(batch.electron_counts.sum())

    # The calibration of ``stemstream count`` (counting.offline.calibrate_from_scan), in memory.
    candidates = min(n_frames, calibration_frames)
    weights = draw_sample_weights(candidates, samples, seed=0)
    histogram = PixelHistogram()
    histogram.add_frames(frames[:candidates], weights)
    thresholds = thresholds_from_histogram(histogram, 4.0, 175.0)

    counted = ElectronCounter(thresholds.background, thresholds.xray).count(frames)
    accuracy = compare_with_truth(counted.events, counted.offsets, true_events)
    return thresholds, electrons, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=512, help="simulated frames per dose")
    parser.add_argument("--doses", type=float, nargs="+", default=[0.001, 0.005, 0.02], help="electrons/pixel/frame")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=1200, help="calibration: frames drawn (stempy production: 1200)")
    parser.add_argument("--calibration-frames", type=int, default=640, help="calibration: drawn from this many first frames")
    args = parser.parse_args()
    if args.frames < 1:
        parser.error("--frames must be at least 1")

    t0 = time.perf_counter()
    print(f"counting accuracy against the simulator's truth: {args.frames} frames of 576x576 per dose, "
          f"thresholds calibrated as `stemstream count` does (seed {args.seed})")
    header = (f"{'dose':>6} {'electrons/frame':>15} {'true px/frame':>13} {'events/frame':>12} {'background':>10} "
              f"{'recall':>7} {'precision':>9} {'recall 1px':>10} {'precision 1px':>13} {'isolated':>8} {'recall isolated':>15}")
    print(header)
    for dose in args.doses:
        thresholds, electrons, acc = measure(dose, args.frames, args.seed, args.samples, args.calibration_frames)
        n = args.frames
        print(f"{dose:6.3f} {electrons / n:15.1f} {acc.true / n:13.1f} {acc.events / n:12.1f} "
              f"{thresholds.background:10.2f} {acc.recall:7.4f} {acc.precision:9.4f} "
              f"{acc.recall_within_1:10.4f} {acc.precision_within_1:13.4f} {acc.isolated / max(acc.true, 1):8.3f} "
              f"{acc.isolated_recall:15.4f}")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
