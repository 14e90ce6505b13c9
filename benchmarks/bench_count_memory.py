"""Peak memory of ``stemstream count`` against the size of what it produces, for growing scans.

For each --scan-shapes entry, simulate the scan's raw files, run ``stemstream count`` on them as a
child process and take its peak resident memory (GNU time's %M, the kernel's ru_maxrss). Printed next to
the output's events (4 bytes each): counting holds one scratch frame per thread, the event rows of
one batch and the writer's buffer (up to 4096 frames of events), so from one scan size to the next
the peak should grow by no more than the events (and the ~60 bytes per frame of the frame index),
while the raw data grows by 663 kB per frame.

    PYTHONPATH=src python benchmarks/bench_count_memory.py [--scan-shapes 32x32 64x64 96x96] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from common import parse_shape, stemstream_command






def peak_rss_bytes(cmd: list[str], env: dict) -> int:
    """Run cmd under GNU time; its peak resident set size. Not ``wait4`` on our own child: Linux
    keeps the largest resident size of the memory a process had before ``exec``, and a child
    spawned from this process (vfork) borrowed ours, simulator and all; GNU time forks a fresh one."""
    if not Path("/usr/bin/time").exists():
        sys.exit("needs GNU time (/usr/bin/time): apt-get install time")
    result = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M"] + cmd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} ... failed ({result.returncode}):\n{result.stderr[-2000:]}")
    line = [x for x in result.stderr.splitlines() if x.startswith("maxrss_kb=")][-1]
    return int(line.split("=")[1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scan-shapes", type=parse_shape, nargs="+", default=[(32, 32), (64, 64), (96, 96)],
                        help="scans to count, ROWSxCOLS each")
    parser.add_argument("--dose", type=float, default=0.002, help="electrons/pixel/frame")
    parser.add_argument("--dir", type=Path, default=None, help="where to simulate the files (default: the temp dir)")
    args = parser.parse_args()

    from stemstream.formats.sparse_h5 import read_counted
    from stemstream.sources.simulator import SimulationConfig, simulate_to_directory

    env = dict(os.environ)
    src = Path(__file__).resolve().parents[1] / "src"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH")) if p)
    rows = []
    for shape in args.scan_shapes:
        work = Path(tempfile.mkdtemp(prefix="bench_mem_", dir=args.dir))
        try:
            config = SimulationConfig(scan_shape=shape, dose=args.dose)
            summary = simulate_to_directory(work / "raw", config)
            raw_bytes = sum(p.stat().st_size for p in summary.paths)
            out = work / "out.h5"
            rss = peak_rss_bytes(stemstream_command() + ["count", str(work / "raw"), "-o", str(out)], env)
            events = read_counted(out).total_events()
            rows.append((shape, config.n_frames, raw_bytes, events, rss))
            print(f"  {shape[0]}x{shape[1]}: peak {rss / 1e6:.0f} MB", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"peak resident memory of `stemstream count` (/usr/bin/time %M), dose {args.dose}")
    print(f"{'scan':>8} {'frames':>7} {'raw GB':>7} {'events':>11} {'events MB':>9} {'peak MB':>8} "
          f"{'+peak MB':>8} {'+events MB':>10} {'+raw GB':>8}")
    previous = None
    for shape, frames, raw_bytes, events, rss in rows:
        grow = ""
        if previous is not None:
            grow = (f"{(rss - previous[4]) / 1e6:8.1f} {(events - previous[3]) * 4 / 1e6:10.1f} "
                    f"{(raw_bytes - previous[2]) / 1e9:8.2f}")
        print(f"{shape[0]:>3}x{shape[1]:<4} {frames:7} {raw_bytes / 1e9:7.2f} {events:11,} {events * 4 / 1e6:9.1f} "
              f"{rss / 1e6:8.0f} {grow}")
        previous = (shape, frames, raw_bytes, events, rss)
    first, last = rows[0], rows[-1]
    if len(rows) > 1:
        d_rss = last[4] - first[4]
        d_events = (last[3] - first[3]) * 4
        print(f"from {first[1]} to {last[1]} frames: peak +{d_rss / 1e6:.1f} MB, events +{d_events / 1e6:.1f} MB, "
              f"raw data +{(last[2] - first[2]) / 1e9:.1f} GB -> peak growth / events growth = "
              f"{d_rss / max(d_events, 1):.2f} (<= 1: the peak grows no more than the events)")


if __name__ == "__main__":
    main()
