"""End-to-end streaming against the file-based workflow, on this machine, in one run.

Streaming: the local pipeline (4 producers simulating live, gateway, node groups, writer, control,
every role a process on this machine) is started once, as it is at a facility before a session;
each scan is timed from the start request to its counted file renamed into place. Also printed:
the time from the last record a producer sent to the file closed, and peak RSS per role.

File-based (the workflow the paper replaced, background.md): simulate the scan and write the four
receivers' raw files to disk, then count them with stempy 3.6.0 (multi-pass reader,
``electron_count`` with production settings) and save its file, each step timed as a subprocess.

    python benchmarks/bench_pipeline.py --sizes 64x64 128x128 256x256
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from stemstream.core.config import PipelineConfig
from stemstream.core.detector import N_MODULES, RECORD_BYTES
from stemstream.deploy.local import LocalPipeline, ProducerSource
from common import parse_shape

STEMPY_COUNT = textwrap.dedent("""
    import glob, sys, time
    import stempy.io as sio, stempy.image as sim
    files = sorted(glob.glob(sys.argv[1] + '/*.data'))
    reader = sio.reader(files, version=sio.FileVersion.VERSION5, backend='multi-pass')
    array = sim.electron_count(reader, number_of_samples=1200, background_threshold_n_sigma=4,
                               xray_threshold_n_sigma=175, threshold_num_blocks=20)
    sio.save_electron_counts(sys.argv[2], array)
""")




def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def file_based(shape: tuple[int, int], work: Path) -> dict:
    raw = work / "raw"
    out = work / "stempy.h5"
    t_sim = timed([sys.executable, "-m", "stemstream", "simulate", str(raw), "--scan-shape", f"{shape[0]}x{shape[1]}"])
    subprocess.run(["sync"], check=False)
    t_count = timed([sys.executable, "-c", STEMPY_COUNT, str(raw), str(out)])
    shutil.rmtree(raw)
    out.unlink(missing_ok=True)
    return {"simulate_write_s": t_sim, "stempy_count_s": t_count, "total_s": t_sim + t_count}


def _cpu(status: dict) -> dict[str, float]:
    return {k: r["stats"]["cpu_s"] for k, r in sorted(status["roles"].items())}


def streaming(pipeline: LocalPipeline, number: int, shape: tuple[int, int]) -> dict:
    """One scan; shape is (rows, cols)."""
    cpu_before = _cpu(pipeline.status())
    t0 = time.perf_counter()
    summary = pipeline.run_scan(number, shape, timeout_s=3600)
    seconds = time.perf_counter() - t0
    status = pipeline.status()
    last_sent = max(r["stats"].get("last_sent_wall", 0) for k, r in status["roles"].items() if k.startswith("producer"))
    ledger = summary["ledger"]
    ok = ledger["frames_complete"] == ledger["frames_expected"] and ledger["frames_incomplete"] == 0
    return {
        "seconds": seconds,
        "frames_per_s": ledger["frames_expected"] / seconds,
        "last_sent_to_closed_s": summary["closed_wall"] - last_sent,
        "complete": ok,
        "peak_rss_mib": {k: r["stats"]["peak_rss"] / 2**20 for k, r in sorted(status["roles"].items())},
        # RSS less the shared-memory pages of the producers' blocks that the role touched
        "peak_private_mib": {k: r["stats"].get("peak_private", 0) / 2**20 for k, r in sorted(status["roles"].items())},
        "cpu_s": _cpu(status),
        # CPU each role spent on this scan per frame (ms), from the heartbeats just before and
        # after (a heartbeat is at most heartbeat_s old: a few % on a scan of seconds)
        "cpu_ms_per_frame": {k: 1e3 * (v - cpu_before.get(k, 0.0)) / ledger["frames_expected"]
                             for k, v in _cpu(status).items()},
        "path": summary["path"],
    }


def raw_bytes(shape: tuple[int, int]) -> int:
    """What the four receivers' raw files of a scan of ``shape`` (rows, cols) take on disk."""
    return shape[0] * shape[1] * (RECORD_BYTES * N_MODULES)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["64x64", "128x128", "256x256"], help="scan shapes ROWSxCOLS")
    parser.add_argument("--repeats", type=int, default=2, help="streaming runs per size (median reported)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--no-gateway", action="store_true")
    parser.add_argument("--no-shared-memory", action="store_true",
                        help="blocks through the sockets, not shared memory (as between hosts)")
    parser.add_argument("--skip-file-based", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def bench_config(args: argparse.Namespace, work: Path) -> PipelineConfig:
    config = PipelineConfig()
    config.pipeline.nodes = args.nodes
    config.pipeline.gateway = not args.no_gateway
    config.pipeline.output_dir = str(work / "out")
    config.pipeline.spill_dir = str(work / "spill")
    config.network.transport, config.network.ipc_dir = "ipc", str(work / "sockets")
    config.network.shared_memory = not args.no_shared_memory
    (work / "sockets").mkdir()
    # fixed thresholds as in the paper's comparisons of counting speed; calibration is timed in
    # bench_count_vs_stempy.py
    config.counting.background_threshold, config.counting.xray_threshold = 28.0, 1000.0
    return config.validate()


def run_streaming(args: argparse.Namespace, work: Path, results: dict) -> None:
    """Every size's streaming runs through one pipeline, smallest first; after each size, the
    peak private RSS of every role so far (peaks only grow: a flat row means the bigger scans
    needed no more memory)."""
    number = 0
    with LocalPipeline(bench_config(args, work), work / "pipeline", ProducerSource(seed=1)) as pipeline:
        pipeline.start()
        for text in args.sizes:
            shape = parse_shape(text)
            runs = []
            for _ in range(args.repeats):
                number += 1
                runs.append(streaming(pipeline, number, shape))
                Path(runs[-1]["path"]).unlink()
            results["sizes"][text] = {"streaming": runs, "peak_private_mib": runs[-1]["peak_private_mib"]}


def run_file_based(args: argparse.Namespace, work: Path, results: dict) -> None:
    """The file-based side where this machine's disk holds the raw files (with 10 % to spare)."""
    for text in args.sizes:
        entry = results["sizes"][text]
        shape = parse_shape(text)
        free = shutil.disk_usage(work).free
        if args.skip_file_based:
            continue
        if raw_bytes(shape) > 0.9 * free:
            entry["file_based_skipped"] = f"raw files {raw_bytes(shape) / 1e9:.0f} GB, disk free {free / 1e9:.0f} GB"
            continue
        entry["file_based"] = file_based(shape, work)
        entry["speedup"] = entry["file_based"]["total_s"] / entry["streaming_median_s"]


def print_tables(args: argparse.Namespace, results: dict) -> None:
    print(f"\n{'scan':>9} {'file-based (s)':>15} {'streaming (s)':>14} {'speed-up':>9} {'frames/s':>9} "
          f"{'last sent -> closed (s)':>24} {'complete':>9}")
    for text in args.sizes:
        e = results["sizes"][text]
        fb = e.get("file_based", {}).get("total_s", float("nan"))
        print(f"{text:>9} {fb:>15.1f} {e['streaming_median_s']:>14.2f} {e.get('speedup', float('nan')):>8.1f}x "
              f"{e['frames_per_s']:>9,.0f} {e['last_sent_to_closed_s']:>24.2f} "
              f"{all(r['complete'] for r in e['streaming'])!s:>9}")
        if "file_based_skipped" in e:
            print(f"{'':>9} file-based skipped: {e['file_based_skipped']}")
    base = results["sizes"][args.sizes[0]]["frames_per_s"]
    print("\nframes/s against the first size: " + ", ".join(
        f"{t} {results['sizes'][t]['frames_per_s'] / base:.2f}" for t in args.sizes))
    roles = sorted(results["sizes"][args.sizes[0]]["streaming"][0]["cpu_ms_per_frame"])
    print("\nCPU per frame by role (ms, median of the runs), and all roles together:")
    print(f"{'scan':>9} " + " ".join(f"{r:>11}" for r in roles) + f" {'total':>7}")
    for text in args.sizes:
        runs = results["sizes"][text]["streaming"]
        per_role = {r: statistics.median(run["cpu_ms_per_frame"].get(r, 0.0) for run in runs) for r in roles}
        results["sizes"][text]["cpu_ms_per_frame"] = per_role
        print(f"{text:>9} " + " ".join(f"{per_role[r]:>11.3f}" for r in roles) + f" {sum(per_role.values()):>7.3f}")
    print("\npeak private RSS per role after each size's runs (MiB; RSS less the shared-memory blocks):")
    print(f"{'scan':>9} " + " ".join(f"{r:>11}" for r in roles))
    for text in args.sizes:
        peaks = results["sizes"][text]["peak_private_mib"]
        print(f"{text:>9} " + " ".join(f"{peaks.get(r, 0.0):>11.0f}" for r in roles))


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    results = {"machine": f"{platform.processor() or platform.machine()}, {shutil.os.cpu_count()} cores", "sizes": {}}
    print(f"machine: {results['machine']}; node groups: {args.nodes}; gateway: {not args.no_gateway}; "
          f"shared memory: {not args.no_shared_memory}")
    run_streaming(args, work, results)
    for entry in results["sizes"].values():
        runs = entry["streaming"]
        entry["streaming_median_s"] = statistics.median(r["seconds"] for r in runs)
        entry["frames_per_s"] = statistics.median(r["frames_per_s"] for r in runs)
        entry["last_sent_to_closed_s"] = statistics.median(r["last_sent_to_closed_s"] for r in runs)
    run_file_based(args, work, results)
    print_tables(args, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
