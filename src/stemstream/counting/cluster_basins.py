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
~270 us a frame at 0.005 e/px/frame against ~140 for this, the halo included (docs/counting.md
section 4).
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.cpython.unsafe.numbers import trailing_zeros

from stemstream.counting.cluster_events import _row
from stemstream.counting.kernel import _BLOCK, _GATHER, _kept

# A member's way up, as code 1 + its neighbour's place in flat order (the 3 x 3 window read
# row by row: 1 up-left ... 5 itself, a peak ... 9 down-right) in the code image (the thread's
# used image): 0 is "not a member", so the image needs no clearing before a frame, only after.
_PEAK = np.uint8(5)
# A member's entry in the scan's list: its flat index (a frame of up to 2^32 pixels), the sum of
# the raw values of the halo pixels it took (up to 4 x 65535) and how many (up to 4) above it.
_HALO_SHIFT = 32
_HALO_PIXELS_SHIFT = 51
_PIXEL_MASK = (1 << _HALO_SHIFT) - 1
_HALO_MASK = (1 << (_HALO_PIXELS_SHIFT - _HALO_SHIFT)) - 1
# A key ranks a neighbour by value, then by the lower flat index: value * 16 + 15 - place.
_RANK_BITS = np.uint32(4)


@njit(nogil=True, cache=True, inline="always")
def _key(value, place, hi16):
    return (np.uint32(_kept(value, hi16)) << _RANK_BITS) | np.uint32(15 - place)


@njit(nogil=True, cache=True, inline="always")
def _code(best):
    # The place of the best key's neighbour, as its code (1 + place)
    return np.uint8(16 - (best & np.uint32(15)))


@njit(nogil=True, cache=True, inline="always")
def _member(value, lo16, hi16):
    return (value >= lo16) & (value <= hi16)


@njit(nogil=True, cache=True, inline="always")
def _first(value, lo16, earlier):
    # (value, 1) of a halo pixel this member takes: below lo, and no member before this one in
    # raster order beside it (``earlier``), which took it then; else (0, 0)
    take = (value < lo16) & ~earlier
    return np.int64(value) * take, np.int64(take)


@njit(nogil=True, cache=True)
def way_up(flat, rows, cols, lo, hi, p):
    """(code, halo, halo pixels) of member p, for a pixel of any row or column: its way up (1 +
    the place of its highest member neighbour or itself in the 3 x 3 window, row by row; _PEAK
    for itself), and the raw values' sum and number of the halo pixels it takes: its neighbours
    above, below, left and right that are below ``lo`` and beside no member before it in raster
    order (the first member beside a halo pixel takes it, so the frame counts it once)."""
    r = _row(p, 1.0 / cols)
    c = p - r * cols
    lo16, hi16 = np.uint16(lo), np.uint16(min(hi, 65535))
    best = np.uint32(0)
    for dr in range(-1, 2):
        for dc in range(-1, 2):
            if 0 <= r + dr < rows and 0 <= c + dc < cols:
                best = max(best, _key(flat[p + dr * cols + dc], 3 * (dr + 1) + dc + 1, hi16))
    halo, n_halo = 0, 0
    for dr, dc in ((-1, 0), (0, -1), (0, 1), (1, 0)):
        rr, cc = r + dr, c + dc
        if not (0 <= rr < rows and 0 <= cc < cols):
            continue
        earlier = False  # a member beside (rr, cc) before p in raster order
        for er, ec in ((-1, 0), (0, -1), (0, 1), (1, 0)):
            sr, sc = rr + er, cc + ec
            if 0 <= sr < rows and 0 <= sc < cols and sr * cols + sc < p:
                earlier |= _member(flat[sr * cols + sc], lo16, hi16)
        h, n = _first(flat[rr * cols + cc], lo16, earlier)
        halo, n_halo = halo + h, n_halo + n
    return _code(best), halo, n_halo


# Compiled without numba's reference counting: an array argument cost an atomic increment and
# decrement per call, inlined or not (counting.clusters._leaf).
@njit(nogil=True, cache=True, _nrt=False)
def _inner_way_up(flat, p, cols, lo16, hi16):
    # way_up for a pixel 2 or more off the frame's top and left edges and 1 off the others: nine
    # keys, and of its halo the pixels above (beside up-left, up-right and the one above that),
    # left (beside up-left and the one left of that), right (beside up-right) and below (beside
    # no earlier member); no bounds, no branch (which is highest, and which is below lo, is random)
    up_left, up, up_right = flat[p - cols - 1], flat[p - cols], flat[p - cols + 1]
    left, right = flat[p - 1], flat[p + 1]
    best = _key(up_left, 0, hi16)
    best = max(best, _key(up, 1, hi16))
    best = max(best, _key(up_right, 2, hi16))
    best = max(best, _key(left, 3, hi16))
    best = max(best, _key(flat[p], 4, hi16))
    best = max(best, _key(right, 5, hi16))
    best = max(best, _key(flat[p + cols - 1], 6, hi16))
    best = max(best, _key(flat[p + cols], 7, hi16))
    best = max(best, _key(flat[p + cols + 1], 8, hi16))
    m_ul, m_ur = _member(up_left, lo16, hi16), _member(up_right, lo16, hi16)
    h0, n0 = _first(up, lo16, m_ul | m_ur | _member(flat[p - 2 * cols], lo16, hi16))
    h1, n1 = _first(left, lo16, m_ul | _member(flat[p - 2], lo16, hi16))
    h2, n2 = _first(right, lo16, m_ur)
    h3, n3 = _first(flat[p + cols], lo16, False)
    return _code(best), (h0 + h1) + (h2 + h3), (n0 + n1) + (n2 + n3)


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
        inner_row = 1 < r < rows - 1
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
                    if inner_row and 1 < c < cols - 1:
                        up, halo, n_halo = _inner_way_up(flat, p, cols, lo16, hi16)
                    else:
                        up, halo, n_halo = way_up(flat, rows, cols, lo, hi, p)
                    if up == _PEAK and n_basins == most:
                        up = np.uint8(0)  # no room: its basin's members walk up to a 0 and are dropped
                    if up == _PEAK:
                        tables[n_basins, 0], tables[n_basins, 1], tables[n_basins, 2] = 0, 0, 1
                        for s in range(sums.shape[1]):  # (a slice cost a view's reference count a peak)
                            sums[n_basins, s] = 0.0
                        n_basins += 1
                        basin[p] = n_basins
                    code[p] = up
                    members[n_members] = p | (halo << _HALO_SHIFT) | (n_halo << _HALO_PIXELS_SHIFT)
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
    offsets = np.array([0, -cols - 1, -cols, -cols + 1, -1, 0, 1, cols - 1, cols, cols + 1], np.int64)  # by code
    for i in range(n_members):
        m = members[i]
        p = m & _PIXEL_MASK
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
        # The halo pixels it took in the scan (the first member beside each)
        sums[j, 4] += np.float64((m >> _HALO_SHIFT) & _HALO_MASK) - pedestal * np.float64(m >> _HALO_PIXELS_SHIFT)
    # Pass 3: the members grouped by basin (a counting sort, stable: raster order within a
    # basin), the images cleared.
    start = 0
    for j in range(n_basins):
        tables[j, 0], tables[j, 3] = start, start
        start += tables[j, 1]
    for i in range(n_members):
        p = members[i] & _PIXEL_MASK
        j = np.int64(basin[p]) - 1
        if j >= 0:
            pixels[tables[j, 3]] = p
            tables[j, 3] += 1
        basin[p] = 0
        code[p] = 0
    return n_basins
