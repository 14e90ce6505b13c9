"""The single-electron charge model of cluster counting, calibrated from the data itself as the
thresholds are: the charges of isolated one-peak clusters give the distribution of one
electron's charge, summarised by its mean and gamma shape (stored in the file's metadata, as the
thresholds are, under ``/metadata/stemstream/cluster_model``).

Calibration: the charges of isolated single-electron clusters (counting.clusters.
single_electron_charges: no other cluster within 6 px, so mostly from where the local dose is
low) of the sample frames; those above 4 times their median are dropped (what is left of two
electrons on one pixel, one peak with twice the charge); the mean ``m`` and variance ``v`` of the rest give the gamma shape ``k = m^2 / v``.
Clusters with less charge than ``min_charge`` are noise: twice the charge of a lone pixel just
above the background threshold (a 4-sigma noise pixel has ``background - pedestal`` ADU).

The compiled count model the cluster kernel (counting.clusters) uses: how many electrons a
cluster of a given charge and number of peaks most probably holds (electrons_in_cluster), and
the frame's correction of those counts to its total charge (reconcile).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from stemstream.core.thresholds import Thresholds

# Expected spurious peaks (noise on a tail making a second maximum) per peak: a prior for
# clusters whose charge says fewer electrons than peaks.
SPURIOUS_PEAKS = 0.02
_LOG_SPURIOUS = math.log(SPURIOUS_PEAKS)
# Model fields as the kernels take them: (pedestal, mean, shape, min_charge), then the table of
# log-normalisations of the n-electron charge density, n = 0, 1, ... (SingleElectronModel.params).
N_MODEL = 4
# Single-electron clusters needed for a calibration we trust.
MIN_SINGLE_CLUSTERS = 200
# Charges above this many medians are left out of the single-electron fit (see the docstring).
_CLIP_MEDIANS = 4.0
# Electrons per cluster whose density normalisation the kernels look up (beyond: computed).
_TABLE = 256
# min_charge in units of a lone noise pixel's charge (background - pedestal).
_NOISE_PIXELS = 2.0


class ClusterCalibrationError(RuntimeError):
    """Too few isolated single-electron clusters in the sample to calibrate the charge model."""


@dataclass(frozen=True)
class SingleElectronModel:
    """pedestal: ADU of an empty pixel (the thresholds' fitted pedestal). mean (ADU), shape: one
    electron's cluster charge, gamma distributed. min_charge: ADU, clusters below are noise.
    n_clusters: isolated single-electron clusters the model was calibrated from (0: given)."""

    pedestal: float
    mean: float
    shape: float
    min_charge: float
    n_clusters: int = 0

    def __post_init__(self):
        if not (self.mean > 0 and self.shape > 0 and self.min_charge >= 0):
            raise ValueError(f"a single-electron model needs mean > 0, shape > 0, min_charge >= 0, got {self}")

    @property
    def params(self) -> np.ndarray:
        """(pedestal, mean, shape, min_charge) float64, as the compiled kernels take them, then
        ``lgamma(n k) + n k log(m / k)`` for n = 0 .. _TABLE - 1 (the log-normalisation of the
        n-electron charge density; n = 0 is never used)."""
        n = np.arange(_TABLE, dtype=np.float64)
        shape = np.maximum(n * self.shape, 1e-300)
        table = np.array([math.lgamma(a) for a in shape]) + shape * math.log(self.mean / self.shape)
        return np.concatenate([[self.pedestal, self.mean, self.shape, self.min_charge], table])

    def attributes(self) -> dict:
        """The model as metadata attributes (``/metadata/stemstream/cluster_model``)."""
        return {"pedestal": self.pedestal, "single_electron_mean": self.mean, "single_electron_shape": self.shape,
                "min_charge": self.min_charge, "calibration_clusters": self.n_clusters}


def pedestal_of(thresholds: Thresholds, frames: np.ndarray) -> float:
    """The empty-pixel level: the thresholds' fitted pedestal when they were calibrated, else the
    median of the sample frames (fixed thresholds carry no pedestal)."""
    if thresholds.calculated and thresholds.optimized_mean > 0:
        return float(thresholds.optimized_mean)
    return float(np.median(frames[: min(len(frames), 4)]))


def model_from_charges(charges: np.ndarray, pedestal: float, background: float) -> SingleElectronModel:
    """Fit the single-electron model to isolated one-peak cluster charges (ADU); raises
    ClusterCalibrationError when there are fewer than MIN_SINGLE_CLUSTERS of them."""
    charges = np.asarray(charges, np.float64)
    min_charge = _NOISE_PIXELS * max(background - pedestal, 0.0)
    charges = charges[charges >= min_charge]
    if len(charges) < MIN_SINGLE_CLUSTERS:
        raise ClusterCalibrationError(
            f"only {len(charges)} isolated single-electron clusters in the calibration sample "
            f"(cluster counting needs {MIN_SINGLE_CLUSTERS}): sample more frames or use --method maxima")
    kept = charges[charges <= _CLIP_MEDIANS * np.median(charges)]
    mean = float(kept.mean())
    shape = float(mean**2 / max(kept.var(), 1e-9))
    return SingleElectronModel(pedestal=float(pedestal), mean=mean, shape=shape, min_charge=float(min_charge),
                               n_clusters=len(kept))


@njit(nogil=True, cache=True, inline="always")
def _log_norm(model, n):
    # log of the gamma density's normalisation for n electrons: model's table, else computed
    if N_MODEL + n < model.shape[0]:
        return model[N_MODEL + n]
    shape, scale = n * model[2], model[1] / model[2]
    return math.lgamma(shape) + shape * math.log(scale)


@njit(nogil=True, cache=True, inline="always")
def _log_factorial(d):
    return math.lgamma(d + 1.0) if d > 2 else (0.0 if d < 2 else 0.6931471805599453)


@njit(nogil=True, cache=True, inline="always")
def _score(charge, log_q, n, n_peaks, log_hidden, model):
    """log p(charge | n electrons) + log prior(n | n_peaks), up to terms that do not depend on n
    (the Poisson priors' exp(-mean) among them). The gamma densities' normalisations come from
    the model's table (SingleElectronModel.params): a few multiplications, not a log-gamma."""
    shape, scale = model[2], model[1] / model[2]
    score = (n * shape - 1.0) * log_q - charge / scale - _log_norm(model, n)
    d = n - n_peaks
    if d > 0:
        score += d * (log_hidden + math.log(n_peaks)) - _log_factorial(d)
    elif d < 0:
        score += -d * (_LOG_SPURIOUS + math.log(n_peaks)) - _log_factorial(-d)
    return score


@njit(nogil=True, cache=True)
def electrons_in_cluster(charge, n_peaks, log_hidden, model):
    """How many electrons a cluster of ``charge`` ADU with ``n_peaks`` peaks most probably holds:
    the ``n`` that maximises _score. The charge of ``n`` electrons is gamma distributed with shape
    ``n k`` and mean ``n m`` (a sum of ``n`` single charges); the electrons beyond the peaks (two
    on one pixel, or too close to make two peaks) are Poisson with mean ``hidden * n_peaks``
    (``log_hidden``: the log of the frame's rate of hidden electrons per peak, from its total
    charge: a dense frame expects hidden electrons, a sparse one does not); fewer electrons than
    peaks costs a Poisson term of mean ``SPURIOUS_PEAKS * n_peaks`` (noise peaks on a tail)."""
    mean, min_charge = model[1], model[3]
    if charge < min_charge:
        return 0
    log_q = math.log(charge)
    # The score is concave in n (a log-concave density times log-concave priors): climb from the
    # peaks towards the charge's count, a few steps, not a scan of every n in between (a bright
    # cluster at high dose holds thousands).
    best = max(n_peaks, 1)
    best_score = _score(charge, log_q, best, n_peaks, log_hidden, model)
    step = 1 if charge / mean > best else -1
    while best + step >= 1:
        score = _score(charge, log_q, best + step, n_peaks, log_hidden, model)
        if score <= best_score:
            break
        best, best_score = best + step, score
    return best


@njit(nogil=True, cache=True, inline="always")
def _gain(log_q, n, n_peaks, step, log_hidden, model):
    """_score(n + step) - _score(n) (step +1 or -1), from the difference of the two scores'
    terms rather than two scores: one logarithm instead of six for the common one-peak cluster."""
    up = n if step > 0 else n - 1  # the gain of going from up to up + 1 electrons
    d = up - n_peaks
    log_peaks = math.log(n_peaks) if n_peaks > 1 else 0.0
    gain = model[2] * log_q - (_log_norm(model, up + 1) - _log_norm(model, up))
    if d >= 0:
        gain += log_hidden + log_peaks - (math.log(d + 1.0) if d > 0 else 0.0)
    else:
        gain += math.log(-d) - _LOG_SPURIOUS - log_peaks
    return gain * step


@njit(nogil=True, cache=True)
def reconcile(tables, sums, n_clusters, missing, log_hidden, model, gains):
    """Add (missing > 0) or take away (< 0) ``missing`` electrons, one per cluster and round,
    where the score gains most or loses least: the clusters' most probable counts are biased
    (a cluster's charge alone cannot tell one bright electron from two), while the frame's total
    charge over the single-electron mean is an unbiased count of the whole frame
    (docs/counting.md). Electrons are taken only from clusters with more than their peaks: a peak
    is stronger evidence of an electron than the frame's total charge."""
    min_charge = model[3]
    for _ in range(8):  # rounds; a frame needs one or two
        if missing == 0:
            return
        step = 1 if missing > 0 else -1
        n_open = 0
        for j in range(n_clusters):
            n = tables[j, 3]
            q = sums[j, 0]
            if q < min_charge or n + step < max(tables[j, 2], 1):
                gains[j] = -np.inf
                continue
            gains[j] = _gain(math.log(q), n, tables[j, 2], step, log_hidden, model)
            n_open += 1
        k = min(abs(missing), n_open)
        if k == 0:
            return
        # The k largest gains: those above the k-th largest (a partition, not a sort), then
        # those equal to it until k.
        kth = np.partition(gains[:n_clusters], n_clusters - k)[n_clusters - k]
        ties = k
        for j in range(n_clusters):
            ties -= gains[j] > kth
        for j in range(n_clusters):
            if gains[j] > kth or (gains[j] == kth and ties > 0):
                ties -= gains[j] == kth
                tables[j, 3] += step
        missing -= step * k


@njit(nogil=True, cache=True)
def one_electron_below(log_hidden, model):
    """The charge (ADU) below which a one-peak cluster holds one electron: where the scores of 1
    and 2 electrons in electrons_in_cluster cross (k log q = L(2) - L(1) - log hidden), so most
    clusters need no logarithm at all."""
    return math.exp((_log_norm(model, 2) - _log_norm(model, 1) - log_hidden) / model[2])
