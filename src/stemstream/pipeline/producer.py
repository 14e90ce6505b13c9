"""Producer: stands in for one receiver server (one detector module) and streams its sectors.

For every scan control opens, the producer takes its module's records from a source (the live
simulator, or raw files to replay), sends each routing block to the node group that owns it
(``block % nodes``), through the gateway or straight to the node groups, and ends with an END
marker to every node group.

Backpressure: a send waits at most ``backpressure_timeout_s``; past that the block is spilled to
disk in the receivers' format (``spill_dir/scan_NNNNN``) and counted, and later blocks get only a
short grace until a send succeeds again, so a stalled consumer never stalls the detector side.
"""

from __future__ import annotations

import logging
import time

import zmq

from stemstream.formats import wire
from stemstream.formats.raw import RawModuleWriter
from stemstream.pipeline.role import Role
from stemstream.pipeline.spill import spill_directory

log = logging.getLogger(__name__)

_GRACE_AFTER_SPILL_S = 0.05


class Producer(Role):
    name = "producer"

    def __init__(self, config, module: int, source_factory, context: zmq.Context | None = None):
        """source_factory(spec) -> a source with ``blocks()`` (see pipeline.sources), or None when
        this producer has nothing for that scan."""
        super().__init__(config, module, context)
        self.module = module
        self.source_factory = source_factory
        self.sockets: list[zmq.Socket] = []
        net = config.network
        if config.pipeline.gateway:
            endpoints = [net.gateway(module)]
        else:
            endpoints = [net.node(i, module) for i in range(config.pipeline.nodes)]
        for endpoint in endpoints:
            sock = self.data_socket(zmq.PUSH, linger_ms=10000)
            sock.connect(endpoint)
            self.sockets.append(sock)
        self.patience_s = config.flow.backpressure_timeout_s
        self.last_sent_wall = 0.0

    def stats(self) -> dict:
        s = super().stats()
        s["last_sent_wall"] = self.last_sent_wall  # when the last record left (wall clock, s)
        return s

    def _socket_for(self, node: int) -> zmq.Socket:
        return self.sockets[0] if len(self.sockets) == 1 else self.sockets[node]

    def _send(self, parts: list, node: int, patience_s: float) -> bool:
        """Send within ``patience_s``; False if the consumer did not take it in time."""
        sock = self._socket_for(node)
        deadline = time.monotonic() + patience_s
        while True:
            try:
                sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                sock.poll(min(50, max(1, int(remaining * 1000))), zmq.POLLOUT)
                self.tick()

    def produce(self, spec: dict) -> dict:
        """Stream one scan; returns what was sent and spilled."""
        scan = int(spec["scan"])
        nodes = int(spec["nodes"])
        source = self.source_factory(spec)
        sent = [0] * nodes
        spilled = 0
        spilled_blocks: list[list[int]] = [[] for _ in range(nodes)]  # not yet told to the node group
        spill_writer = None
        patience = self.patience_s
        t0 = time.monotonic()
        if source is not None:
            for block, records in source.blocks():
                node = block % nodes
                message = wire.encode_sectors(scan, self.module, block, node, records, spilled_blocks[node])
                if self._send(message, node, patience):
                    spilled_blocks[node] = []
                    sent[node] += len(records)
                    patience = self.patience_s
                    self.counters["records_sent"] += len(records)
                    self.last_sent_wall = time.time()
                    self.tick()  # heartbeats keep coming while a scan streams
                    continue
                # The consumer is behind beyond the bound: spill instead of waiting longer.
                if spill_writer is None:
                    out = spill_directory(self.config.pipeline.spill_dir, scan)
                    out.mkdir(parents=True, exist_ok=True)
                    spill_writer = RawModuleWriter(out, scan, self.module, dst=int(spec["epoch"]))
                    log.warning("producer %d: node group %d blocked for %.1f s; spilling scan %d to %s",
                                self.module, node, patience, scan, out)
                spill_writer.write(records)
                spilled_blocks[node].append(block)
                spilled += len(records)
                self.counters["records_spilled"] += len(records)
                patience = _GRACE_AFTER_SPILL_S
                self.tick()
        if spill_writer is not None:
            spill_writer.close()
        for node in range(nodes):
            end = wire.encode_end(scan, self.module, node, sent[node], spilled, spilled_blocks[node])
            if not self._send(end, node, self.config.flow.scan_timeout_s):
                log.error("producer %d: could not deliver the end of scan %d to node group %d", self.module, scan, node)
        self.mark_finished(spec)
        seconds = time.monotonic() - t0
        log.info("producer %d: scan %d sent %d records, spilled %d, in %.2f s", self.module, scan, sum(sent), spilled, seconds)
        return {"sent": sum(sent), "spilled": spilled, "seconds": seconds}

    def run(self) -> None:
        warm_up = getattr(self.source_factory, "warm_up", None)
        if warm_up is not None:
            warm_up()  # load compiled code before the first scan, not during it
        while not self.shutdown:
            # Idle, a producer asks often: a new scan's first frames should not wait a heartbeat.
            self.tick(interval_s=0.05)
            todo = [s for s in self.scan_specs.values() if not self.is_finished(s)]
            if not todo:
                time.sleep(0.02)
                continue
            self.produce(min(todo, key=lambda s: (s["epoch"], s["scan"])))
        for sock in self.sockets:
            sock.close()
