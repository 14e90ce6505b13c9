"""Reading a counted file: version 3 (ours and stempy's) as it is, versions 1 and 2 converted
like stempy converts them (see the package docstring for the layouts)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from stemstream.formats.sparse_h5.layout import FORMAT_VERSION, READABLE_VERSIONS, CountedFileError
from stemstream.formats.sparse_h5.metadata import read_metadata

# Frames per read when loading: bounds h5py's temporary buffers for huge scans.
_READ_BLOCK = 65536


@dataclass
class CountedScan:
    """A counted scan in memory, laid out like stempy's ``SparseArray``.

    frames: object array of shape (n_positions, frames_per_position) of 1-D ``uint32`` arrays
    (sorted flat pixel indices ``row * frame_cols + col``), positions row-major over the scan;
    missing frames are empty arrays. scan_shape and frame_shape are (rows, cols).
    """

    frames: np.ndarray
    scan_shape: tuple[int, int]
    frame_shape: tuple[int, int]
    metadata: dict
    version: int

    @property
    def frames_per_position(self) -> int:
        return int(self.frames.shape[1])

    @property
    def n_positions(self) -> int:
        return int(self.frames.shape[0])

    def events_per_frame(self) -> np.ndarray:
        """Events in each frame, shape (n_positions, frames_per_position)."""
        flat = self.frames.ravel()
        counts = np.fromiter((len(f) for f in flat), dtype=np.int64, count=len(flat))
        return counts.reshape(self.frames.shape)

    def counts_image(self) -> np.ndarray:
        """Scan image of events per position summed over its frames, shape (rows, cols)."""
        return self.events_per_frame().sum(axis=1).reshape(self.scan_shape)

    def total_events(self) -> int:
        return int(self.events_per_frame().sum())

    @property
    def written(self) -> np.ndarray | None:
        """Which frames were written, bool (n_positions, frames_per_position), from our ledger;
        None for files without one (e.g. stempy's)."""
        try:
            mask = self.metadata["stemstream"]["ledger"]["written"]
        except (KeyError, TypeError):
            return None
        mask = np.asarray(mask)
        if mask.size != self.frames.size:
            return None
        return mask.reshape(self.frames.shape).astype(bool)


def read_counted(path: str | os.PathLike) -> CountedScan:
    """Read a counted file: version 3 (ours and stempy's), and versions 1 and 2 converted.

    Returns a :class:`CountedScan` with scan_shape and frame_shape as (rows, cols). Raises
    CountedFileError (a ValueError) with one sentence naming the path for a missing file, a
    non-HDF5 file or a wrong layout.
    """
    p = Path(path)
    with open_counted(p) as f:
        version = format_version(p, f)
        frames_ds, positions_ds = event_datasets(p, f)
        scan_shape, frame_shape = event_shapes(p, frames_ds, positions_ds)
        n_positions = scan_shape[0] * scan_shape[1]
        n_entries = frames_ds.shape[0]
        if version == FORMAT_VERSION and (n_entries == 0 or n_entries % n_positions):
            raise unreadable(
                p, f"/electron_events/frames has {n_entries} entries, "
                f"not a multiple of the {n_positions} scan positions",
            )
        data = _read_frame_lists(frames_ds)
        if version != FORMAT_VERSION:
            positions = _old_positions(p, positions_ds, version, n_entries, scan_shape)
        metadata = read_metadata(f["metadata"]) if isinstance(f.get("metadata"), h5py.Group) else {}

    if version == FORMAT_VERSION:
        frames = data.reshape(n_positions, n_entries // n_positions)
    else:
        frames = _old_frames_by_position(data, positions, version, n_positions)
    return CountedScan(
        frames=frames, scan_shape=scan_shape, frame_shape=frame_shape, metadata=metadata, version=version
    )


def unreadable(path: Path, what: str) -> CountedFileError:
    return CountedFileError(f"{path} is not a readable counted file: {what}.")


def open_counted(path: Path) -> h5py.File:
    if not path.exists():
        raise unreadable(path, "it does not exist")
    if not path.is_file():
        raise unreadable(path, "it is not a regular file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise unreadable(path, f"it cannot be opened as HDF5 ({reason})") from exc


def format_version(path: Path, f: h5py.File) -> int:
    """The root attribute ``version``; a file without one is version 1, as stempy reads it."""
    try:
        version = int(f.attrs.get("version", 1))
    except (TypeError, ValueError):
        raise unreadable(path, f"its root attribute 'version' is {f.attrs.get('version')!r}, not an integer") from None
    if version not in READABLE_VERSIONS:
        raise unreadable(path, f"format version {version} is not supported (only 1, 2 and 3)")
    return version


def event_datasets(path: Path, f: h5py.File) -> tuple[h5py.Dataset, h5py.Dataset]:
    """``/electron_events/frames`` (checked to be 1-D vlen integers) and ``.../scan_positions``."""
    events = f.get("electron_events")
    if not isinstance(events, h5py.Group):
        raise unreadable(path, "it has no /electron_events group")
    frames_ds = events.get("frames")
    positions_ds = events.get("scan_positions")
    if not isinstance(frames_ds, h5py.Dataset) or not isinstance(positions_ds, h5py.Dataset):
        raise unreadable(path, "it lacks the /electron_events/frames or /electron_events/scan_positions dataset")
    base = h5py.check_vlen_dtype(frames_ds.dtype)
    if base is None or np.dtype(base).kind not in "iu" or frames_ds.ndim != 1:
        raise unreadable(
            path,
            f"/electron_events/frames is {frames_ds.dtype} with shape {frames_ds.shape}, "
            "not a 1-D variable-length integer dataset",
        )
    return frames_ds, positions_ds


def event_shapes(path: Path, frames_ds: h5py.Dataset, positions_ds: h5py.Dataset) -> tuple[tuple[int, int], tuple[int, int]]:
    """(scan_shape, frame_shape), each (rows, cols), from the datasets' Nx / Ny attributes."""
    try:
        scan_shape = (int(positions_ds.attrs["Ny"]), int(positions_ds.attrs["Nx"]))
        frame_shape = (int(frames_ds.attrs["Nx"]), int(frames_ds.attrs["Ny"]))  # stempy: Nx = rows
    except KeyError as exc:
        raise unreadable(path, f"the attribute {exc.args[0]!r} is missing on /electron_events") from None
    if min(scan_shape) <= 0 or min(frame_shape) <= 0:
        raise unreadable(path, f"scan shape {scan_shape} or frame shape {frame_shape} is not positive")
    return scan_shape, frame_shape


def _read_frame_lists(frames_ds: h5py.Dataset) -> np.ndarray:
    """Every entry of ``/electron_events/frames``, as a 1-D object array of ``uint32`` arrays."""
    n_entries = frames_ds.shape[0]
    data = np.empty(n_entries, dtype=object)
    for a in range(0, n_entries, _READ_BLOCK):
        b = min(a + _READ_BLOCK, n_entries)
        data[a:b] = frames_ds[a:b]
    if np.dtype(h5py.check_vlen_dtype(frames_ds.dtype)) != np.uint32:
        for i in range(n_entries):
            data[i] = data[i].astype(np.uint32)
    return data


# --------------------------------------------------------------------------------------------
# versions 1 and 2: entries listed with their scan positions


def _old_positions(
    path: Path, positions_ds: h5py.Dataset, version: int, n_entries: int, scan_shape: tuple[int, int]
) -> np.ndarray:
    """The scan position of each entry of ``/electron_events/frames``; scan_shape is (rows, cols)."""
    positions = np.asarray(positions_ds[()], dtype=np.int64).ravel()
    if len(positions) != n_entries:
        if version == 2:
            raise unreadable(path, f"it has {n_entries} frames but {len(positions)} scan positions")
        positions = np.arange(n_entries, dtype=np.int64)  # stempy's fallback for v1
    if n_entries and (positions.min() < 0 or positions.max() >= scan_shape[0] * scan_shape[1]):
        raise unreadable(path, f"a scan position lies outside the {scan_shape[0]} x {scan_shape[1]} scan")
    return positions


def _old_frames_by_position(data: np.ndarray, positions: np.ndarray, version: int, n_positions: int) -> np.ndarray:
    """The entries of a version 1 or 2 file as version 3's (n_positions, F) grid of frames."""
    if version == 1:
        split, positions = _split_v1(data, positions)
        data = np.empty(len(split), dtype=object)
        for i, d in enumerate(split):
            data[i] = d
    return _group_by_position(data, positions, n_positions)


def _empty_frames(n: int) -> list[np.ndarray]:
    return [np.empty(0, dtype=np.uint32) for _ in range(n)]


def _group_by_position(data: np.ndarray, positions: np.ndarray, n_positions: int) -> np.ndarray:
    """Versions 1/2: frames listed with their positions -> (n_positions, F), in file order
    within a position, gaps filled with empty frames (what stempy's conversion does)."""
    per_position = np.bincount(positions, minlength=n_positions)
    fpp = max(int(per_position.max(initial=0)), 1)
    out = np.empty((n_positions, fpp), dtype=object)
    order = np.argsort(positions, kind="stable")
    sorted_pos = positions[order]
    first = np.searchsorted(sorted_pos, sorted_pos, side="left")
    rank = np.arange(len(sorted_pos)) - first
    for idx, pos, k in zip(order, sorted_pos, rank):
        out[pos, k] = data[idx]
    flat = out.reshape(-1)  # a view: filling it fills out
    holes = [i for i, x in enumerate(flat) if x is None]
    for h, e in zip(holes, _empty_frames(len(holes))):
        flat[h] = e
    return out


def _split_v1(data: np.ndarray, positions: np.ndarray) -> tuple[list, np.ndarray]:
    """Version 1 merged a position's frames into one list; a repeated pixel means it was hit in
    several frames. Like stempy, frame k gets the pixels hit more than k times."""
    out_data: list[np.ndarray] = []
    out_pos: list[int] = []
    for events, pos in zip(data, positions):
        if len(events) and np.any(np.diff(events.astype(np.int64)) <= 0):
            uniq, counts = np.unique(events, return_counts=True)
            for k in range(int(counts.max())):
                out_data.append(uniq[counts > k])
                out_pos.append(int(pos))
        else:
            out_data.append(events)
            out_pos.append(int(pos))
    return out_data, np.asarray(out_pos, dtype=np.int64)
