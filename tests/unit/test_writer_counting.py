"""The file names what counted each of its frames (pipeline.writer.counting): the method, and
every single-electron model of the cluster method that counted frames in it, including those of
a node group that died before its DONE, of a node group's later stream, and of a file a
restarted writer rebuilt from its journal. Messages go through the wire format as in the writer."""

from __future__ import annotations

import copy

import numpy as np

from scan_specs import make_spec
from stemstream.core.config import FlowSettings
from stemstream.core.detector import FRAME_SHAPE, N_MODULES
from stemstream.formats import wire
from stemstream.formats.ledger import sector_tally
from stemstream.formats.sparse_h5 import read_counted
from stemstream.pipeline.writer.counting import CountingRecord
from stemstream.pipeline.writer.scan import ScanHooks, WriterScan
from test_writer_logic import ANALYSES, frame_events, partials

N_PIXELS = FRAME_SHAPE[0] * FRAME_SHAPE[1]
MODEL = {"pedestal": 20.0, "single_electron_mean": 120.5, "single_electron_shape": 4.1, "min_charge": 16.0,
         "calibration_clusters": 812}


def model(mean: float) -> dict:
    return {**MODEL, "single_electron_mean": mean}


def clusters(mean: float) -> dict:
    return {"method": "clusters", "model": model(mean)}


def on_the_wire(parts: list) -> list:
    return [bytes(memoryview(np.ascontiguousarray(p))) for p in parts]


def counted(spec, frames, node: int, block: int, stream: int = 0, counting: dict | None = None) -> wire.EventsMessage:
    """An EVENTS message of ``frames`` (one per position), counted as ``counting`` says."""
    lists = [frame_events(f) for f in frames]
    offsets = np.zeros(len(frames) + 1, np.int64)
    np.cumsum([len(e) for e in lists], out=offsets[1:])
    parts = wire.encode_events(spec.number, node, np.array(frames, np.uint32), np.array(frames, np.int64),
                               np.full(len(frames), (1 << N_MODULES) - 1, np.uint8), offsets, np.concatenate(lists),
                               block=block, stream=stream, counting=counting)
    return wire.decode_events(on_the_wire(parts), N_PIXELS)


def done(spec, node: int, stream: int = 0, counting: dict | None = None) -> wire.DoneMessage:
    return wire.decode_done(on_the_wire(wire.encode_done(spec.number, node, sector_tally(), [0] * N_MODULES,
                                                         stream=stream, counting=counting)))


def open_scan(directory, spec, subpixel: bool = False) -> WriterScan:
    hooks = ScanHooks(latest_spec=lambda: spec, heartbeat=lambda: None, node_heard=lambda node: True,
                      reject=lambda reason, detail: None, check_space=lambda: None)
    return WriterScan(spec, directory, ANALYSES, FlowSettings(), hooks, subpixel_positions=subpixel)


def stemstream_metadata(summary: dict) -> dict:
    return read_counted(summary["path"]).metadata["stemstream"]


def test_events_messages_say_how_their_frames_were_counted():
    spec = make_spec()
    assert counted(spec, [0], node=0, block=0, counting=clusters(120.0)).counting == clusters(120.0)
    assert counted(spec, [0], node=0, block=0).counting is None  # (a writer of before 2026-12-05's nodes)


def test_a_failed_over_node_groups_model_and_the_survivors_second_one_are_in_the_file(tmp_path):
    """Node group 1 counts block 1 with its model, the writer commits it, and node group 1 dies
    before its DONE; node group 0 takes block 2 over in the next routing generation, with the
    model it fitted for that stream. The file names all three models and the frames each
    counted; before, only node group 0's last model (from its DONE) was there."""
    spec = make_spec(shape=(2, 3), nodes=[0, 1], block_frames=2)
    scan = open_scan(tmp_path, spec)
    scan.receive_events(counted(spec, [0, 1], node=0, block=0, counting=clusters(120.0)))
    scan.receive_partials(0, 0, partials(spec))
    scan.receive_events(counted(spec, [2, 3], node=1, block=1, counting=clusters(130.0)))
    scan.receive_partials(1, 0, partials(spec))  # committed; then node group 1 dies
    newer = copy.deepcopy(spec)
    newer.new_generation([1], "node group 1 silent", at=0.0, committed_blocks=2)
    scan.follow(newer)
    scan.receive_events(counted(spec, [4, 5], node=0, block=2, stream=1, counting=clusters(125.0)))
    scan.receive_done(done(spec, node=0, stream=1, counting=clusters(125.0)))
    meta = stemstream_metadata(scan.close())
    assert meta["counting_method"] == "clusters"
    assert meta["cluster_model"] == {**model(120.0), "node_group": 0}
    assert meta["cluster_models"] == {"node_0": {**model(120.0), "frames": 2}, "node_1": {**model(130.0), "frames": 2},
                                      "node_0_stream_1": {**model(125.0), "frames": 2}}


def test_a_restarted_writer_keeps_the_models_of_the_frames_its_journal_held(tmp_path):
    """The writer dies after committing both node groups' blocks (its HDF5 file lost, the journal
    kept); the next one rebuilds the file from the journal, and with it what counted them."""
    spec = make_spec(shape=(2, 2), nodes=[0, 1], block_frames=2)
    first = open_scan(tmp_path, spec)
    for node, mean in ((0, 120.0), (1, 130.0)):
        first.receive_events(counted(spec, [2 * node, 2 * node + 1], node=node, block=node, counting=clusters(mean)))
        first.receive_partials(node, 0, partials(spec))
    first.commit_report()
    first.out.abort()
    first.journal.close(delete=False)

    second = open_scan(tmp_path, spec)
    assert second.recovered and sorted(second.committed) == [0, 1]
    meta = stemstream_metadata(second.close())  # (no DONE came: the node groups are gone too)
    assert meta["counting_method"] == "clusters"
    assert meta["cluster_models"] == {"node_0": {**model(120.0), "frames": 2}, "node_1": {**model(130.0), "frames": 2}}


def test_the_method_alone_for_maxima_one_model_without_a_list_and_nothing_when_nothing_was_said():
    maxima = CountingRecord()
    maxima.note(0, 0, {"method": "maxima", "model": None}, frames=5)
    assert maxima.metadata() == {"counting_method": "maxima"}
    one = CountingRecord()
    one.note(0, 0, clusters(120.0), frames=3)
    one.note(0, 0, clusters(120.0), frames=2)  # the stream's next message
    assert one.metadata() == {"counting_method": "clusters", "cluster_model": {**model(120.0), "node_group": 0}}
    silent = CountingRecord()
    silent.note(0, 0, None, frames=3)
    assert silent.metadata() == {}


def test_a_resume_keeps_the_models_of_the_frames_it_carries_over(tmp_path):
    """A scan closed with frames missing (an incomplete file), then replayed as a resume: the
    completed file names the model of the frames it carried over (epoch 1's) and the replay's."""
    spec = make_spec(shape=(2, 2))
    scan = open_scan(tmp_path, spec)
    scan.receive_events(counted(spec, [0, 1], node=0, block=0, counting=clusters(120.0)))
    scan.receive_done(done(spec, node=0, counting=clusters(120.0)))
    assert scan.close()["ledger"]["frames_missing"] == 2
    again = make_spec(shape=(2, 2), epoch=2, resume=True)
    resumed = open_scan(tmp_path, again)
    resumed.receive_events(counted(again, [2, 3], node=0, block=0, counting=clusters(125.0)))
    resumed.receive_done(done(again, node=0, counting=clusters(125.0)))
    meta = stemstream_metadata(resumed.close())
    assert meta["counting_method"] == "clusters"
    assert meta["cluster_model"] == {**model(125.0), "node_group": 0}
    assert meta["cluster_models"] == {"epoch_1_node_0": {**model(120.0), "frames": 2},
                                      "node_0": {**model(125.0), "frames": 2}}


def test_a_resumed_files_odd_counting_metadata_is_left_out_not_fatal():
    record = CountingRecord()
    record.carry({"counting_method": "clusters", "cluster_models": "not a map", "cluster_model": 7, "epoch": 1}, 4)
    record.carry({"cluster_model": {"pedestal": np.array([1.0, 2.0]), "node_group": np.int64(3)}, "epoch": "x"}, 4)
    record.carry({"cluster_models": {"node_0": 1.5, "node_1": {**model(118.0), "frames": 3, "a/b": 1},
                                     "x/y": model(1.0)}, "epoch": 2}, 4)
    record.note(0, 0, clusters(120.0), frames=2)
    assert record.metadata()["cluster_models"] == {"epoch_0_node_3": {"frames": 4},  # (its array left out)
                                                   "epoch_2_node_1": {**model(118.0), "frames": 3},
                                                   "node_0": {**model(120.0), "frames": 2}}


def test_names_the_file_cannot_hold_are_refused_as_bad_envelopes(tmp_path):
    """A rejection reason or a model's name with a '/' (HDF5 has no such attribute) once reached
    the file's metadata and failed its close, killing the writer, and its journal's restarted
    successor too. Now the message is a counted rejection: nothing of it reaches a scan."""
    from pipeline_support import test_config
    from stemstream.pipeline.writer.role import Writer

    spec = make_spec(shape=(1, 2))
    forged_reason = sector_tally()
    forged_reason["rejected_reasons"] = {"a/b": 1}
    good = counted(spec, [0, 1], node=0, block=0, counting=clusters(120.0))
    bad_model = wire.encode_events(spec.number, 0, good.frame_numbers, good.positions, good.present, good.offsets,
                                   good.events, block=0, counting={"method": "clusters", "model": {"a/b": 1.0}})
    bad_ledger = wire.encode_events(spec.number, 0, good.frame_numbers, good.positions, good.present, good.offsets,
                                    good.events, block=0, ledger=forged_reason)
    writer = Writer(test_config(tmp_path))
    try:
        for parts in (bad_model, bad_ledger):
            writer.handle(on_the_wire(parts))
        assert writer.rejected == {"bad_envelope": 2} and not writer.scans
    finally:
        writer.events_in.close(0)
        writer.live.close()
