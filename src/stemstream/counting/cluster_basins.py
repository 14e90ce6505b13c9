"""The basins of a frame, the units cluster counting (counting.clusters) counts electrons in:
each pixel above the background threshold belongs to the peak that its steepest way up reaches.

A frame's members are its pixels with ``lo <= value <= hi`` (X-ray pixels above ``hi`` count as
empty, as stempy zeroes them). A member's way up goes to the highest member among it and its 8
neighbours, in the order of value, then the lower flat index (so a plateau has one peak); a
member that is its own way up is a *peak*. Where electrons crowd (the bright-field disc) their
clouds merge into connected clusters of 5-50, whose charge varies by ``sqrt(n / k)``
single-electron charges (k, the gamma shape, ~4): a cluster of 5 was miscounted by about one.
Each basin holds one peak's electron(s) and is counted by its own charge, spread and the local
rate of hidden electrons, so the peaks themselves, the strongest evidence there is, carry the
count (docs/counting.md section 4).

A basin needs only its members' neighbours, not the connected cluster around it: the frame is
labelled by basins directly, in one scan and two passes over the members. Until 2026-12-05 the
kernel labelled connected clusters first (union-find over the scan's runs,
counting.cluster_labels, which the calibration still uses) and split those of several peaks:
~170 us a frame at 0.005 e/px/frame against ~40 for this (docs/counting.md section 4).
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.cpython.unsafe.numbers import trailing_zeros

from stemstream.counting.cluster_events import _row
from stemstream.counting.kernel import _BLOCK, _GATHER, _kept

# A member's way up, as code 1 + its neighbour's place in flat order (the 3 x 3 window read
# row by row: 1 up-left ... 5 itself, a peak ... 9 down-right) in the used image: 0 is "not a
# member", so the image needs no clearing before a frame, only after.
_PEAK = np.uint8(5)
# The code of a halo pixel (below lo, beside a member) already counted in a basin's halo.
_HALO = np.uint8(10)
# A key ranks a neighbour by value, then by the lower flat index: value * 16 + 15 - place.
_RANK_BITS = np.uint32(4)


@njit(nogil=True, cache=True, inline="always")
def _key(value, place, hi16):
    return (np.uint32(_kept(value, hi16)) << _RANK_BITS) | np.uint32(15 - place)


@njit(nogil=True, cache=True, inline="always")
def _code(best):
    # The place of the best key's neighbour, as its code (1 + place)
    return np.uint8(16 - (best & np.uint32(15)))


@njit(nogil=True, cache=True)
def way_up(flat, rows, cols, hi, p):
    """Code of member p's way up (1 + the place of its highest member neighbour or itself in the
    3 x 3 window, row by row; _PEAK for itself), for a pixel of any row or column."""
    r = _row(p, 1.0 / cols)
    c = p - r * cols
    hi16 = np.uint16(min(hi, 65535))
    best = np.uint32(0)
    for dr in range(-1, 2):
        for dc in range(-1, 2):
            if 0 <= r + dr < rows and 0 <= c + dc < cols:
                best = max(best, _key(flat[p + dr * cols + dc], 3 * (dr + 1) + dc + 1, hi16))
    return _code(best)


# Compiled without numba's reference counting: an array argument cost an atomic increment and
# decrement per call, inlined or not (counting.clusters._leaf).
@njit(nogil=True, cache=True, _nrt=False)
def _inner_way_up(flat, p, cols, hi16):
    # way_up for a pixel off the frame's edge: nine keys, no bounds, no branch (which neighbour
    # is highest is random).
    best = _key(flat[p - cols - 1], 0, hi16)
    best = max(best, _key(flat[p - cols], 1, hi16))
    best = max(best, _key(flat[p - cols + 1], 2, hi16))
    best = max(best, _key(flat[p - 1], 3, hi16))
    best = max(best, _key(flat[p], 4, hi16))
    best = max(best, _key(flat[p + 1], 5, hi16))
    best = max(best, _key(flat[p + cols - 1], 6, hi16))
    best = max(best, _key(flat[p + cols], 7, hi16))
    best = max(best, _key(flat[p + cols + 1], 8, hi16))
    return _code(best)


@njit(nogil=True, cache=True, _nrt=False)
def _take(flat, q, lo16, pedestal, code, halo_list, n_halo, halo):
    # (halo + the charge of pixel q, n_halo) for a halo: q counts when below lo and not taken
    # yet (then marked and listed). Without a branch: whether a member's neighbour is below the
    # threshold is random, and a branch on it mispredicted; an untaken pixel's stores change
    # nothing (its listing is overwritten by the next).
    v = flat[q]
    take = (v < lo16) & (code[q] == 0)
    code[q] |= np.uint8(take) * _HALO
    halo_list[halo_list.shape[0] - 1 - n_halo] = q
    return halo + take * (np.float64(v) - pedestal), n_halo + take


@njit(nogil=True, cache=True, _nrt=False)
def _block_maxima(flat, r, cols, n_blocks, maxima):
    # The maximum of each whole block of _BLOCK pixels of row r, into maxima
    block = np.uint64(_BLOCK)
    for b in range(n_blocks):
        base = np.uint64(r) * np.uint64(cols) + b * block
        m = np.uint16(0)  # frames are uint16; a wider accumulator would not vectorise
        for j in range(block):
            m = max(m, flat[base + j])
        maxima[b] = m


@njit(nogil=True, cache=True)
def _scan(flat, rows, cols, lo, hi, members, code, basin, tables, sums):
    """Pass 1: each member's flat index into ``members`` (raster order) and its way up into the
    ``code`` image; each peak its basin number (1, 2, ... in raster order) in the ``basin`` image
    and a zeroed row of tables / sums. Returns (members, basins). Peaks beyond the tables' size (a
    frame of more, 0.2 electrons a pixel) get code 0, so their basins are dropped and the others
    kept whole."""
    lo16 = np.uint16(lo)
    hi16 = np.uint16(min(hi, 65535))
    member = np.zeros(_BLOCK, np.uint8)
    mwords = member.view(np.uint64)
    block = np.uint64(_BLOCK)
    n_blocks = np.uint64(cols) // block
    most = min(tables.shape[0], 65535)
    n_members, n_basins = 0, 0
    # The blocks' maxima of the row below, found a row ahead: a member's way up reads the row
    # below, which the scan has not read yet (a cache miss a member, ~10 % of the scan's time).
    maxima = np.zeros((2, n_blocks), np.uint16)
    _block_maxima(flat, 0, cols, n_blocks, maxima[0])
    for r in range(rows):
        row_base = np.int64(r) * cols
        inner_row = 0 < r < rows - 1
        if r + 1 < rows:
            _block_maxima(flat, r + 1, cols, n_blocks, maxima[(r + 1) & 1])
        # Whole blocks, skipped when their maximum is below lo (most of a sparse frame), then the
        # columns after the last whole one as one more block read up to the row's end.
        for b in range(n_blocks + np.uint64(n_blocks * block < np.uint64(cols))):
            c_block = np.int64(b * block)
            width = min(_BLOCK, cols - c_block)
            base = np.uint64(row_base + c_block)
            if width == _BLOCK:
                if maxima[r & 1, b] < lo16:
                    continue
                for j in range(block):
                    v = flat[base + j]
                    member[j] = np.uint8((v >= lo16) & (v <= hi16))
            else:
                for j in range(_BLOCK):
                    v = flat[row_base + c_block + j] if j < width else np.uint16(0)
                    member[j] = np.uint8((v >= lo16) & (v <= hi16))
            for h in range((_BLOCK + 63) // 64):
                bits = np.uint64(0)
                for w in range(min(8, _BLOCK // 8 - 8 * h)):
                    bits |= ((mwords[8 * h + w] * _GATHER) >> np.uint64(56)) << np.uint64(8 * w)
                while bits != 0:
                    c = c_block + 64 * h + np.int64(trailing_zeros(bits))
                    bits &= bits - np.uint64(1)
                    p = row_base + c
                    if inner_row and 0 < c < cols - 1:
                        up = _inner_way_up(flat, p, cols, hi16)
                    else:
                        up = way_up(flat, rows, cols, hi, p)
                    if up == _PEAK and n_basins == most:
                        up = np.uint8(0)  # no room: its basin's members walk up to a 0 and are dropped
                    if up == _PEAK:
                        tables[n_basins, 0], tables[n_basins, 1], tables[n_basins, 2] = 0, 0, 1
                        for s in range(sums.shape[1]):  # (a slice cost a view's reference count a peak)
                            sums[n_basins, s] = 0.0
                        n_basins += 1
                        basin[p] = n_basins
                    code[p] = up
                    members[n_members] = p
                    n_members += 1
    return n_members, n_basins


@njit(nogil=True, cache=True)
def label_basins(flat, rows, cols, lo, hi, pedestal, pixels, members, tables, sums, basin, code):
    """The basins of a flat uint16 frame (rows x cols): basin j's pixels (flat indices, raster
    order) are ``pixels[start:start + size]`` with (start, size, 1) = ``tables[j, :3]`` (int64,
    the 1 its one peak; tables[:, 3] is scratch), and ``sums[j]`` = (charge, charge * row,
    charge * col, charge * row^2, its halo's charge, -, charge * col^2, charge * row * col) summed
    over its pixels (charge = value - pedestal; the halo: step 3 of docs/counting.md section 2).
    Basins are numbered in raster order of their peaks. ``members``: int64 scratch, the frame's
    size; ``basin`` (uint16) and ``code`` (uint8): images of zeros, zeros again on return.
    Returns the number of basins."""
    if lo > 65535:
        return 0
    n_members, n_basins = _scan(flat, rows, cols, lo, hi, members, code, basin, tables, sums)
    # Pass 2: each member's basin, by walking up until a pixel already placed (its way up is a
    # neighbour's, so the walks are short); the path in ``pixels``, free until the grouping.
    # The sums as each member's basin is known.
    inv_cols = 1.0 / cols
    lo16 = np.uint16(lo)
    n_halo = 0
    offsets = np.array([0, -cols - 1, -cols, -cols + 1, -1, 0, 1, cols - 1, cols, cols + 1], np.int64)  # by code
    for i in range(n_members):
        p = members[i]
        q, length = p, 0
        while basin[q] == 0 and code[q] != 0:  # (0: a peak beyond the tables' room)
            pixels[length] = q
            length += 1
            q += offsets[code[q]]
        j = np.int64(basin[q]) - 1
        for t in range(length):
            basin[pixels[t]] = j + 1
        if j < 0:
            continue
        w = np.float64(flat[p]) - pedestal
        r = _row(p, inv_cols)
        c = p - r * cols
        tables[j, 1] += 1
        sums[j, 0] += w
        sums[j, 1] += w * r
        sums[j, 2] += w * c
        sums[j, 3] += w * (r * r)
        sums[j, 6] += w * (c * c)
        sums[j, 7] += w * (r * c)
        # The halo: the pixels below lo next to the member (above, below, left, right), each
        # taken once (marked _HALO in the code image, listed from the end of ``pixels``, which
        # the members never reach: they and their halo are different pixels).
        halo = 0.0
        if r > 0:
            halo, n_halo = _take(flat, p - cols, lo16, pedestal, code, pixels, n_halo, halo)
        if r < rows - 1:
            halo, n_halo = _take(flat, p + cols, lo16, pedestal, code, pixels, n_halo, halo)
        if c > 0:
            halo, n_halo = _take(flat, p - 1, lo16, pedestal, code, pixels, n_halo, halo)
        if c < cols - 1:
            halo, n_halo = _take(flat, p + 1, lo16, pedestal, code, pixels, n_halo, halo)
        sums[j, 4] += halo
    # Pass 3: the members grouped by basin (a counting sort, stable: raster order within a
    # basin), the images cleared.
    start = 0
    for j in range(n_basins):
        tables[j, 0], tables[j, 3] = start, start
        start += tables[j, 1]
    for i in range(n_members):
        p = members[i]
        j = np.int64(basin[p]) - 1
        if j >= 0:
            pixels[tables[j, 3]] = p
            tables[j, 3] += 1
        basin[p] = 0
        code[p] = 0
    for k in range(n_halo):
        code[pixels[pixels.shape[0] - 1 - k]] = 0
    return n_basins
