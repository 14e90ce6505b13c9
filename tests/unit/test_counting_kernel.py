"""The counting kernel gives exactly stempy's events for the same frame and thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from stemstream.counting.kernel import ElectronCounter, count_frame, max_events_per_frame

stempy_image = pytest.importorskip("stempy.image")


def stempy_events(frame, background, xray, dark=None, gain=None) -> np.ndarray:
    result = stempy_image.electron_count_frame(
        frame, darkreference=dark, background_threshold=background, xray_threshold=xray, gain=gain
    )
    return np.sort(np.asarray(result.data[0, 0], dtype=np.uint32))


def sparse_frame(rng, shape=(576, 576), dose=0.003) -> np.ndarray:
    """Pedestal ~20 ADU, electrons with charge on neighbours, X-rays, dead pixels, edge hits,
    plateaus: everything the kernel must treat like stempy."""
    rows, cols = shape
    frame = rng.normal(20, 2, shape).clip(0, None).astype(np.uint16)
    n = rng.poisson(dose * rows * cols)
    r, c = rng.integers(0, rows, n), rng.integers(0, cols, n)
    frame[r, c] += rng.integers(30, 400, n).astype(np.uint16)
    frame[np.clip(r + 1, 0, rows - 1), c] += rng.integers(0, 60, n).astype(np.uint16)
    frame[r[:20], np.clip(c[:20] + 1, 0, cols - 1)] = frame[r[:20], c[:20]]  # plateaus
    frame[rng.integers(0, rows, 5), rng.integers(0, cols, 5)] = 6000  # X-rays
    frame[rng.integers(0, rows, 5), rng.integers(0, cols, 5)] = 0  # dead pixels
    frame[0, 0], frame[0, cols - 1], frame[rows - 1, 0], frame[rows - 1, cols - 1] = 90, 95, 100, 105  # corners
    frame[0, cols // 2] = 80  # top edge
    frame[rows // 2, cols - 1] = 85  # right edge
    return frame


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_events_equal_stempy_without_dark(seed):
    frame = sparse_frame(np.random.default_rng(seed))
    assert np.array_equal(count_frame(frame, 28.4, 2000.0), stempy_events(frame, 28.4, 2000.0))


def test_events_equal_stempy_with_dark_reference():
    rng = np.random.default_rng(3)
    frame = sparse_frame(rng)
    dark = rng.normal(1.0, 3.0, frame.shape).astype(np.float32)  # negative values wrap, as stempy
    assert np.array_equal(count_frame(frame, 26.5, 2500.0, dark=dark), stempy_events(frame, 26.5, 2500.0, dark=dark))


def test_events_equal_stempy_with_dark_and_gain():
    rng = np.random.default_rng(4)
    frame = sparse_frame(rng)
    dark = rng.normal(0.5, 2.0, frame.shape).astype(np.float32)
    gain = rng.uniform(0.6, 1.6, frame.shape).astype(np.float32)
    ours = count_frame(frame, 27.5, 2500.0, dark=dark, gain=gain)
    assert np.array_equal(ours, stempy_events(frame, 27.5, 2500.0, dark=dark, gain=gain))


@pytest.mark.parametrize("shape", [(7, 13), (6, 10), (1, 9), (144, 576)])
def test_events_equal_stempy_on_odd_shapes(shape):
    frame = sparse_frame(np.random.default_rng(5), shape, dose=0.05)
    assert np.array_equal(count_frame(frame, 28.0, 2000.0), stempy_events(frame, 28.0, 2000.0))


def test_value_equal_to_a_threshold_is_not_counted():
    frame = np.full((8, 8), 20, np.uint16)
    frame[2, 2], frame[5, 5], frame[2, 6] = 28, 1000, 29
    assert count_frame(frame, 28.0, 1000.0).tolist() == [2 * 8 + 6]


def test_xray_neighbour_is_zeroed_and_does_not_block_an_event():
    frame = np.full((8, 8), 20, np.uint16)
    frame[4, 4], frame[4, 5] = 100, 5000
    assert count_frame(frame, 28.0, 1000.0).tolist() == [4 * 8 + 4]


def test_plateau_gives_no_event():
    frame = np.full((8, 8), 20, np.uint16)
    frame[3, 3] = frame[3, 4] = 100
    assert count_frame(frame, 28.0, 1000.0).size == 0


def test_batch_equals_frame_by_frame_and_events_are_sorted():
    rng = np.random.default_rng(6)
    frames = np.stack([sparse_frame(rng) for _ in range(5)])
    counted = ElectronCounter(28.4, 2000.0).count(frames)
    assert len(counted) == 5
    for i in range(5):
        assert np.array_equal(counted.frame(i), count_frame(frames[i], 28.4, 2000.0))
        assert np.all(np.diff(counted.frame(i).astype(np.int64)) > 0)


def test_densest_possible_frame_fits_the_event_buffer():
    # A checkerboard of isolated maxima: the most events a frame can hold.
    frame = np.full((10, 12), 20, np.uint16)
    frame[::2, ::2] = 100
    events = count_frame(frame, 28.0, 1000.0)
    assert len(events) == max_events_per_frame((10, 12)) == 30


def test_rejects_wrong_dtype_and_shape():
    counter = ElectronCounter(28.0, 1000.0, (8, 8))
    with pytest.raises(TypeError, match="uint16"):
        counter.count(np.zeros((1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="rows, cols"):
        counter.count(np.zeros((1, 8, 9), np.uint16))
    with pytest.raises(ValueError, match="dark reference"):
        ElectronCounter(28.0, 1000.0, (8, 8), dark=np.zeros((9, 8)))


def test_row_dark_rescales_each_half_row_to_the_pedestal():
    # The right half-row sits 10 ADU higher: scaled to the pedestal its electron stays, its
    # background pixels (30 ADU > threshold without the correction) disappear.
    frame = np.full((4, 8), 20, np.uint16)
    frame[:, 4:] = 30
    frame[::2, 4::2] = 32  # isolated noise maxima above the threshold
    frame[1, 6] = 200
    plain = count_frame(frame, 28.0, 1000.0)
    assert len(plain) > 1  # the raised half-row counts as noise without row-dark
    counter = ElectronCounter(28.0, 1000.0, (4, 8), row_dark=True, optimized_mean=20.0)
    assert counter.count(frame).frame(0).tolist() == [1 * 8 + 6]


@pytest.mark.parametrize("shape", [(9, 96), (12, 100), (64, 200), (33, 577), (576, 576)])
@pytest.mark.parametrize("dose", [0.01, 0.2])
def test_events_equal_stempy_across_block_and_frame_edges(shape, dose):
    # The kernel tests 96-pixel blocks of interior rows all at once and the first/last rows and
    # columns one pixel at a time: put electrons everywhere, up to crowded frames where
    # neighbours and X-rays interfere, on shapes with and without a partial last block.
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    frame = sparse_frame(rng, shape, dose=dose)
    rows, cols = shape
    edge_rows = rng.integers(0, rows, 40)
    frame[edge_rows, 0] = rng.integers(25, 3000, 40)  # first and last columns of every kind of row
    frame[edge_rows, cols - 1] = rng.integers(25, 3000, 40)
    block_edges = np.arange(95, cols - 1, 96)
    if block_edges.size:  # pixels either side of each block boundary
        r = rng.integers(0, rows, (len(block_edges), 2))
        frame[r[:, 0], block_edges] = rng.integers(25, 500, len(block_edges))
        frame[r[:, 1], block_edges + 1] = rng.integers(25, 500, len(block_edges))
    for background, xray in [(28.0, 2000.0), (24.5, 300.0), (28.0, 1e9)]:
        assert np.array_equal(count_frame(frame, background, xray), stempy_events(frame, background, xray))
