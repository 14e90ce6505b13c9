"""A cluster of several peaks split into its peaks' basins before its electrons are counted
(counting.clusters): each member pixel belongs to the peak that its steepest way up reaches.

Where electrons crowd (the bright-field disc), clusters merge into ones of many electrons, and
the charge of a cluster of n electrons varies by sqrt(n / k) single-electron charges (k, the
gamma shape, ~4): a cluster of 5 was miscounted by about one. Split, each basin holds one peak's
electron(s) and is counted as a cluster of one peak is, by its own charge, spread and the local
rate of hidden electrons, so the peaks themselves, the strongest evidence there is, carry the
count. (docs/counting.md section 4: what the split changed, per dose and charge model.)

The order of pixels is the peaks': higher value first, then the lower flat index (so a plateau
has one peak, as counting.cluster_labels finds them). A pixel's way up goes to its highest member
neighbour, when that one is above it.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from stemstream.counting.cluster_events import _row

# Basins a cluster may have: their numbers go in a uint16 image (the thread's label image, half
# the cache lines of an int32 one). A cluster of more, half a frame's peaks, stays whole.
_MOST_BASINS = 65535


@njit(nogil=True, cache=True, inline="always")
def _above(flat, lo, hi, s, best, top):
    # (s, its value) when s is a member ranking above best (value top), else (best, top).
    v = flat[s]
    if lo <= v <= hi and (v > top or (v == top and s < best)):
        return s, v
    return best, top


@njit(nogil=True, cache=True)
def _uphill(flat, rows, cols, lo, hi, p):
    # The highest member among p and its 8 neighbours (ties to the lower flat index). Written
    # out for pixels off the frame's edge (no bounds, no 64-bit division: a third of the split's
    # time was this test's loops).
    r = _row(p, 1.0 / cols)
    c = p - r * cols
    best, top = p, flat[p]
    if 0 < r < rows - 1 and 0 < c < cols - 1:
        for s in (p - cols - 1, p - cols, p - cols + 1, p - 1, p + 1, p + cols - 1, p + cols, p + cols + 1):
            best, top = _above(flat, lo, hi, s, best, top)
        return best
    for rr in range(max(r - 1, 0), min(r + 2, rows)):
        for cc in range(max(c - 1, 0), min(c + 2, cols)):
            best, top = _above(flat, lo, hi, rr * cols + cc, best, top)
    return best


@njit(nogil=True, cache=True)
def _basins(flat, rows, cols, lo, hi, members, basin, path):
    """Each member's basin (1, 2, ...) into the ``basin`` image, by walking up from each pixel
    until a pixel already placed or a peak (a new basin); returns how many basins."""
    n_basins = 0
    for p in members:
        if basin[p] != 0:
            continue
        length, q = 0, p
        while basin[q] == 0:
            path[length] = q
            length += 1
            up = _uphill(flat, rows, cols, lo, hi, q)
            if up == q:
                n_basins += 1
                basin[q] = n_basins
            q = up
        for k in range(length):
            basin[path[k]] = basin[q]
    return n_basins


@njit(nogil=True, cache=True)
def split_basins(flat, rows, cols, lo, hi, pedestal, pixels, tables, sums, n_clusters, basin, scratch):
    """Split each cluster of several peaks (tables[j, 2] > 1) into its basins: the first basin
    takes the cluster's row of ``tables`` / ``sums``, the others new rows after the clusters, each
    with its pixels grouped (raster order kept) in the cluster's part of ``pixels``, one peak and
    its charge sums (as counting.cluster_labels.label_clusters gives them). ``basin``: a uint16
    image of zeros, zeros again on return; ``scratch``: int64, the frame's size plus its most
    peaks plus one (counting.cluster_counter._scratch). Returns the new number of clusters (a
    cluster stays whole when the tables have no room for its basins)."""
    n = n_clusters
    inv_cols = 1.0 / cols
    for j in range(n_clusters):
        start, size, n_peaks = tables[j, 0], tables[j, 1], tables[j, 2]
        if n_peaks < 2 or n_peaks > _MOST_BASINS or n + n_peaks - 1 > tables.shape[0]:
            continue
        members = pixels[start : start + size]
        n_basins = _basins(flat, rows, cols, lo, hi, members, basin, scratch)
        # Counting sort of the members by basin (stable: raster order within a basin), its counts
        # in the scratch after the grouped pixels (an allocation per cluster cost as much).
        first = scratch[size : size + n_basins + 1]
        first[:] = 0
        for p in members:
            first[basin[p]] += 1
        for b in range(n_basins):
            first[b + 1] += first[b]  # first[b]: where basin b + 1's pixels start
        grouped = scratch[:size]
        for p in members:
            b = basin[p] - 1
            grouped[first[b]] = p
            first[b] += 1
        for b in range(n_basins):
            row = j if b == 0 else n + b - 1
            begin, end = (first[b - 1] if b > 0 else 0), first[b]
            tables[row, 0], tables[row, 1], tables[row, 2], tables[row, 3] = start + begin, end - begin, 1, 0
            charge, along_rows, along_cols = 0.0, 0.0, 0.0
            for i in range(begin, end):
                p = grouped[i]
                members[i] = p
                basin[p] = 0
                w = np.float64(flat[p]) - pedestal
                r = _row(p, inv_cols)
                charge += w
                along_rows += w * r
                along_cols += w * (p - r * cols)
            sums[row, 0], sums[row, 1], sums[row, 2] = charge, along_rows, along_cols
        n += n_basins - 1
    return n
