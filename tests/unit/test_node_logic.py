"""A node group's per-scan logic (pipeline.node.assembly.NodeScan) through its ports, and the
node group's routing of streams (pipeline.node.role.NodeGroup, never started): no socket, no
sleep. Time is a clock the tests move by hand."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from scan_specs import make_spec
from stemstream.core.config import FlowSettings, PipelineConfig
from stemstream.core.detector import FRAME_PIXELS, FRAME_SHAPE, MODULES, N_MODULES, sector_rows
from stemstream.core.thresholds import Thresholds
from stemstream.counting.kernel import ElectronCounter
from stemstream.counting.thresholds import PixelHistogram, draw_sample_weights
from stemstream.formats import wire
from stemstream.formats.partials import decode_partials
from stemstream.formats.raw import raw_file_name
from stemstream.pipeline.node.assembly import NodePorts, NodeScan
from stemstream.pipeline.node.role import NodeGroup
from stemstream.pipeline.spill import spill_directory
from stemstream.sources.simulator import DetectorSimulator, SimulationConfig
from stemstream.transport.control_client import ControlUnavailable

SCAN = 5
SHAPE = (2, 4)  # rows, cols: 8 positions
BLOCK_FRAMES = 4  # 2 blocks
N_FRAMES = SHAPE[0] * SHAPE[1]
THRESHOLDS = Thresholds(background=28.0, xray=1000.0)
ALL = (1 << N_MODULES) - 1


@pytest.fixture(scope="module")
def scan_data():
    """The scan's frames and each module's records (frame number = index, position = index)."""
    sim = DetectorSimulator(SimulationConfig(scan_shape=SHAPE, seed=3, scan_number=SCAN, first_frame_number=0))
    return sim.batch(0, N_FRAMES).frames, [sim.records(0, N_FRAMES, m) for m in MODULES]


def offline(frames: np.ndarray) -> list[np.ndarray]:
    counted = ElectronCounter(THRESHOLDS.background, THRESHOLDS.xray, FRAME_SHAPE).count(frames)
    return [counted.frame(i).copy() for i in range(len(frames))]


class Outside:
    """What a NodeScan's ports lead to, recorded: messages to the writer, histograms to control,
    rejections, heartbeats; the specs control gave, the producers it calls dead, the writer's
    commits it relays; a clock moved by hand."""

    def __init__(self, tmp_path):
        self.sent: list[list] = []
        self.calibrations: list[tuple[int, dict]] = []
        self.rejected: Counter = Counter()
        self.keepalives = 0
        self.specs: dict = {}
        self.dead_producers: set[int] = set()
        self.commits: list = []  # block ranges
        self.now = 1000.0
        self.ports = NodePorts(
            index=0, flow=FlowSettings(end_timeout_s=3.0, scan_timeout_s=60.0), analyses=[],
            spill_dir=tmp_path / "spill", counters=Counter(), send=self.sent.append,
            send_calibration=lambda scan, histogram: self.calibrations.append((scan, histogram)),
            latest_spec=self.specs.get, reject=self._reject, keepalive=self._keepalive,
            producer_dead=self.dead_producers.__contains__, committed=lambda scan: self.commits, clock=lambda: self.now,
        )

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1

    def _keepalive(self) -> None:
        self.keepalives += 1

    def take(self) -> list[tuple[bytes, object]]:
        """The messages sent since the last take, decoded: (kind, message)."""
        out = []
        for parts in self.sent:
            kind = wire.kind_of(parts)
            if kind == wire.EVENTS:
                out.append((kind, wire.decode_events(parts, FRAME_PIXELS)))
            elif kind == wire.DONE:
                out.append((kind, wire.decode_done(parts)))
            else:
                assert kind == wire.ANALYSIS
                out.append((kind, decode_partials(parts[2:])))
        self.sent.clear()
        return out


@pytest.fixture
def outside(tmp_path):
    return Outside(tmp_path)


def spec(**fields):
    fields.setdefault("thresholds", THRESHOLDS)
    return make_spec(SCAN, SHAPE, block_frames=BLOCK_FRAMES, **fields)


def sectors(records: np.ndarray, module: int, block: int, spilled=(), stream: int = 0) -> wire.SectorsMessage:
    """A SECTORS message of ``records`` as the node group decodes it off the wire."""
    parts = wire.encode_sectors(SCAN, module, block, 0, records, spilled=list(spilled), stream=stream)
    return wire.decode_sectors([parts[0], parts[1], records.tobytes()])


def block_records(records: list[np.ndarray], module: int, block: int) -> np.ndarray:
    return records[module][block * BLOCK_FRAMES:(block + 1) * BLOCK_FRAMES]


def end(module: int, sent: int, spilled_blocks=()) -> wire.EndMessage:
    return wire.decode_end(wire.encode_end(SCAN, module, 0, sent=sent, spilled_blocks=list(spilled_blocks)))


def events_of(messages) -> list[wire.EventsMessage]:
    return [m for kind, m in messages if kind == wire.EVENTS]


def frame_events(msg: wire.EventsMessage, i: int) -> np.ndarray:
    return msg.events[msg.offsets[i]:msg.offsets[i + 1]]


# -- reassembly ------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 1, 0, 2), (2, 3, 1, 0)])
def test_a_blocks_four_parts_in_any_order_make_one_events_message_counted_as_offline(outside, scan_data, order):
    frames, records = scan_data
    scan = NodeScan(outside.ports, spec())
    for module in order[:-1]:
        scan.add_sectors(sectors(block_records(records, module, 0), module, 0))
        scan.step()
        assert outside.sent == [], "a block was sent before all its parts came"
    scan.add_sectors(sectors(block_records(records, order[-1], 0), order[-1], 0))
    scan.step()
    messages = outside.take()
    assert [kind for kind, _ in messages] == [wire.EVENTS, wire.ANALYSIS]
    (msg,) = events_of(messages)
    assert msg.block == 0 and msg.scan == SCAN and msg.stream == 0
    assert msg.frame_numbers.tolist() == [0, 1, 2, 3]
    assert msg.positions.tolist() == [0, 1, 2, 3]
    assert msg.present.tolist() == [ALL] * 4
    assert msg.subpixel is None  # the maxima method's message is as it always was: no sub-pixel part
    expected = offline(frames[:4])
    for i in range(4):
        assert np.array_equal(frame_events(msg, i), expected[i]), f"frame {i}"
    assert sum(len(e) for e in expected) > 0
    assert msg.ledger["sectors_received"] == [4] * N_MODULES
    assert msg.ledger["sectors_missing"] == [0] * N_MODULES
    assert messages[1][1].info["frames"] == 4
    assert outside.ports.counters["frames_counted"] == 4
    assert outside.keepalives == 1
    assert scan.done_blocks == {0} and not scan.pending


def test_a_block_missing_a_module_is_settled_by_that_modules_later_block(outside, scan_data):
    frames, records = scan_data
    scan = NodeScan(outside.ports, spec())
    for module in (0, 1, 2):
        scan.add_sectors(sectors(block_records(records, module, 0), module, 0))
    scan.step()
    assert outside.sent == []  # module 3's part of block 0 may still come
    scan.add_sectors(sectors(block_records(records, 3, 1), 3, 1))  # module 3 moved on: it never will
    scan.step()
    (msg,) = events_of(outside.take())
    assert msg.block == 0 and msg.present.tolist() == [0b0111] * 4
    assert msg.ledger["sectors_missing"] == [0, 0, 0, 4]
    assert msg.ledger["sectors_received"] == [4, 4, 4, 0]
    zero_filled = frames[:4].copy()
    zero_filled[:, sector_rows(3)] = 0
    expected = offline(zero_filled)
    for i in range(4):
        assert np.array_equal(frame_events(msg, i), expected[i]), f"frame {i}"
    assert 1 in scan.pending and 0 not in scan.pending


def test_sectors_missing_after_the_end_markers_count_the_frames_incomplete_once_their_producer_is_gone(outside,
                                                                                                       scan_data):
    frames, records = scan_data
    scan = NodeScan(outside.ports, spec())
    for block in (0, 1):
        for module in (0, 1, 2):
            scan.add_sectors(sectors(block_records(records, module, block), module, block))
    for module in MODULES:
        scan.add_end(end(module, sent=N_FRAMES))  # module 3 sent 8 sectors; none arrived
    scan.step()
    # module 3's END came before the blocks the spec routes here: they are owed, not given up
    assert outside.sent == [] and scan.owed[3] == {0, 1} and not scan.ended
    outside.now += outside.ports.flow.end_timeout_s + 0.5
    scan.step()
    assert outside.sent == [] and not scan.finished  # its producer lives: they may still come
    outside.dead_producers.add(3)
    scan.step()
    messages = outside.take()
    assert [kind for kind, _ in messages] == [wire.EVENTS, wire.EVENTS, wire.ANALYSIS, wire.DONE]
    sent_events = events_of(messages)
    assert [m.block for m in sent_events] == [0, 1]
    assert np.concatenate([m.frame_numbers for m in sent_events]).tolist() == list(range(N_FRAMES))
    assert all(m.present.tolist() == [0b0111] * 4 for m in sent_events)
    assert [m.ledger["sectors_missing"] for m in sent_events] == [[0, 0, 0, 4]] * 2
    done = messages[-1][1]
    assert done.lost == [0, 0, 0, N_FRAMES]
    assert done.ledger["modules_ended"] == [0, 1, 2, 3] and not done.ledger["failed"]
    assert done.ledger["sectors_received"] == [0] * N_MODULES  # the blocks' counts went with their events
    assert scan.finished and scan.sectors_missing == [0, 0, 0, N_FRAMES]


def test_a_duplicate_sector_is_counted_duplicate_and_the_first_copy_kept(outside, scan_data):
    frames, records = scan_data
    scan = NodeScan(outside.ports, spec())
    altered = block_records(records, 1, 0).copy()
    altered["data"][:] = 5000  # a second copy that differs: must not replace the first
    for module in MODULES:
        scan.add_sectors(sectors(block_records(records, module, 0), module, 0))
        if module == 1:
            scan.add_sectors(sectors(altered[1:3], 1, 0))
    scan.step()
    (msg,) = events_of(outside.take())
    assert msg.frame_numbers.tolist() == [0, 1, 2, 3] and msg.present.tolist() == [ALL] * 4
    assert msg.ledger["sectors_duplicate"] == [0, 2, 0, 0]
    assert msg.ledger["sectors_received"] == [4] * N_MODULES
    expected = offline(frames[:4])
    for i in range(4):
        assert np.array_equal(frame_events(msg, i), expected[i]), f"frame {i}"
    assert not outside.rejected  # a duplicate is not a rejection


def test_bad_records_are_rejected_with_their_reason_and_a_late_sector_at_once(outside, scan_data):
    _, records = scan_data
    scan = NodeScan(outside.ports, spec())
    part = block_records(records, 2, 0).copy()
    part["header"]["x"][1] = SHAPE[1]  # one column past the scan
    part["header"]["scan_number"][3] = SCAN + 1
    for module in MODULES:
        scan.add_sectors(sectors(part if module == 2 else block_records(records, module, 0), module, 0))
    scan.step()
    (msg,) = events_of(outside.take())
    assert msg.present.tolist() == [ALL, 0b1011, ALL, 0b1011]
    assert msg.ledger["rejected_reasons"] == {"position_out_of_bounds": 1, "other_scan_number": 1}
    assert msg.ledger["sectors_rejected"] == [0, 0, 2, 0]
    assert outside.rejected == Counter(position_out_of_bounds=1, other_scan_number=1)
    scan.add_sectors(sectors(block_records(records, 0, 0), 0, 0))  # block 0 was counted already
    assert outside.rejected["late_sector"] == 1
    for module in MODULES:
        scan.add_sectors(sectors(block_records(records, module, 1), module, 1))
        scan.add_end(end(module, sent=N_FRAMES))
    scan.step()
    done = [m for kind, m in outside.take() if kind == wire.DONE][0]
    assert done.ledger["rejected_reasons"] == {"late_sector": BLOCK_FRAMES}
    assert done.ledger["sectors_rejected"] == [BLOCK_FRAMES, 0, 0, 0]


def test_an_unsettled_block_waits_until_the_node_group_gives_up_on_it(outside, scan_data):
    _, records = scan_data
    scan = NodeScan(outside.ports, spec())
    for module in (0, 2):
        scan.add_sectors(sectors(block_records(records, module, 0), module, 0))
    assert scan.oldest_unsettled() == ([0, 2], [1, 3])
    assert scan.waiting_with(0) == 1 and scan.waiting_with(1) == 0
    scan.step()
    assert outside.sent == []
    scan.step(give_up_oldest=True)
    (msg,) = events_of(outside.take())
    assert msg.block == 0 and msg.present.tolist() == [0b0101] * 4
    assert scan.oldest_unsettled() is None and not scan.pending



def test_a_block_counted_while_a_producer_was_silent_is_spilled_with_the_late_part(outside, scan_data, tmp_path):
    """Finding (chaos: a producer stopped longer than silent_after_s): its blocks were counted
    without it (incomplete frames, named in the ledger), and its sectors, when it resumed, were
    refused as late: a replay of the spill could not complete those frames. The parts counted are
    spilled too, and the late part beside them: the spill holds every module of those frames."""
    _, records = scan_data
    scan = NodeScan(outside.ports, spec())
    for module in (0, 2, 3):
        scan.add_sectors(sectors(block_records(records, module, 0), module, 0))
    scan.step(give_up_oldest=True)  # producer 1 silent: counted as it stands
    (msg,) = events_of(outside.take())
    assert msg.block == 0 and msg.present.tolist() == [ALL & ~0b10] * BLOCK_FRAMES
    scan.add_sectors(sectors(block_records(records, 1, 0), 1, 0))  # producer 1 resumed
    assert not outside.rejected and not scan.pending
    scan.add_sectors(sectors(block_records(records, 0, 0), 0, 0))  # a duplicate of a part counted: refused
    assert outside.rejected == Counter(late_sector=1)
    for module in MODULES:
        scan.add_sectors(sectors(block_records(records, module, 1), module, 1))
        scan.add_end(end(module, sent=N_FRAMES))
    scan.step()  # block 1 is whole: counted, not spilled; the spill files are closed
    out = spill_directory(tmp_path / "spill", SCAN)
    for module in MODULES:
        data = (out / raw_file_name(SCAN, module, dst=100)).read_bytes()
        assert data == block_records(records, module, 0).tobytes()

def test_the_frames_spilled_of_a_block_counted_without_a_silent_producer_are_in_its_ledger(outside, scan_data):
    """Finding: the file named those frames incomplete but the ledger's frames_spilled did not
    count them (only blocks a producer spilled were)."""
    _, records = scan_data
    scan = NodeScan(outside.ports, spec())
    for module in (0, 2, 3):
        scan.add_sectors(sectors(block_records(records, module, 0), module, 0))
    scan.step(give_up_oldest=True)  # producer 1 silent: counted as it stands, its parts spilled
    (msg,) = events_of(outside.take())
    assert msg.block == 0 and msg.ledger["frames_spilled"] == BLOCK_FRAMES
    for module in MODULES:
        scan.add_sectors(sectors(block_records(records, module, 1), module, 1))
        scan.add_end(end(module, sent=N_FRAMES))
    scan.step()
    counted = events_of(outside.take())
    assert [m.block for m in counted] == [1] and counted[0].ledger["frames_spilled"] == 0


def test_a_block_a_producer_spilled_is_spilled_whole_not_counted(outside, scan_data, tmp_path):
    _, records = scan_data
    scan = NodeScan(outside.ports, spec())
    for module in (0, 1, 2):
        scan.add_sectors(sectors(block_records(records, module, 0), module, 0))
    # module 3's next message says it spilled its part of block 0
    scan.add_sectors(sectors(block_records(records, 3, 1), 3, 1, spilled=[0]))
    scan.step()
    (msg,) = events_of(outside.take())
    assert msg.block == 0 and len(msg.frame_numbers) == 0 and msg.ledger["frames_spilled"] == BLOCK_FRAMES
    for module in MODULES:
        if module != 3:
            scan.add_sectors(sectors(block_records(records, module, 1), module, 1))
        scan.add_end(end(module, sent=N_FRAMES))
    scan.step()  # block 1 is counted; the spill files are closed
    (msg,) = events_of(outside.take())
    assert msg.block == 1 and msg.present.tolist() == [ALL] * 4
    assert outside.ports.counters["frames_counted"] == BLOCK_FRAMES
    out = spill_directory(tmp_path / "spill", SCAN)
    for module in (0, 1, 2):
        data = (out / raw_file_name(SCAN, module, dst=100)).read_bytes()
        assert data == block_records(records, module, 0).tobytes()
    assert not (out / raw_file_name(SCAN, 3, dst=100)).exists()


# -- what the spec allows: forged block numbers and early end markers (issue 12, finding 7) -----------


def forged_end(module: int, sent: int = 0, spilled_blocks=(), stream: int = 0) -> wire.EndMessage:
    return wire.decode_end(wire.encode_end(SCAN, module, 0, sent=sent, spilled_blocks=list(spilled_blocks),
                                           stream=stream))


def feed_block(scan: NodeScan, records, block: int, modules=MODULES, stream: int = 0) -> None:
    for module in modules:
        scan.add_sectors(sectors(block_records(records, module, block), module, block, stream=stream))


def assert_whole(outside: Outside, frames: np.ndarray) -> wire.DoneMessage:
    """Every frame sent complete and counted as offline, once; the DONE (nothing lost)."""
    messages = outside.take()
    sent = events_of(messages)
    numbers = np.concatenate([m.frame_numbers for m in sent]).tolist()
    assert sorted(numbers) == list(range(len(frames))) and all((m.present == ALL).all() for m in sent)
    expected = offline(frames)
    for msg in sent:
        for i, number in enumerate(msg.frame_numbers.tolist()):
            assert np.array_equal(frame_events(msg, i), expected[number]), f"frame {number}"
    (done,) = [m for kind, m in messages if kind == wire.DONE]
    assert done.lost == [0] * N_MODULES
    return done


@pytest.mark.parametrize("block, nodes, reason", [
    (2**32 - 1, [0], "block_not_in_scan"),  # the campaign's forgery
    (N_FRAMES // BLOCK_FRAMES + 1, [0], "block_not_in_scan"),  # past the scan's last block (frames from 1)
    (1, [0, 1], "block_not_routed_here"),  # node group 1's block
])
def test_a_forged_block_the_spec_does_not_route_here_is_refused_and_settles_nothing(outside, scan_data, block, nodes,
                                                                                   reason):
    """A lagging module 0: modules 1-3 sent block 0, then a forged empty block of module 0 comes.
    It used to settle block 0 without module 0 (incomplete frames) and make the real part late."""
    frames, records = scan_data
    scan = NodeScan(outside.ports, spec(nodes=nodes))
    feed_block(scan, records, 0, modules=(1, 2, 3))
    scan.add_sectors(sectors(records[0][:0], 0, block))
    scan.step()
    assert outside.rejected == Counter({reason: 1}) and outside.sent == []
    assert scan.highest_block[0] == -1 and scan.rejected_reasons == Counter()  # no record in it
    feed_block(scan, records, 0, modules=(0,))
    mine = [b for b in range(N_FRAMES // BLOCK_FRAMES) if spec(nodes=nodes).route(b)[0] == 0]
    for b in mine[1:]:
        feed_block(scan, records, b)
    for module in MODULES:
        scan.add_end(end(module, sent=BLOCK_FRAMES * len(mine)))
    scan.step()
    assert_whole(outside, frames[np.concatenate([np.arange(b * BLOCK_FRAMES, (b + 1) * BLOCK_FRAMES) for b in mine])]
                 if nodes == [0] else frames[:BLOCK_FRAMES])
    assert outside.rejected == Counter({reason: 1}) and scan.finished


def test_a_forged_blocks_records_are_counted_rejected_in_the_ledger(outside, scan_data):
    _, records = scan_data
    scan = NodeScan(outside.ports, spec())
    scan.add_sectors(sectors(block_records(records, 2, 0), 2, 7))
    assert scan.sectors_rejected == [0, 0, BLOCK_FRAMES, 0]
    assert scan.unblocked["rejected_reasons"] == {"block_not_in_scan": BLOCK_FRAMES} and not scan.pending


def test_a_spill_notice_of_another_node_groups_block_is_refused_with_its_message(outside, scan_data):
    _, records = scan_data
    scan = NodeScan(outside.ports, spec(nodes=[0, 1]))
    scan.add_sectors(sectors(block_records(records, 1, 0), 1, 0, spilled=[1]))
    scan.add_end(forged_end(2, spilled_blocks=[5]))
    assert outside.rejected == Counter(block_not_routed_here=1, block_not_in_scan=1)
    assert not scan.pending and not scan.ends and not scan.spilled_parts


def test_an_early_end_marker_closes_nothing_until_the_blocks_the_spec_routes_here_came(outside, scan_data):
    """A forged END of module 0 (sent 0) while module 0 lags used to close module 0: every block
    was counted without it, and its real sectors were then rejected as late."""
    frames, records = scan_data
    scan = NodeScan(outside.ports, spec())
    feed_block(scan, records, 0, modules=(1, 2, 3))
    scan.add_end(forged_end(0))
    scan.step()
    assert outside.sent == [] and scan.owed[0] == {0, 1} and not scan.ended
    feed_block(scan, records, 0, modules=(0,))
    scan.step()
    assert [m.present.tolist() for m in events_of(outside.take())] == [[ALL] * 4]
    feed_block(scan, records, 1)
    for module in MODULES:  # the real ends, after the blocks: module 0's replaces the forged one
        scan.add_end(end(module, sent=N_FRAMES))
    scan.step()
    messages = outside.take()
    assert [kind for kind, _ in messages] == [wire.EVENTS, wire.ANALYSIS, wire.DONE]
    assert messages[0][1].present.tolist() == [ALL] * 4 and messages[-1][1].lost == [0] * N_MODULES
    assert not outside.rejected


def test_after_a_failover_blocks_the_writer_committed_are_not_owed(outside, scan_data):
    """Generation 1 routes both blocks here; block 0 was committed in generation 0, so the
    producers resend block 1 only. The commits reach this node group in a heartbeat reply."""
    frames, records = scan_data
    failed_over = spec(nodes=[0, 1])
    failed_over.new_generation([1], "node group 1 stopped answering", at=0.0, committed_blocks=1)
    scan = NodeScan(outside.ports, failed_over, stream=1)
    feed_block(scan, records, 1, stream=1)
    for module in MODULES:
        scan.add_end(forged_end(module, sent=BLOCK_FRAMES, stream=1))
    scan.step()
    messages = outside.take()
    assert [kind for kind, _ in messages] == [wire.EVENTS, wire.ANALYSIS]
    assert messages[0][1].block == 1 and messages[0][1].stream == 1 and messages[0][1].present.tolist() == [ALL] * 4
    assert scan.owed == {m: {0} for m in MODULES} and not scan.finished
    outside.commits[:] = [[0, 1]]
    scan.step()
    assert [kind for kind, _ in outside.take()] == [wire.DONE] and scan.finished


def test_a_resumed_scan_brings_only_the_spilled_blocks_and_its_end_markers_close_at_once(outside, scan_data):
    _, records = scan_data
    scan = NodeScan(outside.ports, spec(resume=True))
    feed_block(scan, records, 1)
    for module in MODULES:
        scan.add_end(end(module, sent=BLOCK_FRAMES))
    scan.step()
    assert [kind for kind, _ in outside.take()] == [wire.EVENTS, wire.ANALYSIS, wire.DONE] and scan.finished


# -- time ------------------------------------------------------------------------------------------


def test_partials_follow_the_events_at_most_every_interval_and_before_done(outside, scan_data):
    _, records = scan_data
    scan = NodeScan(outside.ports, spec())
    for module in MODULES:
        scan.add_sectors(sectors(block_records(records, module, 0), module, 0))
    scan.step()
    assert [kind for kind, _ in outside.take()] == [wire.EVENTS, wire.ANALYSIS]
    outside.now += 0.05
    for module in MODULES:
        scan.add_sectors(sectors(block_records(records, module, 1), module, 1))
    scan.step()
    assert [kind for kind, _ in outside.take()] == [wire.EVENTS]  # partials sent 0.05 s ago
    outside.now += 0.5
    scan.step()
    messages = outside.take()
    assert [kind for kind, _ in messages] == [wire.ANALYSIS] and messages[0][1].info["frames"] == 4
    for module in MODULES:
        scan.add_end(end(module, sent=N_FRAMES))
    scan.step()
    assert [kind for kind, _ in outside.take()] == [wire.DONE]  # nothing uncommitted was left


def test_a_stream_waits_past_the_end_timeout_for_a_live_producers_module_and_closes_once_it_is_gone(outside,
                                                                                                    scan_data):
    """Issue 12, finding 3: modules 0-2 ended, module 3's blocks are held up (behind a dead node
    group's gateway queue, until its failover at dead_after_s). The end timeout must not finish
    the stream (committing those frames incomplete) while module 3's producer lives."""
    _, records = scan_data
    scan = NodeScan(outside.ports, spec())
    for module in (0, 1, 2):
        for block in (0, 1):
            scan.add_sectors(sectors(block_records(records, module, block), module, block))
        scan.add_end(end(module, sent=N_FRAMES))
    outside.now += outside.ports.flow.end_timeout_s + 1.0
    scan.step()
    assert outside.sent == [] and not scan.finished
    outside.now += outside.ports.flow.scan_timeout_s - outside.ports.flow.end_timeout_s - 2.0
    scan.step()
    assert outside.sent == [] and not scan.finished  # still within scan_timeout_s of silence
    outside.dead_producers.add(3)  # control stopped hearing from producer 3: nothing more comes
    scan.step()
    messages = outside.take()
    assert [kind for kind, _ in messages] == [wire.EVENTS, wire.EVENTS, wire.ANALYSIS, wire.DONE]
    assert [m.present.tolist() for m in events_of(messages)] == [[0b0111] * 4] * 2
    assert messages[-1][1].ledger["modules_ended"] == [0, 1, 2]
    assert scan.finished


def test_silence_past_the_scan_timeout_finishes_a_stream_whatever_its_producers(outside, scan_data):
    _, records = scan_data
    scan = NodeScan(outside.ports, spec())
    for module in (0, 1, 2):
        scan.add_sectors(sectors(block_records(records, module, 0), module, 0))
        scan.add_end(end(module, sent=BLOCK_FRAMES))
    outside.now += outside.ports.flow.scan_timeout_s + 1.0
    scan.step()
    assert [kind for kind, _ in outside.take()] == [wire.EVENTS, wire.ANALYSIS, wire.DONE] and scan.finished


# -- calibration -----------------------------------------------------------------------------------


def test_calibration_sends_the_histogram_once_the_quota_is_met_and_counts_once_thresholds_come(outside, scan_data):
    frames, records = scan_data
    calibrating = spec(thresholds=None)
    calibrating.calibration.calibration_frames = N_FRAMES  # this node group's quota: the whole scan
    calibrating.calibration.samples = 20
    scan = NodeScan(outside.ports, calibrating)
    assert scan.waiting_for_thresholds and not scan.awaiting_thresholds
    for module in MODULES:
        scan.add_sectors(sectors(block_records(records, module, 0), module, 0))
    scan.step()
    assert outside.calibrations == [] and outside.sent == []  # 4 of 8 frames sampled
    for module in MODULES:
        scan.add_sectors(sectors(block_records(records, module, 1), module, 1))
    scan.step()
    expected = PixelHistogram()
    for frame, weight in zip(frames, draw_sample_weights(N_FRAMES, 20, seed=1000)):
        if weight:
            expected.add(frame, weight=int(weight))
    assert outside.calibrations == [(SCAN, expected.to_wire())]
    assert scan.awaiting_thresholds and outside.sent == []
    outside.specs[SCAN] = replace(calibrating, epoch=calibrating.epoch + 1, thresholds=THRESHOLDS)
    scan.step()  # thresholds of another run of this scan number: not these
    assert scan.awaiting_thresholds and outside.sent == []
    outside.specs[SCAN] = replace(calibrating, thresholds=THRESHOLDS)
    scan.step()
    assert len(outside.calibrations) == 1
    sent_events = events_of(outside.take())
    assert [m.block for m in sent_events] == [0, 1]
    counted = offline(frames)
    for msg in sent_events:
        for i, number in enumerate(msg.frame_numbers.tolist()):
            assert np.array_equal(frame_events(msg, i), counted[number]), f"frame {number}"
    assert not scan.awaiting_thresholds and not scan.waiting_for_thresholds


def test_a_scan_that_ends_before_the_quota_sends_what_it_sampled(outside, scan_data):
    _, records = scan_data
    scan = NodeScan(outside.ports, spec(thresholds=None))  # quota 640 frames, the scan has 8
    for block in (0, 1):
        for module in MODULES:
            scan.add_sectors(sectors(block_records(records, module, block), module, block))
    scan.step()
    assert outside.calibrations == []
    for module in MODULES:
        scan.add_end(end(module, sent=N_FRAMES))
    scan.step()
    ((number, histogram),) = outside.calibrations
    assert number == SCAN and histogram["n_frames"] > 0
    assert outside.sent == [] and not scan.finished  # nothing is counted without thresholds
    outside.specs[SCAN] = spec()
    scan.step()
    assert [kind for kind, _ in outside.take()] == [wire.EVENTS, wire.EVENTS, wire.ANALYSIS, wire.DONE]
    assert scan.finished


# -- the node group's streams (no socket: a NodeGroup that was never started) -----------------------


@pytest.fixture
def node_group(tmp_path):
    config = PipelineConfig()
    config.pipeline.spill_dir = str(tmp_path / "spill")
    sent: list[list] = []
    node = NodeGroup(config, 0, send=sent.append)
    node.sent = sent
    assert node.inputs == [] and node.events_out is None
    return node


def sectors_parts(records, module: int, block: int, stream: int) -> list:
    return wire.encode_sectors(SCAN, module, block, 0, records, stream=stream)


def test_messages_of_a_superseded_generation_are_dropped_and_a_superseded_stream_forgotten(node_group, scan_data):
    _, records = scan_data
    node_group.scan_specs[SCAN] = spec(generation=1)
    node_group.handle(sectors_parts(block_records(records, 0, 0), 0, 0, stream=0), 0)
    assert node_group.counters["messages_superseded"] == 1 and not node_group.scans
    assert not node_group.rejected
    node_group.handle(sectors_parts(block_records(records, 1, 0), 1, 0, stream=1), 1)
    assert list(node_group.scans) == [(SCAN, 1)] and 1 in node_group.scans[(SCAN, 1)].pending[0].parts
    node_group.drop_superseded()
    assert list(node_group.scans) == [(SCAN, 1)]  # still the current generation
    node_group.scan_specs[SCAN] = spec(generation=2)  # a failover: the writer fenced stream 1
    node_group.drop_superseded()
    assert not node_group.scans and node_group.counters["streams_superseded"] == 1
    assert node_group.sent == []


def test_a_message_on_another_modules_input_is_rejected(node_group, scan_data):
    _, records = scan_data
    node_group.scan_specs[SCAN] = spec()
    node_group.handle(sectors_parts(block_records(records, 2, 0), 2, 0, stream=0), 1)
    assert node_group.rejected == Counter(wrong_module=1) and not node_group.scans


def test_the_node_group_gives_up_on_a_block_only_when_inputs_are_gated_and_a_lacking_producer_is_dead(node_group,
                                                                                                     scan_data):
    _, records = scan_data
    node_group.config.flow.max_pending_blocks = 2
    node_group.scan_specs[SCAN] = spec()
    for block in (0, 1):
        node_group.handle(sectors_parts(block_records(records, 0, block), 0, block, stream=0), 0)
    scan = node_group.scans[(SCAN, 0)]
    assert node_group.module_gated(0) and not node_group.module_gated(3)
    assert not node_group.give_up_waiting(scan)  # producers 1-3 are slow, not known dead
    node_group.role_ages, node_group.role_ages_at = {"producer-3": 3600.0}, time.monotonic()
    assert node_group.give_up_waiting(scan)
    node_group.role_ages = {"producer-0": 3600.0}  # a dead producer whose part the block holds
    assert not node_group.give_up_waiting(scan)


def test_a_message_for_a_stream_that_finished_here_is_refused_not_opened_again(node_group, scan_data):
    """A late END (the real one after a forged early one closed the module) used to open the
    finished stream again, which then waited for blocks that had gone and sent a second DONE."""
    _, records = scan_data
    node_group.scan_specs[SCAN] = spec()
    node_group._next_heartbeat = float("inf")  # no control here to heartbeat to
    for block in (0, 1):
        for module in MODULES:
            node_group.handle(sectors_parts(block_records(records, module, block), module, block, stream=0), module)
    for module in MODULES:
        node_group.handle(wire.encode_end(SCAN, module, 0, sent=N_FRAMES), module)
    node_group.step_scans()
    assert not node_group.scans and (SCAN, 0) in node_group.streams_done
    node_group.handle(wire.encode_end(SCAN, 2, 0, sent=N_FRAMES), 2)
    assert not node_group.scans and node_group.rejected == Counter(stream_finished=1)


def test_a_silent_producers_part_that_comes_after_the_stream_finished_is_spilled_beside_the_others(node_group,
                                                                                                    scan_data):
    """Finding: a silent producer's parts sent before the writer committed their blocks, but
    arriving after the node group finished the stream, were refused as stream_finished (then
    freed by the commit): a replay could not complete those frames. They are spilled beside the
    other parts; any other message for the finished stream is still refused."""
    _, records = scan_data
    node_group.scan_specs[SCAN] = spec()
    node_group._next_heartbeat = float("inf")  # no control here to heartbeat to
    node_group.config.flow.end_timeout_s = 0.0
    node_group.role_ages, node_group.role_ages_at = {"producer-1": 3600.0}, time.monotonic()
    for block in (0, 1):
        for module in (0, 2, 3):
            node_group.handle(sectors_parts(block_records(records, module, block), module, block, stream=0), module)
    for module in (0, 2, 3):
        node_group.handle(wire.encode_end(SCAN, module, 0, sent=N_FRAMES), module)
    time.sleep(0.01)
    node_group.step_scans()  # producer 1 silent: both blocks counted without it, the others' parts spilled
    assert not node_group.scans and (SCAN, 0) in node_group.streams_done
    for block in (0, 1):  # producer 1 resumed: what it had sent comes now
        node_group.handle(sectors_parts(block_records(records, 1, block), 1, block, stream=0), 1)
    assert not node_group.rejected and node_group.counters["late_parts_spilled"] == 2
    node_group.handle(sectors_parts(block_records(records, 0, 0), 0, 0, stream=0), 0)  # not given up on: refused
    assert node_group.rejected == Counter(stream_finished=1)
    out = spill_directory(node_group.config.pipeline.spill_dir, SCAN)
    for module in MODULES:
        spilled = np.concatenate([np.fromfile(f, records[module].dtype) for f in sorted(out.glob(f"*module{module}_*"))])
        assert spilled.tobytes() == records[module].tobytes(), module


class AwayControl:
    """Stands in for control: no answer (as when it was killed) until ``up``; then heartbeat
    replies carry ``specs``."""

    def __init__(self, *specs):
        self.up = False
        self.specs = specs

    def request(self, op, timeout_s=None, **fields):
        if not self.up:
            raise ControlUnavailable("control is away")
        return {"ok": True, "instance": "control-1", "scans": [s.to_wire() for s in self.specs], "acks": {}, "ages": {}}


def test_messages_of_a_scan_not_known_yet_are_held_while_control_is_away_then_counted(node_group, scan_data):
    """Finding (chaos): control killed 0.1 s after a scan started, before this node group's
    heartbeat brought the spec: its sectors were rejected as unknown_scan (frames incomplete).
    They are held, in order and bounded, until control answers; then counted as offline."""
    frames, records = scan_data
    node_group.control = AwayControl(spec())
    for block in (0, 1):
        for module in MODULES:
            node_group.handle(sectors_parts(block_records(records, module, block), module, block, stream=0), module)
    for module in MODULES:
        node_group.handle(wire.encode_end(SCAN, module, 0, sent=N_FRAMES), module)
    assert not node_group.rejected and not node_group.scans
    assert len(node_group.held) == 3 * N_MODULES and node_group.counters["messages_held"] == 3 * N_MODULES
    node_group.release_held(node_group.handle)  # control still away: still held
    assert len(node_group.held) == 3 * N_MODULES
    node_group.control.up = True
    node_group.tick(force=True)
    node_group.release_held(node_group.handle)
    assert not node_group.held and not node_group.held_bytes and not node_group.rejected
    node_group.step_scans()
    assert (SCAN, 0) in node_group.streams_done
    sent = [wire.decode_events(p, FRAME_PIXELS) for p in node_group.sent if wire.kind_of(p) == wire.EVENTS]
    assert sum(len(m.frame_numbers) for m in sent) == N_FRAMES and all((m.present == ALL).all() for m in sent)
    expected = offline(frames)
    for msg in sent:
        for i, number in enumerate(msg.frame_numbers):
            np.testing.assert_array_equal(frame_events(msg, i), expected[number])


def test_held_messages_are_bounded_and_a_scan_control_does_not_know_is_still_rejected(node_group, scan_data):
    _, records = scan_data
    node_group.control = AwayControl()
    node_group.held_limit = 2
    for module in (0, 1, 2):
        node_group.handle(sectors_parts(block_records(records, module, 0), module, 0, stream=0), module)
    assert len(node_group.held) == 2 and node_group.module_gated(3)  # full: no input is read
    assert node_group.rejected == Counter(unknown_scan=1) and node_group.counters["held_overflow"] == 1
    node_group.control.up = True  # back, and it has no such scan (a forged one)
    node_group.tick(force=True)
    node_group.release_held(node_group.handle)
    assert node_group.rejected == Counter(unknown_scan=3) and not node_group.scans and not node_group.module_gated(3)


def test_the_cluster_method_counts_each_frame_as_offline_with_the_node_groups_own_model(outside, scan_data):
    """[counting] method = "clusters" on the stream: the node group calibrates the single-electron
    model from its complete frames once the thresholds are known, counts each frame as
    ClusterCounter counts the whole frame offline, sends each event's sub-pixel position with
    it, and its DONE says how it counted."""
    from stemstream.counting.cluster_counter import ClusterCounter, calibrate_cluster_model

    frames, records = scan_data
    scan = NodeScan(replace(outside.ports, method="clusters"), spec())
    for block in range(N_FRAMES // BLOCK_FRAMES):
        for m in MODULES:
            scan.add_sectors(sectors(block_records(records, m, block), m, block))
    assert scan.counter is None  # the model's frames: the stream's first CLUSTER_FRAMES, or all it has at its end
    scan.step()
    assert scan.counter is None and not outside.sent  # blocks settled, but not the 64 frames nor the end yet
    for m in MODULES:
        scan.add_end(end(m, N_FRAMES))
    scan.step()
    model = calibrate_cluster_model(frames, THRESHOLDS)
    expected = ClusterCounter(THRESHOLDS.background, THRESHOLDS.xray, model).count(frames)
    messages = outside.take()
    got, points = {}, {}
    for msg in events_of(messages):
        for i, number in enumerate(msg.frame_numbers):
            got[int(number)] = msg.events[msg.offsets[i]:msg.offsets[i + 1]]
            points[int(number)] = msg.subpixel[msg.offsets[i]:msg.offsets[i + 1]]
    assert sorted(got) == list(range(N_FRAMES))
    for i in range(N_FRAMES):
        np.testing.assert_array_equal(got[i], np.sort(expected.frame(i)))
        np.testing.assert_array_equal(points[i], expected.frame_positions(i))
    done = [m for kind, m in messages if kind == wire.DONE]
    assert done[0].counting == {"method": "clusters", "model": model.attributes()}
    assert not done[0].ledger["failed"]


def test_a_cluster_model_that_cannot_be_fitted_fails_the_stream_and_says_so(outside, scan_data, caplog):
    _, records = scan_data
    scan = NodeScan(replace(outside.ports, method="clusters"), spec())
    for m in MODULES:
        for block in range(N_FRAMES // BLOCK_FRAMES):
            blank = block_records(records, m, block).copy()
            blank["data"] = 0  # no electron: no single-electron cluster to calibrate from
            scan.add_sectors(sectors(blank, m, block))
        scan.add_end(end(m, N_FRAMES))
    scan.step()
    done = [m for kind, m in outside.take() if kind == wire.DONE]
    assert scan.finished and done[0].ledger["failed"]
    assert "single-electron" in caplog.text and "cannot count" in caplog.text
