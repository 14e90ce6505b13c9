"""Gateway: the optional hop where a facility has one host facing the wide-area link.

It reads each message's small envelope to find the node group it is routed to (the producer chose
it, see core.scan_spec) and forwards the parts untouched; payloads are never decoded or copied.
It connects to a node group when the first message for it comes, at the address the node group
registered with control (the scan's spec says it). Messages of a routing generation that a
failover superseded are dropped from its queues: the producers resend what they hold.
Each module has its own input and each (node group, module) its own bounded queue and output, so
flow control stays per module end to end: when a queue is full the gateway stops reading that
module's input only, which slows that producer (who may then spill) without blocking the others.

Several gateways may share the work ([network] gateway_hosts, e.g. one per receiver): gateway g
takes the modules m with m % (number of gateways) == g, so no byte crosses two of them.
"""

from __future__ import annotations

import logging
from collections import deque

import zmq

from stemstream.core.scan_spec import ScanSpec
from stemstream.formats import wire
from stemstream.pipeline.role import Role, message_size

log = logging.getLogger(__name__)


def _scan_of(parts: list) -> int:
    """The scan number of a SECTORS or END message (MessageError for anything else)."""
    kind = wire.kind_of(parts)
    if kind not in (wire.SECTORS, wire.END):
        raise wire.MessageError("unexpected_kind", repr(kind))
    return (wire.sectors_envelope if kind == wire.SECTORS else wire.end_envelope)(parts)["scan"]


class Gateway(Role):
    name = "gateway"

    def __init__(self, config, index: int = 0, context: zmq.Context | None = None):
        super().__init__(config, index, context)
        net, flow = config.network, config.flow
        self.modules = net.gateway_modules(index)
        self.inputs: dict[int, zmq.Socket] = {}  # module -> its input
        for module in self.modules:
            sock = self.data_socket(zmq.PULL)
            sock.bind(net.bind(net.gateway_port + module))
            self.inputs[module] = sock
        self.outputs: dict[int, dict[int, zmq.Socket]] = {}  # node -> module -> output
        # node -> module -> queued (scan, stream, parts)
        self.queues: dict[int, dict[int, deque]] = {}
        self.queue_limit = flow.send_hwm
        self._generations: dict[int, int] = {}  # scan -> routing generation last purged for
        self._checked_in = False  # told control whether scans were running at this start

    def _connect(self, node: int, spec: ScanSpec) -> None:
        host = spec.host_of(node)
        row = {}
        for module in self.modules:
            sock = self.data_socket(zmq.PUSH, linger_ms=10000)
            sock.connect(self.config.network.node_at(host, node, module))
            row[module] = sock
        self.outputs[node] = row
        self.queues[node] = {module: deque() for module in self.modules}

    def route(self, parts: list, module: int) -> tuple[int, int, int]:
        """(node group, scan, stream) of a message that came in on ``module``'s input; raises
        MessageError for one that cannot be routed."""
        kind = wire.kind_of(parts)
        if kind == wire.SECTORS:
            envelope = wire.sectors_envelope(parts)
        elif kind == wire.END:
            envelope = wire.end_envelope(parts)
        else:
            raise wire.MessageError("unexpected_kind", repr(kind))
        if envelope["module"] != module:
            raise wire.MessageError("wrong_module", f"module {envelope['module']} on module {module}'s input")
        node, scan = envelope["node"], envelope["scan"]
        spec = self.scan_spec(scan, envelope["stream"])
        if spec is None:
            raise wire.MessageError("unknown_scan", f"scan {scan}")
        if node not in spec.nodes:
            raise wire.MessageError("unknown_node", f"node group {node} is not in scan {scan}")
        if node not in self.outputs:
            self._connect(node, spec)
        return node, scan, envelope["stream"]

    def accept(self, parts: list, module: int) -> None:
        """Queue a message that came in on ``module``'s input for its node group, or count why
        not. One of a scan not known yet while control is away is held (Role.hold)."""
        size = message_size(parts)
        try:
            if self.held_scans and self.hold(_scan_of(parts), (parts, module), size):
                return
            node, scan, stream = self.route(parts, module)
        except wire.MessageError as exc:
            if exc.reason == "unknown_scan" and self.hold(_scan_of(parts), (parts, module), size, unknown=True):
                return
            self.reject(exc.reason, str(exc))
            return
        if self._superseded(scan, stream):  # late: its blocks are being resent
            self.counters["messages_superseded"] += 1
            return
        self.queues[node][module].append((scan, stream, parts))

    def _flush(self) -> None:
        for node, row in self.queues.items():
            for module, queue in row.items():
                while queue:
                    try:
                        self.outputs[node][module].send_multipart(queue[0][2], flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    queue.popleft()
                    self.counters["forwarded"] += 1

    def _superseded(self, scan: int, stream: int) -> bool:
        spec = self.scan_specs.get(scan)
        return spec is not None and stream < spec.generation

    def _drop_superseded(self) -> None:
        """Forget queued messages of routing generations a failover replaced (a dead node
        group's queue would otherwise block its module's input for good). Runs only when a scan's
        generation changed: the queues are on the hot path."""
        generations = {number: spec.generation for number, spec in self.scan_specs.items()}
        if generations == self._generations:
            return
        self._generations = generations
        for row in self.queues.values():
            for module, queue in row.items():
                if not queue:
                    continue
                keep = deque(item for item in queue if not self._superseded(item[0], item[1]))
                if len(keep) < len(queue):
                    self.counters["messages_superseded"] += len(queue) - len(keep)
                    row[module] = keep

    def stats(self) -> dict:
        s = super().stats()
        s["queued"] = {str(node): {str(m): len(q) for m, q in row.items()} for node, row in self.queues.items()}
        return s

    def _announce_start(self) -> None:
        """At the first word from control: scans running now lost whatever the gateway before
        this one held (it died, or this one starts late), so control resends them on a new
        routing generation."""
        if self._checked_in or self.control_instance is None:
            return
        self._checked_in = True
        if not self.open_scans:
            return
        try:
            self.control.request("gateway_restarted", timeout_s=5.0, id=self.index)
        except Exception as exc:
            log.error("gateway %d: could not ask control to resend the running scans: %s", self.index, exc)
            return
        self.tick(force=True)  # the reply to this heartbeat carries the new generations
        log.warning("gateway %d started while scan(s) %s ran: they are resent on a new routing generation",
                    self.index, sorted(self.open_scans))

    def _module_full(self, module: int) -> bool:
        """A queue of this module is full, or so are the messages held for control's return."""
        return self.held_full or any(len(row[module]) >= self.queue_limit for row in self.queues.values())

    def run(self) -> None:
        while not self.shutdown:
            self.release_held(self.accept)
            self._flush()
            poller = zmq.Poller()
            for module, sock in self.inputs.items():
                if not self._module_full(module):
                    poller.register(sock, zmq.POLLIN)
            for node, row in self.queues.items():
                for module, queue in row.items():
                    if queue:
                        poller.register(self.outputs[node][module], zmq.POLLOUT)
            events = dict(poller.poll(20))
            for module, sock in self.inputs.items():
                if sock not in events:
                    continue
                for _ in range(16):
                    try:
                        parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.accept(parts, module)
                    if self._module_full(module):
                        break
            self.tick()
            self._announce_start()
            self._drop_superseded()
        for sock in self.inputs.values():
            sock.close(0)
        for row in self.outputs.values():
            for sock in row.values():
                sock.close()
