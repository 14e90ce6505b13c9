"""Gateway: the optional hop where a facility has one host facing the wide-area link.

It reads each message's small envelope to find the node group it is routed to (the producer chose
it: ``block % nodes``) and forwards the parts untouched; payloads are never decoded or copied.
Each module has its own input and each (node group, module) its own bounded queue and output, so
flow control stays per module end to end: when a queue is full the gateway stops reading that
module's input only, which slows that producer (who may then spill) without blocking the others.
"""

from __future__ import annotations

import logging
from collections import deque

import zmq

from stemstream.formats import wire
from stemstream.formats.raw import N_MODULES
from stemstream.pipeline.role import Role

log = logging.getLogger(__name__)


class Gateway(Role):
    name = "gateway"

    def __init__(self, config, index: int = 0, context: zmq.Context | None = None):
        super().__init__(config, index, context)
        net, flow = config.network, config.flow
        self.inputs: list[zmq.Socket] = []
        for module in range(N_MODULES):
            sock = self.data_socket(zmq.PULL)
            sock.bind(net.bind(net.gateway_port + module))
            self.inputs.append(sock)
        self.outputs: list[list[zmq.Socket]] = []  # [node][module]
        for i in range(config.pipeline.nodes):
            row = []
            for module in range(N_MODULES):
                sock = self.data_socket(zmq.PUSH, linger_ms=10000)
                sock.connect(net.node(i, module))
                row.append(sock)
            self.outputs.append(row)
        self.queues = [[deque() for _ in range(N_MODULES)] for _ in self.outputs]
        self.queue_limit = flow.send_hwm

    def route(self, parts: list, module: int) -> int:
        """The node group a message that came in on ``module``'s input goes to; raises
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
        node = envelope["node"]
        if node >= len(self.outputs):
            raise wire.MessageError("unknown_node", f"node group {node} of {len(self.outputs)}")
        return node

    def _flush(self) -> None:
        for node, row in enumerate(self.queues):
            for module, queue in enumerate(row):
                while queue:
                    try:
                        self.outputs[node][module].send_multipart(queue[0], flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    queue.popleft()
                    self.counters["forwarded"] += 1

    def stats(self) -> dict:
        s = super().stats()
        s["queued"] = [[len(q) for q in row] for row in self.queues]
        return s

    def _module_full(self, module: int) -> bool:
        return any(len(row[module]) >= self.queue_limit for row in self.queues)

    def run(self) -> None:
        while not self.shutdown:
            self._flush()
            poller = zmq.Poller()
            for module, sock in enumerate(self.inputs):
                if not self._module_full(module):
                    poller.register(sock, zmq.POLLIN)
            for node, row in enumerate(self.queues):
                for module, queue in enumerate(row):
                    if queue:
                        poller.register(self.outputs[node][module], zmq.POLLOUT)
            events = dict(poller.poll(20))
            for module, sock in enumerate(self.inputs):
                if sock not in events:
                    continue
                for _ in range(16):
                    try:
                        parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        node = self.route(parts, module)
                    except wire.MessageError as exc:
                        self.reject(exc.reason, str(exc))
                        continue
                    self.queues[node][module].append(parts)
                    if self._module_full(module):
                        break
            self.tick()
        for sock in self.inputs:
            sock.close(0)
        for row in self.outputs:
            for sock in row:
                sock.close()
