"""The compiled cluster-counting kernel: the basins of the pixels above the background
threshold, the number of electrons in each from its charge, each electron at a sub-pixel
position.

The second counting method (``[counting] method = "clusters"``; the default, "maxima", is
counting.kernel, stempy's strict 3 x 3 maxima). Per frame:

1. **Basins.** Pixels with ``lo <= value <= hi`` (the thresholds' integer window, as the maxima
   kernel; X-ray pixels above ``hi`` count as empty) belong to the peak their steepest way up
   reaches (counting.cluster_basins.label_basins: a peak is a pixel not smaller than any of its 8
   neighbours above the threshold, ties to the lower flat index, so a plateau is one peak). Each
   basin's charge is ``sum(value - pedestal)`` over its pixels.
2. **Electrons per basin.** ``n`` maximises ``log p(charge | n) + log prior(n)``
   (counting.cluster_model.electrons_in_cluster, for one peak: the charge of ``n`` electrons is
   gamma distributed with shape ``n * k`` and mean ``n * m``, the electrons beyond the peak are
   Poisson with a rate from the frame's own total charge shared out by the local density
   (_local_hidden), and the basin's spread, the charge-weighted variance of its pixels'
   positions along its major axis, is as likely for ``n`` electrons as the calibration says,
   counting.cluster_model.spread_llr); then the frame's total charge (with each basin's halo,
   the pixels below the threshold beside it) over one electron's (with its halo), an unbiased
   count at any dose, puts right the basins' biased most probable counts
   (counting.cluster_model.reconcile). A basin with less charge than ``min_charge`` is noise.

Positions: one electron sits at the charge-weighted centroid of its basin; of ``n > 1``, the
first sits at the charge-weighted centroid of the members in its peak's 3 x 3 window, and the
others (two on one pixel, or too close to make a peak each) go, one at a time, to the basin
pixel whose charge is least explained (its charge less ``2 m`` for each electron already on it;
_extras). Each electron's event is the pixel of its position; stempy's readers set
``dense[frame] += 1`` (numpy fancy indexing: a pixel listed twice counts once) and our writer
keeps stempy's sorted unique lists, so a second electron on a pixel already taken gets the
nearest free pixel within 2 px of its position. Dense counts per frame then equal the
electrons counted.

All kernels release the GIL; each thread keeps a used-pixel image (uint8) and a label image
(uint16: at most 65,535 basins a frame) of its own, clears only the pixels a frame set: the
basins' scan codes and numbers (counting.cluster_basins), then the electrons' pixels.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from stemstream.core.detector import FRAME_SHAPE
from stemstream.counting.cluster_basins import label_basins
from stemstream.counting.cluster_events import _row, _sort_events
from stemstream.counting.cluster_model import (
    electrons_in_cluster,
    one_electron_below,
    reconcile,
    sift_down,
    spread_bin,
)

# A cluster's rate of hidden electrons never goes below this (log of 0 is not a prior).
_MIN_HIDDEN = 0.002
# What an electron already on a pixel explains of its charge, in single-electron means, when
# the electrons beyond a cluster's peaks choose their pixels (_extras): twice the mean, not once,
# as a bright electron (its charge spreads by ~50 %, Landau-like deposits further) leaves more than
# the mean on its pixel, and a second electron there gets a neighbouring free pixel anyway (_place).
# Recall at 0.005 e/px/frame with 1, 2 and other values: docs/counting.md section 2, step 4.
_EXPLAINED = 2.0
# The frame's charge counts its electrons within sqrt(electrons / k) (a sum of gamma charges of
# shape k); the clusters' counts are put right only where they differ by more than this many of
# those, so that noise does not add or take electrons (benchmarks/bench_counting_methods.py, 128
# frames a dose and charge model: 0.5 gave precision +0.001 to +0.006 for recall -0.003 at most,
# 1 and 2 more of each, and totals 1-3 % lower).
_TOTAL_BAND = 0.5
# Tiles (pixels a side) of the local density that shares out a frame's hidden electrons
# (_local_hidden): the density is taken over 3 x 3 of them, 96 x 96 px, a fraction of the
# bright-field disc, where most electrons land.
_TILE = 32
# Basin sizes (pixels) whose logarithms _local_hidden tabulates once a frame.
_LOGGED_SIZES = 64
_ROWS, _COLS = FRAME_SHAPE
# Basins (or the calibration's clusters) a frame: their numbers are uint16, 0 meaning none.
LABELS = 65535

# The per-cluster and per-electron helpers allocate nothing, so they are compiled without numba's
# reference counting (``_nrt=False``): with it, every array they take cost an atomic increment and
# decrement per call, and per inlined call too (numba's inlining copies the array variables):
# ~7 % of the kernel's time at 0.005 e/px/frame (331 -> 309 us a frame). LLVM still inlines the
# small ones.
_leaf = njit(nogil=True, cache=True, _nrt=False)


@_leaf
def _centroid(flat, rows, cols, lo, hi, around, pedestal, where, k):
    """Charge-weighted centroid (row, col), into where[k:k + 2], of the cluster's pixels in the 3 x 3 window of
    pixel ``around``: those with lo <= value <= hi (next to ``around``, so in its cluster; no label image to read)."""
    ar = _row(around, 1.0 / cols)
    ac = around - ar * cols
    wsum, ysum, xsum = 0.0, 0.0, 0.0
    for rr in range(ar - 1, ar + 2):  # all 9 (unrolled), one off the frame read at the edge with weight 0.0
        for cc in range(ac - 1, ac + 2):
            v = flat[min(max(rr, 0), rows - 1) * cols + min(max(cc, 0), cols - 1)]
            # Without a branch (which of the 9 pixels are members is random: a branch per pixel mispredicted): a
            # non-member's weight is 0.0, which leaves the sums as they were (w * rr is -0.0 above row 0: as well).
            inside = (rr >= 0) & (rr < rows) & (cc >= 0) & (cc < cols)
            w = max(np.float64(v) - pedestal, 0.0) * ((v >= lo) & (v <= hi) & inside)
            wsum += w
            ysum += w * rr
            xsum += w * cc
    if wsum > 0:
        where[k], where[k + 1] = ysum / wsum, xsum / wsum
    else:
        where[k], where[k + 1] = ar, ac


@_leaf
def _place(used, rows, cols, y, x):
    """The pixel of an electron at (y, x): its own, or the nearest one not yet used by this frame
    (``used[p] != 0``) within 2 px; -1 when all 25 are taken."""
    r0 = min(max(int(y + 0.5), 0), rows - 1)
    c0 = min(max(int(x + 0.5), 0), cols - 1)
    if used[r0 * cols + c0] == 0:
        return r0 * cols + c0
    best, best_d = -1, 1e300
    for rr in range(max(r0 - 2, 0), min(r0 + 3, rows)):
        for cc in range(max(c0 - 2, 0), min(c0 + 3, cols)):
            s = rr * cols + cc
            if used[s] != 0:
                continue
            d = (rr - y) ** 2 + (cc - x) ** 2
            if d < best_d:
                best, best_d = s, d
    return best


@_leaf
def _emit(used, rows, cols, where, out, positions, n_out):
    """The event of an electron at ``where`` (see _place); returns the new number of events."""
    if n_out == out.shape[0]:
        return n_out
    p = _place(used, rows, cols, where[0], where[1])
    if p < 0:
        return n_out  # 25 electrons already within 2 px: a frame of pure charge
    used[p] = 1
    out[n_out] = p
    positions[n_out, 0], positions[n_out, 1] = where[0], where[1]
    return n_out + 1


@_leaf
def _emit_centre(used, rows, cols, p, where, out, positions, n_out):
    row = _row(p, 1.0 / cols)
    where[0], where[1] = row, p - row * cols
    return _emit(used, rows, cols, where, out, positions, n_out)


@_leaf
def _extras(flat, rows, cols, pedestal, mean, used, members, start, size, extra, out, positions, n_out, where, key, index):
    """The electrons of a cluster beyond its peaks (two on one pixel, or too close to make a peak each): each at
    the cluster pixel (``members[start:start + size]``) with the most charge not yet explained, a pixel's charge
    less _EXPLAINED single-electron means for each electron already there (its peak's, then extras'): where the
    charge says the hidden electrons are, not at the highest peak again. Their positions are the pixels' centres
    (sharing a pixel, their centroids are one point). ``key``, ``index``: float64 and int64 scratch for the heap,
    the cluster's size (an allocation per cluster cost more than the heap). Returns the new n_out."""
    top, first, ties = -np.inf, 0, 0
    for i in range(size):
        p = members[start + i]
        key[i] = np.float64(flat[p]) - pedestal - _EXPLAINED * mean * used[p]
        index[i] = i
        # The first largest key and how many share it, without a branch (which pixel is, is random)
        ties = np.int64(1) if key[i] > top else ties + np.int64(key[i] == top)
        first = i if key[i] > top else first
        top = max(top, key[i])
    # One extra (most clusters that have any) goes where the heap's root would be, the largest key,
    # without building the heap (~6 us a frame at 0.005); with a tie the heap's own order decides.
    if extra == 1 and ties == 1:
        return _emit_centre(used, rows, cols, members[start + first], where, out, positions, n_out)
    for i in range(size // 2 - 1, -1, -1):
        sift_down(key, index, size, i)
    for _ in range(extra):
        n_out = _emit_centre(used, rows, cols, members[start + index[0]], where, out, positions, n_out)
        key[0] -= _EXPLAINED * mean
        sift_down(key, index, size, 0)
    return n_out


@_leaf
def _peak_of(flat, pixels, start, size):
    """The peak of a basin (``pixels[start:start + size]``, raster order): its first highest pixel
    (the others are not larger, or later in raster order: label_basins's order of peaks)."""
    top = pixels[start]
    for i in range(start + 1, start + size):
        top = pixels[i] if flat[pixels[i]] > flat[top] else top
    return top


@_leaf
def _spread(size, charge, along_rows, along_cols, rows_squared, cols_squared, rows_cols):
    """The charge-weighted variance of a basin's pixel positions along its major axis (px^2),
    about its centroid: the larger eigenvalue of their covariance, from its sums (charge, and
    charge times row, col, row^2, col^2 and row * col; label_basins), as cluster_model.
    _spreads_and_peaks computes it for the calibration patches. Two electrons spread along the
    line between them; the variance across it is one electron's (docs/counting.md section 2).
    Two pixels vary along their line only: their variance, rows plus cols, without the root."""
    if size == 1 or charge <= 0:
        return 0.0
    centre_row, centre_col = along_rows / charge, along_cols / charge
    var_rows = rows_squared / charge - centre_row * centre_row
    var_cols = cols_squared / charge - centre_col * centre_col
    if size == 2:
        return max(var_rows + var_cols, 0.0)
    cov = rows_cols / charge - centre_row * centre_col
    half = 0.5 * (var_rows - var_cols)
    return max(0.5 * (var_rows + var_cols) + math.sqrt(half * half + cov * cov), 0.0)


@njit(nogil=True, cache=True, inline="always")
def _tile_of(pixels, tables, j, cols, inv_cols):
    # (row, col) of the _TILE x _TILE tile holding cluster j's first pixel.
    first = pixels[tables[j, 0]]
    r = _row(first, inv_cols)
    return r // _TILE, (first - r * cols) // _TILE


@_leaf
def _frame_charge(cols, model, pixels, tables, sums, n_clusters, tile_e, tile_p):
    """Per tile (_TILE x _TILE pixels; tile_e, tile_p: (rows, cols) of tiles), the charge in units
    of one electron's charge with its halo, and the peaks, of the basins above min_charge whose
    first pixel is in it: their own charge and their halos' (sums[:, 4], the pixels below the
    threshold next to a member, above, below, left or right, each counted once:
    cluster_basins.label_basins; SingleElectronModel.halo_mean). Each basin's tile (its flat
    index in tile_e) into tables[:, 3]."""
    min_charge, unit = model[3], 1.0 / model[6]
    inv_cols = 1.0 / cols
    n_tile_cols = tile_e.shape[1]
    for j in range(n_clusters):
        ti, tj = _tile_of(pixels, tables, j, cols, inv_cols)
        tables[j, 3] = ti * n_tile_cols + tj
        if sums[j, 0] >= min_charge:
            tile_p[ti, tj] += tables[j, 2]
            tile_e[ti, tj] += (sums[j, 0] + sums[j, 4]) * unit


@njit(nogil=True, cache=True)
def _local_hidden(rows, cols, tables, sums, n_clusters, tile_e, tile_p, min_charge):
    """Each basin's log rate of hidden electrons into sums[:, 4]: the frame's hidden electrons
    (its electrons by charge less its peaks) shared out among the basins above ``min_charge`` in
    proportion to their size (pixels) times the local density (electrons by charge per pixel
    over the 3 x 3 tiles around the basin's tile, tables[:, 3]: _frame_charge), as coincidences
    are: an electron hides in a basin as often as one lands on its pixels. A rate for the whole
    frame (until 2026-12-05) gave the sparse outskirts the hidden electrons of the bright-field
    disc: singles there counted two, crowded clusters in the disc too few (precision at 0.05
    e/px/frame 0.927 -> 0.997 by maximum matching, gamma; docs/counting.md section 4). The
    logarithms are the tiles' and the sizes', not one per basin. Returns the frame's electrons
    by charge."""
    tr, tc = tile_e.shape
    density = np.zeros(tr * tc, np.float64)
    for a in range(tr):
        for b in range(tc):
            e, area = 0.0, 0.0
            for aa in range(max(a - 1, 0), min(a + 2, tr)):
                for bb in range(max(b - 1, 0), min(b + 2, tc)):
                    e += tile_e[aa, bb]
                    area += (min((aa + 1) * _TILE, rows) - aa * _TILE) * (min((bb + 1) * _TILE, cols) - bb * _TILE)
            density[a * tc + b] = e / area
    electrons = tile_e.sum()
    weight = 0.0
    for j in range(n_clusters):
        if sums[j, 0] >= min_charge:
            weight += tables[j, 1] * density[tables[j, 3]]
    scale = max(electrons - tile_p.sum(), 0.0) / weight if weight > 0 else 0.0
    log_rate = np.empty(tr * tc, np.float64)  # of a basin of one pixel
    for t in range(tr * tc):
        log_rate[t] = math.log(scale * density[t]) if scale * density[t] > 0 else -np.inf
    log_size = np.empty(_LOGGED_SIZES, np.float64)
    for size in range(1, _LOGGED_SIZES):
        log_size[size] = math.log(size)
    log_least = math.log(_MIN_HIDDEN)
    for j in range(n_clusters):
        size = tables[j, 1]
        sums[j, 4] = max(log_rate[tables[j, 3]] + (log_size[size] if size < _LOGGED_SIZES else math.log(size)), log_least)
    return electrons


@njit(nogil=True, cache=True)
def _counts(rows, cols, model, pixels, tables, sums, gains, n_clusters):
    """The electrons of each basin into tables[:, 3]: the most probable count of its charge and
    spread, then put right to the frame's total charge (with the halos)."""
    min_charge = model[3]
    tile_e = np.zeros(((rows + _TILE - 1) // _TILE, (cols + _TILE - 1) // _TILE), np.float64)
    tile_p = np.zeros_like(tile_e)
    _frame_charge(cols, model, pixels, tables, sums, n_clusters, tile_e, tile_p)
    electrons = _local_hidden(rows, cols, tables, sums, n_clusters, tile_e, tile_p, min_charge)
    # A basin holds one electron when its log charge is below these, per spread bin (the last:
    # no spread bin, index -1), less its log rate of hidden electrons over k.
    n_bins = np.int64(model[5])
    log_single = np.empty(n_bins + 1, np.float64)
    for b in range(-1, n_bins):
        log_single[b] = math.log(one_electron_below(0.0, b, model))
    inv_k = 1.0 / model[2]
    counted = 0
    for j in range(n_clusters):
        q = sums[j, 0]
        b = -1
        if n_bins > 0 and q >= min_charge:
            b = spread_bin(_spread(tables[j, 1], q, sums[j, 1], sums[j, 2], sums[j, 3], sums[j, 6], sums[j, 7]), model)
        sums[j, 3] = b
        if q < min_charge:  # noise
            tables[j, 3] = 0
            continue
        log_q = math.log(q)  # the one logarithm a basin costs (sums[:, 5], for reconcile too)
        sums[j, 5] = log_q
        one = log_q < log_single[b] - sums[j, 4] * inv_k
        tables[j, 3] = 1 if one else electrons_in_cluster(q, log_q, 1, sums[j, 4], b, model)
        counted += tables[j, 3]
    band = _TOTAL_BAND * math.sqrt(max(electrons, 1.0) / model[2])
    missing = electrons - counted
    missing = max(missing - band, 0.0) if missing > 0 else min(missing + band, 0.0)
    reconcile(tables, sums, n_clusters, int(round(missing)), model, gains)


@njit(nogil=True, cache=True)
def _electrons(flat, rows, cols, lo, hi, model, used, pixels, peaks, tables, sums, gains, n_clusters, out, positions,
               where):
    """The electrons of the basins into out / positions; returns how many."""
    pedestal, mean = model[0], model[1]
    _counts(rows, cols, model, pixels, tables, sums, gains, n_clusters)
    n_out = 0
    for j in range(n_clusters):
        q = sums[j, 0]
        start, size, n = tables[j, 0], tables[j, 1], tables[j, 3]
        if n == 0:
            continue
        if n_out == out.shape[0]:
            return n_out
        if n == 1:
            where[0], where[1] = sums[j, 1] / q, sums[j, 2] / q
        else:
            _centroid(flat, rows, cols, lo, hi, _peak_of(flat, pixels, start, size), pedestal, where, 0)
        n_out = _emit(used, rows, cols, where, out, positions, n_out)
        if n > 1:
            # gains and peaks are free for the heap; whole arrays, as a slice also cost two atomic counts
            if size <= gains.shape[0]:
                n_out = _extras(flat, rows, cols, pedestal, mean, used, pixels, start, size, n - 1, out,
                                positions, n_out, where, gains, peaks)
            else:
                n_out = _extras(flat, rows, cols, pedestal, mean, used, pixels, start, size, n - 1, out,
                                positions, n_out, where, np.empty(size, np.float64), peaks)
    return n_out


@njit(nogil=True, cache=True)
def _drop_hot(hot, pixels, tables, sums, n_clusters):
    # A cluster that is a hot pixel alone holds no electron: a charge below any min_charge (>= 0), so out of the
    # frame's total too. Not copying each frame to blank the hot pixels saves ~100 us a frame; a hot pixel
    # beside an electron stays in its cluster (its charge counts there).
    for j in range(n_clusters):
        if tables[j, 1] == 1 and hot[pixels[tables[j, 0]]]:
            sums[j, 0] = -1.0


@njit(nogil=True, cache=True)
def count_clusters_frame(frame, lo, hi, model, hot, scratch, out, positions):
    """Electrons of one C-contiguous uint16 frame (rows, cols): their pixels (flat indices
    ``row * cols + col``, ascending and unique) into ``out`` and their sub-pixel positions
    (row, col) into ``positions`` (out's size, 2) in the same order; returns how many (at most
    out's size). ``model``: SingleElectronModel.params (counting.cluster_model); ``hot``: a uint8
    flag per pixel, 1 for a hot one (cluster_counter.hot_flags), or empty; ``scratch``: the
    thread's arrays (counting.cluster_counter)."""
    rows, cols = frame.shape
    if rows == _ROWS and cols == _COLS:  # the detector's frames, with code compiled for their shape (~20 us a frame)
        return _count_frame(frame.reshape(-1), _ROWS, _COLS, lo, hi, model, hot, scratch, out, positions)
    return _count_frame(frame.reshape(-1), rows, cols, lo, hi, model, hot, scratch, out, positions)


@njit(nogil=True, cache=True)
def _count_frame(flat, rows, cols, lo, hi, model, hot, scratch, out, positions):
    label, used, pixels, peaks, tables, sums, gains, where = scratch
    n_clusters = label_basins(flat, rows, cols, lo, hi, model[0], pixels, peaks, tables, sums, label, used)
    if hot.shape[0]:
        _drop_hot(hot, pixels, tables, sums, n_clusters)
    n_out = _electrons(flat, rows, cols, lo, hi, model, used, pixels, peaks, tables, sums, gains, n_clusters, out,
                       positions, where)
    for i in range(n_out):
        used[out[i]] = 0
    _sort_events(out, positions, n_out, rows, cols)
    return n_out
