"""``stemstream export`` against its peers, measured in the same run (issue 14).

1. LiberTEM ``raw_csr`` export of a counted scan against copying its events once (an ``h5py``
   read of ``/electron_events/frames``, the least any export must do): the ratio of the copy's
   time to the export's (the target is at least 0.5), and the export's peak RSS for two scan sizes
   (it should grow by the events alone).
2. Dense py4DSTEM export at ``--bin 4`` against the hand-written bridge (stempy's
   ``load_electron_counts(...).bin_frames(4).to_dense()``, then ``emdfile.save``): time and peak
   RSS for two scan sizes (ours should not grow with the scan; the bridge's does).

Each job runs in a fresh process under GNU time (peak RSS = its ru_maxrss); its time is the
second call of its work in that process (imports and numba's cache loading left out).

    PYTHONPATH=src python benchmarks/bench_export.py [--scan-shapes 64x64 128x128] [--dose 0.002] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import parse_shape

from stemstream.core.detector import FRAME_PIXELS, FRAME_SHAPE
from stemstream.formats.sparse_h5 import SparseCountsWriter

# Each job defines work(); the harness times its second call (imports, numba's cache loading
# and a cold page cache are one-off costs the first call pays for every job alike) and takes
# GNU time's peak RSS of the whole process.
JOBS = {
    "h5py copy of the events": """
import h5py
def work():
    with h5py.File(PATH) as f: frames = f["electron_events/frames"][()]""",
    "export --to libertem": """
import stemstream; from pathlib import Path; from stemstream.formats.exports import export
def work(): export(stemstream.open(PATH), "libertem", Path(OUT) / "scan.toml", force=True)""",
    "export --to py4dstem --bin 4": """
import stemstream; from pathlib import Path; from stemstream.formats.exports import export
def work(): export(stemstream.open(PATH, 4), "py4dstem", Path(OUT) / "cube.h5", force=True)""",
    "bridge: stempy dense bin 4 + emdfile": """
import emdfile, stempy.io
def work():
    dense = stempy.io.load_electron_counts(PATH).bin_frames(4).to_dense()
    emdfile.save(OUT + "/bridge.h5", emdfile.Array(dense, name="datacube"), mode="o")""",
}
TIMED = """
import time
work()
t = time.perf_counter(); work(); print(f"seconds={time.perf_counter() - t}")"""


def write_scan(path: Path, scan_shape: tuple[int, int], dose: float, seed: int = 0) -> int:
    """A counted file of random events (``dose`` electrons per pixel per frame); returns the
    number of events."""
    rng = np.random.default_rng(seed)
    n_frames = scan_shape[0] * scan_shape[1]
    total = 0
    with SparseCountsWriter(path, scan_shape, FRAME_SHAPE) as writer:
        for a in range(0, n_frames, 1024):
            b = min(a + 1024, n_frames)
            per_frame = rng.poisson(dose * FRAME_PIXELS, size=b - a)
            frame = np.repeat(np.arange(b - a, dtype=np.int64), per_frame)
            keys = np.unique(frame * FRAME_PIXELS + rng.integers(0, FRAME_PIXELS, size=len(frame)))
            offsets = np.searchsorted(keys, np.arange(b - a + 1) * FRAME_PIXELS)
            writer.write_flat(np.arange(a, b), (keys % FRAME_PIXELS).astype(np.uint32), offsets)
            total += len(keys)
    return total


def run_job(code: str, path: Path, out: Path) -> tuple[float, int]:
    """(seconds of the second call of its work, peak RSS bytes) of one job in a fresh
    interpreter under GNU time."""
    script = f"PATH, OUT = {str(path)!r}, {str(out)!r}\n" + code + TIMED
    result = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M", sys.executable, "-c", script],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"a job failed:\n{result.stderr[-2000:]}")
    seconds = float(next(x for x in result.stdout.splitlines() if x.startswith("seconds=")).split("=")[1])
    rss = int(next(x for x in result.stderr.splitlines() if x.startswith("maxrss_kb=")).split("=")[1]) * 1024
    return seconds, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scan-shapes", type=parse_shape, nargs="+", default=[(64, 64), (128, 128)])
    parser.add_argument("--dose", type=float, default=0.002, help="electrons per pixel per frame")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files (default: the temp dir)")
    args = parser.parse_args()
    if not Path("/usr/bin/time").exists():
        sys.exit("needs GNU time (/usr/bin/time): apt-get install time")

    print(f"{'scan':>9} {'events':>11} {'job':<38} {'seconds':>8} {'peak RSS MB':>12}")
    for shape in args.scan_shapes:
        work = Path(tempfile.mkdtemp(prefix="bench_export_", dir=args.dir))
        try:
            path = work / "scan.h5"
            n_events = write_scan(path, shape, args.dose)
            results = {}
            for name, code in JOBS.items():
                out = work / name.split()[0].strip(":")
                out.mkdir(exist_ok=True)
                results[name] = run_job(code, path, out)
                seconds, rss = results[name]
                print(f"{shape[0]:>4}x{shape[1]:<4} {n_events:>11,} {name:<38} {seconds:>8.2f} {rss / 1e6:>12.0f}")
            copy, csr = results["h5py copy of the events"][0], results["export --to libertem"][0]
            dense, bridge = results["export --to py4dstem --bin 4"][0], results["bridge: stempy dense bin 4 + emdfile"][0]
            print(f"  raw_csr export speed / h5py copy speed = {copy / csr:.2f} (target >= 0.5); "
                  f"dense bin 4: bridge time / ours = {bridge / dense:.2f}")
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
