"""What every pipeline role shares: heartbeats to control, the scans it has heard of, counters."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter

import psutil
import zmq

from stemstream.core.config import PipelineConfig
from stemstream.transport.curve import curve_for
from stemstream.transport.messages import MessageError
from stemstream.transport.control_client import ControlClient, ControlUnavailable

log = logging.getLogger(__name__)

# Kernel socket buffers of the data path: a few MB cut the system calls per message of sectors.
_KERNEL_BUFFER_BYTES = 4 * 1024 * 1024


class Role:
    """Base of producer, gateway, node group and writer. Subclasses call :meth:`tick` often."""

    name = "role"

    def __init__(self, config: PipelineConfig, index: int = 0, context: zmq.Context | None = None):
        self.config = config
        self.index = index
        self.context = context or zmq.Context.instance()
        self.curve = curve_for(config)  # None unless [security] curve = true
        self.control = ControlClient(config.network.control(), self.context, timeout_s=2.0, curve=self.curve)
        self.scan_specs: dict[int, dict] = {}
        self.finished: set[tuple[int, int]] = set()  # (scan, epoch) this role is done with
        self.counters: Counter = Counter()
        self.rejected: Counter = Counter()
        self.shutdown = False
        self.role_ages: dict[str, float] = {}  # seconds since each role's last heartbeat, per control
        self.role_ages_at = 0.0
        self.live_wanted = False  # someone (the dashboard) is watching live images
        self.open_scans: set[int] = set()  # scans control had open at the last heartbeat
        self.acks: dict[int, list] = {}  # scan -> block ranges the writer has committed
        self._next_heartbeat = 0.0
        self._control_missing_since: float | None = None
        self.control_instance: str | None = None  # control's process id; a new one: it restarted
        self._process = psutil.Process(os.getpid())
        self.peak_rss = 0
        self.peak_private = 0

    def stats(self) -> dict:
        """What this role reports in its heartbeats (subclasses add to it)."""
        memory = self._process.memory_info()
        rss = memory.rss
        self.peak_rss = max(self.peak_rss, rss)
        # RSS counts the pages of shared-memory segments this role has touched (the producers'
        # blocks, see pipeline.shared_memory); what the role holds alone is rss - shared.
        self.peak_private = max(self.peak_private, rss - memory.shared)
        cpu = self._process.cpu_times()
        if self.curve is not None:
            self.counters["connections_refused"] = self.curve.refused(self.context)
        return {"counters": dict(self.counters), "rejected": dict(self.rejected), "rss": rss, "peak_rss": self.peak_rss,
                "peak_private": self.peak_private,
                "pid": os.getpid(), "cpu_s": cpu.user + cpu.system}

    def tick(self, interval_s: float | None = None) -> None:
        """Heartbeat when due (every ``interval_s``, default the config's heartbeat); learn open
        scans and whether to shut down."""
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + (self.config.flow.heartbeat_s if interval_s is None else interval_s)
        try:
            reply = self.control.request("heartbeat", timeout_s=1.0, role=self.name, id=self.index, stats=self.stats(),
                                         **self.registration())
        except ControlUnavailable as exc:
            if self._control_missing_since is None:
                self._control_missing_since = now
                log.warning("%s %d: %s; carrying on", self.name, self.index, exc)
            return
        self._control_missing_since = None
        instance = reply.get("instance")
        if self.control_instance is not None and instance != self.control_instance:
            log.warning("%s %d: control was restarted", self.name, self.index)
            self.control_restarted()
        self.control_instance = instance
        for spec in reply.get("scans", []):
            self.scan_specs[int(spec["scan"])] = spec
        self.open_scans = {int(spec["scan"]) for spec in reply.get("scans", [])}
        self.acks = {int(k): v for k, v in reply.get("acks", {}).items()}
        if reply.get("shutdown"):
            self.shutdown = True
        self.role_ages = reply.get("ages", {})
        self.live_wanted = bool(reply.get("live_wanted", False))
        self.role_ages_at = now

    def control_restarted(self) -> None:
        """Control came back with what it had saved (pipeline.control_state); a role that told
        it more since (the writer's commits) tells it again."""

    def registration(self) -> dict:
        """What this role tells control about itself in every heartbeat (node groups: the host
        they listen on)."""
        return {}

    def leave(self) -> None:
        """Tell control this role is stopping on purpose (best effort)."""
        try:
            self.control.request("leave", timeout_s=1.0, role=self.name, id=self.index)
        except ControlUnavailable:
            pass

    def role_is_dead(self, key: str) -> bool:
        """True when control has not heard from role ``key`` (e.g. "producer-2") for several
        heartbeats (at least 5 s: a loaded machine delays heartbeats, and calling a slow producer
        dead costs frames). A role control never heard of is not called dead."""
        age = self.role_ages.get(key)
        if age is None:
            return False
        age += time.monotonic() - self.role_ages_at
        return age > max(10 * self.config.flow.heartbeat_s, 5.0)

    def is_finished(self, spec: dict) -> bool:
        return (int(spec["scan"]), int(spec["epoch"])) in self.finished

    def mark_finished(self, spec: dict) -> None:
        self.finished.add((int(spec["scan"]), int(spec["epoch"])))

    def scan_spec(self, scan: int, wait_s: float = 2.0, stream: int = 0) -> dict | None:
        """The spec of ``scan``: known already, or asked of control (None if control has none).
        A message of routing generation ``stream`` newer than the spec known here means that
        spec is out of date (a failover, or the scan number used again): control is asked."""
        spec = self.scan_specs.get(scan)
        if spec is not None and not self.is_finished(spec) and stream <= int(spec.get("generation", 0)):
            return spec
        try:
            reply = self.control.request("get_scan", timeout_s=wait_s, scan=scan)
        except ControlUnavailable:
            return None
        if reply.get("ok") and reply.get("state") == "running":
            self.scan_specs[scan] = reply["scan"]
            return reply["scan"]
        return None

    def data_socket(self, kind: int, hwm: int | None = None, linger_ms: int = 0) -> zmq.Socket:
        """A socket of the data path: bounded queue (high-water mark, in messages) and large
        kernel buffers, since its messages are blocks of sectors of a few MB. With CURVE on, a
        PULL socket (they all bind) is a CURVE server, a PUSH socket (they all connect) a client."""
        sock = self.context.socket(kind)
        if self.curve is not None:
            self.curve.server(sock) if kind == zmq.PULL else self.curve.client(sock)
        hwm = self.config.flow.send_hwm if hwm is None else hwm
        sock.setsockopt(zmq.SNDHWM if kind == zmq.PUSH else zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.SNDBUF if kind == zmq.PUSH else zmq.RCVBUF, _KERNEL_BUFFER_BYTES)
        sock.setsockopt(zmq.LINGER, linger_ms)
        return sock

    def _scan(self, number: int):
        """This role's state of scan ``number``, opened on first use; None if control has no
        such open scan. Roles that keep per-scan state override it."""
        raise NotImplementedError

    def known_scan(self, number: int):
        """Like :meth:`_scan`, but a message for a scan nobody opened is an error."""
        scan = self._scan(number)
        if scan is None:
            raise MessageError("unknown_scan", f"scan {number}")
        return scan

    def reject(self, reason: str, detail: str = "") -> None:
        """Count a rejected message; log the first few of each reason."""
        self.rejected[reason] += 1
        if self.rejected[reason] <= 3:
            log.warning("%s %d rejected a message (%s)%s", self.name, self.index, reason, f": {detail}" if detail else "")
