"""HyperSpy's own file (``.hspy``, or ``.zspy`` with zarr installed): a ``Signal2D`` of (rows,
cols) scan positions by (det_rows, det_cols) detector pixels, its axes named and calibrated as
far as the counted file knows (pixel units), written by RosettaSciIO's writer from our lazy dask
array, so one chunk of scan rows is dense at a time.

RosettaSciIO writes what HyperSpy saves, so ``hs.load(path, lazy=True)`` reads it back as a
lazy Signal2D whatever HyperSpy version made the reader; we hand it the signal dictionary that
HyperSpy itself would (axes in array order, scan axes navigating).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import dask.array  # noqa: F401 - to_dask needs it; missing, the export says so before writing
import numpy as np
from rsciio.hspy import file_writer as hspy_writer

from stemstream.formats.counted.scan import CountedFile

# HDF5 / zarr chunks of about this many bytes: small enough that reading one position is
# quick, big enough that a 1024 x 1024 scan is not a million chunks.
CHUNK_BYTES = 2**20


def axes(scan: CountedFile) -> list[dict]:
    """HyperSpy's axis dictionaries in array order: scan rows and cols (navigation), detector
    rows and cols (signal, calibrated in the detector's unbinned pixels)."""
    sizes = (*scan.scan_shape, *scan.detector_shape)
    names = ("scan_y", "scan_x", "ky", "kx")
    scales = (1.0, 1.0, float(scan.bin_factor), float(scan.bin_factor))
    return [
        {"_type": "UniformDataAxis", "name": name, "units": "px", "navigate": i < 2, "is_binned": False,
         "size": int(size), "scale": scale, "offset": 0.0}
        for i, (name, size, scale) in enumerate(zip(names, sizes, scales))
    ]


def signal_dict(scan: CountedFile, data, title: str, facts: dict) -> dict:
    """The dictionary RosettaSciIO's writers take (HyperSpy's ``Signal._to_dictionary``)."""
    return {
        "data": data,
        "axes": axes(scan),
        "metadata": {
            "General": {"title": title, "original_filename": scan.path.name},
            "Signal": {"signal_type": "", "quantity": "Electrons (Counts)"},
            "_HyperSpy": {"Folding": {"unfolded": False, "signal_unfolded": False,
                                      "original_shape": None, "original_axes_manager": None}},
        },
        "original_metadata": facts,
        "learning_results": {},
        "models": {},
        "attributes": {"_lazy": True, "ragged": False},
        "package_info": {"name": "stemstream", "version": facts.get("software_version", "")},
        "tmp_parameters": {},
    }


def write_hspy(scan: CountedFile, out: Path, temp: Callable[[Path], Path], progress: Callable[[int], None], facts: dict) -> list[tuple[Path, Path]]:
    """Write ``scan`` as a HyperSpy file at ``temp(out)`` (format by the suffix of ``out``);
    returns the (temporary, final) pair to rename."""
    done, lock = [0], threading.Lock()
    n_cols = scan.scan_shape[1]

    def counted(block: np.ndarray) -> np.ndarray:
        with lock:  # dask computes chunks on several threads
            done[0] += block.shape[0] * n_cols
            progress(done[0])
        return block

    cube = scan.to_dask().map_blocks(counted, dtype=scan.dtype)
    position_bytes = scan.detector_shape[0] * scan.detector_shape[1] * scan.dtype.itemsize
    chunks = (1, max(1, min(n_cols, CHUNK_BYTES // position_bytes)), *scan.detector_shape)
    signal = signal_dict(scan, cube, out.stem, facts)
    file_writer = hspy_writer
    if out.suffix == ".zspy":
        from rsciio.zspy import file_writer  # needs zarr, which only .zspy files do
    file_writer(str(temp(out)), signal, chunks=chunks, compression=None, show_progressbar=False)
    return [(temp(out), out)]
