"""Every role on this machine from one command: ``run`` (simulated or recorded scans), ``demo``
(the first thing to try) and ``replay`` (spilled records into their scan's file). What the
pipeline looks like on one host is decided in :mod:`stemstream.deploy.session`; this module
turns options into its arguments and prints what comes back."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from stemstream.cli.reports import accounted, stream_summary
from stemstream.cli.support import (
    ConfigOption, Killed, UserError, compiling_notice, console, guarded, interrupts, parse_shape, read_config,
    scan_progress, validated,
)

# How long the demo's simulated scan takes on a terminal: long enough to open the dashboard and
# watch the images form, short enough to wait for.
DEMO_SCAN_S = 25.0

METHOD = typer.Option("--method", help="Counting method: maxima (stempy's strict 3x3 maxima) or clusters "
                      "(coincident electrons counted; docs/counting.md). Default: the config's, maxima.")
KEEP_LOGS = typer.Option("--keep-logs", help="Keep the run's logs (kept anyway, and named, when it fails).")

if TYPE_CHECKING:
    from stemstream.core.config import PipelineConfig
    from stemstream.deploy.session import LocalSession, PlannedScan, Stopped
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
    method: Annotated[Optional[str], METHOD] = None,
    dose: Annotated[float, typer.Option(help="Simulator dose, electrons/pixel/frame.")] = 0.002,
    seed: Annotated[int, typer.Option(help="Simulator seed.")] = 0,
    no_gateway: Annotated[bool, typer.Option("--no-gateway", help="Producers send straight to node groups.")] = False,
    rate: Annotated[float, typer.Option("--rate", help="Simulated frames per second (0: as fast as possible).")] = 0.0,
    no_dashboard: Annotated[bool, typer.Option("--no-dashboard", help="Do not start the web dashboard.")] = False,
    keep_logs: Annotated[bool, KEEP_LOGS] = False,
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
                        ("sigma", sigma), ("xray_sigma", xray_sigma), ("samples", samples), ("method", method)):
        if value is not None:
            setattr(cfg.counting, name, value)
    output.mkdir(parents=True, exist_ok=True)
    cfg.pipeline.output_dir = str(output.resolve())
    if scans < 1:
        raise UserError(f"--scans must be at least 1, got {scans}")
    if rate < 0:
        raise UserError(f"--rate must be 0 or more frames per second, got {rate:g}")
    validated(cfg)
    if replay is not None:
        plan, source = [recorded_scan(replay)], ProducerSource(replay=[replay])
    else:
        plan = simulated_scans(parse_shape(simulate, "--simulate"), scans, frames_per_position)
        source = ProducerSource(dose=dose, seed=seed, rate=rate)
    if not stream_locally(cfg, source, plan, dashboard=not no_dashboard, keep_logs=keep_logs):
        raise typer.Exit(1)


@guarded
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the counted file.")] = Path("."),
    scan_shape: Annotated[str, typer.Option("--scan-shape", help="Scan positions ROWSxCOLS.")] = "128x128",
    pace: Annotated[Optional[float], typer.Option(
        "--pace", help=f"Seconds the simulated scan takes (0: as fast as possible; default {DEMO_SCAN_S:g} on a "
                       "terminal, to watch it on the dashboard, else 0).")] = None,
    no_dashboard: Annotated[bool, typer.Option("--no-dashboard", help="Do not start the web dashboard.")] = False,
    keep_logs: Annotated[bool, KEEP_LOGS] = False,
) -> None:
    """A simulated scan streamed through every role on this machine: the first thing to run. On a
    terminal the scan is paced to be watched on the dashboard, which stays up until Enter."""
    from stemstream.deploy.session import simulated_scans
    from stemstream.deploy.sources import ProducerSource

    cfg = read_config(None)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    seconds = (DEMO_SCAN_S if interactive and not no_dashboard else 0.0) if pace is None else pace
    if seconds < 0:
        raise UserError(f"--pace must be 0 or more seconds, got {seconds:g}")
    output.mkdir(parents=True, exist_ok=True)
    cfg.pipeline.output_dir = str(output.resolve())
    console.print("[bold]stemstream demo[/]: simulating a 4D Camera scan and streaming it through "
                  "4 producers, a gateway, 2 node groups and a writer on this machine.")
    plan = simulated_scans(parse_shape(scan_shape, "--scan-shape"), 1)
    source = ProducerSource(rate=plan[0].frames / seconds if seconds else 0.0)
    if not stream_locally(cfg, source, plan, dashboard=not no_dashboard, keep_logs=keep_logs,
                          linger=interactive and not no_dashboard):
        raise typer.Exit(1)


@guarded
def replay(
    spill_dir: Annotated[Path, typer.Argument(help="A scan's spill directory (spill/scan_NNNNN) or raw files.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory holding the scan's counted file.")] = Path("."),
    nodes: Annotated[Optional[int], typer.Option("--nodes", help="Node groups (default: config, 2).")] = None,
    background_threshold: Annotated[Optional[float], typer.Option("--background-threshold")] = None,
    xray_threshold: Annotated[Optional[float], typer.Option("--xray-threshold")] = None,
    keep_logs: Annotated[bool, KEEP_LOGS] = False,
    config: ConfigOption = None,
) -> None:
    """Stream spilled records again, into the same scan's counted file."""
    from stemstream.core.config import COUNTING_METHODS
    from stemstream.deploy.session import mark_replayed, replay_target
    from stemstream.deploy.sources import ProducerSource
    from stemstream.pipeline.writer.journal import JOURNAL_SUFFIX

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
    orphaned = sorted(Path(cfg.pipeline.output_dir).glob(f"*_{target.scan.number:05d}.h5{JOURNAL_SUFFIX}"))
    if orphaned:  # a replay's writer would take it for a stale journal and delete what it holds
        raise UserError(f"{orphaned[0]} holds frames a writer of scan {target.scan.number} committed before it "
                        f"died: run `stemstream recover {output}` first, then replay ({spill_dir} is left as it is)")
    if target.whole:
        raise UserError(f"{target.file} already holds every frame of scan {target.scan.number}: nothing to "
                        f"replay into it ({spill_dir} is left as it is)")
    if target.file is not None:
        console.print(f"replaying {spill_dir} into {target.file}")
    if target.method in COUNTING_METHODS:  # the frames added are counted as the file's were
        cfg.counting.method = target.method
    ok = stream_locally(cfg, ProducerSource(replay=[spill_dir]), [target.scan], resume=target.file is not None,
                        file_name=target.file_name, keep_logs=keep_logs)
    if not ok:
        raise typer.Exit(1)
    mark_replayed(spill_dir)


def stream_locally(cfg: PipelineConfig, source: ProducerSource, plan: list[PlannedScan], dashboard: bool = False,
                   resume: bool = False, file_name: str | None = None, keep_logs: bool = False,
                   linger: bool = False) -> bool:
    """Start every role on this host, stream the scans of ``plan``, print each one's summary;
    with ``linger``, keep the roles (and the dashboard) up afterwards until Enter or Ctrl-C. True
    if every frame of every scan was accounted for. The run's logs are removed after that unless
    ``keep_logs``, and kept (and named) otherwise. One Ctrl-C stops every role within 2 s and
    says what became of the scan; a second kills them at once."""
    from stemstream.deploy.session import LocalSession

    session = LocalSession(cfg, source, dashboard=dashboard)
    if session.no_dashboard:
        console.print(f"[yellow]{session.no_dashboard}: running without the dashboard[/]")
    ok, kept = False, None
    with interrupts(session.kill_now):
        try:
            try:
                ok = _stream_or_stop(session, cfg, source, plan, resume, file_name, linger)
            finally:
                kept = session.close(keep_logs=keep_logs or not ok)
        except Killed:  # a second Ctrl-C, while streaming or while stopping
            console.print("second Ctrl-C: every role killed, their shared memory removed")
            raise typer.Exit(130) from None
        finally:
            if kept is not None:
                console.print(f"logs: {kept}", highlight=False, soft_wrap=True)
    return ok


def _stream_or_stop(session: LocalSession, cfg: PipelineConfig, source: ProducerSource, plan: list[PlannedScan],
                    resume: bool, file_name: str | None, linger: bool) -> bool:
    """:func:`_stream`; on Ctrl-C, stop every role and say what became of the scan (exit 130)."""
    from stemstream.deploy.scan import PipelineError

    try:
        return _stream(session, cfg, source, plan, resume, file_name, linger)
    except KeyboardInterrupt:
        def waiting() -> None:
            console.print("waiting for the writer to close the scan's file (Ctrl-C again: kill it)")

        _print_stopped(session.interrupt(waiting=waiting), session.output_dir)
        raise typer.Exit(130) from None
    except PipelineError as exc:
        where = "" if str(session.log_dir) in str(exc) else f" (see the logs in {session.log_dir})"
        raise UserError(f"{exc}{where}") from None


def _stream(session: LocalSession, cfg: PipelineConfig, source: ProducerSource, plan: list[PlannedScan],
            resume: bool, file_name: str | None, linger: bool) -> bool:
    from stemstream.deploy.kernels import compile_kernels

    with compiling_notice("compiling counting kernels, first run only (about half a minute on 2 cores)...") as notice:
        compile_kernels(cfg, source, on_compile=notice)
    with console.status("starting the roles..."):
        session.start()
    _announce_dashboard(session)
    all_ok = True
    for scan in plan:
        with scan_progress(scan.number, scan.frames, session.status()) as progress:
            summary = session.run_scan(scan, progress=progress, resume=resume, file_name=file_name)
        console.print(stream_summary(summary, session.status()))
        all_ok &= summary.get("state") == "closed" and accounted(summary.get("ledger", {}))
    if linger and session.dashboard_url:
        console.print(f"the dashboard stays up at [bold]{session.dashboard_url}[/]: press Enter (or Ctrl-C) to stop",
                      highlight=False, soft_wrap=True)
        try:
            sys.stdin.readline()
        except KeyboardInterrupt:  # the way out asked for: not an interruption
            pass
    return all_ok


def _print_stopped(stopped: Stopped, output_dir: Path) -> None:
    """What one Ctrl-C left: how long the stop took, where the scan's file is and what it lacks."""
    from stemstream.formats.sparse_h5.layout import PARTIAL_SUFFIX

    console.print(f"stopped every role in {stopped.seconds:.1f} s"
                  + (f" (killed: {', '.join(stopped.killed)})" if stopped.killed else ""), highlight=False)
    if stopped.scan is None:
        return
    number = stopped.scan.number
    if stopped.summary is not None:
        ledger = stopped.summary.get("ledger") or {}
        expected = ledger.get("frames_expected", stopped.scan.frames)
        console.print(f"scan {number}: {stopped.summary['path']}: {ledger.get('frames_complete', 0):,} of "
                      f"{expected:,} frames complete, {ledger.get('frames_missing', 0):,} missing, "
                      f"{ledger.get('frames_incomplete', 0):,} incomplete", highlight=False, soft_wrap=True)
    elif stopped.left is not None:
        console.print(f"scan {number}: the writer did not finish its file: {stopped.left} is what it left"
                      + (f"; `stemstream recover {output_dir}` makes the counted file of what it had committed"
                         if stopped.left.name.endswith(PARTIAL_SUFFIX) else ""), highlight=False, soft_wrap=True)
    else:
        console.print(f"scan {number}: no file was written", highlight=False)
    if stopped.spilled:
        console.print(f"records sent but not yet in the file are in {stopped.spill}: `stemstream replay "
                      f"{stopped.spill} -o {output_dir}` adds them to it", highlight=False, soft_wrap=True)


def _announce_dashboard(session: LocalSession) -> None:
    if session.dashboard_url:
        line = f"dashboard: [bold]{session.dashboard_url}[/] (while the pipeline runs)"
        if session.new_token:
            line += f"; token for starting scans: {session.new_token}"
        console.print(line, highlight=False, soft_wrap=True)
    elif session.dashboard_failed:
        console.print(f"[yellow]{session.dashboard_failed}; going on without the dashboard[/]",
                      highlight=False, soft_wrap=True)
