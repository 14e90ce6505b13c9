"""A scan on disk: the receivers' module files, indexed by frame number and read back as frames.

Opening a scan reads only the headers of every record (one compiled ``pread`` each, see raw_pread)
and builds a frame table: for each frame number, which file and record hold each of its N_MODULES
sectors. :meth:`RawScan.read_frames` then reads frames straight from the files into a buffer with
``preadv`` (one system call per run of consecutive records); offline counting reads them inside its
compiled threads instead (counting.from_files). Memory stays at a few frames whatever the scan
size; the index keeps 68 bytes per frame (<3% of the counted events it yields; 1.1 GB for a
4096 x 4096 scan) and needs ~200 while it is built. Nothing is held per frame or position in
Python lists: scan sizes are limited by the headers' uint16 sides and uint32 frame numbers only.

Bad records never stop the scan: they are rejected with a reason in the ledger and a log line
naming the file and byte offset. What cannot be read at all (no raw file, a name without a module
number, a file that is not readable) raises RawFormatError with one sentence.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from stemstream.core.detector import FRAME_SHAPE, HEADER_BYTES, N_MODULES, RECORD_BYTES, sector_rows
from stemstream.formats.ledger import ScanLedger
from stemstream.formats.raw import RawFileLayout, RawFormatError, discover_raw_files, inspect_raw_file
from stemstream.formats.raw_pread import read_headers

log = logging.getLogger(__name__)

# Log at most this many rejected records one by one per reason; the ledger counts them all.
_LOG_EACH = 5
# preadv takes at most IOV_MAX (1024 on Linux) buffers: a sector and a header skip per record.
_MAX_RUN = 500


@dataclass
class FrameTable:
    """The frames of a scan in frame-number order.

    source_file / source_record are (n_frames, N_MODULES): the file index and record index holding each
    module's sector, -1 where the sector is missing. slot is ``position * frames_per_position + j``,
    j counting the frames of one position in frame-number order.
    """

    frame_numbers: np.ndarray  # (n,) uint32
    positions: np.ndarray  # (n,) int64, y * cols + x
    source_file: np.ndarray  # (n, N_MODULES) int32
    source_record: np.ndarray  # (n, N_MODULES) int64
    slots: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.frame_numbers)

    @property
    def complete(self) -> np.ndarray:
        """(n,) bool: all N_MODULES sectors present."""
        return (self.source_file >= 0).all(axis=1)


@dataclass
class FrameBatchRead:
    """A batch of frames read from disk: rows index into the scan's FrameTable."""

    start: int  # index of the first frame in the FrameTable
    frames: np.ndarray  # (n, *FRAME_SHAPE) uint16, (rows, cols); missing sectors zero-filled
    frame_numbers: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    present: np.ndarray  # (n, N_MODULES) bool


def _majority(columns: list[np.ndarray]) -> int:
    """The value most entries of ``columns`` (one array per file) hold; the smallest of a tie."""
    counted = [np.unique(column, return_counts=True) for column in columns]
    values, inverse = np.unique(np.concatenate([v for v, _ in counted]), return_inverse=True)
    totals = np.bincount(inverse, weights=np.concatenate([c for _, c in counted]))
    return int(values[np.argmax(totals)])


def _rank_at_position(positions: np.ndarray) -> np.ndarray:
    """For frames in frame-number order, how many earlier frames share each one's position: its
    j in the slot ``position * frames_per_position + j``."""
    by_position = np.argsort(positions, kind="stable")  # frame-number order within a position
    sorted_pos = positions[by_position]
    new_run = np.r_[True, sorted_pos[1:] != sorted_pos[:-1]]
    run_start = np.flatnonzero(new_run)
    run_id = np.cumsum(new_run) - 1
    j = np.empty(len(positions), np.int64)
    j[by_position] = np.arange(len(positions)) - run_start[run_id]
    return j


@dataclass
class _Sectors:
    """Sector records accepted while indexing, as parallel arrays (one entry per record, 25
    bytes). Reordered and filtered in place, one array at a time, so that indexing a scan holds
    one copy of them plus one array's worth."""

    file_ids: np.ndarray  # int32, index into RawScan.paths
    records: np.ndarray  # int64, record index within that file
    frame_numbers: np.ndarray  # uint32
    positions: np.ndarray  # int64, y * cols + x
    modules: np.ndarray  # int8

    def __len__(self) -> int:
        return len(self.records)

    @staticmethod
    def empty(n: int) -> _Sectors:
        return _Sectors(np.empty(n, np.int32), np.empty(n, np.int64), np.empty(n, np.uint32),
                        np.empty(n, np.int64), np.empty(n, np.int8))

    def keep(self, index: np.ndarray) -> None:
        """Keep only the entries at ``index`` (indices or a bool mask), in its order."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name)[index])


class RawScan:
    """A scan's raw module files, indexed. ``paths`` may be files and directories (all
    ``*.data`` files in them); files of one module may come in any order.

    Raises RawFormatError when no usable record is found or a file cannot be read.
    """

    def __init__(self, paths: list[str | Path]):
        files = discover_raw_files(paths)
        self.layouts = [inspect_raw_file(p) for p in files]
        self.paths = [layout.path for layout in self.layouts]
        self._fds: list[int] = []
        self._index()

    # -- indexing --------------------------------------------------------------------------------

    def _log_rejects(self, reason: str, path: Path, offsets: np.ndarray, detail: str) -> None:
        for off in offsets[:_LOG_EACH]:
            log.warning("rejected record (%s) in %s at byte offset %d: %s", reason, path, int(off), detail)
        if len(offsets) > _LOG_EACH:
            log.warning("rejected %d more records (%s) in %s", len(offsets) - _LOG_EACH, reason, path)

    def _index(self) -> None:
        """Read every header, accept the scan's records, and build the frame table and ledger.

        Memory (measured by tests/unit/test_raw_scan.py): ~200 bytes a frame at the peak (the
        headers, then the sectors, then the table), 68 bytes a frame kept in the table."""
        headers = self._read_headers()
        self._identify_scan(headers)
        sectors = self._accept_records(headers)
        del headers  # the sectors hold what is needed of them
        if len(sectors) == 0:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.ledger.rejected_reasons.items()))
            raise RawFormatError(f"every sector record in the raw files given was rejected ({reasons}); "
                                 "see the log lines above for files and byte offsets")
        self._drop_duplicates(sectors)
        frame_numbers, positions, source_file, source_record = self._frames_of(sectors)
        del sectors
        j = _rank_at_position(positions)
        self.frames_per_position = int(j.max()) + 1
        self.ledger.frames_per_position = self.frames_per_position
        self.table = FrameTable(frame_numbers, positions, source_file, source_record,
                                positions * self.frames_per_position + j)
        present = source_file >= 0
        for m in range(N_MODULES):
            self.ledger.sectors_received[m] += int(present[:, m].sum())
            self.ledger.sectors_missing[m] += int((~present[:, m]).sum())

    def _read_headers(self) -> list[np.ndarray]:
        """Every whole record's header, one array per file; RawFormatError if there is none."""
        try:
            headers = read_headers(self.paths, [layout.n_records for layout in self.layouts])
        except OSError as exc:
            raise RawFormatError(str(exc)) from exc
        if sum(len(h) for h in headers) == 0:
            names = ", ".join(str(p) for p in self.paths[:3])
            raise RawFormatError(f"no complete sector record in the raw files given ({names})")
        return headers

    def _identify_scan(self, headers: list[np.ndarray]) -> None:
        """The scan number and shape most records give (a stray record cannot change them), and
        the ledger of that scan."""
        self.scan_number = _majority([h["scan_number"] for h in headers])
        width = _majority([h["scan_width"] for h in headers])
        height = _majority([h["scan_height"] for h in headers])
        if width == 0 or height == 0:
            raise RawFormatError(f"records give an empty scan shape ({height} rows x {width} cols)")
        self.scan_shape = (height, width)  # (rows, cols)
        self.ledger = ScanLedger(self.scan_number, self.scan_shape)

    def _accept_records(self, headers: list[np.ndarray]) -> _Sectors:
        """The records of every file that belong to the scan, in file order, written straight
        into one _Sectors (no per-file parts to concatenate)."""
        good = [self._good_records(layout, hdr) for layout, hdr in zip(self.layouts, headers)]
        sectors = _Sectors.empty(sum(len(g) for g in good))
        at = 0
        width = self.scan_shape[1]
        for file_id, (layout, hdr) in enumerate(zip(self.layouts, headers)):
            rows, n = good[file_id], len(good[file_id])
            kept = hdr[rows]
            part = slice(at, at + n)
            sectors.file_ids[part] = file_id
            sectors.records[part] = rows
            sectors.frame_numbers[part] = kept["frame_number"]
            np.add(kept["y"].astype(np.int64) * width, kept["x"], out=sectors.positions[part])
            sectors.modules[part] = layout.module
            good[file_id] = None  # (each file's indices go as soon as they are copied)
            at += n
        return sectors

    def _good_records(self, layout: RawFileLayout, hdr: np.ndarray) -> np.ndarray:
        """The indices of one file's records that belong to the scan; the others are rejected
        (ledger and log), each for the first reason that applies."""
        m = layout.module
        height, width = self.scan_shape
        if layout.truncated_offset is not None:
            self.ledger.reject("truncated_record", m)
            self._log_rejects("truncated_record", layout.path, np.array([layout.truncated_offset]),
                              f"only {layout.trailing_bytes} of {RECORD_BYTES} bytes")
        offsets = np.arange(len(hdr), dtype=np.int64) * RECORD_BYTES
        checks = [
            ("other_scan_number", hdr["scan_number"] != self.scan_number,
             f"scan number differs from the scan's {self.scan_number}"),
            ("scan_shape_mismatch", (hdr["scan_width"] != width) | (hdr["scan_height"] != height),
             f"scan shape differs from the scan's {height} rows x {width} cols"),
            ("position_out_of_bounds", (hdr["x"] >= width) | (hdr["y"] >= height),
             f"scan position outside the {height} x {width} scan"),
        ]
        bad = np.zeros(len(hdr), bool)
        for reason, mask, detail in checks:
            mask = mask & ~bad  # one reason per record
            if mask.any():
                self.ledger.reject(reason, m, int(mask.sum()))
                self._log_rejects(reason, layout.path, offsets[mask], detail)
            bad |= mask
        return np.flatnonzero(~bad)

    def _drop_duplicates(self, sectors: _Sectors) -> None:
        """Sort ``sectors`` by (frame number, module) and keep one record of each: the first copy
        in file order wins (the sort is stable), the others are counted as duplicates."""
        sectors.keep(np.lexsort((sectors.modules, sectors.frame_numbers)))
        frames, modules = sectors.frame_numbers, sectors.modules
        dup = np.zeros(len(sectors), bool)
        dup[1:] = (frames[1:] == frames[:-1]) & (modules[1:] == modules[:-1])
        if dup.any():
            for m, n in enumerate(np.bincount(modules[dup], minlength=N_MODULES)):
                self.ledger.sectors_duplicate[m] += int(n)
            log.warning("%d duplicate sector records ignored (the first copy of each is used)", int(dup.sum()))
            sectors.keep(~dup)

    def _frames_of(self, sectors: _Sectors) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The frames of unique sectors sorted by (frame number, module): their numbers, scan
        positions (their first sector's: sectors normally agree), and the file and record of each
        module's sector, (n, N_MODULES), -1 where it is missing."""
        first_sector = np.flatnonzero(np.r_[True, sectors.frame_numbers[1:] != sectors.frame_numbers[:-1]])
        frame_index = np.repeat(np.arange(len(first_sector)), np.diff(np.r_[first_sector, len(sectors)]))
        frame_numbers = sectors.frame_numbers[first_sector]
        positions = sectors.positions[first_sector]
        # (before the tables are made: its temporary arrays and theirs are not held at once)
        disagree = int(np.count_nonzero(sectors.positions != positions[frame_index]))
        if disagree:
            log.warning("%d sectors give another scan position than the first sector of their frame; "
                        "the first sector's position is used", disagree)
            self.ledger.rejected_reasons["position_disagrees_within_frame"] += disagree
        source_file = np.full((len(first_sector), N_MODULES), -1, np.int32)
        source_record = np.full((len(first_sector), N_MODULES), -1, np.int64)
        source_file[frame_index, sectors.modules] = sectors.file_ids
        source_record[frame_index, sectors.modules] = sectors.records
        return frame_numbers, positions, source_file, source_record

    # -- reading -----------------------------------------------------------------------------------

    @property
    def n_frames(self) -> int:
        return len(self.table)

    def _open(self) -> None:
        if not self._fds:
            self._fds = [os.open(p, os.O_RDONLY) for p in self.paths]

    def file_descriptors(self) -> np.ndarray:
        """The open files' descriptors, int64, by file index (FrameTable.source_file), for
        compiled readers; valid until :meth:`close`."""
        self._open()
        return np.array(self._fds, np.int64)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> RawScan:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_frames(self, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Read the frames at ``indices`` of the FrameTable into ``out`` (k, *FRAME_SHAPE) uint16,
        (rows, cols); missing sectors are zero-filled."""
        self._open()
        indices = np.asarray(indices, np.int64)
        k = len(indices)
        if out is None:
            out = np.empty((k, *FRAME_SHAPE), np.uint16)
        skip = bytearray(HEADER_BYTES)
        for m in range(N_MODULES):
            rows = sector_rows(m)
            files = self.table.source_file[indices, m]
            recs = self.table.source_record[indices, m]
            for i in np.flatnonzero(files < 0):
                out[i, rows] = 0
            # Runs of records that follow each other in one file go in one preadv.
            i = 0
            while i < k:
                f = files[i]
                if f < 0:
                    i += 1
                    continue
                j = i + 1
                while j < k and j - i < _MAX_RUN and files[j] == f and recs[j] == recs[j - 1] + 1:
                    j += 1
                buffers = []
                for t in range(i, j):
                    if t > i:
                        buffers.append(skip)
                    buffers.append(memoryview(out[t, rows]).cast("B"))
                offset = int(recs[i]) * RECORD_BYTES + HEADER_BYTES
                os.preadv(self._fds[f], buffers, offset)
                i = j
        return out

    def batches(self, batch_size: int = 64, start: int = 0, stop: int | None = None):
        """Yield FrameBatchRead of up to ``batch_size`` frames in frame-number order. The frames
        buffer is reused between every second batch: copy what must outlive that."""
        stop = self.n_frames if stop is None else min(stop, self.n_frames)
        buffers = [np.empty((batch_size, *FRAME_SHAPE), np.uint16) for _ in range(2)]
        for n_batch, s in enumerate(range(start, stop, batch_size)):
            idx = np.arange(s, min(s + batch_size, stop))
            frames = self.read_frames(idx, buffers[n_batch % 2][: len(idx)])
            yield FrameBatchRead(
                start=s,
                frames=frames,
                frame_numbers=self.table.frame_numbers[idx],
                positions=self.table.positions[idx],
                slots=self.table.slots[idx],
                present=self.table.source_file[idx] >= 0,
            )
