"""Gateway: the optional hop where a facility has one host facing the wide-area link.

It reads each message's small envelope to find the node group it is routed to (the producer chose
it: ``block % nodes``) and forwards the parts untouched; payloads are never decoded or copied.
Each node group has a bounded queue here; when one is full the gateway stops reading its input,
so a slow node group slows the producers (who then spill) instead of growing memory.
"""

from __future__ import annotations

import logging
from collections import deque

import zmq

from stemstream.formats import wire
from stemstream.pipeline.role import Role

log = logging.getLogger(__name__)


class Gateway(Role):
    name = "gateway"

    def __init__(self, config, index: int = 0, context: zmq.Context | None = None):
        super().__init__(config, index, context)
        net, flow = config.network, config.flow
        self.data_in = self.context.socket(zmq.PULL)
        self.data_in.setsockopt(zmq.RCVHWM, flow.send_hwm)
        self.data_in.setsockopt(zmq.LINGER, 0)
        self.data_in.bind(net.bind(net.gateway_port))
        self.outputs: list[zmq.Socket] = []
        for i in range(config.pipeline.nodes):
            sock = self.context.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, flow.send_hwm)
            sock.setsockopt(zmq.LINGER, 10000)
            sock.connect(net.node(i))
            self.outputs.append(sock)
        self.queues: list[deque] = [deque() for _ in self.outputs]
        self.queue_limit = flow.send_hwm

    def route(self, parts: list) -> int:
        """The node group a message goes to; raises MessageError for one that cannot be routed."""
        kind = wire.kind_of(parts)
        if kind == wire.SECTORS:
            envelope = wire.sectors_envelope(parts)
        elif kind == wire.END:
            envelope = wire.end_envelope(parts)
        else:
            raise wire.MessageError("unexpected_kind", repr(kind))
        node = envelope["node"]
        if node >= len(self.outputs):
            raise wire.MessageError("unknown_node", f"node group {node} of {len(self.outputs)}")
        return node

    def _flush(self) -> None:
        for node, queue in enumerate(self.queues):
            while queue:
                try:
                    self.outputs[node].send_multipart(queue[0], flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                queue.popleft()
                self.counters["forwarded"] += 1

    def stats(self) -> dict:
        s = super().stats()
        s["queued"] = [len(q) for q in self.queues]
        return s

    def run(self) -> None:
        while not self.shutdown:
            self._flush()
            full = any(len(q) >= self.queue_limit for q in self.queues)
            poller = zmq.Poller()
            if not full:
                poller.register(self.data_in, zmq.POLLIN)
            for node, queue in enumerate(self.queues):
                if queue:
                    poller.register(self.outputs[node], zmq.POLLOUT)
            events = dict(poller.poll(20))
            if self.data_in in events:
                for _ in range(64):
                    try:
                        parts = self.data_in.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        node = self.route(parts)
                    except wire.MessageError as exc:
                        self.reject(exc.reason, str(exc))
                        continue
                    self.queues[node].append(parts)
                    if len(self.queues[node]) >= self.queue_limit:
                        break
            self.tick()
        self.data_in.close(0)
        for sock in self.outputs:
            sock.close()
