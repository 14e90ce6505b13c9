"""Reading a scan's raw module files back as frames, with every odd record accounted for."""

from __future__ import annotations

import logging
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from stemstream.formats import raw_scan
from stemstream.formats.raw import (
    HEADER_DTYPE,
    RECORD_BYTES,
    RECORD_DTYPE,
    RawFileLayout,
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


def test_a_few_frames_of_a_4096_x_4096_scan_with_3_frames_per_position_are_indexed_to_their_slots(tmp_path):
    """A scan as large as the 4D Camera's: flat positions and slots pass 65,535 (uint16) and
    frame numbers 65,535 x 3; a position's frames may come from passes far apart in frame
    numbers and out of order in the files. Only the records present are indexed."""
    shape, fpp = (4096, 4096), 3
    n_positions = shape[0] * shape[1]
    positions = np.array([0, 0, 0, 65_535, 65_536, 65_536, n_positions - 1, n_positions - 1, n_positions - 1])
    # position 65,536's two frames: one of the first pass over the scan, one of the third
    numbers = np.array([0, 1, 2, 3 * 65_535, 3 * 65_536, 2 * n_positions + 65_536, 3 * n_positions - 3,
                        3 * n_positions - 2, 3 * n_positions - 1], np.uint32)
    frames = random_frames(len(numbers), 8)
    order = np.array([4, 8, 0, 2, 6, 1, 7, 5, 3])  # files hold the records in any order
    for m in range(4):
        records = make_sector_records(9, numbers[order], shape, positions[order], frames[order], m)
        with RawModuleWriter(tmp_path, 9, m, records_per_file=4) as writer:
            writer.write(records)
    with RawScan([tmp_path]) as scan:
        assert scan.scan_shape == shape and scan.frames_per_position == fpp
        assert scan.ledger.frames_expected == n_positions * fpp
        assert scan.table.frame_numbers.tolist() == numbers.tolist()  # frame-number order
        assert scan.table.positions.tolist() == positions.tolist()
        j = [0, 1, 2, 0, 0, 1, 0, 1, 2]
        assert scan.table.slots.tolist() == (positions * fpp + j).tolist()
        assert np.array_equal(scan.read_frames(np.arange(len(numbers))), frames)
        assert scan.table.complete.all() and scan.ledger.sectors_received == [len(numbers)] * 4


def test_indexing_holds_about_200_bytes_a_frame_at_its_peak_and_keeps_68(monkeypatch):
    """The index of a 4096 x 4096 scan must fit a workstation: ~3.4 GB at the peak, 1.1 GB
    kept. Headers are made up here (a real scan of this many frames takes 170 GB of disk), in
    4 files per module, records in frame order as the receivers write them."""
    shape, fpp, files_per_module = (512, 256), 2, 4
    n = shape[0] * shape[1] * fpp
    per_file = n // files_per_module
    files = [Path(raw_file_name(3, m, file_index=f)) for m in range(4) for f in range(files_per_module)]

    def made_up_headers(paths, counts):
        headers = []
        for f in range(len(paths)):
            index = np.arange((f % files_per_module) * per_file, (f % files_per_module + 1) * per_file)
            h = np.zeros(per_file, HEADER_DTYPE)
            h["scan_number"], h["frame_number"] = 3, index
            h["scan_width"], h["scan_height"] = shape[1], shape[0]
            h["x"], h["y"] = index // fpp % shape[1], index // fpp // shape[1]
            headers.append(h)
        return headers

    monkeypatch.setattr(raw_scan, "discover_raw_files", lambda paths: files)
    monkeypatch.setattr(raw_scan, "inspect_raw_file", lambda p: RawFileLayout(p, module_of_path(p), per_file, 0))
    monkeypatch.setattr(raw_scan, "read_headers", made_up_headers)
    tracemalloc.start()
    try:
        scan = RawScan(files)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert scan.frames_per_position == fpp and scan.table.complete.all()
    assert np.array_equal(scan.table.slots, np.arange(n))
    assert peak / n < 210, f"{peak / n:.0f} bytes a frame at the peak"
    assert kept / n < 70, f"{kept / n:.0f} bytes a frame kept"
