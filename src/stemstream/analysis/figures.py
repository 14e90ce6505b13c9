"""Figures of a counted file for ``stemstream show``: each image as a PNG (the same colour scaling
as the writer's and the dashboard's, stemstream.formats.png), an overview with titles and colour
bars, and the ledger as a table.

The images are the analysis results stored in the file (:mod:`.stored`) or, for a file without
any, computed now by the default analyses (:mod:`.offline`, the file is not changed). Matplotlib
draws the overview and the ledger (Agg backend, no display needed); it is imported only here, when
a figure is drawn, so nothing else pays for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from stemstream.analysis.offline import analyze_counted_file
from stemstream.analysis.registry import default_analyses
from stemstream.analysis.stored import file_facts, image_label, image_order, stored_views
from stemstream.analysis.views import View, render_png
from stemstream.core.detector import N_MODULES
from stemstream.formats.png import colour_limits

#: Matplotlib's colour map for each kind of view (close to formats.png's PNG colours).
_COLOUR_MAPS = {"sequential": "gray", "log": "inferno", "diverging": "RdBu_r"}
_FRAME_COUNTS = (("frames expected", "frames_expected"), ("frames complete", "frames_complete"),
                 ("frames incomplete", "frames_incomplete"), ("frames missing", "frames_missing"))
_SECTOR_COUNTS = (("sectors received", "sectors_received"), ("sectors missing", "sectors_missing"),
                  ("duplicates", "sectors_duplicate"), ("rejected", "sectors_rejected"))


def render_scan(file: str | os.PathLike, out_dir: str | os.PathLike, facts: dict | None = None) -> tuple[list[Path], bool]:
    """Write ``<stem>_<analysis>_<result>.png`` per image, ``<stem>_overview.png`` and
    ``<stem>_ledger.png`` into ``out_dir``. Images come from the file's ``/analysis`` or, if it
    has none, are computed (the file is not changed). ``facts``: the file's
    :func:`~.stored.file_facts`, if the caller has them. Returns (paths, computed)."""
    file, out_dir = Path(file), Path(out_dir)
    facts = facts or file_facts(file)
    views = stored_views(file)
    computed = not views
    if computed:
        views = _computed_views(file, facts["frame_shape"])
    stem = file.stem
    written = []
    for key in image_order(views):
        view = views[key]
        written.append(render_png(view.image, out_dir / f"{stem}_{key.replace('/', '_')}.png", view.kind))
    if views:
        written.append(_overview(views, facts, out_dir / f"{stem}_overview.png"))
    written.append(_ledger_figure(facts, out_dir / f"{stem}_ledger.png"))
    return written, computed


def _computed_views(path: Path, frame_shape: tuple[int, int]) -> dict[str, View]:
    """What the default analyses show for the file of frames of ``frame_shape`` (rows, cols),
    computed now (the file is not changed)."""
    analyses = default_analyses(frame_shape)
    out = analyze_counted_file(path, analyses, write=False, png=False)
    return {f"{a.name}/{k}": v for a in analyses for k, v in a.show(out.results[a.name]).items()}


def _pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _limits(image: np.ndarray, kind: str) -> tuple[np.ndarray, float, float, str]:
    """(values, vmin, vmax, colour map) for matplotlib: formats.png's limits, widened where they
    are equal (a flat image), since matplotlib needs vmin < vmax."""
    values, _, lo, hi = colour_limits(image, kind)
    if hi <= lo:
        lo, hi = (lo - 1.0, hi + 1.0) if kind == "diverging" else (lo, lo + 1.0)
    return values, lo, hi, _COLOUR_MAPS[kind]


def _overview(views: dict[str, View], facts: dict, path: Path) -> Path:
    """All images on one page, up to four a row, each with its title, axes and colour bar."""
    plt = _pyplot()
    keys = image_order(views)
    cols = min(4, max(len(keys), 1))
    rows = max(1, -(-len(keys) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows + 0.8), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, key in zip(axes.flat, keys):
        view = views[key]
        data, vmin, vmax, cmap = _limits(view.image, view.kind)
        ax.set_axis_on()
        im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(image_label(key), fontsize=10)
        axis = ("detector {} (px)" if key.startswith("summed_pattern")
                else "detector {} (bin)" if key.startswith("upsampled_pattern") else "scan {}")  # (sub-pixel bins)
        ax.set_xlabel(axis.format("col"), fontsize=8)
        ax.set_ylabel(axis.format("row"), fontsize=8)
        ax.tick_params(labelsize=7)
        bar = fig.colorbar(im, ax=ax, shrink=0.8)
        bar.ax.tick_params(labelsize=7)
        if view.kind == "log":
            bar.set_label("log(1 + counts)", fontsize=7)
    fig.suptitle(_headline(facts, path), fontsize=11)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


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


def _ledger_figure(facts: dict, path: Path) -> Path:
    """The file's frame ledger as a table (frames, then sectors per module) and a verdict."""
    meta = facts.get("stemstream", {})
    ledger = meta.get("ledger") if isinstance(meta.get("ledger"), dict) else None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.2, 4.6))
    ax.set_axis_off()
    if ledger is None:
        ax.text(0.5, 0.5, "this file has no stemstream ledger\n(it was not written by stemstream)",
                ha="center", va="center", fontsize=12)
    else:
        _ledger_table(ax, ledger)
        complete, lines = _ledger_verdict(ledger)
        ax.text(0.0, 0.02, "\n".join(lines), transform=ax.transAxes, fontsize=11,
                color="#1a7f37" if complete else "#9a6700", weight="bold", va="bottom")
    ax.set_title(f"ledger of {Path(facts['path']).name}", fontsize=11)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _ledger_table(ax, ledger: dict) -> None:
    """Frame counts in the 'frames' column, sector counts in one column per detector module."""
    def per_module(name: str) -> list[str]:
        values = ledger.get(name)
        if isinstance(values, (list, tuple)) and len(values) == N_MODULES:
            return [f"{int(v):,}" for v in values]
        return ["-"] * N_MODULES

    cells = [[name, f"{int(ledger.get(key, 0)):,}", *[""] * N_MODULES] for name, key in _FRAME_COUNTS]
    sectors = list(_SECTOR_COUNTS)
    if "sectors_lost" in ledger:
        sectors.append(("lost in transit", "sectors_lost"))
    cells += [[name, "", *per_module(key)] for name, key in sectors]
    columns = ["", "frames", *(f"module {m}" for m in range(N_MODULES))]
    module_width = (1.0 - 0.29 - 0.15) / N_MODULES
    table = ax.table(cellText=cells, colLabels=columns, colWidths=[0.29, 0.15, *[module_width] * N_MODULES],
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


def _ledger_verdict(ledger: dict) -> tuple[bool, list[str]]:
    """(complete, lines): whether every frame is accounted for, and the lines saying so (with the
    reasons of rejected sectors and the frames spilled to disk, if any)."""
    complete = (ledger.get("frames_complete") == ledger.get("frames_expected")
                and not ledger.get("frames_incomplete") and not sum(ledger.get("sectors_rejected", [0])))
    lines = ["every frame accounted for" if complete else "scan incomplete: see the counts above"]
    if ledger.get("rejected_reasons"):
        reasons = ledger["rejected_reasons"]
        lines.append("rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
    if ledger.get("frames_spilled"):
        lines.append(f"frames spilled to disk: {ledger['frames_spilled']:,}")
    return complete, lines
