"""Offline counting from raw files (compiled reads in the counting threads) gives what counting the
same frames read by Python gives, with thresholds calibrated from the same sample."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from stemstream.counting.kernel import ElectronCounter
from stemstream.counting.offline import CountOptions, calibrate_from_scan, count_raw_scan
from stemstream.counting.thresholds import PixelHistogram, draw_sample_weights, thresholds_from_histogram
from stemstream.formats.raw import FRAME_SHAPE, RawModuleWriter, make_sector_records
from stemstream.formats.sparse_h5 import read_counted
from stemstream.formats.sparse_h5.metadata import read_metadata
from stemstream.formats.raw_scan import RawScan
from stemstream.sources.simulator import SimulationConfig, simulate_to_directory


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw")
    # Dropped sectors (zero-filled frames), several files per module, 3 frames per position.
    config = SimulationConfig(scan_shape=(5, 6), frames_per_position=3, dose=0.003, seed=7, drop_sector_probability=0.1)
    simulate_to_directory(out, config, records_per_file=37)
    return out


def frames_read_by_python(raw_dir) -> tuple[RawScan, np.ndarray]:
    scan = RawScan([raw_dir])
    frames = scan.read_frames(np.arange(scan.n_frames))
    return scan, frames


@pytest.mark.parametrize("corrections", ["none", "dark", "dark+gain", "row-dark"])
def test_counted_file_equals_counting_the_frames_in_memory(raw_dir, tmp_path, corrections):
    rng = np.random.default_rng(0)
    dark = gain = None
    if "dark" in corrections and corrections != "row-dark":
        dark = rng.normal(1.0, 1.0, FRAME_SHAPE).astype(np.float32)
        np.save(tmp_path / "dark.npy", dark)
    if "gain" in corrections:
        gain = rng.uniform(0.8, 1.2, FRAME_SHAPE).astype(np.float32)
        np.save(tmp_path / "gain.npy", gain)
    options = CountOptions(
        background=28.0, xray=1500.0, batch_size=7, row_dark=corrections == "row-dark",
        dark=tmp_path / "dark.npy" if dark is not None else None,
        gain=tmp_path / "gain.npy" if gain is not None else None,
    )
    if options.row_dark:  # row-dark needs the calibrated pedestal: calibrate, then fix
        options = CountOptions(row_dark=True, batch_size=7)
    result = count_raw_scan([raw_dir], tmp_path / "out.h5", options)

    scan, frames = frames_read_by_python(raw_dir)
    assert sum(scan.ledger.sectors_missing) > 0  # the zero-filled path is exercised
    t = result.thresholds
    counter = ElectronCounter(t.background, t.xray, FRAME_SHAPE, dark, gain,
                              row_dark=options.row_dark, optimized_mean=t.optimized_mean)
    expected = counter.count(frames)
    counted = read_counted(tmp_path / "out.h5")
    flat = counted.frames.reshape(-1)
    for i, slot in enumerate(scan.table.slots):
        assert np.array_equal(flat[slot], expected.frame(i))
    assert result.n_events == len(expected.events) > 0


def test_calibration_equals_the_histogram_of_the_sample_read_by_python(raw_dir):
    options = CountOptions(samples=50, calibration_frames=40)
    scan, frames = frames_read_by_python(raw_dir)
    complete = np.flatnonzero(scan.table.complete)[:40]
    weights = draw_sample_weights(len(complete), 50, options.seed)
    hist = PixelHistogram()
    for i, w in zip(complete, weights):
        if w:
            hist.add(frames[i], weight=int(w))
    assert calibrate_from_scan(scan, options, None) == thresholds_from_histogram(hist)


def test_a_file_truncated_after_indexing_is_an_error_and_leaves_no_output(raw_dir, tmp_path):
    import shutil

    copy = tmp_path / "raw"
    shutil.copytree(raw_dir, copy)
    victim = sorted(copy.glob("*module2*.data"))[0]
    scan = RawScan([copy])
    with victim.open("r+b") as f:
        f.truncate(1000)
    from stemstream.counting.from_files import RawFrameWorker

    with pytest.raises(OSError, match="truncated"):
        RawFrameWorker(scan).count(ElectronCounter(28.0, 1500.0), np.arange(scan.n_frames))
    scan.close()
    # Through count_raw_scan, the same failure discards the partial output.
    def truncate_later(done, total):
        with victim.open("r+b") as f:
            f.truncate(1000)

    shutil.copytree(raw_dir, tmp_path / "raw2")
    victim = sorted((tmp_path / "raw2").glob("*module2*.data"))[-1]
    with pytest.raises(OSError):
        count_raw_scan([tmp_path / "raw2"], tmp_path / "out.h5", CountOptions(background=28.0, xray=1500.0, batch_size=4),
                       progress=truncate_later)
    assert not (tmp_path / "out.h5").exists()
    assert not list(tmp_path.glob("out.h5*"))


def test_a_few_frames_of_a_1024_x_1024_scan_with_2_frames_per_position_count_into_their_slots(tmp_path):
    """A scan of the paper's largest size: flat positions and slots pass 65,535 (uint16). Each
    frame gets one electron at a pixel of its own, so the counted file shows where each went."""
    shape, fpp = (1024, 1024), 2
    n_positions = shape[0] * shape[1]
    positions = np.array([0, 65_535, 65_536, 65_536, 700_001, n_positions - 1, n_positions - 1])
    numbers = np.array([0, 2 * 65_535 + 1, 2 * 65_536, 2 * 65_536 + 1, 1_400_002, 2 * n_positions - 2,
                        2 * n_positions - 1], np.uint32)
    pixels = 1000 + 577 * np.arange(len(numbers))  # one electron per frame, each at another pixel
    frames = np.full((len(numbers), *FRAME_SHAPE), 20, np.uint16)
    frames.reshape(len(numbers), -1)[np.arange(len(numbers)), pixels] = 300
    (tmp_path / "raw").mkdir()
    for m in range(4):
        with RawModuleWriter(tmp_path / "raw", 4, m, records_per_file=3) as writer:
            writer.write(make_sector_records(4, numbers[::-1], shape, positions[::-1], frames[::-1], m))
    result = count_raw_scan([tmp_path / "raw"], tmp_path / "out.h5", CountOptions(background=28.0, xray=1000.0))
    assert result.frames_per_position == fpp and result.n_events == len(numbers)
    assert result.ledger.frames_expected == n_positions * fpp
    assert result.ledger.frames_complete == len(numbers)
    # Read back the frames written, not the file's 2 million entries (h5py takes ~15 us each).
    j = np.array([0, 0, 0, 1, 0, 0, 1])
    with h5py.File(tmp_path / "out.h5", "r") as f:
        entries = f["electron_events/frames"]
        assert entries.shape == (n_positions * fpp,)
        assert [entries[slot].tolist() for slot in positions * fpp + j] == [[p] for p in pixels]
        ledger = read_metadata(f["metadata"])["stemstream"]["ledger"]
    written = np.zeros((n_positions, fpp), bool)
    written[positions, j] = True
    assert np.array_equal(np.asarray(ledger["written"], bool).reshape(n_positions, fpp), written)
    assert ledger["events_written"] == len(numbers)
