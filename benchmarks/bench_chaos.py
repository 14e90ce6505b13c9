"""Chaos: many scans in one session while a seeded random schedule kills, stops and restarts roles
and throws forged and garbage messages at their ports (tests/chaos_support.py); after each scan its
file must be the clean run's, or its ledger must account for what differs and ``stemstream
replay`` of the spill must make it the clean run's.

Every role is its own process, started from one config file (4 simulating producers with a fixed
seed, a gateway, node groups, the writer, control; TCP on loopback). First a clean run of each of
``--scan-numbers`` scan numbers, then ``--chaos-runs`` trials: trial t streams scan number
1 + (t-1) % scan-numbers again under the schedule seed + t - 1 draws (1 to ``--most-faults``
faults at random moments of the scan). Last, one scan without faults, which must be exact (the
pipeline is still whole after the chaos).

Printed: the seed, one line per trial (a failing one with its schedule), and the totals: trials,
faults injected, scans exact, scans recovered by replay, frames silently lost (must be 0), scans
whose /analysis is silently wrong (must be 0), files destroyed (must be 0), and per fault class
the trials it was in and their outcomes. ``--seed S --chaos-runs 1`` with the same ``--faults`` and
``--exclude`` reruns the schedule of the trial whose seed is S. Exit code 0 only if every trial
passed. Figures: docs/reliability.md, "Chaos".

    python benchmarks/bench_chaos.py --chaos-runs 200 --seed 1
    python benchmarks/bench_chaos.py --chaos-runs 20 --seed 1 --exclude kill:producer --json chaos.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the chaos harness

from chaos_faults import FAULT_CLASSES  # noqa: E402
from chaos_support import ChaosSession, summarize  # noqa: E402
from common import parse_shape  # noqa: E402


def fault_classes(text: str) -> tuple[str, ...]:
    classes = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = set(classes) - set(FAULT_CLASSES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown fault class(es) {sorted(unknown)}; known: {', '.join(FAULT_CLASSES)}")
    return classes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chaos-runs", type=int, default=20, help="trials (scans under faults)")
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100_000, help="trial t draws schedule seed + t - 1")
    ap.add_argument("--shape", type=parse_shape, default=(16, 16), help="scan shape ROWSxCOLS")
    ap.add_argument("--rate", type=float, default=128.0, help="simulated frames/s per producer")
    ap.add_argument("--scan-numbers", type=int, default=8, help="distinct scan numbers (each has a clean run)")
    ap.add_argument("--most-faults", type=int, default=3, help="faults per trial, at most")
    ap.add_argument("--faults", type=fault_classes, default=FAULT_CLASSES, help="fault classes, comma-separated")
    ap.add_argument("--exclude", type=fault_classes, default=(), help="fault classes left out")
    ap.add_argument("--shared-memory", action="store_true", help="blocks through shared memory")
    ap.add_argument("--replay-command", help="run instead of `python -m stemstream replay` (to try a fix)")
    ap.add_argument("--work", type=Path, help="keep the session here (roles' logs, files, spill); default a temporary one")
    ap.add_argument("--json", type=Path, help="write the trials and totals here")
    args = ap.parse_args()
    classes = tuple(c for c in args.faults if c not in args.exclude)
    print(f"chaos: seed {args.seed}, {args.chaos_runs} trial(s) of {args.shape[0]}x{args.shape[1]} at "
          f"{args.rate:g} frames/s, up to {args.most_faults} fault(s) each from: {', '.join(classes)}", flush=True)
    numbers = min(args.scan_numbers, args.chaos_runs)
    results, after = [], None
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        work = args.work or Path(tmp)
        with ChaosSession(work, args.shape, args.rate, classes, args.most_faults,
                          shared_memory=args.shared_memory) as session:
            if args.replay_command:
                session.replay_command = args.replay_command.split()
            session.clean_runs(range(1, numbers + 1))
            print(f"clean runs of scans 1-{numbers} done in {time.monotonic() - t0:.0f} s", flush=True)
            try:
                for t in range(1, args.chaos_runs + 1):
                    results.append(session.trial(t, args.seed + t - 1, 1 + (t - 1) % numbers))
                    print(results[-1].line(), flush=True)
                after = session.trial(args.chaos_runs + 1, args.seed, 1, faults=False)
                print("after the chaos, without faults:", after.line(), flush=True)
            except RuntimeError as exc:  # the session cannot go on: what was found so far
                print(f"session stopped after trial {len(results) + 1} (seed {args.seed + len(results)}): {exc}", flush=True)
    totals = summarize(results)
    report(totals, results, after, time.monotonic() - t0)
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "classes": classes, "totals": totals,
                                         "trials": [vars(r) | {"faults": [str(f) for f in r.faults]} for r in results],
                                         "after": vars(after) | {"faults": []} if after else None},
                                        indent=1, default=str))
    return 0 if totals["failed_trials"] == 0 and after is not None and after.ok else 1


def report(totals: dict, results: list, after, seconds: float) -> None:
    print(f"\n{totals['trials']} trials in {seconds:.0f} s: faults injected {totals['faults_injected']}, "
          f"scans exact {totals['exact']}, recovered by replay {totals['recovered_by_replay']}, "
          f"frames silently lost {totals['frames_silently_lost']}, scans with /analysis silently wrong "
          f"{totals['analyses_silently_wrong']}, files destroyed {totals['files_destroyed']}, "
          f"trials failed {totals['failed_trials']}; outcomes {totals['outcomes']}; "
          f"clean scan after the chaos: {after.outcome if after else 'not run'}")
    tally: dict[str, Counter] = {}
    for r in results:
        for kind in {f.kind for f in r.faults}:
            tally.setdefault(kind, Counter()).update(trials=1, exact=r.outcome == "exact",
                                                     recovered=r.outcome == "recovered", failed=not r.ok)
    print("fault class            trials   exact  recovered  failed   (a trial counts for every class in it)")
    for kind, c in sorted(tally.items()):
        print(f"{kind:<22} {c['trials']:>6} {c['exact']:>7} {c['recovered']:>10} {c['failed']:>7}")

if __name__ == "__main__":
    sys.exit(main())
