"""Example analysis to copy: a radial profile per scan position (electrons in concentric rings).

A method developer's whole analysis is a module like this one (see docs/analyses.md):
parameters checked in ``__init__``, a zeroed partial, a numba kernel that adds a batch of counted
frames, a finish, what to show, and one ``register`` line. Enable it with
``enabled = [..., "radial_profile"]`` in the ``[analysis]`` configuration.
"""

import numpy as np
from numba import njit

from stemstream.analysis.checks import check_point, check_radii, default_center
from stemstream.analysis.interface import Analysis
from stemstream.analysis.registry import register
from stemstream.analysis.views import View
from stemstream.core.detector import FRAME_SHAPE


@njit(nogil=True, cache=True)
def _rings_kernel(profile, ring_of_pixel, positions, events, offsets):
    for i in range(positions.shape[0]):  # frame i: position p, electrons events[offsets[i]:offsets[i+1]]
        p = positions[i]
        if p < 0 or p >= profile.shape[0]:  # stay memory safe whoever calls us
            continue
        for j in range(offsets[i], offsets[i + 1]):
            ring = ring_of_pixel[events[j]]
            if ring >= 0:
                profile[p, ring] += 1


class RadialProfile(Analysis):
    """Electrons per position in ``bins`` rings of equal width from ``inner`` to ``outer`` px about
    ``center`` (row, col; None: the frame centre). Result ``profile`` (rows, cols, bins) int64."""

    name = "radial_profile"
    per_position = ("profile",)  # first axis = scan position: only touched rows travel live
    descriptions = {"profile": "electrons per scan position in each ring (last axis), inner to outer"}

    def __init__(self, frame_shape=FRAME_SHAPE, center=None, inner=0.0, outer=288.0, bins=4):
        super().__init__(frame_shape)
        center = default_center(self.frame_shape) if center is None else check_point("radial_profile center", center)
        inner, outer = check_radii("radial_profile", (inner, outer))
        if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= 1024:
            raise ValueError(f"radial_profile bins must be an integer in 1..1024, got {bins!r}")
        self.params = {"center": list(center), "inner": inner, "outer": outer, "bins": bins}
        rows, cols = np.indices(self.frame_shape)
        r = np.hypot(rows - center[0], cols - center[1]).reshape(-1)
        ring = np.floor((r - inner) / ((outer - inner) / bins)).astype(np.int64)
        # int16 (-1: no ring): a small table stays in cache better than a wide one
        self.ring_of_pixel = np.where((r >= inner) & (r < outer), np.minimum(ring, bins - 1), -1).astype(np.int16)

    def new_partial(self, scan_shape):
        return {"profile": np.zeros((scan_shape[0] * scan_shape[1], self.params["bins"]), np.int64)}

    def update(self, partial, positions, events, offsets):
        _rings_kernel(partial["profile"], self.ring_of_pixel, positions, events, offsets)

    # merge (add) and reset (zeros) are inherited: sums merge by adding.

    def finish(self, partial, scan_shape):
        return {"profile": partial["profile"].reshape(*scan_shape, -1).copy()}

    def show(self, results):
        profile = results["profile"]
        return {f"ring_{k}": View(profile[:, :, k]) for k in range(profile.shape[2])}


register(RadialProfile)
