"""The Python API for counted scans (``stemstream.open``) against stempy 3.6.0's own reader, on
files stempy's ``save_electron_counts`` wrote and on ours, and its answers to bad input."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.sparse

import stemstream
from stemstream.formats.sparse_h5 import CountedFileError, SparseCountsWriter

stempy_io = pytest.importorskip("stempy.io")


def random_frames(rng, n_positions, fpp, frame_shape, mean_events=25):
    """Object array (n_positions, fpp) of sorted unique uint32 pixel lists, some empty."""
    n_pix = frame_shape[0] * frame_shape[1]
    frames = np.empty((n_positions, fpp), dtype=object)
    for i in range(n_positions):
        for j in range(fpp):
            n = 0 if (i * fpp + j) % 9 == 4 else min(int(rng.poisson(mean_events)), n_pix)
            frames[i, j] = np.sort(rng.choice(n_pix, size=n, replace=False)).astype(np.uint32)
    return frames


def stempy_file(tmp_path, scan_shape, fpp, frame_shape, seed=0, metadata=None):
    rng = np.random.default_rng(seed)
    frames = random_frames(rng, scan_shape[0] * scan_shape[1], fpp, frame_shape)
    sa = stempy_io.SparseArray(data=frames, scan_shape=scan_shape, frame_shape=frame_shape, metadata=metadata or {})
    path = tmp_path / f"stempy_{fpp}.h5"
    stempy_io.save_electron_counts(str(path), sa)
    return path


def stempy_dense(path):
    return np.asarray(stempy_io.load_electron_counts(str(path)).to_dense())


def binned(dense, factor):
    r, c, dr, dc = dense.shape
    return dense.reshape(r, c, dr // factor, factor, dc // factor, factor).sum(axis=(3, 5))


@pytest.mark.parametrize("fpp", [1, 3])
def test_views_equal_stempy_to_dense(tmp_path, fpp):
    path = stempy_file(tmp_path, (5, 7), fpp, (16, 16), seed=fpp)
    expected = stempy_dense(path).astype(np.int64)
    assert expected.shape == (5, 7, 16, 16)
    scan = stemstream.open(path)
    assert (scan.scan_shape, scan.frames_per_position, scan.detector_shape) == ((5, 7), fpp, (16, 16))
    assert scan.ledger == {}  # stempy keeps no ledger

    np.testing.assert_array_equal(scan.region(), expected)
    np.testing.assert_array_equal(scan.region(slice(1, 4), slice(2, 6)), expected[1:4, 2:6])
    np.testing.assert_array_equal(scan.frame(3, 6), expected[3, 6])
    np.testing.assert_array_equal(scan.summed_pattern(), expected.sum(axis=(0, 1)))
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:12, 2:9] = True
    np.testing.assert_array_equal(scan.virtual_image(mask), (expected * mask).sum(axis=(2, 3)))
    np.testing.assert_array_equal(scan.counts_image(), expected.sum(axis=(2, 3)))
    csr = scan.to_scipy_csr()
    assert isinstance(csr, scipy.sparse.csr_matrix) and csr.shape == (35, 256)
    np.testing.assert_array_equal(csr.toarray(), expected.reshape(35, 256))


def test_single_frames_of_a_multi_frame_position(tmp_path):
    path = stempy_file(tmp_path, (3, 4), 3, (8, 8), seed=7)
    frames = stempy_io.load_electron_counts(str(path)).data
    scan = stemstream.open(path)
    for k in range(3):
        expected = np.zeros(64, dtype=np.int64)
        expected[frames[2 * 4 + 1, k]] = 1
        np.testing.assert_array_equal(scan.frame(2, 1, k), expected.reshape(8, 8))
    with pytest.raises(IndexError):
        scan.frame(0, 0, 3)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_binning_and_crop_equal_binned_stempy(tmp_path, factor):
    path = stempy_file(tmp_path, (6, 5), 2, (16, 24), seed=factor)
    expected = binned(stempy_dense(path).astype(np.int64), factor)[1:5, 0:3]
    scan = stemstream.open(path).binned(factor).cropped(slice(1, 5), slice(0, 3))
    assert scan.detector_shape == (16 // factor, 24 // factor)
    np.testing.assert_array_equal(scan.region(), expected)
    np.testing.assert_array_equal(scan.summed_pattern(), expected.sum(axis=(0, 1)))
    np.testing.assert_array_equal(scan.to_scipy_csr().toarray(), expected.reshape(12, -1))
    assert scan.dtype == np.uint8 and int(expected.max()) <= 255


def test_to_dask_is_lazy_and_chunked_by_rows(tmp_path):
    da = pytest.importorskip("dask.array")
    path = stempy_file(tmp_path, (7, 4), 2, (8, 8), seed=11)
    scan = stemstream.open(path)
    cube = scan.to_dask(rows_per_chunk=3)
    assert isinstance(cube, da.Array)
    assert cube.chunks[0] == (3, 3, 1) and cube.shape == (7, 4, 8, 8)
    np.testing.assert_array_equal(cube.compute(), stempy_dense(path))


def test_our_file_with_ledger_and_thresholds(tmp_path):
    rng = np.random.default_rng(5)
    frames = random_frames(rng, 12, 2, (8, 8))
    path = tmp_path / "ours.h5"
    thresholds = {"background_threshold": 12.5, "x_ray_threshold": 900.0}
    with SparseCountsWriter(path, (3, 4), (8, 8), frames_per_position=2) as w:
        w.write(np.arange(24), list(frames.ravel()))
        w.set_metadata("electron_counting", thresholds)
    scan = stemstream.open(path)
    assert scan.thresholds == thresholds
    assert "written" in scan.ledger  # our writer keeps the frame ledger
    np.testing.assert_array_equal(scan.region(), stempy_dense(path))


def test_bad_inputs_are_one_sentence(tmp_path):
    raw = tmp_path / "raw.data"
    raw.write_bytes(b"\x00" * 4096)
    with pytest.raises(CountedFileError, match="cannot be opened as HDF5"):
        stemstream.open(raw)

    good = stempy_file(tmp_path, (4, 4), 1, (8, 8))
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CountedFileError, match="truncated.h5"):
        stemstream.open(truncated)

    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w") as f:
        f.attrs["version"] = 3
    with pytest.raises(CountedFileError, match="no /electron_events"):
        stemstream.open(empty)

    with pytest.raises(ValueError, match="binning must be one of"):
        stemstream.open(good, bin_factor=7)
    with pytest.raises(ValueError, match="mask is"):
        stemstream.open(good).virtual_image(np.ones((4, 4)))
    with pytest.raises(ValueError, match="is empty"):
        stemstream.open(good).cropped(slice(3, 3))
