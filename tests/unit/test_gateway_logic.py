"""The gateway's decisions without real peers: an in-process control answers its heartbeats; the
node groups it would forward to are never there (messages only queue). Which envelopes it
routes and which it refuses, the superseded generations it drops, and what it asks control for
when it starts while a scan runs."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from pipeline_support import InProcessControl, test_config
from stemstream.core.detector import MODULES, RECORD_DTYPE
from stemstream.formats import wire
from stemstream.pipeline.control.service import Control
from stemstream.pipeline.gateway import Gateway

NODES = (0, 1)


class RecordingControl(InProcessControl):
    """The in-process control, noting the requests the gateway makes."""

    def __init__(self, control):
        super().__init__(control)
        self.ops: list[str] = []

    def request(self, op: str, timeout_s: float | None = None, **fields) -> dict:
        self.ops.append(op)
        return super().request(op, timeout_s, **fields)


class Rig:
    def __init__(self, tmp_path):
        self.config = test_config(tmp_path, nodes=len(NODES), gateway=True)
        self.context = zmq.Context()
        self.control = Control(self.config, self.context)
        for n in NODES:
            self.beat("heartbeat", role="node", id=n, stats={}, host="127.0.0.1")
        self.gateway = Gateway(self.config, 0, self.context)
        self.requests = self.gateway.control = RecordingControl(self.control)

    def beat(self, op: str, **fields) -> dict:
        reply = self.control.handle({"op": op, **fields})
        assert reply["ok"], reply
        return reply

    def fail_over(self, node: int) -> None:
        self.control.roles[f"node-{node}"]["seen"] = 0.0
        self.control.tick()

    def queued(self) -> dict[tuple[int, int], list[tuple[int, int]]]:
        """(node group, module) -> its queue as (scan, stream), for the non-empty ones."""
        return {(node, module): [(scan, stream) for scan, stream, _ in queue]
                for node, row in self.gateway.queues.items() for module, queue in row.items() if queue}

    def close(self) -> None:
        self.context.destroy(linger=0)  # the node groups' outputs hold queued messages: drop them


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def sectors(scan: int = 1, module: int = 0, block: int = 0, node: int = 0, stream: int = 0) -> list:
    return wire.encode_sectors(scan, module, block, node, np.zeros(1, RECORD_DTYPE), stream=stream)


def test_the_gateway_takes_every_module(rig):
    assert rig.gateway.modules == list(MODULES) and sorted(rig.gateway.inputs) == list(MODULES)


def test_a_message_is_routed_to_the_node_group_its_envelope_names(rig):
    rig.beat("start_scan", scan_number=1, scan_shape=[4, 4], nodes=list(NODES))
    gateway = rig.gateway
    assert gateway.route(sectors(module=2, block=1, node=1), 2) == (1, 1, 0)
    assert sorted(gateway.outputs) == [1]  # connected on first use, one output per module
    assert sorted(gateway.outputs[1]) == list(MODULES)
    end = wire.encode_end(1, 3, 0, sent=16)
    assert gateway.route(end, 3) == (0, 1, 0) and sorted(gateway.outputs) == [0, 1]
    gateway.accept(sectors(module=2, block=3, node=1), 2)
    gateway.accept(end, 3)
    assert rig.queued() == {(1, 2): [(1, 0)], (0, 3): [(1, 0)]}
    assert not gateway.rejected


@pytest.mark.parametrize("parts, module, reason", [
    (sectors(scan=9), 0, "unknown_scan"),
    (sectors(module=1), 0, "wrong_module"),
    (wire.encode_end(1, 2, 0, sent=1), 1, "wrong_module"),
    (sectors(node=5), 0, "unknown_node"),
    (sectors(stream=4), 0, "unknown_scan"),  # a generation control never started
    (wire.encode_done(1, 0, {}, [0, 0, 0, 0]), 0, "unexpected_kind"),
    ([b"?", b""], 0, "unknown_kind"),
    ([wire.SECTORS, b"\xc1"], 0, "wrong_part_count"),
    ([wire.SECTORS, b"\xc1", b""], 0, "undecodable_envelope"),
])
def test_a_message_that_cannot_be_routed_is_counted_and_not_queued(rig, parts, module, reason):
    rig.beat("start_scan", scan_number=1, scan_shape=[4, 4], nodes=list(NODES))
    with pytest.raises(wire.MessageError) as refused:
        rig.gateway.route(parts, module)
    assert refused.value.reason == reason
    rig.gateway.accept(parts, module)
    assert rig.gateway.rejected == {reason: 1} and rig.queued() == {}
    assert rig.gateway.outputs == {}  # no node group connected for it


def test_messages_of_a_superseded_generation_are_dropped_from_the_queues_and_on_arrival(rig):
    rig.beat("start_scan", scan_number=1, scan_shape=[4, 4], nodes=list(NODES))
    rig.beat("start_scan", scan_number=2, scan_shape=[4, 4], nodes=[0])
    gateway = rig.gateway
    for block, node in enumerate(NODES * 2):
        gateway.accept(sectors(block=block, node=node), 0)
    gateway.accept(sectors(scan=2, module=1), 1)
    gateway._drop_superseded()
    assert rig.queued() == {(0, 0): [(1, 0), (1, 0)], (1, 0): [(1, 0), (1, 0)], (0, 1): [(2, 0)]}
    rig.fail_over(1)  # scan 1 goes to generation 1; scan 2 never used node group 1
    assert rig.control.scans[1].spec.generation == 1 and rig.control.scans[2].spec.generation == 0
    gateway.tick(force=True)
    gateway._drop_superseded()
    # scan 1's generation-0 messages go, whichever node group they were for: the producers resend
    assert rig.queued() == {(0, 1): [(2, 0)]} and gateway.counters["messages_superseded"] == 4
    gateway.accept(sectors(block=7, node=0), 0)  # late, still generation 0
    gateway.accept(sectors(block=1, node=0, stream=1), 0)
    assert rig.queued() == {(0, 0): [(1, 1)], (0, 1): [(2, 0)]} and gateway.counters["messages_superseded"] == 5


def test_a_gateway_started_while_a_scan_runs_asks_for_a_new_generation_once(rig):
    rig.beat("start_scan", scan_number=1, scan_shape=[4, 4], nodes=list(NODES))
    gateway = rig.gateway
    gateway._announce_start()  # control not heard from yet: nothing to tell
    assert rig.control.scans[1].spec.generation == 0
    gateway.tick(force=True)
    gateway._announce_start()
    assert rig.control.scans[1].spec.generation == 1 and gateway.scan_specs[1].generation == 1
    gateway._announce_start()
    assert rig.control.scans[1].spec.generation == 1 and rig.requests.ops.count("gateway_restarted") == 1


def test_a_gateway_started_with_no_scan_running_asks_for_nothing(rig):
    gateway = rig.gateway
    gateway.tick(force=True)
    gateway._announce_start()
    rig.beat("start_scan", scan_number=1, scan_shape=[4, 4], nodes=list(NODES))
    gateway.tick(force=True)
    gateway._announce_start()
    assert rig.control.scans[1].spec.generation == 0 and "gateway_restarted" not in rig.requests.ops
