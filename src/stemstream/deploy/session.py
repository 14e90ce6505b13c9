"""A pipeline that one command starts on this host and streams its scans through (``stemstream
run``, ``demo`` and ``replay``): which scans, the settings that make the roles fast when they all
share one host, the dashboard beside them, and where a replay's records go.

The command line calls these with plain values and prints what they return; nothing here prints.
"""

from __future__ import annotations

import copy
import logging
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stemstream.core.config import PipelineConfig, PipelineSettings
from stemstream.core.detector import N_MODULES
from stemstream.core.scan_spec import ScanSpec, SpecError
from stemstream.deploy.local import LocalPipeline
from stemstream.deploy.sources import ProducerSource
from stemstream.formats.sparse_h5.layout import partial_path
from stemstream.pipeline.spill import spill_directory
from stemstream.pipeline.writer.files import INCOMPLETE_SUFFIX, incomplete_path, run_summary, stemstream_metadata, whole_name
from stemstream.transport.control_client import ControlUnavailable

log = logging.getLogger(__name__)

# One Ctrl-C: every role gone within 2 s (the writer closes the running scan's file in that time);
# the rest of the 2 s is for killing the roles still running then.
STOP_GRACE_S = 1.5
# ... except a writer still closing that scan's file: killed, it would leave the frames it had in
# a file no command can finish. Closing a 4096 x 4096 scan (its analyses and images) took 13-33 s
# on the loaded 2-core VM, so 15 s lost it; a second Ctrl-C still kills the writer at once.
WRITER_GRACE_S = 120.0
# The Unix domain sockets' folder in a session's work directory: removed whatever happens.
SOCKETS_DIR = "sockets"


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
        network.ipc_dir = str(work_dir / SOCKETS_DIR)
        Path(network.ipc_dir).mkdir()
        network.shared_memory = shared_memory_fits(config)
    if config.pipeline.spill_dir == PipelineSettings.spill_dir:
        config.pipeline.spill_dir = str(Path(config.pipeline.output_dir) / "spill")


class LocalSession:
    """Every role on this host (a :class:`LocalPipeline` in a new work directory, which holds its
    logs, config and sockets), set up by :func:`tune_for_one_host`, with the dashboard when asked
    for and a port is free. The config passed in is not changed. :meth:`close` (or leaving it as
    a context manager) stops every role and removes the work directory, or keeps its logs."""

    def __init__(self, config: PipelineConfig, source: ProducerSource, dashboard: bool = False):
        from stemstream.pipeline.writer.role import check_output_dir

        check_output_dir(Path(config.pipeline.output_dir))  # fail now, not after the roles started
        config = copy.deepcopy(config)
        self.work_dir = Path(tempfile.mkdtemp(prefix="stemstream-run-"))
        tune_for_one_host(config, self.work_dir)
        self.output_dir = Path(config.pipeline.output_dir)
        self.spill_dir = Path(config.pipeline.spill_dir)
        self.scan_running: PlannedScan | None = None  # the scan run_scan is waiting for
        self.no_dashboard = ""  # why there is no dashboard although one was asked for
        self.new_token: str | None = None  # the dashboard's token when made up here (to be shown)
        token = self._dashboard_token(config) if dashboard else ""
        self.pipeline = LocalPipeline(config, self.work_dir, source, dashboard=bool(token), dashboard_token=token)

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

    @property
    def log_dir(self) -> Path:
        """The folder of this run's logs (one file per role), named in every error."""
        return self.pipeline.log_dir

    def run_scan(self, scan: PlannedScan, progress: Callable[[dict], None] | None = None, resume: bool = False,
                 file_name: str | None = None) -> dict:
        """Stream one scan and wait for its file; the writer's summary with ``state`` added."""
        self.scan_running = scan
        summary = self.pipeline.run_scan(scan.number, scan.shape, scan.frames_per_position, progress=progress,
                                         resume=resume, file_name=file_name)
        self.scan_running = None
        return summary

    def status(self) -> dict:
        """Control's status: every role's counters, every scan's state."""
        return self.pipeline.status()

    def interrupt(self, grace_s: float = STOP_GRACE_S, writer_grace_s: float = WRITER_GRACE_S,
                  waiting: Callable[[], None] | None = None) -> Stopped:
        """Stop every role now: ask control to shut down, give the roles ``grace_s`` seconds to end,
        then kill whatever still runs, except a writer that is still closing the running scan's
        file: it gets until ``writer_grace_s`` (``waiting()`` is called when it does). Returns
        what became of the scan :meth:`run_scan` was waiting for."""
        t0 = time.monotonic()
        scan = self.scan_running
        watch = _ScanWatch(self.pipeline, scan.number if scan else None)
        self.pipeline.request_shutdown(timeout_s=min(0.5, grace_s / 2))
        self.pipeline.wait_stopped(t0 + grace_s, poll=watch)
        self.pipeline.kill_now(spare=("writer", "control"))
        if "writer" in self.pipeline.running() and scan is not None and watch.summary is None:
            if waiting is not None:
                waiting()  # the file matters more than the seconds: a second Ctrl-C still kills it
            self.pipeline.wait_stopped(t0 + writer_grace_s, poll=watch)
        self.pipeline.kill_all()
        killed = sorted(key for key, proc in self.pipeline.processes.items() if proc.returncode == -signal.SIGKILL)
        summary = watch.summary
        left = None if summary or watch.file_name is None else self._left_file(watch.file_name)
        if left is not None and watch.epoch is not None:  # closed, but control was gone before it heard
            summary = run_summary(left, scan.number, watch.epoch)
            left = None if summary else left
        return Stopped(scan, summary, left, killed, time.monotonic() - t0,
                       spill_directory(self.spill_dir, scan.number) if scan else None)

    def _left_file(self, file_name: str) -> Path | None:
        """The file a scan left when its writer did not report closing it: closed (whole or
        incomplete), or still being written (partial), or none."""
        path = self.output_dir / file_name
        for candidate in (path, incomplete_path(path), partial_path(path)):
            if candidate.exists():
                return candidate
        return None

    def kill_now(self) -> None:
        """SIGKILL every role and remove their shared memory, waiting for nothing (what a second
        Ctrl-C does, from a signal handler)."""
        self.pipeline.kill_now()

    def close(self, keep_logs: bool = False) -> Path | None:
        """Stop every role (killing them if a stop is interrupted), remove their sockets, and the
        work directory unless ``keep_logs``; returns the logs folder when it is kept."""
        try:
            self.pipeline.stop()
        except BaseException:  # a Ctrl-C while stopping: nothing may outlive the command
            self.pipeline.kill_all()
            raise
        finally:
            shutil.rmtree(self.work_dir / SOCKETS_DIR, ignore_errors=True)
            if not keep_logs:
                shutil.rmtree(self.work_dir, ignore_errors=True)
        return self.log_dir if keep_logs else None

    def __enter__(self) -> LocalSession:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(keep_logs=exc_type is not None)


@dataclass(frozen=True)
class Stopped:
    """What an interrupted session left: the scan that was running (None: none was), the
    writer's summary of it when the writer closed it on its way out, else the file it left (if
    any); the roles that had to be killed, how long the stop took, the scan's spill directory."""

    scan: PlannedScan | None
    summary: dict | None
    left: Path | None
    killed: list[str]
    seconds: float
    spill: Path | None

    @property
    def spilled(self) -> bool:
        return self.spill is not None and self.spill.is_dir()


class _ScanWatch:
    """Reads control's status while the roles stop, for the writer's summary of one scan (it
    reports closing the scan on its way out) and the scan's file name; asks at most every 0.1 s
    while the writer runs, and no more once control is gone."""

    def __init__(self, pipeline: LocalPipeline, number: int | None):
        self.pipeline = pipeline
        self.number = number
        self.summary: dict | None = None
        self.file_name: str | None = None
        self.epoch: int | None = None  # the scan's run (its file says which run wrote it)
        self._next = 0.0

    def __call__(self) -> None:
        if self.number is None or self.summary is not None or "control" not in self.pipeline.running():
            return
        writer = self.pipeline.processes.get("writer")
        if writer is not None and writer.poll() is None and time.monotonic() < self._next:
            return
        self._next = time.monotonic() + 0.1
        try:
            state = self.pipeline.control.request("status", timeout_s=0.2)["scans"].get(str(self.number), {})
        except (ControlUnavailable, KeyError):
            return
        if state.get("spec") is not None:
            try:
                spec = ScanSpec.from_wire(state["spec"])
            except SpecError:
                return
            self.file_name, self.epoch = spec.file_name, spec.epoch
        summary = state.get("summary") or {}
        if state.get("state") == "closed" and "path" in summary:
            self.summary = summary


# -- replaying a spill directory ---------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayTarget:
    """Where a replay streams to: the scan, and its existing counted file (None: a new file)."""

    scan: PlannedScan
    file: Path | None
    whole: bool = False  # the file already holds every frame of its scan: nothing to replay into it
    method: str | None = None  # how the file was counted ([counting] method), if it says

    @property
    def file_name(self) -> str | None:
        """The name the scan's file has once whole, which the resumed scan is started under (the
        writer finds the file by it, also when it is ``NAME.incomplete.h5``)."""
        return None if self.file is None else whole_name(self.file.name)


def replay_target(spill_dir: Path, output_dir: Path) -> ReplayTarget:
    """The scan that ``spill_dir`` holds, going into the newest counted file of that scan number in
    ``output_dir``, whole or incomplete, when there is one (its frames per position if the spill
    has fewer)."""
    from stemstream.formats.sparse_h5 import read_counted

    scan = recorded_scan(spill_dir)
    names = (f"*_{scan.number:05d}.h5", f"*_{scan.number:05d}{INCOMPLETE_SUFFIX}")
    existing = sorted((p for name in names for p in output_dir.glob(name)), key=lambda p: p.stat().st_mtime)
    if not existing:
        return ReplayTarget(scan, None)
    meta = stemstream_metadata(existing[-1])
    ledger = meta.get("ledger", {})
    # our files say it in their ledger (reading every frame of a big scan would take minutes)
    fpp = int(ledger.get("frames_per_position") or read_counted(existing[-1]).frames_per_position)
    whole = ledger.get("frames_expected") is not None and ledger.get("frames_complete") == ledger.get("frames_expected")
    return ReplayTarget(PlannedScan(scan.number, scan.shape, max(scan.frames_per_position, fpp)), existing[-1], whole,
                        meta.get("counting_method"))


def mark_replayed(spill_dir: Path) -> Path:
    """Rename a replayed spill directory ``<name>.replayed-<time>``, so it is not replayed twice."""
    done = spill_dir.with_name(spill_dir.name + f".replayed-{time.strftime('%Y%m%d%H%M%S')}")
    spill_dir.rename(done)
    return done
