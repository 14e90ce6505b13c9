"""What the dashboard and ``stemstream show`` read from a counted file without loading its events:
its facts, the analysis results the writer or ``stemstream analyze`` stored in it, and the PNGs
beside it.

- :func:`file_facts`: shape, frames per position, the stemstream metadata (ledger, events, seconds)
  and the thresholds, from attributes only (milliseconds even for a 1024 x 1024 scan);
- :func:`stored_views`: the images of the analyses stored under ``/analysis`` (the same
  :class:`~stemstream.analysis.views.View` each analysis shows, so colour scaling matches the PNGs
  the writer puts beside the file); :func:`view_png`: one of them as PNG bytes;
- :func:`image_key` / :func:`png_images_beside`: the writer's PNG names
  (``<stem>_<analysis>_<result>.png``) mapped back to ``<analysis>/<result>`` keys, the names the
  live images carry.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stemstream.analysis.registry import ANALYSES, build_analysis
from stemstream.analysis.results_store import ANALYSIS_GROUP, load_results
from stemstream.analysis.views import View
from stemstream.formats.png import MIN_PNG_SIDE, image_png
from stemstream.formats.sparse_h5 import CountedFileError

#: How the dashboard names and orders the images people look for first; others follow by name.
IMAGE_LABELS = {
    "virtual_detectors/bright_field": "virtual bright field",
    "virtual_detectors/annular_dark_field": "annular dark field",
    "center_of_mass/dpc_phase": "DPC phase",
    "center_of_mass/com_row": "centre of mass, rows",
    "center_of_mass/com_col": "centre of mass, cols",
    "summed_pattern/pattern": "summed diffraction pattern (log)",
    "upsampled_pattern/pattern": "summed pattern, sub-pixel bins (log)",
    "virtual_detectors/counts": "electrons per position",
}


def image_label(key: str) -> str:
    return IMAGE_LABELS.get(key, key.replace("/", ": ").replace("_", " "))


def image_order(keys) -> list[str]:
    """Keys in the dashboard's order: the known ones first, the rest alphabetically."""
    known = [k for k in IMAGE_LABELS if k in keys]
    return known + sorted(k for k in keys if k not in IMAGE_LABELS)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 64 else None  # big masks stay in the file
    if isinstance(value, np.generic):
        return value.item()
    return value


def _attrs_tree(group: h5py.Group) -> dict:
    out = {k: _plain(v) for k, v in group.attrs.items()}
    for key, item in group.items():
        if isinstance(item, h5py.Group):
            out[key] = _attrs_tree(item)
    return {k: v for k, v in out.items() if v is not None}


def file_facts(path: str | os.PathLike) -> dict:
    """Facts of a counted file from its attributes: scan_shape (rows, cols), frame_shape,
    frames_per_position, ``stemstream`` metadata (ledger, events, seconds, scan_number...),
    ``electron_counting`` (stempy's threshold attributes), analyses stored. Raises
    CountedFileError with one sentence for anything that is not a counted file."""
    p = Path(path)
    if not p.is_file():
        raise CountedFileError(f"{p} is not a readable counted file: it does not exist.")
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise CountedFileError(f"{p} is not a readable counted file: it cannot be opened as HDF5 ({exc}).") from None
    with f:
        try:
            frames = f["electron_events/frames"]
            positions = f["electron_events/scan_positions"]
            scan_shape = (int(positions.attrs["Ny"]), int(positions.attrs["Nx"]))
            frame_shape = (int(frames.attrs["Nx"]), int(frames.attrs["Ny"]))
            n_entries = int(frames.shape[0])
        except (KeyError, TypeError, ValueError) as exc:
            raise CountedFileError(f"{p} is not a readable counted file: {exc}.") from None
        n_positions = scan_shape[0] * scan_shape[1]
        metadata = f.get("metadata")
        stemstream = _attrs_tree(metadata["stemstream"]) if isinstance(metadata, h5py.Group) and "stemstream" in metadata else {}
        counting = dict(metadata["electron_counting"].attrs) if isinstance(metadata, h5py.Group) and "electron_counting" in metadata else {}
        analyses = sorted(f["analysis"].keys()) if isinstance(f.get("analysis"), h5py.Group) else []
    return {
        "path": str(p),
        "scan_shape": scan_shape,
        "frame_shape": frame_shape,
        "frames_per_position": max(1, n_entries // n_positions) if n_positions else 1,
        "stemstream": stemstream,
        "electron_counting": {k: _plain(v) for k, v in counting.items()},
        "analyses": analyses,
        "size_bytes": p.stat().st_size,
        "modified": p.stat().st_mtime,
    }


def stored_views(path: str | os.PathLike) -> dict[str, View]:
    """Like :func:`read_stored_views`, remembered for the last few files (keyed by path, size and
    modification time), since a scan's page asks for its images one by one."""
    p = Path(path)
    st = p.stat()
    return _cached_views(str(p.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _cached_views(path: str, size: int, mtime_ns: int) -> dict[str, View]:
    return read_stored_views(path)


def read_stored_views(path: str | os.PathLike) -> dict[str, View]:
    """``<analysis>/<result>`` -> View of the results stored in the file's ``/analysis`` group
    ({} if it has none). Each analysis's own ``show`` (built from its stored parameters) picks the
    images and their colour scale; an analysis this installation does not know shows its 2-D
    results in grey."""
    results = load_results(path)
    if not results:
        return {}
    with h5py.File(path, "r") as f:
        frames = f["electron_events/frames"]
        frame_shape = (int(frames.attrs["Nx"]), int(frames.attrs["Ny"]))
        params = {}
        for name in results:
            raw = f[ANALYSIS_GROUP][name].attrs.get("params_json", "{}")
            try:
                params[name] = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            except (ValueError, AttributeError):
                params[name] = {}
    views: dict[str, View] = {}
    for name, res in results.items():
        try:
            shown = build_analysis(name, frame_shape, params[name]).show(res)
        except Exception:  # unknown analysis or parameters from another version: plain grey
            shown = {k: View(v) for k, v in res.items() if np.ndim(v) == 2}
        for key, view in shown.items():
            views[f"{name}/{key}"] = view
    return views


def view_png(view: View, min_side: int = MIN_PNG_SIDE) -> bytes:
    """A view as PNG bytes, colour-scaled as the writer's PNGs and enlarged (nearest neighbour)
    to at least ``min_side`` pixels on the longer side."""
    return image_png(view.image, view.kind, min_side)


def image_key(png: Path, stem: str) -> str | None:
    """``<stem>_<analysis>_<result>.png`` -> ``<analysis>/<result>`` (None if it is not one of the
    scan's images). Analysis names contain underscores, so the registered names decide the split."""
    name = png.name
    if not (name.startswith(stem + "_") and name.endswith(".png")):
        return None
    rest = name[len(stem) + 1 : -4]
    for analysis in sorted(ANALYSES, key=len, reverse=True):
        if rest.startswith(analysis + "_") and len(rest) > len(analysis) + 1:
            return f"{analysis}/{rest[len(analysis) + 1:]}"
    head, _, tail = rest.partition("_")
    return f"{head}/{tail}" if tail else rest


def png_images_beside(path: str | os.PathLike, listed: list[str] | None = None) -> dict[str, str]:
    """The scan's PNGs: ``key -> path``, from ``listed`` (the writer's summary) or, if none are
    given, the ``<stem>_*.png`` files next to the scan's file."""
    p = Path(path)
    candidates = [Path(x) for x in listed] if listed else sorted(p.parent.glob(f"{p.stem}_*.png"))
    out = {}
    for png in candidates:
        key = image_key(png, p.stem)
        if key:
            out[key] = str(png)
    return out
