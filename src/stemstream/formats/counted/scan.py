"""A counted scan as a method developer uses it: its facts, and views (a frame, a region, the
summed pattern, a virtual image, scipy CSR, a lazy dask array) that read the file a block of
scan rows at a time and never densify the whole scan unless asked.

Every view sums a position's frames (what stempy's ``SparseArray.to_dense()`` does), honours the
view's detector binning and scan crop, and counts electrons in the smallest unsigned dtype that
cannot overflow (binning and several frames per position put more than one electron in a pixel).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stemstream.formats.counted.events import POSITIONS_PER_BLOCK, EventFile, bin_pixels, count_dtype, densify

#: Detector binning factors a view accepts (576 -> 288, 144, 72 on the 4D Camera).
BIN_FACTORS = (1, 2, 4, 8)


class CountedFile:
    """A counted file opened by :func:`stemstream.open`, seen through an optional detector
    binning and scan crop.

    Shapes are (rows, cols): ``scan_shape`` (the cropped scan), ``detector_shape`` (after
    binning), ``frames_per_position``. ``ledger`` and ``thresholds`` are the file's
    ``/metadata`` (empty dicts for files without them, e.g. stempy's keep no ledger).

    Example::

        scan = stemstream.open("FOURD_scan_00001.h5").binned(4)
        pattern = scan.summed_pattern()            # (144, 144)
        bf = scan.virtual_image(pattern > 10)      # (rows, cols)
        cube = scan.to_dask()                      # lazy (rows, cols, 144, 144)
    """

    def __init__(self, events: EventFile, factor: int = 1, rows: range | None = None, cols: range | None = None):
        self._events = events
        self.bin_factor = factor
        self._rows = range(events.scan_shape[0]) if rows is None else rows
        self._cols = range(events.scan_shape[1]) if cols is None else cols

    # ---------------------------------------------------------------- facts

    @property
    def path(self) -> Path:
        return self._events.path

    @property
    def scan_shape(self) -> tuple[int, int]:
        return (len(self._rows), len(self._cols))

    @property
    def frames_per_position(self) -> int:
        return self._events.frames_per_position

    @property
    def full_detector_shape(self) -> tuple[int, int]:
        """The detector's frame shape (rows, cols) in the file, before binning."""
        return self._events.frame_shape

    @property
    def detector_shape(self) -> tuple[int, int]:
        rows, cols = self._events.frame_shape
        return (rows // self.bin_factor, cols // self.bin_factor)

    @property
    def metadata(self) -> dict:
        return self._events.metadata

    @property
    def ledger(self) -> dict:
        return dict(self.metadata.get("stemstream", {}).get("ledger", {}))

    @property
    def thresholds(self) -> dict:
        return dict(self.metadata.get("electron_counting", {}))

    @property
    def dtype(self) -> np.dtype:
        """The dtype of dense views: holds a position's most electrons in one binned pixel."""
        return count_dtype(self.bin_factor**2 * self.frames_per_position)

    def __repr__(self) -> str:
        return (
            f"CountedFile({str(self.path)!r}, scan {self.scan_shape}, detector {self.detector_shape}, "
            f"{self.frames_per_position} frame(s) per position)"
        )

    def __enter__(self) -> CountedFile:
        return self

    def __exit__(self, *exc) -> None:
        """Nothing to close: every read opens the file for itself."""

    # ---------------------------------------------------------------- new views

    def binned(self, factor: int) -> CountedFile:
        """This view with the detector binned by ``factor`` (1, 2, 4 or 8) on both axes."""
        if factor not in BIN_FACTORS:
            raise ValueError(f"the detector binning must be one of {', '.join(map(str, BIN_FACTORS))}, got {factor}")
        rows, cols = self._events.frame_shape
        if rows % factor or cols % factor:
            raise ValueError(f"the detector's {rows} x {cols} pixels do not divide by the binning {factor}")
        return CountedFile(self._events, factor, self._rows, self._cols)

    def cropped(self, rows: slice = slice(None), cols: slice = slice(None)) -> CountedFile:
        """This view with the scan cropped to ``rows`` x ``cols`` (slices of this view's scan,
        step 1)."""
        new_rows, new_cols = self._rows[rows], self._cols[cols]
        if rows.step not in (None, 1) or cols.step not in (None, 1):
            raise ValueError("a scan crop takes contiguous rows and columns (no step)")
        if not len(new_rows) or not len(new_cols):
            raise ValueError(f"the crop rows {rows.start}:{rows.stop}, cols {cols.start}:{cols.stop} is empty in the {self.scan_shape[0]} x {self.scan_shape[1]} scan")
        return CountedFile(self._events, self.bin_factor, new_rows, new_cols)

    # ---------------------------------------------------------------- reading

    def row_blocks(self, rows_per_block: int | None = None):
        """Yields ``(row0, row1, offsets, pixels)`` for scan rows [row0, row1) of this view:
        offsets int64 ((row1 - row0) * cols + 1,) per position row-major, pixels uint32 binned
        flat detector indices."""
        n_cols = len(self._cols)
        full_cols = self._events.scan_shape[1]
        step = rows_per_block or max(1, POSITIONS_PER_BLOCK // full_cols)
        for r0 in range(0, len(self._rows), step):
            r1 = min(r0 + step, len(self._rows))
            a = self._rows[r0] * full_cols
            block = self._events.read(a, a + (r1 - r0) * full_cols)
            offsets, pixels = block.position_offsets, block.pixels
            if n_cols != full_cols:
                offsets, pixels = _keep_columns(offsets, pixels, r1 - r0, full_cols, self._cols)
            yield r0, r1, offsets, bin_pixels(pixels, self._events.frame_shape, self.bin_factor)

    def dense_block(self, offsets: np.ndarray, pixels: np.ndarray, row0: int, row1: int) -> np.ndarray:
        """Scan rows [row0, row1) as a dense (row1 - row0, cols, det_rows, det_cols) array, from
        the ``offsets`` and ``pixels`` that :meth:`row_blocks` yielded for them."""
        n_positions = (row1 - row0) * self.scan_shape[1]
        return self._dense(offsets, pixels, n_positions).reshape(row1 - row0, self.scan_shape[1], *self.detector_shape)

    def _dense(self, offsets: np.ndarray, pixels: np.ndarray, n_positions: int) -> np.ndarray:
        """(n_positions, det_rows, det_cols) counts from one block's offsets and pixels."""
        out = np.zeros((n_positions, self.detector_shape[0] * self.detector_shape[1]), dtype=self.dtype)
        densify(offsets, pixels, out)
        return out.reshape(n_positions, *self.detector_shape)

    def dense_rows(self, row0: int, row1: int) -> np.ndarray:
        """Scan rows [row0, row1) of this view as a dense (row1 - row0, cols, det_rows,
        det_cols) array."""
        (_, _, offsets, pixels), = self.cropped(rows=slice(row0, row1)).row_blocks(rows_per_block=row1 - row0)
        return self.dense_block(offsets, pixels, row0, row1)

    def region(self, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """Scan positions ``rows`` x ``cols`` as a dense (rows, cols, det_rows, det_cols) array."""
        view = self.cropped(rows, cols)
        return view.dense_rows(0, view.scan_shape[0])

    def frame(self, row: int, col: int, index: int | None = None) -> np.ndarray:
        """The (det_rows, det_cols) pattern at scan position (row, col): its frames summed, or
        frame ``index`` of them alone."""
        row, col = self._rows[row], self._cols[col]
        p = row * self._events.scan_shape[1] + col
        block = self._events.read(p, p + 1)
        offsets = block.position_offsets
        if index is not None:
            if not 0 <= index < self.frames_per_position:
                raise IndexError(f"frame {index} is not one of the {self.frames_per_position} frames per position")
            offsets = block.frame_offsets[index : index + 2]
        pixels = bin_pixels(block.pixels[offsets[0] : offsets[-1]], self._events.frame_shape, self.bin_factor)
        return self._dense(np.array([0, len(pixels)]), pixels, 1)[0]

    # ---------------------------------------------------------------- reductions

    def summed_pattern(self) -> np.ndarray:
        """Electrons per detector pixel over the whole (cropped) scan, int64 (det_rows, det_cols)."""
        n_pix = self.detector_shape[0] * self.detector_shape[1]
        total = np.zeros(n_pix, dtype=np.int64)
        for _, _, _, pixels in self.row_blocks():
            total += np.bincount(pixels, minlength=n_pix)
        return total.reshape(self.detector_shape)

    def virtual_image(self, mask: np.ndarray) -> np.ndarray:
        """The image of ``mask`` (det_rows, det_cols; bool or weights) over the scan: per
        position, the sum of the mask at every electron. float64 (rows, cols), int64 for a
        bool or integer mask."""
        mask = np.asarray(mask)
        if mask.shape != self.detector_shape:
            raise ValueError(f"the mask is {mask.shape}, the detector of this view is {self.detector_shape} (rows, cols)")
        weights = mask.ravel().astype(np.float64)
        out = np.zeros(self.scan_shape[0] * self.scan_shape[1], dtype=np.float64)
        n_cols = self.scan_shape[1]
        for r0, r1, offsets, pixels in self.row_blocks():
            n = (r1 - r0) * n_cols
            position = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
            out[r0 * n_cols : r1 * n_cols] = np.bincount(position, weights=weights[pixels], minlength=n)
        if mask.dtype.kind in "biu":
            out = out.astype(np.int64)
        return out.reshape(self.scan_shape)

    def counts_image(self) -> np.ndarray:
        """Electrons per scan position, int64 (rows, cols)."""
        return self.virtual_image(np.ones(self.detector_shape, dtype=bool))

    # ---------------------------------------------------------------- whole-scan forms

    def to_scipy_csr(self):
        """The scan as a ``scipy.sparse.csr_matrix`` of (positions, detector pixels), positions
        row-major; holds every event in memory (as the caller asks)."""
        import scipy.sparse

        indptr, indices, total = [np.zeros(1, np.int64)], [], 0
        for _, _, offsets, pixels in self.row_blocks():
            indptr.append(offsets[1:] + total)
            indices.append(pixels)
            total += len(pixels)
        indptr = np.concatenate(indptr)
        indices = np.concatenate(indices) if indices else np.empty(0, np.int64)
        n_pix = self.detector_shape[0] * self.detector_shape[1]
        matrix = scipy.sparse.csr_matrix(
            (np.ones(len(indices), dtype=self.dtype), indices, indptr),
            shape=(self.scan_shape[0] * self.scan_shape[1], n_pix),
        )
        matrix.sum_duplicates()  # a pixel hit in several frames (or binned together) counts once per hit
        return matrix

    def to_dask(self, rows_per_chunk: int | None = None):
        """A lazy dask array (rows, cols, det_rows, det_cols), chunked by scan rows, each chunk
        dense when computed. Needs dask (``pip install dask``)."""
        try:
            import dask
            import dask.array as da
        except ImportError:
            raise ImportError("to_dask() needs dask: pip install dask") from None
        rows_per_chunk = rows_per_chunk or self.rows_per_chunk()
        chunks = []
        for r0 in range(0, self.scan_shape[0], rows_per_chunk):
            r1 = min(r0 + rows_per_chunk, self.scan_shape[0])
            shape = (r1 - r0, self.scan_shape[1], *self.detector_shape)
            chunks.append(da.from_delayed(dask.delayed(self.dense_rows)(r0, r1), shape=shape, dtype=self.dtype))
        return da.concatenate(chunks, axis=0)

    def rows_per_chunk(self, chunk_bytes: int = 64 * 2**20) -> int:
        """Scan rows per dense chunk of about ``chunk_bytes`` (at least one row)."""
        row_bytes = self.scan_shape[1] * self.detector_shape[0] * self.detector_shape[1] * self.dtype.itemsize
        return max(1, min(self.scan_shape[0], chunk_bytes // row_bytes))


def _keep_columns(offsets: np.ndarray, pixels: np.ndarray, n_rows: int, full_cols: int, cols: range):
    """The CSR of a block of whole scan rows narrowed to the scan columns ``cols``."""
    keep = np.zeros((n_rows, full_cols), dtype=bool)
    keep[:, cols.start : cols.stop] = True
    keep = keep.ravel()
    counts = np.diff(offsets)
    new_offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    np.cumsum(counts[keep], out=new_offsets[1:])
    return new_offsets, pixels[np.repeat(keep, counts)]
