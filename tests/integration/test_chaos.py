"""Chaos, briefly: a session of scans through every role as its own process while a seeded schedule
kills, stops and restarts roles and throws forged and garbage messages at their ports; every scan's
file is the clean run's (or its ledger names what differs and ``stemstream replay`` makes it the
clean run's), no frame is lost silently and no file is destroyed (tests/chaos_support.py).

The long run is ``benchmarks/bench_chaos.py --chaos-runs 200``; docs/reliability.md says which fault
classes it covers and why this short one leaves some out. ``CHAOS_SEED=S`` runs other schedules.
"""

from __future__ import annotations

import os

import pytest

from chaos_support import ChaosSession, summarize

pytestmark = pytest.mark.slow

# The fault classes the benchmark showed to keep every scan exact; the others still break
# (docs/reliability.md, "Chaos", says how) and stay in benchmarks/bench_chaos.py only.
CI_CLASSES = ("kill:node", "stop:node", "kill:writer", "stop:writer", "kill:control", "stop:control",
              "forge:node", "garbage:node", "garbage:gateway", "garbage:writer")
# Seed 361's three schedules hold 8 faults of 7 classes (roles killed and stopped mid-scan, garbage
# at the gateway and the writer); CHAOS_SEED=S draws others.
SEED = int(os.environ.get("CHAOS_SEED", "361"))
TRIALS = 3


def test_a_short_chaos_session_loses_nothing_silently_and_destroys_no_file(tmp_path):
    print(f"chaos seed {SEED}")
    with ChaosSession(tmp_path, (16, 16), rate=128.0, classes=CI_CLASSES, most_faults=3) as session:
        session.clean_runs(range(1, 3))
        results = [session.trial(t, SEED + t - 1, 1 + (t - 1) % 2) for t in range(1, TRIALS + 1)]
        after = session.trial(TRIALS + 1, SEED, 1, faults=False)
    report = "\n".join(r.line() for r in [*results, after])
    print(report)
    totals = summarize(results)
    assert totals["frames_silently_lost"] == 0, report
    assert totals["analyses_silently_wrong"] == 0, report
    assert totals["files_destroyed"] == 0, report
    assert totals["faults_injected"] >= TRIALS, report
    assert all(r.ok for r in results), f"seed {SEED}:\n{report}"
    assert after.outcome == "exact" and after.ok, report
