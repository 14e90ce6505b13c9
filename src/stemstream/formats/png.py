"""8-bit PNG images of 2-D arrays, written by numpy and zlib alone (no plotting library needed).

- :func:`colour_limits`: the values to colour and the range the colours span, for the three
  scalings in :data:`SCALE_KINDS` (the writer's PNGs, the dashboard and ``stemstream show``'s
  matplotlib figures all use it, so they agree);
- :func:`scale_image`: an array as 8-bit grey or RGB pixels;
- :func:`enlarge`: small images repeated by an integer factor (nearest neighbour);
- :func:`shrink`: large images as means of blocks of pixels (:func:`block_sums`);
- :func:`png_bytes`: the PNG byte layout (IHDR, one IDAT, IEND; no filtering);
- :func:`image_png`: the three together.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np

#: 'sequential' (grey, percentile clipped), 'diverging' (blue-white-red about the median),
#: 'log' (grey, log scale).
SCALE_KINDS = ("sequential", "diverging", "log")
#: Images are enlarged by an integer factor until the longer side has at least this many pixels.
MIN_PNG_SIDE = 256
#: ... and shrunk (block means) until it has at most this many: the seven full-size images of a
#: 4096 x 4096 scan took 26 s of the writer's close (measured 2026-12-04); the file holds every value.
MAX_PNG_SIDE = 1024

# Diverging map anchors (t in -1..1 -> RGB), blue - white - red like ColorBrewer's RdBu.
_DIVERGING_T = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
_DIVERGING_RGB = np.array([[5, 48, 97], [67, 147, 195], [247, 247, 247], [214, 96, 77], [103, 0, 31]], np.float64)
_NAN_GREY = 128
_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def colour_limits(array: np.ndarray, kind: str = "sequential") -> tuple[np.ndarray, np.ndarray, float, float]:
    """(values, finite, lo, hi): the float64 values to colour (log(1 + max(x, 0)) for 'log'), the
    mask of the input's finite pixels, and the range the colours span. Sequential: the 0.5 / 99.5
    percentiles of the finite values; log: 0.5 / 99.9; diverging: the median plus and minus the
    99.5 percentile of the distance from it. ``lo == hi`` for a flat image or one without a finite
    pixel (then both are 0)."""
    if kind not in SCALE_KINDS:
        raise ValueError(f"kind must be one of {SCALE_KINDS}, got {kind!r}")
    a = np.asarray(array, np.float64)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"an image must be 2-D and not empty, got shape {a.shape}")
    finite = np.isfinite(a)
    if kind == "log":
        a = np.log1p(np.maximum(np.where(finite, a, 0.0), 0.0))
    good = a[finite]
    if not good.size:
        return a, finite, 0.0, 0.0
    if kind == "diverging":
        centre = float(np.median(good))
        limit = float(np.percentile(np.abs(good - centre), 99.5))
        return a, finite, centre - limit, centre + limit
    lo, hi = np.percentile(good, (0.5, 99.9) if kind == "log" else (0.5, 99.5))
    return a, finite, float(lo), float(hi)


def scale_image(array: np.ndarray, kind: str = "sequential") -> np.ndarray:
    """An image as 8-bit: (rows, cols) uint8 grey for 'sequential' and 'log', (rows, cols, 3) RGB
    for 'diverging', clipped to :func:`colour_limits`. NaN / inf pixels are mid grey; a flat image
    is mid grey (sequential, log) or white (diverging)."""
    a, finite, lo, hi = colour_limits(array, kind)
    # In place, a colour channel at a time: the writer renders these after its close, holding the
    # scan's results, and a 4096 x 4096 image is 134 MB per float64 copy.
    if kind == "diverging":
        if hi > lo:
            centre, limit = (lo + hi) / 2, (hi - lo) / 2
            t = np.where(finite, a, centre)
            t -= centre
            t /= limit
            np.clip(t, -1.0, 1.0, out=t)
        else:
            t = np.zeros(a.shape)
        rgb = np.empty((*a.shape, 3), np.uint8)
        for c in range(3):
            rgb[..., c] = np.rint(np.interp(t, _DIVERGING_T, _DIVERGING_RGB[:, c]))
        rgb[~finite] = _NAN_GREY
        return rgb
    out = np.full(a.shape, _NAN_GREY, np.uint8)
    if hi > lo:
        scaled = a - lo
        scaled /= hi - lo
        np.clip(scaled, 0.0, 1.0, out=scaled)
        scaled *= 255
        np.rint(scaled, out=scaled)
        out[finite] = scaled[finite]
    return out


def enlarge(image: np.ndarray, min_side: int = MIN_PNG_SIDE) -> np.ndarray:
    """``image`` repeated by the smallest integer factor (nearest neighbour) that gives its longer
    side at least ``min_side`` pixels; unchanged if it has them already."""
    factor = max(1, math.ceil(min_side / max(image.shape[:2])))
    if factor == 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def block_sums(array: np.ndarray, factor: int) -> np.ndarray:
    """Float64 sums over blocks of ``factor`` x ``factor`` along the first two axes (rows, cols);
    the blocks at the far edges may be smaller. (Zero-padded and reshaped: np.add.reduceat along
    the rows took ~1 s per call for a 4096 x 4096 image.)"""
    a = np.asarray(array)
    rows, cols = a.shape[:2]
    pad_r, pad_c = -rows % factor, -cols % factor
    if pad_r or pad_c:
        a = np.pad(a, [(0, pad_r), (0, pad_c)] + [(0, 0)] * (a.ndim - 2))
    blocks = a.reshape((rows + pad_r) // factor, factor, (cols + pad_c) // factor, factor, *a.shape[2:])
    return blocks.sum(axis=(1, 3), dtype=np.float64)


def shrink(image: np.ndarray, max_side: int = MAX_PNG_SIDE) -> np.ndarray:
    """A (rows, cols) image whose longer side exceeds ``max_side`` as the means of the finite
    pixels of blocks of the smallest integer side that brings it within (NaN where a block has
    none); unchanged otherwise."""
    factor = -(-max(image.shape[:2]) // max_side)
    if factor <= 1:
        return image
    a = np.asarray(image, np.float64)
    finite = np.isfinite(a)
    with np.errstate(invalid="ignore"):  # 0 / 0: a block without a finite pixel stays NaN
        return block_sums(np.where(finite, a, 0.0), factor) / block_sums(finite, factor)


def png_bytes(image: np.ndarray) -> bytes:
    """An 8-bit PNG of a (rows, cols) grey or (rows, cols, 3) RGB uint8 image (no filtering)."""
    image = np.ascontiguousarray(image, np.uint8)
    if image.ndim == 2:
        colour_type, channels = 0, 1
    elif image.ndim == 3 and image.shape[2] == 3:
        colour_type, channels = 2, 3
    else:
        raise ValueError(f"a PNG image must be (rows, cols) or (rows, cols, 3), got shape {image.shape}")
    height, width = image.shape[:2]
    raw = np.zeros((height, 1 + width * channels), np.uint8)  # filter byte 0 per row
    raw[:, 1:] = image.reshape(height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        _SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 1))  # live images: speed over a few % of size
        + _chunk(b"IEND", b"")
    )


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def image_png(array: np.ndarray, kind: str = "sequential", min_side: int = MIN_PNG_SIDE,
              max_side: int = MAX_PNG_SIDE) -> bytes:
    """A 2-D array as PNG bytes: :func:`shrink` to ``max_side``, :func:`scale_image`,
    :func:`enlarge` to ``min_side``, :func:`png_bytes`."""
    return png_bytes(enlarge(scale_image(shrink(array, max_side), kind), min_side))
