"""Frame generation speed of the detector simulator, on one core, against numpy copying frames.

Prints frames/s (median of --repeats runs) of
- ``DetectorSimulator.batch`` allocating each batch (the ordinary use), and the plain numpy copy of
  the same number of frames in the same batch size (``array.copy()``, allocating too);
- ``batch(..., out=buffer)`` filling a reused buffer, and ``np.copyto`` into a reused buffer.
The ratio says how many times faster or slower generating a frame is than copying one.

    PYTHONPATH=src python benchmarks/bench_simulator.py [--frames 2048] [--batch-size 64] [--dose 0.002]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from stemstream.sources.simulator import DetectorSimulator, SimulationConfig


def median_seconds(run: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=2048, help="frames generated per run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dose", type=float, default=0.002, help="electrons/pixel/frame")
    parser.add_argument("--repeats", type=int, default=5, help="runs; the median is reported")
    args = parser.parse_args()

    batch_size = args.batch_size
    n_frames = max(batch_size, args.frames // batch_size * batch_size)
    starts = range(0, n_frames, batch_size)
    config = SimulationConfig(scan_shape=(n_frames // 64 + 1, 64), dose=args.dose)
    t0 = time.perf_counter()
    sim = DetectorSimulator(config)
    source = sim.batch(0, batch_size).frames  # also compiles the kernel (or loads it from the cache)
    setup = time.perf_counter() - t0
    buffer = np.empty_like(source)

    def generate() -> None:
        for start in starts:
            sim.batch(start, batch_size)

    def generate_into_buffer() -> None:
        for start in starts:
            sim.batch(start, batch_size, out=buffer)

    def copy() -> None:
        for _ in starts:
            source.copy()

    def copy_into_buffer() -> None:
        for _ in starts:
            np.copyto(buffer, source)

    # Interleave so that both sides see the same machine load.
    results = {}
    for name, run in [
        ("simulate", generate),
        ("numpy copy", copy),
        ("simulate, out=", generate_into_buffer),
        ("numpy copyto", copy_into_buffer),
    ]:
        results[name] = n_frames / median_seconds(run, args.repeats)

    electrons = args.dose * 576 * 576
    print(
        f"detector simulator: {n_frames} frames of 576x576 uint16 per run, batches of {batch_size}, "
        f"dose {args.dose} electrons/pixel/frame (~{electrons:.0f} electrons/frame), median of {args.repeats} runs, "
        f"one thread; setup {setup:.2f} s"
    )
    for name, fps in results.items():
        print(f"  {name:<16} {fps:>10,.0f} frames/s")
    print(f"  ratio simulate / numpy copy          {results['simulate'] / results['numpy copy']:.2f}")
    print(f"  ratio simulate out= / numpy copyto   {results['simulate, out='] / results['numpy copyto']:.2f}")


if __name__ == "__main__":
    main()
