"""Threshold calibration: stempy's statistics and Gaussian fit, from mergeable histograms."""

from __future__ import annotations

import numpy as np
import pytest

from stemstream.counting.thresholds import (
    CalibrationError,
    PixelHistogram,
    draw_sample_weights,
    fixed_thresholds,
    thresholds_from_histogram,
)


def noisy_frames(n, seed=0, pedestal=20.0, sigma=2.0, dose=0.002):
    rng = np.random.default_rng(seed)
    frames = rng.normal(pedestal, sigma, (n, 64, 64)).round().clip(0).astype(np.uint16)
    hits = rng.random(frames.shape) < dose
    frames[hits] += rng.integers(50, 300, hits.sum()).astype(np.uint16)
    return frames


def test_background_threshold_is_fitted_pedestal_plus_n_sigma():
    hist = PixelHistogram()
    for frame in noisy_frames(50):
        hist.add(frame)
    t = thresholds_from_histogram(hist, background_n_sigma=4, xray_n_sigma=10)
    assert t.optimized_mean == pytest.approx(20.0, abs=0.1)
    assert t.optimized_std_dev == pytest.approx(2.0, abs=0.1)
    assert t.background == pytest.approx(t.optimized_mean + 4 * t.optimized_std_dev)
    assert t.calculated and t.number_of_samples == 50


def test_xray_threshold_is_mean_plus_n_std_of_all_pixels():
    frames = noisy_frames(20, seed=1)
    hist = PixelHistogram()
    for frame in frames:
        hist.add(frame)
    t = thresholds_from_histogram(hist, xray_n_sigma=175)
    values = frames.astype(np.float64).ravel()
    std = np.sqrt((values**2).sum() / (values.size - 1) - values.mean() ** 2)  # stempy's estimator
    assert t.mean == pytest.approx(values.mean())
    assert t.xray == pytest.approx(values.mean() + 175 * std)
    assert t.min_sample == values.min() and t.max_sample == values.max()


def test_histograms_merge_into_the_histogram_of_all_frames():
    frames = noisy_frames(10, seed=2)
    whole, a, b = PixelHistogram(), PixelHistogram(), PixelHistogram()
    for i, frame in enumerate(frames):
        whole.add(frame)
        (a if i % 2 else b).add(frame)
    a.merge(b)
    assert np.array_equal(a.counts, whole.counts) and a.n_frames == whole.n_frames


def test_weighted_frame_counts_as_drawn_several_times():
    frame = noisy_frames(1, seed=3)[0]
    once, twice = PixelHistogram(), PixelHistogram()
    once.add(frame)
    once.add(frame)
    twice.add(frame, weight=2)
    assert np.array_equal(once.counts, twice.counts)


def test_dark_reference_shifts_the_pedestal():
    frames = noisy_frames(20, seed=4, pedestal=30.0)
    hist = PixelHistogram()
    dark = np.full((64, 64), 10.7, np.float32)  # truncated to 10, as stempy
    for frame in frames:
        hist.add(frame, dark)
    assert thresholds_from_histogram(hist).optimized_mean == pytest.approx(20.0, abs=0.15)


def test_empty_sample_is_a_calibration_error():
    with pytest.raises(CalibrationError, match="no sample pixels"):
        thresholds_from_histogram(PixelHistogram())


def test_draws_are_with_replacement_and_sum_to_the_sample_count():
    w = draw_sample_weights(640, 1200, seed=1)
    assert w.sum() == 1200 and len(w) == 640 and w.max() > 1


def test_fixed_thresholds_must_be_ordered():
    assert fixed_thresholds(28, 1000).stempy_attributes()["threshold_calculated"] is False
    with pytest.raises(ValueError, match="must be above"):
        fixed_thresholds(1000, 28)


def test_gaussian_fit_reaches_scipy_curve_fit_optimum():
    # Our Levenberg-Marquardt (no scipy.optimize import at start-up) against scipy's MINPACK one.
    curve_fit = pytest.importorskip("scipy.optimize").curve_fit
    from stemstream.counting.thresholds import _fit_gaussian, _gaussian

    rng = np.random.default_rng(0)
    for _ in range(40):
        mu, sigma, n = rng.uniform(5, 40), rng.uniform(0.8, 4), int(10 ** rng.uniform(3, 7))
        values = np.concatenate([np.round(rng.normal(mu, sigma, n)), rng.integers(30, 400, n // 50)]).astype(int)
        hist = np.bincount(values - values.min()).astype(float)
        x = np.arange(values.min(), values.min() + len(hist), dtype=float)
        peak = int(np.argmax(hist))
        p0 = (hist[peak], x[peak], max(values.std(), 1.0))
        ref, _ = curve_fit(_gaussian, x, hist, p0=p0, method="lm", maxfev=2000)
        with np.errstate(all="ignore"):
            ours = _fit_gaussian(x, hist, p0)
        assert ours[1] + 4 * abs(ours[2]) == pytest.approx(ref[1] + 4 * abs(ref[2]), abs=1e-4)
        cost = lambda p: float(((_gaussian(x, *p) - hist) ** 2).sum())  # noqa: E731
        assert cost(ours) <= cost(ref) * (1 + 1e-9)


def test_batch_histogram_equals_frame_by_frame():
    frames = noisy_frames(9, seed=5)
    dark = np.full((64, 64), 3.5, np.float32)
    weights = np.arange(9) % 3
    one, batch = PixelHistogram(), PixelHistogram()
    for frame, w in zip(frames, weights):
        one.add(frame, dark, int(w))
    batch.add_frames(frames, weights, dark)
    assert np.array_equal(one.counts, batch.counts) and one.n_frames == batch.n_frames
