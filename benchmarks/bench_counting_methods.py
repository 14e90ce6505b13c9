"""The two counting methods against the simulator's truth, per dose and charge model (docs/counting.md).

For each charge model ("gamma": the simulator's default, gamma-distributed deposits and a 0.15 px
charge cloud; "landau": Moyal-distributed deposits of the same mean and spread and a 0.3 px
cloud) and dose, simulate --frames frames of a 576 x 576 scan row, calibrate thresholds as
``stemstream count`` does (stempy's method) and the cluster method's single-electron model from
the first 64 frames, count with both methods, and compare with every electron that landed
(sources.simulator.landed_electrons: two electrons on one pixel are two):

- counted / true: events over electrons (1.0 = every electron counted once);
- recall / precision within 1 px: events matched one to one with electrons at most 1 px away
  (counting.accuracy.compare_with_electrons), greedily (exact pixels first, then each event's
  first free neighbour) and by a maximum matching (the most such pairs there are);
- VBF contrast: std / mean over the frames of the virtual bright field (events in the disc of
  the summed true pattern above half its maximum), counted over true; VBF corr: correlation of
  the counted and the true virtual bright field;
- CoM error: RMS over frames of the distance (px) between the counted and the true centre of mass;
- frames/s: one thread, frames in memory, both methods timed alternately in the same run (best
  of 3); speed ratio = clusters / maxima.

    PYTHONPATH=src python benchmarks/bench_counting_methods.py [--frames 128] [--doses ...]
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np

from stemstream.counting.accuracy import compare_with_electrons
from stemstream.counting.cluster_counter import ClusterCounter, calibrate_cluster_model
from stemstream.counting.kernel import ElectronCounter
from stemstream.counting.thresholds import PixelHistogram, draw_sample_weights, thresholds_from_histogram
from stemstream.sources.simulator import DetectorSimulator, SimulationConfig, landed_electrons

CHARGE_MODELS = {"gamma": {}, "landau": {"charge_model": "landau", "charge_cloud_sigma": 0.3}}


def simulate(dose: float, n: int, seed: int, model: str):
    config = SimulationConfig(scan_shape=(1, n), dose=dose, seed=seed, **CHARGE_MODELS[model])
    sim = DetectorSimulator(config)
    frames = np.empty((n, 576, 576), np.uint16)
    electrons: list[np.ndarray] = []
    for start in range(0, n, 32):
        count = min(32, n - start)
        sim.batch(start, count, out=frames[start : start + count])
        electrons += landed_electrons(sim, start, count)
    return frames, electrons


def images(events: np.ndarray, offsets: np.ndarray, bf_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: the virtual bright field (events in the mask) and the centre of mass (row, col)."""
    n = len(offsets) - 1
    frame_of = np.repeat(np.arange(n), np.diff(offsets))
    events = events.astype(np.int64)
    bf = np.bincount(frame_of, weights=bf_mask[events], minlength=n)
    counts = np.maximum(np.bincount(frame_of, minlength=n), 1)
    com = np.stack([np.bincount(frame_of, weights=events // 576, minlength=n),
                    np.bincount(frame_of, weights=events % 576, minlength=n)], axis=1) / counts[:, None]
    return bf, com


def best_speed(counters: dict, frames: np.ndarray) -> dict:
    best = {name: np.inf for name in counters}
    for _ in range(3):
        for name, counter in counters.items():
            t0 = time.perf_counter()
            counter.count(frames)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: len(frames) / t for name, t in best.items()}


def measure(dose: float, n: int, seed: int, model: str) -> list[dict]:
    frames, electrons = simulate(dose, n, seed, model)
    histogram = PixelHistogram()
    histogram.add_frames(frames, draw_sample_weights(n, 1200, seed=0))
    thresholds = thresholds_from_histogram(histogram)
    cluster_model = calibrate_cluster_model(frames[:64], thresholds)
    counters = {"maxima": ElectronCounter(thresholds.background, thresholds.xray),
                "clusters": ClusterCounter(thresholds.background, thresholds.xray, cluster_model)}
    true_offsets = np.concatenate([[0], np.cumsum([len(e) for e in electrons])])
    true_events = np.concatenate(electrons)
    pattern = np.bincount(true_events.astype(np.int64), minlength=576 * 576).astype(float)
    bf_mask = pattern >= 0.5 * pattern.max()
    true_bf, true_com = images(true_events, true_offsets, bf_mask)
    speed = best_speed(counters, frames)
    rows = []
    for name, counter in counters.items():
        counted = counter.count(frames)
        acc = compare_with_electrons(counted.events, counted.offsets, electrons)
        best = compare_with_electrons(counted.events, counted.offsets, electrons, matching="maximum")
        bf, com = images(counted.events, counted.offsets, bf_mask)
        rows.append({
            "model": model, "dose": dose, "method": name, "electrons": acc.true / n,
            "ratio": acc.events / acc.true, "recall": acc.recall_within_1, "precision": acc.precision_within_1,
            "recall_max": best.recall_within_1, "precision_max": best.precision_within_1,
            "contrast": (bf.std() / bf.mean()) / (true_bf.std() / true_bf.mean()),
            "corr": float(np.corrcoef(bf, true_bf)[0, 1]),
            "com": float(np.sqrt(((com - true_com) ** 2).sum(axis=1).mean())),
            "fps": speed[name], "speed_ratio": speed[name] / speed["maxima"],
            "single": cluster_model.mean,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=128, help="simulated frames per dose and charge model")
    parser.add_argument("--doses", type=float, nargs="+", default=[0.001, 0.005, 0.02, 0.05])
    parser.add_argument("--models", nargs="+", default=list(CHARGE_MODELS), choices=list(CHARGE_MODELS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.frames < 64:
        parser.error("--frames must be at least 64 (the cluster model is calibrated from 64 frames)")
    numba.set_num_threads(1)
    t0 = time.perf_counter()
    print(f"counting methods against the simulator's truth: {args.frames} frames of 576x576 per dose, one thread")
    print("| charge model | dose e/px/frame | electrons/frame | method | counted / true | recall 1 px | precision 1 px "
          "| recall / precision 1 px, max. matching | VBF contrast counted/true | VBF corr | CoM error px | frames/s "
          "| speed vs maxima |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model in args.models:
        for dose in args.doses:
            for r in measure(dose, args.frames, args.seed, model):
                print(f"| {r['model']} | {r['dose']:.3f} | {r['electrons']:.0f} | {r['method']} | {r['ratio']:.3f} "
                      f"| {r['recall']:.3f} | {r['precision']:.3f} | {r['recall_max']:.3f} / {r['precision_max']:.3f} "
                      f"| {r['contrast']:.3f} | {r['corr']:.4f} "
                      f"| {r['com']:.3f} | {r['fps']:.0f} | {r['speed_ratio']:.2f} |", flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
