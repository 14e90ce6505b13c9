"""The producer's decisions without real peers: an in-process control answers its heartbeats,
plain PULL sockets stand where node groups listen. Which node group and routing generation a
block goes to, what is resent after a failover given the writer's commits, when a block is
spilled, which scan is streamed next."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from pipeline_support import InProcessControl, test_config
from stemstream.core.detector import RECORD_DTYPE
from stemstream.formats import wire
from stemstream.pipeline.control.service import Control
from stemstream.pipeline.producer import OutgoingScan, Producer
from stemstream.pipeline.spill import spill_directory

MODULE = 1
NODES = (0, 1)


class Rig:
    """A producer of module MODULE, its control in process, and a PULL socket at each node
    group's input for that module."""

    def __init__(self, tmp_path, gateway: bool = False, **flow):
        self.config = test_config(tmp_path, nodes=len(NODES), gateway=gateway)
        for name, value in flow.items():
            setattr(self.config.flow, name, value)
        self.context = zmq.Context()
        self.control = Control(self.config, self.context)
        for n in NODES:
            self.beat("heartbeat", role="node", id=n, stats={}, host="127.0.0.1")
        self.producer = Producer(self.config, MODULE, source_factory=lambda spec: None, context=self.context)
        self.producer.control = InProcessControl(self.control)
        self.inputs = {}
        if not gateway:
            for n in NODES:
                sock = self.inputs[n] = self.context.socket(zmq.PULL)
                sock.bind(self.config.network.bind(self.config.network.node_port(n, MODULE)))

    def beat(self, op: str, **fields) -> dict:
        reply = self.control.handle({"op": op, **fields})
        assert reply["ok"], reply
        return reply

    def start(self, number: int = 1, shape=(8, 8)) -> OutgoingScan:
        """Start a scan (block_frames 32: a block per 32 positions) and the producer's record of it."""
        self.beat("start_scan", scan_number=number, scan_shape=list(shape), nodes=list(NODES))
        self.producer.tick(force=True)
        out = self.producer.outgoing[number] = OutgoingScan(self.producer.scan_specs[number])
        return out

    def fail_over(self, node: int) -> None:
        """Node group ``node`` silent past dead_after_s: control starts a new routing generation."""
        self.control.roles[f"node-{node}"]["seen"] = 0.0
        self.control.tick()

    def received(self, node: int, n: int) -> list[tuple[int, int, int, int]]:
        """The next ``n`` messages at node group ``node``'s input as (block, node, stream, first
        frame number)."""
        got = []
        for _ in range(n):
            message = wire.decode_sectors(self.next_message(node))
            got.append((message.block, message.node, message.stream, int(message.records["header"]["frame_number"][0])))
        return got

    def next_message(self, node: int) -> list:
        assert self.inputs[node].poll(5000), f"node group {node} got no message"
        return self.inputs[node].recv_multipart()

    def close(self) -> None:
        self.context.destroy(linger=0)


def records(block: int, n: int = 2) -> np.ndarray:
    """``n`` records of ``block``, their frame numbers telling them apart."""
    r = np.zeros(n, RECORD_DTYPE)
    r["header"]["frame_number"] = np.arange(n) + 100 * block
    r["header"]["scan_number"] = 1
    return r


@pytest.fixture
def rig(tmp_path):
    made = []

    def make(**kwargs) -> Rig:
        made.append(Rig(tmp_path, **kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_blocks_go_round_the_node_groups_then_after_a_failover_to_the_survivor_with_the_uncommitted_resent(rig):
    r = rig()
    producer, out = r.producer, r.start(shape=(16, 16))  # 8 blocks
    for block in range(4):
        assert producer._send_block(out, block, records(block), patience=1.0)
    assert r.received(0, 2) == [(0, 0, 0, 0), (2, 0, 0, 200)]
    assert r.received(1, 2) == [(1, 1, 0, 100), (3, 1, 0, 300)]
    assert sorted(out.retained) == [0, 1, 2, 3]
    # the writer commits blocks 0 and 2; node group 1 dies; the writer fences generation 1
    r.beat("committed", scan=1, ranges=[[0, 1], [2, 3]], fenced=0, done=[])
    r.fail_over(1)
    r.beat("committed", scan=1, ranges=[[0, 1], [2, 3]], fenced=1, done=[])
    producer.tick(force=True)
    # the next block first moves to generation 1: the uncommitted blocks are resent, in block
    # order, to the survivor; the committed ones are freed
    assert producer._send_block(out, 4, records(4), patience=1.0)
    assert r.received(0, 3) == [(1, 0, 1, 100), (3, 0, 1, 300), (4, 0, 1, 400)]
    assert out.generation == 1 and sorted(out.retained) == [1, 3, 4]
    assert producer.counters["blocks_resent"] == 2 and out.resent_blocks == 2
    # node group 1's own blocks go to node group 0 from now on
    assert producer._send_block(out, 5, records(5), patience=1.0)
    assert r.received(0, 1) == [(5, 0, 1, 500)]
    assert out.sent[(0, 0)] == 4 and out.sent[(1, 0)] == 4 and out.sent[(0, 1)] == 8


def test_a_failover_after_the_last_block_resends_and_ends_the_scan_in_the_new_generation(rig):
    r = rig()
    producer, out = r.producer, r.start()  # 2 blocks
    for block in range(2):
        assert producer._send_block(out, block, records(block), patience=1.0)
    assert r.received(0, 1) == [(0, 0, 0, 0)] and r.received(1, 1) == [(1, 1, 0, 100)]
    out.source_done = True
    producer._end(out)
    ends = [wire.decode_end(r.next_message(n)) for n in NODES]
    assert [(e.node, e.stream, e.sent) for e in ends] == [(0, 0, 2), (1, 0, 2)]
    r.fail_over(0)
    r.beat("committed", scan=1, ranges=[], fenced=1, done=[])
    producer.tick(force=True)
    producer._service()
    assert r.received(1, 2) == [(0, 1, 1, 0), (1, 1, 1, 100)]
    end = wire.decode_end(r.next_message(1))
    assert (end.node, end.stream, end.sent) == (1, 1, 4)


def test_committed_blocks_are_freed_from_the_resend_buffer_as_acks_arrive(rig):
    r = rig()
    producer, out = r.producer, r.start(shape=(16, 16))
    for block in range(6):
        producer._send_block(out, block, records(block), patience=1.0)
    r.beat("committed", scan=1, ranges=[[0, 2], [4, 5]], fenced=0, done=[])
    producer._service()
    assert sorted(out.retained) == list(range(6))  # the commits are known only from a heartbeat reply
    producer.tick(force=True)
    producer._service()
    assert sorted(out.retained) == [2, 3, 5]
    assert producer.stats()["retained_blocks"] == 3


def test_a_full_resend_buffer_has_room_again_once_commits_free_it(rig):
    r = rig(retain_blocks=2)
    producer, out = r.producer, r.start()
    for block in range(2):
        assert producer._send_block(out, block, records(block), patience=1.0)
    assert not producer._wait_for_room(out, patience_s=0.0)
    r.beat("committed", scan=1, ranges=[[0, 1]], fenced=0, done=[])
    producer.tick(force=True)
    assert producer._wait_for_room(out, patience_s=0.0) and sorted(out.retained) == [1]


def test_a_block_the_consumer_does_not_take_within_the_patience_is_spilled_and_announced(rig):
    r = rig(gateway=True, send_hwm=1)  # nothing listens at the gateway's input: the queue fills
    producer, out = r.producer, r.start(shape=(16, 16))
    sent = []
    for block in range(8):
        if not producer._send_block(out, block, records(block), patience=0.01):
            break
        sent.append(block)
    spilled = len(sent)
    assert spilled < 8, "the socket took every block: its high-water mark did not hold"
    assert out.spilled == {spilled} and sorted(out.retained) == sent
    assert producer.counters["records_spilled"] == out.spilled_records == 2
    # the records are on disk in the receivers' format, and the block's node group will be told
    files = sorted(spill_directory(r.config.pipeline.spill_dir, 1).iterdir())
    on_disk = np.fromfile(files[0], RECORD_DTYPE)
    assert len(files) == 1 and np.array_equal(on_disk["header"]["frame_number"], records(spilled)["header"]["frame_number"])
    assert out.notices[out.spec.route(spilled)] == [spilled]


def test_the_scan_control_started_first_is_streamed_first(rig):
    r = rig()
    r.beat("start_scan", scan_number=5, scan_shape=[2, 2], nodes=[0])
    r.beat("start_scan", scan_number=3, scan_shape=[2, 2], nodes=[0])
    producer = r.producer
    assert producer._next_scan() is None  # nothing known before a heartbeat
    producer.tick(force=True)
    first = producer._next_scan()
    assert (first.number, first.epoch) == (5, 1)
    producer.mark_finished(first)
    assert producer._next_scan().number == 3
    producer.mark_finished(producer._next_scan())
    assert producer._next_scan() is None
