"""Raw 4D Camera sector records (header version 5), as the four receivers write them.

A raw file is a plain concatenation of records, no file header, no padding. One record is one
sector of one frame: a HEADER_DTYPE header followed by the sector's SECTOR_SHAPE ``uint16``
pixels, little-endian. Sector ``k`` (the module number) fills frame rows ``sector_rows(k)``. The
geometry is core.detector's, re-exported here for readers of this format.

File names follow the receivers: ``data_scan{scan:010d}_module{m}_dst{d}_file{f}.data``; the
module number is read from the name (``module(\\d+)``) and nowhere else. Headers are read by
raw_pread.read_headers.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stemstream.core.detector import (  # noqa: F401  (the geometry, re-exported for readers of this format)
    FRAME_COLS,
    FRAME_ROWS,
    FRAME_SHAPE,
    HEADER_BYTES,
    HEADER_DTYPE,
    N_MODULES,
    RECORD_BYTES,
    RECORD_DTYPE,
    SECTOR_BYTES,
    SECTOR_PIXELS,
    SECTOR_ROWS,
    SECTOR_SHAPE,
    sector_rows,
)

_MODULE_IN_NAME = re.compile(r"module(\d+)")


class RawFormatError(ValueError):
    """A raw file or record that cannot be read as header-v5 4D Camera data."""


def raw_file_name(scan_number: int, module: int, dst: int = 0, file_index: int = 0) -> str:
    """The receivers' name for one raw file of one module."""
    return f"data_scan{scan_number:010d}_module{module}_dst{dst}_file{file_index}.data"


def module_of_path(path: str | Path) -> int:
    """The module (sector) number written in a raw file's name.

    Raises RawFormatError if the name carries no module number or one outside 0..3.
    """
    name = Path(path).name
    match = _MODULE_IN_NAME.search(name)
    if match is None:
        raise RawFormatError(f"{path}: file name carries no module number (expected 'module<N>' in the name)")
    module = int(match.group(1))
    if not 0 <= module < N_MODULES:
        raise RawFormatError(f"{path}: module {module} in the file name is outside 0..{N_MODULES - 1}")
    return module


def discover_raw_files(paths: list[str | Path]) -> list[Path]:
    """Expand directories into their ``*.data`` files; keep files as given.

    Raises RawFormatError for a path that does not exist or a directory with no raw file.
    """
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files = sorted(p for p in path.glob("*.data") if p.is_file())
            if not files:
                raise RawFormatError(f"{path}: directory holds no raw '*.data' file")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise RawFormatError(f"{path}: no such file or directory")
    return found


@dataclass(frozen=True)
class RawFileLayout:
    """How many whole records a raw file holds, and whether it ends in a truncated one."""

    path: Path
    module: int
    n_records: int
    trailing_bytes: int  # bytes after the last whole record (a truncated record when > 0)

    @property
    def truncated_offset(self) -> int | None:
        """Byte offset of the truncated trailing record, or None if the file ends cleanly."""
        return self.n_records * RECORD_BYTES if self.trailing_bytes else None


def inspect_raw_file(path: str | Path) -> RawFileLayout:
    """Size up a raw file without reading its pixels. Raises RawFormatError for a bad name."""
    path = Path(path)
    module = module_of_path(path)
    size = path.stat().st_size
    return RawFileLayout(path, module, size // RECORD_BYTES, size % RECORD_BYTES)


class RawModuleWriter:
    """Appends sector records of one module to raw files, starting a new file every
    ``records_per_file`` records (the receivers split their streams the same way)."""

    def __init__(self, out_dir: str | Path, scan_number: int, module: int, records_per_file: int = 4096, dst: int = 0):
        if not 0 <= module < N_MODULES:
            raise ValueError(f"module {module} outside 0..{N_MODULES - 1}")
        self.out_dir = Path(out_dir)
        self.scan_number = scan_number
        self.module = module
        self.dst = dst
        self.records_per_file = max(1, int(records_per_file))
        self.paths: list[Path] = []
        self._file = None
        self._in_file = 0
        self.records_written = 0

    def _next_file(self) -> None:
        if self._file is not None:
            self._file.close()
        path = self.out_dir / raw_file_name(self.scan_number, self.module, self.dst, len(self.paths))
        self.paths.append(path)
        self._file = open(path, "wb")
        self._in_file = 0

    def write(self, records: np.ndarray) -> None:
        """Append records (a RECORD_DTYPE array) in the order given."""
        if records.dtype != RECORD_DTYPE:
            raise TypeError("records must be a RECORD_DTYPE array")
        start = 0
        while start < len(records):
            if self._file is None or self._in_file >= self.records_per_file:
                self._next_file()
            take = min(len(records) - start, self.records_per_file - self._in_file)
            self._file.write(memoryview(np.ascontiguousarray(records[start : start + take])).cast("B"))
            self._in_file += take
            self.records_written += take
            start += take

    def flush(self) -> None:
        """Hand what was written to the operating system (readable by others; not fsync)."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RawModuleWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_sector_records(
    scan_number: int,
    frame_numbers: np.ndarray,
    scan_shape: tuple[int, int],
    positions: np.ndarray,
    frames: np.ndarray,
    module: int,
) -> np.ndarray:
    """Cut the sector ``module`` out of each frame and give it its header.

    scan_shape is (rows, cols) of the scan; positions are flat scan positions ``y * cols + x``;
    frames is (n, *FRAME_SHAPE) ``uint16``, (rows, cols). Returns a RECORD_DTYPE array.
    """
    rows, cols = scan_shape
    n = len(frame_numbers)
    records = np.empty(n, RECORD_DTYPE)
    header = records["header"]
    header["scan_number"] = scan_number
    header["frame_number"] = frame_numbers
    header["scan_width"] = cols
    header["scan_height"] = rows
    header["x"] = positions % cols
    header["y"] = positions // cols
    records["data"] = frames[:, sector_rows(module)]
    return records


def write_status_file(out_dir: str | Path, receiver: int, scan_number: int, progress: int, run_uuid: str | None = None) -> Path:
    """Write a receiver status file ``4dstem_rec_status_{receiver}_scan_{N}.json`` as receivers do."""
    path = Path(out_dir) / f"4dstem_rec_status_{receiver}_scan_{scan_number}.json"
    status = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "last_scan_number": scan_number,
        "progress": int(progress),
        "UUID": run_uuid or str(uuid.uuid4()),
    }
    path.write_text(json.dumps(status))
    return path
