"""The embedded deployment: every role as a local process on loopback, started and stopped here.

Each role runs as ``python -m stemstream <role> --config pipeline.toml ...``, exactly as it would on
its own host; this module only writes the config, starts the processes, waits until every role
has checked in with control, runs scans through control and shuts everything down.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from stemstream.core.config import PipelineConfig
from stemstream.core.detector import MODULES
from stemstream.deploy.scan import PipelineError, required_roles, start_and_wait, wait_for_roles
from stemstream.deploy.sources import ProducerSource
from stemstream.transport.control_client import ControlClient, ControlUnavailable

log = logging.getLogger(__name__)


@dataclass
class LocalPipeline:
    config: PipelineConfig
    work_dir: Path
    source: ProducerSource = field(default_factory=ProducerSource)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    # The web dashboard as one more process (stemstream serve on [network] dashboard_port); it
    # is optional: if it cannot start, scans go on without it (see dashboard_failed).
    dashboard: bool = False
    dashboard_token: str = ""
    dashboard_failed: str = ""

    def __post_init__(self):
        self.work_dir = Path(self.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = self.work_dir / "logs"
        self.log_dir.mkdir(exist_ok=True)
        self.shm_dir: Path | None = None
        self.killed = False  # every process was sent SIGKILL: nothing is asked to stop any more
        self.config = copy.deepcopy(self.config)
        state = self.config.pipeline.state_file
        if state and not Path(state).is_absolute():  # this pipeline's own, not the current directory's
            self.config.pipeline.state_file = str(self.work_dir / state)
        if self.config.network.shared_memory:
            # A directory of this pipeline's own for the producers' segments: another pipeline
            # on this host never sees them, and stop() removes what a killed producer left.
            self.shm_dir = Path(tempfile.mkdtemp(prefix="stemstream-", dir=self.config.network.shm_dir))
            self.config.network.shm_dir = str(self.shm_dir)
        self.config_path = self.config.write(self.work_dir / "pipeline.toml")
        self.control = ControlClient.for_config(self.config, timeout_s=5.0)

    # -- processes --------------------------------------------------------------------------------

    def _start(self, key: str, args: list[str], env: dict | None = None) -> None:
        log_file = open(self.log_dir / f"{key}.log", "ab")
        cmd = [sys.executable, "-m", "stemstream", *args, "--config", str(self.config_path)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.processes[key] = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                               start_new_session=True)
        log_file.close()

    def expected_roles(self) -> set[str]:
        roles = required_roles(self.config)
        if self._dashboard_alive():
            roles.add("dashboard-0")
        return roles

    # -- the dashboard (optional) -----------------------------------------------------------------

    @property
    def dashboard_url(self) -> str | None:
        if not self.dashboard or self.dashboard_failed:
            return None
        return f"http://127.0.0.1:{self.config.network.dashboard_port}/"

    def _start_dashboard(self) -> None:
        env = {"STEMSTREAM_TOKEN": self.dashboard_token} if self.dashboard_token else {}
        self._start("dashboard", ["serve", "--exit-on-shutdown", "--port", str(self.config.network.dashboard_port)], env)

    def _dashboard_alive(self) -> bool:
        """True while the dashboard should check in; once its process ended, say why (once)."""
        proc = self.processes.get("dashboard")
        if proc is None or self.dashboard_failed:
            return False
        if proc.poll() is None:
            return True
        tail = (self.log_dir / "dashboard.log").read_text(errors="replace").strip().splitlines()[-2:]
        self.dashboard_failed = f"the dashboard exited with code {proc.returncode}: {' | '.join(tail)}"
        log.warning("%s; the scans go on without it", self.dashboard_failed)
        return False

    def start(self, timeout_s: float = 60.0) -> None:
        """Start every role and wait until all have checked in with control."""
        self.start_control()
        self.start_writer()
        for i in range(self.config.pipeline.nodes):
            self.start_node(i)
        if self.config.pipeline.gateway:
            for g in range(self.config.network.gateways):
                self.start_gateway(g)
        for m in MODULES:
            self._start(f"producer-{m}", ["producer", "--module", str(m), *self.source.arguments()])
        if self.dashboard:
            self._start_dashboard()
        self.wait_for_roles(self.expected_roles(), timeout_s)

    def start_control(self) -> None:
        """Start control (again, after it died: it takes its scans back from [pipeline] state_file)."""
        self._start("control", ["control"])

    def start_writer(self) -> None:
        """Start the writer (again, after it died: it takes over the open scans from its journal)."""
        self._start("writer", ["writer"])

    def start_gateway(self, index: int) -> None:
        """Start gateway ``index`` (again, after it died: the running scans are resent through it)."""
        self._start(f"gateway-{index}", ["gateway", "--index", str(index)])

    def start_node(self, index: int) -> None:
        """Start node group ``index`` (one more joins the scans that start after it registered)."""
        self._start(f"node-{index}", ["node", "--index", str(index)])

    def wait_for_roles(self, roles: set[str], timeout_s: float = 60.0) -> None:
        """Wait until every role in ``roles`` (e.g. "node-2") has checked in with control."""
        try:
            wait_for_roles(self.control, roles, self.config, timeout_s, check=self._check_alive,
                           where=f" (see the logs in {self.log_dir})")
        except ControlUnavailable as exc:
            raise PipelineError(f"control did not start within {timeout_s:g} s: {exc} (see {self.log_dir})") from None

    def _check_alive(self) -> None:
        for key, proc in self.processes.items():
            if proc.poll() is not None and key not in ("control", "dashboard") and not key.startswith("killed"):
                tail = (self.log_dir / f"{key}.log").read_text(errors="replace").strip().splitlines()[-3:]
                raise PipelineError(f"{key} exited with code {proc.returncode}: {' | '.join(tail)} "
                                    f"(see the logs in {self.log_dir})")

    def status(self) -> dict:
        return self.control.request("status", timeout_s=5.0)  # a loaded machine: a restarted control answers late

    def run_scan(self, scan_number: int, scan_shape: tuple[int, int], frames_per_position: int = 1,
                 progress: Callable[[dict], None] | None = None, timeout_s: float = 600.0,
                 resume: bool = False, file_name: str | None = None) -> dict:
        """Start a scan through control and wait until the writer closed it; returns its summary.

        scan_shape is (rows, cols).
        """
        return start_and_wait(self.control, scan_number, scan_shape, frames_per_position, progress, timeout_s,
                              resume, file_name, check=self._check_alive)

    def kill(self, key: str, sig: int = signal.SIGKILL) -> None:
        """Signal one role's process (fault injection)."""
        proc = self.processes[key]
        os.kill(proc.pid, sig)
        if sig == signal.SIGKILL:
            proc.wait(5)
            self.processes[f"killed-{key}"] = self.processes.pop(key)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask every role to stop through control; kill what is still running after ``timeout_s``;
        remove the shared memory. Safe to call more than once."""
        if self.running() and not self.killed:
            self.request_shutdown()
            self.wait_stopped(time.monotonic() + timeout_s)
        self.kill_all()

    def request_shutdown(self, timeout_s: float = 2.0) -> bool:
        """Tell control to stop every role (they hear it in their next heartbeat); False when
        control did not answer within ``timeout_s``."""
        self.control.close()  # a request an interrupt cut short must not leave its reply behind
        try:
            self.control.request("shutdown", timeout_s=timeout_s)
            return True
        except ControlUnavailable:
            return False

    def running(self) -> dict[str, subprocess.Popen]:
        """The processes that have not exited, by key."""
        return {key: proc for key, proc in self.processes.items() if proc.poll() is None}

    def wait_stopped(self, deadline: float, poll: Callable[[], None] | None = None) -> bool:
        """Wait until every process exited or ``deadline`` (time.monotonic()) passed; True if they
        all did. ``poll`` is called before each check (while control may still answer). Control
        lingers after a shutdown so that every role hears of it; once every other process is
        gone, it is ended here instead (its state file is written at each change)."""
        ended_control = False
        while True:
            if poll is not None:
                poll()
            left = self.running()
            if not left:
                return True
            if set(left) == {"control"} and not ended_control:
                left["control"].terminate()
                ended_control = True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def kill_now(self, spare: Collection[str] = ()) -> None:
        """SIGKILL every process not known to have ended, with whatever it started (each role
        leads a process group of its own), and remove the shared memory they held; with
        ``spare``, only the processes not named there, and the shared memory stays. Waits for
        nothing, so a signal handler may call it; :meth:`kill_all` also reaps them."""
        for key, proc in self.processes.items():
            if proc.returncode is None and key not in spare:  # not reaped, so the id is still this child's
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if not spare:
            self.killed = True
            if self.shm_dir is not None:
                shutil.rmtree(self.shm_dir, ignore_errors=True)

    def kill_all(self) -> None:
        """:meth:`kill_now`, then wait until every process has ended. Safe to call more than once."""
        self.kill_now()
        for proc in self.processes.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:  # stuck in the kernel: nothing more can be done here
                log.error("process %d did not end after SIGKILL", proc.pid)
        self.control.close()

    def __enter__(self) -> LocalPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
