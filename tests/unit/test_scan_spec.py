"""The typed scan spec: its wire form round-trips, and every bad field is one sentence."""

from __future__ import annotations

import msgpack
import pytest

from stemstream.core.scan_spec import ScanSpec, SpecError, check_scan_shape, parse_scan_shape
from stemstream.core.thresholds import fixed_thresholds
from scan_specs import make_spec


def test_a_spec_survives_the_wire_with_every_field():
    spec = make_spec(7, (300, 256), nodes=[2, 0], node_hosts={2: "n2", 0: "n0"}, resume=True,
                     thresholds=fixed_thresholds(20.0, 2000.0), instances={2: "a" * 32, 0: "b" * 32})
    spec.new_generation([2], "node group 2 silent", at=12.5, committed_blocks=40)
    spec.fenced = 1
    again = ScanSpec.from_wire(msgpack.unpackb(msgpack.packb(spec.to_wire()), strict_map_key=False))
    assert again == spec
    assert again.shape == (300, 256) and again.n_frames == 76_800 and again.n_blocks == 2_400
    assert again.alive == [0] and again.failovers[0].dead == [2] and again.host_of(2) == "n2"
    assert again.thresholds.background == 20.0 and again.instances == {2: "a" * 32, 0: "b" * 32}


@pytest.mark.parametrize("change, fragment", [
    ({"scan": -1}, "scan"),
    ({"scan": float("inf")}, "scan"),
    ({"scan": 2**70}, "scan"),
    ({"scan_shape": [0, 4]}, "1 to 65535"),
    ({"scan_shape": [4]}, "missing or of the wrong type"),
    ({"nodes": []}, "no node group"),
    ({"nodes": [70000]}, "nodes"),
    ({"frames_per_position": 0}, "frames_per_position"),
    ({"block_frames": True}, "block_frames"),
    ({"file_name": 5}, "file_name"),
    ({"thresholds": {"background": 5.0, "xray": 1.0}}, "X-ray threshold"),
    ({"thresholds": {"background": 5.0}}, "background and xray"),
    ({"calibration": None}, "missing or of the wrong type"),
    ({"instances": {"0": "x" * 65}}, "instances must be tokens"),
    ({"instances": {"0": 5}}, "instances must be tokens"),
    ({"instances": {"70000": "abc"}}, "instances"),
])
def test_a_bad_spec_field_is_one_sentence(change, fragment):
    wire = {**make_spec().to_wire(), **change}
    with pytest.raises(SpecError) as info:
        ScanSpec.from_wire(wire)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_spec_that_is_not_a_map_is_refused():
    with pytest.raises(SpecError, match="must be a map"):
        ScanSpec.from_wire([1, 2])


def test_scan_shapes_are_rows_by_cols_within_the_header_fields():
    assert parse_scan_shape("300x256") == (300, 256)
    assert parse_scan_shape(" 4 , 8 ") == (4, 8)
    assert check_scan_shape(65535, 1) == (65535, 1)
    with pytest.raises(SpecError, match="ROWSxCOLS"):
        parse_scan_shape("big")
    with pytest.raises(SpecError, match="1 to 65535"):
        parse_scan_shape("65536x2")


@pytest.mark.parametrize("nodes, dead", [([0], []), ([0, 1, 2], []), ([3, 1, 2, 0], [1]), ([3, 1, 2, 0], [3, 0])])
def test_the_blocks_of_a_node_group_are_the_blocks_route_gives_it(nodes, dead):
    spec = make_spec(1, (17, 19), nodes=nodes, block_frames=5)  # 323 frames: 65 blocks, the last one short
    if dead:
        spec.new_generation(dead, "died", at=0.0, committed_blocks=0)
    assert spec.last_block == 64
    for node in [*nodes, 9]:
        routed = [b for b in range(spec.last_block + 1) if spec.route(b)[0] == node]
        assert spec.blocks_of(node).tolist() == routed
        for b in range(spec.last_block + 1):
            assert spec.block_problem(b, node) == (None if b in routed else "block_not_routed_here")
    assert spec.block_problem(65, nodes[0]) == spec.block_problem(2**32 - 1, 0) == "block_not_in_scan"


@pytest.mark.parametrize("block_frames, last_block, certain", [(1, 6, [1, 2, 3, 4, 5]), (3, 2, [0, 1])])
def test_blocks_that_hold_a_frame_only_when_frames_count_from_1_or_only_from_0_are_allowed_not_owed(
        block_frames, last_block, certain):
    spec = make_spec(1, (2, 3), block_frames=block_frames)  # frames 0..5 or 1..6
    assert spec.last_block == last_block and spec.blocks_of(0).tolist() == certain
    assert spec.block_problem(last_block, 0) is None and spec.block_problem(0, 0) is None
    assert spec.block_problem(last_block + 1, 0) == "block_not_in_scan"
