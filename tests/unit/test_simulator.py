"""Specification of the 4D Camera detector simulator (stemstream.sources.simulator)."""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest

from stemstream.formats.raw import (
    RECORD_BYTES,
    RECORD_DTYPE,
    SECTOR_ROWS,
    make_sector_records,
    module_of_path,
)
from stemstream.formats.raw_pread import read_headers
from stemstream.sources.simulator import DetectorSimulator, SimulationConfig, simulate_to_directory

FRAME_PIXELS = 576 * 576
BACKGROUND_THRESHOLD = 28  # ADU, what stempy's threshold fit gives on real 4D Camera data


def quiet(**overrides) -> SimulationConfig:
    """A config with no X-rays, hot or dead pixels, unless overridden."""
    settings = dict(scan_shape=(4, 4), xray_rate=0.0, n_hot_pixels=0, n_dead_pixels=0)
    settings.update(overrides)
    return SimulationConfig(**settings)


def rows_cols(events: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = events.astype(np.int64)
    return flat // 576, flat % 576


# --- batch contents and determinism ---------------------------------------------------------------


def test_batch_has_documented_shapes_and_dtypes():
    sim = DetectorSimulator(SimulationConfig(scan_shape=(2, 3), frames_per_position=2, first_frame_number=100))
    batch = sim.batch(0, sim.n_frames)
    assert sim.n_frames == 12
    assert batch.frames.shape == (12, 576, 576) and batch.frames.dtype == np.uint16
    assert batch.frame_numbers.dtype == np.uint32
    assert batch.frame_numbers.tolist() == list(range(100, 112))
    assert batch.positions.dtype == np.int64
    assert batch.positions.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # consecutive frames per position
    assert len(batch.true_events) == 12


def test_true_events_are_sorted_unique_uint32_pixel_indices():
    batch = DetectorSimulator(SimulationConfig(scan_shape=(2, 2), dose=0.01)).batch(0, 4)
    for events in batch.true_events:
        assert events.dtype == np.uint32
        assert len(events) > 0
        assert np.all(np.diff(events.astype(np.int64)) > 0)
        assert events.max() < FRAME_PIXELS


def test_same_seed_gives_the_same_frames_and_other_seed_differs():
    a = DetectorSimulator(SimulationConfig(scan_shape=(2, 2), seed=7)).batch(0, 4)
    b = DetectorSimulator(SimulationConfig(scan_shape=(2, 2), seed=7)).batch(0, 4)
    c = DetectorSimulator(SimulationConfig(scan_shape=(2, 2), seed=8)).batch(0, 4)
    assert np.array_equal(a.frames, b.frames)
    assert all(np.array_equal(x, y) for x, y in zip(a.true_events, b.true_events))
    assert not np.array_equal(a.frames, c.frames)


def test_frames_do_not_depend_on_batching():
    sim = DetectorSimulator(SimulationConfig(scan_shape=(4, 4)))
    whole = sim.batch(0, 10)
    part = sim.batch(5, 5)
    assert np.array_equal(whole.frames[5:], part.frames)
    assert all(np.array_equal(x, y) for x, y in zip(whole.true_events[5:], part.true_events))
    by_three = list(sim.batches(batch_size=3))
    assert [len(b) for b in by_three] == [3, 3, 3, 3, 3, 1]
    assert np.array_equal(np.concatenate([b.frames for b in by_three])[:10], whole.frames)


def test_batch_fills_a_given_output_buffer():
    sim = DetectorSimulator(SimulationConfig(scan_shape=(2, 2)))
    out = np.zeros((3, 576, 576), np.uint16)
    batch = sim.batch(1, 3, out=out)
    assert batch.frames is out
    assert np.array_equal(out, sim.batch(1, 3).frames)


def test_batch_outside_the_scan_raises():
    sim = DetectorSimulator(SimulationConfig(scan_shape=(2, 2)))
    with pytest.raises(ValueError, match="outside the scan"):
        sim.batch(2, 3)


# --- detector physics ------------------------------------------------------------------------------


def test_pedestal_near_20_adu_with_read_noise_near_2_adu_at_zero_dose():
    frames = DetectorSimulator(quiet(dose=0.0)).batch(0, 4).frames.astype(np.float64)
    assert abs(frames.mean() - 20.0) < 0.05
    assert abs(frames.std() - 2.0) < 0.1


def test_noise_differs_between_frames():
    frames = DetectorSimulator(quiet(dose=0.0)).batch(0, 2).frames.astype(np.int32)
    assert np.mean(frames[0] != frames[1]) > 0.5


def test_mean_electrons_per_pixel_per_frame_matches_the_dose():
    dose = 0.004
    batch = DetectorSimulator(quiet(dose=dose)).batch(0, 16)
    assert abs(batch.electron_counts.sum() / (16 * FRAME_PIXELS) - dose) < 0.02 * dose
    # Two electrons on one pixel are one true event: a few percent at most at this dose.
    unique = sum(len(e) for e in batch.true_events)
    assert 0.93 * batch.electron_counts.sum() < unique <= batch.electron_counts.sum()


def test_landing_pixel_is_the_strict_local_maximum_for_isolated_electrons():
    batch = DetectorSimulator(quiet(dose=0.001)).batch(0, 8)
    maxima = isolated = 0
    for frame, events in zip(batch.frames.astype(np.int32), batch.true_events):
        rows, cols = rows_cols(events)
        for r, c in zip(rows, cols):
            near = (np.abs(rows - r) <= 2) & (np.abs(cols - c) <= 2)
            if near.sum() > 1 or not (0 < r < 575 and 0 < c < 575):
                continue
            window = frame[r - 1 : r + 2, c - 1 : c + 2].ravel()
            isolated += 1
            maxima += window[4] > np.delete(window, 4).max()
    assert isolated > 500
    assert maxima / isolated > 0.98


def test_electron_charge_is_shared_so_neighbours_sometimes_pass_the_background_threshold():
    batch = DetectorSimulator(quiet(dose=0.001)).batch(0, 4)
    above = total = 0
    for frame, events in zip(batch.frames.astype(np.int32), batch.true_events):
        rows, cols = rows_cols(events)
        inside = (rows > 0) & (rows < 575) & (cols > 0) & (cols < 575)
        for r, c in zip(rows[inside], cols[inside]):
            neighbours = np.delete(frame[r - 1 : r + 2, c - 1 : c + 2].ravel(), 4)
            above += (neighbours > BACKGROUND_THRESHOLD).sum()
            total += 8
    assert 0.01 < above / total < 0.3


def test_hot_pixels_are_constant_and_dead_pixels_zero():
    sim = DetectorSimulator(SimulationConfig(scan_shape=(2, 2), n_hot_pixels=5, n_dead_pixels=5, dose=0.01))
    frames = sim.batch(0, 4).frames.reshape(4, -1)
    assert len(sim.hot_pixels) == 5 and len(sim.dead_pixels) == 5
    hot = frames[:, sim.hot_pixels]
    assert np.all(hot == hot[0]) and np.all(hot >= 200)
    assert np.all(frames[:, sim.dead_pixels] == 0)


def test_xrays_deposit_thousands_of_adu_on_single_pixels():
    batch = DetectorSimulator(quiet(dose=0.0, xray_rate=2.0)).batch(0, 16)
    hits = (batch.frames >= 2000).sum(axis=(1, 2))
    assert 10 <= hits.sum() <= 64  # ~32 expected
    assert batch.frames.max() <= 10000 + 40


def test_truth_holds_only_electrons_not_hot_pixels_or_xrays():
    batch = DetectorSimulator(SimulationConfig(scan_shape=(2, 2), dose=0.0, xray_rate=5.0, n_hot_pixels=5)).batch(0, 4)
    assert (batch.frames > 150).any()
    assert all(len(events) == 0 for events in batch.true_events)


def test_stempy_counting_recovers_the_true_electrons_at_low_dose():
    image = pytest.importorskip("stempy.image")
    sim = DetectorSimulator(SimulationConfig(scan_shape=(2, 2), dose=0.0005))
    batch = sim.batch(0, 4)
    found = true = correct = 0
    for frame, events in zip(batch.frames, batch.true_events):
        counted = image.electron_count_frame(frame, background_threshold=BACKGROUND_THRESHOLD, xray_threshold=2000)
        counted = np.setdiff1d(counted.data[0, 0], sim.hot_pixels)  # a hot pixel looks like an electron
        found += len(counted)
        true += len(events)
        correct += np.intersect1d(counted, events).size
    assert correct / true > 0.95
    assert correct / found > 0.95


# --- specimen --------------------------------------------------------------------------------------


def test_pattern_centre_of_mass_follows_the_beam_shift_across_the_scan():
    sim = DetectorSimulator(quiet(scan_shape=(8, 8), dose=0.01))
    batch = sim.batch(0, 64)
    com = []
    for events in batch.true_events:
        rows, cols = rows_cols(events)
        in_bf = (rows - 288) ** 2 + (cols - 288) ** 2 < 85**2
        com.append((rows[in_bf].mean(), cols[in_bf].mean()))
    com = np.array(com) - 288
    shift = sim.specimen.beam_shift(batch.positions)
    assert com.std(axis=0).min() > 1.0  # px: the disk moves
    for axis in (0, 1):
        assert np.corrcoef(com[:, axis], shift[:, axis])[0, 1] > 0.7


def test_virtual_bright_field_shows_the_grains_dark():
    sim = DetectorSimulator(quiet(scan_shape=(8, 8), dose=0.004))
    batch = sim.batch(0, 64)
    bright_field = np.array(
        [np.sum(((rows - 288) ** 2 + (cols - 288) ** 2) < 80**2) for rows, cols in map(rows_cols, batch.true_events)]
    )
    thickness, _ = sim.specimen.grain_map(batch.positions)
    assert (bright_field.max() - bright_field.min()) / bright_field.max() > 0.3
    assert np.corrcoef(bright_field, thickness)[0, 1] < -0.8


def test_bragg_disks_appear_only_over_grains():
    sim = DetectorSimulator(quiet(scan_shape=(8, 8), dose=0.004))
    batch = sim.batch(0, 64)
    dark_field = np.array(
        [np.sum(((rows - 288) ** 2 + (cols - 288) ** 2) > 100**2) for rows, cols in map(rows_cols, batch.true_events)]
    )
    thickness, _ = sim.specimen.grain_map(batch.positions)
    assert np.corrcoef(dark_field, thickness)[0, 1] > 0.8


# --- dropped sectors -------------------------------------------------------------------------------


def test_no_sector_dropped_by_default():
    sim = DetectorSimulator(SimulationConfig(scan_shape=(4, 4)))
    assert not sim.dropped_sectors(sim.batch(0, 16)).any()


def test_sectors_dropped_at_the_configured_probability_deterministically():
    config = quiet(scan_shape=(16, 16), dose=0.0, drop_sector_probability=0.2)
    sim = DetectorSimulator(config)
    batch = sim.batch(0, 256)
    dropped = sim.dropped_sectors(batch)
    assert dropped.shape == (256, 4)
    assert abs(dropped.mean() - 0.2) < 0.04
    assert np.array_equal(dropped[100:110], DetectorSimulator(config).dropped_sectors(sim.batch(100, 10)))


# --- one module's sectors --------------------------------------------------------------------------


def busy(**overrides) -> SimulationConfig:
    """A config with everything that can go wrong at a sector boundary: grains (Bragg disks partly
    off the frame), a dose that puts electrons on every boundary row, X-rays, hot and dead pixels."""
    settings = dict(
        scan_shape=(8, 8), dose=0.01, xray_rate=3.0, n_hot_pixels=400, n_dead_pixels=400, seed=5, frames_per_position=2
    )
    settings.update(overrides)
    return SimulationConfig(**settings)


def test_sectors_equal_the_rows_of_whole_frames_bit_for_bit_for_every_module():
    sim = DetectorSimulator(busy())
    batch = sim.batch(40, 24)  # positions 20..31: over a grain for this seed
    rows = np.concatenate([rows_cols(events)[0] for events in batch.true_events])
    for boundary in (143, 144, 287, 288, 431, 432):  # electrons on both sides of every boundary
        assert (rows == boundary).sum() >= 3
    patterns = sim.specimen.patterns(batch.positions)
    extent = patterns.centres + np.array([-1, 1])[:, None, None, None] * patterns.radii[..., None]
    off_frame = ((extent < 0) | (extent > 576)).any(axis=(0, 3)) & (patterns.radii > 0) & (patterns.probabilities > 0)
    assert off_frame.any()  # Bragg disks partly off the frame: their electrons are drawn again
    for module in range(4):
        sectors = sim.sector_batch(40, 24, module)
        assert sectors.module == module
        assert sectors.sectors.shape == (24, SECTOR_ROWS, 576) and sectors.sectors.dtype == np.uint16
        assert np.array_equal(sectors.sectors, batch.frames[:, module * SECTOR_ROWS : (module + 1) * SECTOR_ROWS])
        assert np.array_equal(sectors.electron_counts, batch.electron_counts)
        assert sectors.frame_numbers.dtype == np.uint32 and sectors.positions.dtype == np.int64
        assert np.array_equal(sectors.frame_numbers, batch.frame_numbers)
        assert np.array_equal(sectors.positions, batch.positions)
    flat = batch.frames.reshape(24, -1)
    assert np.all(flat[:, sim.dead_pixels] == 0) and np.all(flat[:, sim.hot_pixels] == sim.hot_values)
    assert {int(p) // (SECTOR_ROWS * 576) for p in sim.hot_pixels} == {0, 1, 2, 3}
    assert (batch.frames >= 2000).sum() >= 30  # X-rays (~72 expected)


def test_charge_shared_across_a_sector_boundary_appears_in_the_neighbouring_sector():
    # No read noise: a pixel above the pedestal got charge from an electron on it or next to it.
    sim = DetectorSimulator(quiet(scan_shape=(4, 4), dose=0.03, read_noise=0.0, charge_cloud_sigma=0.4))
    batch = sim.batch(0, 16)
    below = sim.sector_batch(0, 16, 1).sectors[:, 0]  # frame row 144
    above = sim.sector_batch(0, 16, 0).sectors[:, -1]  # frame row 143
    from_143 = from_144 = 0
    for i, events in enumerate(batch.true_events):
        rows, cols = rows_cols(events)
        for c in cols[rows == 143]:
            # charge on row 144 next to an electron of sector 0, and none of sector 1 near
            if 0 < c < 575 and not np.any((rows >= 144) & (rows <= 145) & (np.abs(cols - c) <= 2)):
                from_143 += below[i, c - 1 : c + 2].max() > 20
        for c in cols[rows == 144]:
            if 0 < c < 575 and not np.any((rows >= 142) & (rows <= 143) & (np.abs(cols - c) <= 2)):
                from_144 += above[i, c - 1 : c + 2].max() > 20
    assert from_143 >= 20 and from_144 >= 20  # ~70 each
    assert np.array_equal(below, batch.frames[:, 144]) and np.array_equal(above, batch.frames[:, 143])


def test_sectors_are_deterministic_and_do_not_depend_on_batching():
    config = busy(scan_shape=(4, 4), frames_per_position=1)
    sim = DetectorSimulator(config)
    for module in range(4):
        whole = sim.sector_batch(0, 12, module).sectors
        assert np.array_equal(sim.sector_batch(5, 4, module).sectors, whole[5:9])
        assert np.array_equal(DetectorSimulator(config).sector_batch(5, 4, module).sectors, whole[5:9])
        restored = pickle.loads(pickle.dumps(sim))
        assert np.array_equal(restored.sector_batch(5, 4, module).sectors, whole[5:9])
    other = DetectorSimulator(busy(scan_shape=(4, 4), frames_per_position=1, seed=6))
    assert not np.array_equal(other.sector_batch(0, 12, 2).sectors, whole)


def test_frames_and_sectors_across_blocks_of_specimen_patterns():
    # 1056 positions: frames 1020..1027 need the patterns of two blocks of 1024 positions.
    sim = DetectorSimulator(SimulationConfig(scan_shape=(33, 32), dose=0.004))
    whole = sim.batch(1020, 8).frames
    fresh = DetectorSimulator(SimulationConfig(scan_shape=(33, 32), dose=0.004))
    assert np.array_equal(fresh.batch(1024, 4).frames, whole[4:])
    assert np.array_equal(fresh.batch(1020, 4).frames, whole[:4])
    assert np.array_equal(sim.sector_batch(1018, 8, 2).sectors[2:], whole[:6, 288:432])


def test_sector_batch_drop_flags_are_those_of_dropped_sectors():
    sim = DetectorSimulator(busy(scan_shape=(4, 8), dose=0.0, frames_per_position=1, drop_sector_probability=0.3))
    dropped = sim.dropped_sectors(sim.batch(0, 32))
    assert 0 < dropped.sum() < dropped.size
    for module in range(4):
        flags = sim.sector_batch(0, 32, module).dropped
        assert flags.dtype == bool and np.array_equal(flags, dropped[:, module])
        assert np.array_equal(sim.sector_batch(10, 7, module).dropped, dropped[10:17, module])
    assert not DetectorSimulator(busy(scan_shape=(2, 2))).sector_batch(0, 8, 1).dropped.any()


def test_sector_batch_fills_a_given_output_buffer_and_checks_its_arguments():
    sim = DetectorSimulator(SimulationConfig(scan_shape=(2, 2)))
    out = np.zeros((3, SECTOR_ROWS, 576), np.uint16)
    sectors = sim.sector_batch(1, 3, 3, out=out)
    assert sectors.sectors is out
    assert np.array_equal(out, sim.batch(1, 3).frames[:, 432:])
    assert len(sim.sector_batch(2, 0, 0)) == 0
    with pytest.raises(ValueError, match="out must be"):
        sim.sector_batch(0, 2, 0, out=np.zeros((2, 576, 576), np.uint16))
    with pytest.raises(ValueError, match="module"):
        sim.sector_batch(0, 2, 4)
    with pytest.raises(ValueError, match="outside the scan"):
        sim.sector_batch(3, 2, 0)
    with pytest.raises(ValueError, match="module"):
        sim.records(0, 2, -1)
    buffer = np.zeros(5, RECORD_DTYPE)
    records = sim.records(1, 3, 2, out=buffer)
    assert len(records) == 3 and np.shares_memory(records, buffer)
    assert records.tobytes() == sim.records(1, 3, 2).tobytes()
    with pytest.raises(ValueError, match="out must be"):
        sim.records(0, 3, 0, out=np.zeros(2, RECORD_DTYPE))


def test_records_are_what_the_receiver_of_the_module_writes(tmp_path):
    config = busy(scan_shape=(3, 5), scan_number=17, first_frame_number=500, drop_sector_probability=0.25)
    sim = DetectorSimulator(config)
    batch = sim.batch(0, 30)
    dropped = sim.dropped_sectors(batch)
    summary = simulate_to_directory(tmp_path, config, records_per_file=1000)
    for module in range(4):
        records = sim.records(0, 30, module)
        keep = ~dropped[:, module]
        assert records.dtype == RECORD_DTYPE and len(records) == keep.sum()
        header = records["header"]
        assert np.all(header["scan_number"] == 17)
        assert np.all(header["scan_width"] == 5) and np.all(header["scan_height"] == 3)
        assert header["frame_number"].tolist() == batch.frame_numbers[keep].tolist()
        assert header["x"].tolist() == (batch.positions[keep] % 5).tolist()
        assert header["y"].tolist() == (batch.positions[keep] // 5).tolist()
        assert np.array_equal(records["data"], batch.frames[keep, module * SECTOR_ROWS : (module + 1) * SECTOR_ROWS])
        expected = make_sector_records(17, batch.frame_numbers[keep], (3, 5), batch.positions[keep], batch.frames[keep], module)
        assert records.tobytes() == expected.tobytes()
        (path,) = [p for p in summary.paths if module_of_path(p) == module]
        assert path.read_bytes() == records.tobytes()
        part = sim.records(7, 11, module)
        assert part.tobytes() == records[(header["frame_number"] >= 507) & (header["frame_number"] < 518)].tobytes()


def test_records_of_a_4096_x_4096_scan_with_3_frames_per_position_carry_their_positions():
    """The largest scans the 4D Camera takes: flat positions past 65,535 (uint16), frame numbers
    past 65,535 x 3, the last position (4095, 4095); each record is its frame's sector."""
    shape, fpp = (4096, 4096), 3
    sim = DetectorSimulator(SimulationConfig(scan_shape=shape, frames_per_position=fpp, first_frame_number=7))
    for start in (3 * 65_535, sim.n_frames - 4):  # across position 65,536, and the scan's last frames
        whole = sim.batch(start, 4)
        for module in range(4):
            records = sim.records(start, 4, module)
            header = records["header"]
            assert np.array_equal(records["data"], whole.frames[:, module * SECTOR_ROWS : (module + 1) * SECTOR_ROWS])
            positions = np.arange(start, start + 4) // fpp
            assert header["frame_number"].tolist() == (np.arange(start, start + 4) + 7).tolist()
            assert header["x"].tolist() == (positions % 4096).tolist()
            assert header["y"].tolist() == (positions // 4096).tolist()
            assert whole.positions.tolist() == positions.tolist()
    assert header["y"][-1] == header["x"][-1] == 4095


def test_records_of_a_range_whose_sectors_are_all_dropped_are_empty():
    sim = DetectorSimulator(SimulationConfig(scan_shape=(2, 2), drop_sector_probability=1.0))
    records = sim.records(0, 4, 2)
    assert records.dtype == RECORD_DTYPE and len(records) == 0
    assert len(sim.records(1, 0, 0)) == 0


# --- files -----------------------------------------------------------------------------------------


def test_written_files_have_receiver_names_and_whole_records(tmp_path):
    config = SimulationConfig(scan_shape=(4, 4), scan_number=42)
    summary = simulate_to_directory(tmp_path, config, records_per_file=5)
    assert len(summary.paths) == 4 * 4  # 16 records per module, 5 per file
    for path in summary.paths:
        assert re.fullmatch(r"data_scan0000000042_module[0-3]_dst0_file[0-3]\.data", path.name)
        assert path.stat().st_size % RECORD_BYTES == 0
    assert summary.n_frames == 16 and summary.n_sectors_written == 64 and summary.n_sectors_dropped == 0


def test_written_headers_and_pixels_match_the_simulated_frames(tmp_path):
    config = SimulationConfig(scan_shape=(3, 5), frames_per_position=2, scan_number=9, first_frame_number=1000)
    summary = simulate_to_directory(tmp_path, config)
    batch = DetectorSimulator(config).batch(0, 30)
    for path in summary.paths:
        module = module_of_path(path)
        headers = read_headers([path], [30])[0]
        assert np.all(headers["scan_number"] == 9)
        assert np.all(headers["scan_width"] == 5) and np.all(headers["scan_height"] == 3)
        assert headers["frame_number"].tolist() == batch.frame_numbers.tolist()
        assert (headers["y"].astype(np.int64) * 5 + headers["x"]).tolist() == batch.positions.tolist()
        pixels = np.fromfile(path, np.uint8).reshape(30, RECORD_BYTES)[:, 16:].copy().view("<u2")
        expected = batch.frames[:, module * SECTOR_ROWS : (module + 1) * SECTOR_ROWS].reshape(30, -1)
        assert np.array_equal(pixels, expected)


def test_dropped_sectors_are_not_written(tmp_path):
    config = SimulationConfig(scan_shape=(4, 4), drop_sector_probability=0.3, seed=5)
    summary = simulate_to_directory(tmp_path, config)
    sim = DetectorSimulator(config)
    batch = sim.batch(0, 16)
    dropped = sim.dropped_sectors(batch)
    assert summary.n_sectors_dropped == dropped.sum() > 0
    assert summary.n_sectors_written == 64 - dropped.sum()
    for path in summary.paths:
        module = module_of_path(path)
        headers = read_headers([path], [path.stat().st_size // RECORD_BYTES])[0]
        assert headers["frame_number"].tolist() == batch.frame_numbers[~dropped[:, module]].tolist()


def test_stempy_reads_the_written_scan(tmp_path):
    io = pytest.importorskip("stempy.io")
    config = SimulationConfig(scan_shape=(3, 5), frames_per_position=2)
    summary = simulate_to_directory(tmp_path, config)
    reader = io.reader([str(p) for p in summary.paths], version=io.FileVersion.VERSION5, backend="multi-pass")
    assert tuple(reader.scan_shape) == (3, 5)
    assert reader.num_frames_per_scan == 2
    frames = DetectorSimulator(config).batch(12, 2).frames  # position 6: (y, x) = (1, 1)
    read = [block.data for block in reader.read_frames(6)]
    assert any(np.array_equal(read[0], frame) for frame in frames)


def test_status_files_have_receiver_keys_and_reach_100(tmp_path):
    summary = simulate_to_directory(tmp_path, SimulationConfig(scan_shape=(2, 2), scan_number=3))
    assert sorted(p.name for p in summary.status_paths) == [f"4dstem_rec_status_{m}_scan_3.json" for m in range(4)]
    for path in summary.status_paths:
        status = json.loads(path.read_text())
        assert set(status) == {"time", "last_scan_number", "progress", "UUID"}
        assert status["progress"] == 100 and status["last_scan_number"] == 3


def test_progress_reports_frames_done_after_each_batch(tmp_path):
    done: list[int] = []
    simulate_to_directory(tmp_path, SimulationConfig(scan_shape=(10, 10)), progress=done.append)
    assert done == [32, 64, 96, 100]


# --- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(scan_shape=(0, 4)), "scan_shape"),
        (dict(scan_shape=(4, -1)), "scan_shape"),
        (dict(scan_shape=(4,)), "scan_shape"),
        (dict(dose=-0.1), "dose"),
        (dict(dose=float("nan")), "dose"),
        (dict(dose=2.0), "dose"),
        (dict(frames_per_position=0), "frames_per_position"),
        (dict(seed=1.5), "seed"),
        (dict(read_noise=-1.0), "read_noise"),
        (dict(xray_rate=-1.0), "xray_rate"),
        (dict(xray_adu=(5000.0, 100.0)), "xray_adu"),
        (dict(drop_sector_probability=1.5), "drop_sector_probability"),
        (dict(n_hot_pixels=-1), "n_hot_pixels"),
        (dict(first_frame_number=2**32 - 4), "frame numbers"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(overrides, message):
    settings = dict(scan_shape=(4, 4))
    settings.update(overrides)
    with pytest.raises(ValueError, match=message):
        SimulationConfig(**settings)


def test_disk_area_within_rows_and_cols_is_exact_so_band_draws_keep_the_dose():
    # Electrons are drawn per (disk, band of rows); the bands' Poisson means come from these areas.
    from stemstream.sources.electrons import BAND_EDGES, disk_rect_area

    fine = (np.arange(4000) + 0.5) / 4000
    for cy, cx, radius in [(288.0, 288.0, 72.0), (150.2, 560.3, 72.0), (-30.0, 20.0, 72.0), (143.5, 600.0, 40.0)]:
        total = disk_rect_area(cy, cx, radius, 0.0, 576.0, 0.0, 576.0)
        bands = sum(disk_rect_area(cy, cx, radius, float(a), float(b), 0.0, 576.0) for a, b in zip(BAND_EDGES[:-1], BAND_EDGES[1:]))
        assert abs(bands - total) < 1e-9 * max(total, 1.0)
        # Midpoint rule over rows, exact chord clipping over cols.
        y = -radius + 2 * radius * fine
        half = np.sqrt(np.maximum(radius**2 - y**2, 0.0))
        rows = cy + y
        width = np.clip(np.minimum(cx + half, 576.0) - np.maximum(cx - half, 0.0), 0.0, None)
        numeric = (width * ((rows >= 0) & (rows < 576))).sum() * 2 * radius / len(fine)
        assert abs(total - numeric) < 1e-3 * np.pi * radius**2
