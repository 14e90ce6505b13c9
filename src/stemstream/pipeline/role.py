"""What every pipeline role shares: heartbeats to control, the scans it has heard of, counters."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import Counter

import psutil
import zmq

from stemstream.core.config import PipelineConfig
from stemstream.core.detector import N_MODULES, RECORD_BYTES
from stemstream.core.scan_spec import ScanSpec, SpecError
from stemstream.transport.control_client import ControlClient, ControlUnavailable
from stemstream.transport.curve import curve_for
from stemstream.transport.messages import MessageError
from stemstream.transport.sockets import data_socket

log = logging.getLogger(__name__)


def message_size(parts: list) -> int:
    """Bytes of a message's parts (zmq frames, bytes or arrays)."""
    return sum(memoryview(p).nbytes for p in parts)


class Role:
    """Base of producer, gateway, node group and writer. Subclasses call :meth:`tick` often."""

    name = "role"

    def __init__(self, config: PipelineConfig, index: int = 0, context: zmq.Context | None = None):
        self.config = config
        self.index = index
        self.context = context or zmq.Context.instance()
        self.curve = curve_for(config)  # None unless [security] curve = true
        self.control = ControlClient.for_config(config, self.context, timeout_s=2.0)
        self.scan_specs: dict[int, ScanSpec] = {}  # from control's heartbeat replies only
        self.finished: set[tuple[int, int]] = set()  # (scan, epoch) this role is done with
        self.counters: Counter = Counter()
        self.rejected: Counter = Counter()
        self.shutdown = False
        self.role_ages: dict[str, float] = {}  # seconds since each role's last heartbeat, per control
        self.role_ages_at = 0.0
        self.open_scans: set[int] = set()  # scans control had open at the last heartbeat
        self.acks: dict[int, list] = {}  # scan -> block ranges the writer has committed
        self._next_heartbeat = 0.0
        self._control_missing_since: float | None = None
        self.control_instance: str | None = None  # control's process id; a new one: it restarted
        # This process's incarnation, in every heartbeat: a node group restarted under the same
        # index is failed over at once, not taken for the one that held the scan's blocks.
        self.instance = uuid.uuid4().hex
        # Messages of scans this role has not heard of, held while control is away (see hold).
        # Bounded like a node group's pending blocks: so many routing blocks of every module.
        self.held: list[tuple] = []
        self.held_scans: Counter = Counter()  # scan -> messages of it held
        self.held_bytes = 0
        self.held_limit = N_MODULES * config.flow.max_pending_blocks
        self.held_bytes_limit = self.held_limit * config.pipeline.block_frames * RECORD_BYTES
        self._process = psutil.Process(os.getpid())
        self.peak_rss = 0
        self.peak_private = 0

    def stats(self) -> dict:
        """What this role reports in its heartbeats (subclasses add to it)."""
        memory = self._process.memory_info()
        rss = memory.rss
        self.peak_rss = max(self.peak_rss, rss)
        # RSS counts the pages of shared-memory segments this role has touched (the producers'
        # blocks, see transport.shared_memory); what the role holds alone is rss - shared.
        self.peak_private = max(self.peak_private, rss - memory.shared)
        cpu = self._process.cpu_times()
        if self.curve is not None:
            self.counters["connections_refused"] = self.curve.refused(self.context)
        return {"counters": dict(self.counters), "rejected": dict(self.rejected), "rss": rss, "peak_rss": self.peak_rss,
                "peak_private": self.peak_private,
                "pid": os.getpid(), "cpu_s": cpu.user + cpu.system}

    def tick(self, interval_s: float | None = None, force: bool = False) -> None:
        """Heartbeat when due (every ``interval_s``, default the config's heartbeat; now with
        ``force``); learn the open scans' specs and whether to shut down."""
        now = time.monotonic()
        if now < self._next_heartbeat and not force:
            return
        self._next_heartbeat = now + (self.config.flow.heartbeat_s if interval_s is None else interval_s)
        try:
            reply = self.control.request("heartbeat", timeout_s=1.0, role=self.name, id=self.index, stats=self.stats(),
                                         instance=self.instance, **self.registration())
        except ControlUnavailable as exc:
            if self._control_missing_since is None:
                self._control_missing_since = now
                log.warning("%s %d: %s; carrying on", self.name, self.index, exc)
            return
        self._control_missing_since = None
        if not reply.get("ok"):  # refused (no session token, a bad field): nothing in it to learn
            self.reject("heartbeat_refused", str(reply.get("error")))
            return
        instance = reply.get("instance")
        if self.control_instance is not None and instance != self.control_instance:
            log.warning("%s %d: control was restarted", self.name, self.index)
            self.control_restarted()
        self.control_instance = instance
        open_scans = set()
        for wire_spec in reply.get("scans", []):
            try:
                spec = ScanSpec.from_wire(wire_spec)
            except SpecError as exc:
                self.reject("bad_spec", str(exc))
                continue
            self.scan_specs[spec.number] = spec
            open_scans.add(spec.number)
        self.open_scans = open_scans
        self.acks = {int(k): v for k, v in reply.get("acks", {}).items()}
        if reply.get("shutdown"):
            self.shutdown = True
        self.role_ages = reply.get("ages", {})
        self.role_ages_at = now

    def control_restarted(self) -> None:
        """Control came back with what it had saved (pipeline.control.state); a role that told
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
        return age > self.config.flow.silent_after_s

    def is_finished(self, spec: ScanSpec) -> bool:
        return spec.key in self.finished

    def mark_finished(self, spec: ScanSpec) -> None:
        self.finished.add(spec.key)

    def scan_spec(self, scan: int, generation: int = 0) -> ScanSpec | None:
        """The open spec of ``scan`` as of routing generation ``generation`` or later; None when
        control has no such open scan. A message of a generation newer than the spec known here,
        or of a scan this role is done with (a node group that finished one generation of a scan
        gets the next one after a failover), sends the role to control at once: a heartbeat,
        whose reply carries the open scans' specs. A generation control has not started is
        refused (a forged or corrupted message)."""
        spec = self.scan_specs.get(scan)
        if spec is not None and not self.is_finished(spec) and generation <= spec.generation:
            return spec
        self.tick(force=True)  # costs control one heartbeat; get_scan did as much before
        spec = self.scan_specs.get(scan)
        if spec is None or scan not in self.open_scans or generation > spec.generation:
            return None
        return spec

    def data_socket(self, kind: int, hwm: int | None = None, linger_ms: int = 0) -> zmq.Socket:
        """A data-path socket of this role (transport.sockets.data_socket with its CURVE and
        the config's high-water mark)."""
        hwm = self.config.flow.send_hwm if hwm is None else hwm
        return data_socket(self.context, kind, hwm, self.curve, linger_ms)

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

    def hold(self, number: int, message: tuple, nbytes: int, unknown: bool = False) -> bool:
        """Keep ``message`` (the arguments the role's handler takes) of scan ``number`` to handle
        later rather than now; True if held. Held: a message of a scan control has not told this
        role of (``unknown``) while control does not answer (control saves a scan before it
        replies to ``start_scan``, so a restarted one knows it; a killed one cannot tell), and
        every later message of a scan with messages held, so that each module's blocks keep
        their order. Not held beyond :attr:`held_full` (the role stops reading meanwhile: see
        its loop); :meth:`release_held` hands them back once control answers."""
        if not self.held_scans[number] and not (unknown and self._control_missing_since is not None):
            return False
        if self.held_full or self.held_bytes + nbytes > self.held_bytes_limit:
            self.counters["held_overflow"] += unknown  # (counted once: the handler asks again with unknown)
            return False
        self.held.append(message)
        self.held_scans[number] += 1
        self.held_bytes += nbytes
        self.counters["messages_held"] += 1
        return True

    @property
    def held_full(self) -> bool:
        return len(self.held) >= self.held_limit

    def release_held(self, handle) -> None:
        """Once control answers again, hand every held message to ``handle`` in the order they
        came: the spec of their scan is here now, or control does not know it (then ``handle``
        rejects them as it would have)."""
        if not self.held or self._control_missing_since is not None:
            return
        held, self.held, self.held_bytes = self.held, [], 0
        self.held_scans.clear()
        log.info("%s %d: handling %d message(s) held while control was away", self.name, self.index, len(held))
        for message in held:
            handle(*message)

    def reject(self, reason: str, detail: str = "") -> None:
        """Count a rejected message; log the first few of each reason."""
        self.rejected[reason] += 1
        if self.rejected[reason] <= 3:
            log.warning("%s %d rejected a message (%s)%s", self.name, self.index, reason, f": {detail}" if detail else "")
