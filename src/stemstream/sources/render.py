"""The detector simulator's rendering kernel: frame rows (a whole frame, or one module's sector
straight into its raw records) from the random streams, the electrons' landing points
(sources.electrons) and the detector's response tables (sources.detector_response).

The kernel's helpers are called once per frame, never per electron or per pixel: numba passes
arrays to a call with reference counting, which per electron cost as much as depositing it.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from stemstream.sources.detector_response import ADU_MAX
from stemstream.sources.electrons import CANDIDATES, STAMP_BITS, bands_reaching, draw_counts, land_electrons
from stemstream.sources.random_streams import SUB_NOISE, SUB_XRAYS, below, next_bits, poisson, substream, uniform

_STAMP_MASK = np.uint64((1 << STAMP_BITS) - 1)
_FLIP_ROW = np.uint64(STAMP_BITS)  # the bits after the stamp: mirror it across the row, the col
_FLIP_COL = np.uint64(STAMP_BITS + 1)

_DEBRUIJN = np.uint64(0x03F79D71B4CB0A89)


def _debruijn_table() -> np.ndarray:
    """Bit position of an isolated bit b, indexed by (b * _DEBRUIJN) >> 58 (a count-trailing-zeros)."""
    table = np.zeros(64, np.int64)
    for bit in range(64):
        table[(((1 << bit) * int(_DEBRUIJN)) & ((1 << 64) - 1)) >> 58] = bit
    return table


_DEBRUIJN_TABLE = _debruijn_table()


@njit(nogil=True, cache=True)
def _in_rows(pixels, first, end):
    """The flat frame pixels (k,) int64 that lie in [first, end): their offsets from ``first`` and
    their indices in ``pixels``."""
    at = np.empty(pixels.shape[0], np.int64)
    which = np.empty(pixels.shape[0], np.int64)
    n = 0
    for i in range(pixels.shape[0]):
        if first <= pixels[i] < end:
            at[n] = pixels[i] - first
            which[n] = i
            n += 1
    return at[:n], which[:n]


@njit(nogil=True, cache=True)
def _most_drawn(n_drawn, first, last, n_bands):
    """The most electrons any frame has in bands first .. last (n_drawn: see draw_counts)."""
    n_comp = n_drawn.shape[1] // n_bands
    most = 0
    for f in range(n_drawn.shape[0]):
        drawn = 0
        for b in range(first, last + 1):
            for k in range(n_comp):
                drawn += n_drawn[f, k * n_bands + b]
        most = max(most, drawn)
    return most


@njit(nogil=True, cache=True)
def _fill_noise(out, base, cols, row0, n_rows, frame_key, noise_pool, noise_values, noise_base, stride_spread):
    """Read noise on frame rows row0 .. row0+n_rows-1, written to ``out[base:]``: frame row r is
    noise_pool[start + r * stride :][:cols] (modulo noise_values; the pool repeats its first cols
    values past the end). stride >= cols and rows * stride + cols <= noise_values, so no value
    appears twice in a frame; the random start and stride make each frame's selection its own."""
    state = np.empty(1, np.uint64)
    state[0] = substream(frame_key, SUB_NOISE)
    word = next_bits(state)  # noise_values and stride_spread are powers of two: masks, not divisions
    start = np.int64(word & np.uint64(noise_values - 1))
    stride = cols + np.int64((word >> np.uint64(32)) & np.uint64(stride_spread - 1))
    at = (start + row0 * stride) & (noise_values - 1)
    frame = out[base : base + n_rows * cols].reshape((n_rows, cols))
    for r in range(n_rows):
        src = noise_pool[at : at + cols]
        dst = frame[r]
        for c in range(cols):
            dst[c] = src[c] + noise_base
        at += stride  # (a subtraction, not a division per row)
        if at >= noise_values:
            at -= noise_values


@njit(inline="always")
def _add(pixels, p, value):
    pixels[p] = min(np.int64(pixels[p]) + np.int64(value), ADU_MAX)


@njit(nogil=True, cache=True)
def _deposit_carefully(pixels, base, lr, c, n_rows, cols, corners, wide, full, stamp, dy, dx):
    """Add an electron's charge around row lr (relative to the rendered rows, may lie just outside
    them) and col c of the rows that start at ``pixels[base]``, in the cases _deposit leaves
    out: a stamp with charge on both sides of the landing pixel (its whole 3x3 from ``full``,
    mirrored by dy, dx = +-1), or an electron at the edge of the rendered rows or of the frame
    (edge checks). Rare, so a call of its own (arrays passed to an inlined function cost
    reference counting per call, unless numba can prune it: not with these loops)."""
    if wide[stamp]:
        for i in range(3):
            rr = lr + dy * (i - 1)
            if 0 <= rr < n_rows:
                for j in range(3):
                    cc = c + dx * (j - 1)
                    if 0 <= cc < cols:
                        _add(pixels, base + rr * cols + cc, full[stamp, 3 * i + j])
        return
    for e in range(4):
        rr = lr + dy * (e >> 1)
        cc = c + dx * (e & 1)
        if 0 <= rr < n_rows and 0 <= cc < cols:
            _add(pixels, base + rr * cols + cc, corners[stamp, e])


@njit(nogil=True, cache=True)
def _deposit(out, base, row0, n_rows, cols, hit_row, hit_col, hit_stamp, n_hits, corners, wide, full, landed):
    """Add the charge of electrons 0 .. n_hits-1 (see land_electrons) to the rows at ``out[base:]``,
    and mark their landing pixels in the bit set ``landed`` (one bit per frame pixel; empty: no
    truth kept)."""
    track_truth = landed.shape[0] > 0
    for e in range(n_hits):
        lr = hit_row[e]
        c = hit_col[e]
        if track_truth:
            pix = (lr + row0) * cols + c
            landed[pix >> 6] |= np.uint64(1) << np.uint64(pix & 63)
        # The electron's charge: its stamp (see corner_stamps) mirrored by two bits of its own.
        # Written out here: arrays passed to an inlined function cost reference counting.
        bits = hit_stamp[e]
        stamp = np.uintp(bits & _STAMP_MASK)
        dy = 1 - 2 * np.int64((bits >> _FLIP_ROW) & np.uint64(1))
        dx = 1 - 2 * np.int64((bits >> _FLIP_COL) & np.uint64(1))
        if wide[stamp] or not (0 < lr < n_rows - 1 and 0 < c < cols - 1):
            _deposit_carefully(out, base, lr, c, n_rows, cols, corners, wide, full, stamp, dy, dx)
            continue
        at = base + lr * cols + c  # interior: no edge checks (unsigned indices)
        for q in range(4):  # landing pixel, col neighbour, row neighbour, diagonal neighbour
            p = np.uintp(at + (q & 1) * dx + (q >> 1) * dy * cols)
            out[p] = min(np.int64(out[p]) + np.int64(corners[stamp, np.uintp(q)]), ADU_MAX)


@njit(nogil=True, cache=True)
def _add_xrays(out, base, rows, cols, row0, n_rows, frame_key, xray_rate, xray_lo, xray_hi):
    """The frame's X-rays (Poisson, xray_rate per frame, uniform over the frame, each xray_lo ..
    xray_hi ADU on one pixel) that hit rows row0 .. row0+n_rows-1, added to the rows at ``out[base:]``."""
    state = np.empty(1, np.uint64)
    state[0] = substream(frame_key, SUB_XRAYS)
    for _ in range(poisson(state, xray_rate)):
        pix = below(state, rows * cols)
        adu_x = np.int64(xray_lo + (xray_hi - xray_lo) * uniform(state))
        r = pix // cols
        if row0 <= r < row0 + n_rows:
            _add(out, base + (r - row0) * cols + pix % cols, adu_x)


@njit(nogil=True, cache=True)
def _collect_truth(landed, events, k):
    """Write the pixels whose bits are set in ``landed`` to events[k:], in pixel order, and clear
    the bits for the next frame. Returns the index after the last one written."""
    for w in range(landed.shape[0]):
        word = landed[w]
        if word == 0:
            continue
        landed[w] = 0
        wbase = w * 64
        while word != 0:
            low = word & (~word + np.uint64(1))
            events[k] = wbase + _DEBRUIJN_TABLE[(low * _DEBRUIJN) >> np.uint64(58)]
            k += 1
            word ^= low
    return k


@njit(nogil=True, cache=True)
def render_rows(
    out, frame_stride, data_offset, rows, cols, row0, n_rows, whole_counts, track_truth, frame_keys,
    noise_pool, noise_values, noise_base, stride_spread, band_edges, comp_row, comp_col, comp_radius,
    comp_density, corners, wide, full, xray_rate, xray_lo, xray_hi, hot_pixels, hot_values, dead_pixels,
):
    """Render frame rows ``row0 .. row0+n_rows-1`` of n frames (each rows x cols) into ``out``.

    out: 1-D C-contiguous uint16; frame f's rows go to ``out[f*frame_stride + data_offset:]``,
    n_rows * cols pixels in (rows, cols) order (a whole frame: row0 = 0, n_rows = rows; a sector of
    a raw record: frame_stride = the record's size in uint16 and data_offset = its header's).

    Electrons (comp_*: (n, C) disks and densities, see electrons.component_densities) are drawn per
    band of rows (band_edges: (B+1,) int64, 0 .. rows) and component. Only the bands whose
    electrons can put charge on the rendered rows are drawn, and every electron of those is
    deposited, so rendered rows are bit for bit those of the whole frame. Then come X-rays, hot
    pixels (hot_values) and dead pixels (0), both flat frame indices.

    Returns the electrons per frame (n,) (of the whole frame with whole_counts or track_truth,
    else of the bands drawn), and, with track_truth (whole frames only), the landing pixels (flat,
    sorted and unique per frame), their offsets (n+1,) and counts (n,) (empty without track_truth)."""
    n = frame_keys.shape[0]
    n_bands = band_edges.shape[0] - 1
    # The hot and dead pixels in the rendered rows, as offsets into them (once, not per frame).
    hot_at, hot_which = _in_rows(hot_pixels, row0 * cols, (row0 + n_rows) * cols)
    hot_here = hot_values[hot_which]
    dead_at, _ = _in_rows(dead_pixels, row0 * cols, (row0 + n_rows) * cols)
    first, last = bands_reaching(band_edges, row0, row0 + n_rows)
    # Counts first (so one buffer holds every frame's truth); every band's for whole-frame counts.
    count_first, count_last = (0, n_bands - 1) if whole_counts or track_truth else (first, last)
    n_drawn, after, counts = draw_counts(
        frame_keys, band_edges, comp_row, comp_col, comp_radius, comp_density, cols, count_first, count_last
    )

    offsets = np.zeros(n + 1, np.int64)
    n_events = np.zeros(n, np.int64)
    if track_truth:
        for f in range(n):
            offsets[f + 1] = offsets[f] + counts[f]
    events = np.empty(offsets[n], np.uint32)
    # One bit per pixel: sorts and de-duplicates landing pixels in O(pixels / 64).
    landed = np.zeros((rows * cols + 63) // 64 if track_truth else 0, np.uint64)
    most = _most_drawn(n_drawn, first, last, n_bands)
    hit_row = np.empty(most, np.int64)
    hit_col = np.empty(most, np.int64)
    hit_stamp = np.empty(most, np.uint64)
    cand_z = np.empty(CANDIDATES, np.uint64)
    cand_y = np.empty(CANDIDATES)
    cand_x = np.empty(CANDIDATES)
    cand_in = np.empty(CANDIDATES, np.int64)

    for f in range(n):
        base = f * frame_stride + data_offset
        _fill_noise(out, base, cols, row0, n_rows, frame_keys[f], noise_pool, noise_values, noise_base, stride_spread)
        n_hits = land_electrons(
            f, n_drawn, after, first, last, band_edges, comp_row, comp_col, comp_radius, row0, cols,
            hit_row, hit_col, hit_stamp, cand_z, cand_y, cand_x, cand_in,
        )
        _deposit(out, base, row0, n_rows, cols, hit_row, hit_col, hit_stamp, n_hits, corners, wide, full, landed)
        _add_xrays(out, base, rows, cols, row0, n_rows, frame_keys[f], xray_rate, xray_lo, xray_hi)
        for h in range(hot_at.shape[0]):
            out[np.uintp(base + hot_at[h])] = hot_here[h]
        for d in range(dead_at.shape[0]):
            out[np.uintp(base + dead_at[d])] = 0
        if track_truth:
            n_events[f] = _collect_truth(landed, events, offsets[f]) - offsets[f]
    return counts, events, offsets, n_events


@njit(nogil=True, cache=True)
def write_headers(words, stride, indices, scan_number, first_frame_number, scan_rows, scan_cols, frames_per_position):
    """Write the header of record i (core.detector.HEADER_DTYPE, little-endian) for frame indices[i]
    (n,) int64 at ``words[i * stride:]`` (uint16): one call instead of six numpy field assignments,
    which took as long as rendering a third of a sector."""
    for i in range(indices.shape[0]):
        at = i * stride
        number = indices[i] + first_frame_number
        position = indices[i] // frames_per_position
        words[at] = scan_number & 0xFFFF
        words[at + 1] = scan_number >> 16
        words[at + 2] = number & 0xFFFF
        words[at + 3] = number >> 16
        words[at + 4] = scan_cols
        words[at + 5] = scan_rows
        words[at + 6] = position % scan_cols
        words[at + 7] = position // scan_cols
