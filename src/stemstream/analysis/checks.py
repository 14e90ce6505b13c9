"""Checks of analysis parameters, each raising ValueError with a sentence that names the parameter,
and stempy's default detector centre.

Analyses call them in ``__init__`` (see docs/analyses.md), so a bad configuration is refused when
the analyses are built, before any scan starts.
"""

from __future__ import annotations

import math
from typing import Any

from stemstream.formats.partials import NAME_RE


def check_name(what: str, name: Any) -> str:
    """``name`` if it can be an HDF5 group name and part of a PNG file name, else ValueError."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(
            f"{what} {name!r} must start with a letter and hold only letters, digits and '_' (at most 64)"
        )
    return name


def check_shape(what: str, shape: Any) -> tuple[int, int]:
    """(rows, cols) as two positive ints, else ValueError."""
    try:
        rows, cols = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be (rows, cols), two positive integers, got {shape!r}") from None
    if rows <= 0 or cols <= 0:
        raise ValueError(f"{what} must be (rows, cols), two positive integers, got {shape!r}")
    return rows, cols


def check_point(what: str, value: Any) -> tuple[float, float]:
    """A (row, col) point in pixels as two finite floats, else ValueError."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be (row, col) in pixels, two numbers, got {value!r}") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return a, b


def check_radii(what: str, value: Any) -> tuple[float, float]:
    """(inner, outer) radii in pixels with 0 <= inner < outer, else ValueError."""
    try:
        inner, outer = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be (inner, outer) radii in pixels, two numbers, got {value!r}") from None
    if not (math.isfinite(inner) and math.isfinite(outer)) or inner < 0:
        raise ValueError(f"{what} radii must be finite and >= 0, got {value!r}")
    if not inner < outer:
        raise ValueError(f"{what}: the inner radius must be smaller than the outer one, got {value!r}")
    return inner, outer


def default_center(frame_shape: tuple[int, int]) -> tuple[float, float]:
    """stempy's default centre of frames of ``frame_shape`` (rows, cols): (round(rows / 2),
    round(cols / 2)), halves rounded up (C++ round)."""
    return tuple(float(math.floor(n / 2 + 0.5)) for n in frame_shape)  # type: ignore[return-value]
