"""The Python API for counted scans: :func:`open` a counted file (ours or stempy's) and get a
:class:`CountedFile` with the scan's facts and views that read it a block at a time.

Example::

    import stemstream

    scan = stemstream.open("FOURD_scan_00001.h5")
    scan.scan_shape, scan.frames_per_position, scan.detector_shape   # (rows, cols), F, (rows, cols)
    scan.ledger, scan.thresholds                                      # from /metadata
    one = scan.frame(10, 20)                     # dense (576, 576) pattern at row 10, col 20
    part = scan.region(slice(0, 8), slice(0, 8)) # dense (8, 8, 576, 576)
    adf = scan.virtual_image(mask)               # any (576, 576) mask -> (rows, cols)
    csr = scan.binned(4).to_scipy_csr()          # (positions, 144 * 144) scipy CSR
    cube = scan.cropped(slice(0, 256)).to_dask() # lazy, chunked by scan rows

Modules: ``events`` (blocks of events read from the file), ``scan`` (the views).
"""

from __future__ import annotations

import os

from stemstream.formats.counted.events import EventFile
from stemstream.formats.counted.scan import BIN_FACTORS, CountedFile


def open(path: str | os.PathLike, bin_factor: int = 1) -> CountedFile:  # noqa: A001 - the API's name
    """Open a counted file (stempy's format version 3, ours or stempy's; versions 1 and 2
    converted) as a :class:`CountedFile`, its detector binned by ``bin_factor`` (1, 2, 4, 8).

    Raises CountedFileError (a ValueError) with one sentence for a file that is missing, not
    HDF5, truncated or without electron events.
    """
    view = CountedFile(EventFile(path))
    return view.binned(bin_factor) if bin_factor != 1 else view


__all__ = ["BIN_FACTORS", "CountedFile", "open"]
