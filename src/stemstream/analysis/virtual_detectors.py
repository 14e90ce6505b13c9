"""Virtual detectors on counted events: annular bright field / dark field, counts image, summed pattern.

Conventions, checked against ``stempy.image.create_stem_images`` 3.6.0 on sparse data (tests):

- a pixel (row, col) belongs to an annulus of radii (inner, outer) about a centre when
  ``inner**2 <= (row - centre_row)**2 + (col - centre_col)**2 < outer**2`` (inner inclusive, outer
  exclusive), computed in float64 with the centre used as given (not rounded);
- stempy takes its ``center`` as (x, y) = (col, row); ours is (row, col) like everything else here;
- stempy's default centre (``center=(-1, -1)``) is (round(rows / 2), round(cols / 2)) with halves
  rounded up: (288, 288) on the 4D Camera. ``center=None`` here means the same;
- each electron adds 65535 to stempy's image (it masks a 0/1 frame with a 0xFFFF mask), so
  stempy's image / 65535 = electrons in the annulus, summed over all frames of a position. Ours
  counts electrons directly (int64);
- stempy requires integer radii; ours may be fractional. stempy accepts inner >= outer (an empty
  image); here that is a ValueError.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numba import njit

from stemstream.analysis.base import (
    DEFAULT_FRAME_SHAPE,
    Analysis,
    View,
    check_name,
    check_point,
    check_radii,
    default_center,
    register,
)

#: Default radii (px) for the 4D Camera with the simulator's bright-field disk (radius 72 px).
DEFAULT_BRIGHT_FIELD = (0.0, 80.0)
DEFAULT_ANNULAR_DARK_FIELD = (90.0, 288.0)
MAX_DETECTORS = 16


def annulus_mask(frame_shape: tuple[int, int], center: tuple[float, float], inner: float, outer: float) -> np.ndarray:
    """Bool (rows, cols): ``inner**2 <= r**2 < outer**2`` about ``center`` (row, col), as stempy."""
    rows, cols = frame_shape
    r = np.arange(rows, dtype=np.float64)[:, None] - center[0]
    c = np.arange(cols, dtype=np.float64)[None, :] - center[1]
    d2 = r * r + c * c
    return (d2 >= inner * inner) & (d2 < outer * outer)


@njit(nogil=True, cache=True)
def _detectors_kernel(images, lut, positions, events, offsets):
    # images (n_positions, n_detectors + 1) int64, the last column counts all electrons;
    # lut (n_pixels,) uint16: bit k set where the pixel belongs to detector k.
    n_positions = images.shape[0]
    n_det = images.shape[1] - 1
    hits = np.zeros(MAX_DETECTORS, np.int64)
    for i in range(positions.shape[0]):
        p = positions[i]
        if p < 0 or p >= n_positions:
            continue
        for k in range(n_det):
            hits[k] = 0
        for j in range(offsets[i], offsets[i + 1]):
            bits = lut[events[j]]
            for k in range(n_det):
                hits[k] += (bits >> k) & 1
        for k in range(n_det):
            images[p, k] += hits[k]
        images[p, n_det] += offsets[i + 1] - offsets[i]


@njit(nogil=True, cache=True)
def _pattern_kernel(pattern, events, offsets):
    for j in range(offsets[0], offsets[offsets.shape[0] - 1]):
        pattern[events[j]] += 1


class VirtualDetectors(Analysis):
    """Annular virtual detectors and the counts image, one pass over the events.

    Parameters (pixels): ``center`` (row, col), None for stempy's default; ``bright_field`` and
    ``annular_dark_field`` (inner, outer) radii; ``extra`` more named annuli {name: (inner, outer)}.
    Results (rows, cols) int64: one image per detector (electrons inside it) and ``counts``
    (all electrons per position).
    """

    name = "virtual_detectors"
    per_position = ("images",)
    descriptions = {
        "bright_field": "electrons per scan position inside the bright-field disk (stempy create_stem_images / 65535)",
        "annular_dark_field": "electrons per scan position inside the dark-field annulus (stempy create_stem_images / 65535)",
        "counts": "electrons per scan position, all frames of the position together",
    }

    def __init__(
        self,
        frame_shape: tuple[int, int] = DEFAULT_FRAME_SHAPE,
        center: tuple[float, float] | None = None,
        bright_field: tuple[float, float] = DEFAULT_BRIGHT_FIELD,
        annular_dark_field: tuple[float, float] = DEFAULT_ANNULAR_DARK_FIELD,
        extra: Mapping[str, tuple[float, float]] | None = None,
    ):
        super().__init__(frame_shape)
        centre = default_center(self.frame_shape) if center is None else check_point("virtual_detectors center", center)
        detectors = {
            "bright_field": check_radii("bright_field", bright_field),
            "annular_dark_field": check_radii("annular_dark_field", annular_dark_field),
        }
        if extra is not None and not isinstance(extra, Mapping):
            raise ValueError(f"extra detectors must be a mapping name -> (inner, outer), got {extra!r}")
        for name, radii in (extra or {}).items():
            check_name("extra detector name", name)
            if name in detectors or name == "counts":
                raise ValueError(f"extra detector name {name!r} is taken")
            detectors[name] = check_radii(f"extra detector {name}", radii)
        if len(detectors) > MAX_DETECTORS:
            raise ValueError(f"at most {MAX_DETECTORS} detectors, got {len(detectors)}")
        self.center = centre
        self.detectors = detectors
        self.params = {
            "center": list(centre),
            "center_default": center is None,
            "bright_field": list(detectors["bright_field"]),
            "annular_dark_field": list(detectors["annular_dark_field"]),
            "extra": {k: list(v) for k, v in detectors.items() if k not in ("bright_field", "annular_dark_field")},
        }
        lut = np.zeros(self.n_pixels, np.uint16)
        for k, (inner, outer) in enumerate(detectors.values()):
            lut |= annulus_mask(self.frame_shape, centre, inner, outer).reshape(-1).astype(np.uint16) << k
        self.lut = lut

    def mask(self, detector: str) -> np.ndarray:
        """The (rows, cols) bool mask of one detector."""
        k = list(self.detectors).index(detector)
        return ((self.lut >> k) & 1).astype(bool).reshape(self.frame_shape)

    def new_partial(self, scan_shape):
        n = scan_shape[0] * scan_shape[1]
        return {"images": np.zeros((n, len(self.detectors) + 1), np.int64)}

    def update(self, partial, positions, events, offsets):
        _detectors_kernel(partial["images"], self.lut, positions, events, offsets)

    def finish(self, partial, scan_shape):
        images = partial["images"]
        out = {name: images[:, k].reshape(scan_shape).copy() for k, name in enumerate(self.detectors)}
        out["counts"] = images[:, -1].reshape(scan_shape).copy()
        return out

    def show(self, results):
        return {name: View(image) for name, image in results.items()}

    def result_attrs(self, results) -> dict[str, dict[str, Any]]:
        attrs = {
            name: {"inner_radius": inner, "outer_radius": outer, "center": list(self.center)}
            for name, (inner, outer) in self.detectors.items()
        }
        for name in self.detectors:
            if name not in self.descriptions:
                attrs[name]["description"] = "electrons per scan position inside the annulus"
        return attrs


class SummedPattern(Analysis):
    """Summed diffraction pattern: electrons per detector pixel over the whole scan.

    Result ``pattern`` (frame rows, frame cols) int64 (equals ``stempy.image.calculate_sum_sparse``
    over all frames)."""

    name = "summed_pattern"
    descriptions = {"pattern": "electrons per detector pixel, summed over all frames of the scan"}

    def __init__(self, frame_shape: tuple[int, int] = DEFAULT_FRAME_SHAPE):
        super().__init__(frame_shape)

    def new_partial(self, scan_shape):
        return {"pattern": np.zeros(self.n_pixels, np.int64)}

    def update(self, partial, positions, events, offsets):
        # The position does not matter here; ScanAnalyses has already dropped frames outside the scan.
        _pattern_kernel(partial["pattern"], events, offsets)

    def finish(self, partial, scan_shape):
        return {"pattern": partial["pattern"].reshape(self.frame_shape).copy()}

    def show(self, results):
        return {"pattern": View(results["pattern"], "log")}


register(VirtualDetectors)
register(SummedPattern)
