"""The calibration's single electrons: the clusters of a frame that look like one isolated
electron, their charges and the charge around their peaks, from which counting.cluster_model fits
the single-electron model (through counting.cluster_counter.calibrate_cluster_model).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from stemstream.counting.cluster_labels import label_clusters

# A calibration cluster has no other within this many pixels: far enough that it comes from
# where the local dose is low, so that two electrons on one pixel (one peak, twice the charge)
# are rare among them even in a bright-field disc.
_ALONE = 6


@njit(nogil=True, cache=True)
def _patch(flat, rows, cols, pedestal, members, patch):
    # The charge around a one-peak cluster's peak: its highest pixel (the first in raster order
    # among equals, as peaks tie), the cluster's members in raster order.
    top = members[0]
    for p in members:
        if flat[p] > flat[top]:
            top = p
    half = patch.shape[0] // 2
    r0, c0 = top // cols - half, top % cols - half
    for i in range(patch.shape[0]):
        for k in range(patch.shape[1]):
            r, c = r0 + i, c0 + k
            inside = 0 <= r < rows and 0 <= c < cols
            patch[i, k] = np.float64(flat[r * cols + c]) - pedestal if inside else 0.0


@njit(nogil=True, cache=True)
def _clear(label, pixels, tables, n_clusters):
    # Back to all 0 for the next frame: only the labelled pixels, not the whole image.
    if n_clusters:
        for i in range(tables[n_clusters - 1, 0] + tables[n_clusters - 1, 1]):
            label[pixels[i]] = 0


@njit(nogil=True, cache=True)
def single_electron_charges(frame, lo, hi, pedestal, scratch, charges, patches):
    """Charges (ADU) of the frame's clusters that look like one isolated electron: one peak, no
    pixel on the frame's edge, no other cluster within _ALONE px of the cluster's bounding box.
    Written to ``charges``, and to ``patches`` (its size, s, s) the charge above the pedestal
    (noise included) in the s x s pixels centred on each one's peak (0 off the frame); returns
    how many (at most charges' size)."""
    label, used, pixels, peaks, tables, sums, gains, where = scratch
    rows, cols = frame.shape
    flat = frame.reshape(-1)
    n_clusters = label_clusters(flat, rows, cols, lo, hi, pedestal, pixels, peaks, tables, sums)
    for j in range(n_clusters):  # the label image, for the test of other clusters nearby
        for i in range(tables[j, 0], tables[j, 0] + tables[j, 1]):
            label[pixels[i]] = j + 1
    n = 0
    for j in range(n_clusters):
        if tables[j, 2] != 1 or n == charges.shape[0]:
            continue
        r0, r1, c0, c1 = rows, -1, cols, -1
        for i in range(tables[j, 0], tables[j, 0] + tables[j, 1]):
            p = pixels[i]
            r0, r1 = min(r0, p // cols), max(r1, p // cols)
            c0, c1 = min(c0, p % cols), max(c1, p % cols)
        if r0 == 0 or c0 == 0 or r1 == rows - 1 or c1 == cols - 1:
            continue
        alone = True
        for rr in range(max(r0 - _ALONE, 0), min(r1 + _ALONE + 1, rows)):
            for cc in range(max(c0 - _ALONE, 0), min(c1 + _ALONE + 1, cols)):
                s = label[rr * cols + cc]
                if s != 0 and s != j + 1:
                    alone = False
        if alone:
            charges[n] = sums[j, 0]
            _patch(flat, rows, cols, pedestal, pixels[tables[j, 0] : tables[j, 0] + tables[j, 1]], patches[n])
            n += 1
    _clear(label, pixels, tables, n_clusters)
    return n
