"""Electron-counted sparse HDF5, stempy's format version 3 (what ``stempy.io.save_electron_counts``
writes and ``stempy.io.load_electron_counts`` reads).

Layout (see docs/formats.md section 3):

- root attribute ``version`` = 3;
- ``/electron_events/frames``: 1-D variable-length ``uint32``, length ``n_positions * F``
  (F = frames per position). Entry ``p * F + j`` is frame ``j`` at position ``p``; positions are
  row-major over the scan, ``p = row * scan_cols + col``. Each entry holds the sorted, unique flat
  pixel indices ``row * frame_cols + col`` of the electrons in that frame. A frame that was never
  written reads back as an empty array.
- ``/electron_events/scan_positions``: ``int64`` ``arange(n_positions)`` with attributes
  ``Nx`` = scan cols and ``Ny`` = scan rows.
- ``/metadata``: nested groups of attributes; stempy's thresholds live in
  ``/metadata/electron_counting`` (names in :data:`ELECTRON_COUNTING_ATTRS`), ours in
  ``/metadata/stemstream`` (software version, times, and the frame ledger in
  ``/metadata/stemstream/ledger``).

Orientation of the frame attributes: stempy 3.6.0 writes ``frames.attrs['Nx'] = frame_shape[0]``
and ``frames.attrs['Ny'] = frame_shape[1]`` and reads ``frame_shape = (Nx, Ny)``, i.e. for frames
its ``Nx`` is the number of *rows*, the opposite of the scan attributes. We follow stempy's code,
not the attribute names, so that non-square frames survive a round trip through stempy in both
directions. The 4D Camera's 576 x 576 frames are square, so real files are unaffected.

Old formats: version 1 (one list per position, several frames merged, so a pixel may repeat)
and version 2 (one list per frame plus a per-frame ``scan_positions``) are read and converted
like stempy does; a file without a ``version`` attribute is version 1.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stemstream.core.detector import FRAME_SHAPE
from stemstream.core.version import SOFTWARE_VERSION

FORMAT_VERSION = 3
DEFAULT_FRAME_SHAPE = FRAME_SHAPE  # (rows, cols)

#: stempy's names for the electron-counting thresholds, stored in /metadata/electron_counting.
ELECTRON_COUNTING_ATTRS = (
    "threshold_calculated",
    "background_threshold",
    "x_ray_threshold",
    "number_of_samples",
    "min_sample",
    "max_sample",
    "mean",
    "variance",
    "std_dev",
    "number_of_bins",
    "x_ray_threshold_n_sigma",
    "background_threshold_n_sigma",
    "optimized_mean",
    "optimized_std_dev",
)

PARTIAL_SUFFIX = ".partial"

_VLEN_UINT32 = h5py.vlen_dtype(np.uint32)
# HDF5 keeps attributes in the object header, limited to 64 KiB in the default (oldest) file
# format; bigger metadata arrays (e.g. the ledger mask of a 1024 x 1024 scan) become datasets.
_MAX_ATTR_BYTES = 32 * 1024
# Frames per read when loading: bounds h5py's temporary buffers for huge scans.
_READ_BLOCK = 65536


class CountedFileError(ValueError):
    """A file that is not a readable counted file; the message names the path and the problem."""


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _shape2(name: str, shape: Any) -> tuple[int, int]:
    try:
        rows, cols = (int(x) for x in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (rows, cols), got {shape!r}") from None
    if rows <= 0 or cols <= 0:
        raise ValueError(f"{name} must be positive (rows, cols), got {shape!r}")
    return rows, cols


# --------------------------------------------------------------------------------------------
# metadata


def _normalize_value(key: str, value: Any) -> Any:
    """A metadata value as something h5py can store (checked when set, so errors surface early)."""
    if isinstance(value, Mapping):
        return _normalize_dict(value)
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, (int, float, complex, np.number)):
        return value
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, (np.ndarray, list, tuple)):
        arr = np.asarray(value)
        if arr.dtype.kind in "US" or (arr.dtype.kind == "O" and all(isinstance(x, str) for x in arr.flat)):
            # numpy's fixed-width unicode has no HDF5 equivalent: store variable-length strings
            return np.array([str(x) for x in arr.flat], dtype=object).reshape(arr.shape)
        if arr.dtype.kind in "biufc":
            return arr
    raise TypeError(f"metadata value {key!r} has unsupported type {type(value).__name__}")


def _normalize_dict(attrs: Mapping) -> dict:
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if value is None:  # "not known": leave it out rather than invent a placeholder
            continue
        key = str(key)
        if not key or "/" in key:
            raise ValueError(f"metadata key {key!r} must be non-empty and contain no '/'")
        out[key] = _normalize_value(key, value)
    return out


def _deep_update(target: dict, source: Mapping) -> None:
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def _write_metadata(group: h5py.Group, tree: Mapping) -> None:
    for key, value in tree.items():
        if isinstance(value, dict):
            _write_metadata(group.require_group(key), value)
        elif isinstance(value, np.ndarray) and value.dtype == object:
            group.attrs.create(key, value, dtype=h5py.string_dtype())
        elif isinstance(value, np.ndarray) and value.nbytes > _MAX_ATTR_BYTES:
            group.create_dataset(key, data=value, compression="gzip", compression_opts=1)
        else:
            group.attrs[key] = value


def _plain(value: Any) -> Any:
    """Attribute values as plain Python where that is lossless (numpy scalars, bytes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _read_metadata(group: h5py.Group) -> dict:
    out: dict[str, Any] = {key: _plain(value) for key, value in group.attrs.items()}
    for key, item in group.items():
        if isinstance(item, h5py.Group):
            out[key] = _read_metadata(item)
        elif isinstance(item, h5py.Dataset):
            out[key] = item[()]
    return out


# --------------------------------------------------------------------------------------------
# writer


class SparseCountsWriter:
    """Writes a counted scan incrementally, frames in any order, without holding the scan in memory.

    Produces ``/electron_events/frames`` (1-D vlen ``uint32`` of length
    ``n_positions * frames_per_position``; attributes ``Nx`` = frame_shape[0] (rows) and
    ``Ny`` = frame_shape[1] (cols), exactly as stempy writes them, see the module docstring),
    ``/electron_events/scan_positions`` (``int64`` arange, attributes ``Nx`` = scan cols,
    ``Ny`` = scan rows), root attribute ``version`` = 3 and the ``/metadata`` groups.

    ``scan_shape`` and ``frame_shape`` are (rows, cols). Slot ``position * frames_per_position + j``
    holds frame ``j`` of position ``position = row * scan_cols + col``.

    Everything goes to ``path + '.partial'``; :meth:`close` renames it to ``path`` atomically, so a
    crash never leaves a file at ``path``. Slots never written read back as empty frames; the
    ledger in ``/metadata/stemstream/ledger`` (mask ``written``, shape (n_positions, F)) tells
    them apart from frames that really had no electrons.

    Memory: at most ``flush_frames`` frames (plus the current call's batch) are buffered, and a
    bitmap of one byte per slot is kept.

    Use as a context manager: leaving the block normally calls :meth:`close`, leaving it with an
    exception calls :meth:`abort`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        scan_shape: tuple[int, int],
        frame_shape: tuple[int, int] = DEFAULT_FRAME_SHAPE,
        frames_per_position: int = 1,
        flush_frames: int = 4096,
        *,
        overwrite: bool = False,
    ) -> None:
        """Open ``path + '.partial'`` for writing.

        scan_shape, frame_shape: (rows, cols). overwrite: if False (default), refuse to start when
        a file already exists at ``path`` (FileExistsError), so a re-run cannot silently replace
        a finished scan; if True, close() replaces it.
        """
        self.scan_shape = _shape2("scan_shape", scan_shape)
        self.frame_shape = _shape2("frame_shape", frame_shape)
        self.frames_per_position = int(frames_per_position)
        if self.frames_per_position < 1:
            raise ValueError(f"frames_per_position must be >= 1, got {frames_per_position!r}")
        self.flush_frames = int(flush_frames)
        if self.flush_frames < 1:
            raise ValueError(f"flush_frames must be >= 1, got {flush_frames!r}")

        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} already exists (pass overwrite=True to replace it)")

        self.n_positions = self.scan_shape[0] * self.scan_shape[1]
        self.n_slots = self.n_positions * self.frames_per_position
        self._n_pixels = self.frame_shape[0] * self.frame_shape[1]
        # One byte per slot: 1 MiB for a 1024 x 1024 scan; gives duplicate detection and the ledger.
        self._written = np.zeros(self.n_slots, dtype=np.uint8)
        self._slots_written = 0
        self._events_written = 0
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (slots, flat, offsets)
        self._pending_frames = 0
        self._metadata: dict[str, Any] = {}
        self._created_utc = _utc_now()
        self._closed = False

        # "w" truncates a stale partial left by a crash; HDF5's file locking still refuses a
        # partial that another live writer holds open.
        self._file = h5py.File(self.tmp_path, "w")
        try:
            self._file.attrs["version"] = FORMAT_VERSION
            events = self._file.create_group("electron_events")
            positions = events.create_dataset("scan_positions", data=np.arange(self.n_positions, dtype=np.int64))
            positions.attrs["Nx"] = self.scan_shape[1]  # scan cols
            positions.attrs["Ny"] = self.scan_shape[0]  # scan rows
            # Contiguous like stempy's own files: measured as fast as chunked layouts for both
            # in-order and scattered slice writes, and unwritten entries read back empty.
            self._frames = events.create_dataset("frames", shape=(self.n_slots,), dtype=_VLEN_UINT32)
            self._frames.attrs["Nx"] = self.frame_shape[0]  # stempy's convention: rows
            self._frames.attrs["Ny"] = self.frame_shape[1]
        except BaseException:
            self._file.close()
            self.tmp_path.unlink(missing_ok=True)
            raise

    # -- properties ------------------------------------------------------------------------

    @property
    def slots_written(self) -> int:
        """Number of frames accepted so far (buffered or on disk)."""
        return self._slots_written

    @property
    def events_written(self) -> int:
        """Number of electron events accepted so far (buffered or on disk)."""
        return self._events_written

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def h5file(self) -> h5py.File:
        """The open (temporary) file, for groups of other writers beside ``/electron_events``
        and ``/metadata`` (e.g. ``/analysis``) before :meth:`close` renames it into place."""
        self._check_open()
        return self._file

    # -- writing ---------------------------------------------------------------------------

    def write(self, slots: np.ndarray, events: Sequence[np.ndarray]) -> None:
        """Accept frames: ``events[i]`` (1-D sorted unique flat pixel indices) is the frame of
        ``slots[i]``. Slots may come in any order across and within calls.

        The arrays are copied, so the caller may reuse its buffers. Raises ValueError, and
        accepts nothing from this call, if a slot is out of range or was already written (in this
        or an earlier call; a frame is written once), if ``len(events) != len(slots)``, or if an
        event list is not strictly increasing or holds a pixel outside the frame.
        """
        self._check_open()
        slots = self._as_slots(slots)
        if len(events) != len(slots):
            raise ValueError(f"got {len(slots)} slots but {len(events)} event arrays")
        arrays = [np.asarray(e) for e in events]
        for a in arrays:
            if a.ndim != 1:
                raise ValueError(f"each frame's events must be a 1-D array, got shape {a.shape}")
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([a.size for a in arrays], out=offsets[1:])
        # One concatenation = one copy owned by us; the frames become views into it.
        flat = np.concatenate(arrays) if arrays else np.empty(0, np.uint32)
        self._accept(slots, flat, offsets)

    def write_flat(self, slots: np.ndarray, events_flat: np.ndarray, offsets: np.ndarray) -> None:
        """Like :meth:`write`, with frame ``i`` = ``events_flat[offsets[i]:offsets[i + 1]]``
        (``offsets`` has ``len(slots) + 1`` non-decreasing entries), the counting kernel's layout.
        ``events_flat`` is copied, so the caller may reuse it."""
        self._check_open()
        slots = self._as_slots(slots)
        events_flat = np.asarray(events_flat)
        offsets = np.asarray(offsets)
        if events_flat.ndim != 1:
            raise ValueError(f"events_flat must be 1-D, got shape {events_flat.shape}")
        if offsets.ndim != 1 or len(offsets) != len(slots) + 1:
            raise ValueError(f"offsets must have len(slots) + 1 = {len(slots) + 1} entries, got shape {offsets.shape}")
        if len(slots) == 0:
            return
        if offsets.dtype.kind not in "iu":
            raise ValueError(f"offsets must be integers, got dtype {offsets.dtype}")
        offsets = offsets.astype(np.int64)
        if offsets[0] < 0 or offsets[-1] > events_flat.size or np.any(np.diff(offsets) < 0):
            raise ValueError("offsets must be non-decreasing and within events_flat")
        start = offsets[0]
        flat = events_flat[start : offsets[-1]].copy()
        self._accept(slots, flat, offsets - start)

    def _as_slots(self, slots: np.ndarray) -> np.ndarray:
        slots = np.asarray(slots)
        if slots.ndim != 1 or (slots.size and slots.dtype.kind not in "iu"):
            raise ValueError(f"slots must be a 1-D integer array, got dtype {slots.dtype} shape {slots.shape}")
        return slots.astype(np.int64)

    def _accept(self, slots: np.ndarray, flat: np.ndarray, offsets: np.ndarray) -> None:
        """Validate a batch completely, then buffer it; nothing is changed if validation fails."""
        n = len(slots)
        if n == 0:
            return
        bad = (slots < 0) | (slots >= self.n_slots)
        if bad.any():
            raise ValueError(f"slot {int(slots[bad][0])} is out of range 0..{self.n_slots - 1}")
        if self._written[slots].any():
            first = int(slots[self._written[slots].astype(bool)][0])
            raise ValueError(f"slot {first} was already written")
        uniq, counts = np.unique(slots, return_counts=True)
        if len(uniq) != n:
            raise ValueError(f"slot {int(uniq[counts > 1][0])} appears twice in one call")

        if flat.size:
            if flat.dtype.kind not in "iu":
                raise ValueError(f"events must be integer pixel indices, got dtype {flat.dtype}")
            if (flat.dtype.kind == "i" and flat.min() < 0) or flat.max() >= self._n_pixels:
                raise ValueError(f"an event lies outside the {self.frame_shape[0]} x {self.frame_shape[1]} frame")
            # Strictly increasing inside each frame (stempy's data are sorted sets); a step down
            # is allowed only where a new frame starts. Vectorised: ~1 ms per 4096 frames.
            steps_ok = flat[1:] > flat[:-1]
            if not steps_ok.all():
                starts = offsets[1:-1]
                boundary = np.zeros(flat.size - 1, dtype=bool)
                boundary[starts[(starts > 0) & (starts < flat.size)] - 1] = True
                if not (steps_ok | boundary).all():
                    raise ValueError("each frame's events must be strictly increasing (sorted, no repeats)")
        if flat.dtype != np.uint32:
            flat = flat.astype(np.uint32)

        self._written[slots] = 1
        self._slots_written += n
        self._events_written += int(flat.size)
        self._pending.append((slots, flat, offsets))
        self._pending_frames += n
        if self._pending_frames >= self.flush_frames:
            self._flush()

    def _flush(self) -> None:
        """Write the buffered frames: sorted by slot, one slice assignment per run of
        consecutive slots (h5py's per-call overhead makes element-wise writes slow)."""
        if not self._pending:
            return
        slots = np.concatenate([p[0] for p in self._pending])
        # dtype carries h5py's vlen tag, so the low-level write knows the memory type.
        frames = np.empty(len(slots), dtype=_VLEN_UINT32)
        i = 0
        for _, flat, offsets in self._pending:
            # Element-wise on purpose: assigning a list of equal-length arrays to an object
            # array slice would make numpy build a 2-D array instead.
            for k in range(len(offsets) - 1):
                frames[i] = flat[offsets[k] : offsets[k + 1]]
                i += 1
        order = np.argsort(slots, kind="stable")
        slots = slots[order]
        frames = frames[order]
        run_starts = np.flatnonzero(np.diff(slots) != 1) + 1
        bounds = np.concatenate(([0], run_starts, [len(slots)]))
        for a, b in zip(bounds[:-1], bounds[1:]):
            self._write_run(int(slots[a]), frames[a:b])
        self._pending.clear()
        self._pending_frames = 0

    def _write_run(self, start: int, frames: np.ndarray) -> None:
        """Write consecutive slots ``start ..`` with h5py's low-level API.

        Not ``dataset[a:b] = frames``: h5py 3.16's __setitem__ first re-packs an object array
        with np.array(..., dtype=object), which turns a run whose frames all have the same
        length (one frame, all empty, all one event, ...) into a 2-D array and fails with
        "Can't broadcast (n, k) -> (n,)"; it also copies every frame. stempy's own
        write_to_hdf5 goes through that path (see the tests' notes).
        """
        fspace = self._frames.id.get_space()
        fspace.select_hyperslab((start,), (len(frames),))
        mspace = h5py.h5s.create_simple((len(frames),))
        self._frames.id.write(mspace, fspace, frames)

    def flush(self) -> None:
        """Write buffered frames now and ask HDF5 to push its buffers to the partial file."""
        self._check_open()
        self._flush()
        self._file.flush()

    # -- metadata --------------------------------------------------------------------------

    def set_metadata(self, group: str, attrs: Mapping[str, Any]) -> None:
        """Record attributes for ``/metadata/<group>`` (written at close; later calls merge).

        ``group`` may be nested with '/', e.g. ``'stemstream/timing'``; ``''`` means ``/metadata``
        itself. Values: numbers, bools, strings, paths, datetimes (stored as ISO strings), numpy
        arrays / lists of numbers or strings; a dict value becomes a sub-group; None is skipped.
        Arrays over 32 KiB are stored as datasets (stempy's loader ignores datasets in /metadata).
        Our own ``stemstream`` entries (software_version, times, ledger) are written first, so a
        value set here under the same name replaces them.
        """
        self._check_open()
        node = self._metadata
        for part in (p for p in str(group).split("/") if p):
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        _deep_update(node, _normalize_dict(attrs))

    def _ledger(self) -> dict:
        per_position = self._written.reshape(self.n_positions, self.frames_per_position)
        n_done = per_position.sum(axis=1, dtype=np.int64)
        complete = int(np.count_nonzero(n_done == self.frames_per_position))
        missing = int(np.count_nonzero(n_done == 0))
        return {
            "frames_per_position": self.frames_per_position,
            "positions": self.n_positions,
            "positions_complete": complete,
            "positions_incomplete": self.n_positions - complete - missing,
            "positions_missing": missing,
            "frames_expected": self.n_slots,
            "frames_written": self._slots_written,
            "events_written": self._events_written,
            # An empty frame may be a real zero-electron frame or a missing one; this says which.
            "written": per_position.copy(),
        }

    # -- finishing -------------------------------------------------------------------------

    def close(self) -> Path:
        """Flush, write the metadata, close and rename the partial file to ``path``; returns it.

        Calling it again returns the path. If it fails, the partial file is left for inspection.
        """
        if self._closed:
            return self.path
        self._flush()
        tree: dict[str, Any] = {
            "stemstream": {
                "software_version": SOFTWARE_VERSION,
                "writer": f"{__name__}.{type(self).__name__}",
                "created_utc": self._created_utc,
                "closed_utc": _utc_now(),
                "ledger": self._ledger(),
            }
        }
        _deep_update(tree, self._metadata)
        _write_metadata(self._file.require_group("metadata"), tree)
        self._file.close()
        self._closed = True
        # Data on disk before the name: otherwise a power cut could leave a finished-looking name
        # pointing at incomplete contents.
        _fsync_path(self.tmp_path)
        os.replace(self.tmp_path, self.path)
        _fsync_path(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Discard everything: close and delete the partial file. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        try:
            self._file.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"writer for {self.path} is closed")

    def __enter__(self) -> SparseCountsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"SparseCountsWriter({str(self.path)!r}, scan_shape={self.scan_shape}, "
            f"frame_shape={self.frame_shape}, frames_per_position={self.frames_per_position}, "
            f"{self._slots_written}/{self.n_slots} frames, {state})"
        )


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# reader


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

    def to_stempy(self):
        """The same data as a ``stempy.io.SparseArray`` (needs stempy installed)."""
        from stempy.io import SparseArray

        return SparseArray(
            data=self.frames, scan_shape=self.scan_shape, frame_shape=self.frame_shape, metadata=self.metadata
        )


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


def read_counted(path: str | os.PathLike) -> CountedScan:
    """Read a counted file: version 3 (ours and stempy's), and versions 1 and 2 converted.

    Returns a :class:`CountedScan` with scan_shape and frame_shape as (rows, cols). Raises
    CountedFileError (a ValueError) with one sentence naming the path for a missing file, a
    non-HDF5 file or a wrong layout.
    """
    p = Path(path)

    def fail(what: str) -> CountedFileError:
        return CountedFileError(f"{p} is not a readable counted file: {what}.")

    if not p.exists():
        raise fail("it does not exist")
    if not p.is_file():
        raise fail("it is not a regular file")
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise fail(f"it cannot be opened as HDF5 ({reason})") from exc

    with f:
        try:
            version = int(f.attrs.get("version", 1))
        except (TypeError, ValueError):
            raise fail(f"its root attribute 'version' is {f.attrs.get('version')!r}, not an integer") from None
        if version not in (1, 2, 3):
            raise fail(f"format version {version} is not supported (only 1, 2 and 3)")
        events = f.get("electron_events")
        if not isinstance(events, h5py.Group):
            raise fail("it has no /electron_events group")
        frames_ds = events.get("frames")
        positions_ds = events.get("scan_positions")
        if not isinstance(frames_ds, h5py.Dataset) or not isinstance(positions_ds, h5py.Dataset):
            raise fail("it lacks the /electron_events/frames or /electron_events/scan_positions dataset")
        base = h5py.check_vlen_dtype(frames_ds.dtype)
        if base is None or np.dtype(base).kind not in "iu" or frames_ds.ndim != 1:
            raise fail(
                f"/electron_events/frames is {frames_ds.dtype} with shape {frames_ds.shape}, "
                "not a 1-D variable-length integer dataset"
            )
        try:
            scan_shape = (int(positions_ds.attrs["Ny"]), int(positions_ds.attrs["Nx"]))  # (rows, cols)
            frame_shape = (int(frames_ds.attrs["Nx"]), int(frames_ds.attrs["Ny"]))  # stempy: Nx = rows
        except KeyError as exc:
            raise fail(f"the attribute {exc.args[0]!r} is missing on /electron_events") from None
        if min(scan_shape) <= 0 or min(frame_shape) <= 0:
            raise fail(f"scan shape {scan_shape} or frame shape {frame_shape} is not positive")
        n_positions = scan_shape[0] * scan_shape[1]
        n_entries = frames_ds.shape[0]

        if version == 3 and (n_entries == 0 or n_entries % n_positions):
            raise fail(
                f"/electron_events/frames has {n_entries} entries, "
                f"not a multiple of the {n_positions} scan positions"
            )

        data = np.empty(n_entries, dtype=object)
        for a in range(0, n_entries, _READ_BLOCK):
            b = min(a + _READ_BLOCK, n_entries)
            data[a:b] = frames_ds[a:b]
        if np.dtype(base) != np.uint32:
            for i in range(n_entries):
                data[i] = data[i].astype(np.uint32)

        if version < 3:
            positions = np.asarray(positions_ds[()], dtype=np.int64).ravel()
            if len(positions) != n_entries:
                if version == 2:
                    raise fail(f"it has {n_entries} frames but {len(positions)} scan positions")
                positions = np.arange(n_entries, dtype=np.int64)  # stempy's fallback for v1
            if n_entries and (positions.min() < 0 or positions.max() >= n_positions):
                raise fail(f"a scan position lies outside the {scan_shape[0]} x {scan_shape[1]} scan")

        metadata = _read_metadata(f["metadata"]) if isinstance(f.get("metadata"), h5py.Group) else {}

    if version == 3:
        frames = data.reshape(n_positions, n_entries // n_positions)
    else:
        if version == 1:
            split, positions = _split_v1(data, positions)
            data = np.empty(len(split), dtype=object)
            for i, d in enumerate(split):
                data[i] = d
        frames = _group_by_position(data, positions, n_positions)
    return CountedScan(
        frames=frames, scan_shape=scan_shape, frame_shape=frame_shape, metadata=metadata, version=version
    )


__all__ = [
    "CountedFileError",
    "CountedScan",
    "ELECTRON_COUNTING_ATTRS",
    "FORMAT_VERSION",
    "SparseCountsWriter",
    "read_counted",
]
