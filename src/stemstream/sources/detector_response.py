"""The simulated detector's response, as tables built once per simulator from its own random
generator: the read-noise pool, what one electron deposits (charge stamps), and the hot and dead
pixels. The rendering kernel (sources.render) only copies and adds these tables' integers.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erfcinv, gammaincinv, ndtr

from stemstream.core.detector import FRAME_COLS, FRAME_PIXELS, FRAME_ROWS

ADU_MAX = 65535  # pixels are uint16: charge saturates here

# Pre-generated tables: sizes are powers of two so that a random index is a bit mask.
_N_CHARGE_LEVELS = 4096  # quantiles of the per-electron charge distribution
_KERNELS_PER_LEVEL = 4  # charge-sharing patterns drawn for each charge level
N_STAMPS = _N_CHARGE_LEVELS * _KERNELS_PER_LEVEL  # 3x3 integer deposits of one electron: 288 kB
_MIN_CENTRE_RATIO = 1.3  # landing pixel keeps >= 1.3x the charge of any neighbour

# Read noise comes from a pool of 2**20 values (1 MB as uint8, see noise_pool): a frame takes its
# rows at a random start and row stride (FRAME_COLS .. FRAME_COLS + 255), 0.48 M values in all, none
# twice. The pool stays in the L2/L3 caches, so noise costs about what writing the pixels does.
NOISE_POOL_VALUES = 1 << 20
NOISE_STRIDE_SPREAD = 256
assert NOISE_POOL_VALUES & (NOISE_POOL_VALUES - 1) == 0 and NOISE_STRIDE_SPREAD & (NOISE_STRIDE_SPREAD - 1) == 0
assert (FRAME_ROWS - 1) * (FRAME_COLS + NOISE_STRIDE_SPREAD - 1) + FRAME_COLS <= NOISE_POOL_VALUES


def noise_pool(rng: np.random.Generator, read_noise: float, pedestal: float) -> tuple[np.ndarray, np.uint16]:
    """The read-noise pool and its base: (NOISE_POOL_VALUES + FRAME_COLS,) values, each pixel's
    background is ``pool[i] + base`` ADU (Gaussian, ``pedestal`` mean, ``read_noise`` std, rounded
    and clipped to 0 .. ADU_MAX). The pool repeats its first FRAME_COLS values at its end, so that
    every frame row is one contiguous slice."""
    noise = rng.standard_normal(NOISE_POOL_VALUES, dtype=np.float32) * np.float32(read_noise)
    noise += np.float32(pedestal)
    values = np.clip(np.rint(noise), 0, ADU_MAX).astype(np.int64)
    del noise
    # uint8 above a base value when the values span at most 256 ADU (read noise up to ~20 ADU):
    # half the bytes to read per pixel.
    low = int(values.min())
    if int(values.max()) - low <= 255:
        base = np.uint16(low)
        pool = (values - low).astype(np.uint8)
    else:
        base = np.uint16(0)
        pool = values.astype(np.uint16)
    return np.concatenate([pool, pool[:FRAME_COLS]]), base


#: Distributions of one electron's deposited charge (SimulationConfig.charge_model).
CHARGE_MODELS = ("gamma", "landau")
_EULER_GAMMA = 0.5772156649015329


def _charge_quantiles(mean: float, shape: float, model: str = "gamma") -> np.ndarray:
    """(_N_CHARGE_LEVELS,) float32 ADU: evenly spaced quantiles of the charge distribution, of
    mean ``mean`` and standard deviation ``mean / sqrt(shape)`` either way: "gamma" (shape
    ``shape``), or "landau", Moyal's approximation of the Landau distribution of energy lost in a
    thin layer (J. E. Moyal, Phil. Mag. 46 (1955) 263): skewed, with a long tail of large
    deposits, location ``mean - width (gamma_E + ln 2)``, width ``std / (pi / sqrt 2)``."""
    q = (np.arange(_N_CHARGE_LEVELS) + 0.5) / _N_CHARGE_LEVELS
    if model == "gamma":
        return (gammaincinv(shape, q) * mean / shape).astype(np.float32)
    width = mean / np.sqrt(shape) / (np.pi / np.sqrt(2.0))
    location = mean - width * (_EULER_GAMMA + np.log(2.0))
    # Moyal's quantile function: x = location - 2 width ln(sqrt(2) erfc^-1(q))
    values = location - 2.0 * width * np.log(np.sqrt(2.0) * erfcinv(q))
    return np.clip(values, 0.0, ADU_MAX).astype(np.float32)


def _sharing_kernels(rng: np.random.Generator, sigma: float, n: int) -> np.ndarray:
    """(n, 3, 3) float32 fractions (each sums to 1) of an electron's charge on its
    3x3 neighbourhood: a Gaussian cloud of width ~sigma px centred at a random point of the landing
    pixel. Landing points so near an edge that a neighbour would get nearly as much are redrawn."""
    edges = np.array([-1.5, -0.5, 0.5, 1.5])
    kept: list[np.ndarray] = []
    n_kept = 0
    while n_kept < n:
        m = 4 * n  # candidates per round: more than needed, as some are redrawn
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


def charge_stamps(rng: np.random.Generator, adu_mean: float, adu_shape: float, cloud_sigma: float,
                  model: str = "gamma") -> np.ndarray:
    """(N_STAMPS, 9) uint16: what one electron adds to its 3x3 neighbourhood (row-major, landing
    pixel in the middle), ADU. Stamp i has charge level i // _KERNELS_PER_LEVEL (every quantile of
    the charge distribution (``model``, see _charge_quantiles) of mean ``adu_mean`` and shape ``adu_shape`` as often) and a
    sharing pattern of its own (charge cloud of width ``cloud_sigma`` px), drawn independently: an
    electron taking a uniformly random stamp gets exactly the charge distribution of the quantile
    table, and a sharing pattern from 16,384 draws of the charge cloud, independent of its charge.
    Precomputed so that depositing an electron is 9 integer additions, not 9 products and
    float-to-integer conversions (a third of the time an electron took)."""
    adu = _charge_quantiles(adu_mean, adu_shape, model)
    adu = np.repeat(adu, _KERNELS_PER_LEVEL)[:, None]
    shares = _sharing_kernels(rng, cloud_sigma, N_STAMPS).reshape(N_STAMPS, 9)
    return np.minimum(np.floor(adu * shares + np.float32(0.5)), ADU_MAX).astype(np.uint16)


def corner_stamps(stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def bad_pixels(
    rng: np.random.Generator, n_hot: int, n_dead: int, hot_adu: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hot and dead pixels: (n_hot,) and (n_dead,) sorted int64 flat pixel indices
    ``row * FRAME_COLS + col``, all distinct, and the hot pixels' (n_hot,) uint16 values, uniform in
    hot_adu = (low, high) ADU and rounded."""
    bad = rng.choice(FRAME_PIXELS, n_hot + n_dead, replace=False).astype(np.int64)
    hot = np.sort(bad[:n_hot])
    dead = np.sort(bad[n_hot:])
    low, high = hot_adu
    hot_values = np.rint(rng.uniform(low, high, len(hot))).astype(np.uint16)
    return hot, dead, hot_values
