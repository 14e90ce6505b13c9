"""``stemstream scan``: one scan on a pipeline that is already running, wherever its roles are.

At a facility the roles run on several hosts, each started with ``stemstream <role> --config
FILE``; this command needs only the same config file (for control's address) and asks control
to start a scan, then waits for the writer to close it and prints the same summary and ledger
as ``stemstream run``. The scan runs on the node groups alive when it starts: one that died
earlier is not waited for.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from stemstream.cli.reports import accounted, stream_summary
from stemstream.cli.support import UserError, console, guarded, parse_shape, read_config, scan_progress

if TYPE_CHECKING:
    from stemstream.core.config import PipelineConfig


@guarded
def scan(
    config: Annotated[Path, typer.Option("--config", help="The pipeline's config (TOML), as its roles were started with.")],
    shape: Annotated[str, typer.Option("--shape", help="Scan positions as ROWSxCOLS, e.g. 256x256.")],
    scan_number: Annotated[int, typer.Option("--scan-number", help="Scan number (in file names and headers).")] = 1,
    frames_per_position: Annotated[int, typer.Option("--frames-per-position", help="Frames at each scan position.")] = 1,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the scan's file to be closed.")] = 600.0,
    wait_roles: Annotated[float, typer.Option("--wait-roles", help="Seconds to wait for the roles to check in with control first (a node group that died is not waited for).")] = 30.0,
) -> None:
    """Start one scan on a running pipeline (roles on any hosts) and wait for its counted file."""
    cfg = read_config(config)
    rows_cols = parse_shape(shape, "--shape")
    if not 0 <= scan_number < 2**32:
        raise UserError(f"--scan-number must be 0 to {2**32 - 1}, got {scan_number}")
    if frames_per_position < 1:
        raise UserError(f"--frames-per-position must be at least 1, got {frames_per_position}")
    if not timeout > 0:
        raise UserError(f"--timeout must be a positive number of seconds, got {timeout:g}")
    if wait_roles < 0:
        raise UserError(f"--wait-roles must be 0 or more seconds, got {wait_roles:g}")
    if not run_scan_on(cfg, scan_number, rows_cols, frames_per_position, timeout, wait_roles):
        raise typer.Exit(1)


def run_scan_on(cfg: PipelineConfig, scan_number: int, scan_shape: tuple[int, int], frames_per_position: int,
                timeout_s: float, wait_roles_s: float) -> bool:
    """Run one scan (scan_shape is (rows, cols)) through the control of ``cfg``; print its summary.
    True if every frame was accounted for."""
    import zmq

    from stemstream.core.config import ConfigError
    from stemstream.deploy.scan import PipelineError, start_and_wait, wait_for_scan_roles
    from stemstream.transport.control_client import ControlClient, ControlUnavailable

    try:
        control = ControlClient.for_config(cfg, timeout_s=5.0)
    except ConfigError as exc:  # [security] curve with keys missing or unreadable
        raise UserError(str(exc)) from None
    try:
        try:
            with console.status("waiting for the roles to check in..."):
                absent = wait_for_scan_roles(control, cfg, wait_roles_s)
        except ControlUnavailable as exc:
            raise UserError(f"{exc}: is `stemstream control` running there and reachable?") from None
        if absent:
            console.print(f"[yellow]not answering: {', '.join(sorted(absent))}; the scan runs on the node "
                          "groups alive[/]", highlight=False)
        total = scan_shape[0] * scan_shape[1] * frames_per_position
        with scan_progress(scan_number, total, control.request("status")) as progress:
            summary = start_and_wait(control, scan_number, scan_shape, frames_per_position, progress, timeout_s)
        status = control.request("status")
    except ControlUnavailable as exc:
        raise UserError(f"{exc}: is `stemstream control` still running?") from None
    except PipelineError as exc:
        raise UserError(str(exc)) from None
    except zmq.ZMQError as exc:
        raise UserError(f"cannot talk to control at {control.endpoint}: {exc}") from None
    finally:
        control.close()
    console.print(stream_summary(summary, status, title="stemstream scan"))
    return summary.get("state") == "closed" and accounted(summary.get("ledger", {}))
