"""Analyses over a counted file (``stemstream analyze FILE.h5``): the same
:class:`~stemstream.analysis.scan.ScanAnalyses` the node groups run, fed from the file in batches
of positions (memory bounded by the batch, not the scan); the results go into the file
(:mod:`.results_store`) and PNGs beside it (:func:`~stemstream.analysis.views.write_pngs`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stemstream.analysis.interface import Analysis
from stemstream.analysis.registry import default_analyses
from stemstream.analysis.results_store import store_results
from stemstream.analysis.scan import ScanAnalyses
from stemstream.analysis.views import write_pngs
from stemstream.formats.sparse_h5 import CountedFileError, read_counted
from stemstream.formats.sparse_h5.layout import SUBPIXEL_POSITIONS

#: Frames read per batch by :func:`analyze_counted_file` (a few MB of events).
DEFAULT_BATCH_FRAMES = 8192


@dataclass
class AnalysisOutput:
    """What :func:`analyze_counted_file` did: results[analysis][result] arrays, the PNGs written,
    frames and electrons analysed, and the seconds it took."""

    path: Path
    results: dict[str, dict[str, np.ndarray]]
    pngs: list[Path] = field(default_factory=list)
    frames: int = 0
    events: int = 0
    frames_skipped: int = 0
    seconds: float = 0.0


def analyze_counted_file(
    path: str | os.PathLike,
    analyses: Sequence[Analysis] | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    batch_frames: int = DEFAULT_BATCH_FRAMES,
    write: bool = True,
    png: bool = True,
) -> AnalysisOutput:
    """Run ``analyses`` (default: :func:`default_analyses` for the file's frame shape and
    ``config``) over a counted file, in batches of about ``batch_frames`` frames.

    With ``write``, results go into the file under ``/analysis`` (:func:`store_results`, replacing
    earlier results of the same analyses); with ``png``, images go to ``out_dir`` (default: the
    file's directory) as ``<stem>_<analysis>_<result>.png``. Raises CountedFileError (a
    ValueError) for a file that is not a counted file, ValueError for analyses built for another
    frame shape, OSError if the file cannot be opened for writing.
    """
    path = Path(path)
    if batch_frames < 1:
        raise ValueError(f"batch_frames must be >= 1, got {batch_frames}")
    t0 = time.perf_counter()
    wants_points: list[bool] = []  # (known once the shapes are: the default analyses need the frame's)
    batches = _iter_batches(path, int(batch_frames), wants_points)
    try:
        scan_shape, frame_shape = next(batches)
    except StopIteration:  # pragma: no cover - the generator always yields shapes or raises
        raise CountedFileError(f"{path} is not a readable counted file.") from None
    if analyses is None:
        analyses = default_analyses(frame_shape, config)
    for a in analyses:
        if a.frame_shape != frame_shape:
            raise ValueError(f"analysis {a.name!r} was built for {a.frame_shape} frames, {path} has {frame_shape}")
    wants_points.append(any(a.subpixel for a in analyses))
    scan = ScanAnalyses(analyses, scan_shape)
    for positions, events, offsets, points in batches:
        scan.accumulate(positions, events, offsets, points)
    results = scan.finish()
    seconds = time.perf_counter() - t0
    out = AnalysisOutput(path, results, [], scan.frames, scan.events, scan.frames_skipped, seconds)
    if write:
        store_results(path, scan.analyses, results, info={**scan.info(), "source": "offline", "seconds": seconds})
    if png:
        out.pngs = write_pngs(scan.analyses, results, Path(out_dir) if out_dir is not None else path.parent, path.stem)
    return out


def _iter_batches(path: Path, batch_frames: int, wants_points: list[bool]) -> Iterator:
    """Yield (scan_shape, frame_shape) first, both (rows, cols), then (positions, events, offsets,
    points) batches of about ``batch_frames`` frames, whole positions each. ``points``: the
    events' sub-pixel positions (SUBPIXEL_POSITIONS) when the file has them and, by the time
    the batches are read, ``wants_points`` holds True; else None (pixel centres)."""
    try:
        f = h5py.File(path, "r")
    except OSError:
        f = None
    if f is not None:
        with f:
            layout = _version3_layout(f)
            if layout is not None:
                scan_shape, frame_shape, fpp = layout
                yield scan_shape, frame_shape
                frames = f["electron_events/frames"]
                stored = f.get(SUBPIXEL_POSITIONS) if any(wants_points) else None
                for p0, p1 in _position_ranges(scan_shape, fpp, batch_frames):
                    batch = _flatten(frames[p0 * fpp : p1 * fpp], _positions(p0, p1, fpp))
                    yield *batch, None if stored is None else _points(path, stored[p0 * fpp : p1 * fpp], batch[1])
                return
    # Versions 1 and 2, or anything odd: the full reader converts old layouts and explains errors.
    scan = read_counted(path)
    yield scan.scan_shape, scan.frame_shape
    fpp = scan.frames_per_position
    for p0, p1 in _position_ranges(scan.scan_shape, fpp, batch_frames):
        yield *_flatten(scan.frames[p0:p1].reshape(-1), _positions(p0, p1, fpp)), None


def _points(path: Path, block: np.ndarray, events: np.ndarray) -> np.ndarray:
    """A batch's sub-pixel positions (events, 2) from their per-frame lists (2 floats an event);
    CountedFileError when they are not one (row, col) an event of the batch."""
    flat = np.concatenate([np.empty(0, np.float32), *block]) if len(block) else np.empty(0, np.float32)
    if len(flat) != 2 * len(events):
        raise CountedFileError(f"{path}: its sub-pixel positions ({SUBPIXEL_POSITIONS}) do not match its events: "
                               f"{len(flat)} numbers for {len(events)} events")
    return flat.reshape(-1, 2)


def _version3_layout(f: h5py.File) -> tuple[tuple[int, int], tuple[int, int], int] | None:
    """(scan_shape, frame_shape, frames per position) of a well-formed version 3 file, which is read
    a batch at a time; None for anything else."""
    try:
        version = int(f.attrs.get("version", 1))
        frames_ds = f["electron_events/frames"]
        positions_ds = f["electron_events/scan_positions"]
        scan_shape = (int(positions_ds.attrs["Ny"]), int(positions_ds.attrs["Nx"]))
        frame_shape = (int(frames_ds.attrs["Nx"]), int(frames_ds.attrs["Ny"]))  # stempy: Nx = rows
        base = h5py.check_vlen_dtype(frames_ds.dtype)
        n_positions = scan_shape[0] * scan_shape[1]
        n_entries = frames_ds.shape[0]
        ok = (
            version == 3
            and base is not None
            and np.dtype(base).kind in "iu"
            and frames_ds.ndim == 1
            and min(scan_shape) > 0
            and min(frame_shape) > 0
            and n_entries > 0
            and n_entries % n_positions == 0
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return (scan_shape, frame_shape, n_entries // n_positions) if ok else None


def _position_ranges(scan_shape: tuple[int, int], fpp: int, batch_frames: int) -> Iterator[tuple[int, int]]:
    """(first, end) positions of each batch: whole positions, at least one per batch."""
    n_positions = scan_shape[0] * scan_shape[1]
    step = max(1, batch_frames // fpp)
    for p0 in range(0, n_positions, step):
        yield p0, min(n_positions, p0 + step)


def _positions(p0: int, p1: int, fpp: int) -> np.ndarray:
    """The position of each frame of positions ``p0:p1``, ``fpp`` frames each."""
    return np.repeat(np.arange(p0, p1, dtype=np.int64), fpp)


def _flatten(block: np.ndarray, positions: np.ndarray):
    """A batch (positions, events, offsets) from a block of per-frame event arrays."""
    lengths = np.fromiter((len(e) for e in block), np.int64, count=len(block))
    offsets = np.zeros(len(block) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    events = np.concatenate(list(block)).astype(np.uint32, copy=False) if offsets[-1] else np.empty(0, np.uint32)
    return positions, events, offsets
