"""Counting kernel on one core against this machine's memory-read bound, measured in the same run.

The kernel has to look at every pixel of every frame at least once, so the fastest conceivable
single-core counter is one that only reads the frames. numpy's ``frames.max(axis=(1, 2))`` over
the same frames is that bound here: one vectorised pass, no writes. The ratio

    kernel frames/s  /  numpy max frames/s

says how close counting comes to just reading the data (1.0 = as fast as reading it).

Frames come from the detector simulator (576 x 576 uint16, pedestal ~20 ADU, read noise 2 ADU)
at --dose electrons/pixel/frame; thresholds are fixed at stempy-like production values
(background 28 ADU, X-ray 2000 ADU). numba runs on one thread. Both sides are timed --repeats
times, interleaved so that both see the same load on a shared machine; medians are printed.

    PYTHONPATH=src python benchmarks/bench_kernel.py [--frames 512] [--dose 0.002] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba

from stemstream.counting.kernel import ElectronCounter
from stemstream.sources.simulator import SimulationConfig
from common import simulated_frames




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=512, help="simulated frames counted per run")
    parser.add_argument("--dose", type=float, default=0.002, help="electrons/pixel/frame")
    parser.add_argument("--repeats", type=int, default=7, help="runs of each side; medians are reported")
    parser.add_argument("--background", type=float, default=28.0, help="background threshold, ADU")
    parser.add_argument("--xray", type=float, default=2000.0, help="X-ray threshold, ADU")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.frames < 1 or args.repeats < 1:
        parser.error("--frames and --repeats must be at least 1")

    numba.set_num_threads(1)
    scan_shape = (max(1, -(-args.frames // 64)), 64)
    frames = simulated_frames(SimulationConfig(scan_shape=scan_shape, dose=args.dose, seed=args.seed), args.frames)
    counter = ElectronCounter(args.background, args.xray)
    counted = counter.count(frames)  # compiles (or loads from the cache) and warms the buffers
    frames.max(axis=(1, 2))

    t_read, t_count = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        frames.max(axis=(1, 2))
        t_read.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        counter.count(frames)
        t_count.append(time.perf_counter() - t0)

    n = args.frames
    read_fps = n / statistics.median(t_read)
    count_fps = n / statistics.median(t_count)
    gbytes = frames.nbytes / 1e9
    print(
        f"counting kernel, 1 thread: {n} simulated frames of 576x576 uint16 ({gbytes:.2f} GB), dose {args.dose} "
        f"e/px/frame, {len(counted.events) / n:.0f} events/frame, median of {args.repeats} runs"
    )
    print(f"{'':32} {'frames/s':>10} {'GB/s':>7}")
    print(f"{'numpy frames.max (read bound)':32} {read_fps:10.0f} {read_fps * frames[0].nbytes / 1e9:7.2f}")
    print(f"{'ElectronCounter.count':32} {count_fps:10.0f} {count_fps * frames[0].nbytes / 1e9:7.2f}")
    print(f"ratio kernel / read bound: {count_fps / read_fps:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()
