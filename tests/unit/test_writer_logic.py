"""The writer's scan logic without sockets (pipeline.writer.scan.WriterScan): each frame's slot,
commits, duplicates, fencing of an old routing generation, the closed file, its ledger and its
thresholds. Messages go through the wire format (encode, then decode) as in the writer."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from scan_specs import make_spec
from stemstream.analysis import ScanAnalyses, default_analyses
from stemstream.core.config import FlowSettings
from stemstream.core.detector import FRAME_SHAPE, N_MODULES
from stemstream.core.thresholds import Thresholds
from stemstream.formats import wire
from stemstream.formats.ledger import sector_tally
from stemstream.formats.sparse_h5 import read_counted
from stemstream.pipeline.writer.scan import ScanHooks, WriterScan
from stemstream.pipeline.writer.role import summary_for_control
from stemstream.transport.messages import MAX_ENVELOPE_BYTES, pack_control

ALL = (1 << N_MODULES) - 1
N_PIXELS = FRAME_SHAPE[0] * FRAME_SHAPE[1]
# One analysis keeps close() quick; the writer's handling does not depend on which ones run.
ANALYSES = default_analyses(FRAME_SHAPE, {"enabled": ["virtual_detectors"]})


def frame_events(frame: int) -> np.ndarray:
    """Events that name their frame: reading a slot back tells which frame landed there."""
    return np.array([frame, (1000 + frame) % N_PIXELS, (2000 + 7 * frame) % N_PIXELS], np.uint32)


def events(spec, frames, node: int = 0, block: int = wire.NO_BLOCK, stream: int = 0, present=None,
           ledger: dict | None = None, lists=None) -> wire.EventsMessage:
    """An EVENTS message of ``frames`` (each at position frame // frames_per_position; events
    ``lists``, default frame_events), encoded and decoded as on the wire."""
    frames = list(frames)
    lists = [frame_events(f) for f in frames] if lists is None else lists
    offsets = np.zeros(len(frames) + 1, np.int64)
    np.cumsum([len(e) for e in lists], out=offsets[1:])
    present = np.full(len(frames), ALL, np.uint8) if present is None else np.asarray(present, np.uint8)
    parts = wire.encode_events(spec.number, node, np.array(frames, np.uint32),
                               np.array(frames, np.int64) // spec.frames_per_position, present, offsets,
                               np.concatenate(lists) if lists else np.empty(0, np.uint32),
                               block=block, stream=stream, ledger=ledger)
    return wire.decode_events([bytes(memoryview(np.ascontiguousarray(p))) for p in parts], N_PIXELS)


def partials(spec, analyses=ANALYSES) -> list:
    """An ANALYSIS message's partials (empty ones: what commits events is their arrival)."""
    return ScanAnalyses(analyses, spec.shape).take_partials()


def done(spec, node: int = 0, stream: int = 0, lost=None, ledger: dict | None = None) -> wire.DoneMessage:
    parts = wire.encode_done(spec.number, node, ledger or sector_tally(), lost or [0] * N_MODULES, stream=stream)
    return wire.decode_done(parts)


class Host:
    """Stands in for the writer: control's latest spec, heartbeats and rejections, recorded."""

    def __init__(self, latest=None, on_heartbeat=None):
        self.latest = latest
        self.heartbeats = 0
        self.rejected: list[tuple[str, str]] = []
        self.on_heartbeat = on_heartbeat

    def heartbeat(self) -> None:
        self.heartbeats += 1
        if self.on_heartbeat is not None:
            self.latest = self.on_heartbeat()

    def hooks(self) -> ScanHooks:
        return ScanHooks(latest_spec=lambda: self.latest, heartbeat=self.heartbeat, node_heard=lambda node: True,
                         reject=lambda reason, detail: self.rejected.append((reason, detail)),
                         check_space=lambda: None)


def open_scan(tmp_path, spec, host: Host | None = None) -> tuple[WriterScan, Host]:
    host = host or Host(latest=spec)
    return WriterScan(spec, tmp_path, ANALYSES, FlowSettings(), host.hooks()), host


def slot_frames(path) -> list[list[int]]:
    """Which frame each slot holds (from frame_events), per position; -1 for an empty slot."""
    scan = read_counted(path)
    return [[int(f[0]) if len(f) else -1 for f in row] for row in scan.frames]


def test_frames_arriving_out_of_order_each_get_their_slot(tmp_path):
    spec = make_spec(shape=(2, 3), frames_per_position=2, nodes=[0, 1])
    scan, host = open_scan(tmp_path, spec)
    # Position 2 (frames 4 and 5) is split between node groups and its higher frame comes first;
    # blocks arrive in reverse order.
    scan.receive_events(events(spec, [9, 8, 11, 10], node=1, block=2))
    scan.receive_events(events(spec, [5, 7, 6], node=1, block=1))
    scan.receive_events(events(spec, [3, 0, 2, 1, 4], node=0, block=0))
    assert scan.frames_written == 0  # held until their stream's ANALYSIS message commits them
    assert scan.receive_partials(1, 0, partials(spec))
    assert scan.frames_written == 6  # positions 3, 4 and 5; position 2 waits for its frame 4
    assert scan.receive_partials(0, 0, partials(spec))
    assert scan.frames_written == 12
    assert scan.receive_done(done(spec, 0)) and scan.receive_done(done(spec, 1))
    assert scan.should_close()
    summary = scan.close()
    # slot j of position p holds frame p * 2 + j, whatever order they came in
    assert slot_frames(summary["path"]) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert sorted(scan.committed) == [0, 1, 2]


def test_a_block_committed_twice_is_written_once_and_counted_as_duplicate(tmp_path):
    spec = make_spec(shape=(2, 2))
    scan, host = open_scan(tmp_path, spec)
    scan.receive_events(events(spec, [0, 1], block=0))
    scan.receive_partials(0, 0, partials(spec))
    scan.receive_events(events(spec, [0, 1], block=0))  # the same block again (resent)
    scan.receive_events(events(spec, [2, 3], block=1))
    scan.receive_partials(0, 0, partials(spec))
    assert scan.duplicate_blocks == 1
    assert scan.frames_written == 4 and scan.ledger.frames_complete == 4 and scan.ledger.frames_over_capacity == 0
    assert scan.commit_report()["ranges"] == [[0, 2]]
    scan.receive_done(done(spec))
    ledger = read_counted(scan.close()["path"]).metadata["stemstream"]["ledger"]
    assert ledger["frames_complete"] == 4 and ledger["frames_over_capacity"] == 0


def test_a_new_routing_generation_fences_what_older_streams_left_uncommitted(tmp_path):
    spec = make_spec(shape=(2, 2), nodes=[0, 1], block_frames=2)
    host = Host(latest=spec)
    scan, _ = open_scan(tmp_path, spec, host)
    scan.receive_events(events(spec, [0, 1], node=0, block=0))
    scan.receive_partials(0, 0, partials(spec))  # block 0 committed in generation 0
    scan.receive_events(events(spec, [2, 3], node=1, block=1))  # block 1 never committed: node 1 dies
    newer = copy.deepcopy(spec)
    newer.new_generation([1], "node group 1 silent", at=0.0, committed_blocks=1)
    scan.follow(newer)
    assert scan.frames_superseded == 2 and not scan.pending
    report = scan.commit_report()
    assert report["fenced"] == 1 and report["done"] == []
    # what the old stream sends now is dropped, its commit too: block 1 stays uncommitted
    assert not scan.receive_events(events(spec, [2, 3], node=1, block=1, stream=0))
    assert not scan.receive_partials(1, 0, partials(spec))
    assert not scan.receive_done(done(spec, node=1, stream=0))
    assert list(scan.committed) == [0] and scan.frames_written == 2
    # the producers resend block 1 in generation 1, to node group 0
    assert scan.receive_events(events(spec, [2, 3], node=0, block=1, stream=1))
    assert scan.receive_done(done(spec, node=0, stream=1))
    assert scan.should_close()  # node group 0 is all generation 1 has
    summary = scan.close()
    assert slot_frames(summary["path"]) == [[0], [1], [2], [3]]
    ledger = read_counted(summary["path"]).metadata["stemstream"]["ledger"]
    assert ledger["frames_complete"] == 4 and ledger["frames_superseded"] == 2 and ledger["duplicate_blocks"] == 0
    assert list(ledger["node_groups_missing"]) == []
    assert list(ledger["failovers"]["1"]["dead"]) == [1] and ledger["failovers"]["1"]["reason"] == "node group 1 silent"


def test_the_closed_file_reads_back_with_its_frames_and_ledger(tmp_path):
    spec = make_spec(shape=(2, 2), nodes=[0, 1])
    scan, host = open_scan(tmp_path, spec)
    tally = sector_tally()
    tally["sectors_received"] = [3] * N_MODULES
    tally["sectors_missing"] = [0, 1, 0, 0]
    tally["frames_spilled"] = 1
    # frame 1 lacks module 1; position 3 never arrives (it was spilled)
    scan.receive_events(events(spec, [0, 1, 2], block=0, present=[ALL, ALL & ~0b10, ALL], ledger=tally))
    scan.receive_events(events(spec, [7], block=1))  # a position outside the 2x2 scan
    scan.receive_done(done(spec, node=0, lost=[0, 0, 2, 0]))  # DONE commits the stream's events
    assert host.rejected == [("position_out_of_bounds", "1 frame(s)")]
    assert not scan.should_close()  # node group 1 has not sent DONE (and control knows it)
    summary = scan.close()  # closed early (timeout): node group 1 is missing
    counted = read_counted(summary["path"])
    assert counted.scan_shape == (2, 2)
    assert slot_frames(summary["path"]) == [[0], [1], [2], [-1]]
    assert np.array_equal(counted.frames[1, 0], frame_events(1))
    assert counted.written.reshape(-1).tolist() == [True, True, True, False]
    ledger = counted.metadata["stemstream"]["ledger"]
    assert (ledger["frames_complete"], ledger["frames_incomplete"], ledger["frames_missing"]) == (2, 1, 1)
    assert list(ledger["sectors_received"]) == [3] * N_MODULES and list(ledger["sectors_missing"]) == [0, 1, 0, 0]
    assert ledger["frames_spilled"] == 1 and list(ledger["sectors_lost"]) == [0, 0, 2, 0]
    assert list(ledger["node_groups_missing"]) == [1]
    assert summary["ledger"]["frames_complete"] == 2 and summary["events"] == 3 * 3  # the file's events only
    assert not (tmp_path / (spec.file_name + ".journal")).exists()  # the file holds it all now
    # a frame is missing: the name says so, and nothing is at the whole scan's name
    assert summary["path"] == str(tmp_path / spec.file_name.replace(".h5", ".incomplete.h5"))
    assert not (tmp_path / spec.file_name).exists()


def test_at_close_the_events_of_a_stream_whose_done_never_came_are_written(tmp_path):
    spec = make_spec(shape=(1, 3), frames_per_position=2, nodes=[0, 1])
    scan, _ = open_scan(tmp_path, spec)
    scan.receive_events(events(spec, [0, 1, 2, 3], node=0, block=0))
    scan.receive_done(done(spec, node=0))
    scan.receive_events(events(spec, [5], node=1, block=1))  # then node group 1 went silent; frame 4 never came
    assert scan.frames_written == 4
    summary = scan.close()
    # position 2 got one of its two frames: it is written all the same, in the first slot
    assert slot_frames(summary["path"]) == [[0, 1], [2, 3], [5, -1]]
    assert summary["ledger"]["frames_complete"] == 5 and list(summary["ledger"]["node_groups_missing"]) == [1]


@pytest.mark.parametrize("where", ["in the opening spec", "brought by a heartbeat at close"])
def test_thresholds_from_the_spec_are_in_the_files_electron_counting_metadata(tmp_path, where):
    thresholds = Thresholds(background=31.5, xray=950.0, calculated=True, number_of_samples=1200, mean=3.25)
    calibrated = copy.deepcopy(make_spec(shape=(1, 2)))
    calibrated.thresholds = thresholds
    if where == "in the opening spec":
        spec, host = calibrated, Host(latest=calibrated)
    else:  # control calibrated after the scan opened and no heartbeat reply has said so yet
        spec, host = make_spec(shape=(1, 2)), Host(latest=None, on_heartbeat=lambda: calibrated)
    scan, _ = open_scan(tmp_path, spec, host)
    scan.receive_events(events(spec, [0, 1]))
    scan.receive_done(done(spec))
    summary = scan.close()
    attrs = read_counted(summary["path"]).metadata["electron_counting"]
    assert attrs["background_threshold"] == 31.5 and attrs["x_ray_threshold"] == 950.0
    assert attrs["number_of_samples"] == 1200 and attrs["mean"] == 3.25 and bool(attrs["threshold_calculated"])
    assert summary["thresholds"]["background"] == 31.5
    assert host.heartbeats == (0 if where == "in the opening spec" else 1)


def test_a_scan_without_thresholds_heartbeats_once_and_writes_none(tmp_path):
    spec = make_spec(shape=(1, 1))
    host = Host(latest=None)
    scan, _ = open_scan(tmp_path, spec, host)
    scan.receive_done(done(spec))
    summary = scan.close()
    assert host.heartbeats == 1 and summary["thresholds"] is None
    assert "electron_counting" not in read_counted(summary["path"]).metadata


def test_scans_of_more_than_65536_positions_get_every_slot(tmp_path):
    """Slot numbers pass the uint16 range (position x frames per position + rank) once a scan
    has more positions than that: the paper's 512 x 512 and 1024 x 1024 scans. Frames near the
    end of a 300 x 256 scan, and one frame too many for its position, counted not written."""
    spec = make_spec(shape=(300, 256), frames_per_position=1)
    scan, host = open_scan(tmp_path, spec)
    last = [65535, 65536, 65568, 76799]
    scan.receive_events(events(spec, last + [65568], block=0))
    assert scan.receive_partials(0, 0, partials(spec))
    assert scan.frames_written == 4 and scan.ledger.frames_over_capacity == 1
    assert scan.receive_done(done(spec, 0))
    summary = scan.close()
    slots = slot_frames(summary["path"])
    assert [slots[p][0] for p in last] == last
    assert sum(row[0] >= 0 for row in slots) == 4


# -- files already in the output directory: never replaced, except by the scan's own resume ----------


def analysis_arrays(path) -> dict[str, np.ndarray]:
    """Every /analysis dataset of a counted file."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f["analysis"].visititems(lambda name, item: out.__setitem__(name, item[()]) if hasattr(item, "shape") else None)
    return out


def stream(scan, spec, frames, block: int = 0) -> dict:
    """One node group sends ``frames`` as one block, with the analyses' partials a node group
    computes from them, and DONE; the scan closes."""
    msg = events(spec, frames, block=block)
    computed = ScanAnalyses(ANALYSES, spec.shape)
    computed.accumulate(msg.positions, msg.events, msg.offsets)
    scan.receive_events(msg)
    assert scan.receive_partials(0, 0, computed.take_partials())
    assert scan.receive_done(done(spec, 0))
    return scan.close()


def test_a_file_already_at_the_scans_name_is_never_replaced(tmp_path):
    spec = make_spec(shape=(2, 2))
    other = tmp_path / spec.file_name
    other.write_bytes(b"another scan's file")
    with pytest.raises(FileExistsError, match="already exists"):
        open_scan(tmp_path, spec)
    assert other.read_bytes() == b"another scan's file"
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.journal"))


def test_a_replay_completes_an_incomplete_file_and_a_second_replay_changes_nothing(tmp_path):
    """The replay of a spill resumes the incomplete file: the frames it brings again (already
    in the file) are counted once, the analyses cover every frame (not only the replayed ones),
    and replaying the same records once more leaves ledger, events and analyses as they were."""
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    spec = make_spec(shape=(2, 2))
    whole = stream(open_scan(clean_dir, spec)[0], spec, [0, 1, 2, 3])

    first = stream(open_scan(tmp_path, spec)[0], spec, [0, 1])
    assert first["path"].endswith(".incomplete.h5") and first["ledger"]["frames_missing"] == 2
    for epoch, duplicates in ((2, 1), (3, 3)):
        again = make_spec(shape=(2, 2), epoch=epoch, resume=True)
        summary = stream(open_scan(tmp_path, again)[0], again, [1, 2, 3])
        assert summary["path"] == str(tmp_path / spec.file_name)
        ledger = read_counted(summary["path"]).metadata["stemstream"]["ledger"]
        assert (ledger["frames_complete"], ledger["frames_missing"], ledger["frames_over_capacity"]) == (4, 0, 0)
        assert ledger["frames_replayed_again"] == duplicates
        assert summary["events"] == whole["events"] == 4 * 3
        assert slot_frames(summary["path"]) == [[0], [1], [2], [3]]
        expected, got = analysis_arrays(whole["path"]), analysis_arrays(summary["path"])
        assert expected.keys() == got.keys() and expected
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert not (tmp_path / first["path"]).exists()  # the incomplete file became the whole one


def test_a_resume_naming_the_incomplete_file_completes_it_under_the_whole_name(tmp_path):
    """A resume started with the incomplete file's own name (what a user sees in the directory)
    means the same scan: the file becomes NAME.h5, never NAME.incomplete.incomplete.h5."""
    spec = make_spec(shape=(2, 2))
    first = stream(open_scan(tmp_path, spec)[0], spec, [0, 1])
    again = make_spec(shape=(2, 2), epoch=2, resume=True, file_name=Path(first["path"]).name)
    summary = stream(open_scan(tmp_path, again)[0], again, [2, 3])
    assert summary["path"] == str(tmp_path / spec.file_name)
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == [spec.file_name]
    assert read_counted(summary["path"]).metadata["stemstream"]["ledger"]["frames_complete"] == 4


def test_a_restarted_writer_reports_the_file_its_predecessor_finished_instead_of_replacing_it(tmp_path):
    """Finding: a writer killed just after renaming the finished file into place, then
    restarted, opened the same path again and replaced the scan with an empty file."""
    from pipeline_support import test_config
    from stemstream.pipeline.writer.role import Writer

    spec = make_spec(shape=(2, 2))
    config = test_config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    summary = stream(open_scan(out, spec)[0], spec, [0, 1, 2, 3])
    before = (tmp_path / summary["path"]).read_bytes()
    writer = Writer(config)
    try:
        writer.control.request = lambda *args, **kwargs: (_ for _ in ()).throw(TimeoutError("control away"))
        assert writer._open(spec) is None
        assert writer.is_finished(spec) and writer.unreported[spec.number]["summary"]["path"] == summary["path"]
        assert writer.unreported[spec.number]["summary"]["ledger"]["frames_complete"] == 4
        pack_control(writer.unreported[spec.number])  # what goes to control must travel
        # another run of the same scan number (a new epoch) is refused, the file kept
        other = make_spec(shape=(2, 2), epoch=2)
        assert writer._open(other) is None and writer._failed(other.number)
    finally:
        writer.events_in.close(0)
        writer.live.close()
    assert (tmp_path / summary["path"]).read_bytes() == before


def computed_partials(spec, *messages) -> list:
    """The partials a node group sends after counting ``messages``' frames."""
    computed = ScanAnalyses(ANALYSES, spec.shape)
    for msg in messages:
        computed.accumulate(msg.positions, msg.events, msg.offsets)
    return computed.take_partials()


def test_partials_of_a_block_already_committed_are_not_merged_again(tmp_path):
    """Finding (chaos seed 1014): after a failover the producers resent a block the writer had
    already committed from the old generation (their commits lag); the new stream counted it again
    (here with a module missing: the restarted producer's part alone) and its partials were merged
    with the fresh block's. Events right, analyses up to 1.5x: partials are merged only when they
    cover exactly the frames the commit writes; otherwise those frames' analyses are computed here."""
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    spec = make_spec(shape=(2, 2), nodes=[0, 1], block_frames=2)
    whole = stream(open_scan(clean_dir, spec)[0], spec, [0, 1, 2, 3])

    scan, _ = open_scan(tmp_path, spec)
    first = events(spec, [0, 1], node=0, block=0)
    scan.receive_events(first)
    assert scan.receive_partials(0, 0, computed_partials(spec, first))  # block 0 committed, generation 0
    newer = copy.deepcopy(spec)
    newer.new_generation([1], "node group 0 restarted", at=0.0, committed_blocks=1)
    scan.follow(newer)
    again = events(spec, [0, 1], node=0, block=0, stream=1, present=[ALL & ~0b10] * 2)
    fresh = events(spec, [2, 3], node=0, block=1, stream=1)
    scan.receive_events(again)
    scan.receive_events(fresh)
    assert scan.receive_partials(0, 1, computed_partials(spec, again, fresh))
    assert scan.duplicate_blocks == 1
    assert scan.receive_done(done(spec, node=0, stream=1))
    summary = scan.close()
    assert slot_frames(summary["path"]) == [[0], [1], [2], [3]]
    expected, got = analysis_arrays(whole["path"]), analysis_arrays(summary["path"])
    assert expected.keys() == got.keys() and expected
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_a_writer_holds_the_events_of_a_scan_it_has_not_heard_of_while_control_is_away(tmp_path):
    """Finding (chaos): control killed 0.1 s after a scan started, before the writer's heartbeat
    brought the spec: the node groups' events were rejected as unknown_scan. They are held until
    control answers, then written."""
    from pipeline_support import test_config
    from stemstream.pipeline.writer.role import Writer
    from stemstream.transport.control_client import ControlUnavailable

    spec = make_spec(shape=(2, 2))
    up = []

    def control(op, timeout_s=None, **fields):
        if not up:
            raise ControlUnavailable("control is away")
        return {"ok": True, "instance": "control-1", "scans": [spec.to_wire()], "acks": {}, "ages": {}}

    writer = Writer(test_config(tmp_path))
    try:
        writer.control.request = control
        msg = [bytes(memoryview(p)) for p in wire.encode_events(
            spec.number, 0, np.arange(4, dtype=np.uint32), np.arange(4, dtype=np.int64), np.full(4, ALL, np.uint8),
            np.arange(0, 13, 3, dtype=np.int64), np.concatenate([frame_events(f) for f in range(4)]), block=0)]
        for parts in (msg, wire.encode_analysis(spec.number, 0, partials(spec)), wire.encode_done(
                spec.number, 0, sector_tally(), [0] * N_MODULES)):
            writer.handle(parts)
        assert not writer.rejected and not writer.scans and len(writer.held) == 3
        up.append(True)
        writer.tick(force=True)
        writer.release_held(writer.handle)
        assert not writer.rejected and not writer.held
        scan = writer.scans[spec.number]
        assert scan.frames_written == 4 and scan.should_close()
    finally:
        writer.events_in.close(0)
        writer.live.close()


def test_a_replay_completes_frames_the_file_holds_incomplete(tmp_path):
    """Finding (chaos, a producer stopped longer than silent_after_s): its blocks were counted
    without it, then a replay of the spill (every module's sectors of those frames) added nothing,
    because the file already held a frame at each position. The file's ledger names its
    incomplete frames; a replay puts a whole frame in place of an incomplete one (never an
    incomplete one in place of another), and analyses and ledger follow."""
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    spec = make_spec(shape=(2, 2))
    whole = stream(open_scan(clean_dir, spec)[0], spec, [0, 1, 2, 3])

    scan, _ = open_scan(tmp_path, spec)
    partly = [frame_events(f)[:2] for f in (2, 3)]  # what counting without module 1 found
    first = events(spec, [0, 1, 2, 3], block=0, present=[ALL, ALL, ALL & ~0b10, ALL & ~0b10],
                   lists=[frame_events(0), frame_events(1), *partly])
    scan.receive_events(first)
    scan.receive_done(done(spec))
    summary = scan.close()
    assert summary["path"] == str(tmp_path / spec.file_name)  # no frame missing: the whole name
    assert (summary["ledger"]["frames_complete"], summary["ledger"]["frames_incomplete"]) == (2, 2)

    again = make_spec(shape=(2, 2), epoch=2, resume=True)
    resumed, _ = open_scan(tmp_path, again)
    replay = events(again, [1, 2, 3], block=0, present=[ALL, ALL, ALL & ~0b1])  # frame 3 still lacks a module
    resumed.receive_events(replay)
    resumed.receive_done(done(again))
    summary = resumed.close()
    ledger = read_counted(summary["path"]).metadata["stemstream"]["ledger"]
    assert (ledger["frames_complete"], ledger["frames_incomplete"], ledger["frames_missing"]) == (3, 1, 0)
    assert ledger["incomplete"].reshape(-1).tolist() == [0, 0, 0, 1]
    assert ledger["frames_replayed_again"] == 2  # frame 1 (whole already) and frame 3 (not whole)
    frames = read_counted(summary["path"]).frames.reshape(-1)
    np.testing.assert_array_equal(frames[2], frame_events(2))  # completed
    np.testing.assert_array_equal(frames[3], partly[1])  # kept as it was
    expected = ScanAnalyses(ANALYSES, spec.shape)
    offsets = np.zeros(5, np.int64)
    np.cumsum([len(f) for f in frames], out=offsets[1:])
    expected.accumulate(np.arange(4), np.concatenate(frames).astype(np.uint32), offsets)
    got = analysis_arrays(summary["path"])
    for name, arrays in expected.finish().items():
        for key, value in arrays.items():
            np.testing.assert_allclose(got[f"{name}/{key}"], value, rtol=1e-12, err_msg=f"{name}/{key}")
    assert whole["events"] == 12


def test_a_restarted_writer_reports_a_finished_file_whose_ledger_records_a_failover(tmp_path):
    """Finding (chaos seed 481: a node group failed over, then the writer killed the moment the
    file appeared): the ledger's ``failovers`` map read back from the file held numpy arrays, the
    report to control could not be packed, and the scan hung. Every value travels as plain data."""
    from pipeline_support import test_config
    from stemstream.pipeline.writer.role import Writer

    spec = make_spec(shape=(2, 2), nodes=[0, 1])
    spec.new_generation([1], "node group 1 silent", at=0.0, committed_blocks=0)
    out = tmp_path / "out"
    out.mkdir()
    scan, _ = open_scan(out, spec)
    scan.receive_events(events(spec, [0, 1, 2, 3], block=0, stream=1))
    scan.receive_partials(0, 1, computed_partials(spec, events(spec, [0, 1, 2, 3])))
    scan.receive_done(done(spec, node=0, stream=1))
    assert scan.close()["ledger"]["failovers"]
    writer = Writer(test_config(tmp_path))
    try:
        writer.control.request = lambda *args, **kwargs: (_ for _ in ()).throw(TimeoutError("control away"))
        assert writer._open(spec) is None
        report = writer.unreported[spec.number]
        assert list(report["summary"]["ledger"]["failovers"]["1"]["dead"]) == [1]
        pack_control(report)  # what goes to control must travel
    finally:
        writer.events_in.close(0)
        writer.live.close()


def test_a_new_generations_stream_that_arrives_before_the_writer_follows_it_is_kept(tmp_path):
    """Finding (chaos: a node group failed over twice in one scan): the survivor's stream of the
    newest generation, DONE included, reached the writer before the heartbeat that told it of
    that generation; following it then dropped that DONE (and would drop its pending events), and
    the scan waited scan_timeout_s for a DONE that had come."""
    spec = make_spec(shape=(2, 2), nodes=[0, 1], block_frames=2)
    scan, _ = open_scan(tmp_path, spec)
    newer = copy.deepcopy(spec)
    newer.new_generation([1], "node group 1 silent", at=0.0, committed_blocks=0)
    first = events(spec, [0, 1], node=0, block=0, stream=1)
    scan.receive_events(first)
    assert scan.receive_partials(0, 1, computed_partials(spec, first))
    scan.receive_events(events(spec, [2, 3], node=0, block=1, stream=1))  # not committed yet
    assert scan.receive_done(done(spec, node=0, stream=1)) and scan.frames_written == 4
    scan.receive_events(events(spec, [2, 3], node=1, block=1, stream=0))  # the old stream's: fenced below
    scan.follow(newer)
    assert scan.should_close() and scan.frames_superseded == 2
    summary = scan.close()
    assert slot_frames(summary["path"]) == [[0], [1], [2], [3]]
    assert list(summary["ledger"]["node_groups_missing"]) == []


def test_the_ledger_lists_per_module_the_blocks_whose_frames_lack_its_sectors(tmp_path):
    """What a producer started again after its node groups counted its blocks without it needs
    (issue 12: the closed scan's ledger says which of its blocks the file lacks; control tells
    the new process, which spills them for a replay), and what frames_spilled counts."""
    spec = make_spec(shape=(4, 4), block_frames=4)
    scan, _ = open_scan(tmp_path, spec)
    for block, missing_module in ((0, None), (1, 1), (2, 3), (3, 1)):
        tally = sector_tally()
        present = [ALL] * 4
        if missing_module is not None:
            tally["sectors_missing"][missing_module] = 4
            tally["frames_spilled"] = 4
            present = [ALL & ~(1 << missing_module)] * 4
        scan.receive_events(events(spec, range(4 * block, 4 * block + 4), block=block, present=present, ledger=tally))
    scan.receive_partials(0, 0, partials(spec))
    scan.receive_done(done(spec))
    summary = scan.close()
    assert summary["ledger"]["blocks_lacking"] == {"1": [1, 3], "3": [2]}
    assert summary["ledger"]["frames_spilled"] == 12
    pack_control(summary)
    on_file = read_counted(summary["path"]).metadata["stemstream"]["ledger"]
    assert {k: list(v) for k, v in on_file["blocks_lacking"].items()} == {"1": [1, 3], "3": [2]}
    told = summary_for_control(1, summary)  # what control hears: ranges
    assert told["ledger"]["blocks_lacking"] == {"1": [[1, 2], [3, 4]], "3": [[2, 3]]}


def test_the_blocks_lacking_a_module_reach_control_as_ranges_within_its_message_limit(caplog):
    """A producer dead for most of a 1024 x 1024 scan leaves 30,000 blocks lacking its module:
    as a list that is ~90 kB, beyond control's 64 KiB messages, and the writer's report of the
    scan's end would be refused for ever. As ranges it is one; scattered past MAX_LACKING_RANGES
    they are left out (the file names them), and the report still fits."""
    ledger = {"frames_expected": 1 << 20, "blocks_lacking": {"2": list(range(2000, 32768))}}
    assert len(pack_control({"summary": {"ledger": ledger}})) > MAX_ENVELOPE_BYTES  # as a list
    told = summary_for_control(7, {"ledger": ledger, "path": "x.h5"})
    assert told["ledger"]["blocks_lacking"] == {"2": [[2000, 32768]]} and told["path"] == "x.h5"
    scattered = {"ledger": {"blocks_lacking": {"0": list(range(0, 60000, 2)), "1": [5]}}}
    told = summary_for_control(7, scattered)
    assert "blocks_lacking" not in told["ledger"] and "too scattered" in caplog.text
    assert len(pack_control({"op": "scan_done", "scan": 7, "ok": True, "summary": told})) < MAX_ENVELOPE_BYTES
    assert len(pack_control({"summary": scattered})) > MAX_ENVELOPE_BYTES  # what the report was


def test_with_several_frames_per_position_the_ledger_names_incomplete_frames_and_a_replay_completes_them(tmp_path):
    """Issue 12: with frames_per_position > 1 the file did not name its incomplete frames, so a
    replay of the spill (every module's sectors of them) could not complete them. The ledger
    flags each slot and lists the flagged frames' numbers; a replay puts a whole frame in its
    slot (never an incomplete one in the place of another), and analyses and ledger follow."""
    spec = make_spec(shape=(2, 2), frames_per_position=2)  # frame f at position f // 2, slot f
    scan, _ = open_scan(tmp_path, spec)
    partly = {f: frame_events(f)[:2] for f in (5, 6)}  # what counting without module 1 found
    present = [ALL & ~0b10 if f in partly else ALL for f in range(8)]
    lists = [partly.get(f, frame_events(f)) for f in range(8)]
    scan.receive_events(events(spec, [4, 5, 6, 7, 0, 1, 2, 3], block=0, present=present[4:] + present[:4],
                               lists=lists[4:] + lists[:4]))
    scan.receive_done(done(spec))
    summary = scan.close()
    ledger = read_counted(summary["path"]).metadata["stemstream"]["ledger"]
    assert (ledger["frames_complete"], ledger["frames_incomplete"]) == (6, 2)
    assert ledger["incomplete"].tolist() == [[0, 0], [0, 0], [0, 1], [1, 0]]
    assert ledger["incomplete_frames"].tolist() == [5, 6]
    assert "incomplete_frames" not in summary["ledger"]

    again = make_spec(shape=(2, 2), frames_per_position=2, epoch=2, resume=True)
    resumed, _ = open_scan(tmp_path, again)
    resumed.receive_events(events(again, [4, 5, 6], block=0, present=[ALL, ALL, ALL & ~0b1]))  # 6: still not whole
    resumed.receive_done(done(again))
    summary = resumed.close()
    ledger = read_counted(summary["path"]).metadata["stemstream"]["ledger"]
    assert (ledger["frames_complete"], ledger["frames_incomplete"], ledger["frames_missing"]) == (7, 1, 0)
    assert ledger["incomplete"].tolist() == [[0, 0], [0, 0], [0, 0], [1, 0]]
    assert ledger["incomplete_frames"].tolist() == [6]
    assert ledger["frames_replayed_again"] == 2  # frame 4 (whole already) and frame 6 (not whole)
    assert slot_frames(summary["path"]) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    frames = read_counted(summary["path"]).frames.reshape(-1)
    np.testing.assert_array_equal(frames[5], frame_events(5))  # completed in its slot
    np.testing.assert_array_equal(frames[6], partly[6])  # kept as it was
    expected = ScanAnalyses(ANALYSES, spec.shape)
    offsets = np.zeros(9, np.int64)
    np.cumsum([len(f) for f in frames], out=offsets[1:])
    expected.accumulate(np.arange(8) // 2, np.concatenate(frames).astype(np.uint32), offsets)
    got = analysis_arrays(summary["path"])
    for name, arrays in expected.finish().items():
        for key, value in arrays.items():
            np.testing.assert_allclose(got[f"{name}/{key}"], value, rtol=1e-12, err_msg=f"{name}/{key}")


# -- sub-pixel positions (the cluster method's) ------------------------------------------------------


def frame_points(frame: int) -> np.ndarray:
    """Sub-pixel positions of frame_events(frame) that name their frame too: a quarter pixel off
    each event's centre, shifted by frame / 1000."""
    pixels = frame_events(frame).astype(np.int64)
    return np.stack([pixels // FRAME_SHAPE[1] + 0.25, pixels % FRAME_SHAPE[1] - frame / 1000], axis=1).astype(np.float32)


def clustered(spec, frames, block: int, node: int = 0) -> wire.EventsMessage:
    """An EVENTS message of ``frames`` with their sub-pixel positions, encoded and decoded."""
    msg = events(spec, frames, node=node, block=block)
    points = np.concatenate([frame_points(f) for f in frames])
    parts = wire.encode_events(msg.scan, node, msg.frame_numbers, msg.positions, msg.present, msg.offsets,
                               msg.events, block=block, subpixel=points)
    return wire.decode_events([bytes(memoryview(np.ascontiguousarray(p))) for p in parts], N_PIXELS)


def open_clusters_scan(directory, spec) -> WriterScan:
    return WriterScan(spec, directory, ANALYSES, FlowSettings(), Host(latest=spec).hooks(), subpixel_positions=True)


def slot_points(path) -> list[np.ndarray]:
    import h5py

    from stemstream.formats.sparse_h5.layout import SUBPIXEL_POSITIONS

    with h5py.File(path, "r") as f:
        return [np.asarray(p).reshape(-1, 2) for p in f[SUBPIXEL_POSITIONS][()]]


def test_a_restarted_writer_rewrites_the_sub_pixel_positions_its_journal_kept(tmp_path):
    """A clusters scan whose writer died after committing a block: the next writer rewrites that
    block's events with their sub-pixel positions from the journal (frames held for their
    position's second frame too), and the file has every frame's own positions."""
    spec = make_spec(shape=(2, 2), frames_per_position=2)
    first = open_clusters_scan(tmp_path, spec)
    first.receive_events(clustered(spec, [0, 1, 2], block=0))  # frame 2 waits for frame 3 (position 1)
    assert first.receive_partials(0, 0, partials(spec))
    first.commit_report()  # the journal is on disk before control hears of the commit
    first.out.abort()  # the writer dies: its HDF5 file is lost, the journal stays
    first.journal.close(delete=False)

    second = open_clusters_scan(tmp_path, spec)
    assert second.recovered and list(second.committed) == [0]
    second.receive_events(clustered(spec, [3, 4, 5, 6, 7], block=1))
    assert second.receive_done(done(spec))
    summary = second.close()
    assert slot_frames(summary["path"]) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    points = slot_points(summary["path"])
    for frame in range(8):
        np.testing.assert_array_equal(points[frame], frame_points(frame), err_msg=f"frame {frame}")
    assert read_counted(summary["path"]).metadata["stemstream"]["ledger"]["frames_at_pixel_centres"] == 0


def test_a_replay_into_a_clusters_file_keeps_the_positions_it_had_and_frames_without_get_pixel_centres(tmp_path):
    spec = make_spec(shape=(2, 2))
    scan = open_clusters_scan(tmp_path, spec)
    scan.receive_events(clustered(spec, [0, 1], block=0))
    scan.receive_done(done(spec))
    assert scan.close()["ledger"]["frames_missing"] == 2
    again = make_spec(shape=(2, 2), epoch=2, resume=True)
    resumed = open_clusters_scan(tmp_path, again)
    resumed.receive_events(clustered(again, [1, 2], block=0))
    resumed.receive_events(events(again, [3], block=1))  # came without positions (counted by maxima)
    resumed.receive_done(done(again))
    summary = resumed.close()
    assert summary["path"] == str(tmp_path / spec.file_name)
    points = slot_points(summary["path"])
    for frame in range(3):
        np.testing.assert_array_equal(points[frame], frame_points(frame), err_msg=f"frame {frame}")
    pixels = frame_events(3).astype(np.int64)
    np.testing.assert_array_equal(points[3], np.stack([pixels // FRAME_SHAPE[1], pixels % FRAME_SHAPE[1]], axis=1))
    assert summary["ledger"]["frames_at_pixel_centres"] == 1


def test_a_writer_counts_an_events_message_with_malformed_positions_as_rejected(tmp_path):
    from pipeline_support import test_config
    from stemstream.pipeline.writer.role import Writer

    spec = make_spec(shape=(2, 2))
    msg = clustered(spec, [0], block=0)
    parts = wire.encode_events(spec.number, 0, msg.frame_numbers, msg.positions, msg.present, msg.offsets,
                               msg.events, block=0, subpixel=np.full((len(msg.events), 2), np.nan, np.float32))
    writer = Writer(test_config(tmp_path))
    try:
        writer.handle([bytes(memoryview(np.ascontiguousarray(p))) for p in parts])
        writer.handle([bytes(memoryview(np.ascontiguousarray(p))) for p in parts[:-1] + [parts[-1][:-1]]])
        assert writer.rejected == {"bad_subpixel": 2} and not writer.scans and not writer.held
    finally:
        writer.events_in.close(0)
        writer.live.close()


def test_a_clusters_block_of_frames_without_any_electron_is_journaled_and_written(tmp_path):
    """Dark frames (the beam blanked) counted by the cluster method: their message has an empty
    sub-pixel part, (0, 2) once decoded, which the journal could not turn into bytes, and the
    writer died at the commit (found by tests/unit/test_writer_fuzz.py)."""
    spec = make_spec(shape=(1, 2))
    empty = events(spec, [0, 1], block=0, lists=[np.empty(0, np.uint32)] * 2)
    parts = wire.encode_events(spec.number, 0, empty.frame_numbers, empty.positions, empty.present, empty.offsets,
                               empty.events, block=0, subpixel=np.empty((0, 2), np.float32))
    msg = wire.decode_events([bytes(memoryview(np.ascontiguousarray(p))) for p in parts], N_PIXELS)
    assert msg.subpixel is not None and msg.subpixel.shape == (0, 2)
    scan = open_clusters_scan(tmp_path, spec)
    assert scan.receive_events(msg) and scan.receive_partials(0, 0, partials(spec))
    scan.commit_report()  # journaled and synced
    scan.out.abort()  # the writer dies; the next one rebuilds the block from the journal
    scan.journal.close(delete=False)
    again = open_clusters_scan(tmp_path, spec)
    assert again.recovered and list(again.committed) == [0]
    summary = again.close()
    assert summary["ledger"]["frames_complete"] == 2 and summary["events"] == 0
    assert read_counted(summary["path"]).written.reshape(-1).tolist() == [True, True]
