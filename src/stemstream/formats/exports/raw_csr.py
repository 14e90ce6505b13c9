"""LiberTEM's ``raw_csr`` dataset: three flat binary files (index pointers, pixel indices,
values) and the TOML descriptor that names them, written straight from the events, never dense.

LiberTEM reads the triple by memory-mapping it as a scipy CSR matrix of (scan positions,
detector pixels), positions row-major; ``ctx.load("raw_csr", path="scan.toml")`` opens it. Each
row holds a position's sorted, unique pixels with their electron counts (a pixel hit in several
frames, or binned together, is one entry with its count).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from stemstream.formats.counted.events import canonicalize, is_canonical
from stemstream.formats.counted.scan import CountedFile

INDPTR_DTYPE = np.dtype("<i8")
INDICES_DTYPE = np.dtype("<i4")

# The data files beside the descriptor, by role; names are the descriptor's stem plus these.
SUFFIXES = {"indptr": "_indptr.raw", "indices": "_indices.raw", "data": "_values.raw"}


def data_files(toml_path: Path) -> dict[str, Path]:
    """The three data files a descriptor at ``toml_path`` names, by role."""
    return {role: toml_path.with_name(toml_path.stem + suffix) for role, suffix in SUFFIXES.items()}


def descriptor(scan: CountedFile, toml_path: Path) -> str:
    """The TOML text LiberTEM's RawCSRDataSet reads: shapes and the data files (relative names)."""
    files = data_files(toml_path)
    dtypes = {"indptr": INDPTR_DTYPE, "indices": INDICES_DTYPE, "data": scan.dtype}
    lines = [
        "# written by stemstream export: LiberTEM raw_csr dataset, ctx.load('raw_csr', path=THIS_FILE)",
        "[params]",
        'filetype = "raw_csr"',
        f"nav_shape = [{scan.scan_shape[0]}, {scan.scan_shape[1]}]",
        f"sig_shape = [{scan.detector_shape[0]}, {scan.detector_shape[1]}]",
        "",
        "[raw_csr]",
    ]
    for role in ("indptr", "indices", "data"):
        lines.append(f'{role}_file = "{files[role].name}"')
        lines.append(f'{role}_dtype = "{dtypes[role].str}"')
    return "\n".join(lines) + "\n"


def write_raw_csr(scan: CountedFile, toml_path: Path, temp: Callable[[Path], Path], progress: Callable[[int], None]) -> list[tuple[Path, Path]]:
    """Write the dataset of ``scan`` under temporary names (``temp(final)``); returns the
    (temporary, final) pairs in the order they should be renamed (the descriptor last)."""
    files = data_files(toml_path)
    n_cols = scan.scan_shape[1]
    total = 0
    with open(temp(files["indptr"]), "wb") as f_ptr, open(temp(files["indices"]), "wb") as f_idx, open(temp(files["data"]), "wb") as f_val:
        np.zeros(1, INDPTR_DTYPE).tofile(f_ptr)
        for _, r1, offsets, pixels in scan.row_blocks():
            # stempy's frames are sorted and unique: single frames without binning need no work
            if is_canonical(offsets, pixels):
                counts = np.ones(len(pixels), dtype=scan.dtype)
            else:
                offsets, pixels, counts = canonicalize(offsets, pixels)
            (offsets[1:] + total).astype(INDPTR_DTYPE).tofile(f_ptr)
            pixels.astype(INDICES_DTYPE).tofile(f_idx)
            counts.astype(scan.dtype).tofile(f_val)
            total += len(pixels)
            progress(r1 * n_cols)
    temp(toml_path).write_text(descriptor(scan, toml_path))
    return [(temp(files[role]), files[role]) for role in ("indptr", "indices", "data")] + [(temp(toml_path), toml_path)]
