"""Control's decisions, in process through Control.handle() and Control.tick(): the spec a scan
starts with, calibration across node groups, failover, the writer's commits, and requests it must
refuse without changing anything (one malformed message must neither kill nor stall control).

Time is driven by setting a role's "seen" in control.roles, never by sleeping.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline_support import test_config
from stemstream.core.scan_spec import CalibrationSettings, ScanSpec
from stemstream.counting.thresholds import PixelHistogram, fixed_thresholds, thresholds_from_histogram
from stemstream.pipeline.control.scans import CALIBRATION_TIMEOUT_S
from stemstream.pipeline.control.service import Control
from stemstream.transport.messages import pack_control


@pytest.fixture
def make_control(tmp_path):
    """make_control(fixed=True, **settings) -> an in-process Control (socket bound, not served) on
    fresh ports, its state file under tmp_path; ``settings`` set the config's fields, named
    section__field (e.g. pipeline__block_frames=16)."""
    made = []

    def make(fixed: bool = True, **settings) -> Control:
        config = test_config(tmp_path, fixed=fixed)
        for dotted, value in settings.items():
            section, name = dotted.split("__")
            setattr(getattr(config, section), name, value)
        made.append(Control(config))
        return made[-1]

    yield make
    for control in made:
        control.socket.close(0)


def ok(control: Control, op: str, **fields) -> dict:
    reply = control.handle({"op": op, **fields})
    assert reply["ok"], reply
    pack_control(reply)  # every reply must travel
    return reply


def register(control: Control, *nodes: int) -> None:
    for n in nodes:
        ok(control, "heartbeat", role="node", id=n, stats={}, host=f"10.0.0.{n + 1}")


def beat_spec(control: Control, number: int) -> ScanSpec:
    """Scan ``number``'s spec as a role learns it: from a heartbeat reply."""
    reply = ok(control, "heartbeat", role="producer", id=0, stats={})
    specs = {s["scan"]: ScanSpec.from_wire(s) for s in reply["scans"]}
    return specs[number]


def silence(control: Control, node: int) -> None:
    """Node group ``node`` last heard of longer than dead_after_s ago."""
    control.roles[f"node-{node}"]["seen"] = time.time() - control.config.flow.dead_after_s - 1


def histogram(center: int, n_frames: int, seed: int) -> PixelHistogram:
    """A pedestal of 1-ADU bins around ``center`` and a few X-ray-sized values."""
    rng = np.random.default_rng(seed)
    values = np.concatenate([np.round(rng.normal(center, 3.0, 20000)), rng.integers(2000, 4000, 5)]).astype(np.int64)
    unique, counts = np.unique(values, return_counts=True)
    return PixelHistogram.from_wire({"values": unique.tolist(), "counts": counts.tolist(), "n_frames": n_frames})


# -- starting a scan -------------------------------------------------------------------------------


def test_a_scan_starts_with_the_configured_calibration_block_frames_and_registered_node_groups(make_control):
    control = make_control(fixed=False, pipeline__block_frames=16, counting__sigma=3.5, counting__samples=77)
    register(control, 2, 0)
    spec = ScanSpec.from_wire(ok(control, "start_scan", scan_number=4, scan_shape=[3, 5], frames_per_position=2)["scan"])
    counting = control.config.counting
    assert spec.block_frames == 16 and spec.shape == (3, 5) and spec.frames_per_position == 2
    assert spec.calibration == CalibrationSettings(3.5, counting.xray_sigma, 77, counting.calibration_frames)
    assert spec.thresholds is None  # calibrated from the scan's own frames
    assert spec.nodes == [0, 2] and spec.node_hosts == {0: "10.0.0.1", 2: "10.0.0.3"}
    assert spec.generation == spec.fenced == 0 and spec.epoch == 1
    assert spec.file_name.startswith("FOURD_") and spec.file_name.endswith("_00001_00004.h5")
    assert beat_spec(control, 4) == spec


def test_fixed_thresholds_come_from_the_config_or_the_request(make_control):
    control = make_control(fixed=True)
    register(control, 0)
    spec = ScanSpec.from_wire(ok(control, "start_scan", scan_number=1, scan_shape=[2, 2])["scan"])
    assert spec.thresholds == fixed_thresholds(28.0, 1000.0)
    spec = ScanSpec.from_wire(ok(control, "start_scan", scan_number=2, scan_shape=[2, 2], file_name="mine.h5",
                                 thresholds={"background": 12, "xray": 400.5})["scan"])
    assert spec.thresholds == fixed_thresholds(12.0, 400.5) and spec.file_name == "mine.h5" and spec.epoch == 2


def test_a_scan_number_used_again_starts_above_its_last_generation_with_a_new_epoch(make_control):
    control = make_control()
    register(control, 0)
    first = ScanSpec.from_wire(ok(control, "start_scan", scan_number=3, scan_shape=[2, 2])["scan"])
    assert not control.handle({"op": "start_scan", "scan_number": 3, "scan_shape": [2, 2]})["ok"]  # it runs
    ok(control, "writer_restarted", scan=3)
    ok(control, "scan_done", scan=3, ok=True, summary={})
    again = ScanSpec.from_wire(ok(control, "start_scan", scan_number=3, scan_shape=[2, 2])["scan"])
    assert again.generation == again.fenced == first.generation + 2 and again.epoch == first.epoch + 1


def test_get_scan_says_how_each_earlier_run_of_a_scan_number_ended(make_control):
    """A producer still holding blocks of run 1 when run 2 starts asks how run 1 ended: closed
    whole (drop them), closed with frames missing (spill them), failed."""
    control = make_control()
    register(control, 0)
    whole = {"ledger": {"frames_expected": 4, "frames_complete": 4}}
    short = {"ledger": {"frames_expected": 4, "frames_complete": 3}}
    for summary, ended_ok in ((whole, True), (short, True), ({"error": "disk full"}, False)):
        ok(control, "start_scan", scan_number=5, scan_shape=[2, 2])
        ok(control, "scan_done", scan=5, ok=ended_ok, summary=summary)
    ok(control, "start_scan", scan_number=5, scan_shape=[2, 2])
    reply = ok(control, "get_scan", scan=5)
    assert reply["earlier_runs"] == {"1": "whole", "2": "incomplete", "3": "failed"}
    pack_control(reply)


def test_a_producer_learns_the_blocks_of_scans_closed_lately_that_the_file_holds_without_its_module(make_control):
    """For a producer started again after its node groups counted its blocks without it (issue 12):
    only closed scans, of the last scan_timeout_s, blocks of its own module within the scan."""
    control = make_control(pipeline__block_frames=4)  # a 4x4 scan: 4 blocks
    register(control, 0)
    # as the writer tells them (pipeline.writer.role.summary_for_control): half-open block ranges
    lacking = {"1": [[3, 4], [1, 2], [99, 100], [-5, -1], ["2", 3], [True, 2], 7], "2": [[0, 1]]}
    for number, summary, ended_ok in ((1, {"ledger": {"blocks_lacking": lacking}}, True),
                                      (2, {"ledger": {"blocks_lacking": {"1": [[0, 1]]}}}, False),
                                      (3, {"ledger": {"blocks_lacking": "nonsense"}}, True),
                                      (4, {"ledger": {"blocks_lacking": {"1": [[2, 3]]}}}, True)):
        ok(control, "start_scan", scan_number=number, scan_shape=[4, 4])
        ok(control, "scan_done", scan=number, ok=ended_ok, summary=summary)
    control.scans[4].ended_at -= control.config.flow.scan_timeout_s + 1  # closed too long ago
    ok(control, "start_scan", scan_number=5, scan_shape=[4, 4])  # running
    reply = ok(control, "missed_blocks", module=1)
    assert [(ScanSpec.from_wire(s["scan"]).number, s["blocks"]) for s in reply["scans"]] == [(1, [1, 3])]
    assert [s["blocks"] for s in ok(control, "missed_blocks", module=2)["scans"]] == [[0]]
    assert ok(control, "missed_blocks", module=0)["scans"] == []
    for bad in ({}, {"module": 4}, {"module": -1}, {"module": "1"}):
        assert control.handle({"op": "missed_blocks", **bad})["ok"] is False


# -- calibration -------------------------------------------------------------------------------------


def test_thresholds_are_fitted_from_both_node_groups_histograms_and_reach_the_next_heartbeat(make_control):
    control = make_control(fixed=False)
    register(control, 0, 1)
    ok(control, "start_scan", scan_number=1, scan_shape=[4, 4])
    first, second = histogram(100, 5, seed=1), histogram(104, 7, seed=2)
    ok(control, "calibration", scan=1, node=0, **first.to_wire())
    assert beat_spec(control, 1).thresholds is None  # node group 1's histogram is still to come
    ok(control, "calibration", scan=1, node=0, **second.to_wire())  # node group 0 again: ignored
    assert control.scans[1].histogram.n_frames == 5
    ok(control, "calibration", scan=1, node=1, **second.to_wire())
    merged = histogram(100, 5, seed=1)
    merged.merge(second)
    cal = control.scans[1].spec.calibration
    expected = thresholds_from_histogram(merged, cal.sigma, cal.xray_sigma)
    thresholds = beat_spec(control, 1).thresholds
    assert thresholds == expected and thresholds.number_of_samples == 12
    # from the merged sample, not from either node group's alone
    assert thresholds != thresholds_from_histogram(first, cal.sigma, cal.xray_sigma)
    assert 100 < thresholds.optimized_mean < 104


def test_calibration_goes_on_without_a_node_group_that_was_failed_over(make_control):
    control = make_control(fixed=False)
    register(control, 0, 1)
    ok(control, "start_scan", scan_number=1, scan_shape=[4, 4])
    ok(control, "calibration", scan=1, node=0, **histogram(100, 5, seed=1).to_wire())
    silence(control, 1)
    control.tick()
    spec = beat_spec(control, 1)
    assert spec.alive == [0] and spec.thresholds is not None and spec.thresholds.number_of_samples == 5


def test_calibration_waits_for_silent_node_groups_only_until_its_timeout(make_control):
    control = make_control(fixed=False)
    register(control, 0, 1)
    ok(control, "start_scan", scan_number=1, scan_shape=[4, 4])
    ok(control, "calibration", scan=1, node=1, **histogram(50, 3, seed=3).to_wire())
    control.tick()
    assert control.scans[1].spec.thresholds is None
    control.scans[1].started -= CALIBRATION_TIMEOUT_S + 1
    control.tick()
    assert beat_spec(control, 1).thresholds.number_of_samples == 3


def test_a_sample_that_cannot_be_fitted_fails_the_scan(make_control):
    control = make_control(fixed=False)
    register(control, 0)
    ok(control, "start_scan", scan_number=1, scan_shape=[4, 4])
    ok(control, "calibration", scan=1, node=0, values=[], counts=[], n_frames=0)
    state = ok(control, "get_scan", scan=1)
    assert state["state"] == "failed" and "no sample pixels" in state["summary"]["error"]
    assert ok(control, "heartbeat", role="writer", id=0, stats={})["scans"] == []


# -- failover ----------------------------------------------------------------------------------------


def test_a_node_group_silent_past_dead_after_s_is_failed_over_once(make_control):
    control = make_control()
    register(control, 0, 1, 2)
    ok(control, "start_scan", scan_number=1, scan_shape=[16, 16], nodes=[0, 1, 2, 5])  # 5 never registered
    ok(control, "committed", scan=1, ranges=[[0, 3]], fenced=0, done=[])
    control.changed = False
    control.tick()
    assert beat_spec(control, 1).generation == 0 and not control.changed  # all answering; 5 is unknown
    silence(control, 1)
    control.tick()
    spec = beat_spec(control, 1)
    assert spec.generation == 1 and spec.alive == [0, 2, 5] and control.changed
    assert [(f.generation, f.dead, f.committed_blocks) for f in spec.failovers] == [(1, [1], 3)]
    assert [spec.route(b)[0] for b in range(4)] == [0, 2, 2, 5]  # node group 1's blocks to the others
    control.tick()
    assert beat_spec(control, 1).generation == 1  # failed over once, not at every tick


def test_a_node_group_done_in_the_current_generation_may_go_quiet(make_control):
    control = make_control()
    register(control, 0, 1)
    ok(control, "start_scan", scan_number=1, scan_shape=[4, 4])
    ok(control, "committed", scan=1, ranges=[], fenced=0, done=[1])
    silence(control, 1)
    control.tick()
    assert beat_spec(control, 1).generation == 0


def test_a_node_group_that_left_is_failed_over_at_once_and_not_used_by_the_next_scan(make_control):
    control = make_control()
    register(control, 0, 1)
    ok(control, "start_scan", scan_number=1, scan_shape=[4, 4])
    ok(control, "leave", role="node", id=1)
    control.tick()
    assert beat_spec(control, 1).alive == [0]
    assert ScanSpec.from_wire(ok(control, "start_scan", scan_number=2, scan_shape=[4, 4])["scan"]).nodes == [0]


def test_no_new_generation_when_every_node_group_is_silent(make_control):
    control = make_control()
    register(control, 0, 1)
    ok(control, "start_scan", scan_number=1, scan_shape=[4, 4])
    silence(control, 0)
    silence(control, 1)
    control.tick()
    spec = beat_spec(control, 1)
    assert spec.generation == 0 and spec.alive == [0, 1] and control.scans[1].running
    register(control, 0)  # one comes back, the other stays away: now it is failed over
    control.tick()
    assert beat_spec(control, 1).alive == [0]


def node_process(control: Control, node: int, instance) -> dict:
    """A heartbeat of node group ``node`` from process ``instance``."""
    return ok(control, "heartbeat", role="node", id=node, stats={}, host="127.0.0.1", instance=instance)


def test_a_node_group_restarted_mid_scan_is_failed_over_at_once_and_its_new_process_serves_on(make_control):
    """Issue 12, finding 2: a node group killed and restarted within dead_after_s never went
    silent, so nothing was failed over and what the dead process held was lost without a word."""
    control = make_control()
    for n in (0, 1):
        node_process(control, n, f"first-{n}")
    ok(control, "start_scan", scan_number=1, scan_shape=[16, 16])
    assert beat_spec(control, 1).instances == {0: "first-0", 1: "first-1"}
    node_process(control, 1, "first-1")
    control.tick()
    assert beat_spec(control, 1).generation == 0
    control.changed = False
    reply = node_process(control, 1, "second-1")  # the reply the new process reads its scans from
    spec = ScanSpec.from_wire(reply["scans"][0])
    assert spec.generation == 1 and spec.alive == [0, 1] and control.changed
    assert [(f.generation, f.dead) for f in spec.failovers] == [(1, [])] and "restarted" in spec.failovers[0].reason
    assert spec.instances == {0: "first-0", 1: "second-1"}
    node_process(control, 1, "second-1")
    control.tick()
    assert beat_spec(control, 1).generation == 1  # once per restart


def test_a_restart_after_the_node_group_was_done_or_failed_over_or_the_scan_ended_changes_no_generation(make_control):
    control = make_control()
    for n in (0, 1, 2):
        node_process(control, n, f"first-{n}")
    ok(control, "start_scan", scan_number=1, scan_shape=[16, 16])
    ok(control, "committed", scan=1, ranges=[], fenced=0, done=[0])  # node group 0 finished its part
    node_process(control, 0, "second-0")
    silence(control, 2)
    control.tick()
    assert beat_spec(control, 1).generation == 1 and beat_spec(control, 1).alive == [0, 1]  # 2 died
    node_process(control, 2, "second-2")  # back after its failover: not in the scan any more
    spec = beat_spec(control, 1)
    assert spec.generation == 1 and spec.instances[0] == "second-0"
    ok(control, "scan_done", scan=1, ok=True, summary={})
    node_process(control, 1, "second-1")
    assert control.scans[1].spec.generation == 1 and control.scans[1].spec.instances[1] == "first-1"


def test_a_node_groups_process_is_remembered_across_a_control_restart(make_control):
    control = make_control()
    node_process(control, 0, "first-0")
    node_process(control, 1, "first-1")
    ok(control, "start_scan", scan_number=1, scan_shape=[16, 16])
    control.save()
    again = make_control()  # the same state file
    assert again.scans[1].spec.instances == {0: "first-0", 1: "first-1"}
    node_process(again, 0, "first-0")
    assert beat_spec(again, 1).generation == 0
    node_process(again, 1, "second-1")  # restarted while control was away
    assert beat_spec(again, 1).generation == 1


def test_a_heartbeat_whose_instance_is_not_a_token_changes_no_scan(make_control):
    control = make_control()
    node_process(control, 0, "first-0")
    ok(control, "start_scan", scan_number=1, scan_shape=[4, 4])
    for bad in ("x" * 1000, "", 5, None, ["a"]):
        control.handle({"op": "heartbeat", "role": "node", "id": 0, "stats": {}, "instance": bad})
    spec = beat_spec(control, 1)
    assert spec.generation == 0 and spec.instances == {0: "first-0"}


def test_a_gateway_restart_starts_a_new_generation_for_every_running_scan(make_control):
    control = make_control()
    register(control, 0)
    for number in (1, 2, 3):
        ok(control, "start_scan", scan_number=number, scan_shape=[2, 2])
    ok(control, "scan_done", scan=2, ok=True, summary={})
    assert ok(control, "gateway_restarted", id=0)["scans"] == [1, 3]
    assert [beat_spec(control, n).generation for n in (1, 3)] == [1, 1]
    assert control.scans[2].spec.generation == 0


# -- the writer's reports ----------------------------------------------------------------------------


def test_commits_count_only_for_the_generation_the_writer_fenced(make_control):
    control = make_control()
    register(control, 0, 1)
    ok(control, "start_scan", scan_number=1, scan_shape=[8, 8])  # 64 frames, 2 blocks of 32
    assert ok(control, "writer_restarted", scan=1)["generation"] == 1
    assert beat_spec(control, 1).fenced == 0
    # a report about generation 0 (written before the writer saw generation 1) changes nothing
    ok(control, "committed", scan=1, ranges=[[0, 1]], fenced=0, done=[0])
    beat = ok(control, "heartbeat", role="producer", id=0, stats={})
    assert beat["acks"] == {"1": []} and control.scans[1].done_nodes == set()
    control.changed = False
    ok(control, "committed", scan=1, ranges=[[0, 2]], fenced=1, done=[0])
    beat = ok(control, "heartbeat", role="producer", id=0, stats={})
    assert beat["acks"] == {"1": [[0, 2]]} and control.scans[1].done_nodes == {0} and control.changed
    assert ScanSpec.from_wire(beat["scans"][0]).fenced == 1
    # the same report again changes nothing the state file keeps
    control.changed = False
    ok(control, "committed", scan=1, ranges=[[0, 2]], fenced=1, done=[0])
    assert not control.changed
    # a new generation: done node groups must be done again; the failover records the commits
    ok(control, "writer_restarted", scan=1)
    assert control.scans[1].done_nodes == set() and control.scans[1].spec.failovers[-1].committed_blocks == 2


def test_scan_done_closes_the_scan_frees_its_histogram_and_ignores_later_reports(make_control):
    control = make_control(fixed=False)
    register(control, 0, 1)
    ok(control, "start_scan", scan_number=1, scan_shape=[4, 4])
    ok(control, "calibration", scan=1, node=0, **histogram(100, 5, seed=1).to_wire())
    assert control.scans[1].histogram.n_frames == 5
    ok(control, "scan_done", scan=1, ok=True, summary={"frames": 16})
    state = control.scans[1]
    assert state.state == "closed" and state.histogram is None and state.summary == {"frames": 16}
    assert ok(control, "heartbeat", role="writer", id=0, stats={})["scans"] == []
    ok(control, "committed", scan=1, ranges=[[0, 1]], fenced=0, done=[])
    ok(control, "calibration", scan=1, node=1, **histogram(100, 5, seed=2).to_wire())
    assert state.committed == [] and state.contributors == {0}
    assert not control.handle({"op": "writer_restarted", "scan": 1})["ok"]
    ok(control, "start_scan", scan_number=2, scan_shape=[4, 4])
    ok(control, "scan_done", scan=2, ok=False, summary={"error": "disk full"})
    assert ok(control, "get_scan", scan=2)["state"] == "failed"


def test_shutdown_ends_running_scans_as_failed_and_says_so_in_heartbeats(make_control):
    control = make_control()
    register(control, 0)
    ok(control, "start_scan", scan_number=1, scan_shape=[2, 2])
    ok(control, "shutdown")
    assert ok(control, "heartbeat", role="node", id=0, stats={})["shutdown"] is True
    assert control.scans[1].state == "failed" and "shut down" in control.scans[1].summary["error"]


# -- requests control refuses ---------------------------------------------------------------------

INF = float("inf")
START = {"op": "start_scan", "scan_number": 7, "scan_shape": [4, 4], "nodes": [0, 1]}
HISTOGRAM = {"values": [1, 2], "counts": [3, 4], "n_frames": 1}

REFUSED = [
    ({"op": "get_scan", "scan": INF}, "scan must be an integer"),
    ({"op": "get_scan", "scan": "1"}, "scan must be an integer"),
    ({"op": "get_scan", "scan": True}, "scan must be an integer"),
    ({"op": "get_scan"}, "no scan"),
    ({**START, "scan_number": INF}, "scan_number must be an integer"),
    ({**START, "scan_number": 1e300}, "scan_number must be an integer"),
    ({**START, "scan_number": "x"}, "scan_number must be an integer"),
    ({**START, "scan_number": True}, "scan_number must be an integer"),
    ({**START, "scan_number": -1}, "scan_number must be an integer"),
    ({**START, "scan_number": 2**32}, "scan_number must be an integer 0 to 4294967295"),
    ({**START, "scan_number": 1}, "scan 1 is already running"),
    ({**START, "nodes": [-1]}, "nodes (node group ids) must be an integer"),
    ({**START, "nodes": [1e300]}, "nodes (node group ids) must be an integer"),
    ({**START, "nodes": [0, True]}, "nodes (node group ids) must be an integer"),
    ({**START, "nodes": "01"}, "nodes must be a list"),
    ({**START, "nodes": []}, "no node group"),
    ({**START, "scan_shape": [0, 5]}, "scan shape needs 1 to 65535"),
    ({**START, "scan_shape": [70000, 5]}, "scan shape needs 1 to 65535"),
    ({**START, "scan_shape": [-1, 5]}, "scan shape needs 1 to 65535"),
    ({**START, "scan_shape": ["a", 2]}, "scan_shape must be an integer"),
    ({**START, "scan_shape": [1e300, 2]}, "scan_shape must be an integer"),
    ({**START, "scan_shape": [2.0, 2]}, "scan_shape must be an integer"),
    ({**START, "scan_shape": "44"}, "scan_shape must be [rows, cols]"),
    ({**START, "scan_shape": [4, 4, 4]}, "scan_shape must be [rows, cols]"),
    ({k: v for k, v in START.items() if k != "scan_shape"}, "no scan_shape"),
    ({**START, "frames_per_position": 0}, "frames_per_position must be an integer 1"),
    ({**START, "frames_per_position": 1e300}, "frames_per_position must be an integer 1"),
    ({**START, "scan_shape": [65535, 65535], "frames_per_position": 2}, "more frames than"),
    ({**START, "thresholds": {"background": 30, "xray": 20}}, "must be above the background"),
    ({**START, "thresholds": {"background": INF, "xray": 20}}, "thresholds.background must be a finite number"),
    ({**START, "thresholds": {"background": 3}}, "thresholds.xray must be a finite number"),
    ({**START, "thresholds": [3, 40]}, "thresholds must be a map"),
    ({**START, "file_name": "../elsewhere.h5"}, "file_name must be a file's name"),
    ({**START, "file_name": "/etc/scan.h5"}, "file_name must be a file's name"),
    ({**START, "file_name": 5}, "file_name must be a file's name"),
    ({**START, "resume": "yes"}, "resume must be true or false"),
    ({"op": "heartbeat", "role": "node", "id": 1e300, "stats": {}}, "id must be an integer"),
    ({"op": "heartbeat", "role": "node", "id": INF, "stats": {}}, "id must be an integer"),
    ({"op": "heartbeat", "role": "node", "id": -1, "stats": {}}, "id must be an integer"),
    ({"op": "heartbeat", "role": 5, "id": 0, "stats": {}}, "role must be a role's name"),
    ({"op": "heartbeat", "role": ["node"], "id": 0, "stats": {}}, "role must be a role's name"),
    ({"op": "heartbeat", "id": 0, "stats": {}}, "no role"),
    ({"op": "heartbeat", "role": "node", "id": 3, "stats": [1]}, "stats must be a map"),
    ({"op": "heartbeat", "role": "node", "id": 3, "host": ["h"]}, "host must be a host name"),
    ({"op": "heartbeat", "role": "node", "id": 3, "host": "a host/x"}, "host must be a host name"),
    ({"op": "leave", "role": {}, "id": 0}, "role must be a role's name"),
    ({"op": "committed", "scan": 1, "ranges": [[0, 1e300]], "fenced": 0}, "ranges must be an integer"),
    ({"op": "committed", "scan": 1, "ranges": [[0, 3]], "fenced": 0}, "ranges must be an integer 0 to 2"),
    ({"op": "committed", "scan": 1, "ranges": [[1, 0]], "fenced": 0}, "sorted, disjoint and not empty"),
    ({"op": "committed", "scan": 1, "ranges": [[0, 2], [1, 2]], "fenced": 0}, "sorted, disjoint"),
    ({"op": "committed", "scan": 1, "ranges": [0, 1], "fenced": 0}, "ranges must be a list of [start, stop]"),
    ({"op": "committed", "scan": 1, "ranges": [], "fenced": INF}, "fenced must be an integer"),
    ({"op": "committed", "scan": 1, "ranges": [], "fenced": 0, "done": [1e300]}, "done (node group ids)"),
    ({"op": "calibration", "scan": 1, "node": 1e300, **HISTOGRAM}, "node must be an integer"),
    ({"op": "calibration", "scan": 1, "node": 7, **HISTOGRAM}, "node group 7 is not in scan 1"),
    ({"op": "calibration", "scan": 1, "node": 0, "values": ["a"], "counts": [1]}, "other than integers"),
    ({"op": "calibration", "scan": 1, "node": 0, **HISTOGRAM, "n_frames": 2**50}, "calibration sample"),
    ({"op": "calibration", "scan": INF, "node": 0, **HISTOGRAM}, "scan must be an integer"),
    ({"op": "writer_restarted", "scan": 1e300}, "scan must be an integer"),
    ({"op": "gateway_restarted", "id": "x"}, "id must be an integer"),
    ({"op": "scan_done", "scan": 1, "summary": "all good"}, "summary must be a map"),
    ({"op": "scan_done", "scan": 1, "ok": "no"}, "ok must be true or false"),
    ({"op": "scan_done", "scan": 1e300}, "scan must be an integer"),
    ({"op": "nonsense"}, "unknown request 'nonsense'"),
    ({"op": 5}, "unknown request 5"),
]


def _snapshot(control: Control) -> tuple:
    scans = {n: (s.spec.to_wire(), s.state, s.summary, sorted(s.contributors), s.committed, sorted(s.done_nodes),
                 s.histogram.to_wire() if s.histogram is not None else None) for n, s in control.scans.items()}
    roles = {k: (v["id"], v.get("host"), v["stats"]) for k, v in control.roles.items()}
    return scans, roles, control.sequence, control.shutting_down


@pytest.mark.parametrize("request_, error", REFUSED, ids=[f"{r['op']}-{i}" for i, (r, _) in enumerate(REFUSED)])
def test_a_malformed_request_is_refused_in_one_sentence_and_changes_nothing(make_control, request_, error):
    control = make_control(fixed=False)
    register(control, 0, 1)
    ok(control, "start_scan", scan_number=1, scan_shape=[8, 8])  # 64 frames: blocks 0 and 1
    before = _snapshot(control)
    reply = control.handle(dict(request_))
    assert reply["ok"] is False and error in reply["error"], reply
    assert "\n" not in reply["error"] and len(reply["error"]) < 200
    pack_control(reply)
    assert _snapshot(control) == before
    # and control goes on: its replies still travel, its state file can be written, scans start
    ok(control, "heartbeat", role="producer", id=0, stats={})
    ok(control, "status")
    control.save()
    assert ok(control, "start_scan", scan_number=2, scan_shape=[2, 2])["scan"]["nodes"] == [0, 1]


def test_a_heartbeat_with_an_absurd_id_registers_nothing_that_refuses_later_scans(make_control):
    control = make_control()
    register(control, 0)
    for absurd in (1e300, INF, "x", 2**70, -5):
        assert not control.handle({"op": "heartbeat", "role": "node", "id": absurd, "stats": {}})["ok"]
    highest = control.highest_node_id
    assert highest < 65535  # test_config's ports: node groups above this would have no port
    assert not control.handle({"op": "heartbeat", "role": "node", "id": highest + 1, "stats": {}})["ok"]
    assert not control.handle({**START, "nodes": [highest + 1]})["ok"]
    assert list(control.roles) == ["node-0"]
    spec = ScanSpec.from_wire(ok(control, "start_scan", scan_number=1, scan_shape=[2, 2])["scan"])
    assert spec.nodes == [0]
    ok(control, "heartbeat", role="node", id=highest, stats={})  # the highest with ports is fine
    assert ScanSpec.from_wire(ok(control, "start_scan", scan_number=2, scan_shape=[2, 2])["scan"]).nodes == [0, highest]


def test_file_names_continue_the_sequence_of_the_files_already_in_the_output_directory(make_control, tmp_path):
    """Two runs in one directory within a minute used to get the same name (the second replaced
    the first): a new control continues from the highest sequence among the files there."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "FOURD_261204_0550_00007_00001.h5").touch()
    (out / "FOURD_261204_0551_00009_00001.incomplete.h5").touch()
    (out / "notes_00012_00001.h5").touch()  # not a scan's name
    control = make_control()
    register(control, 0)
    spec = ScanSpec.from_wire(ok(control, "start_scan", scan_number=1, scan_shape=[2, 2])["scan"])
    assert spec.file_name.endswith("_00010_00001.h5") and spec.epoch == 10
