"""Routing generations, commit ranges, the writer's journal and shared-memory slots, in process."""

from __future__ import annotations

import os

import numpy as np
import pytest

from stemstream.formats import wire
from stemstream.formats.raw import RECORD_BYTES, RECORD_DTYPE
from stemstream.pipeline.writer.journal import Journal, read_journal
from stemstream.pipeline.routing import BlockRanges, in_ranges, to_ranges
from scan_specs import make_spec
from stemstream.transport.shared_memory import Attachments, SlotRing


def test_blocks_go_round_the_scans_node_groups_then_to_the_survivors():
    spec = make_spec(nodes=[0, 3, 5])
    assert [spec.route(b) for b in range(4)] == [(0, 0), (3, 0), (5, 0), (0, 0)]
    spec.new_generation([9], "nobody", at=0.0, committed_blocks=0)
    spec.new_generation([3], "node group 3 died", at=0.0, committed_blocks=0)
    # a survivor's own blocks stay with it; the dead one's are spread over the survivors
    assert spec.alive == [0, 5] and spec.generation == 2
    assert [spec.route(b) for b in range(6)] == [(0, 2), (5, 2), (5, 2), (0, 2), (0, 2), (5, 2)]
    lone = make_spec(nodes=[1])
    lone.new_generation([1], "died", at=0.0, committed_blocks=0)
    assert lone.route(7) is None


def test_commit_ranges_round_trip():
    blocks = [9, 0, 1, 2, 5, 6, 2]
    ranges = to_ranges(blocks)
    assert ranges == [[0, 3], [5, 7], [9, 10]]
    assert [b for b in range(12) if in_ranges(ranges, b)] == [0, 1, 2, 5, 6, 9]
    assert not in_ranges([], 0)


def test_block_ranges_hold_what_a_set_holds_in_any_order():
    rng = np.random.default_rng(3)
    for _ in range(50):
        blocks = rng.integers(0, 60, size=int(rng.integers(0, 80))).tolist()
        held, seen = BlockRanges(), set()
        for block in blocks:
            assert held.add(block) == (block not in seen)  # False: there already
            seen.add(block)
        assert held.ranges() == to_ranges(seen) and list(held) == sorted(seen) and len(held) == len(seen)
        assert [b for b in range(-2, 62) if b in held] == sorted(seen)


def _events(block: int, n: int) -> wire.EventsMessage:
    offsets = np.arange(n + 1, dtype=np.int64) * 2
    return wire.EventsMessage(1, 0, np.arange(n, dtype=np.uint32) + 32 * block, np.arange(n, dtype=np.int64),
                              np.full(n, 15, np.uint8), offsets, np.arange(2 * n, dtype=np.uint32), block, 0)


def test_journal_gives_back_what_was_committed_and_ignores_a_torn_tail(tmp_path):
    path = tmp_path / "scan.h5.journal"
    journal = Journal(path, scan=1, epoch=4)
    for block in (0, 2, 1):
        journal.add(_events(block, 3))
    journal.close(delete=False)
    back = read_journal(path, 1, 4)
    assert [m.block for m in back] == [0, 2, 1]
    assert np.array_equal(back[1].frame_numbers, [64, 65, 66]) and np.array_equal(back[1].events, np.arange(6))
    # the writer died inside an append: the last record is cut short
    path.write_bytes(path.read_bytes()[:-5])
    assert [m.block for m in read_journal(path, 1, 4)] == [0, 2]
    # another scan's or epoch's journal is not ours
    assert read_journal(path, 1, 5) is None and read_journal(path, 2, 4) is None


def test_journal_sync_puts_every_added_record_on_disk_with_fsync(tmp_path, monkeypatch):
    """The writer syncs before each commit report: what control hears of must be readable by a
    writer started after this one died, and on stable storage (fsync), not in a buffer."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "scan.h5.journal"
    journal = Journal(path, scan=1, epoch=0)
    for block in range(3):
        journal.add(_events(block, 2))
    journal.sync()
    assert synced == [journal._file.fileno()]
    assert [m.block for m in read_journal(path, 1, 0)] == [0, 1, 2]  # the open journal, read by another
    journal.close(delete=True).join(10)  # removed in a thread of its own (after the file is in place)
    assert not path.exists()


def test_a_slot_written_by_the_producer_is_read_in_place_by_the_node_group(tmp_path):
    ring = SlotRing(tmp_path, "stemstream-test-p0-1", slot_records=4, n_slots=3)
    slot = ring.acquire()
    view = ring.view(slot, 3)
    view["header"]["frame_number"] = [7, 8, 9]
    reader = Attachments(tmp_path)
    records = reader.records(ring.descriptor(slot, 3), 3)
    assert records.dtype == RECORD_DTYPE and list(records["header"]["frame_number"]) == [7, 8, 9]
    for bad, n in (({"name": "stemstream-test-p0-1", "offset": 12 * RECORD_BYTES, "nbytes": RECORD_BYTES}, 1),
                   ({"name": "stemstream-nothing", "offset": 0, "nbytes": RECORD_BYTES}, 1),
                   ({"name": "stemstream-test-p0-1", "offset": 0, "nbytes": RECORD_BYTES}, 2)):
        with pytest.raises(wire.MessageError, match="bad_descriptor"):
            reader.records(bad, n)
    with pytest.raises(wire.MessageError, match="bad_descriptor"):
        reader.validate_name("../../etc/passwd")
    ring.release(slot)
    assert ring.acquire() == slot
    ring.close()
    assert not (tmp_path / "stemstream-test-p0-1").exists()
