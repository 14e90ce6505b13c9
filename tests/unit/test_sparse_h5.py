"""Counted sparse HDF5 (stempy format version 3): our writer/reader and stempy 3.6.0 both ways."""

from __future__ import annotations

import threading
import time

import h5py
import numpy as np
import pytest

from stemstream.formats.sparse_h5 import (
    ELECTRON_COUNTING_ATTRS,
    CountedFileError,
    SparseCountsWriter,
    read_counted,
)

stempy_io = pytest.importorskip("stempy.io")


def random_frames(rng, n_positions, fpp, frame_shape, mean_events=20, empty_every=7):
    """Object array (n_positions, fpp) of sorted unique uint32 pixel indices; some real empty frames."""
    n_pixels = frame_shape[0] * frame_shape[1]
    frames = np.empty((n_positions, fpp), dtype=object)
    for i in range(n_positions * fpp):
        k = 0 if i % empty_every == 3 else min(rng.poisson(mean_events), n_pixels)
        frames.flat[i] = np.sort(rng.choice(n_pixels, size=k, replace=False)).astype(np.uint32)
    return frames


def write_shuffled(path, frames, scan_shape, frame_shape, rng, batch=5, **kwargs):
    fpp = frames.shape[1]
    order = rng.permutation(frames.size)
    with SparseCountsWriter(path, scan_shape, frame_shape, frames_per_position=fpp, **kwargs) as w:
        for a in range(0, len(order), batch):
            slots = order[a : a + batch]
            w.write(slots, [frames.flat[s] for s in slots])
    return path


def assert_same_frames(got, expected):
    assert got.shape == expected.shape
    for g, e in zip(got.flat, expected.flat):
        assert g.dtype == np.uint32
        np.testing.assert_array_equal(g, e)


def test_round_trip_frames_in_shuffled_order(tmp_path):
    rng = np.random.default_rng(1)
    scan_shape, frame_shape = (4, 6), (16, 16)
    frames = random_frames(rng, 24, 2, frame_shape)
    # flush_frames=7: several flushes, each with scattered runs of slots
    path = write_shuffled(tmp_path / "scan.h5", frames, scan_shape, frame_shape, rng, flush_frames=7)

    scan = read_counted(path)
    assert scan.version == 3
    assert scan.scan_shape == scan_shape
    assert scan.frame_shape == frame_shape
    assert scan.frames_per_position == 2
    assert_same_frames(scan.frames, frames)
    lengths = np.vectorize(len)(frames)
    np.testing.assert_array_equal(scan.counts_image(), lengths.sum(axis=1).reshape(scan_shape))
    assert scan.total_events() == lengths.sum()


@pytest.mark.parametrize("events", [[], [5], [1, 2]], ids=["all-empty", "one-event", "two-events"])
def test_runs_of_equal_length_frames_are_written(tmp_path, events):
    # h5py's dataset[a:b] = object_array turns equal-length frames into a 2-D array and fails
    # ("Can't broadcast"); stempy 3.6.0's own save_electron_counts hits this for e.g. a dark
    # scan. The writer uses the low-level write instead.
    path = tmp_path / "equal.h5"
    with SparseCountsWriter(path, (2, 3), (4, 4)) as w:
        w.write(np.arange(6), [np.array(events, np.uint32)] * 6)
    scan = read_counted(path)
    expected = np.empty((6, 1), dtype=object)
    for i in range(6):
        expected[i, 0] = np.array(events, np.uint32)
    assert_same_frames(scan.frames, expected)
    assert stempy_io.load_electron_counts(str(path)).data.shape == (6, 1)


def test_unwritten_frames_read_empty_and_ledger_tells_them_apart(tmp_path):
    path = tmp_path / "partial_scan.h5"
    with SparseCountsWriter(path, (2, 3), (8, 8), frames_per_position=2) as w:
        # position 0 complete (one frame truly empty), position 1 incomplete, positions 2-5 missing
        w.write([0, 1, 2], [np.array([5, 9], np.uint32), np.array([], np.uint32), np.array([1], np.uint32)])
        assert (w.slots_written, w.events_written) == (3, 3)

    scan = read_counted(path)
    for slot in range(3, 12):
        frame = scan.frames.flat[slot]
        assert frame.dtype == np.uint32 and frame.size == 0
    ledger = scan.metadata["stemstream"]["ledger"]
    assert ledger["positions_complete"] == 1
    assert ledger["positions_incomplete"] == 1
    assert ledger["positions_missing"] == 4
    assert ledger["frames_written"] == 3 and ledger["frames_expected"] == 12
    expected_mask = np.zeros((6, 2), bool)
    expected_mask.flat[:3] = True
    np.testing.assert_array_equal(scan.written, expected_mask)


@pytest.mark.parametrize(
    ("scan_shape", "fpp", "frame_shape"),
    [((3, 5), 1, (12, 12)), ((3, 5), 2, (12, 12)), ((5, 3), 3, (10, 14))],
)
def test_stempy_reads_our_file(tmp_path, scan_shape, fpp, frame_shape):
    rng = np.random.default_rng(2)
    n_positions = scan_shape[0] * scan_shape[1]
    frames = random_frames(rng, n_positions, fpp, frame_shape)
    path = write_shuffled(tmp_path / "ours.h5", frames, scan_shape, frame_shape, rng)

    sa = stempy_io.load_electron_counts(str(path))
    assert sa.scan_shape == scan_shape
    assert sa.frame_shape == frame_shape
    assert sa.data.shape == (n_positions, fpp)
    assert_same_frames(sa.data, frames)
    # Orientation by stempy's own semantics: events summed over the frame axes, per (row, col)
    lengths = np.vectorize(len)(frames).sum(axis=1).reshape(scan_shape)
    np.testing.assert_array_equal(sa.sum(axis=(2, 3)), lengths)


def test_stempy_flyback_crop_removes_our_last_column(tmp_path):
    # keep_flyback=False drops the last scan column: only right if our Nx/Ny mean cols/rows
    rng = np.random.default_rng(3)
    scan_shape, frame_shape = (3, 5), (8, 8)
    frames = random_frames(rng, 15, 1, frame_shape)
    path = write_shuffled(tmp_path / "ours.h5", frames, scan_shape, frame_shape, rng)

    sa = stempy_io.load_electron_counts(str(path), keep_flyback=False)
    assert sa.scan_shape == (3, 4)
    kept = frames.reshape(3, 5, 1)[:, :4].reshape(12, 1)
    assert_same_frames(sa.data, kept)


def test_we_read_stempy_file(tmp_path):
    rng = np.random.default_rng(4)
    scan_shape, frame_shape = (3, 5), (10, 14)
    frames = random_frames(rng, 15, 2, frame_shape)
    thresholds = {name: float(i) for i, name in enumerate(ELECTRON_COUNTING_ATTRS)}
    thresholds["threshold_calculated"] = True
    thresholds["number_of_samples"] = 40
    sa = stempy_io.SparseArray(
        data=frames, scan_shape=scan_shape, frame_shape=frame_shape, metadata={"electron_counting": thresholds}
    )
    path = tmp_path / "stempy.h5"
    stempy_io.save_electron_counts(str(path), sa)

    scan = read_counted(path)
    assert (scan.version, scan.scan_shape, scan.frame_shape) == (3, scan_shape, frame_shape)
    assert_same_frames(scan.frames, frames)
    assert scan.metadata["electron_counting"] == thresholds
    assert scan.written is None  # stempy keeps no ledger


def test_metadata_round_trip_nested_groups_and_stempy_threshold_names(tmp_path):
    thresholds = {name: 1.5 * i for i, name in enumerate(ELECTRON_COUNTING_ATTRS)}
    thresholds["threshold_calculated"] = True
    thresholds["number_of_bins"] = 1000
    path = tmp_path / "meta.h5"
    with SparseCountsWriter(path, (2, 2), (4, 4)) as w:
        w.set_metadata("electron_counting", thresholds)
        w.set_metadata(
            "stemstream",
            {
                "timing": {"first_frame_utc": "2024-05-01T10:00:00+00:00", "seconds": 12.5},
                "scan_number": 17,
                "notes": None,  # skipped
                "dark": np.arange(6, dtype=np.float32).reshape(2, 3),
                "modules": ["a", "b"],
            },
        )
        w.set_metadata("stemstream/timing", {"frames_per_second": 87000.0})  # merges
        w.set_metadata("microscope/stage", {"x_um": -3.25})

    md = read_counted(path).metadata
    assert md["electron_counting"] == thresholds
    st = md["stemstream"]
    assert st["timing"] == {
        "first_frame_utc": "2024-05-01T10:00:00+00:00",
        "seconds": 12.5,
        "frames_per_second": 87000.0,
    }
    assert st["scan_number"] == 17
    assert "notes" not in st
    np.testing.assert_array_equal(st["dark"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert list(st["modules"]) == ["a", "b"]
    assert isinstance(st["software_version"], str) and st["software_version"]
    assert md["microscope"] == {"stage": {"x_um": -3.25}}
    # stempy sees the same thresholds under its names
    sa = stempy_io.load_electron_counts(str(path))
    assert {k: sa.metadata["electron_counting"][k] for k in thresholds} == thresholds


def test_crash_without_close_leaves_no_final_file_and_abort_removes_partial(tmp_path):
    path = tmp_path / "scan.h5"
    w = SparseCountsWriter(path, (2, 2), (4, 4), flush_frames=1)
    w.write([2], [np.array([1, 2], np.uint32)])
    assert not path.exists()
    assert w.tmp_path.exists() and w.tmp_path.name == "scan.h5.partial"
    w.abort()
    assert not w.tmp_path.exists() and not path.exists()


def test_the_partial_file_is_synced_to_disk_while_written_and_the_syncing_ends_with_the_writer(tmp_path, monkeypatch):
    """The file's pages go to disk every interval while the scan runs (the fsync before the rename
    then has little left); neither a close nor an abort leaves the syncing thread behind."""
    from stemstream.formats.sparse_h5 import writeback

    synced = []
    monkeypatch.setattr(writeback, "WRITEBACK_INTERVAL_S", 0.01)
    monkeypatch.setattr(writeback, "fsync_path", synced.append)
    for finish in ("close", "abort"):
        w = SparseCountsWriter(tmp_path / f"{finish}.h5", (2, 2), (4, 4), flush_frames=1)
        w.write([0], [np.array([1], np.uint32)])
        deadline = time.monotonic() + 30.0
        while w.tmp_path not in synced and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w.tmp_path in synced
        getattr(w, finish)()
        assert not any(t.name.startswith("writeback") and t.is_alive() for t in threading.enumerate())


def test_exception_in_with_block_aborts(tmp_path):
    path = tmp_path / "scan.h5"
    with pytest.raises(RuntimeError):
        with SparseCountsWriter(path, (2, 2), (4, 4)) as w:
            w.write([0], [np.array([1], np.uint32)])
            raise RuntimeError("acquisition failed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("slot", [-1, 8])
def test_slot_out_of_range_raises(tmp_path, slot):
    with SparseCountsWriter(tmp_path / "s.h5", (2, 2), (4, 4), frames_per_position=2) as w:
        with pytest.raises(ValueError, match="out of range"):
            w.write([0, slot], [np.array([1], np.uint32), np.array([2], np.uint32)])
        assert w.slots_written == 0  # the whole call was refused


def test_slot_written_twice_raises(tmp_path):
    with SparseCountsWriter(tmp_path / "s.h5", (2, 2), (4, 4)) as w:
        w.write([1], [np.array([1], np.uint32)])
        with pytest.raises(ValueError, match="already written"):
            w.write([1], [np.array([2], np.uint32)])
        with pytest.raises(ValueError, match="twice"):
            w.write([3, 3], [np.array([2], np.uint32), np.array([3], np.uint32)])
        assert w.slots_written == 1
    np.testing.assert_array_equal(read_counted(tmp_path / "s.h5").frames[1, 0], [1])


def test_unsorted_or_out_of_frame_events_raise(tmp_path):
    with SparseCountsWriter(tmp_path / "s.h5", (2, 2), (4, 4)) as w:
        with pytest.raises(ValueError, match="increasing"):
            w.write([0], [np.array([3, 1], np.uint32)])
        with pytest.raises(ValueError, match="outside"):
            w.write([0], [np.array([16], np.uint32)])
        # a step down between frames is fine
        w.write([0, 1], [np.array([7, 9]), np.array([2, 3])])


def test_write_flat_matches_write(tmp_path):
    rng = np.random.default_rng(5)
    frames = random_frames(rng, 12, 1, (8, 8))
    slots = rng.permutation(12)
    ev = [frames.flat[s] for s in slots]
    offsets = np.concatenate(([0], np.cumsum([len(e) for e in ev])))
    flat = np.concatenate(ev)
    with SparseCountsWriter(tmp_path / "f.h5", (3, 4), (8, 8), flush_frames=5) as w:
        w.write_flat(slots[:6], flat[: offsets[6]], offsets[:7])
        w.write_flat(slots[6:], flat, offsets[6:])  # offsets need not start at 0
        flat[:] = 0  # the writer copied; reusing the buffer must not change the file
    assert_same_frames(read_counted(tmp_path / "f.h5").frames, frames)


def test_existing_final_file_is_not_replaced_unless_asked(tmp_path):
    path = tmp_path / "s.h5"
    path.write_bytes(b"finished scan")
    with pytest.raises(FileExistsError):
        SparseCountsWriter(path, (1, 1), (4, 4))
    SparseCountsWriter(path, (1, 1), (4, 4), overwrite=True).close()
    assert read_counted(path).frames.shape == (1, 1)


def test_reads_version_2_like_stempy(tmp_path):
    path = tmp_path / "v2.h5"
    data = [[1, 2], [3], [4, 5], [6], [7]]
    positions = [2, 0, 2, 1, 2]  # position 2 has three frames, position 3 none
    with h5py.File(path, "w") as f:
        f.attrs["version"] = 2
        ds = f.create_dataset("electron_events/frames", (5,), dtype=h5py.vlen_dtype(np.uint32))
        for i, d in enumerate(data):
            ds[i] = np.array(d, np.uint32)
        ds.attrs["Nx"], ds.attrs["Ny"] = 8, 8
        sp = f.create_dataset("electron_events/scan_positions", data=np.array(positions))
        sp.attrs["Nx"], sp.attrs["Ny"] = 2, 2

    scan = read_counted(path)
    assert (scan.version, scan.scan_shape, scan.frames.shape) == (2, (2, 2), (4, 3))
    assert_same_frames(scan.frames, stempy_io.load_electron_counts(str(path)).data)


def test_reads_version_1_without_version_attr_like_stempy(tmp_path):
    path = tmp_path / "v1.h5"
    data = [[1, 1, 4, 9, 9, 9], [2], [], [3, 5]]  # repeats: a pixel hit in several frames
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("electron_events/frames", (4,), dtype=h5py.vlen_dtype(np.uint32))
        for i, d in enumerate(data):
            ds[i] = np.array(d, np.uint32)
        ds.attrs["Nx"], ds.attrs["Ny"] = 4, 4
        sp = f.create_dataset("electron_events/scan_positions", data=np.arange(4))
        sp.attrs["Nx"], sp.attrs["Ny"] = 2, 2

    scan = read_counted(path)
    assert scan.version == 1 and scan.frames.shape == (4, 3)
    assert_same_frames(scan.frames, stempy_io.load_electron_counts(str(path)).data)
    assert scan.total_events() == 9


def test_not_hdf5_file_raises_counted_file_error(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("not an HDF5 file\n")
    with pytest.raises(CountedFileError, match="notes.h5") as info:
        read_counted(path)
    assert "HDF5" in str(info.value)


def test_hdf5_without_electron_events_raises_counted_file_error(tmp_path):
    path = tmp_path / "raw.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("frames", data=np.zeros((2, 4, 4), np.uint16))
    with pytest.raises(CountedFileError, match=r"raw\.h5.*electron_events"):
        read_counted(path)


def test_missing_file_raises_counted_file_error(tmp_path):
    with pytest.raises(CountedFileError, match="nothing.h5.*does not exist"):
        read_counted(tmp_path / "nothing.h5")
