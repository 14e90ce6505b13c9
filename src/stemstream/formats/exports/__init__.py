"""Exports of a counted file for the tools microscopists analyse with: LiberTEM's ``raw_csr``
dataset (sparse, never dense), py4DSTEM's EMD 1.0 DataCube and HyperSpy's ``.hspy`` / ``.zspy``
(dense at the chosen binning, written a block of scan rows at a time).

Every export writes under temporary names beside its output and renames them into place only
once all is written; a failure removes them, so there is never a half file under the final name.

Modules: ``raw_csr`` (LiberTEM), ``emd`` (py4DSTEM, needs ``emdfile``), ``hspy`` (HyperSpy,
needs ``rosettasciio`` and ``dask``): ``pip install stemstream[export]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from stemstream.core.version import SOFTWARE_VERSION
from stemstream.formats.counted.scan import CountedFile

#: The tools an export is for, and the suffix their output takes.
TARGETS = {"libertem": ".toml", "py4dstem": ".h5", "hyperspy": ".hspy"}
#: Dense exports bigger than this are refused unless forced: 16 GiB.
DENSE_LIMIT_BYTES = 16 * 2**30
# What each dense target needs installed, for the sentence when it is missing.
_NEEDS = {"py4dstem": "emdfile", "hyperspy": "rosettasciio and dask"}


class ExportError(ValueError):
    """An export that cannot be made; the message is one sentence."""


def dense_bytes(scan: CountedFile) -> int:
    """The size of ``scan`` as a dense array at its binning."""
    rows, cols = scan.scan_shape
    det_rows, det_cols = scan.detector_shape
    return rows * cols * det_rows * det_cols * scan.dtype.itemsize


def check_size(scan: CountedFile, target: str, limit: float | None = None) -> None:
    """Refuse a dense export over ``limit`` bytes (default :data:`DENSE_LIMIT_BYTES`), in one
    sentence suggesting a binning."""
    limit = DENSE_LIMIT_BYTES if limit is None else limit
    size = dense_bytes(scan)
    if target == "libertem" or size <= limit:
        return
    hint = next((f, size // f**2) for f in (2, 4, 8) if size // f**2 <= limit or f == 8)
    raise ExportError(
        f"the {target} export would be {size / 1e9:.1f} GB dense, over the {limit / 2**30:.0f} GiB limit: "
        f"use --bin {hint[0]} (about {hint[1] / 1e9:.1f} GB) or --crop, or --force to write it anyway"
    )


def facts(scan: CountedFile) -> dict:
    """What the exported file records about its source: plain scalars only."""
    out = {"software": "stemstream", "software_version": SOFTWARE_VERSION, "source": str(scan.path),
           "frames_per_position": scan.frames_per_position, "bin_factor": scan.bin_factor}
    for group, values in (("threshold", scan.thresholds), ("ledger", scan.ledger)):
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool)):
                out[f"{group}_{key}"] = value
    return out


def temp_name(final: Path) -> Path:
    """Where ``final`` is written before it is renamed into place (same folder: rename is atomic)."""
    return final.with_name(f".{final.name}.partial-{os.getpid()}")


def export(scan: CountedFile, target: str, out: Path, *, force: bool = False, limit: float | None = None,
           progress: Callable[[int], None] = lambda done: None) -> list[Path]:
    """Write ``scan`` (at its binning and crop) for ``target`` at ``out``; returns the files
    written. ``progress(done)`` is called with the scan positions written so far; ``limit``:
    the dense size refused without ``force`` (default :data:`DENSE_LIMIT_BYTES`)."""
    if target not in TARGETS:
        raise ExportError(f"--to must be one of {', '.join(TARGETS)}, got {target!r}")
    if target == "hyperspy" and out.suffix not in (".hspy", ".zspy"):
        raise ExportError(f"a HyperSpy export is a .hspy or .zspy file, not {out.name!r}")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ExportError(f"cannot write {out}: the folder {folder} does not exist or is not writable")
    if out.exists() and not force:
        raise ExportError(f"{out} already exists (use --force to overwrite)")
    check_size(scan, target, limit if not force else float("inf"))
    writer = _writer(target)
    written: list[tuple[Path, Path]] = []
    try:
        if target == "libertem":
            written = writer(scan, out, temp_name, progress)
        else:
            written = writer(scan, out, temp_name, progress, facts(scan))
        for temp, final in written:
            os.replace(temp, final)
    finally:
        for temp in [temp_name(out), *(temp_name(f) for f in _side_files(target, out))]:
            temp.unlink(missing_ok=True)
    return [final for _, final in written]


def _side_files(target: str, out: Path) -> list[Path]:
    from stemstream.formats.exports.raw_csr import data_files

    return list(data_files(out).values()) if target == "libertem" else []


def _writer(target: str):
    try:
        if target == "libertem":
            from stemstream.formats.exports.raw_csr import write_raw_csr as writer
        elif target == "py4dstem":
            from stemstream.formats.exports.emd import write_emd as writer
        else:
            from stemstream.formats.exports.hspy import write_hspy as writer
    except ImportError as exc:
        raise ExportError(
            f"the {target} export needs {_NEEDS[target]} ({exc.name} is not installed): pip install 'stemstream[export]'"
        ) from None
    return writer


__all__ = ["DENSE_LIMIT_BYTES", "TARGETS", "ExportError", "check_size", "dense_bytes", "export"]
