"""Cost of the live analyses next to counting, on one core, measured in the same run.

A node group counts each batch of frames (the compiled counting kernel) and then adds the batch's
electrons to its analyses' partials (virtual detectors, summed pattern, centre of mass by default),
sending the partials to the writer every few batches. This script times, on the same simulated
frames, interleaved so that all sides see the same machine load:

- ``count``:              ElectronCounter.count per batch (what a node group does without analyses);
- ``count + analyses``:   the same, then ScanAnalyses.accumulate on the batch's events, and
                          take_partials (encode + reset) every --send-every batches;
- ``analyses alone``:     accumulate + take_partials on the already counted events.

The first two run back to back on every batch (alternating which goes first), so that a shared
machine's changing load hits both alike. Times are the CPU time of the calling thread (which runs
numba's single counting thread), so other processes on a shared machine do not count; --wall
times wall-clock instead. --none runs no analyses: the slowdown it prints is the measurement's
own bias.

and prints the analyses' cost as a fraction of counting time, both as the measured slowdown
(count + analyses vs count) and as analyses alone / count (less noisy). Target: <= 0.15.

Frames: the detector simulator (576 x 576 uint16) at --dose electrons/pixel/frame, thresholds
fixed at stempy-like production values (background 28 ADU, X-ray 2000 ADU); numba on one thread;
medians of --repeats runs.

    PYTHONPATH=src python benchmarks/bench_analysis.py [--frames 512] [--dose 0.002] [--all]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np

from stemstream.analysis import ScanAnalyses, default_analyses
from stemstream.counting.kernel import ElectronCounter
from stemstream.sources.simulator import SimulationConfig
from common import simulated_frames




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=512, help="simulated frames per run")
    parser.add_argument("--dose", type=float, default=0.002, help="electrons/pixel/frame")
    parser.add_argument("--batch", type=int, default=32, help="frames per counted batch")
    parser.add_argument("--send-every", type=int, default=8, help="batches between sends of the partials")
    parser.add_argument("--repeats", type=int, default=7, help="runs of each side; medians are reported")
    parser.add_argument("--all", action="store_true", help="also run the example radial_profile analysis")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wall", action="store_true", help="time wall-clock instead of this thread's CPU time")
    parser.add_argument("--none", action="store_true", help="no analyses: shows the measurement's own bias")
    args = parser.parse_args()
    if min(args.frames, args.batch, args.send_every, args.repeats) < 1:
        parser.error("--frames, --batch, --send-every and --repeats must be at least 1")

    numba.set_num_threads(1)
    cols = 64
    scan_shape = (max(1, -(-args.frames // cols)), cols)
    frames = simulated_frames(SimulationConfig(scan_shape=scan_shape, dose=args.dose, seed=args.seed), args.frames)
    positions = np.arange(args.frames, dtype=np.int64)
    starts = range(0, args.frames, args.batch)
    counter = ElectronCounter(28.0, 2000.0)
    config = {"enabled": ["virtual_detectors", "summed_pattern", "center_of_mass", "radial_profile"]} if args.all else None
    analyses = default_analyses((576, 576), config)
    if args.none:
        analyses = []

    counted = [counter.count(frames[s : s + args.batch]) for s in starts]
    counted = [(c.events.copy(), c.offsets.copy()) for c in counted]

    # CPU time of this thread (numba's one counting thread is this one, with the default OpenMP
    # layer): other processes on a shared machine do not inflate it; --wall for wall-clock time.
    clock = time.perf_counter if args.wall else time.thread_time

    def run() -> tuple[float, float, float]:
        """One pass over all batches; per batch, count alone and count + analyses back to back
        (alternating which goes first, so neither always finds the frames in cache), then the
        analyses alone on the batch's already counted events. Returns the three totals."""
        live = ScanAnalyses(analyses, scan_shape)  # count + analyses
        alone = ScanAnalyses(analyses, scan_shape)  # analyses alone
        t_count = t_both = t_ana = 0.0
        for k, s in enumerate(starts):
            batch = frames[s : s + args.batch]
            send = (k + 1) % args.send_every == 0 or k == len(starts) - 1
            for side in ((0, 1) if k % 2 == 0 else (1, 0)):
                t0 = clock()
                c = counter.count(batch)
                if side == 1:
                    live.accumulate(positions[s : s + args.batch], c.events, c.offsets)
                    if send:
                        live.take_partials()
                    t_both += clock() - t0
                else:
                    t_count += clock() - t0
            events, offsets = counted[k]
            t0 = clock()
            alone.accumulate(positions[s : s + args.batch], events, offsets)
            if send:
                alone.take_partials()
            t_ana += clock() - t0
        return t_count, t_both, t_ana

    run()  # compile / load caches, warm buffers
    t_count, t_both, t_ana = [], [], []
    for _ in range(args.repeats):
        tc, tb, ta = run()
        t_count.append(tc)
        t_both.append(tb)
        t_ana.append(ta)

    n = args.frames
    events = sum(len(e) for e, _ in counted)
    # Ratios per run (both sides of a ratio measured in the same run), then their median; the
    # frames/s lines are each side's best run.
    slowdown = statistics.median(b / c - 1 for b, c in zip(t_both, t_count))
    share = statistics.median(a / c for a, c in zip(t_ana, t_count))
    print(
        f"live analyses vs counting, 1 thread: {n} simulated 576x576 frames, dose {args.dose} e/px/frame, "
        f"{events / n:.0f} events/frame, batches of {args.batch}, partials sent every {args.send_every} batches, "
        f"{args.repeats} runs, {'wall-clock' if args.wall else 'thread CPU'} time"
    )
    print(f"analyses: {', '.join(a.name for a in analyses) or 'none'}; scan {scan_shape[0]} x {scan_shape[1]}")
    print(f"{'best run':24} {'frames/s':>10} {'us/frame':>9}")
    for label, t in (("count", min(t_count)), ("count + analyses", min(t_both)), ("analyses alone", min(t_ana))):
        print(f"{label:24} {n / t:10.0f} {1e6 * t / n:9.1f}")
    print(f"slowdown (count + analyses) / count - 1, median per run: {slowdown:+.3f} (target <= 0.15)")
    print(f"analyses alone / count, median per run:                  {share:.3f} (target <= 0.15)")


if __name__ == "__main__":
    main()
