"""Node group: the role that receives the 4 modules' sectors, hands each message to its scan's
:class:`~stemstream.pipeline.node.assembly.NodeScan` (which reassembles, counts and sends events on)
and decides what to read next.

Each (scan, routing generation) is a stream of its own (see core.scan_spec): after a failover
the producers resend what the writer had not committed on a new stream, so the block order that
the settling rule relies on holds within each stream; a stream a newer generation supersedes is
dropped (the writer has fenced it). A node group restarted mid-scan is a new process (its
heartbeats say so): control starts a new generation at once, and the new process drops what
still comes of the old one's stream.

Flow control is per module: each module arrives on its own socket, and a module that is
``max_pending_blocks`` blocks ahead of the others is not read until they catch up, which holds its
producer back (backpressure) instead of growing memory or dropping anything. If the modules that
a waiting block lacks stay silent for long (a dead producer), the oldest waiting block is counted
as it stands. While thresholds are being calibrated, no module is read once that many complete
blocks wait.

A NodeGroup opens no socket and compiles nothing when made: :meth:`NodeGroup.start` binds its
inputs, connects to the writer and loads the kernels, then :meth:`NodeGroup.run` serves.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from contextlib import suppress
from functools import partial

import numba
import numpy as np
import zmq

from stemstream.analysis import default_analyses, warm_up
from stemstream.core.detector import FRAME_SHAPE, MODULES, N_MODULES, RECORD_BYTES, RECORD_DTYPE
from stemstream.counting.cluster_counter import ClusterCalibrationError, ClusterCounter, calibrate_cluster_model
from stemstream.counting.cluster_model import SingleElectronModel
from stemstream.counting.kernel import ElectronCounter
from stemstream.counting.sectors import count_from_sectors
from stemstream.counting.thresholds import PixelHistogram, fixed_thresholds
from stemstream.formats import wire
from stemstream.pipeline.node.assembly import NodePorts, NodeScan
from stemstream.pipeline.role import Role, message_size
from stemstream.pipeline.spill import LateParts
from stemstream.transport.shared_memory import Attachments

log = logging.getLogger(__name__)

# How often a node group heartbeats while a scan awaits control's thresholds (their spec comes in the
# reply): the scan's frames wait uncounted meanwhile.
_AWAITING_HEARTBEAT_S = 0.05
# Finished streams whose silent producers' parts are still spilled when they come (the latest).
_LATE_STREAMS_KEPT = 16


def load_kernels(analyses, method: str = "maxima") -> None:
    """Compile, or load from numba's cache, every kernel a node group runs: the counter on sectors
    of ``method`` (one variant: it counts read-only views of any buffer; a node group never counts
    whole frames, whose kernel would double the compile time of a first run), the calibration histogram,
    the cluster method's calibration when it is the one, and the analyses."""
    if method == "clusters":
        model = SingleElectronModel(pedestal=20.0, mean=120.0, shape=4.0, min_charge=16.0)
        counter = ClusterCounter(28.0, 1000.0, model, FRAME_SHAPE)
        count = counter.count_sectors
    else:  # the default's first use pays for its own kernel only
        counter = ElectronCounter(28.0, 1000.0, FRAME_SHAPE)
        count = partial(count_from_sectors, counter)
    count([np.zeros(1, RECORD_DTYPE)] * N_MODULES, np.zeros((1, N_MODULES), np.int64))  # read-only inside
    PixelHistogram().add(np.zeros(FRAME_SHAPE, np.uint16), weight=1)
    if method == "clusters":
        with suppress(ClusterCalibrationError):  # a blank frame holds no electron: its kernel is what is wanted
            calibrate_cluster_model(np.zeros((1, *FRAME_SHAPE), np.uint16), fixed_thresholds(28.0, 1000.0))
    warm_up(analyses)


class NodeGroup(Role):
    """Listens on node_base_port + index (one port per module); sends events and DONE to the writer."""

    name = "node"

    def __init__(self, config, index: int = 0, context: zmq.Context | None = None, advertise_host: str = "",
                 send: Callable[[list], None] | None = None):
        """``advertise_host``: the address producers and gateway reach this node group at, told to
        control when it registers (default: ``[network] node_hosts[index]``, else ``host``).
        ``send``: where the messages for the writer go (default: the writer's socket, which
        :meth:`start` connects)."""
        super().__init__(config, index, context)
        hosts = config.network.node_hosts
        self.advertise_host = advertise_host or (hosts[index] if index < len(hosts) else config.network.host)
        self.inputs: list[zmq.Socket] = []  # one per module, bound by start()
        self.events_out: zmq.Socket | None = None
        self.scans: dict[tuple[int, int], NodeScan] = {}  # (scan, stream) -> its state
        self.streams_done: set[tuple[int, int]] = set()  # (scan, stream) finished here
        self.late_parts: dict[tuple[int, int], LateParts] = {}  # finished streams that gave up on parts
        self.shared = Attachments(config.network.shm_dir)  # producers' segments, on one host
        self.analyses = default_analyses(FRAME_SHAPE, config.analysis)
        self.ports = NodePorts(
            index=index, flow=config.flow, analyses=self.analyses, spill_dir=config.pipeline.spill_dir,
            counters=self.counters, send=send or self._send_to_writer, send_calibration=self._send_calibration,
            latest_spec=lambda number: self.scan_specs.get(number), reject=self.reject, keepalive=self.tick,
            producer_dead=lambda module: self.role_is_dead(f"producer-{module}"),
            committed=lambda number: self.acks.get(number, []), method=config.counting.method,
        )

    def start(self) -> NodeGroup:
        """Bind the modules' inputs, connect to the writer, and load every kernel a scan uses."""
        net = self.config.network
        for module in MODULES:
            sock = self.data_socket(zmq.PULL)
            sock.bind(net.bind(net.node_port(self.index, module)))
            self.inputs.append(sock)
        self.events_out = self.data_socket(zmq.PUSH, hwm=64, linger_ms=5000)
        self.events_out.connect(net.writer())
        numba.set_num_threads(min(self.config.counting.workers, numba.config.NUMBA_NUM_THREADS))
        self._warm_up()
        return self

    def _warm_up(self) -> None:
        """Load (on a fresh machine: compile, seconds each) every kernel a scan uses now, not when
        the first scan's frames wait: a node group busy compiling mid-scan stalls past the
        producers' patience, and they spill."""
        load_kernels(self.analyses, self.config.counting.method)

    def close(self) -> None:
        for sock in self.inputs:
            sock.close(0)
        self.inputs = []
        if self.events_out is not None:
            self.events_out.close()  # lingers: what is queued for the writer still goes
            self.events_out = None

    def _send_to_writer(self, parts: list) -> None:
        # Events are small (~2 kB a frame): copying beats pyzmq's zero-copy bookkeeping.
        self.events_out.send_multipart(parts)

    def _send_calibration(self, scan: int, histogram: dict) -> None:
        self.control.request("calibration", timeout_s=5.0, scan=scan, node=self.index, **histogram)

    def registration(self) -> dict:
        return {"host": self.advertise_host}

    def stats(self) -> dict:
        s = super().stats()
        s["pending_blocks"] = sum(len(sc.pending) for sc in self.scans.values())
        s["scans"] = sorted({number for number, _ in self.scans})
        return s

    # -- streams -----------------------------------------------------------------------------------

    def _stream(self, number: int, stream: int) -> NodeScan | None:
        """The state of (scan, stream), opened on first use; None if control has no such open
        scan or a newer routing generation superseded the stream."""
        scan = self.scans.get((number, stream))
        if scan is None:
            if (number, stream) in self.streams_done:  # never opened again: its DONE went out
                raise wire.MessageError("stream_finished", f"scan {number} stream {stream}")
            spec = self.scan_spec(number, stream)
            if spec is None:
                raise wire.MessageError("unknown_scan", f"scan {number}")
            if stream < spec.generation:
                return None
            scan = self.scans[(number, stream)] = NodeScan(self.ports, spec, stream)
        return scan

    def drop_superseded(self) -> None:
        """Drop the streams of scans whose routing generation moved on: the writer fenced them,
        and the producers resend what they held."""
        for key, scan in list(self.scans.items()):
            spec = self.scan_specs.get(key[0])
            if spec is not None and key[1] < spec.generation:
                del self.scans[key]
                self.counters["streams_superseded"] += 1
                log.warning("node %d: scan %d stream %d superseded by routing generation %d",
                            self.index, key[0], key[1], spec.generation)

    # -- flow control ------------------------------------------------------------------------------

    def module_gated(self, module: int) -> bool:
        """True when this module's input must wait for the others (or for calibration, or for
        control to come back and tell the scan whose messages are held)."""
        if self.held_full:
            return True
        limit = self.config.flow.max_pending_blocks
        for scan in self.scans.values():
            if scan.waiting_for_thresholds and scan.complete_pending() >= limit:
                return True
            if scan.waiting_with(module) >= limit:
                return True
        return False

    def give_up_waiting(self, scan: NodeScan) -> bool:
        """True when ``scan``'s oldest waiting block is to be counted as it stands: the modules it
        holds wait on it (memory bound reached) and a module it lacks has a dead producer (control
        stopped hearing from it). A slow producer is waited for: backpressure and spilling bound
        that wait upstream."""
        oldest = scan.oldest_unsettled()
        if oldest is None:
            return False
        held, absent = oldest
        return any(self.module_gated(m) for m in held) and any(self.role_is_dead(f"producer-{m}") for m in absent)

    # -- messages ----------------------------------------------------------------------------------

    def _check_route(self, msg, module: int) -> None:
        """A message must reach this node group on its own module's input."""
        if msg.node != self.index:
            raise wire.MessageError("wrong_node", f"routed to {msg.node}, this is {self.index}")
        if msg.module != module:
            raise wire.MessageError("wrong_module", f"module {msg.module} on module {module}'s input")

    def handle(self, parts: list, module: int) -> None:
        """One message from ``module``'s input; bad ones are counted and logged, never raised.
        One of a scan not known yet while control is away is held (Role.hold)."""
        msg = None
        try:
            kind = wire.kind_of(parts)
            if kind == wire.SECTORS:
                msg = wire.decode_sectors(parts)
                self._check_route(msg, module)
                if msg.shm is not None:
                    self.shared.validate_name(msg.shm["name"])
                    msg.records = self.shared.records(msg.shm, msg.shm["nbytes"] // RECORD_BYTES)
            elif kind == wire.END:
                msg = wire.decode_end(parts)
                self._check_route(msg, module)
            else:
                raise wire.MessageError("unexpected_kind", repr(kind))
            if self.hold(msg.scan, (parts, module), message_size(parts)):
                return
            if kind == wire.SECTORS and self._spill_late_part(msg):
                return
            scan = self._stream(msg.scan, msg.stream)
            if scan is None:
                self.counters["messages_superseded"] += 1
            elif kind == wire.SECTORS:
                scan.add_sectors(msg)
            else:
                scan.add_end(msg)
        except wire.MessageError as exc:
            if exc.reason == "unknown_scan" and self.hold(msg.scan, (parts, module), message_size(parts), unknown=True):
                return
            self.reject(exc.reason, str(exc))

    def _spill_late_part(self, msg: wire.SectorsMessage) -> bool:
        """A part of a block that a finished stream counted without it (its producer was silent,
        and sent it before the writer committed the block): spilled beside the block's other
        parts, not refused, so that a replay completes those frames. False: not such a part."""
        late = self.late_parts.get((msg.scan, msg.stream))
        if late is None or not late.take(msg.block, msg.module, msg.records):
            return False
        self.counters["late_parts_spilled"] += 1
        return True

    # -- the loop ----------------------------------------------------------------------------------

    def _receive(self) -> None:
        """Read what the modules that are not gated sent (a few messages each), else wait a little."""
        poller = zmq.Poller()
        for module, sock in enumerate(self.inputs):
            if not self.module_gated(module):
                poller.register(sock, zmq.POLLIN)
        events = dict(poller.poll(20))
        for module, sock in enumerate(self.inputs):
            if sock not in events:
                continue
            for _ in range(8):
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self.handle(parts, module)
                if self.module_gated(module):
                    break
        if not events and any(self.module_gated(m) for m in MODULES):
            time.sleep(0.001)

    def step_scans(self) -> None:
        """Let every stream count what it can; forget those that finished."""
        for key, scan in list(self.scans.items()):
            scan.step(self.give_up_waiting(scan))
            if scan.finished:
                del self.scans[key]
                self.streams_done.add(key)
                self._keep_late_parts(key, scan.late_parts())
                self.mark_finished(scan.spec)
                gc.collect()  # the scan's buffers go now, not at some later scan's expense

    def _keep_late_parts(self, key: tuple[int, int], late: LateParts | None) -> None:
        """Keep what a finished stream needs for its late parts (of the most recent few streams)."""
        if late is not None:
            self.late_parts[key] = late
            while len(self.late_parts) > _LATE_STREAMS_KEPT:
                del self.late_parts[next(iter(self.late_parts))]

    def run(self) -> None:
        """Serve until control says shut down (after :meth:`start`)."""
        while not self.shutdown:
            self.release_held(self.handle)
            self._receive()
            self.step_scans()
            # While a scan awaits its thresholds, heartbeat often: the reply brings them.
            awaiting = any(scan.awaiting_thresholds for scan in self.scans.values())
            self.tick(_AWAITING_HEARTBEAT_S if awaiting else None)
            self.drop_superseded()
        self.leave()
        self.close()
