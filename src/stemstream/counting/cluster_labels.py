"""Connected-cluster labelling, from runs found in the maxima kernel's own block scan: a
cluster's pixels are handled in the scan's pass, while their rows are in the cache, not
revisited by a fill. The calibration's test of isolated single electrons uses it
(counting.cluster_singles); the counting itself labels basins (counting.cluster_basins), which
until 2026-12-05 it split these clusters into.

A frame's clusters are its pixels with ``lo <= value <= hi`` (X-ray pixels above ``hi`` count as
empty, as stempy zeroes them) joined by 8-connectivity. The scan (counting.kernel.count_frame_int's)
skips the blocks of _BLOCK pixels whose maximum is below ``lo``; in a hit block a vectorised pass
marks the members and the peaks (members not smaller than any member neighbour, ties to the lower
flat index), and the members' bits give the row's runs. A run joins every cluster whose runs in
the row above touch it (union-find over provisional clusters, the lower index the root, which
keeps the clusters in raster order of their first pixel) and adds its charge, size and peaks to
its cluster as it is found. A last pass groups the pixels by cluster.

The previous labelling (until 2026-12-04) was a breadth-first flood fill from each cluster's first
pixel: ~100 CPU cycles a pixel (8 neighbour reads and label writes each) and most of the kernel's
time at 0.005 e/px/frame (docs/counting.md section 4).
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.cpython.unsafe.numbers import trailing_zeros

from stemstream.counting.kernel import _BLOCK, _GATHER, _kept

_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)
# A run record (a piece of a run within one 64-pixel word of the scan) packs its length (<= 64)
# in the low 7 bits, its provisional cluster in the next 16 (clusters are at most 65,535, see
# counting.clusters.LABELS), its first pixel's flat index above.
_LENGTH_BITS = 7
_CLUSTER_BITS = 16
_CLUSTER_SHIFT = _LENGTH_BITS
_PIXEL_SHIFT = _LENGTH_BITS + _CLUSTER_BITS


@njit(nogil=True, cache=True)
def is_peak(flat, rows, cols, p, hi):
    """Whether member pixel p (flat index) is not smaller than any member among its 8 neighbours,
    ties to the lower index (a neighbour >= its value is a member when it is <= hi)."""
    r = p // cols
    c = p - r * cols
    v = flat[p]
    for rr in range(max(r - 1, 0), min(r + 2, rows)):
        for cc in range(max(c - 1, 0), min(c + 2, cols)):
            s = rr * cols + cc
            w = flat[s]
            if s != p and w <= hi and (w > v or (w == v and s < p)):
                return False
    return True


@njit(nogil=True, cache=True, inline="always")
def _peak_mask(flat, base, ucols, hi16, lo16, peak):
    # Vectorised peak test of a block of an interior row (rows 2 .. rows-3: every read stays in
    # the frame): the neighbours before the pixel (left, the row above) must be smaller, those
    # after it not larger; non-members read as 0 (below lo: smaller than any member anyway).
    up = base - ucols
    dn = base + ucols
    one = np.uint64(1)
    for j in range(np.uint64(_BLOCK)):
        v = flat[base + j]
        before = max(_kept(flat[base + j - one], hi16), _kept(flat[up + j - one], hi16))
        before = max(before, max(_kept(flat[up + j], hi16), _kept(flat[up + j + one], hi16)))
        after = max(_kept(flat[base + j + one], hi16), _kept(flat[dn + j - one], hi16))
        after = max(after, max(_kept(flat[dn + j], hi16), _kept(flat[dn + j + one], hi16)))
        peak[j] = np.uint8((v >= lo16) & (v <= hi16) & (before < v) & (after <= v))


@njit(nogil=True, cache=True)
def _group(pixels, records, n_rec, tables, sums, n_clusters):
    """The provisional clusters' roots become clusters 0, 1, ... (in raster order of their first
    pixel) with their pixels grouped, raster order within a cluster, in ``pixels``; returns how
    many. A parent always has the lower index, so one pass in index order points every
    provisional cluster at its root."""
    start = 0
    for i in range(n_clusters):
        parent = tables[i, 3]
        if parent == i:
            tables[i, 0] = start  # the root's fill pointer while its pixels are placed
            start += tables[i, 1]
        else:
            tables[i, 3] = tables[parent, 3]
    low = (1 << _LENGTH_BITS) - 1
    for k in range(n_rec):
        record = records[k]
        j = tables[(record >> _CLUSTER_SHIFT) & ((1 << _CLUSTER_BITS) - 1), 3]
        p, length = record >> _PIXEL_SHIFT, record & low
        fill = tables[j, 0]
        for t in range(length):
            pixels[fill + t] = p + t
        tables[j, 0] = fill + length
    n = 0
    for i in range(n_clusters):  # roots move down (n <= i), read before they are overwritten
        if tables[i, 3] == i:
            size = tables[i, 1]
            tables[n, 0], tables[n, 1], tables[n, 2] = tables[i, 0] - size, size, tables[i, 2]
            for s in range(3):
                sums[n, s] = sums[i, s]
            n += 1
    return n


@njit(nogil=True, cache=True)
def label_clusters(flat, rows, cols, lo, hi, pedestal, pixels, records, tables, sums):
    """The clusters of a flat uint16 frame (rows x cols): cluster j's pixels (flat indices, in
    raster order) are ``pixels[start:start + size]`` with (start, size, n_peaks) = ``tables[j,
    :3]`` (int64; tables[:, 3] is scratch) and ``sums[j]`` = (charge, charge * row, charge * col)
    over its pixels (charge = value - pedestal). ``records``: int64 scratch, the frame's size.
    Returns the number of clusters (at most tables' size: a frame that needs more, 0.2 electrons
    per pixel, stops there, its clusters in the row of the stop cut short)."""
    # One numba kernel over 80 lines: the scan is counting.kernel.count_frame_int's, its state
    # (the row's open run, the runs of this row and the one above, the union-find) stays in
    # locals, and the run logic is written out here: as an inlined function taking the arrays,
    # numba's reference counting of them around each call tripled the labelling's time.
    if lo > 65535:
        return 0
    lo16 = np.uint16(lo)
    hi16 = np.uint16(min(hi, 65535))
    member = np.zeros(_BLOCK, np.uint8)
    mwords = member.view(np.uint64)
    peak = np.zeros(_BLOCK, np.uint8)
    pwords = peak.view(np.uint64)
    runs = np.empty((2, (cols + 1) // 2 + 1, 3), np.int64)  # per row: first column, last column, cluster
    block = np.uint64(_BLOCK)
    ucols = np.uint64(cols)
    n_blocks = ucols // block
    tail_start = np.int64(n_blocks * block)
    most = min(tables.shape[0], 1 << _CLUSTER_BITS)
    n_clusters, n_rec, n_prev = 0, 0, 0
    for r in range(rows):
        cur = r & 1
        prev = 1 - cur
        n_cur, k, open_end = 0, 0, -1
        row_base = np.int64(r) * cols
        # The vector peak test reads the rows above and below and a pixel beyond the block on
        # each side: rows 0, 1, rows-2 and rows-1 take the scalar test, so no read leaves the frame.
        interior = r >= 2 and r + 3 <= rows
        for b in range(n_blocks + np.uint64(tail_start < cols)):
            c_block = np.int64(b * block)
            if b < n_blocks:
                base = np.uint64(r) * ucols + b * block
                m = np.uint16(0)
                for j in range(block):
                    m = max(m, flat[base + j])
                if m < lo16:
                    continue
                for j in range(block):
                    v = flat[base + j]
                    member[j] = np.uint8((v >= lo16) & (v <= hi16))
                if interior:
                    _peak_mask(flat, base, ucols, hi16, lo16, peak)
                    # Columns 0 and cols-1 have no left / right neighbour: the vector test read
                    # the other row's edge pixel there.
                    if b == 0:
                        peak[0] = member[0] & np.uint8(is_peak(flat, rows, cols, row_base, hi))
                    if b == n_blocks - np.uint64(1) and tail_start == cols:
                        peak[_BLOCK - 1] = member[_BLOCK - 1] & np.uint8(is_peak(flat, rows, cols, row_base + cols - 1, hi))
                    edge = -1
                else:
                    edge = _BLOCK
            else:  # the columns after the last whole block, scalar
                edge = cols - tail_start
                for j in range(_BLOCK):
                    v = flat[row_base + c_block + j] if j < edge else np.uint16(0)
                    member[j] = np.uint8((v >= lo16) & (v <= hi16))
            for j in range(max(edge, 0)):
                peak[j] = member[j] & np.uint8(member[j] != 0 and is_peak(flat, rows, cols, row_base + c_block + j, hi))
            for h in range((_BLOCK + 63) // 64):
                mbits, pbits = np.uint64(0), np.uint64(0)
                for w in range(min(8, _BLOCK // 8 - 8 * h)):
                    mbits |= ((mwords[8 * h + w] * _GATHER) >> np.uint64(56)) << np.uint64(8 * w)
                    pbits |= ((pwords[8 * h + w] * _GATHER) >> np.uint64(56)) << np.uint64(8 * w)
                while mbits != 0:  # each piece of a run: consecutive set bits
                    t = np.int64(trailing_zeros(mbits))
                    rest = ~(mbits >> np.uint64(t))
                    length = 64 - t if rest == 0 else np.int64(trailing_zeros(rest))
                    piece = _ONES if length == 64 else ((np.uint64(1) << np.uint64(length)) - np.uint64(1)) << np.uint64(t)
                    mbits &= ~piece
                    in_peaks = pbits & piece
                    n_peaks = 0
                    while in_peaks != 0:
                        in_peaks &= in_peaks - np.uint64(1)
                        n_peaks += 1
                    c0 = c_block + 64 * h + t
                    after = c0 + length  # a run of the row above reaching this column touches the piece
                    # It continues the row's open run when it starts where that one ends, and
                    # joins the clusters of the touching runs of the row above.
                    # (Union-find written out, j a root throughout.)
                    extends = n_cur > 0 and c0 == open_end
                    j = runs[cur, n_cur - 1, 2] if extends else -1
                    while j >= 0 and tables[j, 3] != j:
                        tables[j, 3] = tables[tables[j, 3], 3]
                        j = tables[j, 3]
                    while k < n_prev and runs[prev, k, 1] < c0 - 1:
                        k += 1
                    i = k
                    while i < n_prev and runs[prev, i, 0] <= after:
                        a = runs[prev, i, 2]
                        while tables[a, 3] != a:
                            tables[a, 3] = tables[tables[a, 3], 3]
                            a = tables[a, 3]
                        if j < 0 or a == j:
                            j = a
                        else:  # the lower index is the root and takes the other's size, peaks, sums
                            a, j = max(a, j), min(a, j)
                            tables[a, 3] = j
                            tables[j, 1] += tables[a, 1]
                            tables[j, 2] += tables[a, 2]
                            for s in range(3):
                                sums[j, s] += sums[a, s]
                        i += 1
                    if j < 0:
                        if n_clusters == most:
                            return _group(pixels, records, n_rec, tables, sums, n_clusters)
                        j = n_clusters
                        n_clusters += 1
                        tables[j, 0], tables[j, 1], tables[j, 2], tables[j, 3] = 0, 0, 0, j
                        sums[j, 0] = sums[j, 1] = sums[j, 2] = 0.0
                    if not extends:
                        runs[cur, n_cur, 0] = c0
                        n_cur += 1
                    runs[cur, n_cur - 1, 1], runs[cur, n_cur - 1, 2] = after - 1, j
                    open_end = after
                    # Integer sums over the piece, then one float step: charge = sum(v - pedestal)
                    # and its moments.
                    total, moment = 0, 0
                    if length <= 4 and c0 + 4 <= cols:
                        # Four pixels, those beyond the piece times 0: a loop of 1-4 turns (at
                        # random) mispredicted its exit.
                        for t in range(4):
                            v = np.int64(flat[row_base + c0 + t]) * (t < length)
                            total += v
                            moment += v * (c0 + t)
                    else:
                        for c in range(c0, after):
                            v = np.int64(flat[row_base + c])
                            total += v
                            moment += v * c
                    charge = total - length * pedestal
                    tables[j, 1] += length
                    tables[j, 2] += n_peaks
                    sums[j, 0] += charge
                    sums[j, 1] += charge * r
                    sums[j, 2] += moment - pedestal * (length * (c0 + after - 1) * 0.5)
                    records[n_rec] = ((row_base + c0) << _PIXEL_SHIFT) | (j << _CLUSTER_SHIFT) | length
                    n_rec += 1
        n_prev = n_cur
    return _group(pixels, records, n_rec, tables, sums, n_clusters)
