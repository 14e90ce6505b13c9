"""Soak: many scans streamed one after another in one session; nothing lost, no role grows.

The local pipeline (4 producers simulating live, gateway, node groups, writer, control, every
role a process on this machine, Unix sockets) is started once; then ``--scans`` scans of
``--shape`` are streamed back to back. After each scan closes, the script waits for fresh
heartbeats and reads every role's resident memory (RSS) and peak RSS from control's status.

Printed per scan: frames/s (start request to file renamed into place), whether the ledger accounts
for every frame (complete == expected, none incomplete, none lost, none rejected), and RSS per
role, and peak RSS per role at the end (peaks are sampled at every heartbeat, 0.2 s here, for the
roles, and the kernel's VmHWM for control, which sends no heartbeats).

Verdict: a role's memory is *flat* when, after ``--warmup`` scans (first-use allocations: compiled
kernels, frame buffers, HDF5 caches), the upper envelope of its RSS at rest does not rise: the
highest RSS after any scan of the second half of the run is less than ``--bound-mib`` above the
highest of the first half. Not the last value against the first: a node group's RSS at rest swings
by up to ~60 MiB from one scan to the next, depending on whether the previous scan's buffers
(frame buffer, counting rows, analysis images) have been collected yet; a leak lifts the whole
envelope, a swing does not. Nor the peak: peaks step up when a role falls behind under load and its
bounded queues fill (``max_pending_blocks``, ``send_hwm``), which is flow control doing its job.
With the default bound (64 MiB) a 20-scan run catches leaks from ~7 MiB per scan (the halves'
envelopes are ~9 scans apart); the least-squares slope of RSS at rest is printed too.

    python benchmarks/bench_soak.py --scans 20 --shape 64x64
    python benchmarks/bench_soak.py --scans 5 --shape 16x16 --json soak.json   # brief, as in CI
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stemstream.core.config import PipelineConfig
from stemstream.deploy.local import LocalPipeline, ProducerSource
from common import parse_shape

MIB = 2**20




def complete(ledger: dict) -> bool:
    return (ledger.get("frames_complete") == ledger.get("frames_expected") and ledger.get("frames_incomplete") == 0
            and sum(ledger.get("sectors_lost", [1])) == 0 and sum(ledger.get("sectors_rejected", [1])) == 0
            and ledger.get("frames_missing") == 0)


def fresh_status(pipeline: LocalPipeline, after: float, heartbeat_s: float) -> dict:
    """Control's status once every role has checked in after ``after`` (wall clock)."""
    deadline = time.monotonic() + 20 * heartbeat_s + 5
    while True:
        status = pipeline.status()
        if all(r["seen"] > after for r in status["roles"].values()) or time.monotonic() > deadline:
            return status
        time.sleep(heartbeat_s / 2)


def control_memory(pipeline: LocalPipeline) -> tuple[int, int]:
    """RSS and peak RSS (VmHWM) of the control process, which sends no heartbeats of its own."""
    pid = pipeline.processes["control"].pid
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def soak(n_scans: int, shape: tuple[int, int], nodes: int, work: Path, seed: int = 0) -> dict:
    config = PipelineConfig()
    config.pipeline.nodes = nodes
    config.pipeline.output_dir = str(work / "out")
    config.pipeline.spill_dir = str(work / "spill")
    config.counting.background_threshold, config.counting.xray_threshold = 28.0, 1000.0
    config.network.transport = "ipc"  # no TCP ports to collide with anything else on the machine
    config.network.ipc_dir = str(work / "sockets")
    config.network.shared_memory = True  # as the embedded run (stemstream run) on one host
    config.flow.heartbeat_s = 0.2
    for d in (config.pipeline.output_dir, config.network.ipc_dir):
        Path(d).mkdir(parents=True, exist_ok=True)
    config.validate()
    scans = []
    with LocalPipeline(config, work / "roles", ProducerSource(seed=seed)) as pipeline:
        t0 = time.monotonic()
        pipeline.start()
        started_s = time.monotonic() - t0
        baseline = fresh_status(pipeline, time.time(), config.flow.heartbeat_s)
        base_control = control_memory(pipeline)[0]
        for k in range(1, n_scans + 1):
            summary = pipeline.run_scan(k, shape, timeout_s=600)
            status = fresh_status(pipeline, time.time(), config.flow.heartbeat_s)
            ledger = summary.get("ledger", {})
            rss, peak = control_memory(pipeline)
            scans.append({
                "scan": k,
                "state": summary.get("state"),
                "frames_per_second": summary.get("frames_per_second", 0.0),
                "seconds": summary.get("seconds", 0.0),
                "frames_expected": ledger.get("frames_expected"),
                "frames_complete": ledger.get("frames_complete"),
                "frames_lost": (ledger.get("frames_expected") or 0) - (ledger.get("frames_complete") or 0),
                "complete": summary.get("state") == "closed" and complete(ledger),
                "rss": {"control-0": rss, **{key: r["stats"]["rss"] for key, r in status["roles"].items()}},
                "peak_rss": {"control-0": peak, **{key: r["stats"]["peak_rss"] for key, r in status["roles"].items()}},
            })
            Path(summary["path"]).unlink(missing_ok=True)  # keep the disk use flat too
    return {"shape": list(shape), "nodes": nodes, "roles_started_s": started_s, "scans": scans,
            "baseline_rss": {key: r["stats"]["rss"] for key, r in baseline["roles"].items()} | {"control-0": base_control}}


def verdict(result: dict, warmup: int, bound_mib: float) -> dict:
    """Per role: highest RSS at rest in each half of the scans after the warm-up, the rise between
    them, the slope of RSS at rest, and the peaks after the warm-up and at the end."""
    scans = result["scans"]
    later = scans[warmup:] if len(scans) - warmup >= 2 else scans[-2:]
    half = len(later) // 2
    out = {}
    for role in sorted(scans[0]["rss"]):
        rss = np.array([s["rss"][role] for s in later], float) / MIB
        first, second = rss[:half].max(), rss[len(rss) - half:].max()
        slope = float(np.polyfit(np.arange(len(rss)), rss, 1)[0])
        out[role] = {"first_half_max_mib": float(first), "second_half_max_mib": float(second),
                     "rise_mib": float(second - first), "rss_slope_mib_per_scan": slope,
                     "peak_after_warmup_mib": scans[max(warmup, 1) - 1]["peak_rss"][role] / MIB,
                     "peak_at_end_mib": scans[-1]["peak_rss"][role] / MIB,
                     "flat": bool(second - first < bound_mib)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=20)
    parser.add_argument("--shape", default="64x64", help="scan positions ROWSxCOLS")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="scans before memory must be flat")
    parser.add_argument("--bound-mib", type=float, default=64.0, help="allowed rise of a role's RSS envelope")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    args = parser.parse_args()
    shape = parse_shape(args.shape)
    with tempfile.TemporaryDirectory(prefix="stemstream-soak-") as tmp:
        result = soak(args.scans, shape, args.nodes, Path(tmp))
    result["verdict"] = verdict(result, args.warmup, args.bound_mib)
    result["machine"] = f"{platform.node()} ({platform.machine()}), Python {platform.python_version()}"
    scans, roles = result["scans"], sorted(result["scans"][0]["rss"])
    print(f"{len(scans)} scans of {shape[0]}x{shape[1]} through {args.nodes} node groups, one session "
          f"(roles started in {result['roles_started_s']:.1f} s); RSS in MiB after each scan")
    short = {r: r.replace("producer-", "p").replace("gateway-0", "gw").replace("writer-0", "writer")
             .replace("control-0", "control") for r in roles}
    print(f"{'scan':>4} {'frames/s':>9} {'ledger':>9} " + " ".join(f"{short[r]:>7}" for r in roles))
    print(f"{'-':>4} {'':>9} {'(start)':>9} " + " ".join(f"{result['baseline_rss'].get(r, 0) / MIB:7.0f}" for r in roles))
    for s in scans:
        print(f"{s['scan']:>4} {s['frames_per_second']:9.0f} {'complete' if s['complete'] else 'LOST ' + str(s['frames_lost']):>9} "
              + " ".join(f"{s['rss'][r] / MIB:7.0f}" for r in roles))
    print("peak RSS (MiB) over the session: " + ", ".join(f"{short[r]} {scans[-1]['peak_rss'][r] / MIB:.0f}" for r in roles))
    lost = sum(s["frames_lost"] for s in scans)
    flat = all(v["flat"] for v in result["verdict"].values())
    worst = max(result["verdict"].items(), key=lambda kv: kv[1]["rise_mib"])
    print(f"frames lost: {lost} of {sum(s['frames_expected'] for s in scans)}; "
          f"{sum(s['complete'] for s in scans)}/{len(scans)} ledgers complete")
    print(f"memory after {args.warmup} warm-up scan(s): {'FLAT' if flat else 'GROWING'} (bound {args.bound_mib:g} MiB on the "
          f"rise of RSS at rest, highest of the second half minus highest of the first; largest {worst[0]} "
          f"{worst[1]['rise_mib']:+.1f} MiB)")
    print("  RSS slope at rest (MiB/scan): " + ", ".join(
        f"{short[r]} {v['rss_slope_mib_per_scan']:+.1f}" for r, v in result["verdict"].items()))
    print("  peak after warm-up -> at end (MiB): " + ", ".join(
        f"{short[r]} {v['peak_after_warmup_mib']:.0f}->{v['peak_at_end_mib']:.0f}" for r, v in result["verdict"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if lost == 0 and flat and all(s["complete"] for s in scans) else 1


if __name__ == "__main__":
    sys.exit(main())
