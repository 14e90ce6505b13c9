"""The producer's decisions without real peers: an in-process control answers its heartbeats,
plain PULL sockets stand where node groups listen. Which node group and routing generation a
block goes to, what is resent after a failover given the writer's commits, when a block is
spilled, which scan is streamed next, what happens to a scan that ends while it streams (spilled,
dropped), how fast a shutdown is obeyed, a source that does not hold the scan asked for."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import zmq

from pipeline_support import InProcessControl, test_config
from scan_specs import make_spec
from stemstream.core.detector import RECORD_DTYPE
from stemstream.deploy.sources import ProducerSource
from stemstream.formats import wire
from stemstream.pipeline.control.service import Control
from stemstream.pipeline.producer import OutgoingScan, Producer
from stemstream.pipeline.scan_ending import how_it_ended
from stemstream.pipeline.spill import spill_directory, spill_writer
from stemstream.sources.modules import ReplayModule
from stemstream.sources.protocol import SourceError
from stemstream.sources.simulator import SimulationConfig, simulate_to_directory

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


# -- following the scan's state (issue 12, finding 4) ----------------------------------------------


class Source:
    """A source of ``n_blocks`` blocks of records(block); ``hooks[block]()`` runs just before that
    block is yielded (what control hears meanwhile). ``yielded``: the blocks it gave."""

    def __init__(self, n_blocks: int, hooks: dict | None = None):
        self.n_blocks, self.hooks, self.yielded = n_blocks, hooks or {}, []
        self.module, self.block_frames = MODULE, 32

    def blocks(self, buffer_for=None):
        for block in range(self.n_blocks):
            if block in self.hooks:
                self.hooks[block]()
            self.yielded.append(block)
            yield block, records(block)


class ShutdownAt(InProcessControl):
    """An in-process control that is told to shut down at monotonic time ``at`` (the first
    request after it), as a user would while the producer is stuck in a send."""

    def __init__(self, control, at: float):
        super().__init__(control)
        self.at = at

    def request(self, op: str, timeout_s: float | None = None, **fields) -> dict:
        if self.at is not None and time.monotonic() >= self.at:
            self.at = None
            assert self.control.handle({"op": "shutdown"})["ok"]
        return super().request(op, timeout_s, **fields)


def spilled_blocks(config, scan: int = 1) -> list[int]:
    """The blocks whose records are in the scan's spill files (frame numbers 100 x block + i)."""
    directory = spill_directory(config.pipeline.spill_dir, scan)
    if not directory.exists():
        return []
    frames = np.concatenate([np.fromfile(f, RECORD_DTYPE)["header"]["frame_number"] for f in directory.iterdir()])
    return sorted({int(f) // 100 for f in frames})


def test_a_scan_closed_with_frames_missing_while_it_streams_is_spilled_whole_then_the_next_scan_streams(rig):
    r = rig()
    producer = r.producer

    def commit_block_0():
        r.beat("committed", scan=1, ranges=[[0, 1]], fenced=0, done=[])
        producer.tick(force=True)

    def writer_closes_it():  # e.g. every node group died: the writer closed the file at its timeouts
        ledger = {"frames_expected": 256, "frames_complete": 64}
        r.beat("scan_done", scan=1, ok=True, summary={"ledger": ledger})
        producer.tick(force=True)

    source = Source(8, {2: commit_block_0, 4: writer_closes_it})
    producer.source_factory = lambda spec: source
    r.beat("start_scan", scan_number=1, scan_shape=[16, 16], nodes=list(NODES))
    producer.tick(force=True)
    producer.produce(producer._next_scan())
    # blocks 0-3 were sent; 0 was committed; the rest (held, and not sent yet) is in the spill
    assert [b for b, *_ in r.received(0, 2) + r.received(1, 2)] == [0, 2, 1, 3]
    assert spilled_blocks(r.config) == [1, 2, 3, 4, 5, 6, 7]
    assert not producer.outgoing and producer.counters["scans_stopped"] == 1
    assert producer.counters["records_spilled"] == 7 * 2
    # the next scan streams at once
    producer.source_factory = lambda spec: Source(2)
    r.beat("start_scan", scan_number=2, scan_shape=[8, 8], nodes=list(NODES))
    producer.tick(force=True)
    nxt = producer._next_scan()
    assert nxt.number == 2
    producer.produce(nxt)
    assert [(b, s) for b, _, s, _ in r.received(0, 1) + r.received(1, 1)] == [(0, 0), (1, 0)]


def test_a_scan_that_failed_is_neither_streamed_on_nor_spilled_and_one_never_begun_is_never_streamed(rig):
    r = rig()
    producer = r.producer

    def writer_refuses():  # the writer cannot create the file: the scan fails, nothing of it is kept
        r.beat("scan_done", scan=1, ok=False, summary={"error": "cannot write x.h5: No space left on device"})
        producer.tick(force=True)

    source = Source(8, {1: writer_refuses})
    producer.source_factory = lambda spec: source
    r.beat("start_scan", scan_number=1, scan_shape=[16, 16], nodes=list(NODES))
    producer.tick(force=True)
    producer.produce(producer._next_scan())
    assert source.yielded == [0, 1]  # the source was not read further
    assert spilled_blocks(r.config) == [] and not producer.outgoing and producer.counters["records_spilled"] == 0
    # a scan control fails before this producer got to it is not streamed at all
    r.beat("start_scan", scan_number=5, scan_shape=[8, 8], nodes=list(NODES))
    producer.tick(force=True)
    r.beat("scan_done", scan=5, ok=False, summary={"error": "refused"})
    producer.tick(force=True)
    assert producer._next_scan() is None


def test_shutdown_stops_a_producer_stuck_in_a_send_within_a_second_with_what_it_held_spilled(rig):
    r = rig(gateway=True, send_hwm=1, backpressure_timeout_s=60.0)  # nobody takes the blocks: sends block
    producer = r.producer
    source = Source(64)
    producer.source_factory = lambda spec: source
    r.beat("start_scan", scan_number=1, scan_shape=[64, 32], nodes=list(NODES))
    producer.tick(force=True)
    producer.control = ShutdownAt(r.control, time.monotonic() + 0.5)
    t0 = time.monotonic()
    producer.produce(producer._next_scan())
    assert time.monotonic() - t0 < 0.5 + 1.0 + 0.5  # a second after the shutdown, and some slack
    assert producer.shutdown
    # every block it took from the source is in the spill (the writer committed none); it read
    # at most one more to spill, and no further
    assert spilled_blocks(r.config) == source.yielded and len(source.yielded) < 8


# -- a replay asked for a scan its files do not hold (issue 12, finding 8) -------------------------


def test_a_replay_asked_for_a_scan_its_files_do_not_hold_says_so_once_and_ends_the_scan(rig, tmp_path):
    raw = tmp_path / "raw"
    simulate_to_directory(raw, SimulationConfig(scan_shape=(4, 4), seed=2))  # scan 1
    with pytest.raises(SourceError, match="the raw files of module 1 hold no record of scan 2 .they hold scan.s. 1."):
        ReplayModule([raw], MODULE, 32, scan_number=2)
    r = rig()
    producer = r.producer
    producer.source_factory = ProducerSource(replay=[raw]).factory(MODULE)
    for number, shape in ((2, [4, 4]), (3, [4, 4])):
        r.beat("start_scan", scan_number=number, scan_shape=shape, nodes=list(NODES))
    producer.tick(force=True)
    for number in (2, 3):
        if number == 3:
            shutil.rmtree(raw)  # for scan 3 the files are gone altogether
        producer.produce(producer._next_scan())  # no exception
        ends = [wire.decode_end(r.next_message(n)) for n in NODES]
        assert [(e.scan, e.sent, e.spilled) for e in ends] == [(number, 0, 0)] * 2  # the scan can end at once
    assert producer.rejected["scan_not_in_source"] == 2


RUN = make_spec(epoch=1).to_wire()  # the run of the scan the producer streams
CLOSED = {"ok": True, "scan": RUN, "state": "closed"}


@pytest.mark.parametrize("reply, shutting_down, expected", [
    ({"ok": True, "scan": RUN, "state": "running"}, False, None),
    ({"ok": True, "scan": RUN, "state": "running"}, True, ("the pipeline is shutting down", True, False)),
    ({**CLOSED, "summary": {"ledger": {"frames_expected": 64, "frames_complete": 64}}}, False,
     ("it was closed", False, True)),
    ({**CLOSED, "summary": {"ledger": {"frames_expected": 64, "frames_complete": 63}}}, False,
     ("it was closed with frames missing", True, False)),
    ({**CLOSED, "summary": None}, False, ("it was closed with frames missing", True, False)),
    ({"ok": True, "scan": RUN, "state": "failed", "summary": {"error": "disk full"}}, False,
     ("it failed (disk full)", False, False)),
    ({"ok": True, "scan": RUN, "state": "failed", "summary": {"error": "shut down"}}, True,
     ("it failed (shut down)", True, False)),
    ({"ok": True, "scan": make_spec(epoch=2).to_wire(), "state": "running"}, False,
     ("a later run of it started (how this one ended is not known)", True, False)),
    # a later run started before the producer heard how its run ended (the commits of its last
    # blocks never reached it): control remembers
    ({"ok": True, "scan": make_spec(epoch=2).to_wire(), "state": "running", "earlier_runs": {"1": "whole"}},
     False, ("it was closed", False, True)),
    ({"ok": True, "scan": make_spec(epoch=2).to_wire(), "state": "running", "earlier_runs": {"1": "incomplete"}},
     False, ("a later run of it started (incomplete)", True, False)),
    ({"ok": True, "scan": make_spec(epoch=2).to_wire(), "state": "closed", "earlier_runs": {"1": "failed"}},
     False, ("it failed", False, False)),
    ({"ok": True, "scan": {"epoch": 1}, "state": "closed"}, False, ("control cannot say how this run of it ended", True, False)),
    ({"ok": False, "error": "unknown scan 1"}, False, ("control cannot say how this run of it ended", True, False)),
    ({}, False, ("control cannot say how this run of it ended", True, False)),
])
def test_how_a_scan_ended_decides_whether_what_is_not_committed_is_spilled(reply, shutting_down, expected):
    stopped = how_it_ended(reply, 1, shutting_down)
    assert (stopped if stopped is None else (stopped.why, stopped.keep, stopped.whole)) == expected


def test_a_block_committed_before_its_part_went_out_is_spilled_not_sent(rig):
    """Finding (chaos: a producer stopped longer than silent_after_s): the node groups counted its
    blocks without it, and what it sent once resumed was refused as late; a replay could not
    complete those frames. A block the writer committed before this module's part went out is
    spilled instead (beside the node group's spill of the other parts)."""
    r = rig()
    producer, out = r.producer, r.start(shape=(16, 16))
    r.beat("committed", scan=1, ranges=[[0, 1]], fenced=0, done=[])
    producer.tick(force=True)
    assert producer._send_block(out, 0, records(0), patience=1.0)
    assert producer._send_block(out, 1, records(1), patience=1.0)
    assert r.received(1, 1) == [(1, 1, 0, 100)] and not r.inputs[0].poll(200)
    assert out.spilled == {0} and sorted(out.retained) == [1]
    files = sorted(spill_directory(r.config.pipeline.spill_dir, 1).iterdir())
    on_disk = np.fromfile(files[0], RECORD_DTYPE)
    assert np.array_equal(on_disk["header"]["frame_number"], records(0)["header"]["frame_number"])


def test_a_producer_started_after_its_blocks_were_counted_without_it_spills_them_from_its_source(rig):
    """Finding (chaos, loaded VM: a producer killed and started again later than silent_after_s):
    its node groups counted its blocks without it and the scan closed before the new process
    checked in, which never streams a scan control has ended: its module's sectors of those
    frames were in no spill, and a replay could not complete them. The new process asks control
    which blocks of the scans it closed lately lack its module, and spills them from its source."""
    r = rig()
    for number, lacking in ((1, {"1": [[2, 3], [5, 6]], "0": [[7, 8]]}), (2, {"0": [[1, 2]]})):
        r.beat("start_scan", scan_number=number, scan_shape=[16, 16], nodes=list(NODES))
        ledger = {"frames_expected": 256, "frames_complete": 192, "blocks_lacking": lacking}
        r.beat("scan_done", scan=number, ok=True, summary={"ledger": ledger})
    producer = r.producer  # a process that streamed none of them
    sources = []
    producer.source_factory = lambda spec: sources.append(Source(8)) or sources[-1]
    producer.tick(force=True)
    producer._service()
    assert spilled_blocks(r.config, scan=1) == [2, 5] and spilled_blocks(r.config, scan=2) == []
    assert len(sources) == 1 and producer._next_scan() is None
    producer._service()  # asked once: nothing spilled twice
    assert len(sources) == 1 and producer.counters["records_spilled"] == 2 * 2


def test_a_spill_started_again_for_a_scan_never_writes_over_the_one_already_there(tmp_path):
    """A producer started again (its spill of the scan under the same epoch), or a node group's
    next stream of a scan, opened the same file names with truncation: the earlier spill was lost."""
    directory = spill_directory(tmp_path, 1)
    first = spill_writer(directory, 1, MODULE, dst=3)
    first.write(records(0))
    first.close()
    second = spill_writer(directory, 1, MODULE, dst=3)
    second.write(records(1))
    second.close()
    assert (first.dst, second.dst) == (3, 4)
    frames = sorted(int(f) for p in directory.iterdir() for f in np.fromfile(p, RECORD_DTYPE)["header"]["frame_number"])
    assert frames == [0, 1, 100, 101]
