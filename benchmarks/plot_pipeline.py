"""Plot bench_pipeline.py's results: frames/s per scan size, streaming vs the file-based workflow.

    python benchmarks/bench_pipeline.py --json bench-out/pipeline.json
    python benchmarks/plot_pipeline.py bench-out/pipeline.json docs/pipeline_throughput.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="JSON written by bench_pipeline.py --json")
    parser.add_argument("output", type=Path, help="image to write (.png or .svg)")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(args.results.read_text())
    sizes = list(results["sizes"])
    frames = [int(s.split("x")[0]) * int(s.split("x")[1]) for s in sizes]
    streaming = [results["sizes"][s]["frames_per_s"] for s in sizes]
    file_based = [f / results["sizes"][s]["file_based"]["total_s"] if "file_based" in results["sizes"][s] else None
                  for s, f in zip(sizes, frames)]
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    x = range(len(sizes))
    width = 0.38
    ax.bar([i - width / 2 for i in x], streaming, width, label="stemstream streaming (simulator to closed file)")
    if all(v is not None for v in file_based):
        ax.bar([i + width / 2 for i in x], file_based, width,
               label="file-based: write raw files, count with stempy 3.6.0")
        for i, (s, fb) in enumerate(zip(streaming, file_based)):
            ax.annotate(f"{s / fb:.0f}x", (i, max(s, fb)), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(list(x), sizes)
    ax.set_xlabel("scan (rows x cols)")
    ax.set_ylabel("frames/s, end to end")
    ax.set_title(f"Time to counted data on {results.get('machine', 'this machine')}", fontsize=10)
    ax.set_ylim(0, max(streaming) * 1.15)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, frameon=False)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
