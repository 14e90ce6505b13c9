"""py4DSTEM / quantem's native file: an EMD 1.0 HDF5 file holding one ``DataCube`` (rows, cols,
det_rows, det_cols), written with ``emdfile`` (py4DSTEM's own file library, NumPy-2 ready) and
filled a block of scan rows at a time, so memory stays bounded by the block.

emdfile writes an array from memory in one go; :class:`DataCube` is an emdfile ``Array`` that
writes the same group (tags, metadata, dim vectors) but fills its ``data`` dataset from the
counted file. Its class name is the ``python_class`` tag py4DSTEM reads back as its DataCube.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import emdfile
import numpy as np

from stemstream.core.version import SOFTWARE_VERSION
from stemstream.formats.counted.scan import CountedFile

# py4DSTEM's names for a DataCube's axes: real space (scan) R, diffraction space Q.
DIM_NAMES = ("Rx", "Ry", "Qx", "Qy")


class DataCube(emdfile.Array):
    """A DataCube whose data come from a counted file, a block of scan rows at a time."""

    def __init__(self, scan: CountedFile, progress: Callable[[int], None]):
        # A zero-stride stand-in gives emdfile the shape and dtype without any memory.
        shape = (*scan.scan_shape, *scan.detector_shape)
        super().__init__(
            data=np.broadcast_to(np.zeros((), scan.dtype), shape),
            name="datacube",
            units="electrons",
            dims=[1, 1, scan.bin_factor, scan.bin_factor],
            dim_units=["pixels", "pixels", "pixels", "pixels"],
            dim_names=list(DIM_NAMES),
        )
        self._scan, self._progress = scan, progress

    def to_h5(self, group):
        """emdfile's Array.to_h5, with ``data`` filled a block of scan rows at a time."""
        grp = emdfile.Node.to_h5(self, group)
        scan = self._scan
        # contiguous: each block of whole scan rows is one contiguous run of the file
        data = grp.create_dataset("data", shape=self.data.shape, dtype=self.data.dtype)
        data.attrs.create("units", self.units)
        for r0, r1, offsets, pixels in scan.row_blocks(scan.rows_per_chunk()):
            data[r0:r1] = scan.dense_block(offsets, pixels, r0, r1)
            self._progress(r1 * scan.scan_shape[1])
        for n in range(self.rank):
            dim = grp.create_dataset(f"dim{n}", data=np.asarray(self.dims[n][:2]))
            dim.attrs.create("name", str(self.dim_names[n]))
            dim.attrs.create("units", str(self.dim_units[n]))
        return grp


class Calibration(emdfile.Metadata):
    """The root metadata py4DSTEM reads as its Calibration (by this class name): pixel sizes in
    the detector's unbinned pixels (binning by 4 makes a Q pixel 4 pixels), no Q/R rotation."""

    def __init__(self, bin_factor: int):
        super().__init__(name="calibration", data={
            "Q_pixel_size": bin_factor, "R_pixel_size": 1, "Q_pixel_units": "pixels", "R_pixel_units": "pixels",
            "QR_flip": False,
        })


def write_emd(scan: CountedFile, out: Path, temp: Callable[[Path], Path], progress: Callable[[int], None], facts: dict) -> list[tuple[Path, Path]]:
    """Write ``scan`` as an EMD 1.0 DataCube under ``temp(out)``; ``facts`` (plain values) go
    into the root's metadata. Returns the (temporary, final) pair to rename."""
    emdfile.set_program(f"stemstream {SOFTWARE_VERSION}")
    root = emdfile.Root(name=out.stem or "counted")
    cube = DataCube(scan, progress)
    root.tree(cube)
    root.metadata = Calibration(scan.bin_factor)
    root.metadata = emdfile.Metadata(name="stemstream", data=facts)
    emdfile.save(str(temp(out)), root, mode="o")
    return [(temp(out), out)]
