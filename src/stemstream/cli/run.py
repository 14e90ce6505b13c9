"""Every role on this machine from one command: ``run`` (simulated or recorded scans), ``demo``
(the first thing to try) and ``replay`` (spilled records into their scan's file). What the
pipeline looks like on one host is decided in :mod:`stemstream.deploy.session`; this module
turns options into its arguments and prints what comes back."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from stemstream.cli.reports import accounted, stream_summary
from stemstream.cli.support import (
    ConfigOption, UserError, console, guarded, parse_shape, read_config, scan_progress, validated,
)

if TYPE_CHECKING:
    from stemstream.core.config import PipelineConfig
    from stemstream.deploy.session import LocalSession, PlannedScan
    from stemstream.deploy.sources import ProducerSource


@guarded
def run(
    simulate: Annotated[Optional[str], typer.Option("--simulate", help="Stream simulated scans of ROWSxCOLS positions.")] = None,
    replay: Annotated[Optional[Path], typer.Option("--replay", help="Stream a scan's raw files instead.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the counted files.")] = Path("."),
    nodes: Annotated[Optional[int], typer.Option("--nodes", help="Node groups (default: config, 2).")] = None,
    scans: Annotated[int, typer.Option("--scans", help="Simulated scans to stream one after another.")] = 1,
    frames_per_position: Annotated[int, typer.Option("--frames-per-position")] = 1,
    background_threshold: Annotated[Optional[float], typer.Option("--background-threshold", help="Fixed background threshold, ADU.")] = None,
    xray_threshold: Annotated[Optional[float], typer.Option("--xray-threshold", help="Fixed X-ray threshold, ADU.")] = None,
    sigma: Annotated[Optional[float], typer.Option("--sigma")] = None,
    xray_sigma: Annotated[Optional[float], typer.Option("--xray-sigma")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples")] = None,
    dose: Annotated[float, typer.Option(help="Simulator dose, electrons/pixel/frame.")] = 0.002,
    seed: Annotated[int, typer.Option(help="Simulator seed.")] = 0,
    no_gateway: Annotated[bool, typer.Option("--no-gateway", help="Producers send straight to node groups.")] = False,
    no_dashboard: Annotated[bool, typer.Option("--no-dashboard", help="Do not start the web dashboard.")] = False,
    config: ConfigOption = None,
) -> None:
    """Start every role locally, stream scans through them, write OUTDIR/<scan name>.h5."""
    from stemstream.deploy.session import recorded_scan, simulated_scans
    from stemstream.deploy.sources import ProducerSource

    cfg = read_config(config)
    if (simulate is None) == (replay is None):
        raise UserError("give exactly one of --simulate ROWSxCOLS or --replay RAW_DIR")
    if nodes is not None:
        cfg.pipeline.nodes = nodes
    if no_gateway:
        cfg.pipeline.gateway = False
    for name, value in (("background_threshold", background_threshold), ("xray_threshold", xray_threshold),
                        ("sigma", sigma), ("xray_sigma", xray_sigma), ("samples", samples)):
        if value is not None:
            setattr(cfg.counting, name, value)
    output.mkdir(parents=True, exist_ok=True)
    cfg.pipeline.output_dir = str(output.resolve())
    if scans < 1:
        raise UserError(f"--scans must be at least 1, got {scans}")
    validated(cfg)
    if replay is not None:
        plan, source = [recorded_scan(replay)], ProducerSource(replay=[replay])
    else:
        plan = simulated_scans(parse_shape(simulate, "--simulate"), scans, frames_per_position)
        source = ProducerSource(dose=dose, seed=seed)
    if not stream_locally(cfg, source, plan, dashboard=not no_dashboard):
        raise typer.Exit(1)


@guarded
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the counted file.")] = Path("."),
    scan_shape: Annotated[str, typer.Option("--scan-shape", help="Scan positions ROWSxCOLS.")] = "128x128",
    no_dashboard: Annotated[bool, typer.Option("--no-dashboard", help="Do not start the web dashboard.")] = False,
) -> None:
    """A simulated scan streamed through every role on this machine: the first thing to run."""
    from stemstream.deploy.session import simulated_scans
    from stemstream.deploy.sources import ProducerSource

    cfg = read_config(None)
    output.mkdir(parents=True, exist_ok=True)
    cfg.pipeline.output_dir = str(output.resolve())
    console.print("[bold]stemstream demo[/]: simulating a 4D Camera scan and streaming it through "
                  "4 producers, a gateway, 2 node groups and a writer on this machine.")
    plan = simulated_scans(parse_shape(scan_shape, "--scan-shape"), 1)
    if not stream_locally(cfg, ProducerSource(), plan, dashboard=not no_dashboard):
        raise typer.Exit(1)


@guarded
def replay(
    spill_dir: Annotated[Path, typer.Argument(help="A scan's spill directory (spill/scan_NNNNN) or raw files.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory holding the scan's counted file.")] = Path("."),
    nodes: Annotated[Optional[int], typer.Option("--nodes", help="Node groups (default: config, 2).")] = None,
    background_threshold: Annotated[Optional[float], typer.Option("--background-threshold")] = None,
    xray_threshold: Annotated[Optional[float], typer.Option("--xray-threshold")] = None,
    config: ConfigOption = None,
) -> None:
    """Stream spilled records again, into the same scan's counted file."""
    from stemstream.deploy.session import mark_replayed, replay_target
    from stemstream.deploy.sources import ProducerSource

    cfg = read_config(config)
    if nodes is not None:
        cfg.pipeline.nodes = nodes
    if background_threshold is not None or xray_threshold is not None:
        cfg.counting.background_threshold = background_threshold
        cfg.counting.xray_threshold = xray_threshold
    if not output.is_dir():
        raise UserError(f"the output directory {output} does not exist")
    cfg.pipeline.output_dir = str(output.resolve())
    validated(cfg)
    target = replay_target(spill_dir, Path(cfg.pipeline.output_dir))
    if target.file is not None:
        console.print(f"replaying {spill_dir} into {target.file}")
    ok = stream_locally(cfg, ProducerSource(replay=[spill_dir]), [target.scan], resume=target.file is not None,
                        file_name=target.file.name if target.file is not None else None)
    if not ok:
        raise typer.Exit(1)
    mark_replayed(spill_dir)


def stream_locally(cfg: PipelineConfig, source: ProducerSource, plan: list[PlannedScan], dashboard: bool = False,
                   resume: bool = False, file_name: str | None = None) -> bool:
    """Start every role on this host, stream the scans of ``plan``, print each one's summary.
    True if every frame of every scan was accounted for."""
    from stemstream.deploy.kernels import compile_kernels
    from stemstream.deploy.scan import PipelineError
    from stemstream.deploy.session import LocalSession

    session = LocalSession(cfg, source, dashboard=dashboard)
    if session.no_dashboard:
        console.print(f"[yellow]{session.no_dashboard}: running without the dashboard[/]")
    all_ok = True
    with console.status("compiling the kernels (about a minute on a fresh install; a second after that)..."):
        compile_kernels(cfg, source)
    with session:
        try:
            with console.status("starting the roles..."):
                session.start()
            _announce_dashboard(session)
            for scan in plan:
                with scan_progress(scan.number, scan.frames, session.status()) as progress:
                    summary = session.run_scan(scan, progress=progress, resume=resume, file_name=file_name)
                console.print(stream_summary(summary, session.status()))
                all_ok &= summary.get("state") == "closed" and accounted(summary.get("ledger", {}))
        except PipelineError as exc:
            raise UserError(str(exc)) from None
    return all_ok


def _announce_dashboard(session: LocalSession) -> None:
    if session.dashboard_url:
        line = f"dashboard: [bold]{session.dashboard_url}[/] (while the pipeline runs)"
        if session.new_token:
            line += f"; token for starting scans: {session.new_token}"
        console.print(line, highlight=False, soft_wrap=True)
    elif session.dashboard_failed:
        console.print(f"[yellow]{session.dashboard_failed}; going on without the dashboard[/]",
                      highlight=False, soft_wrap=True)
