"""Simulator of the NCEM 4D Camera: frames a user would mistake for the real camera's.

Each frame (576 x 576 ``uint16``, (rows, cols), ADU) is built from

- a pedestal-subtracted background near ``pedestal`` ADU with Gaussian read noise of ``read_noise``
  ADU. A small pool of noise frames is drawn once; a frame takes one of them at a random
  (row, col) offset, so noise costs a memory copy, not a random draw per pixel;
- electrons arriving as a Poisson process, ``dose`` electrons/pixel/frame on average over the frame,
  distributed as the specimen's diffraction pattern (sources.specimen) at the frame's scan position.
  An electron deposits a gamma-distributed charge (``electron_adu_mean`` ADU on average) spread by a
  Gaussian charge cloud over its landing pixel and the 8 neighbours; the landing pixel keeps the
  largest share, so it is the strict local maximum unless noise or a neighbour electron interferes;
- occasional X-rays (``xray_rate`` per frame), each putting thousands of ADU on one pixel;
- a few hot pixels (the same high value in every frame) and dead pixels (always 0).

Randomness comes from a counter-based stream keyed by (seed, frame index): a frame is the same
whatever the batch it is generated in. The true electron landing pixels are kept with each frame.

One module's sector of frames (``DetectorSimulator.sector_batch``, ``records``: what one of the four
receivers gets) is rendered on its own for about a quarter of the work of whole frames: every
electron and X-ray of the frame is still drawn (so the sector is bit for bit the same rows of the
whole frame, charge shared across the sector boundary included), but only the sector's rows get
noise and charge.

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
from numba.cpython.unsafe.numbers import trailing_zeros
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
_N_SHARING_KERNELS = 1024  # 3x3 charge-sharing patterns
_NOISE_POOL_FRAMES = 8  # 8 x 640 x 640 uint16 = 6.6 MB: stays in the L3 cache
_NOISE_POOL_MARGIN = 64  # rows/cols of slack for the random offset of each frame
_MIN_CENTRE_RATIO = 1.3  # landing pixel keeps >= 1.3x the charge of any neighbour
_PATTERN_BLOCK = 1024  # scan positions whose diffraction patterns are computed at once
_PATTERN_BLOCKS_KEPT = 4

# Stream domains: independent random streams from one seed.
_DOMAIN_FRAMES = 0x6672616D65730001
_DOMAIN_DROPS = 0x64726F7073000002
_DOMAIN_DETECTOR = 0xDE7EC7

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_INV_2_53 = 1.0 / 9007199254740992.0
_INV_2_32 = 1.0 / 4294967296.0
_INV_2_31 = 1.0 / 2147483648.0
_LOW32 = np.uint64(0xFFFFFFFF)
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


_DRAW_BLOCK = 1024  # draws of a frame's stream generated at a time (a multiple of 64)
_DRAW_WORDS = _DRAW_BLOCK // 64
_DRAW_BLOCK_STRIDE = np.uint64((_DRAW_BLOCK * int(_GOLDEN)) & _MASK64)
_ALL_BITS = np.uint64(_MASK64)


@njit(inline="always")
def _fill_draws(zbuf, accept, s):
    """zbuf[i] = the draw after s + i steps of the stream (what _next gives from state s, i + 1
    times); bit i % 64 of accept[i // 64] set where that draw, as (dy, dx), lies in the unit disk."""
    for i in range(zbuf.shape[0]):
        zbuf[i] = _mix64(s + np.uint64(i + 1) * _GOLDEN)
    for w in range(accept.shape[0]):
        word = np.uint64(0)
        for j in range(64):
            z = zbuf[w * 64 + j]
            dy = float(np.int64(z & _LOW32)) * _INV_2_31 - 1.0
            dx = float(np.int64(z >> np.uint64(32))) * _INV_2_31 - 1.0
            word |= np.uint64(dy * dy + dx * dx <= 1.0) << np.uint64(j)
        accept[w] = word


@njit(nogil=True, cache=True)
def _render_rows(
    out,
    frame_stride,
    data_offset,
    rows,
    cols,
    row0,
    n_rows,
    track_truth,
    frame_keys,
    mean_electrons,
    noise_pool,
    comp_row,
    comp_col,
    comp_radius,
    comp_cum,
    charge_adu,
    sharing,
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
    Every electron and X-ray of the frame is drawn, whatever rows are rendered, so the random
    stream, and therefore every pixel, is the same as in the whole frame; only the charge that
    falls in the rendered rows is deposited. Returns the electrons drawn per frame (n,), and, with
    track_truth, the landing pixels (flat, sorted and unique per frame), their offsets (n+1,) and
    counts (n,) (empty without track_truth)."""
    n = frame_keys.shape[0]
    n_pool = noise_pool.shape[0]
    slack_r = noise_pool.shape[1] - rows + 1
    slack_c = noise_pool.shape[2] - cols + 1
    n_comp = comp_cum.shape[1]
    charge_mask = np.uint64(charge_adu.shape[0] - 1)
    share_mask = np.uint64(sharing.shape[0] - 1)
    row_end = row0 + n_rows
    state = np.empty(1, np.uint64)

    # Electron counts first, so one buffer holds every frame's truth.
    counts = np.empty(n, np.int64)
    states = np.empty(n, np.uint64)
    for f in range(n):
        state[0] = frame_keys[f]
        counts[f] = _poisson(state, mean_electrons)
        states[f] = state[0]
    offsets = np.zeros(n + 1, np.int64)
    n_events = np.zeros(n, np.int64)
    if track_truth:
        for f in range(n):
            offsets[f + 1] = offsets[f] + counts[f]
    events = np.empty(offsets[n], np.uint32)
    # One bit per pixel: sorts and de-duplicates landing pixels in O(pixels / 64).
    landed = np.zeros((rows * cols + 63) // 64 if track_truth else 0, np.uint64)
    inside = np.zeros(n_comp, np.bool_)
    missing = np.zeros(n_comp, np.bool_)
    zbuf = np.empty(_DRAW_BLOCK, np.uint64)
    max_count = counts.max() if n > 0 else 0
    hit_row = np.empty(max_count, np.int64)  # per electron whose charge reaches the rendered rows
    hit_col = np.empty(max_count, np.int64)
    hit_bits = np.empty(max_count, np.uint64)
    accept = np.empty(_DRAW_WORDS, np.uint64)

    for f in range(n):
        state[0] = states[f]
        base = f * frame_stride + data_offset
        frame = out[base : base + n_rows * cols].reshape((n_rows, cols))  # frame rows row0 .. row_end-1
        pool = noise_pool[_below(state, n_pool)]
        r0 = _below(state, slack_r)
        c0 = _below(state, slack_c)
        for r in range(n_rows):
            src = pool[r0 + row0 + r]
            dst = frame[r]
            for c in range(cols):
                dst[c] = src[c0 + c]

        # Components whose disk lies on the frame whatever the draw: their electrons need no frame
        # check, and those too far from the rendered rows for their charge to reach them only have
        # to be drawn, to advance the stream.
        for k in range(n_comp):
            radius = comp_radius[f, k]
            top = comp_row[f, k] - radius  # y = centre + radius * dy, |dy| <= 1, lies in [top, bottom]
            bottom = comp_row[f, k] + radius
            on_frame = radius >= 0.0 and top >= 1.0 and bottom <= rows - 1.0
            on_frame = on_frame and comp_col[f, k] - radius >= 1.0 and comp_col[f, k] + radius <= cols - 1.0
            inside[k] = on_frame
            missing[k] = on_frame and (bottom < row0 - 2.0 or top > row_end + 2.0)

        # Hot loop. The frame's stream is drawn ahead, _DRAW_BLOCK draws at a time (zbuf[i] is the
        # draw after s + i steps; one 64-bit draw gives two 32-bit uniforms), with a bit per draw
        # that says whether it falls in the unit disk: the rejection sampling of a disk that lies on
        # the frame is then a bit scan, not a branch per draw.
        s = state[0]
        p = 0  # draws of zbuf used
        n_hits = 0
        if counts[f] > 0:
            _fill_draws(zbuf, accept, s)
        for _ in range(counts[f]):
            # Draw until the electron lands on the frame: conditioning on the frame keeps the dose exact.
            while True:
                if p == _DRAW_BLOCK:
                    s += _DRAW_BLOCK_STRIDE
                    _fill_draws(zbuf, accept, s)
                    p = 0
                z = zbuf[p]
                p += 1
                u = float(np.int64(z & _LOW32)) * _INV_2_32
                bits = z >> np.uint64(32)  # charge level and sharing kernel of this electron
                k = 0
                while k < n_comp - 1 and u >= comp_cum[f, k]:
                    k += 1
                radius = comp_radius[f, k]
                if inside[k]:  # the next draw in the unit disk, then no frame check
                    while True:
                        if p == _DRAW_BLOCK:
                            s += _DRAW_BLOCK_STRIDE
                            _fill_draws(zbuf, accept, s)
                            p = 0
                        w = p >> 6
                        word = accept[w] & (_ALL_BITS << np.uint64(p & 63))
                        while word == 0 and w < _DRAW_WORDS - 1:
                            w += 1
                            word = accept[w]
                        if word != 0:
                            p = w * 64 + np.int64(trailing_zeros(word)) + 1
                            break
                        p = _DRAW_BLOCK
                    if missing[k]:
                        break
                    z = zbuf[p - 1]
                    dy = float(np.int64(z & _LOW32)) * _INV_2_31 - 1.0
                    dx = float(np.int64(z >> np.uint64(32))) * _INV_2_31 - 1.0
                    y = comp_row[f, k] + radius * dy
                    x = comp_col[f, k] + radius * dx
                    break
                while True:  # uniform in the unit disk (or square, for the background) by rejection
                    if p == _DRAW_BLOCK:
                        s += _DRAW_BLOCK_STRIDE
                        _fill_draws(zbuf, accept, s)
                        p = 0
                    z = zbuf[p]
                    p += 1
                    dy = float(np.int64(z & _LOW32)) * _INV_2_31 - 1.0
                    dx = float(np.int64(z >> np.uint64(32))) * _INV_2_31 - 1.0
                    if radius < 0.0 or dy * dy + dx * dx <= 1.0:
                        break
                if radius < 0.0:
                    y = (dy + 1.0) * (0.5 * rows)
                    x = (dx + 1.0) * (0.5 * cols)
                else:
                    y = comp_row[f, k] + radius * dy
                    x = comp_col[f, k] + radius * dx
                if 0.0 <= y < rows and 0.0 <= x < cols:
                    break
            if missing[k]:
                continue
            r = int(y)
            c = int(x)
            if track_truth:
                pix = r * cols + c
                landed[pix >> 6] |= np.uint64(1) << np.uint64(pix & 63)
            # Keep the electrons whose charge reaches the rendered rows (lr - 1 .. lr + 1 overlaps
            # 0 .. n_rows - 1), without a branch: whether one does is a coin toss for rows that cut
            # through a disk, and a mispredicted branch costs more than the store.
            lr = r - row0
            hit_row[n_hits] = lr
            hit_col[n_hits] = c
            hit_bits[n_hits] = bits
            n_hits += np.int64(-1 <= lr) & np.int64(lr <= n_rows)
        state[0] = s + np.uint64(p) * _GOLDEN

        # Deposit, in the order drawn (the sums saturate at 65535: the order does not matter anyway).
        for e in range(n_hits):
            lr = hit_row[e]
            c = hit_col[e]
            bits = hit_bits[e]
            adu = charge_adu[bits & charge_mask]
            kernel = sharing[(bits >> np.uint64(16)) & share_mask]
            if 0 < lr < n_rows - 1 and 0 < c < cols - 1:  # interior: no edge checks (unsigned indices)
                for i in range(3):
                    row = frame[np.uintp(lr + i - 1)]
                    share = kernel[i]
                    for j in range(3):
                        cc = np.uintp(c + j - 1)
                        v = np.int64(row[cc]) + np.int64(adu * share[j] + np.float32(0.5))
                        row[cc] = min(v, _UINT16_MAX)
            else:
                for i in range(3):
                    rr = lr + i - 1
                    if 0 <= rr < n_rows:
                        for j in range(3):
                            cc = c + j - 1
                            if 0 <= cc < cols:
                                v = np.int64(frame[rr, cc]) + np.int64(adu * kernel[i, j] + np.float32(0.5))
                                frame[rr, cc] = min(v, _UINT16_MAX)

        for _ in range(_poisson(state, xray_rate)):
            pix = _below(state, rows * cols)
            adu_x = np.int64(xray_lo + (xray_hi - xray_lo) * _uniform(state))
            r = pix // cols
            if row0 <= r < row_end:
                c = pix % cols
                frame[r - row0, c] = min(np.int64(frame[r - row0, c]) + adu_x, _UINT16_MAX)

        for h in range(hot_pixels.shape[0]):
            r = hot_pixels[h] // cols
            if row0 <= r < row_end:
                frame[r - row0, hot_pixels[h] % cols] = hot_values[h]
        for d in range(dead_pixels.shape[0]):
            r = dead_pixels[d] // cols
            if row0 <= r < row_end:
                frame[r - row0, dead_pixels[d] % cols] = 0

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


def _sharing_kernels(rng: np.random.Generator, sigma: float) -> np.ndarray:
    """(_N_SHARING_KERNELS, 3, 3) float32 fractions (each sums to 1) of an electron's charge on its
    3x3 neighbourhood: a Gaussian cloud of width ~sigma px centred at a random point of the landing
    pixel. Landing points so near an edge that a neighbour would get nearly as much are redrawn."""
    edges = np.array([-1.5, -0.5, 0.5, 1.5])
    kept: list[np.ndarray] = []
    n_kept = 0
    while n_kept < _N_SHARING_KERNELS:
        m = 4 * _N_SHARING_KERNELS
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
    return np.concatenate(kept)[:_N_SHARING_KERNELS].astype(np.float32)


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

        shape = (_NOISE_POOL_FRAMES, FRAME_ROWS + _NOISE_POOL_MARGIN, FRAME_COLS + _NOISE_POOL_MARGIN)
        noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(config.read_noise)
        noise += np.float32(config.pedestal)
        self._noise_pool = np.clip(np.rint(noise), 0, _UINT16_MAX).astype(np.uint16)
        del noise

        self._charge_adu = _charge_quantiles(config.electron_adu_mean, config.electron_adu_shape)
        self._sharing = _sharing_kernels(rng, config.charge_cloud_sigma)

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
        self, out: np.ndarray, frame_stride: int, data_offset: int, row0: int, n_rows: int, track_truth: bool, indices: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Run the kernel (_render_rows) for frame indices (n,) int64 into the flat uint16 ``out``."""
        cfg = self.config
        comp_row, comp_col, comp_radius, comp_cum = self._pattern_tables(indices // cfg.frames_per_position)
        return _render_rows(
            out,
            frame_stride,
            data_offset,
            FRAME_ROWS,
            FRAME_COLS,
            row0,
            n_rows,
            track_truth,
            _stream_keys(self._frame_key, indices),
            cfg.dose * FRAME_PIXELS,
            self._noise_pool,
            comp_row,
            comp_col,
            comp_radius,
            comp_cum,
            self._charge_adu,
            self._sharing,
            float(cfg.xray_rate),
            cfg.xray_adu[0],
            cfg.xray_adu[1],
            self.hot_pixels,
            self.hot_values,
            self.dead_pixels,
        )

    def _pattern_tables(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The kernel's view of the specimen at positions (n,) int64: disk centre rows, centre cols,
        radii and cumulative probabilities, each (n, C) float64, C-contiguous. Computed for blocks of
        _PATTERN_BLOCK positions and kept for the last few blocks: SyntheticSpecimen.patterns costs
        ~0.1 ms a call whatever the number of positions, as much as rendering several sectors, and a
        position's pattern then does not depend on the batch it is asked for in."""
        if len(positions) == 0:
            return tuple(table[:0] for table in self._pattern_block(0))
        first = int(positions.min()) // _PATTERN_BLOCK
        last = int(positions.max()) // _PATTERN_BLOCK
        blocks = [self._pattern_block(b) for b in range(first, last + 1)]
        if len(blocks) == 1:
            tables = blocks[0]
        else:
            tables = tuple(np.concatenate(parts) for parts in zip(*blocks))
        relative = positions - first * _PATTERN_BLOCK
        return tuple(table[relative] for table in tables)

    def _pattern_block(self, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        with self._pattern_lock:
            tables = self._pattern_cache.get(block)
            if tables is None:
                start = block * _PATTERN_BLOCK
                patterns = self.specimen.patterns(np.arange(start, min(start + _PATTERN_BLOCK, self.config.n_positions)))
                tables = (
                    np.ascontiguousarray(patterns.centres[..., 0]),
                    np.ascontiguousarray(patterns.centres[..., 1]),
                    np.ascontiguousarray(patterns.radii),
                    patterns.cumulative(),
                )
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
        counts, events, offsets, n_events = self._render(out.reshape(-1), FRAME_PIXELS, 0, 0, FRAME_ROWS, True, indices)
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
        ``batch(start, count).frames[:, 144*module : 144*(module+1)]``, for about a quarter of the work
        (only the sector's rows are rendered; the electrons and X-rays of the whole frame are still
        drawn, but only those whose charge reaches the sector are deposited). ``out``, if given, is a
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
            out.reshape(-1), SECTOR_ROWS * FRAME_COLS, 0, module * SECTOR_ROWS, SECTOR_ROWS, False, indices
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
        positions = indices // cfg.frames_per_position
        rows, cols = cfg.scan_shape
        header = records["header"]
        header["scan_number"] = cfg.scan_number
        header["frame_number"] = indices + cfg.first_frame_number
        header["scan_width"] = cols
        header["scan_height"] = rows
        header["x"] = positions % cols
        header["y"] = positions // cols
        # The records as uint16: record i's pixels start HEADER_BYTES into it (both sizes are even).
        self._render(
            records.view(np.uint16),
            RECORD_BYTES // 2,
            HEADER_BYTES // 2,
            module * SECTOR_ROWS,
            SECTOR_ROWS,
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
