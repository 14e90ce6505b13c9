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
directions. The 4D Camera's frames (core.detector.FRAME_SHAPE) are square, so real files are
unaffected.

Old formats: version 1 (one list per position, several frames merged, so a pixel may repeat)
and version 2 (one list per frame plus a per-frame ``scan_positions``) are read and converted
like stempy does; a file without a ``version`` attribute is version 1.

Modules: ``layout`` (the version, the vlen dtype, CountedFileError), ``metadata`` (the
``/metadata`` tree), ``writer`` (SparseCountsWriter) and ``reader`` (read_counted, CountedScan).
"""

from stemstream.formats.sparse_h5.layout import FORMAT_VERSION, CountedFileError
from stemstream.formats.sparse_h5.metadata import ELECTRON_COUNTING_ATTRS
from stemstream.formats.sparse_h5.reader import CountedScan, read_counted
from stemstream.formats.sparse_h5.writer import SparseCountsWriter

__all__ = [
    "CountedFileError",
    "CountedScan",
    "ELECTRON_COUNTING_ATTRS",
    "FORMAT_VERSION",
    "SparseCountsWriter",
    "read_counted",
]
