"""Wire messages: round trips, and every malformed message refused with a reason."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from stemstream.formats import wire
from stemstream.formats.raw import RECORD_DTYPE
from stemstream.formats.ledger import sector_tally


def records(n: int) -> np.ndarray:
    r = np.zeros(n, RECORD_DTYPE)
    r["header"]["frame_number"] = np.arange(n)
    return r


def as_bytes(parts):
    return [bytes(memoryview(p)) if isinstance(p, np.ndarray) else p for p in parts]


def test_sectors_round_trip():
    msg = wire.decode_sectors(as_bytes(wire.encode_sectors(7, 2, 5, 1, records(3))))
    assert (msg.scan, msg.module, msg.block, msg.node) == (7, 2, 5, 1)
    assert msg.records["header"]["frame_number"].tolist() == [0, 1, 2]


def test_events_round_trip():
    parts = wire.encode_events(3, 1, [10, 11], [0, 1], [15, 7], [0, 2, 3], np.array([5, 9, 4], np.uint32))
    msg = wire.decode_events(as_bytes(parts), 576 * 576)
    assert msg.frame_numbers.tolist() == [10, 11] and msg.events.tolist() == [5, 9, 4]


@pytest.mark.parametrize(
    "parts, reason",
    [
        ([], "empty_message"),
        ([b"Q", b""], "unknown_kind"),
        ([b"S", b"\xc1", b""], "undecodable_envelope"),
        ([b"S", msgpack.packb([1, 2]), b""], "undecodable_envelope"),
        ([b"S", msgpack.packb({"scan": 1})], "wrong_part_count"),
        ([b"S", msgpack.packb({"scan": 1, "module": 9, "block": 0, "node": 0, "n": 0}), b""], "bad_envelope"),
        ([b"S", msgpack.packb({"scan": "1", "module": 0, "block": 0, "node": 0, "n": 0}), b""], "bad_envelope"),
        ([b"S", msgpack.packb({"scan": 1, "module": 0, "block": 0, "node": 0, "n": 1}), b"x" * 100], "wrong_payload_size"),
        ([b"S", msgpack.packb({"scan": 1, "module": 0, "block": 0, "node": 0, "n": 2}), bytes(RECORD_DTYPE.itemsize)], "wrong_record_count"),
        ([b"S", b"x" * (wire.MAX_ENVELOPE_BYTES + 1), b""], "envelope_too_big"),
    ],
)
def test_malformed_sectors_are_refused_with_a_reason(parts, reason):
    with pytest.raises(wire.MessageError) as info:
        wire.kind_of(parts)
        wire.decode_sectors(parts)
    assert info.value.reason == reason


def test_events_with_pixels_outside_the_frame_are_refused():
    parts = wire.encode_events(3, 1, [10], [0], [15], [0, 1], np.array([576 * 576], np.uint32))
    with pytest.raises(wire.MessageError, match="pixel_outside_frame"):
        wire.decode_events(as_bytes(parts), 576 * 576)


def test_events_with_inconsistent_offsets_are_refused():
    parts = wire.encode_events(3, 1, [10, 11], [0, 1], [15, 15], [0, 3, 2], np.array([1, 2], np.uint32))
    with pytest.raises(wire.MessageError):
        wire.decode_events(as_bytes(parts), 576 * 576)


def _events_with_subpixel(subpixel) -> list:
    return as_bytes(wire.encode_events(3, 1, [10, 11], [0, 1], [15, 15], [0, 2, 3], np.array([5, 9, 4], np.uint32),
                                       subpixel=subpixel))


def test_events_carry_their_sub_pixel_positions_when_sent_and_a_merge_keeps_them():
    points = np.array([[0.1, 5.2], [0.0, 8.7], [-0.5, 575.5]], np.float32)
    msg = wire.decode_events(_events_with_subpixel(points), 576 * 576)
    np.testing.assert_array_equal(msg.subpixel, points)
    plain = wire.decode_events(as_bytes(wire.encode_events(3, 1, [12], [2], [15], [0, 1], np.array([7], np.uint32))),
                               576 * 576)
    assert plain.subpixel is None and len(_events_with_subpixel(None)) == 7  # optional: the maxima method's stay as they were
    empty = wire.decode_events(as_bytes(wire.encode_events(3, 1, [], [], [], [0], np.empty(0, np.uint32))), 576 * 576)
    merged = wire.concat_events([msg, empty, msg])  # a block without events may come without positions
    np.testing.assert_array_equal(merged.subpixel, np.concatenate([points, points]))
    assert wire.concat_events([plain, empty]).subpixel is None
    assert wire.concat_events([msg, plain]).subpixel is None  # not every event has one: none


@pytest.mark.parametrize("subpixel", [
    np.zeros((2, 2), np.float32),  # 3 events, 2 positions
    np.zeros(7, np.float32),  # half a position
    np.array([[0, 1], [np.nan, 2], [3, 4]], np.float32),
    np.array([[0, 1], [np.inf, 2], [3, 4]], np.float32),
    np.array([[0, 1], [2, 2], [576, 4]], np.float32),  # below the last row
    np.array([[0, -0.6], [2, 2], [3, 4]], np.float32),  # left of the first column
])
def test_events_with_malformed_sub_pixel_positions_are_refused(subpixel):
    parts = _events_with_subpixel(None) + [bytes(memoryview(np.ascontiguousarray(subpixel)))]
    with pytest.raises(wire.MessageError) as info:
        wire.decode_events(parts, 576 * 576)
    assert info.value.reason in ("bad_subpixel", "wrong_payload_size")


def _events_with_ledger(ledger) -> list:
    return as_bytes(wire.encode_events(3, 1, [10], [0], [15], [0, 1], np.array([5], np.uint32), block=4, ledger=ledger))


def test_events_carry_their_blocks_sector_counts():
    tally = sector_tally()
    tally["sectors_received"] = [32, 32, 31, 32]
    tally["rejected_reasons"] = {"wrong_block": 1}
    tally["sectors_rejected"][2] = 1
    msg = wire.decode_events(_events_with_ledger(tally), 576 * 576)
    assert msg.ledger == tally and msg.block == 4
    assert wire.decode_events(_events_with_ledger(None), 576 * 576).ledger is None  # optional


@pytest.mark.parametrize("ledger", [
    [1, 2], {"sectors_received": [1, 2, 3]}, {"sectors_received": [1, 2, 3, -4]}, {"sectors_missing": "4"},
    {"sectors_duplicate": [1, 2, 3, True]}, {"rejected_reasons": {"x": -1}}, {"rejected_reasons": {1: 2}},
    {"rejected_reasons": {"a/b": 1}}, {"rejected_reasons": {"": 1}},  # (no HDF5 attribute has such a name)
    {"frames_spilled": 1.5}, {"modules_ended": [0]}, {7: [0, 0, 0, 0]}, {f"k{i}": 0 for i in range(20)},
])
def test_events_with_malformed_sector_counts_are_refused(ledger):
    with pytest.raises(wire.MessageError) as info:
        wire.decode_events(_events_with_ledger(ledger), 576 * 576)
    assert info.value.reason == "bad_envelope"


@pytest.mark.parametrize("lost", [[1, "2"], [1, 2, 3, 4, 5], [-1], [None]])
def test_done_with_malformed_lost_counts_is_refused(lost):
    parts = [wire.DONE, msgpack.packb({"scan": 1, "node": 0, "ledger": {"failed": False}, "lost": lost})]
    with pytest.raises(wire.MessageError) as info:
        wire.decode_done(parts)
    assert info.value.reason == "bad_envelope"
    ok = wire.decode_done(wire.encode_done(1, 0, {**sector_tally(), "failed": False, "modules_ended": [0]}, [0, 1, 0, 0]))
    assert ok.lost == [0, 1, 0, 0]


MODEL = {"pedestal": 20.0, "single_electron_mean": 120.5, "single_electron_shape": 4.1, "min_charge": 16.0,
         "calibration_clusters": 812}


def test_done_says_how_its_node_group_counted():
    counting = {"method": "clusters", "model": MODEL}
    assert wire.decode_done(wire.encode_done(1, 1, sector_tally(), [0] * 4, counting=counting)).counting == counting
    assert wire.decode_done(wire.encode_done(1, 0, sector_tally(), [0] * 4)).counting is None


@pytest.mark.parametrize("counting", [{"method": "peaks", "model": None}, "clusters", {"method": "clusters", "x": 1},
                                      {"method": "clusters", "model": {"mean": "big"}},
                                      {"method": "clusters", "model": {f"k{i}": 1.0 for i in range(9)}},
                                      # names the file cannot hold as attributes: its close failed on them
                                      {"method": "clusters", "model": {"a/b": 1.0}},
                                      {"method": "clusters", "model": {"": 1.0}},
                                      {"method": "clusters", "model": {"a\x00b": 1.0}},
                                      {"method": "clusters", "model": {"x" * 65: 1.0}}])
def test_done_or_events_with_a_malformed_counting_report_is_refused(counting):
    with pytest.raises(wire.MessageError) as info:
        wire.decode_done(wire.encode_done(1, 0, sector_tally(), [0] * 4, counting=counting))
    assert info.value.reason == "bad_envelope"
    none = np.empty(0, np.uint32)
    parts = wire.encode_events(1, 0, none, np.empty(0, np.int64), np.empty(0, np.uint8), np.zeros(1, np.int64), none,
                               counting=counting)
    with pytest.raises(wire.MessageError) as info:
        wire.decode_events([bytes(memoryview(np.ascontiguousarray(p))) for p in parts], 576 * 576)
    assert info.value.reason == "bad_envelope"


@pytest.mark.parametrize("lists", [[[5, 3]], [[7, 7]], [[1, 2], [4, 9, 9]], [[], [3, 1], []]])
def test_events_whose_frame_pixels_are_not_strictly_increasing_are_refused(lists):
    """The file keeps each frame's pixels sorted and unique (stempy's lists): such a message failed
    the write at its commit and killed the writer, its journal's successor too."""
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in lists])]).astype(np.int64)
    events = np.concatenate([np.array(e, np.uint32) for e in lists]).astype(np.uint32)
    n = len(lists)
    parts = wire.encode_events(1, 0, np.arange(n, dtype=np.uint32), np.arange(n, dtype=np.int64),
                               np.full(n, 15, np.uint8), offsets, events)
    with pytest.raises(wire.MessageError) as info:
        wire.decode_events([bytes(memoryview(np.ascontiguousarray(p))) for p in parts], 576 * 576)
    assert info.value.reason == "unsorted_events"
    # frames that only touch across their boundary are fine: [.., 9] then [3, ..]
    ok = [np.array([1, 9], np.uint32), np.array([3, 4], np.uint32), np.array([], np.uint32), np.array([0], np.uint32)]
    parts = wire.encode_events(1, 0, np.arange(4, dtype=np.uint32), np.arange(4, dtype=np.int64),
                               np.full(4, 15, np.uint8), np.array([0, 2, 4, 4, 5], np.int64), np.concatenate(ok))
    assert len(wire.decode_events([bytes(memoryview(np.ascontiguousarray(p))) for p in parts], 576 * 576).events) == 5
