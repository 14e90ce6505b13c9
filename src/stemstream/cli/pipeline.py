"""The roles of the streaming pipeline, one command each, as a host of a deployment starts them:
``control``, ``writer``, ``node``, ``gateway``, ``producer``."""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from stemstream.cli.support import ConfigOption, UserError, guarded, read_config
from stemstream.core.detector import N_MODULES


def role_command(role: Callable[..., None]) -> Callable[..., None]:
    """A role's command (see :func:`guarded`): a config the role cannot use, a port another
    program holds or an address this host does not have are the config's fault, not a bug, so
    one sentence naming them rather than a traceback."""

    @functools.wraps(role)
    def run_role(*args, **kwargs) -> None:
        import zmq

        from stemstream.core.config import ConfigError

        try:
            role(*args, **kwargs)
        except ConfigError as exc:
            raise UserError(str(exc)) from None
        except zmq.ZMQError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"cannot listen: {exc} (another program holds that port; "
                                "choose other ports in [network])") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"cannot listen: {exc} (this host has no such address; check [network] hosts)") from None
            raise

    return guarded(run_role)


@role_command
def control(config: ConfigOption = None) -> None:
    """Run the control role (scan lifecycle, calibration, status)."""
    from stemstream.pipeline.control.service import Control

    Control(read_config(config)).serve()


@role_command
def writer(config: ConfigOption = None) -> None:
    """Run the writer role (one counted file per scan)."""
    from stemstream.pipeline.writer.role import Writer

    Writer(read_config(config)).run()


@role_command
def node(config: ConfigOption = None,
         index: Annotated[Optional[int], typer.Option("--index", help="Node group number, 0-based (default: the rank srun/mpirun gave this task, else 0).")] = None,
         advertise_host: Annotated[str, typer.Option(
             "--advertise-host", help="Address the producers and gateway reach this node group at, told to "
                                      "control (default: [network] node_hosts[index], else host).")] = "",
         workers: Annotated[Optional[int], typer.Option("--workers", help="Counting threads (default: [counting] workers).")] = None) -> None:
    """Run one node group (reassemble, count, send events). It registers with control and
    is used by the scans that start after that."""
    from stemstream.deploy.launcher import LauncherError, node_index
    from stemstream.pipeline.node.role import NodeGroup

    cfg = read_config(config)
    try:
        i = node_index(index, cfg.network.node_base_port)
    except LauncherError as exc:
        raise UserError(str(exc)) from None
    if workers is not None:
        if workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}")
        cfg.counting.workers = workers
    NodeGroup(cfg, i, advertise_host=advertise_host).start().run()


@role_command
def gateway(config: ConfigOption = None,
            index: Annotated[int, typer.Option("--index", help="Which gateway, 0-based, when [network] gateway_hosts "
                                                               "names several (gateway g forwards modules m % n = g).")] = 0) -> None:
    """Run a gateway (routes producers' data to node groups)."""
    from stemstream.pipeline.gateway import Gateway

    cfg = read_config(config)
    if not 0 <= index < cfg.network.gateways:
        raise UserError(f"--index {index} must be 0 to {cfg.network.gateways - 1} "
                        f"([network] gateway_hosts names {cfg.network.gateways} gateway(s))")
    Gateway(cfg, index).run()


@role_command
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
    from stemstream.deploy.sources import ProducerSource
    from stemstream.pipeline.producer import Producer

    cfg = read_config(config)
    if not 0 <= module < N_MODULES:
        raise UserError(f"--module must be 0 to {N_MODULES - 1}, got {module}")
    source = ProducerSource(replay=replay, dose=dose, seed=seed, rate=rate, drop_sectors=drop_sectors)
    Producer(cfg, module, source.factory(module)).run()
