"""Figures of a counted file for ``stemstream show``: each image as a PNG (the same colour scaling
as the writer's and the dashboard's), an overview with titles and colour bars, and the ledger as a
table.

Matplotlib draws the overview and the ledger (Agg backend, no display needed).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from stemstream.analysis.base import View
from stemstream.analysis.stored import image_label, image_order, stored_views


def _computed_views(path: Path) -> dict[str, View]:
    """What the default analyses show for the file, computed now (the file is not changed)."""
    from stemstream.analysis import default_analyses
    from stemstream.analysis.run import analyze_counted_file
    from stemstream.analysis.stored import file_facts

    analyses = default_analyses(file_facts(path)["frame_shape"])
    out = analyze_counted_file(path, analyses, write=False, png=False)
    return {f"{a.name}/{k}": v for a in analyses for k, v in a.show(out.results[a.name]).items()}


def _limits(image: np.ndarray, kind: str):
    """vmin, vmax, colour map for matplotlib, matching analysis.run.scale_image's choices."""
    a = np.asarray(image, np.float64)
    good = a[np.isfinite(a)]
    if kind == "diverging":
        centre = float(np.median(good)) if good.size else 0.0
        limit = float(np.percentile(np.abs(good - centre), 99.5)) if good.size else 1.0
        limit = limit or 1.0
        return a, centre - limit, centre + limit, "RdBu_r"
    if kind == "log":
        a = np.log1p(np.maximum(np.where(np.isfinite(a), a, 0.0), 0.0))
        good = a[np.isfinite(a)]
        lo, hi = (np.percentile(good, (0.5, 99.9)) if good.size else (0.0, 1.0))
        return a, float(lo), float(hi) if hi > lo else float(lo) + 1, "inferno"
    lo, hi = (np.percentile(good, (0.5, 99.5)) if good.size else (0.0, 1.0))
    return a, float(lo), float(hi) if hi > lo else float(lo) + 1, "gray"


def _overview(views: dict[str, View], facts: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = image_order(views)
    n = len(keys)
    cols = min(4, max(n, 1))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows + 0.8), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, key in zip(axes.flat, keys):
        view = views[key]
        data, vmin, vmax, cmap = _limits(view.image, view.kind)
        ax.set_axis_on()
        im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(image_label(key), fontsize=10)
        is_pattern = key.startswith("summed_pattern")
        ax.set_xlabel("detector col (px)" if is_pattern else "scan col", fontsize=8)
        ax.set_ylabel("detector row (px)" if is_pattern else "scan row", fontsize=8)
        ax.tick_params(labelsize=7)
        bar = fig.colorbar(im, ax=ax, shrink=0.8)
        bar.ax.tick_params(labelsize=7)
        if view.kind == "log":
            bar.set_label("log(1 + counts)", fontsize=7)
    fig.suptitle(_headline(facts, path), fontsize=11)
    target = path
    fig.savefig(target, dpi=90)
    plt.close(fig)
    return target


def _headline(facts: dict, path: Path) -> str:
    meta = facts.get("stemstream", {})
    ledger = meta.get("ledger", {}) if isinstance(meta.get("ledger"), dict) else {}
    rows, cols = facts["scan_shape"]
    line = f"{Path(facts['path']).name}: {rows} x {cols} positions, {facts['frames_per_position']} frame(s) each"
    if ledger:
        line += f"; {ledger.get('frames_complete', 0):,} of {ledger.get('frames_expected', 0):,} frames complete"
    if "events" in meta:
        line += f"; {int(meta['events']):,} electrons"
    return line


def _ledger_figure(facts: dict, path: Path) -> Path | None:
    meta = facts.get("stemstream", {})
    ledger = meta.get("ledger") if isinstance(meta.get("ledger"), dict) else None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.2, 4.6))
    ax.set_axis_off()
    if ledger is None:
        ax.text(0.5, 0.5, "this file has no stemstream ledger\n(it was not written by stemstream)",
                ha="center", va="center", fontsize=12)
    else:
        def per_module(name):
            values = ledger.get(name)
            return [f"{int(v):,}" for v in values] if isinstance(values, (list, tuple)) and len(values) == 4 else ["-"] * 4

        frames = [(name, ledger.get(key, 0)) for name, key in (
            ("frames expected", "frames_expected"), ("frames complete", "frames_complete"),
            ("frames incomplete", "frames_incomplete"), ("frames missing", "frames_missing"))]
        cells = [[name, f"{int(value):,}", "", "", "", ""] for name, value in frames]
        sectors = [("sectors received", "sectors_received"), ("sectors missing", "sectors_missing"),
                   ("duplicates", "sectors_duplicate"), ("rejected", "sectors_rejected")]
        if "sectors_lost" in ledger:
            sectors.append(("lost in transit", "sectors_lost"))
        cells += [[name, "", *per_module(key)] for name, key in sectors]
        columns = ["", "frames", "module 0", "module 1", "module 2", "module 3"]
        table = ax.table(cellText=cells, colLabels=columns, colWidths=[0.29, 0.15, 0.14, 0.14, 0.14, 0.14],
                         bbox=[0.0, 0.16, 1.0, 0.84], cellLoc="right", colLoc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(10)
        for (r, c), cell in table.get_celld().items():
            cell.set_edgecolor("#d0d7de")
            if r == 0:
                cell.set_text_props(weight="bold")
                cell.set_facecolor("#f3f4f6")
            if c == 0:
                cell.set_text_props(ha="left", weight="bold" if r else "normal")
        complete = (ledger.get("frames_complete") == ledger.get("frames_expected")
                    and not ledger.get("frames_incomplete") and not sum(ledger.get("sectors_rejected", [0])))
        status = "every frame accounted for" if complete else "scan incomplete: see the counts above"
        extra = []
        if ledger.get("rejected_reasons"):
            reasons = ledger["rejected_reasons"]
            extra.append("rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
        if ledger.get("frames_spilled"):
            extra.append(f"frames spilled to disk: {ledger['frames_spilled']:,}")
        ax.text(0.0, 0.02, "\n".join([status, *extra]), transform=ax.transAxes, fontsize=11,
                color="#1a7f37" if complete else "#9a6700", weight="bold", va="bottom")
    ax.set_title(f"ledger of {Path(facts['path']).name}", fontsize=11)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def render_scan(file: str | os.PathLike, out_dir: str | os.PathLike, facts: dict | None = None) -> tuple[list[Path], bool]:
    """Write ``<stem>_<analysis>_<result>.png`` per image, ``<stem>_overview.png`` and
    ``<stem>_ledger.png`` into ``out_dir``. Images come from the file's ``/analysis`` or, if it
    has none, are computed (the file is not changed). Returns (paths, computed)."""
    from stemstream.analysis.run import render_png
    from stemstream.analysis.stored import file_facts

    file, out_dir = Path(file), Path(out_dir)
    facts = facts or file_facts(file)
    views = stored_views(file)
    computed = not views
    if computed:
        views = _computed_views(file)
    stem = file.stem
    written = []
    for key in image_order(views):
        view = views[key]
        written.append(render_png(view.image, out_dir / f"{stem}_{key.replace('/', '_')}.png", view.kind))
    if views:
        written.append(_overview(views, facts, out_dir / f"{stem}_overview.png"))
    written.append(_ledger_figure(facts, out_dir / f"{stem}_ledger.png"))
    return written, computed
