"""Simulator of the NCEM 4D Camera: frames a user would mistake for the real camera's.

Each frame (576 x 576 ``uint16``, (rows, cols), ADU) is built from

- a pedestal-subtracted background near ``pedestal`` ADU with Gaussian read noise of ``read_noise``
  ADU. A pool of 2**20 noise values is drawn once; a frame takes its rows from it at a random start
  and a random row stride (no value twice in a frame), so noise costs a memory copy from the cache,
  not a random draw per pixel;
- electrons arriving as a Poisson process, ``dose`` electrons/pixel/frame on average over the frame,
  distributed as the specimen's diffraction pattern (sources.specimen) at the frame's scan position.
  An electron deposits a gamma-distributed charge (``electron_adu_mean`` ADU on average) spread by a
  Gaussian charge cloud over its landing pixel and the 8 neighbours; the landing pixel keeps the
  largest share, so it is the strict local maximum unless noise or a neighbour electron interferes;
- occasional X-rays (``xray_rate`` per frame), each putting thousands of ADU on one pixel;
- a few hot pixels (the same high value in every frame) and dead pixels (always 0).

Randomness comes from counter-based streams keyed by (seed, frame index, sub-stream): a frame is the
same whatever the batch it is generated in. The true electron landing pixels are kept with each frame.

One module's sector of frames (``DetectorSimulator.sector_batch``, ``records``: what one of the four
receivers gets) is rendered on its own: the electrons are drawn per band of rows, each band from its
own sub-stream, and a sector draws only its own rows' electrons and those of the rows next to its
edges (their charge reaches it). So the sector is bit for bit the same rows of the whole frame,
charge shared across the sector boundary included, for the work of its own electrons only.

Scan order: positions row-major (x fastest), flat position ``p = y * cols + x``; with K frames per
position the K frames of a position are consecutive; frame number = ``first_frame_number`` + index.
"""

from __future__ import annotations

import math
import operator
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numba import njit
from scipy.special import gammaincinv, ndtr

from stemstream.formats.raw import (
    FRAME_COLS,
    FRAME_ROWS,
    HEADER_BYTES,
    N_MODULES,
    RECORD_BYTES,
    RECORD_DTYPE,
    SECTOR_ROWS,
    RawModuleWriter,
    make_sector_records,
    write_status_file,
)
from stemstream.sources.specimen import SyntheticSpecimen

FRAME_PIXELS = FRAME_ROWS * FRAME_COLS
_UINT16_MAX = 65535

# Pre-generated tables: sizes are powers of two so that a random index is a bit mask.
_N_CHARGE_LEVELS = 4096  # quantiles of the per-electron charge distribution
_KERNELS_PER_LEVEL = 4  # charge-sharing patterns drawn for each charge level
_N_STAMPS = _N_CHARGE_LEVELS * _KERNELS_PER_LEVEL  # 3x3 integer deposits of one electron: 288 kB
# Read noise comes from a pool of 2**20 values (1 MB as uint8, see DetectorSimulator.__init__): a
# frame takes its rows at a random start and row stride (576 .. 831), 0.48 M values in all, none twice.
# The pool stays in the L2/L3 caches, so noise costs about what writing the pixels does.
_NOISE_POOL_VALUES = 1 << 20
_NOISE_STRIDE_SPREAD = 256
assert _NOISE_POOL_VALUES & (_NOISE_POOL_VALUES - 1) == 0 and _NOISE_STRIDE_SPREAD & (_NOISE_STRIDE_SPREAD - 1) == 0
assert (FRAME_ROWS - 1) * (FRAME_COLS + _NOISE_STRIDE_SPREAD - 1) + FRAME_COLS <= _NOISE_POOL_VALUES
_MIN_CENTRE_RATIO = 1.3  # landing pixel keeps >= 1.3x the charge of any neighbour
_PATTERN_BLOCK = 1024  # scan positions whose diffraction patterns are computed at once
_PATTERN_BLOCKS_KEPT = 4


def _band_edges() -> np.ndarray:
    """(B+1,) int64 row edges of the bands electrons are drawn in: 0, 143, 145, 287, 289, ..., 576.
    The two rows either side of each sector boundary are a band of their own: a sector needs the
    electrons landing on its rows and on the row next to each of its edges (their charge reaches
    it), so it draws its own band(s) and the boundary bands only."""
    edges = [0]
    for m in range(1, N_MODULES):
        edges += [m * SECTOR_ROWS - 1, m * SECTOR_ROWS + 1]
    return np.array(edges + [FRAME_ROWS], np.int64)


_BAND_EDGES = _band_edges()

# Stream domains: independent random streams from one seed.
_DOMAIN_FRAMES = 0x6672616D65730001
_DOMAIN_DROPS = 0x64726F7073000002
_DOMAIN_DETECTOR = 0xDE7EC7

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_INV_2_53 = 1.0 / 9007199254740992.0
_DEBRUIJN = np.uint64(0x03F79D71B4CB0A89)


def _debruijn_table() -> np.ndarray:
    """Bit position of an isolated bit b, indexed by (b * _DEBRUIJN) >> 58 (a count-trailing-zeros)."""
    table = np.zeros(64, np.int64)
    for bit in range(64):
        table[(((1 << bit) * int(_DEBRUIJN)) & _MASK64) >> 58] = bit
    return table


_DEBRUIJN_TABLE = _debruijn_table()


def _mix64_int(z: int) -> int:
    """SplitMix64 finaliser on Python ints (for keys derived once per simulator)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * int(_MIX1)) & _MASK64
    z = ((z ^ (z >> 27)) * int(_MIX2)) & _MASK64
    return z ^ (z >> 31)


@njit(inline="always")
def _mix64(z):
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def _next(state):
    """Next 64 random bits of the SplitMix64 stream held in state[0]."""
    state[0] += _GOLDEN
    return _mix64(state[0])


@njit(inline="always")
def _uniform(state):
    """Uniform float in [0, 1)."""
    return float(_next(state) >> np.uint64(11)) * _INV_2_53


@njit(inline="always")
def _below(state, n):
    """Uniform integer in [0, n) (n << 2**53, so the modulo bias is negligible)."""
    return int((_next(state) >> np.uint64(11)) % np.uint64(n))


@njit(nogil=True, cache=True)
def _poisson(state, lam):
    """Poisson deviate: multiplication method below 10, Hoermann's PTRS rejection above."""
    if lam <= 0.0:
        return 0
    if lam < 10.0:
        limit = math.exp(-lam)
        k = 0
        prod = _uniform(state)
        while prod > limit:
            k += 1
            prod *= _uniform(state)
        return k
    slam = math.sqrt(lam)
    loglam = math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2.0)
    while True:
        u = _uniform(state) - 0.5
        v = _uniform(state)
        us = 0.5 - abs(u)
        k = math.floor((2.0 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= vr:
            return int(k)
        if k < 0 or (us < 0.013 and v > us):
            continue
        if math.log(v) + math.log(invalpha) - math.log(a / (us * us) + b) <= -lam + k * loglam - math.lgamma(k + 1.0):
            return int(k)


@njit(nogil=True, cache=True)
def _stream_keys(key, indices):
    """(n,) uint64 starting states of the streams of items `indices` (n,) int64 under `key`."""
    out = np.empty(indices.shape[0], np.uint64)
    for i in range(indices.shape[0]):
        out[i] = _mix64(key ^ _mix64(np.uint64(indices[i]) + _GOLDEN))
    return out


@njit(nogil=True, cache=True)
def _sector_uniforms(key, frame_indices, n_modules):
    """(n, n_modules) uniforms in [0, 1), one per sector of each frame index (n,) int64."""
    out = np.empty((frame_indices.shape[0], n_modules))
    state = np.empty(1, np.uint64)
    for i in range(frame_indices.shape[0]):
        state[0] = _mix64(key ^ _mix64(np.uint64(frame_indices[i]) + _GOLDEN))
        for m in range(n_modules):
            out[i, m] = _uniform(state)
    return out


# Sub-streams of a frame's stream: the noise placement, the X-rays, and one per (component, band)
# of electrons. Each is keyed by (frame, sub-stream) alone, so a sector draws only the electrons
# that can reach its rows, and still gets exactly the draws the whole frame gets.
_SUB_NOISE = 0
_SUB_XRAYS = 1
_SUB_ELECTRONS = 2  # + component * n_bands + band
_SUB_MULT = np.uint64(0xD1B54A32D192ED03)

# An electron's landing point and its charge come from one 64-bit draw: 21 bits for the row, 21
# for the column (a 576 px range in 2**21 steps: 3e-4 px at most, far below a pixel), 14 bits for
# its stamp (charge level and sharing pattern, see _charge_stamps) and 2 for the stamp's mirroring.
_POS_BITS = 21
_LOW21 = np.uint64((1 << _POS_BITS) - 1)
_INV_2_21 = 1.0 / (1 << _POS_BITS)
_STAMP_SHIFT = np.uint64(2 * _POS_BITS)
_STAMP_MASK = np.uint64((1 << 14) - 1)
_CANDIDATES = 64  # rejection-sampling candidates computed at a time
assert _N_STAMPS == 1 << 14


@njit(inline="always")
def _substream(frame_key, index):
    """Starting state of sub-stream ``index`` of the frame whose stream key is frame_key."""
    return _mix64(frame_key ^ _mix64(np.uint64(index + 1) * _SUB_MULT))


@njit(inline="always")
def _segment(radius, y):
    """Integral of the half-chord sqrt(radius**2 - t**2) for t from 0 to y (y clamped to +-radius)."""
    y = min(max(y, -radius), radius)
    return 0.5 * (y * math.sqrt(max(radius * radius - y * y, 0.0)) + radius * radius * math.asin(y / radius))


@njit(inline="always")
def _quadrant(radius, x, y):
    """Area of the disk of ``radius`` centred at the origin where t_col <= x and t_row <= y."""
    if x <= -radius or y <= -radius:
        return 0.0
    x = min(x, radius)
    y = min(y, radius)
    t = math.sqrt(max(radius * radius - x * x, 0.0))  # |row| beyond t: the whole chord is on x's side
    c = min(max(y, -t), t)
    middle = x * (c + t) + _segment(radius, c) - _segment(radius, -t)  # rows -t .. c: chord from -s to x
    if x < 0.0:
        return middle  # rows beyond +-t: no chord left of x
    below = 2.0 * (_segment(radius, min(y, -t)) + _segment(radius, radius))  # rows -radius .. -t, whole chords
    above = 2.0 * (_segment(radius, max(y, t)) - _segment(radius, t))  # rows t .. y, whole chords
    return below + middle + above


@njit(nogil=True, cache=True)
def _disk_rect_area(cy, cx, radius, y1, y2, x1, x2):
    """Area (px^2) of the disk centred (cy, cx) (row, col) of ``radius`` within rows [y1, y2) and
    cols [x1, x2), in closed form (exact to rounding, so the bands' parts of a disk add up to it)."""
    if radius <= 0.0 or y2 <= y1 or x2 <= x1 or y2 <= cy - radius or y1 >= cy + radius:
        return 0.0
    if cx - radius >= x1 and cx + radius <= x2:  # whole chords: a strip of the disk
        return 2.0 * (_segment(radius, y2 - cy) - _segment(radius, y1 - cy))
    return (
        _quadrant(radius, x2 - cx, y2 - cy)
        - _quadrant(radius, x1 - cx, y2 - cy)
        - _quadrant(radius, x2 - cx, y1 - cy)
        + _quadrant(radius, x1 - cx, y1 - cy)
    )


@njit(nogil=True, cache=True)
def _component_densities(comp_row, comp_col, comp_radius, probabilities, rows, cols, electrons):
    """(n, C) expected electrons per px^2 in each component of the patterns (n, C) (disks: centres,
    radii, probabilities; a negative radius: uniform over the frame), ``electrons`` on the frame in
    all. The parts of disks off the frame are cut off and the rest renormalised (the electrons that
    reach the detector keep the dose): a component's density is electrons * p / (Z * its area),
    Z = sum of p * (fraction of the component on the frame)."""
    n, n_comp = probabilities.shape
    out = np.zeros((n, n_comp))
    frame_area = float(rows) * float(cols)
    for i in range(n):
        z = 0.0
        for k in range(n_comp):
            p = probabilities[i, k]
            radius = comp_radius[i, k]
            if p <= 0.0 or radius == 0.0:
                continue
            if radius < 0.0:
                z += p
            else:
                on_frame = _disk_rect_area(comp_row[i, k], comp_col[i, k], radius, 0.0, float(rows), 0.0, float(cols))
                z += p * on_frame / (math.pi * radius * radius)
        if z <= 0.0:
            continue
        for k in range(n_comp):
            p = probabilities[i, k]
            radius = comp_radius[i, k]
            if p <= 0.0 or radius == 0.0:
                continue
            area = frame_area if radius < 0.0 else math.pi * radius * radius
            out[i, k] = electrons * p / (z * area)
    return out


@njit(inline="always")
def _add(pixels, p, value):
    pixels[p] = min(np.int64(pixels[p]) + np.int64(value), _UINT16_MAX)


@njit(nogil=True, cache=True)
def _deposit_carefully(pixels, base, lr, c, n_rows, cols, corners, wide, full, stamp, dy, dx):
    """Add an electron's charge around row lr (relative to the rendered rows, may lie just outside
    them) and col c of the rows that start at ``pixels[base]``, in the cases _render_rows leaves
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
def _render_rows(
    out,
    frame_stride,
    data_offset,
    rows,
    cols,
    row0,
    n_rows,
    whole_counts,
    track_truth,
    frame_keys,
    noise_pool,
    noise_values,
    noise_base,
    stride_spread,
    band_edges,
    comp_row,
    comp_col,
    comp_radius,
    comp_density,
    corners,
    wide,
    full,
    xray_rate,
    xray_lo,
    xray_hi,
    hot_pixels,
    hot_values,
    dead_pixels,
):
    """Render frame rows ``row0 .. row0+n_rows-1`` of n frames (each rows x cols) into ``out``.

    out: 1-D C-contiguous uint16; frame f's rows go to ``out[f*frame_stride + data_offset:]``,
    n_rows * cols pixels in (rows, cols) order (a whole frame: row0 = 0, n_rows = rows; a sector of
    a raw record: frame_stride = the record's size in uint16 and data_offset = its header's).

    Electrons are a Poisson process over the frame (comp_density: (n, C) electrons per px^2 of each
    disk component, see _component_densities), drawn per horizontal band of rows (band_edges:
    (B+1,) int64, 0 .. rows) and component, each from its own sub-stream: independent Poisson counts
    per (component, band) with uniform landing points in the disk's part in the band are the same
    process as the frame's Poisson count spread over the whole pattern. Only the bands whose
    electrons can put charge on the rendered rows are drawn, and every electron of those is
    deposited, so rendered rows are bit for bit those of the whole frame.

    Returns the electrons per frame (n,) (of the whole frame with whole_counts or track_truth,
    else of the bands drawn), and, with track_truth (whole frames only), the landing pixels (flat,
    sorted and unique per frame), their offsets (n+1,) and counts (n,) (empty without track_truth)."""
    n = frame_keys.shape[0]
    n_comp = comp_density.shape[1]
    n_bands = band_edges.shape[0] - 1
    n_slots = n_comp * n_bands
    row_end = row0 + n_rows
    # The hot and dead pixels in the rendered rows, as offsets into them (once, not per frame).
    hot_at = np.empty(hot_pixels.shape[0], np.int64)
    hot_here = np.empty(hot_pixels.shape[0], np.uint16)
    n_hot = 0
    for h in range(hot_pixels.shape[0]):
        if row0 * cols <= hot_pixels[h] < row_end * cols:
            hot_at[n_hot] = hot_pixels[h] - row0 * cols
            hot_here[n_hot] = hot_values[h]
            n_hot += 1
    dead_at = np.empty(dead_pixels.shape[0], np.int64)
    n_dead = 0
    for d in range(dead_pixels.shape[0]):
        if row0 * cols <= dead_pixels[d] < row_end * cols:
            dead_at[n_dead] = dead_pixels[d] - row0 * cols
            n_dead += 1
    fcols = float(cols)
    state = np.empty(1, np.uint64)

    # The bands whose landing rows (an electron's charge reaches the rows next to it) meet the
    # rendered rows; the electrons of every band are counted for whole-frame counts.
    first = n_bands
    last = -1
    for b in range(n_bands):
        if band_edges[b] <= row_end and band_edges[b + 1] >= row0:
            first = min(first, b)
            last = max(last, b)
    count_first, count_last = (0, n_bands - 1) if whole_counts or track_truth else (first, last)

    # Counts first (so one buffer holds every frame's truth), with each sub-stream's state after them.
    n_drawn = np.zeros((n, n_slots), np.int64)
    after = np.empty((n, n_slots), np.uint64)
    counts = np.zeros(n, np.int64)
    for f in range(n):
        for b in range(count_first, count_last + 1):
            y1 = float(band_edges[b])
            y2 = float(band_edges[b + 1])
            for k in range(n_comp):
                density = comp_density[f, k]
                if density <= 0.0:
                    continue
                radius = comp_radius[f, k]
                if radius < 0.0:
                    area = (y2 - y1) * fcols
                else:
                    area = _disk_rect_area(comp_row[f, k], comp_col[f, k], radius, y1, y2, 0.0, fcols)
                if area < 1e-9:  # no part of the disk in the band (rounding aside): nothing to draw
                    continue
                slot = k * n_bands + b
                state[0] = _substream(frame_keys[f], _SUB_ELECTRONS + slot)
                n_drawn[f, slot] = _poisson(state, density * area)
                after[f, slot] = state[0]
                counts[f] += n_drawn[f, slot]

    offsets = np.zeros(n + 1, np.int64)
    n_events = np.zeros(n, np.int64)
    if track_truth:
        for f in range(n):
            offsets[f + 1] = offsets[f] + counts[f]
    events = np.empty(offsets[n], np.uint32)
    # One bit per pixel: sorts and de-duplicates landing pixels in O(pixels / 64).
    landed = np.zeros((rows * cols + 63) // 64 if track_truth else 0, np.uint64)
    # A frame's electrons in the bands drawn: landing row (relative to row0), col, stamp.
    most = 0
    for f in range(n):
        drawn = 0
        for b in range(first, last + 1):
            for k in range(n_comp):
                drawn += n_drawn[f, k * n_bands + b]
        most = max(most, drawn)
    hit_row = np.empty(most, np.int64)
    hit_col = np.empty(most, np.int64)
    hit_stamp = np.empty(most, np.uint64)
    cand_z = np.empty(_CANDIDATES, np.uint64)
    cand_y = np.empty(_CANDIDATES)
    cand_x = np.empty(_CANDIDATES)
    cand_in = np.empty(_CANDIDATES, np.int64)

    for f in range(n):
        base = f * frame_stride + data_offset
        frame = out[base : base + n_rows * cols].reshape((n_rows, cols))  # frame rows row0 .. row_end-1

        # Noise: frame row r is noise_pool[start + r * stride :][:cols] (modulo noise_values; the pool
        # repeats its first cols values past the end). stride >= cols and rows * stride + cols <=
        # noise_values, so no value appears twice in a frame; the random start and stride make each
        # frame's selection its own.
        state[0] = _substream(frame_keys[f], _SUB_NOISE)
        word = _next(state)  # noise_values and stride_spread are powers of two: masks, not divisions
        start = np.int64(word & np.uint64(noise_values - 1))
        stride = cols + np.int64((word >> np.uint64(32)) & np.uint64(stride_spread - 1))
        at = (start + row0 * stride) & (noise_values - 1)
        for r in range(n_rows):
            src = noise_pool[at : at + cols]
            dst = frame[r]
            for c in range(cols):
                dst[c] = src[c] + noise_base
            at += stride  # (a subtraction, not a division per row)
            if at >= noise_values:
                at -= noise_values

        n_hits = 0
        for b in range(first, last + 1):
            y1 = float(band_edges[b])
            y2 = float(band_edges[b + 1])
            last_row = band_edges[b + 1] - 1
            for k in range(n_comp):
                slot = k * n_bands + b
                m = n_drawn[f, slot]
                if m == 0:
                    continue
                s = after[f, slot]
                cy = comp_row[f, k]
                cx = comp_col[f, k]
                radius = comp_radius[f, k]
                if radius >= 0.0:
                    # Rejection from the bounding box of the disk's part in the band (on the frame).
                    ylo = max(y1, cy - radius)
                    yhi = min(y2, cy + radius)
                    if ylo <= cy <= yhi:
                        half = radius
                    else:
                        d = min(abs(ylo - cy), abs(yhi - cy))
                        half = math.sqrt(max(radius * radius - d * d, 0.0))
                    xlo = max(cx - half, 0.0)
                    xhi = min(cx + half, fcols)
                else:
                    ylo, yhi, xlo, xhi = y1, y2, 0.0, fcols
                height = yhi - ylo
                width = xhi - xlo
                r2 = radius * radius if radius >= 0.0 else math.inf  # the background: all accepted
                # Rejection sampling in two loops per block of candidates (the stream's next draws,
                # in order): one computes every candidate and whether it lies in the disk (no
                # branch, vectorised), one keeps them in order until m are kept (no accept/reject
                # branch either: one mispredicts on about one candidate in five). Candidates past
                # the m-th kept one are never used, so the electrons do not depend on block sizes.
                goal = n_hits + m
                while n_hits < goal:
                    n_cand = min(_CANDIDATES, (goal - n_hits) * 5 // 4 + 4)
                    for i in range(n_cand):
                        z = _mix64(s + np.uint64(i + 1) * _GOLDEN)
                        y = ylo + height * float(np.int64(z & _LOW21)) * _INV_2_21
                        x = xlo + width * float(np.int64((z >> np.uint64(_POS_BITS)) & _LOW21)) * _INV_2_21
                        dy = y - cy
                        dx = x - cx
                        cand_z[i] = z
                        cand_y[i] = y
                        cand_x[i] = x
                        cand_in[i] = np.int64(dy * dy + dx * dx <= r2)
                    s += np.uint64(n_cand) * _GOLDEN
                    for i in range(n_cand):
                        hit_row[n_hits] = min(int(cand_y[i]), last_row) - row0
                        hit_col[n_hits] = min(int(cand_x[i]), cols - 1)
                        hit_stamp[n_hits] = cand_z[i] >> _STAMP_SHIFT  # stamp (14 bits), its flips (2)
                        n_hits += cand_in[i]
                        if n_hits == goal:
                            break

        for e in range(n_hits):
            lr = hit_row[e]
            c = hit_col[e]
            if track_truth:
                pix = (lr + row0) * cols + c
                landed[pix >> 6] |= np.uint64(1) << np.uint64(pix & 63)
            # The electron's charge: its stamp (see _corner_stamps) mirrored by two bits of its own.
            # Written out here: arrays passed to an inlined function cost reference counting.
            bits = hit_stamp[e]
            stamp = np.uintp(bits & _STAMP_MASK)
            dy = 1 - 2 * np.int64((bits >> np.uint64(14)) & np.uint64(1))
            dx = 1 - 2 * np.int64((bits >> np.uint64(15)) & np.uint64(1))
            if wide[stamp] or not (0 < lr < n_rows - 1 and 0 < c < cols - 1):
                _deposit_carefully(out, base, lr, c, n_rows, cols, corners, wide, full, stamp, dy, dx)
                continue
            at = base + lr * cols + c  # interior: no edge checks (unsigned indices)
            for q in range(4):  # landing pixel, col neighbour, row neighbour, diagonal neighbour
                p = np.uintp(at + (q & 1) * dx + (q >> 1) * dy * cols)
                out[p] = min(np.int64(out[p]) + np.int64(corners[stamp, np.uintp(q)]), _UINT16_MAX)

        state[0] = _substream(frame_keys[f], _SUB_XRAYS)
        for _ in range(_poisson(state, xray_rate)):
            pix = _below(state, rows * cols)
            adu_x = np.int64(xray_lo + (xray_hi - xray_lo) * _uniform(state))
            r = pix // cols
            if row0 <= r < row_end:
                c = pix % cols
                frame[r - row0, c] = min(np.int64(frame[r - row0, c]) + adu_x, _UINT16_MAX)

        for h in range(n_hot):
            out[np.uintp(base + hot_at[h])] = hot_here[h]
        for d in range(n_dead):
            out[np.uintp(base + dead_at[d])] = 0

        if not track_truth:
            continue
        # Truth: set bits in pixel order; clear the words for the next frame.
        k = offsets[f]
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
        n_events[f] = k - offsets[f]
    return counts, events, offsets, n_events


@njit(nogil=True, cache=True)
def _write_headers(words, stride, indices, scan_number, first_frame_number, scan_rows, scan_cols, frames_per_position):
    """Write the header of record i (formats.raw.HEADER_DTYPE, little-endian) for frame indices[i]
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


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate. Raises ValueError on construction for an invalid value.

    scan_shape: (rows, cols) of the scan. dose: mean electrons/pixel/frame over the whole frame.
    pedestal, read_noise: ADU. electron_adu_mean: mean total charge of one electron (ADU), gamma
    distributed with shape electron_adu_shape (std = mean / sqrt(shape)). charge_cloud_sigma: px,
    width of the charge cloud that spreads an electron over its 3x3 neighbourhood. xray_rate: X-ray
    hits per frame, each of xray_adu = (low, high) ADU (uniform) on one pixel. hot_adu: (low, high)
    ADU range of the hot pixels' constant values. drop_sector_probability: chance that one module's
    sector of one frame is lost on the network (such sectors are not emitted or written).
    """

    scan_shape: tuple[int, int]
    frames_per_position: int = 1
    dose: float = 0.002
    seed: int = 0
    scan_number: int = 1
    first_frame_number: int = 1
    pedestal: float = 20.0
    read_noise: float = 2.0
    electron_adu_mean: float = 120.0
    electron_adu_shape: float = 4.0
    charge_cloud_sigma: float = 0.15
    xray_rate: float = 0.01
    xray_adu: tuple[float, float] = (2000.0, 10000.0)
    n_hot_pixels: int = 5
    hot_adu: tuple[float, float] = (200.0, 500.0)
    n_dead_pixels: int = 5
    drop_sector_probability: float = 0.0

    def __post_init__(self) -> None:
        try:
            rows, cols = (operator.index(v) for v in self.scan_shape)
        except (TypeError, ValueError):
            raise ValueError(f"scan_shape must be (rows, cols), two integers, got {self.scan_shape!r}") from None
        if not (0 < rows <= _UINT16_MAX and 0 < cols <= _UINT16_MAX):
            raise ValueError(f"scan_shape (rows, cols) must be positive and at most 65535 each, got {(rows, cols)}")
        object.__setattr__(self, "scan_shape", (rows, cols))
        for name in ("frames_per_position", "seed", "scan_number", "first_frame_number", "n_hot_pixels", "n_dead_pixels"):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, operator.index(value))
            except TypeError:
                raise ValueError(f"{name} must be an integer, got {value!r}") from None
        for name in ("xray_adu", "hot_adu"):
            value = getattr(self, name)
            try:
                low, high = (float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be (low, high) in ADU, got {value!r}") from None
            if not 0 <= low <= high <= _UINT16_MAX:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high <= 65535 ADU, got {(low, high)}")
            object.__setattr__(self, name, (low, high))
        if self.frames_per_position < 1:
            raise ValueError(f"frames_per_position must be >= 1, got {self.frames_per_position}")
        if not 0 <= self.dose <= 1:  # also rejects NaN; beyond ~0.1 counting is meaningless anyway
            raise ValueError(f"dose must be in 0..1 electrons/pixel/frame, got {self.dose}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0 <= self.scan_number <= 0xFFFFFFFF:
            raise ValueError(f"scan_number must fit in uint32, got {self.scan_number}")
        n_frames = rows * cols * self.frames_per_position
        if self.first_frame_number < 0 or self.first_frame_number + n_frames - 1 > 0xFFFFFFFF:
            raise ValueError(
                f"frame numbers {self.first_frame_number}..{self.first_frame_number + n_frames - 1} do not fit in uint32"
            )
        if not 0 <= self.pedestal <= 1000:
            raise ValueError(f"pedestal must be in 0..1000 ADU, got {self.pedestal}")
        if not 0 <= self.read_noise <= 100:
            raise ValueError(f"read_noise must be in 0..100 ADU, got {self.read_noise}")
        if not self.electron_adu_mean > 0 or not self.electron_adu_shape > 0:
            raise ValueError(
                f"electron_adu_mean and electron_adu_shape must be > 0, got {self.electron_adu_mean}, "
                f"{self.electron_adu_shape}"
            )
        if not 0 < self.charge_cloud_sigma <= 2:
            raise ValueError(f"charge_cloud_sigma must be in (0, 2] px, got {self.charge_cloud_sigma}")
        if not (math.isfinite(self.xray_rate) and self.xray_rate >= 0):
            raise ValueError(f"xray_rate must be >= 0 X-rays/frame, got {self.xray_rate}")
        if self.n_hot_pixels < 0 or self.n_dead_pixels < 0 or self.n_hot_pixels + self.n_dead_pixels > 10_000:
            raise ValueError(
                f"n_hot_pixels and n_dead_pixels must be >= 0 and together <= 10000, got "
                f"{self.n_hot_pixels}, {self.n_dead_pixels}"
            )
        if not 0 <= self.drop_sector_probability <= 1:
            raise ValueError(f"drop_sector_probability must be in [0, 1], got {self.drop_sector_probability}")

    @property
    def n_positions(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    @property
    def n_frames(self) -> int:
        return self.n_positions * self.frames_per_position


@dataclass
class FrameBatch:
    """Consecutive simulated frames.

    frame_numbers: (n,) uint32 detector frame counters. positions: (n,) int64 flat scan positions
    ``y * cols + x``. frames: (n, 576, 576) uint16 ADU, (rows, cols). true_events: per frame, the
    sorted unique flat pixel indices ``row * 576 + col`` (uint32) where electrons landed (not hot
    pixels, not X-rays; electrons in dropped sectors included). electron_counts: (n,) int64 electrons
    drawn per frame (can exceed len(true_events[i]) when two land on one pixel).
    """

    frame_numbers: np.ndarray
    positions: np.ndarray
    frames: np.ndarray
    true_events: list[np.ndarray]
    electron_counts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.frame_numbers)


@dataclass
class SectorBatch:
    """Sector ``module`` (frame rows ``144*module .. 144*module + 143``) of consecutive simulated frames.

    frame_numbers: (n,) uint32. positions: (n,) int64 flat scan positions. sectors: (n, 144, 576)
    uint16 ADU, equal to the same rows of the whole frames. dropped: (n,) bool, True where this
    module's sector of the frame is lost on the network (it is rendered all the same). electron_counts:
    (n,) int64 electrons drawn over the whole frame. No true events: they are a whole-frame property.
    """

    module: int
    frame_numbers: np.ndarray
    positions: np.ndarray
    sectors: np.ndarray
    dropped: np.ndarray
    electron_counts: np.ndarray

    def __len__(self) -> int:
        return len(self.frame_numbers)


def _charge_quantiles(mean: float, shape: float) -> np.ndarray:
    """(_N_CHARGE_LEVELS,) float32 ADU: evenly spaced quantiles of the gamma charge distribution."""
    q = (np.arange(_N_CHARGE_LEVELS) + 0.5) / _N_CHARGE_LEVELS
    return (gammaincinv(shape, q) * mean / shape).astype(np.float32)


def _sharing_kernels(rng: np.random.Generator, sigma: float, n: int) -> np.ndarray:
    """(n, 3, 3) float32 fractions (each sums to 1) of an electron's charge on its
    3x3 neighbourhood: a Gaussian cloud of width ~sigma px centred at a random point of the landing
    pixel. Landing points so near an edge that a neighbour would get nearly as much are redrawn."""
    edges = np.array([-1.5, -0.5, 0.5, 1.5])
    kept: list[np.ndarray] = []
    n_kept = 0
    while n_kept < n:
        m = 4 * n
        offset = rng.uniform(-0.5, 0.5, (m, 2))
        width = sigma * rng.uniform(0.8, 1.2, (m, 1))
        along_rows = np.diff(ndtr((edges - offset[:, :1]) / width), axis=1)  # (m, 3)
        along_cols = np.diff(ndtr((edges - offset[:, 1:]) / width), axis=1)
        kernels = along_rows[:, :, None] * along_cols[:, None, :]
        kernels /= kernels.sum(axis=(1, 2), keepdims=True)
        neighbours = kernels.reshape(m, 9)[:, [0, 1, 2, 3, 5, 6, 7, 8]].max(axis=1)
        good = kernels[kernels[:, 1, 1] >= _MIN_CENTRE_RATIO * neighbours]
        kept.append(good)
        n_kept += len(good)
    return np.concatenate(kept)[:n].astype(np.float32)


def _charge_stamps(rng: np.random.Generator, config: SimulationConfig) -> np.ndarray:
    """(_N_STAMPS, 9) uint16: what one electron adds to its 3x3 neighbourhood (row-major, landing
    pixel in the middle), ADU. Stamp i has charge level i // _KERNELS_PER_LEVEL (every quantile of
    the charge distribution as often) and a sharing pattern of its own, drawn independently: an
    electron taking a uniformly random stamp gets exactly the charge distribution of the quantile
    table, and a sharing pattern from 16,384 draws of the charge cloud, independent of its charge.
    Precomputed so that depositing an electron is 9 integer additions, not 9 products and
    float-to-integer conversions (a third of the time an electron took)."""
    adu = _charge_quantiles(config.electron_adu_mean, config.electron_adu_shape)
    adu = np.repeat(adu, _KERNELS_PER_LEVEL)[:, None]
    shares = _sharing_kernels(rng, config.charge_cloud_sigma, _N_STAMPS).reshape(_N_STAMPS, 9)
    return np.minimum(np.floor(adu * shares + np.float32(0.5)), _UINT16_MAX).astype(np.uint16)


def _corner_stamps(stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stamps (N, 9) as corner stamps: (N, 4) uint16 (landing pixel, col neighbour, row neighbour,
    diagonal neighbour), each stamp mirrored so that its charge lies towards the bottom right, and
    (N,) bool, True for the stamps with charge on both sides of the landing pixel (all zeros in the
    corner stamps; the kernel adds their whole 3x3). At the default cloud width the charge reaches
    at most the neighbours towards the nearest corner but for a few stamps in 10,000 (1 ADU spilt
    on both sides), so an electron costs 4 additions instead of 9 (the deposit was half its cost).

    The kernel mirrors every stamp by two random bits of the electron's own. The sharing patterns
    come from landing points uniform over the pixel and are symmetric under those mirrorings, so
    a mirrored stamp is as likely as the stamp itself: the charge is shared as before."""
    grid = stamps.reshape(-1, 3, 3)
    up, down = grid[:, 0, :].any(axis=1), grid[:, 2, :].any(axis=1)
    left, right = grid[:, :, 0].any(axis=1), grid[:, :, 2].any(axis=1)
    wide = (up & down) | (left & right)
    grid = np.where(up[:, None, None], grid[:, ::-1, :], grid)
    grid = np.where(left[:, None, None], grid[:, :, ::-1], grid)
    corners = np.ascontiguousarray(grid[:, 1:, 1:].reshape(-1, 4))
    corners[wide] = 0
    return corners, wide


class DetectorSimulator:
    """Generates the frames of one simulated scan, in any order and any batching.

    ``batch(start, count)`` gives frames ``start .. start+count-1`` (frame indices, 0-based); the
    same index always gives the same frame for a given config. Generation runs in a compiled kernel
    that releases the GIL, so several threads can generate batches at once.
    """

    def __init__(self, config: SimulationConfig, specimen: SyntheticSpecimen | None = None):
        self.config = config
        self.specimen = specimen if specimen is not None else SyntheticSpecimen(config.scan_shape, config.seed)
        if self.specimen.scan_shape != config.scan_shape:
            raise ValueError(f"specimen scan_shape {self.specimen.scan_shape} != config scan_shape {config.scan_shape}")
        rng = np.random.default_rng([config.seed, _DOMAIN_DETECTOR])
        self._frame_key = np.uint64(_mix64_int(config.seed ^ _DOMAIN_FRAMES))
        self._drop_key = np.uint64(_mix64_int(config.seed ^ _DOMAIN_DROPS))

        noise = rng.standard_normal(_NOISE_POOL_VALUES, dtype=np.float32) * np.float32(config.read_noise)
        noise += np.float32(config.pedestal)
        values = np.clip(np.rint(noise), 0, _UINT16_MAX).astype(np.int64)
        del noise
        # uint8 above a base value when the values span at most 256 ADU (read noise up to ~20 ADU):
        # half the bytes to read per pixel. The pool repeats its first FRAME_COLS values at its end,
        # so that every row is one contiguous slice.
        low = int(values.min())
        if int(values.max()) - low <= 255:
            self._noise_base = np.uint16(low)
            pool = (values - low).astype(np.uint8)
        else:
            self._noise_base = np.uint16(0)
            pool = values.astype(np.uint16)
        self._noise_pool = np.concatenate([pool, pool[:FRAME_COLS]])
        del values, pool

        self._stamps = _charge_stamps(rng, config)
        self._corners, self._wide = _corner_stamps(self._stamps)

        bad = rng.choice(FRAME_PIXELS, config.n_hot_pixels + config.n_dead_pixels, replace=False).astype(np.int64)
        self.hot_pixels: np.ndarray = np.sort(bad[: config.n_hot_pixels])  # flat row*576+col
        self.dead_pixels: np.ndarray = np.sort(bad[config.n_hot_pixels :])
        low, high = config.hot_adu
        self.hot_values: np.ndarray = np.rint(rng.uniform(low, high, len(self.hot_pixels))).astype(np.uint16)
        self._pattern_lock = threading.Lock()  # guards _pattern_cache: batches may run in threads
        self._pattern_cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}

    @property
    def n_frames(self) -> int:
        """Frames in the scan: rows * cols * frames_per_position."""
        return self.config.n_frames

    def _check_range(self, start: int, count: int) -> None:
        if start < 0 or count < 0 or start + count > self.n_frames:
            raise ValueError(f"frames {start}..{start + count - 1} outside the scan's 0..{self.n_frames - 1}")

    def _render(
        self,
        out: np.ndarray,
        frame_stride: int,
        data_offset: int,
        row0: int,
        n_rows: int,
        whole_counts: bool,
        track_truth: bool,
        indices: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Run the kernel (_render_rows) for frame indices (n,) int64 into the flat uint16 ``out``."""
        cfg = self.config
        comp_row, comp_col, comp_radius, comp_density = self._pattern_tables(indices // cfg.frames_per_position)
        return _render_rows(
            out,
            frame_stride,
            data_offset,
            FRAME_ROWS,
            FRAME_COLS,
            row0,
            n_rows,
            whole_counts,
            track_truth,
            _stream_keys(self._frame_key, indices),
            self._noise_pool,
            _NOISE_POOL_VALUES,
            self._noise_base,
            _NOISE_STRIDE_SPREAD,
            _BAND_EDGES,
            comp_row,
            comp_col,
            comp_radius,
            comp_density,
            self._corners,
            self._wide,
            self._stamps,
            float(cfg.xray_rate),
            cfg.xray_adu[0],
            cfg.xray_adu[1],
            self.hot_pixels,
            self.hot_values,
            self.dead_pixels,
        )

    def _pattern_tables(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The kernel's view of the specimen at positions (n,) int64: disk centre rows, centre cols,
        radii and electron densities (electrons per px^2, see _component_densities), each (n, C)
        float64, C-contiguous. Computed for blocks of
        _PATTERN_BLOCK positions and kept for the last few blocks: SyntheticSpecimen.patterns costs
        ~0.1 ms a call whatever the number of positions, as much as rendering several sectors, and a
        position's pattern then does not depend on the batch it is asked for in."""
        if len(positions) == 0:
            return tuple(table[:0] for table in self._pattern_block(0))
        low, high = int(positions[0]), int(positions[-1])  # positions come in ascending order
        first = low // _PATTERN_BLOCK
        last = high // _PATTERN_BLOCK
        blocks = [self._pattern_block(b) for b in range(first, last + 1)]
        if len(blocks) == 1:
            tables = blocks[0]
        else:
            tables = tuple(np.concatenate(parts) for parts in zip(*blocks))
        if high - low + 1 == len(positions):  # consecutive positions (one frame each): views, no copies
            offset = low - first * _PATTERN_BLOCK
            return tuple(table[offset : offset + len(positions)] for table in tables)
        relative = positions - first * _PATTERN_BLOCK
        return tuple(table[relative] for table in tables)

    def _pattern_block(self, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        with self._pattern_lock:
            tables = self._pattern_cache.get(block)
            if tables is None:
                start = block * _PATTERN_BLOCK
                patterns = self.specimen.patterns(np.arange(start, min(start + _PATTERN_BLOCK, self.config.n_positions)))
                comp_row = np.ascontiguousarray(patterns.centres[..., 0])
                comp_col = np.ascontiguousarray(patterns.centres[..., 1])
                comp_radius = np.ascontiguousarray(patterns.radii)
                density = _component_densities(
                    comp_row,
                    comp_col,
                    comp_radius,
                    np.ascontiguousarray(patterns.probabilities),
                    FRAME_ROWS,
                    FRAME_COLS,
                    self.config.dose * FRAME_PIXELS,
                )
                tables = (comp_row, comp_col, comp_radius, density)
                self._pattern_cache[block] = tables
                while len(self._pattern_cache) > _PATTERN_BLOCKS_KEPT:
                    del self._pattern_cache[next(iter(self._pattern_cache))]
            return tables

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_pattern_lock"], state["_pattern_cache"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pattern_lock = threading.Lock()
        self._pattern_cache = {}

    def batch(self, start: int, count: int, *, out: np.ndarray | None = None) -> FrameBatch:
        """Frames ``start .. start+count-1`` (frame indices). ``out``, if given, is a C-contiguous
        (count, 576, 576) uint16 array to fill (saves allocating; the batch's frames are then ``out``).
        Without ``out``, keep count <= 32 (21 MB) for speed: on Linux, blocks over 32 MB are fresh
        memory every time, and page-faulting it in costs about as much as generating the frames.
        Raises ValueError for a range outside the scan or a wrong ``out``."""
        self._check_range(start, count)
        cfg = self.config
        if out is None:
            out = np.empty((count, FRAME_ROWS, FRAME_COLS), np.uint16)
        elif out.shape != (count, FRAME_ROWS, FRAME_COLS) or out.dtype != np.uint16 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous ({count}, {FRAME_ROWS}, {FRAME_COLS}) uint16 array")
        indices = np.arange(start, start + count, dtype=np.int64)
        positions = indices // cfg.frames_per_position
        counts, events, offsets, n_events = self._render(
            out.reshape(-1), FRAME_PIXELS, 0, 0, FRAME_ROWS, True, True, indices
        )
        true_events = [events[offsets[i] : offsets[i] + n_events[i]] for i in range(count)]
        return FrameBatch(
            frame_numbers=(indices + cfg.first_frame_number).astype(np.uint32),
            positions=positions,
            frames=out,
            true_events=true_events,
            electron_counts=counts,
        )

    def batches(self, batch_size: int = 64) -> Iterator[FrameBatch]:
        """All frames of the scan in order, ``batch_size`` at a time (the last batch may be shorter)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, self.n_frames, batch_size):
            yield self.batch(start, min(batch_size, self.n_frames - start))

    def sector_batch(self, start: int, count: int, module: int, *, out: np.ndarray | None = None) -> SectorBatch:
        """Sector ``module`` of frames ``start .. start+count-1``: exactly
        ``batch(start, count).frames[:, 144*module : 144*(module+1)]``, for the work of the sector's
        rows and electrons (only the electrons whose charge can reach the sector are drawn; the
        whole frame's electron counts are drawn too, for ``electron_counts``). ``out``, if given, is a
        C-contiguous (count, 144, 576) uint16 array to fill. Raises ValueError for a range outside
        the scan, a module outside 0..3 or a wrong ``out``."""
        self._check_range(start, count)
        module = self._check_module(module)
        if out is None:
            out = np.empty((count, SECTOR_ROWS, FRAME_COLS), np.uint16)
        elif out.shape != (count, SECTOR_ROWS, FRAME_COLS) or out.dtype != np.uint16 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous ({count}, {SECTOR_ROWS}, {FRAME_COLS}) uint16 array")
        indices = np.arange(start, start + count, dtype=np.int64)
        counts, _, _, _ = self._render(
            out.reshape(-1), SECTOR_ROWS * FRAME_COLS, 0, module * SECTOR_ROWS, SECTOR_ROWS, True, False, indices
        )
        return SectorBatch(
            module=module,
            frame_numbers=(indices + self.config.first_frame_number).astype(np.uint32),
            positions=indices // self.config.frames_per_position,
            sectors=out,
            dropped=self._dropped(indices)[:, module],
            electron_counts=counts,
        )

    def records(self, start: int, count: int, module: int, *, out: np.ndarray | None = None) -> np.ndarray:
        """What receiver ``module`` gets of frames ``start .. start+count-1``: a RECORD_DTYPE array, one
        record per frame whose sector is not dropped, in frame order, with the header that
        formats.raw.make_sector_records writes and the sector of ``sector_batch``. The sectors are
        rendered straight into the records (no copy); dropped sectors are not rendered at all.
        ``out``, if given, is a C-contiguous 1-D RECORD_DTYPE array of at least ``count`` records to
        fill (saves allocating): the result is then its first records. Raises ValueError for a range
        outside the scan, a module outside 0..3 or a wrong ``out``."""
        self._check_range(start, count)
        module = self._check_module(module)
        if out is not None and (
            out.dtype != RECORD_DTYPE or out.ndim != 1 or len(out) < count or not out.flags.c_contiguous
        ):
            raise ValueError(f"out must be a C-contiguous 1-D RECORD_DTYPE array of at least {count} records")
        cfg = self.config
        indices = np.arange(start, start + count, dtype=np.int64)
        if cfg.drop_sector_probability > 0.0:
            indices = indices[~self._dropped(indices)[:, module]]
        records = np.empty(len(indices), RECORD_DTYPE) if out is None else out[: len(indices)]
        rows, cols = cfg.scan_shape
        # The records as uint16: record i's pixels start HEADER_BYTES into it (both sizes are even).
        words = records.view(np.uint16)
        _write_headers(words, RECORD_BYTES // 2, indices, cfg.scan_number, cfg.first_frame_number, rows, cols, cfg.frames_per_position)
        self._render(
            words,
            RECORD_BYTES // 2,
            HEADER_BYTES // 2,
            module * SECTOR_ROWS,
            SECTOR_ROWS,
            False,
            False,
            indices,
        )
        return records

    @staticmethod
    def _check_module(module: int) -> int:
        try:
            module = operator.index(module)
        except TypeError:
            raise ValueError(f"module must be an integer, got {module!r}") from None
        if not 0 <= module < N_MODULES:
            raise ValueError(f"module {module} outside 0..{N_MODULES - 1}")
        return module

    def _dropped(self, indices: np.ndarray) -> np.ndarray:
        """(n, 4) bool drop flags of frame indices (n,) int64."""
        p = self.config.drop_sector_probability
        if p == 0.0:
            return np.zeros((len(indices), N_MODULES), bool)
        return _sector_uniforms(self._drop_key, indices, N_MODULES) < p

    def dropped_sectors(self, batch: FrameBatch) -> np.ndarray:
        """(n, 4) bool: True where module m's sector of frame i is lost. Deterministic per seed and
        frame; all False when drop_sector_probability is 0."""
        return self._dropped(batch.frame_numbers.astype(np.int64) - self.config.first_frame_number)


@dataclass(frozen=True)
class SimulationSummary:
    """What simulate_to_directory wrote."""

    out_dir: Path
    paths: list[Path]  # raw files, module 0 first, each module's files in order
    status_paths: list[Path]  # one receiver status JSON per module
    n_frames: int
    n_sectors_written: int
    n_sectors_dropped: int
    n_electrons: int  # electrons drawn
    n_true_events: int  # distinct landing pixels summed over frames: the ideal counting result
    seconds: float
    frames_per_second: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "frames_per_second", self.n_frames / self.seconds if self.seconds > 0 else 0.0)


def simulate_to_directory(
    out_dir: str | Path,
    config: SimulationConfig,
    records_per_file: int = 4096,
    progress: Callable[[int], None] | None = None,
    batch_size: int = 32,
) -> SimulationSummary:
    """Write a simulated scan as the 4 receivers would: raw files ``data_scan..._module{m}_dst0_file{f}.data``
    (``records_per_file`` sector records each; dropped sectors are not written) and status files
    ``4dstem_rec_status_{m}_scan_{N}.json`` (progress 0 at the start, every 10 %, 100 at the end).

    Creates ``out_dir`` if needed; existing files of the same names are overwritten. ``progress`` is
    called with the number of frames done after each batch of ``batch_size`` frames (32 frames = 21 MB:
    glibc reuses blocks this size, while blocks over 32 MB are fresh memory every time and
    page-faulting them costs about as much as generating the frames).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sim = DetectorSimulator(config)
    run_ids = [str(uuid.uuid4()) for _ in range(N_MODULES)]
    status_paths = [write_status_file(out_dir, m, config.scan_number, 0, run_ids[m]) for m in range(N_MODULES)]
    writers = [RawModuleWriter(out_dir, config.scan_number, m, records_per_file) for m in range(N_MODULES)]
    n_done = n_dropped = n_electrons = n_true = 0
    last_percent = 0
    try:
        for batch in sim.batches(batch_size):
            dropped = sim.dropped_sectors(batch)
            for m, writer in enumerate(writers):
                keep = ~dropped[:, m]
                if keep.all():
                    records = make_sector_records(
                        config.scan_number, batch.frame_numbers, config.scan_shape, batch.positions, batch.frames, m
                    )
                elif keep.any():
                    records = make_sector_records(
                        config.scan_number,
                        batch.frame_numbers[keep],
                        config.scan_shape,
                        batch.positions[keep],
                        batch.frames[keep],
                        m,
                    )
                else:
                    continue
                writer.write(records)
            n_done += len(batch)
            n_dropped += int(dropped.sum())
            n_electrons += int(batch.electron_counts.sum())
            n_true += sum(len(e) for e in batch.true_events)
            percent = 100 * n_done // sim.n_frames
            if percent // 10 > last_percent // 10 and percent < 100:
                for m in range(N_MODULES):
                    write_status_file(out_dir, m, config.scan_number, percent, run_ids[m])
                last_percent = percent
            if progress is not None:
                progress(n_done)
    finally:
        for writer in writers:
            writer.close()
    for m in range(N_MODULES):
        write_status_file(out_dir, m, config.scan_number, 100, run_ids[m])
    return SimulationSummary(
        out_dir=out_dir,
        paths=[p for w in writers for p in w.paths],
        status_paths=status_paths,
        n_frames=sim.n_frames,
        n_sectors_written=sum(w.records_written for w in writers),
        n_sectors_dropped=n_dropped,
        n_electrons=n_electrons,
        n_true_events=n_true,
        seconds=time.perf_counter() - t0,
    )
