"""A pipeline that one command starts on this host and streams its scans through (``stemstream
run``, ``demo`` and ``replay``): which scans, the settings that make the roles fast when they all
share one host, the dashboard beside them, and where a replay's records go.

The command line calls these with plain values and prints what they return; nothing here prints.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stemstream.core.config import PipelineConfig, PipelineSettings
from stemstream.core.detector import N_MODULES
from stemstream.deploy.local import LocalPipeline
from stemstream.deploy.sources import ProducerSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedScan:
    """One scan to stream: its number, shape (rows, cols) of positions, frames at each."""

    number: int
    shape: tuple[int, int]  # (rows, cols)
    frames_per_position: int = 1

    @property
    def frames(self) -> int:
        return self.shape[0] * self.shape[1] * self.frames_per_position


def simulated_scans(shape: tuple[int, int], count: int, frames_per_position: int = 1) -> list[PlannedScan]:
    """``count`` simulated scans of ``shape`` (rows, cols), numbered from 1."""
    return [PlannedScan(k + 1, shape, frames_per_position) for k in range(count)]


def recorded_scan(path: Path) -> PlannedScan:
    """The scan that raw files (or a spill directory) hold, from their records' headers."""
    from stemstream.formats.raw_scan import RawScan

    with RawScan([path]) as raw:
        return PlannedScan(raw.scan_number, raw.scan_shape, raw.frames_per_position)


def shared_memory_fits(config: PipelineConfig) -> bool:
    """Whether shm_dir can hold the producers' segments (with room to spare); if not, the blocks
    go through the sockets (a container's /dev/shm is often 64 MB)."""
    from stemstream.pipeline.producer import ring_slots
    from stemstream.transport.shared_memory import segment_bytes

    directory = Path(config.network.shm_dir)
    if not directory.is_dir():
        return False
    need = N_MODULES * segment_bytes(config.pipeline.block_frames, ring_slots(config))
    if shutil.disk_usage(directory).free < 2 * need:
        log.warning("%s has too little room for shared memory (%.0f MiB needed); blocks go through the sockets",
                    directory, 2 * need / 2**20)
        return False
    return True


def tune_for_one_host(config: PipelineConfig, work_dir: Path) -> None:
    """Change ``config`` for roles that all run on this host: Unix domain sockets under
    ``work_dir`` and shared memory where it asks for TCP on loopback without an ipc_dir, and the
    spill directory beside the counted files where it keeps the default."""
    network = config.network
    if network.transport == "tcp" and network.host in ("127.0.0.1", "localhost") and not network.ipc_dir:
        # Unix domain sockets cost about half the CPU of TCP, and blocks of sectors go through
        # shared memory instead of through the sockets.
        network.transport = "ipc"
        network.ipc_dir = str(work_dir / "sockets")
        Path(network.ipc_dir).mkdir()
        network.shared_memory = shared_memory_fits(config)
    if config.pipeline.spill_dir == PipelineSettings.spill_dir:
        config.pipeline.spill_dir = str(Path(config.pipeline.output_dir) / "spill")


class LocalSession:
    """Every role on this host (a :class:`LocalPipeline` in a new work directory), set up by
    :func:`tune_for_one_host`, with the dashboard when asked for and a port is free. The config
    passed in is not changed. Use it as a context manager: leaving it stops every role."""

    def __init__(self, config: PipelineConfig, source: ProducerSource, dashboard: bool = False):
        from stemstream.pipeline.writer.role import check_output_dir

        check_output_dir(Path(config.pipeline.output_dir))  # fail now, not after the roles started
        config = copy.deepcopy(config)
        work_dir = Path(tempfile.mkdtemp(prefix="stemstream-run-"))
        tune_for_one_host(config, work_dir)
        self.no_dashboard = ""  # why there is no dashboard although one was asked for
        self.new_token: str | None = None  # the dashboard's token when made up here (to be shown)
        token = self._dashboard_token(config) if dashboard else ""
        self.pipeline = LocalPipeline(config, work_dir, source, dashboard=bool(token), dashboard_token=token)

    def _dashboard_token(self, config: PipelineConfig) -> str:
        """Move the dashboard to the configured port or the next free one; its token ("" when no
        port is free: the run goes on without a dashboard)."""
        from stemstream.web.server import free_port, resolve_token

        port = free_port("127.0.0.1", config.network.dashboard_port)
        if port is None:
            self.no_dashboard = f"no free port from {config.network.dashboard_port} on"
            return ""
        config.network.dashboard_port = port
        token, generated = resolve_token(None)
        self.new_token = token if generated else None
        return token

    @property
    def dashboard_url(self) -> str | None:
        return self.pipeline.dashboard_url

    @property
    def dashboard_failed(self) -> str:
        """Why the dashboard's process ended ("" while it runs, or when there is none)."""
        return self.pipeline.dashboard_failed

    def start(self) -> None:
        """Start every role; PipelineError when one does not check in."""
        t0 = time.monotonic()
        self.pipeline.start()
        log.info("roles started in %.1f s", time.monotonic() - t0)

    def run_scan(self, scan: PlannedScan, progress: Callable[[dict], None] | None = None, resume: bool = False,
                 file_name: str | None = None) -> dict:
        """Stream one scan and wait for its file; the writer's summary with ``state`` added."""
        return self.pipeline.run_scan(scan.number, scan.shape, scan.frames_per_position, progress=progress,
                                      resume=resume, file_name=file_name)

    def status(self) -> dict:
        """Control's status: every role's counters, every scan's state."""
        return self.pipeline.status()

    def __enter__(self) -> LocalSession:
        return self

    def __exit__(self, *exc) -> None:
        self.pipeline.stop()


# -- replaying a spill directory ---------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayTarget:
    """Where a replay streams to: the scan, and its existing counted file (None: a new file)."""

    scan: PlannedScan
    file: Path | None


def replay_target(spill_dir: Path, output_dir: Path) -> ReplayTarget:
    """The scan that ``spill_dir`` holds, going into the newest counted file of that scan number in
    ``output_dir`` when there is one (its frames per position if the spill has fewer)."""
    from stemstream.formats.sparse_h5 import read_counted

    scan = recorded_scan(spill_dir)
    existing = sorted(output_dir.glob(f"*_{scan.number:05d}.h5"), key=lambda p: p.stat().st_mtime)
    if not existing:
        return ReplayTarget(scan, None)
    fpp = max(scan.frames_per_position, read_counted(existing[-1]).frames_per_position)
    return ReplayTarget(PlannedScan(scan.number, scan.shape, fpp), existing[-1])


def mark_replayed(spill_dir: Path) -> Path:
    """Rename a replayed spill directory ``<name>.replayed-<time>``, so it is not replayed twice."""
    done = spill_dir.with_name(spill_dir.name + f".replayed-{time.strftime('%Y%m%d%H%M%S')}")
    spill_dir.rename(done)
    return done
