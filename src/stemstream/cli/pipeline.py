"""Command-line commands of the streaming pipeline: run, demo, replay, and each role alone."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from stemstream.cli.support import UserError, parse_shape, progress_bar, run_guarded

log = logging.getLogger("stemstream")
console = Console()

ConfigOption = Annotated[Optional[Path], typer.Option("--config", help="Pipeline config (TOML); default: everything on localhost.")]


def _load(config: Path | None):
    from stemstream.core.config import ConfigError
    from stemstream.deploy.settings import load_settings

    try:
        return load_settings(config)
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def _role_guard(job) -> None:
    import errno

    import zmq

    from stemstream.core.config import ConfigError

    def guarded() -> None:
        try:
            job()
        except ConfigError as exc:
            raise UserError(str(exc)) from None
        except zmq.ZMQError as exc:
            # A port another program holds, or an address this host does not have: the config's
            # fault, not a bug, so one sentence naming the address rather than a traceback.
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"cannot listen: {exc} (another program holds that port; "
                                "choose other ports in [network])") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"cannot listen: {exc} (this host has no such address; check [network] hosts)") from None
            raise

    run_guarded(guarded, Console(stderr=True))


def register(app: typer.Typer) -> None:
    @app.command()
    def control(config: ConfigOption = None) -> None:
        """Run the control role (scan lifecycle, calibration, status)."""
        from stemstream.pipeline.control.service import Control

        _role_guard(lambda: Control(_load(config)).serve())

    @app.command()
    def writer(config: ConfigOption = None) -> None:
        """Run the writer role (one counted file per scan)."""
        from stemstream.pipeline.writer.role import Writer

        _role_guard(lambda: Writer(_load(config)).run())

    @app.command()
    def node(config: ConfigOption = None,
             index: Annotated[Optional[int], typer.Option("--index", help="Node group number, 0-based (default: the rank srun/mpirun gave this task, else 0).")] = None,
             advertise_host: Annotated[str, typer.Option(
                 "--advertise-host", help="Address the producers and gateway reach this node group at, told to "
                                          "control (default: [network] node_hosts[index], else host).")] = "",
             workers: Annotated[Optional[int], typer.Option("--workers", help="Counting threads (default: [counting] workers).")] = None) -> None:
        """Run one node group (reassemble, count, send events). It registers with control and
        is used by the scans that start after that."""
        from stemstream.deploy.launcher import LauncherError, launcher_rank
        from stemstream.pipeline.node.role import NodeGroup

        def job() -> None:
            cfg = _load(config)
            i, source = index, f"--index {index}"
            if i is None:
                try:
                    found = launcher_rank()
                except LauncherError as exc:
                    raise UserError(str(exc)) from None
                i, source = (found[0], f"the launcher's rank {found[1]}={found[0]}") if found else (0, "--index 0")
            last = (65535 - 3 - cfg.network.node_base_port) // 4
            if not 0 <= i <= last:
                raise UserError(f"{source} must be 0 to {last} (node group i listens on node_base_port + 4 i + module)")
            if workers is not None:
                if workers < 1:
                    raise UserError(f"--workers must be at least 1, got {workers}")
                cfg.counting.workers = workers
            NodeGroup(cfg, i, advertise_host=advertise_host).run()

        _role_guard(job)

    @app.command()
    def gateway(config: ConfigOption = None,
                index: Annotated[int, typer.Option("--index", help="Which gateway, 0-based, when [network] gateway_hosts "
                                                                   "names several (gateway g forwards modules m % n = g).")] = 0) -> None:
        """Run a gateway (routes producers' data to node groups)."""
        from stemstream.pipeline.gateway import Gateway

        def job() -> None:
            cfg = _load(config)
            if not 0 <= index < cfg.network.gateways:
                raise UserError(f"--index {index} must be 0 to {cfg.network.gateways - 1} "
                                f"([network] gateway_hosts names {cfg.network.gateways} gateway(s))")
            Gateway(cfg, index).run()

        _role_guard(job)

    @app.command()
    def producer(
        config: ConfigOption = None,
        module: Annotated[int, typer.Option("--module", help="Detector module (sector) 0-3.")] = 0,
        replay: Annotated[Optional[list[Path]], typer.Option("--replay", help="Raw files or directories to stream instead of the simulator.")] = None,
        dose: Annotated[float, typer.Option(help="Simulator dose, electrons/pixel/frame.")] = 0.002,
        seed: Annotated[int, typer.Option(help="Simulator seed.")] = 0,
        rate: Annotated[float, typer.Option(help="Simulator frame rate, frames/s (0: as fast as possible).")] = 0.0,
        drop_sectors: Annotated[float, typer.Option("--drop-sectors", help="Simulated sector loss probability.")] = 0.0,
    ) -> None:
        """Run one producer (stands in for one receiver server)."""
        from stemstream.pipeline.producer import Producer
        from stemstream.sources.modules import ReplayModule, SimulatedModule

        def job() -> None:
            cfg = _load(config)
            if not 0 <= module <= 3:
                raise UserError(f"--module must be 0 to 3, got {module}")
            if replay:
                def factory(spec):
                    return ReplayModule(replay, module, int(spec["block_frames"]), int(spec["scan"]))
            else:
                def factory(spec):
                    return SimulatedModule(spec, module, dose=dose, seed=seed + int(spec["scan"]), rate=rate,
                                           drop_sector_probability=drop_sectors)

                def warm_up() -> None:
                    spec = {"scan_shape": [1, 1], "frames_per_position": 1, "scan": 0, "block_frames": 1}
                    list(SimulatedModule(spec, module).blocks())

                factory.warm_up = warm_up
            Producer(cfg, module, factory).run()

        _role_guard(job)

    @app.command()
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

        def job() -> None:
            cfg = _load(config)
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
            _validate(cfg)
            ok = run_locally(cfg, simulate, replay, scans, frames_per_position, dose, seed, dashboard=not no_dashboard)
            if not ok:
                raise typer.Exit(1)

        run_guarded(job, console)

    @app.command()
    def demo(
        output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the counted file.")] = Path("."),
        scan_shape: Annotated[str, typer.Option("--scan-shape", help="Scan positions ROWSxCOLS.")] = "128x128",
        no_dashboard: Annotated[bool, typer.Option("--no-dashboard", help="Do not start the web dashboard.")] = False,
    ) -> None:
        """A simulated scan streamed through every role on this machine: the first thing to run."""

        def job() -> None:
            cfg = _load(None)
            output.mkdir(parents=True, exist_ok=True)
            cfg.pipeline.output_dir = str(output.resolve())
            console.print("[bold]stemstream demo[/]: simulating a 4D Camera scan and streaming it through "
                          "4 producers, a gateway, 2 node groups and a writer on this machine.")
            ok = run_locally(cfg, scan_shape, None, 1, 1, 0.002, 0, dashboard=not no_dashboard)
            if not ok:
                raise typer.Exit(1)

        run_guarded(job, console)

    _register_replay(app)


def _register_replay(app: typer.Typer) -> None:
    @app.command()
    def replay(
        spill_dir: Annotated[Path, typer.Argument(help="A scan's spill directory (spill/scan_NNNNN) or raw files.")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Directory holding the scan's counted file.")] = Path("."),
        nodes: Annotated[Optional[int], typer.Option("--nodes", help="Node groups (default: config, 2).")] = None,
        background_threshold: Annotated[Optional[float], typer.Option("--background-threshold")] = None,
        xray_threshold: Annotated[Optional[float], typer.Option("--xray-threshold")] = None,
        config: ConfigOption = None,
    ) -> None:
        """Stream spilled records again, into the same scan's counted file."""

        def job() -> None:
            cfg = _load(config)
            if nodes is not None:
                cfg.pipeline.nodes = nodes
            if background_threshold is not None or xray_threshold is not None:
                cfg.counting.background_threshold = background_threshold
                cfg.counting.xray_threshold = xray_threshold
            if not output.is_dir():
                raise UserError(f"the output directory {output} does not exist")
            cfg.pipeline.output_dir = str(output.resolve())
            _validate(cfg)
            ok = replay_locally(cfg, spill_dir)
            if not ok:
                raise typer.Exit(1)

        run_guarded(job, console)


def replay_locally(cfg, spill_dir: Path) -> bool:
    """Replay a spill directory into its scan's existing file (found in the output directory by
    scan number); the directory is renamed ``*.replayed`` afterwards so it is not replayed twice."""
    from stemstream.formats.sparse_h5 import read_counted
    from stemstream.formats.raw_scan import RawScan

    with RawScan([spill_dir]) as raw:
        number, shape, fpp = raw.scan_number, raw.scan_shape, raw.frames_per_position
    existing = sorted(Path(cfg.pipeline.output_dir).glob(f"*_{number:05d}.h5"), key=lambda p: p.stat().st_mtime)
    file_name = existing[-1].name if existing else None
    if file_name:
        fpp = max(fpp, read_counted(existing[-1]).frames_per_position)
        console.print(f"replaying {spill_dir} into {existing[-1]}")
    ok = run_locally(cfg, None, spill_dir, 1, fpp, 0.0, 0,
                     plan=[(number, shape, fpp)], resume=file_name is not None, file_name=file_name)
    if ok:
        spill_dir.rename(spill_dir.with_name(spill_dir.name + f".replayed-{time.strftime('%Y%m%d%H%M%S')}"))
    return ok


def shared_memory_fits(cfg) -> bool:
    """Whether shm_dir can hold the 4 producers' segments (with room to spare); if not, the blocks
    go through the sockets (a container's /dev/shm is often 64 MB)."""
    from stemstream.formats.raw import N_MODULES
    from stemstream.pipeline.producer import ring_slots
    from stemstream.transport.shared_memory import segment_bytes

    directory = Path(cfg.network.shm_dir)
    if not directory.is_dir():
        return False
    need = N_MODULES * segment_bytes(cfg.pipeline.block_frames, ring_slots(cfg))
    if shutil.disk_usage(directory).free < 2 * need:
        log.warning("%s has too little room for shared memory (%.0f MiB needed); blocks go through the sockets",
                    directory, 2 * need / 2**20)
        return False
    return True


def _validate(cfg) -> None:
    from stemstream.core.config import ConfigError

    try:
        cfg.validate()
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def run_locally(cfg, simulate: str | None, replay: Path | None, n_scans: int, frames_per_position: int,
                dose: float, seed: int, plan: list | None = None, resume: bool = False,
                file_name: str | None = None, dashboard: bool = False) -> bool:
    """Start the local pipeline, stream the scans, print summaries. True if every frame of every
    scan was accounted for."""
    from stemstream.deploy.local import LocalPipeline, PipelineError, ProducerSource
    from stemstream.pipeline.writer.role import check_output_dir
    from stemstream.cli.reports import stream_summary

    check_output_dir(Path(cfg.pipeline.output_dir))  # fail now, not after the roles started

    if replay is not None:
        from stemstream.formats.raw_scan import RawScan

        if plan is None:
            with RawScan([replay]) as raw:
                plan = [(raw.scan_number, raw.scan_shape, raw.frames_per_position)]
        source = ProducerSource(replay=[replay])
    else:
        shape = parse_shape(simulate, "--simulate")
        plan = [(k + 1, shape, frames_per_position) for k in range(n_scans)]
        source = ProducerSource(dose=dose, seed=seed)
    work = Path(tempfile.mkdtemp(prefix="stemstream-run-"))
    if cfg.network.transport == "tcp" and cfg.network.host in ("127.0.0.1", "localhost") and not cfg.network.ipc_dir:
        # Every role is on this host: Unix domain sockets cost about half the CPU of TCP, and
        # blocks of sectors go through shared memory instead of through the sockets.
        cfg.network.transport = "ipc"
        cfg.network.ipc_dir = str(work / "sockets")
        Path(cfg.network.ipc_dir).mkdir()
        cfg.network.shared_memory = shared_memory_fits(cfg)
    if cfg.pipeline.spill_dir == "spill":  # the default: beside the counted files
        cfg.pipeline.spill_dir = str(Path(cfg.pipeline.output_dir) / "spill")
    all_ok = True
    token, token_generated = _dashboard_setup(cfg) if dashboard else ("", False)
    pipeline = LocalPipeline(cfg, work, source, dashboard=dashboard and bool(token), dashboard_token=token)
    try:
        t0 = time.monotonic()
        with console.status("starting the roles..."):
            pipeline.start()
        log.info("roles started in %.1f s", time.monotonic() - t0)
        _announce_dashboard(pipeline, token if token_generated else None)
        for number, shape, fpp in plan:
            total = shape[0] * shape[1] * fpp
            with progress_bar(console, f"scan {number}", total) as advance:
                def progress(status, advance=advance):
                    advance(min(_frames_counted(status) - progress.base, total))
                progress.base = _frames_counted(pipeline.status())
                summary = pipeline.run_scan(number, shape, fpp, progress=progress, resume=resume, file_name=file_name)
            console.print(stream_summary(summary, pipeline.status()))
            ledger = summary.get("ledger", {})
            all_ok &= summary.get("state") == "closed" and _accounted(ledger)
    except PipelineError as exc:
        raise UserError(str(exc)) from None
    finally:
        pipeline.stop()
    return all_ok


# -- the dashboard of run / demo ---------------------------------------------------------------------


def _dashboard_setup(cfg) -> tuple[str, bool]:
    """Pick the dashboard's port (the configured one or the next free one) and its token; ("", False)
    when no port is free (the run goes on without a dashboard)."""
    from stemstream.web.server import free_port, resolve_token

    port = free_port("127.0.0.1", cfg.network.dashboard_port)
    if port is None:
        console.print(f"[yellow]no free port from {cfg.network.dashboard_port} on: running without the dashboard[/]")
        return "", False
    cfg.network.dashboard_port = port
    return resolve_token(None)


def _announce_dashboard(pipeline, token: str | None) -> None:
    if pipeline.dashboard_url:
        line = f"dashboard: [bold]{pipeline.dashboard_url}[/] (while the pipeline runs)"
        if token:
            line += f"; token for starting scans: {token}"
        console.print(line, highlight=False, soft_wrap=True)
    elif pipeline.dashboard and pipeline.dashboard_failed:
        console.print(f"[yellow]{pipeline.dashboard_failed}; going on without the dashboard[/]",
                      highlight=False, soft_wrap=True)


def _frames_counted(status: dict) -> int:
    return sum(r["stats"].get("counters", {}).get("frames_counted", 0)
               for k, r in status["roles"].items() if k.startswith("node"))


def _accounted(ledger: dict) -> bool:
    return (ledger.get("frames_complete", -1) == ledger.get("frames_expected")
            and ledger.get("frames_incomplete", 1) == 0
            and sum(ledger.get("sectors_rejected", [1])) == 0)
