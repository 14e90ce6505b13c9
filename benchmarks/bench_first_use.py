"""The first `stemstream demo` on a machine against the next one: what compiling the kernels costs a
new user (issue 11's target: the first demo within 2x of the second).

A fresh install has no numba cache. Each "first" run here points numba at an empty cache
directory (NUMBA_CACHE_DIR, which every role inherits), so it compiles every kernel as after
`pip install .`; the "next" run that follows reuses that directory. Both run the demo as a script
does (no terminal: full speed, exits at the end), each in an empty working directory, one after
the other, --repeats times. Prints each run's wall time, the medians and their ratio.

    python benchmarks/bench_first_use.py [--repeats 3]

What it leaves out of a real first install: Python's own bytecode, which pip compiles on install.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import stemstream_command


def timed_demo(cache_dir: Path, work_dir: Path) -> float:
    """Wall seconds of one `stemstream demo` with numba's cache at ``cache_dir``."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    started = time.perf_counter()
    done = subprocess.run([*stemstream_command(), "demo"], cwd=work_dir, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"stemstream demo failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="pairs of (first, next) demos")
    args = parser.parse_args()
    first, after = [], []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="bench-first-use-") as tmp:
            cache, cold_dir, warm_dir = Path(tmp) / "numba-cache", Path(tmp) / "first", Path(tmp) / "next"
            for folder in (cache, cold_dir, warm_dir):
                folder.mkdir()
            first.append(timed_demo(cache, cold_dir))
            after.append(timed_demo(cache, warm_dir))
        print(f"pair {repeat + 1}: first demo {first[-1]:.1f} s, next demo {after[-1]:.1f} s, "
              f"ratio {first[-1] / after[-1]:.2f}", flush=True)
    cold, warm = statistics.median(first), statistics.median(after)
    print(f"median of {args.repeats}: first demo {cold:.1f} s, next demo {warm:.1f} s, "
          f"first / next = {cold / warm:.2f} (target <= 2)")


if __name__ == "__main__":
    main()
