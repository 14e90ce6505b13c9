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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stemstream.core.thresholds import Thresholds

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
