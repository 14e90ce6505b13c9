"""Centre of mass per scan position from counted events, and the DPC phase from the CoM field.

Conventions, checked against ``stempy.image.com_sparse`` 3.6.0 (tests):

- CoM in detector pixels, absolute (not relative to a centre), all frames of a position together;
  float32 like stempy. stempy returns one (2, rows, cols) array with component 0 = the *column*
  mean and 1 = the *row* mean; here the results are named ``com_col`` and ``com_row``
  (:func:`stempy_com` stacks them in stempy's order);
- a position without electrons gets NaN; with ``replace_nans`` (stempy's default, also ours) NaNs
  are replaced by the mean CoM over the scan (``np.nanmean`` in float32, exactly as stempy);
- ``crop_to`` (px) keeps only electrons within that distance (``r <= crop_to``) of a centre:
  ``crop_center`` (row, col) if given (stempy's ``init_center``, whose order is also (row, col)),
  else the CoM of all electrons of the frame. stempy crops around the CoM of the whole *position*
  (all its frames); with one frame per position that is the same, with several it differs
  (ours stays exact under any split of frames between node groups, which stempy's cannot).

DPC phase (:func:`dpc_phase`): the least-squares potential whose gradient is the CoM field, by
Fourier integration: with (g_r, g_c) the CoM shifts along detector rows / columns (after an
optional rotation by ``rotation_deg`` and flip), taken as d/d(scan row) and d/d(scan col),
``phase = Re ifft2((k_r F(g_r) + k_c F(g_c)) / (2 pi i (k_r^2 + k_c^2) + reg))``, k = 0 term 0.
This equals ``stempy.image.phase_from_com(np.stack([com_row, com_col]), theta, flip, reg)``
(stempy's function treats its component 0 as the row direction, so feeding it ``com_sparse``'s
(col, row) order directly transposes the field; ``phase_from_com(com_sparse(...), theta)``
equals ours with ``rotation_deg = degrees(theta) + 90`` and ``flip=True``). Not quantitative:
the phase is in units of CoM pixels x scan steps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np
import scipy.fft
from numba import njit

from stemstream.analysis.batch import pixel_row_col
from stemstream.analysis.checks import check_point
from stemstream.analysis.interface import Analysis
from stemstream.analysis.registry import register
from stemstream.analysis.views import View
from stemstream.core.detector import FRAME_SHAPE


@njit(nogil=True, cache=True)
def _com_kernel(sums, cols, mode, c_row, c_col, radius, positions, events, offsets):
    # sums (n_positions, 3) int64: sum of rows, sum of cols, electrons kept.
    # mode 0: every electron; 1: within radius of (c_row, c_col); 2: within radius of the frame's CoM.
    n_positions = sums.shape[0]
    inv_cols = 1.0 / cols
    for i in range(positions.shape[0]):
        p = positions[i]
        if p < 0 or p >= n_positions:
            continue
        a = offsets[i]
        b = offsets[i + 1]
        if b == a:
            continue
        # unsigned indices let this loop vectorise (numba's wrap-around of negative indices does not)
        sr = np.int64(0)
        sc = np.int64(0)
        ua = np.uint64(a)
        for j in range(np.uint64(b - a)):
            r, c = pixel_row_col(events[ua + j], cols, inv_cols)
            sr += r
            sc += c
        k = b - a
        if mode != 0:
            # crop: keep electrons with sqrt(dr^2 + dc^2) <= radius, float64 as stempy computes it
            cr = c_row if mode == 1 else sr / k
            cc = c_col if mode == 1 else sc / k
            sr = np.int64(0)
            sc = np.int64(0)
            k = np.int64(0)
            for j in range(a, b):
                r, c = pixel_row_col(events[j], cols, inv_cols)
                dr = r - cr
                dc = c - cc
                if math.sqrt(dr * dr + dc * dc) <= radius:
                    sr += r
                    sc += c
                    k += 1
        sums[p, 0] += sr
        sums[p, 1] += sc
        sums[p, 2] += k


def dpc_phase(
    com_row: np.ndarray, com_col: np.ndarray, rotation_deg: float = 0.0, flip: bool = False, reg: float = 1e-10
) -> np.ndarray:
    """DPC phase (rows, cols) float64 by Fourier integration of the CoM field (module docstring).

    NaNs in the CoM (positions without electrons) are replaced by the mean first."""
    g_r = _filled(np.asarray(com_row, np.float64))
    g_c = _filled(np.asarray(com_col, np.float64))
    if g_r.shape != g_c.shape or g_r.ndim != 2:
        raise ValueError(f"com_row and com_col must be 2-D of one shape, got {g_r.shape} and {g_c.shape}")
    # A constant shift integrates to nothing (k = 0 is dropped); removing it keeps precision.
    g_r = g_r - g_r.mean()
    g_c = g_c - g_c.mean()
    theta = math.radians(rotation_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    if flip:
        x = g_r * cos + g_c * sin
        y = g_r * sin - g_c * cos
    else:
        x = g_r * cos - g_c * sin
        y = g_r * sin + g_c * cos
    rows, cols = g_r.shape
    del g_r, g_c
    k_r = np.fft.fftfreq(rows)[:, None]
    k_c = np.fft.fftfreq(cols)[None, :]
    # scipy's FFT on every core: 4x numpy's for a 1024 x 1024 scan, which the writer closes with.
    # In place where the arithmetic allows (the same operations in the same order), and each
    # array dropped once used: a 4096 x 4096 scan's complex arrays are 268 MB each, and the
    # writer runs this at the close, its peak of memory.
    numerator = scipy.fft.fft2(x, workers=-1)
    del x
    numerator *= k_r
    spectrum_c = scipy.fft.fft2(y, workers=-1)
    del y
    spectrum_c *= k_c
    numerator += spectrum_c
    del spectrum_c
    denominator = 2j * np.pi * (k_r**2 + k_c**2) + reg
    numerator[0, 0] = 0
    denominator[0, 0] = 1
    numerator /= denominator
    del denominator
    return np.real(scipy.fft.ifft2(numerator, workers=-1, overwrite_x=True))


def _filled(a: np.ndarray) -> np.ndarray:
    bad = ~np.isfinite(a)
    if not bad.any():
        return a
    good = a[~bad]
    return np.where(bad, good.mean() if good.size else 0.0, a)


def stempy_com(results: Mapping[str, np.ndarray]) -> np.ndarray:
    """CoM results as ``stempy.image.com_sparse`` returns them: (2, rows, cols), 0 = col, 1 = row."""
    return np.stack([results["com_col"], results["com_row"]])


class CenterOfMass(Analysis):
    """Centre of mass per position (``com_row``, ``com_col``, float32 px) and the DPC phase.

    Parameters: ``crop_to`` (px, None = no cropping), ``crop_center`` (row, col) px or None (then
    each frame's own CoM), ``replace_nans`` (True: positions without electrons get the scan's mean
    CoM, as stempy's default), ``dpc`` (compute ``dpc_phase``), ``rotation_deg``, ``flip``, ``reg``
    (see :func:`dpc_phase`)."""

    name = "center_of_mass"
    per_position = ("sums",)
    descriptions = {
        "com_row": "centre of mass along detector rows, px (stempy com_sparse component 1)",
        "com_col": "centre of mass along detector columns, px (stempy com_sparse component 0)",
        "dpc_phase": "DPC phase: Fourier integration of the CoM field (not quantitative)",
    }

    def __init__(
        self,
        frame_shape: tuple[int, int] = FRAME_SHAPE,
        crop_to: float | None = None,
        crop_center: tuple[float, float] | None = None,
        replace_nans: bool = True,
        dpc: bool = True,
        rotation_deg: float = 0.0,
        flip: bool = False,
        reg: float = 1e-10,
    ):
        super().__init__(frame_shape)
        if crop_to is not None:
            try:
                crop_to = float(crop_to)
            except (TypeError, ValueError):
                raise ValueError(f"center_of_mass crop_to must be a radius in pixels or None, got {crop_to!r}") from None
            if not (math.isfinite(crop_to) and crop_to > 0):
                raise ValueError(f"center_of_mass crop_to must be a positive radius in pixels, got {crop_to!r}")
        if crop_center is not None:
            if crop_to is None:
                raise ValueError("center_of_mass crop_center needs crop_to (the radius to keep around it)")
            crop_center = check_point("center_of_mass crop_center", crop_center)
        for flag, value in (("replace_nans", replace_nans), ("dpc", dpc), ("flip", flip)):
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"center_of_mass {flag} must be true or false, got {value!r}")
        try:
            rotation_deg, reg = float(rotation_deg), float(reg)
        except (TypeError, ValueError):
            raise ValueError(f"center_of_mass rotation_deg and reg must be numbers, got {rotation_deg!r}, {reg!r}") from None
        if not (math.isfinite(rotation_deg) and math.isfinite(reg) and reg >= 0):
            raise ValueError(f"center_of_mass rotation_deg must be finite and reg finite and >= 0, got {rotation_deg}, {reg}")
        self.crop_to = crop_to
        self.crop_center = crop_center
        self.replace_nans = bool(replace_nans)
        self.dpc = bool(dpc)
        self.rotation_deg = rotation_deg
        self.flip = bool(flip)
        self.reg = reg
        self.params = {
            "crop_to": crop_to,
            "crop_center": None if crop_center is None else list(crop_center),
            "replace_nans": self.replace_nans,
            "dpc": self.dpc,
            "rotation_deg": rotation_deg,
            "flip": self.flip,
            "reg": reg,
        }
        if crop_to is None:
            self._mode, self._centre = 0, (0.0, 0.0)
        elif crop_center is None:
            self._mode, self._centre = 2, (0.0, 0.0)
        else:
            self._mode, self._centre = 1, crop_center

    def new_partial(self, scan_shape):
        return {"sums": np.zeros((scan_shape[0] * scan_shape[1], 3), np.int64)}

    def update(self, partial, positions, events, offsets):
        radius = self.crop_to if self.crop_to is not None else 0.0
        _com_kernel(
            partial["sums"], self.frame_shape[1], self._mode, self._centre[0], self._centre[1], radius,
            positions, events, offsets,
        )

    def finish(self, partial, scan_shape):
        sums = partial["sums"]
        counts = sums[:, 2]
        valid = counts > 0
        # stempy's layout and arithmetic: float64 quotients stored in float32, NaN where empty
        com = np.full((2, len(counts)), np.nan, np.float32)
        quotient = np.empty(len(counts))  # one float64 buffer: the close holds every result at once
        for axis, column in ((0, 1), (1, 0)):
            np.divide(sums[:, column], counts, out=quotient, where=valid)
            com[axis, valid] = quotient[valid]
        del quotient
        com = com.reshape((2, *scan_shape))
        if self.replace_nans and not valid.all():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN scan: stays NaN
                com_mean = np.nanmean(com, axis=(1, 2))
            np.nan_to_num(com[0, :, :], nan=com_mean[0], copy=False)
            np.nan_to_num(com[1, :, :], nan=com_mean[1], copy=False)
        out = {"com_row": com[1].copy(), "com_col": com[0].copy()}
        if self.dpc:
            out["dpc_phase"] = dpc_phase(out["com_row"], out["com_col"], self.rotation_deg, self.flip, self.reg)
        return out

    def show(self, results):
        return {key: View(value, "diverging") for key, value in results.items()}


register(CenterOfMass)
