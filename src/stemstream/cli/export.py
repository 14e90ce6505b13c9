"""``stemstream export``: a counted file for LiberTEM (``raw_csr``, sparse), py4DSTEM (EMD 1.0
DataCube) or HyperSpy (``.hspy`` / ``.zspy`` Signal2D), binned and cropped on the way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stemstream.cli.support import UserError, console, guarded, progress_bar


def parse_crop(text: str) -> tuple[slice, slice]:
    """``ROW0:ROW1,COL0:COL1`` (scan positions, end exclusive; an empty bound is the edge) ->
    (rows, cols) slices. Raises UserError."""
    try:
        rows, cols = text.split(",")
        bounds = [[int(b) if b.strip() else None for b in part.split(":")] for part in (rows, cols)]
        if any(len(b) != 2 or any(x is not None and x < 0 for x in b) for b in bounds):
            raise ValueError
    except ValueError:
        raise UserError(f"--crop must be ROW0:ROW1,COL0:COL1 with non-negative bounds, e.g. 0:64,32:96; got {text!r}") from None
    return slice(*bounds[0]), slice(*bounds[1])


@guarded
def export(
    counted: Annotated[Path, typer.Argument(help="Counted file (stempy sparse HDF5, ours or stempy's).")],
    to: Annotated[str, typer.Option("--to", help="Target tool: libertem (raw_csr .toml), py4dstem (EMD .h5), hyperspy (.hspy/.zspy).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write (for libertem: the .toml; its data files go beside it).")],
    bin_factor: Annotated[int, typer.Option("--bin", help="Bin the detector by 1, 2, 4 or 8 on both axes.")] = 1,
    crop: Annotated[Optional[str], typer.Option("--crop", help="Scan positions to keep, ROW0:ROW1,COL0:COL1 (end exclusive).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the output, and write a dense export over the size limit.")] = False,
) -> None:
    """Export a counted file for LiberTEM, py4DSTEM or HyperSpy, written under a temporary name
    and renamed when complete."""
    import stemstream
    from stemstream.formats.exports import ExportError
    from stemstream.formats.exports import export as export_scan

    try:
        scan = stemstream.open(counted, bin_factor)
        if crop:
            scan = scan.cropped(*parse_crop(crop))
    except ValueError as exc:  # CountedFileError is one: the file is not a counted file
        raise UserError(str(exc)) from None
    n_positions = scan.scan_shape[0] * scan.scan_shape[1]
    try:
        with progress_bar(console, f"exporting for {to}", n_positions) as advance:
            files = export_scan(scan, to, output, force=force, progress=advance)
    except ExportError as exc:
        raise UserError(str(exc)) from None
    console.print(
        f"wrote {', '.join(str(f) for f in files)}: scan {scan.scan_shape[0]} x {scan.scan_shape[1]}, "
        f"detector {scan.detector_shape[0]} x {scan.detector_shape[1]}, {scan.frames_per_position} frame(s) per position",
        highlight=False,
    )
