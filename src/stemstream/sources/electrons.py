"""Where a simulated frame's electrons land: numba kernels of the Poisson process over the pattern.

A frame's diffraction pattern (sources.specimen) is a mixture of C components: disks (centre row,
centre col, radius in px) and a uniform background (a negative radius). Electrons are a Poisson
process over the frame, drawn per horizontal band of rows (BAND_EDGES) and component, each
(component, band) from its own sub-stream (sources.random_streams): independent Poisson counts per
(component, band) with uniform landing points in the disk's part in the band are the same process
as the frame's Poisson count spread over the whole pattern, and a sector draws only the bands whose
electrons can put charge on its rows.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from stemstream.core.detector import FRAME_ROWS, N_MODULES, SECTOR_ROWS
from stemstream.sources.random_streams import GOLDEN, SUB_ELECTRONS, mix64, poisson, substream


def _band_edges() -> np.ndarray:
    """(B+1,) int64 row edges of the bands electrons are drawn in: 0, 143, 145, 287, 289, ..., 576.
    The two rows either side of each sector boundary are a band of their own: a sector needs the
    electrons landing on its rows and on the row next to each of its edges (their charge reaches
    it), so it draws its own band(s) and the boundary bands only."""
    edges = [0]
    for m in range(1, N_MODULES):
        edges += [m * SECTOR_ROWS - 1, m * SECTOR_ROWS + 1]
    return np.array(edges + [FRAME_ROWS], np.int64)


BAND_EDGES = _band_edges()

# An electron's landing point and its charge come from one 64-bit draw: 21 bits for the row, 21
# for the column (a 576 px range in 2**21 steps: 3e-4 px at most, far below a pixel), STAMP_BITS
# for its stamp (charge level and sharing pattern, see detector_response.charge_stamps) and 2 for
# the stamp's mirroring.
_POS_BITS = 21
_LOW21 = np.uint64((1 << _POS_BITS) - 1)
_INV_2_21 = 1.0 / (1 << _POS_BITS)
STAMP_BITS = 14
_STAMP_SHIFT = np.uint64(2 * _POS_BITS)
CANDIDATES = 64  # rejection-sampling candidates computed at a time


# _segment and _quadrant are called, not inlined into disk_rect_area (16 copies of the
# arithmetic): inlined they took 3-5 s of a fresh install's compiling, for a kernel that runs per
# scan position (not per pixel). Its results are bit for bit the same.
@njit(nogil=True)
def _segment(radius, y):
    """Integral of the half-chord sqrt(radius**2 - t**2) for t from 0 to y (y clamped to +-radius)."""
    y = min(max(y, -radius), radius)
    return 0.5 * (y * math.sqrt(max(radius * radius - y * y, 0.0)) + radius * radius * math.asin(y / radius))


@njit(nogil=True)
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
def disk_rect_area(cy, cx, radius, y1, y2, x1, x2):
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
def component_densities(comp_row, comp_col, comp_radius, probabilities, rows, cols, electrons):
    """(n, C) expected electrons per px^2 in each component of the patterns (n, C) (disks: centres,
    radii, probabilities; a negative radius: uniform over the frame), ``electrons`` on the frame
    (rows x cols) in all. The parts of disks off the frame are cut off and the rest renormalised
    (the electrons that reach the detector keep the dose): a component's density is
    electrons * p / (Z * its area), Z = sum of p * (fraction of the component on the frame)."""
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
                on_frame = disk_rect_area(comp_row[i, k], comp_col[i, k], radius, 0.0, float(rows), 0.0, float(cols))
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


@njit(nogil=True, cache=True)
def bands_reaching(band_edges, row0, row_end):
    """(first, last): the bands whose landing rows meet rows row0 .. row_end-1 or the row next to
    either end (an electron's charge reaches the rows next to its own)."""
    n_bands = band_edges.shape[0] - 1
    first = n_bands
    last = -1
    for b in range(n_bands):
        if band_edges[b] <= row_end and band_edges[b + 1] >= row0:
            first = min(first, b)
            last = max(last, b)
    return first, last


@njit(nogil=True, cache=True)
def draw_counts(frame_keys, band_edges, comp_row, comp_col, comp_radius, comp_density, cols, first, last):
    """The electrons of each (component, band) of bands first .. last of n frames (frame_keys:
    (n,) uint64 stream keys; the components' disks and densities (n, C), see component_densities).

    Returns n_drawn (n, C * B) int64, the Poisson count of slot ``component * B + band``; after
    (n, C * B) uint64, the slot's sub-stream state after its count (its landing points follow);
    and counts (n,) int64, the electrons per frame in those bands."""
    n, n_comp = comp_density.shape
    n_bands = band_edges.shape[0] - 1
    fcols = float(cols)
    state = np.empty(1, np.uint64)
    n_drawn = np.zeros((n, n_comp * n_bands), np.int64)
    after = np.empty((n, n_comp * n_bands), np.uint64)
    counts = np.zeros(n, np.int64)
    for f in range(n):
        for b in range(first, last + 1):
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
                    area = disk_rect_area(comp_row[f, k], comp_col[f, k], radius, y1, y2, 0.0, fcols)
                if area < 1e-9:  # no part of the disk in the band (rounding aside): nothing to draw
                    continue
                slot = k * n_bands + b
                state[0] = substream(frame_keys[f], SUB_ELECTRONS + slot)
                n_drawn[f, slot] = poisson(state, density * area)
                after[f, slot] = state[0]
                counts[f] += n_drawn[f, slot]
    return n_drawn, after, counts


@njit(inline="always")
def _sampling_box(cy, cx, radius, y1, y2, fcols):
    """(ylo, yhi, xlo, xhi): the bounding box, on the frame, of the part in rows [y1, y2) of the disk
    centred (cy, cx) of ``radius`` (a negative radius, the background: the whole band)."""
    if radius < 0.0:
        return y1, y2, 0.0, fcols
    ylo = max(y1, cy - radius)
    yhi = min(y2, cy + radius)
    if ylo <= cy <= yhi:
        half = radius
    else:
        d = min(abs(ylo - cy), abs(yhi - cy))
        half = math.sqrt(max(radius * radius - d * d, 0.0))
    return ylo, yhi, max(cx - half, 0.0), min(cx + half, fcols)


@njit(nogil=True, cache=True)
def land_electrons(
    f, n_drawn, after, first, last, band_edges, comp_row, comp_col, comp_radius, row0, cols,
    hit_row, hit_col, hit_stamp, cand_z, cand_y, cand_x, cand_in,
):
    """The landing points of frame f's electrons in bands first .. last (n_drawn, after: see
    draw_counts), uniform in each component's part in the band: written to hit_row (landing row
    relative to row0), hit_col and hit_stamp (STAMP_BITS of stamp, then its 2 mirroring bits), in
    band then component order. cand_*: (CANDIDATES,) work arrays. Returns the number of electrons.

    One function for the frame, not one call per (band, component): arrays passed to a call cost
    reference counting, and a sector has up to 40 such slots per frame."""
    n_comp = comp_row.shape[1]
    n_bands = band_edges.shape[0] - 1
    fcols = float(cols)
    n_hits = 0
    for b in range(first, last + 1):
        last_row = band_edges[b + 1] - 1
        for k in range(n_comp):
            m = n_drawn[f, k * n_bands + b]
            if m == 0:
                continue
            s = after[f, k * n_bands + b]
            cy = comp_row[f, k]
            cx = comp_col[f, k]
            radius = comp_radius[f, k]
            ylo, yhi, xlo, xhi = _sampling_box(cy, cx, radius, float(band_edges[b]), float(band_edges[b + 1]), fcols)
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
                n_cand = min(CANDIDATES, (goal - n_hits) * 5 // 4 + 4)
                for i in range(n_cand):
                    z = mix64(s + np.uint64(i + 1) * GOLDEN)
                    y = ylo + height * float(np.int64(z & _LOW21)) * _INV_2_21
                    x = xlo + width * float(np.int64((z >> np.uint64(_POS_BITS)) & _LOW21)) * _INV_2_21
                    dy = y - cy
                    dx = x - cx
                    cand_z[i] = z
                    cand_y[i] = y
                    cand_x[i] = x
                    cand_in[i] = np.int64(dy * dy + dx * dx <= r2)
                s += np.uint64(n_cand) * GOLDEN
                for i in range(n_cand):
                    hit_row[n_hits] = min(int(cand_y[i]), last_row) - row0
                    hit_col[n_hits] = min(int(cand_x[i]), cols - 1)
                    hit_stamp[n_hits] = cand_z[i] >> _STAMP_SHIFT  # stamp (STAMP_BITS), its flips (2)
                    n_hits += cand_in[i]
                    if n_hits == goal:
                        break
    return n_hits
