"""The NCEM 4D Camera as every part of stemstream sees it: frame and sector geometry, the
receivers' record layout, and the limits its headers put on a scan.

This is the one place these numbers are written. A frame is 576 x 576 ``uint16`` pixels,
(rows, cols); it is read out as 4 horizontal sectors of 144 rows (one per module, one module per
receiver server). On the wire and on disk each sector travels as one *record*: a 16-byte header
(header version 5) followed by the sector's pixels, little-endian (formats.md).
"""

from __future__ import annotations

import numpy as np

FRAME_ROWS = 576
FRAME_COLS = 576
FRAME_SHAPE = (FRAME_ROWS, FRAME_COLS)  # (rows, cols)
FRAME_PIXELS = FRAME_ROWS * FRAME_COLS
N_MODULES = 4  # sectors per frame = modules = receiver servers
MODULES = tuple(range(N_MODULES))
SECTOR_ROWS = FRAME_ROWS // N_MODULES  # 144
SECTOR_SHAPE = (SECTOR_ROWS, FRAME_COLS)  # (rows, cols)
SECTOR_PIXELS = SECTOR_ROWS * FRAME_COLS  # 82,944
SECTOR_BYTES = SECTOR_PIXELS * 2  # 165,888

HEADER_DTYPE = np.dtype(
    [
        ("scan_number", "<u4"),
        ("frame_number", "<u4"),
        ("scan_width", "<u2"),  # positions per row (scan columns)
        ("scan_height", "<u2"),  # scan rows
        ("x", "<u2"),  # column of the scan position
        ("y", "<u2"),  # row of the scan position
    ]
)
HEADER_BYTES = HEADER_DTYPE.itemsize  # 16
RECORD_DTYPE = np.dtype([("header", HEADER_DTYPE), ("data", "<u2", SECTOR_SHAPE)])
RECORD_BYTES = RECORD_DTYPE.itemsize  # 165,904

# The header's scan_width / scan_height / x / y are uint16: no scan side can exceed this.
MAX_SCAN_SIDE = 65535
# Frame and scan numbers are uint32.
MAX_FRAME_NUMBER = 0xFFFFFFFF
MAX_SCAN_NUMBER = 0xFFFFFFFF
# Node-group ids travel as uint16 in envelopes.
MAX_NODE_ID = 65535


def sector_rows(module: int) -> slice:
    """The frame rows that sector ``module`` fills (header version 5: horizontal stripes)."""
    return slice(module * SECTOR_ROWS, (module + 1) * SECTOR_ROWS)
