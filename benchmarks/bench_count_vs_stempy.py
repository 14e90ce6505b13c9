"""``stemstream count`` against stempy 3.6.0 on the same raw files, wall-clock, same machine, one run.

Simulates a scan (4 module files per the receivers' layout, --dose electrons/pixel/frame), then
times them in --repeats rounds of one stempy run and --ours-per-round runs of ours (reading the
files right before each run, so that both sides find them in the page cache):

- ours:   ``stemstream count DIR -o OUT.h5`` (calibrated thresholds, production defaults);
- stempy: ``stempy.io.reader(files, version=FileVersion.VERSION5, backend='multi-pass')``,
  ``stempy.image.electron_count(reader, number_of_samples=1200, background_threshold_n_sigma=4,
  xray_threshold_n_sigma=175, threshold_num_blocks=20)`` and ``stempy.io.save_electron_counts``,

each as a fresh Python process, so both pay their start-up and imports. Prints the median wall
time of each, the ratio (stempy / ours), and checks that both files hold about the same number of
events (stempy draws its calibration sample at random, so thresholds, and events, differ a little).

The simulated files are deleted at the end (--keep keeps them). --raw DIR times existing files
instead of simulating (never deleted).

    PYTHONPATH=src python benchmarks/bench_count_vs_stempy.py [--scan-shape 128x128] [--repeats 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import parse_shape, stemstream_command

STEMPY_SCRIPT = r"""
import glob, sys
import stempy.io, stempy.image
files = sorted(glob.glob(sys.argv[1] + "/*.data"))
reader = stempy.io.reader(files, version=stempy.io.FileVersion.VERSION5, backend="multi-pass")
array = stempy.image.electron_count(reader, number_of_samples=1200, background_threshold_n_sigma=4,
                                    xray_threshold_n_sigma=175, threshold_num_blocks=20)
stempy.io.save_electron_counts(sys.argv[2], array)
"""






def available_memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def warm_page_cache(files: list[Path]) -> float:
    buffer = bytearray(16 << 20)
    t0 = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - t0


def resident_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (util-linux ``fincore``), None without it."""
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", *map(str, files)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return None
    res = size = 0
    for line in out.stdout.split("\n"):
        if line.strip():
            r, s = line.split()
            res, size = res + int(r), size + int(s)
    return res / size if size else None


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], env: dict, output: Path) -> tuple[float, float]:
    """Wall-clock and CPU (user + sys, all threads) seconds of one run of cmd."""
    output.unlink(missing_ok=True)  # stempy's save_electron_counts fails on an existing file
    cpu0 = children_cpu()
    t0 = time.perf_counter()
    result = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} ... failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return seconds, children_cpu() - cpu0


def summary(path: Path) -> tuple[int, float, float]:
    from stemstream.formats.sparse_h5 import read_counted

    counted = read_counted(path)
    meta = counted.metadata.get("electron_counting", {})
    return counted.total_events(), float(meta.get("background_threshold", float("nan"))), float(meta.get("x_ray_threshold", float("nan")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scan-shape", type=parse_shape, default=(128, 128), help="ROWSxCOLS (default 128x128: 16,384 frames, 10.9 GB)")
    parser.add_argument("--dose", type=float, default=0.002, help="electrons/pixel/frame")
    parser.add_argument("--repeats", type=int, default=3, help="rounds: one stempy run and --ours-per-round of ours each; medians are reported")
    parser.add_argument("--ours-per-round", type=int, default=2, help="runs of stemstream count per round")
    parser.add_argument("--dir", type=Path, default=None, help="where to simulate the files (default: a new folder in the temp dir)")
    parser.add_argument("--raw", type=Path, default=None, help="time these existing raw files instead of simulating")
    parser.add_argument("--keep", action="store_true", help="keep the simulated files")
    args = parser.parse_args()
    if args.repeats < 1 or args.ours_per_round < 1:
        parser.error("--repeats and --ours-per-round must be at least 1")
    try:
        import stempy  # noqa: F401
    except ImportError:
        sys.exit("stempy is not installed: pip install stempy==3.6.0")

    from stemstream.sources.simulator import SimulationConfig, simulate_to_directory

    work = Path(tempfile.mkdtemp(prefix="bench_count_", dir=args.dir))
    try:
        if args.raw is not None:
            raw = args.raw
        else:
            raw = work / "raw"
            n_frames = args.scan_shape[0] * args.scan_shape[1]
            need = n_frames * 4 * 165904
            free = shutil.disk_usage(work).free
            if need > 0.9 * free:
                sys.exit(f"{need / 1e9:.1f} GB of raw files do not fit in {work} ({free / 1e9:.1f} GB free): use --dir")
            print(f"simulating {args.scan_shape[0]}x{args.scan_shape[1]} = {n_frames:,} frames "
                  f"({need / 1e9:.1f} GB) into {raw} ...", flush=True)
            config = SimulationConfig(scan_shape=args.scan_shape, dose=args.dose)
            done = simulate_to_directory(raw, config)
            print(f"  {done.seconds:.0f} s", flush=True)
        files = sorted(raw.glob("*.data"))
        size = sum(f.stat().st_size for f in files)
        if size > available_memory_bytes():
            print(f"warning: {size / 1e9:.1f} GB of raw files may not all stay in the page cache "
                  f"({available_memory_bytes() / 1e9:.1f} GB available)")
        print(f"reading {size / 1e9:.1f} GB once into the page cache: {warm_page_cache(files):.1f} s", flush=True)

        env = dict(os.environ)
        src = Path(__file__).resolve().parents[1] / "src"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH")) if p)
        ours_out, stempy_out = work / "ours.h5", work / "stempy.h5"
        commands = {
            "stemstream count": stemstream_command() + ["count", str(raw), "-o", str(ours_out), "--force"],
            "stempy 3.6.0": [sys.executable, "-c", STEMPY_SCRIPT, str(raw), str(stempy_out)],
        }
        outputs = {"stemstream count": ours_out, "stempy 3.6.0": stempy_out}
        times: dict[str, list[float]] = {name: [] for name in commands}
        cpu: dict[str, list[float]] = {name: [] for name in commands}
        # Rounds of one stempy run and --ours-per-round runs of ours (ours is ~30x shorter, so
        # more of its runs cost little and steady its median on a shared machine).
        for r in range(args.repeats):
            for name, cmd in commands.items():
                for _ in range(args.ours_per_round if name == "stemstream count" else 1):
                    # This VM drops cached pages now and then even with memory free: read the
                    # files again before every run so that each side starts from the page cache.
                    warm_page_cache(files)
                    cached = resident_fraction(files)
                    wall, cpu_seconds = timed(cmd, env, outputs[name])
                    times[name].append(wall)
                    cpu[name].append(cpu_seconds)
                    note = f", {cached:.0%} of the raw data cached at the start" if cached is not None else ""
                    print(f"  round {r + 1}/{args.repeats} {name}: {wall:.2f} s (CPU {cpu_seconds:.2f} s{note}); "
                          f"load average {os.getloadavg()[0]:.1f}", flush=True)

        ours_events, ours_bg, ours_xray = summary(ours_out)
        stempy_events, stempy_bg, stempy_xray = summary(stempy_out)
        from stemstream.formats.sparse_h5 import read_counted

        n_frames = read_counted(ours_out).frames.size
        med = {name: statistics.median(t) for name, t in times.items()}
        print()
        print(f"stemstream count vs stempy 3.6.0: {n_frames:,} frames ({size / 1e9:.1f} GB raw, page cache), "
              f"wall clock incl. start-up; medians of {len(times['stemstream count'])} runs (ours) and "
              f"{len(times['stempy 3.6.0'])} (stempy)")
        med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
        print(f"{'':18} {'median s':>9} {'min s':>7} {'max s':>7} {'frames/s':>9} {'CPU s':>7} {'events':>12} "
              f"{'background':>10} {'x-ray':>8}")
        for name, events, bg, xray in (("stemstream count", ours_events, ours_bg, ours_xray),
                                       ("stempy 3.6.0", stempy_events, stempy_bg, stempy_xray)):
            print(f"{name:18} {med[name]:9.2f} {min(times[name]):7.2f} {max(times[name]):7.2f} "
                  f"{n_frames / med[name]:9.0f} {med_cpu[name]:7.2f} {events:12,} {bg:10.2f} {xray:8.1f}")
        print(f"ratio stempy / stemstream, median wall clock: {med['stempy 3.6.0'] / med['stemstream count']:.1f}x "
              f"(target >= 20x); CPU time (user + sys): {med_cpu['stempy 3.6.0'] / med_cpu['stemstream count']:.1f}x")
        diff = (ours_events - stempy_events) / max(stempy_events, 1)
        print(f"events: ours {diff:+.2%} vs stempy ({'agree' if abs(diff) < 0.03 else 'DIFFER'} within 3 %)")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
