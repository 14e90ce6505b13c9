"""Counting thresholds: fixed by the user, or calibrated from sample frames as stempy does.

Calibration (stempy's method, formats.md section 4): pool the pixels of the sampled frames;
``xray = mean + n_xray * std``; histogram the values in 1-ADU bins, fit
``A * exp(-(x - mu)^2 / (2 sigma^2))`` (Levenberg-Marquardt) and set
``background = mu + n_bg * |sigma|``.

The sample is held as a histogram of integer pixel values, never as frames, so calibration
memory does not depend on the number of samples, and histograms from several node groups merge
by addition (the streaming pipeline calibrates from frames gathered across node groups).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numba
import numpy as np
from numba import njit, prange

from stemstream.core.thresholds import Thresholds, fixed_thresholds  # noqa: F401  (part of this module's API)
from stemstream.formats.raw_pread import fetch_add, read_frame

# Pixel values after integer dark subtraction span -65535..65535; the histogram is offset so that
# index = value + _OFFSET.
_OFFSET = 65536
_N_VALUES = 2 * 65536


class CalibrationError(RuntimeError):
    """Thresholds could not be calibrated from the sample (too few pixels, fit failed)."""


@njit(nogil=True, cache=True)
def _accumulate(frame, dark_int, use_dark, weight, hist):
    flat = frame.reshape(-1)
    dark = dark_int.reshape(-1)
    for i in range(flat.shape[0]):
        v = np.int64(flat[i])
        if use_dark:
            v -= dark[i]
        hist[v + _OFFSET] += weight


@njit(nogil=True, parallel=True, cache=True)
def _accumulate_frames(frames, weights, dark_int, use_dark, hist, n_chunks):
    # Frames interleaved over n_chunks threads, each into its own histogram (a shared one would
    # need atomics), added up at the end: ~2 clock cycles per pixel and thread.
    local = np.zeros((n_chunks, hist.shape[0]), np.int64)
    for k in prange(n_chunks):
        for i in range(k, frames.shape[0], n_chunks):
            _accumulate(frames[i], dark_int, use_dark, weights[i], local[k])
    for k in range(n_chunks):
        hist += local[k]


@njit(nogil=True, parallel=True, cache=True)
def read_accumulate(fds, source_file, source_record, indices, weights, dark_int, use_dark, frames, hist, failed, n_chunks):
    """Read (raw_pread.read_frame) the frames at FrameTable ``indices`` into the threads' scratch
    frames and add frame i ``weights[i]`` times to ``hist``. ``failed[i]``: -1, or the module
    whose read failed. Next to _accumulate: numba's cache only notices edits to this file."""
    local = np.zeros((n_chunks, hist.shape[0]), np.int64)  # one histogram per thread, no atomics
    n = indices.shape[0]
    next_frame = np.zeros(1, np.int64)
    for k in prange(n_chunks):
        frame = frames[k]
        while True:
            i = fetch_add(next_frame, 0, 1)  # the next frame to whichever thread is free
            if i >= n:
                break
            failed[i] = read_frame(fds, source_file, source_record, indices[i], frame)
            if failed[i] < 0:
                _accumulate(frame, dark_int, use_dark, weights[i], local[k])
    for k in range(n_chunks):
        hist += local[k]


@dataclass
class PixelHistogram:
    """Counts of integer pixel values (after integer dark subtraction) over sampled frames.

    Two histograms of the same kind merge by :meth:`merge`; the result is what one histogram of
    all their frames would be.
    """

    counts: np.ndarray = field(default_factory=lambda: np.zeros(_N_VALUES, np.int64))
    n_frames: int = 0

    def add(self, frame: np.ndarray, dark: np.ndarray | None = None, weight: int = 1) -> None:
        """Add one (rows, cols) uint16 frame, ``weight`` times (a frame drawn more than once)."""
        if dark is None:
            _accumulate(frame, np.zeros((1, 1), np.int64), False, weight, self.counts)
        else:
            _accumulate(frame, np.asarray(dark, np.float32).astype(np.int64), True, weight, self.counts)
        self.n_frames += weight

    def add_frames(self, frames: np.ndarray, weights: np.ndarray | None = None, dark: np.ndarray | None = None) -> None:
        """Add a batch of (n, rows, cols) uint16 frames, frame ``i`` ``weights[i]`` times (default
        once each), spread over numba's threads."""
        n = len(frames)
        if n == 0:
            return
        weights = np.ones(n, np.int64) if weights is None else np.asarray(weights, np.int64)
        if weights.shape != (n,):
            raise ValueError(f"got {n} frames but weights of shape {weights.shape}")
        if dark is None:
            dark_int, use_dark = np.zeros((1, 1), np.int64), False
        else:
            dark_int, use_dark = np.asarray(dark, np.float32).astype(np.int64), True
        _accumulate_frames(np.ascontiguousarray(frames), weights, dark_int, use_dark, self.counts,
                           min(n, numba.get_num_threads()))
        self.n_frames += int(weights.sum())

    def merge(self, other: PixelHistogram) -> None:
        self.counts += other.counts
        self.n_frames += other.n_frames

    # The wire and state-file form: the non-empty bins as pixel values (not bin indices, so the
    # offset never leaves this class) with their counts.

    def to_wire(self) -> dict:
        """``{values, counts, n_frames}``: the non-empty bins, as msgpack-able lists."""
        where = np.flatnonzero(self.counts)
        return {"values": (where - _OFFSET).tolist(), "counts": self.counts[where].tolist(), "n_frames": int(self.n_frames)}

    @classmethod
    def from_wire(cls, sparse) -> PixelHistogram:
        """The histogram of a :meth:`to_wire` map; ValueError (one sentence) for anything else."""
        if not isinstance(sparse, dict):
            raise ValueError("a calibration histogram must be a map")
        try:
            values = np.asarray(sparse.get("values", []), np.int64)
            counts = np.asarray(sparse.get("counts", []), np.int64)
            n_frames = int(sparse.get("n_frames", 0))
        except (TypeError, ValueError, OverflowError):
            raise ValueError("a calibration histogram holds something other than integers") from None
        if values.ndim != 1 or values.shape != counts.shape:
            raise ValueError("a calibration histogram's values and counts differ in length")
        if values.size and (values.min() < -_OFFSET or values.max() >= _N_VALUES - _OFFSET):
            raise ValueError("a calibration histogram bin lies outside the pixel-value range")
        if (counts.size and counts.min() < 0) or n_frames < 0:
            raise ValueError("a calibration histogram holds negative counts")
        histogram = cls()
        np.add.at(histogram.counts, values + _OFFSET, counts)
        histogram.n_frames = n_frames
        return histogram

    @property
    def n_pixels(self) -> int:
        return int(self.counts.sum())


def _gaussian(x, amplitude, mu, sigma):
    return amplitude * np.exp(-0.5 * ((x - mu) / sigma) ** 2)


def _fit_gaussian(x: np.ndarray, y: np.ndarray, p0: tuple[float, float, float], max_iterations: int = 500):
    """Least-squares fit of ``A * exp(-(x - mu)^2 / (2 sigma^2))`` to (x, y) by Levenberg-Marquardt
    (Marquardt's diagonal scaling, analytic Jacobian); returns (A, mu, sigma).

    Our own 3-parameter solver rather than scipy.optimize.curve_fit: importing scipy.optimize
    costs ~0.2 s, a sixth of a whole ``stemstream count`` of a 64 x 64 scan. It converges to
    the same optimum (tests compare it with curve_fit). Raises CalibrationError when it does not
    converge.
    """
    p = np.array(p0, dtype=np.float64)

    def residuals(q):
        return _gaussian(x, *q) - y

    r = residuals(p)
    cost = float(r @ r)
    damping = 1e-3
    for _ in range(max_iterations):
        amplitude, mu, sigma = p
        z = (x - mu) / sigma
        e = np.exp(-0.5 * z * z)
        jac = np.stack([e, amplitude * e * z / sigma, amplitude * e * z * z / sigma], axis=1)
        grad = jac.T @ r
        hess = jac.T @ jac
        scale = np.diag(hess).copy()
        scale[scale <= 0] = 1.0
        while True:
            try:
                step = np.linalg.solve(hess + damping * np.diag(scale), -grad)
            except np.linalg.LinAlgError:
                step = None
            if step is not None and np.all(np.isfinite(step)):
                trial = p + step
                r_trial = residuals(trial)
                cost_trial = float(r_trial @ r_trial)
                if math.isfinite(cost_trial) and cost_trial <= cost:
                    break
            damping *= 10.0
            if damping > 1e16:
                # No step lowers the cost: p is a minimum (to working precision).
                return tuple(float(v) for v in p)
        small_step = np.all(np.abs(step) <= 1e-10 * (np.abs(p) + 1e-10))
        small_gain = cost - cost_trial <= 1e-14 * cost
        p, r, cost = trial, r_trial, cost_trial
        damping = max(damping / 10.0, 1e-12)
        if small_step or small_gain:
            return tuple(float(v) for v in p)
    raise CalibrationError(f"the Gaussian fit of the pixel histogram did not converge in {max_iterations} iterations")


def thresholds_from_histogram(
    histogram: PixelHistogram,
    background_n_sigma: float = 4.0,
    xray_n_sigma: float = 175.0,
) -> Thresholds:
    """Calibrate thresholds from a pixel histogram (stempy's statistics and Gaussian fit).

    Raises CalibrationError when the sample is empty or the fit does not converge.
    """
    counts = histogram.counts
    n = int(counts.sum())
    if n < 2:
        raise CalibrationError("no sample pixels to calibrate thresholds from (no complete frame was found)")
    nonzero = np.flatnonzero(counts)
    values = np.arange(-_OFFSET, _N_VALUES - _OFFSET, dtype=np.float64)
    mean = float((counts * values).sum() / n)
    # stempy's variance: sum(x^2) / (n - 1) - mean^2
    variance = float((counts * values**2).sum() / (n - 1) - mean**2)
    std = math.sqrt(max(variance, 0.0))
    xray = mean + xray_n_sigma * std
    min_sample = float(values[nonzero[0]])
    max_sample = float(values[nonzero[-1]])

    # 1-ADU bins from the smallest to the largest sample (stempy's upper bound, mean + xray * std,
    # is always beyond the largest sample in practice). The fit only needs the region around the
    # pedestal; the tail of electrons and X-rays has negligible weight in a least-squares fit.
    lo_bin, hi_bin = int(min_sample), int(max_sample)
    n_bins = max(hi_bin - lo_bin, 1)
    bins = np.arange(lo_bin, lo_bin + n_bins, dtype=np.float64)
    hist = counts[lo_bin + _OFFSET : lo_bin + _OFFSET + n_bins].astype(np.float64)
    peak = int(np.argmax(hist))
    # Fit a window around the peak: same optimum, far fewer points than a 65536-bin tail.
    window = max(int(10 * std), 50)
    sel = slice(max(peak - window, 0), min(peak + window + 1, n_bins))
    with np.errstate(all="ignore"):  # trial steps may overflow exp; they are then rejected
        amplitude, mu, sigma = _fit_gaussian(bins[sel], hist[sel], (hist[peak], bins[peak], max(std, 1.0)))
    if not (math.isfinite(mu) and math.isfinite(sigma)):
        raise CalibrationError("the Gaussian fit of the pixel histogram gave a non-finite result")
    background = mu + background_n_sigma * abs(sigma)
    return Thresholds(
        background=float(background),
        xray=float(xray),
        calculated=True,
        number_of_samples=histogram.n_frames,
        min_sample=min_sample,
        max_sample=max_sample,
        mean=mean,
        variance=variance,
        std_dev=std,
        number_of_bins=n_bins,
        xray_n_sigma=float(xray_n_sigma),
        background_n_sigma=float(background_n_sigma),
        optimized_mean=float(mu),
        optimized_std_dev=float(abs(sigma)),
    )


def draw_sample_weights(n_candidates: int, n_samples: int, seed: int | None = None) -> np.ndarray:
    """How many times each of ``n_candidates`` frames is drawn when ``n_samples`` frames are drawn
    at random with replacement (stempy draws with replacement)."""
    if n_candidates <= 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    return np.bincount(rng.integers(0, n_candidates, n_samples), minlength=n_candidates)
