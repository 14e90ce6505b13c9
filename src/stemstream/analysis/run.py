"""Run analyses over a counted file, store their results in it, render them as PNG images.

- :func:`analyze_counted_file`: the offline path (``stemstream analyze FILE.h5``): reads the file in
  batches of positions (memory bounded by the batch, not the scan), runs the same
  :class:`~stemstream.analysis.base.ScanAnalyses` the node groups run, writes the results into the
  file and PNGs beside it;
- :func:`store_results`: results into ``/analysis/<analysis>/<result>`` datasets of a counted file
  (parameters as attributes of ``/analysis/<analysis>``); stempy's ``/electron_events`` and
  ``/metadata`` are not touched, so stempy still loads the file. The writer calls it at the end of
  a streamed scan;
- :func:`write_pngs` / :func:`render_png`: ``<stem>_<analysis>_<result>.png`` images, 8-bit, written
  by a small pure numpy + zlib PNG encoder (no plotting library needed).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import struct
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stemstream.analysis import default_analyses
from stemstream.analysis.base import VIEW_KINDS, Analysis, ScanAnalyses
from stemstream.formats.sparse_h5 import CountedFileError, read_counted
from stemstream.core.version import SOFTWARE_VERSION

ANALYSIS_GROUP = "analysis"
#: Frames read per batch by :func:`analyze_counted_file` (a few MB of events).
DEFAULT_BATCH_FRAMES = 8192
#: PNGs are enlarged by an integer factor until the longer side has at least this many pixels.
MIN_PNG_SIDE = 256


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


# ------------------------------------------------------------------------------------------------
# reading


def _iter_batches(path: Path, batch_frames: int):
    """Yield (scan_shape, frame_shape) first, then (positions, events, offsets) batches."""
    try:
        f = h5py.File(path, "r")
    except OSError:
        f = None
    if f is not None:
        with f:
            ok = False
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
                ok = False
            if ok:
                fpp = n_entries // n_positions
                yield scan_shape, frame_shape
                step = max(1, batch_frames // fpp)
                for p0 in range(0, n_positions, step):
                    p1 = min(n_positions, p0 + step)
                    block = frames_ds[p0 * fpp : p1 * fpp]
                    yield _flatten(block, np.repeat(np.arange(p0, p1, dtype=np.int64), fpp))
                return
    # Versions 1 and 2, or anything odd: the full reader converts old layouts and explains errors.
    scan = read_counted(path)
    yield scan.scan_shape, scan.frame_shape
    fpp = scan.frames_per_position
    step = max(1, batch_frames // fpp)
    for p0 in range(0, scan.n_positions, step):
        p1 = min(scan.n_positions, p0 + step)
        yield _flatten(scan.frames[p0:p1].reshape(-1), np.repeat(np.arange(p0, p1, dtype=np.int64), fpp))


def _flatten(block: np.ndarray, positions: np.ndarray):
    lengths = np.fromiter((len(e) for e in block), np.int64, count=len(block))
    offsets = np.zeros(len(block) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    events = np.concatenate(list(block)).astype(np.uint32, copy=False) if offsets[-1] else np.empty(0, np.uint32)
    return positions, events, offsets


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
    batches = _iter_batches(path, int(batch_frames))
    try:
        scan_shape, frame_shape = next(batches)
    except StopIteration:  # pragma: no cover - the generator always yields shapes or raises
        raise CountedFileError(f"{path} is not a readable counted file.") from None
    if analyses is None:
        analyses = default_analyses(frame_shape, config)
    for a in analyses:
        if a.frame_shape != frame_shape:
            raise ValueError(f"analysis {a.name!r} was built for {a.frame_shape} frames, {path} has {frame_shape}")
    scan = ScanAnalyses(analyses, scan_shape)
    for positions, events, offsets in batches:
        scan.accumulate(positions, events, offsets)
    results = scan.finish()
    seconds = time.perf_counter() - t0
    out = AnalysisOutput(path, results, [], scan.frames, scan.events, scan.frames_skipped, seconds)
    if write:
        store_results(path, scan.analyses, results, info={**scan.info(), "source": "offline", "seconds": seconds})
    if png:
        out.pngs = write_pngs(scan.analyses, results, Path(out_dir) if out_dir is not None else path.parent, path.stem)
    return out


# ------------------------------------------------------------------------------------------------
# storing


def _attr(value: Any) -> Any:
    """A parameter as an HDF5 attribute: numbers, bools, strings as they are; flat numeric lists as
    arrays; anything else (dicts, nested or mixed lists) as a JSON string."""
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, (int, float, np.number, str)):
        return value
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in value
    ):
        return np.asarray(value)
    return json.dumps(value)


def store_results(
    target: str | os.PathLike | h5py.Group,
    analyses: Iterable[Analysis],
    results: Mapping[str, Mapping[str, np.ndarray]],
    *,
    info: Mapping[str, Any] | None = None,
) -> None:
    """Write results into ``/analysis/<name>/<result>`` of a counted file (a path, opened 'r+',
    or an open h5py File / Group to write under). Each analysis group gets its parameters as
    attributes (plus ``params_json``, the exact dict), each dataset its description; ``/analysis``
    gets the software version, the time and ``info`` (frames, events, source...). An analysis
    group that exists is replaced; other analyses' groups are kept."""
    if isinstance(target, h5py.Group):
        _store(target, analyses, results, info)
        return
    with h5py.File(target, "r+") as f:
        _store(f, analyses, results, info)


def _store(root: h5py.Group, analyses, results, info) -> None:
    group = root.require_group(ANALYSIS_GROUP)
    group.attrs["software_version"] = SOFTWARE_VERSION
    group.attrs["created_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
    for key, value in (info or {}).items():
        if value is not None:
            group.attrs[key] = _attr(value)
    for a in analyses:
        res = results[a.name]
        if a.name in group:
            del group[a.name]
        g = group.create_group(a.name)
        g.attrs["analysis"] = f"{type(a).__module__}.{type(a).__qualname__}"
        g.attrs["params_json"] = json.dumps(a.params)
        for key, value in a.params.items():
            if value is not None:
                g.attrs[key] = _attr(value)
        extra = a.result_attrs(res)
        for key, value in res.items():
            value = np.asarray(value)
            big = value.nbytes > (1 << 20)
            ds = g.create_dataset(key, data=value, compression="gzip" if big else None, compression_opts=1 if big else None)
            if key in a.descriptions:
                ds.attrs["description"] = a.descriptions[key]
            for k, v in extra.get(key, {}).items():
                if v is not None:
                    ds.attrs[k] = _attr(v)


def load_results(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """The results stored in a counted file: {analysis: {result: array}} ({} if there are none)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with h5py.File(path, "r") as f:
        group = f.get(ANALYSIS_GROUP)
        if not isinstance(group, h5py.Group):
            return out
        for name, g in group.items():
            if isinstance(g, h5py.Group):
                out[name] = {k: d[()] for k, d in g.items() if isinstance(d, h5py.Dataset)}
    return out


# ------------------------------------------------------------------------------------------------
# images


def write_pngs(
    analyses: Iterable[Analysis],
    results: Mapping[str, Mapping[str, np.ndarray]],
    out_dir: str | os.PathLike,
    stem: str,
) -> list[Path]:
    """Render what each analysis shows as ``out_dir/<stem>_<analysis>_<name>.png``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for a in analyses:
        for key, view in a.show(results[a.name]).items():
            paths.append(render_png(view.image, out_dir / f"{stem}_{a.name}_{key}.png", view.kind))
    return paths


# Diverging map anchors (t in -1..1 -> RGB), blue - white - red like ColorBrewer's RdBu.
_DIVERGING_T = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
_DIVERGING_RGB = np.array([[5, 48, 97], [67, 147, 195], [247, 247, 247], [214, 96, 77], [103, 0, 31]], np.float64)
_NAN_GREY = 128


def scale_image(array: np.ndarray, kind: str = "sequential") -> np.ndarray:
    """An image as 8-bit: (rows, cols) uint8 grey for 'sequential' and 'log', (rows, cols, 3) RGB
    for 'diverging'. Sequential: clipped to the 0.5 / 99.5 percentiles; log: log(1 + max(x, 0))
    clipped to 0.5 / 99.9; diverging: symmetric about the median, limit the 99.5 percentile of
    the distance from it. NaN / inf pixels are mid grey; a flat image is mid grey / white."""
    if kind not in VIEW_KINDS:
        raise ValueError(f"kind must be one of {VIEW_KINDS}, got {kind!r}")
    a = np.asarray(array, np.float64)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"an image must be 2-D and not empty, got shape {a.shape}")
    finite = np.isfinite(a)
    good = a[finite]
    if kind == "diverging":
        t = np.zeros(a.shape)
        if good.size:
            centre = float(np.median(good))
            limit = float(np.percentile(np.abs(good - centre), 99.5))
            if limit > 0:
                t = np.clip((np.where(finite, a, centre) - centre) / limit, -1.0, 1.0)
        rgb = np.stack([np.interp(t, _DIVERGING_T, _DIVERGING_RGB[:, c]) for c in range(3)], axis=-1)
        rgb = np.rint(rgb).astype(np.uint8)
        rgb[~finite] = _NAN_GREY
        return rgb
    if kind == "log":
        a = np.log1p(np.maximum(np.where(finite, a, 0.0), 0.0))
        good = a[finite]
        q = (0.5, 99.9)
    else:
        q = (0.5, 99.5)
    out = np.full(a.shape, _NAN_GREY, np.uint8)
    if good.size:
        lo, hi = (float(v) for v in np.percentile(good, q))
        if hi > lo:
            scaled = np.clip((a - lo) / (hi - lo), 0.0, 1.0)
            out[finite] = np.rint(scaled[finite] * 255).astype(np.uint8)
    return out


def png_bytes(image: np.ndarray) -> bytes:
    """An 8-bit PNG of a (rows, cols) grey or (rows, cols, 3) RGB uint8 image (no filtering)."""
    image = np.ascontiguousarray(image, np.uint8)
    if image.ndim == 2:
        colour_type, channels = 0, 1
    elif image.ndim == 3 and image.shape[2] == 3:
        colour_type, channels = 2, 3
    else:
        raise ValueError(f"a PNG image must be (rows, cols) or (rows, cols, 3), got shape {image.shape}")
    height, width = image.shape[:2]
    raw = np.zeros((height, 1 + width * channels), np.uint8)  # filter byte 0 per row
    raw[:, 1:] = image.reshape(height, width * channels)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 1))  # live images: speed over a few % of size
        + chunk(b"IEND", b"")
    )


def render_png(array: np.ndarray, path: str | os.PathLike, kind: str = "sequential") -> Path:
    """Write a 2-D array as a PNG scaled by :func:`scale_image`; small images are enlarged by an
    integer factor (nearest neighbour) until the longer side has at least 256 pixels. The file
    appears atomically. Returns the path."""
    image = scale_image(array, kind)
    factor = max(1, math.ceil(MIN_PNG_SIDE / max(image.shape[:2])))
    if factor > 1:
        image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(png_bytes(image))
    os.replace(tmp, path)
    return path
