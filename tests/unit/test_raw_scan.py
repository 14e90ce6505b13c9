"""Reading a scan's raw module files back as frames, with every odd record accounted for."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from stemstream.formats.raw import (
    RECORD_BYTES,
    RECORD_DTYPE,
    RawFormatError,
    RawModuleWriter,
    make_sector_records,
    module_of_path,
    raw_file_name,
    sector_rows,
)
from stemstream.formats.raw_scan import RawScan

SCAN = (3, 4)  # (rows, cols)


def random_frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, (n, 576, 576)).astype(np.uint16)


def write_scan(tmp_path, frames, frame_numbers, positions, *, records_per_file=5, scan_number=7,
               skip=None, reverse_module=None):
    """Write 4 modules' files; skip: set of (frame index, module) to leave out."""
    skip = skip or set()
    for m in range(4):
        keep = [i for i in range(len(frames)) if (i, m) not in skip]
        if reverse_module == m:
            keep = keep[::-1]
        records = make_sector_records(scan_number, frame_numbers[keep], SCAN, positions[keep], frames[keep], m)
        with RawModuleWriter(tmp_path, scan_number, m, records_per_file) as writer:
            writer.write(records)
    return tmp_path


def test_file_names_follow_the_receivers():
    assert raw_file_name(12, 3, 1, 2) == "data_scan0000000012_module3_dst1_file2.data"
    assert module_of_path("/x/data_scan0000000012_module3_dst1_file2.data") == 3


def test_name_without_module_number_is_a_clear_error(tmp_path):
    bad = tmp_path / "scan_12.data"
    bad.write_bytes(b"")
    with pytest.raises(RawFormatError, match="no module number"):
        RawScan([bad])


def test_directory_without_raw_files_is_a_clear_error(tmp_path):
    with pytest.raises(RawFormatError, match="no raw"):
        RawScan([tmp_path])


def test_frames_reassemble_from_module_files_in_any_order(tmp_path):
    n = 12
    frames = random_frames(n)
    write_scan(tmp_path, frames, np.arange(100, 100 + n, dtype=np.uint32), np.arange(n), reverse_module=2)
    files = sorted(tmp_path.glob("*.data"), reverse=True)  # any order of files
    with RawScan(files) as scan:
        assert scan.scan_shape == SCAN and scan.scan_number == 7
        got = scan.read_frames(np.arange(n))
        assert np.array_equal(got, frames)
        assert scan.ledger.sectors_received == [n] * 4
        assert scan.table.complete.all()


def test_batches_cover_every_frame_in_frame_number_order(tmp_path):
    n = 12
    frames = random_frames(n, 1)
    write_scan(tmp_path, frames, np.arange(n, dtype=np.uint32)[::-1].copy(), np.arange(n))
    with RawScan([tmp_path]) as scan:
        seen = []
        for batch in scan.batches(batch_size=5):
            for k in range(len(batch.frame_numbers)):
                seen.append(int(batch.frame_numbers[k]))
                assert np.array_equal(batch.frames[k], frames[n - 1 - batch.frame_numbers[k]])
        assert seen == list(range(n))


def test_missing_sector_gives_zero_filled_incomplete_frame(tmp_path):
    n = 12
    frames = random_frames(n, 2)
    write_scan(tmp_path, frames, np.arange(n, dtype=np.uint32), np.arange(n), skip={(4, 1)})
    with RawScan([tmp_path]) as scan:
        frame = scan.read_frames(np.array([4]))[0]
        assert not frame[sector_rows(1)].any()
        assert np.array_equal(frame[sector_rows(2)], frames[4][sector_rows(2)])
        assert scan.table.complete.sum() == n - 1
        assert scan.ledger.sectors_missing == [0, 1, 0, 0]


def test_several_frames_per_position_are_kept_apart(tmp_path):
    n = 12
    frames = random_frames(n, 3)
    positions = np.repeat(np.arange(6), 2)
    write_scan(tmp_path, frames, np.arange(n, dtype=np.uint32), positions)
    with RawScan([tmp_path]) as scan:
        assert scan.frames_per_position == 2
        assert sorted(scan.table.slots.tolist()) == list(range(12))
        assert scan.table.slots[3] == positions[3] * 2 + 1


def test_duplicate_sector_is_counted_and_ignored(tmp_path):
    n = 6
    frames = random_frames(n, 4)
    write_scan(tmp_path, frames, np.arange(n, dtype=np.uint32), np.arange(n))
    extra = make_sector_records(7, np.array([2], np.uint32), SCAN, np.array([2]), frames[2:3] // 2, 0)
    with RawModuleWriter(tmp_path, 7, 0, dst=1) as writer:
        writer.write(extra)
    with RawScan(sorted(tmp_path.glob("*.data"))) as scan:
        assert scan.ledger.sectors_duplicate == [1, 0, 0, 0]
        assert np.array_equal(scan.read_frames(np.array([2]))[0], frames[2])


def test_out_of_bounds_position_is_rejected_with_file_and_offset(tmp_path, caplog):
    n = 6
    frames = random_frames(n, 5)
    write_scan(tmp_path, frames, np.arange(n, dtype=np.uint32), np.arange(n), records_per_file=100)
    path = tmp_path / raw_file_name(7, 3)
    records = np.fromfile(path, RECORD_DTYPE)
    records["header"]["x"][2] = 999
    records.tofile(path)
    with caplog.at_level(logging.WARNING), RawScan([tmp_path]) as scan:
        assert scan.ledger.rejected_reasons["position_out_of_bounds"] == 1
        assert scan.ledger.sectors_rejected == [0, 0, 0, 1]
        assert scan.table.complete.sum() == n - 1  # frame 2 lost its module-3 sector only
    assert f"{path} at byte offset {2 * RECORD_BYTES}" in caplog.text


def test_other_scan_number_is_rejected(tmp_path):
    n = 6
    frames = random_frames(n, 6)
    write_scan(tmp_path, frames, np.arange(n, dtype=np.uint32), np.arange(n), records_per_file=100)
    path = tmp_path / raw_file_name(7, 0)
    records = np.fromfile(path, RECORD_DTYPE)
    records["header"]["scan_number"][0] = 8
    records.tofile(path)
    with RawScan([tmp_path]) as scan:
        assert scan.ledger.rejected_reasons["other_scan_number"] == 1


def test_truncated_record_is_rejected_and_the_records_before_it_kept(tmp_path, caplog):
    n = 6
    frames = random_frames(n, 7)
    write_scan(tmp_path, frames, np.arange(n, dtype=np.uint32), np.arange(n), records_per_file=100)
    path = tmp_path / raw_file_name(7, 1)
    data = path.read_bytes()
    path.write_bytes(data[: 5 * RECORD_BYTES + 1000])
    with caplog.at_level(logging.WARNING), RawScan([tmp_path]) as scan:
        assert scan.ledger.rejected_reasons["truncated_record"] == 1
        assert scan.ledger.sectors_received == [6, 5, 6, 6]
        assert np.array_equal(scan.read_frames(np.array([4]))[0], frames[4])
    assert f"{path} at byte offset {5 * RECORD_BYTES}" in caplog.text


def test_file_of_garbage_shorter_than_a_record_gives_a_clear_error(tmp_path):
    path = tmp_path / raw_file_name(1, 0)
    path.write_bytes(b"garbage")
    with pytest.raises(RawFormatError, match="no complete sector record"):
        RawScan([path])
