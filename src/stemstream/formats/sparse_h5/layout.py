"""The facts of the counted file's layout that both the writer and the reader need (the layout
itself is described in the package docstring, stemstream.formats.sparse_h5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

FORMAT_VERSION = 3
#: Versions read_counted understands; older ones are converted to version 3's layout.
READABLE_VERSIONS = (1, 2, 3)

#: What the writer appends to the final name while the file is being written.
PARTIAL_SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    """Where the writer of the file at ``path`` writes it until it is closed."""
    return path.with_name(path.name + PARTIAL_SUFFIX)

#: ``/electron_events/frames``: one variable-length list of flat pixel indices per frame.
VLEN_UINT32 = h5py.vlen_dtype(np.uint32)

#: Optional sub-pixel positions of the events (counting methods that give them), outside
#: ``/electron_events`` so that stempy never sees them: one variable-length float32 list per
#: frame, ``row0, col0, row1, col1, ...`` for the frame's events in the order of its pixel list.
SUBPIXEL_POSITIONS = "subpixel/positions"
VLEN_FLOAT32 = h5py.vlen_dtype(np.float32)


class CountedFileError(ValueError):
    """A file that is not a readable counted file; the message names the path and the problem."""


def check_shape(name: str, shape: Any) -> tuple[int, int]:
    """``shape`` as two positive ints (rows, cols); ValueError naming ``name`` otherwise."""
    try:
        rows, cols = (int(x) for x in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (rows, cols), got {shape!r}") from None
    if rows <= 0 or cols <= 0:
        raise ValueError(f"{name} must be positive (rows, cols), got {shape!r}")
    return rows, cols
