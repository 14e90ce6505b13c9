"""The ``stemstream`` command line: one sub-command per job, a clear sentence on bad input.

This module makes the typer app and registers every command on it; the commands are plain
functions, here (``simulate``, ``count``) and in one module per family.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from stemstream.cli import export, pipeline, recover, run, scan, security, slurm, web
from stemstream.cli.reports import count_summary, simulation_summary
from stemstream.cli.support import UserError, console, guarded, parse_shape, progress_bar, setup_logging

log = logging.getLogger("stemstream")


# The options of every command, given before its name (no docstring: the app's help is its own).
def verbosity(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more (debug level).")] = False) -> None:
    setup_logging(verbose)


@guarded
def simulate(
    out_dir: Annotated[Path, typer.Argument(help="Directory for the module files and status files (created).")],
    scan_shape: Annotated[str, typer.Option("--scan-shape", help="Scan positions as ROWSxCOLS, e.g. 64x64.")] = "64x64",
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same files.")] = 0,
    dose: Annotated[float, typer.Option(help="Mean electrons per pixel per frame.")] = 0.002,
    frames_per_position: Annotated[int, typer.Option("--frames-per-position", help="Frames at each scan position.")] = 1,
    scan_number: Annotated[int, typer.Option("--scan-number", help="Scan number in headers and file names.")] = 1,
    drop_sectors: Annotated[float, typer.Option("--drop-sectors", help="Probability that a sector is lost (0-1).")] = 0.0,
    records_per_file: Annotated[int, typer.Option("--records-per-file", help="Sector records per raw file before a new file starts.")] = 4096,
) -> None:
    """Write a simulated scan the way the 4 receivers do: module files and status JSON files."""
    from stemstream.sources.simulator import SimulationConfig, simulate_to_directory

    try:
        config = SimulationConfig(
            scan_shape=parse_shape(scan_shape, "--scan-shape"),
            frames_per_position=frames_per_position,
            dose=dose,
            seed=seed,
            scan_number=scan_number,
            drop_sector_probability=drop_sectors,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if records_per_file < 1:
        raise UserError(f"--records-per-file must be at least 1, got {records_per_file}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out_dir}: {exc.strerror or exc}") from exc
    n_total = config.scan_shape[0] * config.scan_shape[1] * config.frames_per_position
    with progress_bar(console, "simulating", n_total) as advance:
        summary = simulate_to_directory(out_dir, config, records_per_file, progress=lambda done: advance(done))
    console.print(simulation_summary(summary, config))


@guarded
def count(
    raw: Annotated[list[Path], typer.Argument(help="Raw module files, or directories holding them.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Counted file to write (stempy sparse HDF5).")],
    background_threshold: Annotated[Optional[float], typer.Option("--background-threshold", help="Fixed background threshold, ADU.")] = None,
    xray_threshold: Annotated[Optional[float], typer.Option("--xray-threshold", help="Fixed X-ray threshold, ADU.")] = None,
    sigma: Annotated[float, typer.Option("--sigma", help="Calibration: background = fitted mean + SIGMA x fitted sigma.")] = 4.0,
    xray_sigma: Annotated[float, typer.Option("--xray-sigma", help="Calibration: X-ray = mean + XRAY_SIGMA x std.")] = 175.0,
    samples: Annotated[int, typer.Option("--samples", help="Calibration: frames drawn at random.")] = 1200,
    dark: Annotated[Optional[Path], typer.Option("--dark", help="Dark reference (.npy, or .h5[:/dataset]), ADU.")] = None,
    gain: Annotated[Optional[Path], typer.Option("--gain", help="Gain map (.npy or .h5); values are divided by it.")] = None,
    row_dark: Annotated[bool, typer.Option("--row-dark", help="Apply stempy's row-dark correction.")] = False,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Counting threads (default: all cores).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
    method: Annotated[str, typer.Option("--method", help="maxima (stempy's strict 3x3 maxima) or clusters "
                                        "(coincident electrons counted, sub-pixel positions kept; docs/counting.md).")] = "maxima",
) -> None:
    """Count electrons in a scan's raw files and write stempy's sparse HDF5 (format version 3)."""
    # Idle OpenMP threads sleep instead of spinning between batches: the spinning took CPU
    # from the writer thread and from the batch hand-over on 2 busy cores (128 x 128 scan,
    # 6 runs each at load ~5.5: median 3.4 s wall / 2.95 s CPU against 4.3 s / 3.15 s).
    # libgomp reads it when numba first starts its threads; a value the user set wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from stemstream.counting.offline import CountOptions, count_raw_scan

    if output.exists() and not force:
        raise UserError(f"{output} already exists (use --force to overwrite)")
    if not output.parent.exists():
        raise UserError(f"the output directory {output.parent} does not exist")
    try:
        options = CountOptions(
            background=background_threshold, xray=xray_threshold,
            background_n_sigma=sigma, xray_n_sigma=xray_sigma, samples=samples,
            dark=dark, gain=gain, row_dark=row_dark, workers=workers, method=method,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    with progress_bar(console, "counting", None) as advance:
        result = count_raw_scan(raw, output, options, progress=lambda done, total: advance(done, total), overwrite=force)
    console.print(count_summary(result))
    if not result.ledger.all_accounted:
        log.warning("the scan is not complete: see the ledger above")


# Every command, in the order ``stemstream --help`` lists them.
COMMANDS = (
    ("simulate", simulate),
    ("count", count),
    ("control", pipeline.control),
    ("writer", pipeline.writer),
    ("node", pipeline.node),
    ("gateway", pipeline.gateway),
    ("producer", pipeline.producer),
    ("run", run.run),
    ("demo", run.demo),
    ("replay", run.replay),
    ("recover", recover.recover),
    ("scan", scan.scan),
    ("serve", web.serve),
    ("analyze", web.analyze),
    ("show", web.show),
    ("export", export.export),
    ("keys", security.keys),
    ("slurm-script", slurm.slurm_script),
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Stream 4D Camera data, count electrons, write stempy-compatible files.",
    pretty_exceptions_enable=False,
)
app.callback()(verbosity)
for name, command in COMMANDS:
    app.command(name)(command)


def main() -> None:
    """Entry point of the ``stemstream`` command."""
    app(prog_name="stemstream")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
