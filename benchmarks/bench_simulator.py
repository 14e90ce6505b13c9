"""Frame generation speed of the detector simulator, on one core, against numpy copying frames.

Prints frames/s (median of --repeats runs) of
- ``DetectorSimulator.batch`` allocating each batch (the ordinary use), and the plain numpy copy of
  the same number of frames in the same batch size (``array.copy()``, allocating too);
- ``batch(..., out=buffer)`` filling a reused buffer, and ``np.copyto`` into a reused buffer.
The ratio says how many times faster or slower generating a frame is than copying one.

Then sectors/s of one module's sector alone (what each of the 4 producers renders):
- ``sector_batch(..., module, out=buffer)`` per module, and all modules together (4 sectors over the
  summed time of the 4 modules: the per-core rate of 4 producers);
- ``records(...)`` per module (header and sector rendered into the record array, as sent),
  allocating each batch of records and, with ``out=``, filling a reused one;
and the ratio of sector rate to whole-frame rate (``out=`` both): 4 means a sector costs exactly a
quarter of a frame. Sectors through the middle of the frame (modules 1, 2) cost more: the bright
field disk is centred on the boundary between them, so each gets half its electrons.

Every run renders the patterns of the specimen afresh (the simulator keeps those of the last
few blocks of 1024 scan positions), as a live stream does.

Last, CPU time per sector of ``records(..., out=)`` (``time.process_time``, median of the runs, per
module and the mean over the 4 modules: what one producer spends per frame), next to the CPU time
of a plain numpy sector in the same runs (``rng.normal`` for 144 x 576 pixels, ``+ pedestal``,
``astype(uint16)``): on a loaded machine the absolute figures move, the ratio much less.

    PYTHONPATH=src python benchmarks/bench_simulator.py [--frames 2048] [--batch-size 64] [--dose 0.002]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from stemstream.formats.raw import N_MODULES, RECORD_DTYPE, SECTOR_ROWS
from stemstream.sources.simulator import DetectorSimulator, SimulationConfig


def median_seconds(run: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_seconds(run: Callable[[], None]) -> float:
    t0 = time.process_time()
    run()
    return time.process_time() - t0


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
    sector_buffer = np.empty((batch_size, SECTOR_ROWS, source.shape[2]), source.dtype)
    record_buffer = np.empty(batch_size, RECORD_DTYPE)

    def fresh() -> None:
        sim._pattern_cache.clear()  # forget the specimen's patterns: each run computes its own

    def generate() -> None:
        fresh()
        for start in starts:
            sim.batch(start, batch_size)

    def generate_into_buffer() -> None:
        fresh()
        for start in starts:
            sim.batch(start, batch_size, out=buffer)

    def copy() -> None:
        for _ in starts:
            source.copy()

    def copy_into_buffer() -> None:
        for _ in starts:
            np.copyto(buffer, source)

    def sectors_into_buffer(module: int) -> Callable[[], None]:
        def run() -> None:
            fresh()
            for start in starts:
                sim.sector_batch(start, batch_size, module, out=sector_buffer)

        return run

    def records(module: int, out: np.ndarray | None = None) -> Callable[[], None]:
        def run() -> None:
            fresh()
            for start in starts:
                sim.records(start, batch_size, module, out=out)

        return run

    # Interleave so that all sides see the same machine load.
    runs: list[tuple[str, Callable[[], None]]] = [
        ("simulate", generate),
        ("numpy copy", copy),
        ("simulate, out=", generate_into_buffer),
        ("numpy copyto", copy_into_buffer),
    ]
    runs += [(f"sector {m}, out=", sectors_into_buffer(m)) for m in range(N_MODULES)]
    runs += [(f"records {m}", records(m)) for m in range(N_MODULES)]
    runs += [(f"records {m}, out=", records(m, record_buffer)) for m in range(N_MODULES)]
    for m in range(N_MODULES):  # compile the sector path before timing
        sim.sector_batch(0, 1, m)
    results = {name: n_frames / median_seconds(run, args.repeats) for name, run in runs}

    # CPU per sector, interleaved with the numpy baseline so that both see the same load.
    rng = np.random.default_rng(0)
    numpy_sectors = max(1, n_frames // 8)  # ~1 ms each: fewer of them

    def numpy_sector_runs() -> None:
        for _ in range(numpy_sectors):
            (rng.normal(0.0, config.read_noise, (SECTOR_ROWS, source.shape[2])) + config.pedestal).astype(np.uint16)

    cpu: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for m in range(N_MODULES):
            cpu.setdefault(f"records {m}", []).append(cpu_seconds(records(m, record_buffer)) / n_frames)
        cpu.setdefault("numpy", []).append(cpu_seconds(numpy_sector_runs) / numpy_sectors)
    cpu_median = {name: statistics.median(values) for name, values in cpu.items()}

    electrons = args.dose * 576 * 576
    print(
        f"detector simulator: {n_frames} frames of 576x576 uint16 per run, batches of {batch_size}, "
        f"dose {args.dose} electrons/pixel/frame (~{electrons:.0f} electrons/frame), median of {args.repeats} runs, "
        f"one thread; setup {setup:.2f} s"
    )
    for name in ("simulate", "numpy copy", "simulate, out=", "numpy copyto"):
        print(f"  {name:<24} {results[name]:>10,.0f} frames/s")
    for kind in ("sector {}, out=", "records {}", "records {}, out="):
        rates = [results[kind.format(m)] for m in range(N_MODULES)]
        for m, rate in enumerate(rates):
            print(f"  {kind.format(m):<24} {rate:>10,.0f} sectors/s")
        together = N_MODULES / sum(1 / rate for rate in rates)
        print(f"  {kind.format('0-3'):<24} {together:>10,.0f} sectors/s (all modules, one core)")
        results[kind.format("all")] = together
    print(f"  ratio simulate / numpy copy                  {results['simulate'] / results['numpy copy']:.2f}")
    print(f"  ratio simulate out= / numpy copyto           {results['simulate, out='] / results['numpy copyto']:.2f}")
    whole = results["simulate, out="]
    print(f"  ratio sector out= (modules 0-3) / frame out= {results['sector all, out='] / whole:.2f}")
    print(f"  ratio records (modules 0-3) / frame out=     {results['records all'] / whole:.2f}")
    print(f"  ratio records out= (modules 0-3) / frame out= {results['records all, out='] / whole:.2f}")
    print("CPU per sector (process time, median of the runs):")
    for m in range(N_MODULES):
        print(f"  records {m}, out=           {cpu_median[f'records {m}'] * 1e6:8.2f} us")
    per_sector = statistics.mean(cpu_median[f"records {m}"] for m in range(N_MODULES))
    print(f"  records, mean of modules  {per_sector * 1e6:8.2f} us  ({1 / per_sector:,.0f} sectors/s of CPU)")
    print(f"  numpy normal + astype     {cpu_median['numpy'] * 1e6:8.2f} us  (one sector of Gaussian noise)")
    print(f"  ratio numpy sector / records sector          {cpu_median['numpy'] / per_sector:.1f}")


if __name__ == "__main__":
    main()
