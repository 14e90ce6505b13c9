"""The summed diffraction pattern on a finer grid than the detector's pixels, from each electron's
sub-pixel position: the super-resolution the cluster method's positions allow (docs/counting.md).

Each detector pixel becomes ``factor`` x ``factor`` bins; an electron at sub-pixel (row, col)
(pixel centres at integers, so pixel r spans [r - 0.5, r + 0.5)) lands in bin
``floor((row + 0.5) * factor)``, ``floor((col + 0.5) * factor)``. Events counted without a
sub-pixel position (strict maxima) sit at their pixel's centre, so each lands in the bin just
below and right of its pixel's centre: such a file gives the plain summed pattern, spread over
one bin in ``factor``^2. Not on by default: with ``factor`` 2 its partial is 6.6 MB (5 bytes a
bin, as summed_pattern's), and a node group sends it whole a few times a second live.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from stemstream.analysis.registry import register
from stemstream.analysis.views import View
from stemstream.analysis.virtual_detectors import SummedPattern, _pattern_kernel
from stemstream.core.detector import FRAME_SHAPE


@njit(nogil=True, cache=True)
def _bins_kernel(points, first, end, factor, rows, cols, bins):
    """The bin of each point ``points[first:end]`` into ``bins`` at the same index, on a grid of
    (rows * factor, cols * factor); a point on the frame's far edge (row rows - 0.5) goes to the
    last bin, not past it."""
    bin_cols = cols * factor
    for j in range(first, end):
        r = min(max(np.int64(math.floor((points[j, 0] + 0.5) * factor)), 0), rows * factor - 1)
        c = min(max(np.int64(math.floor((points[j, 1] + 0.5) * factor)), 0), bin_cols - 1)
        bins[j] = r * bin_cols + c


class UpsampledPattern(SummedPattern):
    """Electrons per bin of ``factor`` x ``factor`` bins a detector pixel, summed over the scan,
    from their sub-pixel positions. Parameter ``factor`` (2-8, default 2). Result ``pattern``
    (frame rows * factor, frame cols * factor) int64."""

    name = "upsampled_pattern"
    subpixel = True
    descriptions = {"pattern": "electrons per sub-pixel bin (factor x factor a detector pixel), summed over the scan, "
                               "from their sub-pixel positions"}

    def __init__(self, frame_shape: tuple[int, int] = FRAME_SHAPE, factor: int = 2):
        super().__init__(frame_shape)
        if isinstance(factor, bool) or not isinstance(factor, int) or not 2 <= factor <= 8:
            raise ValueError(f"upsampled_pattern factor must be an integer in 2..8, got {factor!r}")
        self.factor = factor
        self.params = {"factor": factor}
        self.n_bins = self.n_pixels * factor * factor

    def new_partial(self, scan_shape):
        # electrons per bin = 256 * high + low, as summed_pattern's (merge inherited)
        return {"low": np.zeros(self.n_bins, np.uint8), "high": np.zeros(self.n_bins, np.uint32)}

    def update(self, partial, positions, events, offsets, points):
        first, end = int(offsets[0]), int(offsets[-1])
        bins = np.empty(end, np.uint32)  # at the events' own indices, as the pattern kernel reads them
        _bins_kernel(points, first, end, self.factor, self.frame_shape[0], self.frame_shape[1], bins)
        _pattern_kernel(partial["low"], partial["high"], bins, offsets)

    def finish(self, partial, scan_shape):
        total = partial["high"].astype(np.int64) * 256 + partial["low"]
        return {"pattern": total.reshape(self.frame_shape[0] * self.factor, self.frame_shape[1] * self.factor)}

    def show(self, results):
        return {"pattern": View(results["pattern"], "log")}


register(UpsampledPattern)
