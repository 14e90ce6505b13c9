"""The single-electron charge model of cluster counting, calibrated from the data itself as the
thresholds are: the charges of isolated one-peak clusters give the distribution of one
electron's charge, summarised by its mean and gamma shape (stored in the file's metadata, as the
thresholds are, under ``/metadata/stemstream/cluster_model``).

Calibration: the charges of isolated single-electron clusters (counting.cluster_singles.
single_electron_charges: no other cluster within 6 px, so mostly from where the local dose is
low) of the sample frames; those above 6 times their median are dropped (several electrons on
one pixel, one peak with their charge, beyond one electron's tail); the mean ``m`` and variance
``v`` of the rest give the gamma shape ``k = m^2 / v``.
Clusters with less charge than ``min_charge`` are noise: twice the charge of a lone pixel just
above the background threshold (a 4-sigma noise pixel has ``background - pedestal`` ADU).
The same singles' pixel patterns give the evidence of a one-peak cluster's spread for 2 or 3
electrons rather than one (spread_llr): charge alone cannot tell one electron from two, as one
electron's charge spreads by ~50 %, and two on neighbouring pixels make one peak.

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
# Model fields as the kernels take them: (pedestal, mean, shape, min_charge, spread bin width,
# spread bins, halo mean), then the spread bins' log-likelihood ratios, then the table of
# log-normalisations of the n-electron charge density, n = 0, 1, ... (SingleElectronModel.params).
N_MODEL = 7
# Single-electron clusters needed for a calibration we trust.
MIN_SINGLE_CLUSTERS = 200
# Charges above this many medians are left out of the single-electron fit (see the docstring).
# Not 4 (until 2026-12-05): a Landau-like deposit's tail reaches beyond 4 medians often enough
# that leaving it out lowered the mean by ~1 % and the count of crowded frames, which their
# total charge counts in full, came out 1 % high (bench_counting_methods, 0.005 e/px/frame: counted
# / true 1.011 -> 1.003, precision 0.931 -> 0.935 by maximum matching; gamma unchanged).
_CLIP_MEDIANS = 6.0
# Electrons per cluster whose density normalisation the kernels look up (beyond: computed).
_TABLE = 256
# min_charge in units of a lone noise pixel's charge (background - pedestal).
_NOISE_PIXELS = 2.0
# A one-peak cluster's spread (the charge-weighted variance of its pixels' positions along its
# major axis, px^2) in bins of this width, the last one open: what tells one electron from two on
# neighbouring pixels, which make one peak with the charge of one bright electron. Along the major
# axis, not rows plus cols: two electrons spread along the line between them, and the variance
# across it is one electron's noise (docs/counting.md section 2, step 2).
_SPREAD_BIN = 0.04
_SPREAD_BINS = 32
# The spread's evidence is kept for 2 .. _SPREAD_ELECTRONS electrons against one (more count as
# _SPREAD_ELECTRONS), from this many compositions per calibration single, at most _MAX_COMPOSED
# (spread_llr).
_SPREAD_ELECTRONS = 3
_COMPOSED_PER_SINGLE = 4
_MAX_COMPOSED = 32768
# Half the side of the patch kept around a calibration single's peak: one electron's charge
# reaches its 3 x 3 neighbours, and a pair's second electron lands up to 2 px away (farther, it
# makes a peak of its own).
PATCH_HALF = 2
# A spread bin's log-likelihood ratio is kept within +-this: a bin that saw few clusters says little.
_MAX_LLR = 6.0


class ClusterCalibrationError(RuntimeError):
    """Too few isolated single-electron clusters in the sample to calibrate the charge model."""


@dataclass(frozen=True)
class SingleElectronModel:
    """pedestal: ADU of an empty pixel (the thresholds' fitted pedestal). mean (ADU), shape: one
    electron's cluster charge, gamma distributed. min_charge: ADU, clusters below are noise.
    n_clusters: isolated single-electron clusters the model was calibrated from (0: given).
    spread_llr: for a one-peak cluster, log p(spread | n electrons) - log p(spread | 1) per
    spread bin (_SPREAD_BIN px^2 wide, the last open), the bins of n = 2, then those of n = 3
    (= _SPREAD_ELECTRONS; more count as 3) (spread_llr; empty: not used). halo_mean (ADU): one
    electron's charge on its cluster's pixels and on the pixels below the background threshold
    next to them (its halo), the unit of a frame's total charge (counting.clusters._frame_charge: where
    electrons crowd, the charge one alone leaves below the threshold lifts pixels above it, so
    the clusters' own charge per electron grows with the dose; with the halo it does not); 0:
    the same as ``mean``. hot_pixels: flat indices of the pixels the calibration frames found hot
    (counting.cluster_counter.hot_pixels): a cluster that is one of them alone counts no
    electron (counting.clusters._drop_hot)."""

    pedestal: float
    mean: float
    shape: float
    min_charge: float
    n_clusters: int = 0
    spread_llr: tuple = ()
    halo_mean: float = 0.0
    hot_pixels: tuple = ()

    def __post_init__(self):
        if not (self.mean > 0 and self.shape > 0 and self.min_charge >= 0 and self.halo_mean >= 0):
            raise ValueError(f"a single-electron model needs mean > 0, shape > 0, min_charge >= 0, halo_mean >= 0, "
                             f"got {self}")

    @property
    def params(self) -> np.ndarray:
        """(pedestal, mean, shape, min_charge, spread bin width, spread bins, halo mean) float64,
        as the compiled kernels take them, then spread_llr, then ``lgamma(n k) + n k log(m / k)`` for
        n = 0 .. _TABLE - 1 (the log-normalisation of the n-electron charge density; n = 0 is
        never used)."""
        n = np.arange(_TABLE, dtype=np.float64)
        shape = np.maximum(n * self.shape, 1e-300)
        table = np.array([math.lgamma(a) for a in shape]) + shape * math.log(self.mean / self.shape)
        bins = len(self.spread_llr) // (_SPREAD_ELECTRONS - 1)
        head = [self.pedestal, self.mean, self.shape, self.min_charge, _SPREAD_BIN, bins, self.halo_mean or self.mean]
        return np.concatenate([head, np.asarray(self.spread_llr, np.float64), table])

    def attributes(self) -> dict:
        """The model as metadata attributes (``/metadata/stemstream/cluster_model``)."""
        return {"pedestal": self.pedestal, "single_electron_mean": self.mean, "single_electron_shape": self.shape,
                "min_charge": self.min_charge, "calibration_clusters": self.n_clusters,
                "single_electron_mean_with_halo": self.halo_mean or self.mean, "hot_pixels": len(self.hot_pixels)}


def pedestal_of(thresholds: Thresholds, frames: np.ndarray) -> float:
    """The empty-pixel level: the thresholds' fitted pedestal when they were calibrated, else the
    median of the sample frames (fixed thresholds carry no pedestal)."""
    if thresholds.calculated and thresholds.optimized_mean > 0:
        return float(thresholds.optimized_mean)
    return float(np.median(frames[: min(len(frames), 4)]))


def model_from_charges(charges: np.ndarray, pedestal: float, background: float, patches: np.ndarray | None = None,
                       window: tuple[float, float] = (0.0, 0.0)) -> SingleElectronModel:
    """Fit the single-electron model to isolated one-peak cluster charges (ADU), and its spread
    evidence to their ``patches`` (n, s, s) when given (spread_llr: ``window`` is the
    members' (low, high) above the pedestal); raises ClusterCalibrationError when there are
    fewer than MIN_SINGLE_CLUSTERS of them."""
    charges = np.asarray(charges, np.float64)
    min_charge = _NOISE_PIXELS * max(background - pedestal, 0.0)
    good = charges >= min_charge
    charges = charges[good]
    if len(charges) < MIN_SINGLE_CLUSTERS:
        raise ClusterCalibrationError(
            f"only {len(charges)} isolated single-electron clusters in the calibration sample "
            f"(cluster counting needs {MIN_SINGLE_CLUSTERS}): sample more frames or use --method maxima")
    keep = charges <= _CLIP_MEDIANS * np.median(charges)
    kept = charges[keep]
    mean = float(kept.mean())
    shape = float(mean**2 / max(kept.var(), 1e-9))
    llr, halo = (), 0.0
    if patches is not None:
        patches = np.asarray(patches, np.float64)[good][keep]
        llr, halo = spread_llr(patches, *window), float(with_halo(patches, window[0], window[1]).mean())
    return SingleElectronModel(pedestal=float(pedestal), mean=mean, shape=shape, min_charge=float(min_charge),
                               n_clusters=len(kept), spread_llr=llr, halo_mean=halo)


def with_halo(patches: np.ndarray, low: float, high: float) -> np.ndarray:
    """Per (n, s, s) patch of charges above the pedestal around a single's peak: the charge of its
    members (low <= charge <= high) and of its halo (the pixels below ``low`` above, below, left
    or right of a member), as counting.clusters._frame_charge adds a cluster's to the frame's."""
    from scipy import ndimage  # here: 0.12 s of import that a node group counting by maxima never needs

    member = (patches >= low) & (patches <= high)
    near = ndimage.binary_dilation(member, structure=ndimage.generate_binary_structure(2, 1)[None])
    take = member | (near & (patches < low))
    return np.where(take, patches, 0.0).sum(axis=(1, 2))


def _spreads_and_peaks(canvas: np.ndarray, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """Per (n, s, s) patch of charges above the pedestal: the spread of its members (low <=
    charge <= high; charge-weighted variance of their positions along their major axis, the
    larger eigenvalue of their covariance, px^2, as the kernel's, counting.clusters._spread) and
    how many peaks they have (members not smaller than any member neighbour, ties to the lower
    index, as counting.cluster_labels finds them)."""
    member = (canvas >= low) & (canvas <= high)
    w = np.where(member, canvas, 0.0)
    axis = np.arange(canvas.shape[1], dtype=np.float64)
    total = np.maximum(w.sum(axis=(1, 2)), 1e-300)
    rows, cols = w.sum(axis=2), w.sum(axis=1)
    centre_row, centre_col = rows @ axis / total, cols @ axis / total
    var_row = rows @ axis**2 / total - centre_row**2
    var_col = cols @ axis**2 / total - centre_col**2
    cov = np.einsum("nij,i,j->n", w, axis, axis) / total - centre_row * centre_col
    spread = 0.5 * (var_row + var_col) + np.sqrt(0.25 * (var_row - var_col) ** 2 + cov**2)
    kept = np.pad(np.where(member, canvas, -np.inf), ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    s = canvas.shape[1]
    peak = member.copy()
    for dr, dc in [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc]:
        other = kept[:, 1 + dr : 1 + dr + s, 1 + dc : 1 + dc + s]
        peak &= (other < canvas) if (dr, dc) < (0, 0) else (other <= canvas)  # before: row above, or left
    return np.maximum(spread, 0.0), peak.sum(axis=(1, 2))


def _spread_bins(spread: np.ndarray) -> np.ndarray:
    return np.minimum((spread / _SPREAD_BIN).astype(np.int64), _SPREAD_BINS - 1)


def spread_llr(patches: np.ndarray, low: float, high: float) -> tuple:
    """log p(spread | n electrons) - log p(spread | 1) per spread bin, for one-peak clusters and
    n = 2 .. _SPREAD_ELECTRONS (SingleElectronModel.spread_llr), from the data alone: the
    calibration singles' ``patches`` (n, s, s) (charge above the pedestal around each one's peak,
    noise included) give the spread of one electron; n of them added at random offsets from the
    first (the others' members only, so the noise is not counted n times; up to s // 2 px,
    each offset as likely as a landing point is uniform), kept when the sum makes one peak, give
    that of n electrons that make one peak. ``low``, ``high``: the members' window above the
    pedestal."""
    n, s = len(patches), patches.shape[1]
    half = s // 2
    rng = np.random.default_rng(0)  # the same sample gives the same model, offline and on the stream
    size = min(_COMPOSED_PER_SINGLE * n, _MAX_COMPOSED)
    members = np.where((patches >= low) & (patches <= high), patches, 0.0)
    canvas = np.zeros((size, s + 2 * half, s + 2 * half))
    canvas[:, half : half + s, half : half + s] = patches[rng.integers(n, size=size)]
    single_spread, _ = _spreads_and_peaks(patches, low, high)
    # One count added to every bin: a bin neither sample reached says nothing either way.
    one = np.bincount(_spread_bins(single_spread), minlength=_SPREAD_BINS) + 1.0
    llr = []
    for _ in range(_SPREAD_ELECTRONS - 1):
        other = rng.integers(n, size=size)
        shift = rng.integers(-half, half + 1, size=(size, 2))
        for dr in range(-half, half + 1):
            for dc in range(-half, half + 1):
                at = np.flatnonzero((shift[:, 0] == dr) & (shift[:, 1] == dc))
                canvas[at, half + dr : half + dr + s, half + dc : half + dc + s] += members[other[at]]
        spread, peaks = _spreads_and_peaks(canvas, low, high)
        more = np.bincount(_spread_bins(spread[peaks == 1]), minlength=_SPREAD_BINS) + 1.0
        llr.append(np.log(more / more.sum()) - np.log(one / one.sum()))
    return tuple(float(x) for x in np.clip(np.concatenate(llr), -_MAX_LLR, _MAX_LLR))


@njit(nogil=True, cache=True, inline="always")
def _log_norm(model, n):
    # log of the gamma density's normalisation for n electrons: model's table, else computed
    i = N_MODEL + (_SPREAD_ELECTRONS - 1) * np.int64(model[5]) + n
    if i < model.shape[0]:
        return model[i]
    shape, scale = n * model[2], model[1] / model[2]
    return math.lgamma(shape) + shape * math.log(scale)


@njit(nogil=True, cache=True, inline="always")
def _log_factorial(d):
    return math.lgamma(d + 1.0) if d > 2 else (0.0 if d < 2 else 0.6931471805599453)


@njit(nogil=True, cache=True, inline="always")
def spread_bin(spread, model):
    """The spread bin of a one-peak cluster whose pixels have this spread (px^2); -1 when the
    model has no spread evidence."""
    bins = np.int64(model[5])
    return min(np.int64(max(spread, 0.0) / model[4]), bins - 1) if bins else -1


@njit(nogil=True, cache=True, inline="always")
def _pattern(model, spread, n):
    # log p(spread | n) - log p(spread | 1) of spread bin ``spread`` (-1: none), SingleElectronModel.spread_llr
    if spread < 0 or n < 2:
        return 0.0
    return model[N_MODEL + (min(n, _SPREAD_ELECTRONS) - 2) * np.int64(model[5]) + spread]


@njit(nogil=True, cache=True, inline="always")
def _score(charge, log_q, n, n_peaks, log_hidden, spread, model):
    """log p(charge, spread | n electrons) + log prior(n | n_peaks), up to terms that do not
    depend on n (the Poisson priors' exp(-mean) among them). ``spread``: a one-peak cluster's
    spread bin (spread_bin; -1 for others). The gamma densities' normalisations come from the
    model's table (SingleElectronModel.params): a few multiplications, not a log-gamma."""
    shape, scale = model[2], model[1] / model[2]
    score = (n * shape - 1.0) * log_q - charge / scale - _log_norm(model, n)
    score += _pattern(model, spread, n)
    d = n - n_peaks
    if d > 0:
        score += d * (log_hidden + math.log(n_peaks)) - _log_factorial(d)
    elif d < 0:
        score += -d * (_LOG_SPURIOUS + math.log(n_peaks)) - _log_factorial(-d)
    return score


@njit(nogil=True, cache=True)
def electrons_in_cluster(charge, log_q, n_peaks, log_hidden, spread, model):
    """How many electrons a cluster of ``charge`` ADU with ``n_peaks`` peaks most probably holds:
    the ``n`` that maximises _score. The charge of ``n`` electrons is gamma distributed with shape
    ``n k`` and mean ``n m`` (a sum of ``n`` single charges); the electrons beyond the peaks (two
    on one pixel, or too close to make two peaks) are Poisson with mean ``hidden * n_peaks``
    (``log_hidden``: the log of the cluster's rate of hidden electrons per peak, from the frame's
    total charge and the local density, counting.clusters._local_hidden: a cluster in the
    bright-field disc expects hidden electrons, one in the sparse outskirts does not); fewer
    electrons than peaks costs a Poisson term of mean ``SPURIOUS_PEAKS * n_peaks`` (noise peaks on a tail);
    ``spread``: a one-peak cluster's spread bin (spread_bin; -1 for others), whose evidence
    for n electrons rather than one the score adds. ``log_q``: log(charge), which the caller has."""
    mean, min_charge = model[1], model[3]
    if charge < min_charge:
        return 0
    # The score is concave in n (a log-concave density times log-concave priors): climb from the
    # peaks towards the charge's count, a few steps, not a scan of every n in between (a bright
    # cluster at high dose holds thousands).
    best = max(n_peaks, 1)
    best_score = _score(charge, log_q, best, n_peaks, log_hidden, spread, model)
    step = 1 if charge / mean > best else -1
    while best + step >= 1:
        score = _score(charge, log_q, best + step, n_peaks, log_hidden, spread, model)
        if score <= best_score:
            break
        best, best_score = best + step, score
    return best


@njit(nogil=True, cache=True, inline="always")
def _gain(log_q, n, n_peaks, step, log_hidden, spread, model):
    """_score(n + step) - _score(n) (step +1 or -1), from the difference of the two scores'
    terms rather than two scores: one logarithm instead of six for the common one-peak cluster."""
    up = n if step > 0 else n - 1  # the gain of going from up to up + 1 electrons
    d = up - n_peaks
    log_peaks = math.log(n_peaks) if n_peaks > 1 else 0.0
    gain = model[2] * log_q - (_log_norm(model, up + 1) - _log_norm(model, up))
    gain += _pattern(model, spread, up + 1) - _pattern(model, spread, up)
    if d >= 0:
        gain += log_hidden + log_peaks - (math.log(d + 1.0) if d > 0 else 0.0)
    else:
        gain += math.log(-d) - _LOG_SPURIOUS - log_peaks
    return gain * step


@njit(nogil=True, cache=True, inline="always")
def _reconcile_gain(tables, sums, j, step, model):
    # The score's change when cluster j gets step (+1 or -1) electrons; -inf when it cannot
    # (noise, or fewer electrons than its peaks).
    n, q = tables[j, 3], sums[j, 0]
    if q < model[3] or n + step < max(tables[j, 2], 1):
        return -np.inf
    return _gain(sums[j, 5], n, tables[j, 2], step, sums[j, 4], np.int64(sums[j, 3]), model)


# Compiled without numba's reference counting (no allocation): as a call per step, its arrays'
# counts cost more than the step (counting.clusters._leaf).
@njit(nogil=True, cache=True, _nrt=False)
def sift_down(key, index, size, i):
    """Restore a max-heap of ``key`` (float64) with ``index`` (int64) moved alike, below position
    i: i goes down to its larger child (the left one on a tie) while that one's key is larger.
    The child is chosen without a branch (which one it is, is a coin toss that a branch
    mispredicted half the time; at 0.05 e/px/frame a bright-field disc's cluster sifts thousands
    of electrons a frame). The frame's correction (reconcile) and the electrons beyond a basin's
    peak (counting.clusters._extras) share it."""
    while True:
        top = 2 * i + 1
        if top >= size:
            return
        if top + 1 < size:
            top += np.int64(key[top + 1] > key[top])
        if not key[top] > key[i]:
            return
        key[i], key[top] = key[top], key[i]
        index[i], index[top] = index[top], index[i]
        i = top


@njit(nogil=True, cache=True)
def reconcile(tables, sums, n_clusters, missing, model, gains):
    """Add (missing > 0) or take away (< 0) ``missing`` electrons, one at a time, where the score
    gains most or loses least: the clusters' most probable counts are biased (a cluster's charge
    alone cannot tell one bright electron from two), while the frame's total charge over the
    single-electron mean is an unbiased count of the whole frame (docs/counting.md). Electrons
    are taken only from clusters with more than their peaks: a peak is stronger evidence of an
    electron than the frame's total charge. A max-heap of the clusters by gain gives each
    electron its cluster, which may take several: at 0.02 e/px/frame the bright-field disc is
    one cluster of thousands, and the rounds of one electron per cluster this replaced (at most
    8) left it +4 % (Landau deposits; docs/counting.md section 4). ``sums[j, 3]``: cluster j's
    spread bin (spread_bin; -1 for none); ``sums[j, 4]``: its log rate of hidden electrons per
    peak (electrons_in_cluster); ``sums[j, 5]``: log of its charge."""
    if missing == 0:
        return
    step = 1 if missing > 0 else -1
    heap = np.empty(n_clusters, np.int64)  # clusters, with their gains in ``gains`` at the same place
    size = 0
    for j in range(n_clusters):
        gain = _reconcile_gain(tables, sums, j, step, model)
        if gain > -np.inf:
            gains[size], heap[size] = gain, j
            size += 1
    for i in range(size // 2 - 1, -1, -1):
        sift_down(gains, heap, size, i)
    for _ in range(abs(missing)):
        if size == 0:
            return
        j = heap[0]
        tables[j, 3] += step
        gains[0] = _reconcile_gain(tables, sums, j, step, model)
        if gains[0] == -np.inf:  # it cannot take another: the last leaf takes its place
            size -= 1
            gains[0], heap[0] = gains[size], heap[size]
        sift_down(gains, heap, size, 0)


@njit(nogil=True, cache=True)
def one_electron_below(log_hidden, spread, model):
    """The charge (ADU) below which a one-peak cluster of spread bin ``spread`` (-1: none) holds
    one electron: where the scores of 1 and 2 electrons in electrons_in_cluster cross (k log q =
    L(2) - L(1) - log hidden - the spread's evidence for 2), so most clusters need no logarithm
    at all."""
    pattern = _pattern(model, spread, 2)
    return math.exp((_log_norm(model, 2) - _log_norm(model, 1) - log_hidden - pattern) / model[2])
