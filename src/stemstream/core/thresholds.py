"""Electron-counting thresholds as every role passes them around: two numbers in ADU and the
statistics behind them (how they were fitted lives in stemstream.counting.thresholds)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class Thresholds:
    """Background and X-ray thresholds in ADU, with the statistics behind them.

    Field names map onto stempy's ``/metadata/electron_counting`` attributes (see
    :meth:`stempy_attributes`).
    """

    background: float
    xray: float
    calculated: bool = False
    number_of_samples: int = 0
    min_sample: float = 0.0
    max_sample: float = 0.0
    mean: float = 0.0
    variance: float = 0.0
    std_dev: float = 0.0
    number_of_bins: int = 0
    xray_n_sigma: float = 0.0
    background_n_sigma: float = 0.0
    optimized_mean: float = 0.0
    optimized_std_dev: float = 0.0

    def __post_init__(self):
        if not (math.isfinite(self.background) and math.isfinite(self.xray)):
            raise ValueError(f"thresholds must be finite numbers, got background={self.background}, xray={self.xray}")
        if self.xray <= self.background:
            raise ValueError(
                f"the X-ray threshold ({self.xray:g} ADU) must be above the background threshold ({self.background:g} ADU)"
            )

    def stempy_attributes(self) -> dict:
        """The attributes stempy writes under ``/metadata/electron_counting``."""
        return {
            "background_threshold": self.background,
            "x_ray_threshold": self.xray,
            "number_of_samples": self.number_of_samples,
            "min_sample": self.min_sample,
            "max_sample": self.max_sample,
            "mean": self.mean,
            "variance": self.variance,
            "std_dev": self.std_dev,
            "number_of_bins": self.number_of_bins,
            "x_ray_threshold_n_sigma": self.xray_n_sigma,
            "background_threshold_n_sigma": self.background_n_sigma,
            "optimized_mean": self.optimized_mean,
            "optimized_std_dev": self.optimized_std_dev,
            "threshold_calculated": self.calculated,
        }

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Thresholds":
        """The thresholds of an ``as_dict()`` map; ValueError for anything else."""
        if not isinstance(values, dict):
            raise ValueError("thresholds must be a map")
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown or "background" not in values or "xray" not in values:
            raise ValueError(f"thresholds need background and xray and nothing but {sorted(known)}")
        try:
            return cls(**values)
        except TypeError as exc:
            raise ValueError(f"thresholds: {exc}") from None


def fixed_thresholds(background: float, xray: float) -> Thresholds:
    """Thresholds given by the user (ADU)."""
    return Thresholds(background=float(background), xray=float(xray), calculated=False)
