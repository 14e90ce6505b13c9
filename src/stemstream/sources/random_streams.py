"""Counter-based random streams of the detector simulator (SplitMix64).

Every random draw of a frame comes from a stream keyed by (seed, frame index, sub-stream) alone, so
a frame is the same whatever the batch, the sector or the thread it is generated in. A stream's
state is a one-element uint64 array (numba kernels advance it in place); a stream starts at
``mix64(key ^ mix64(index + GOLDEN))``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# Stream domains: independent random streams from one seed.
DOMAIN_FRAMES = 0x6672616D65730001
DOMAIN_DROPS = 0x64726F7073000002
DOMAIN_DETECTOR = 0xDE7EC7

_MASK64 = (1 << 64) - 1
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_INV_2_53 = 1.0 / 9007199254740992.0

# Sub-streams of a frame's stream: the noise placement, the X-rays, and one per (component, band)
# of electrons. Each is keyed by (frame, sub-stream) alone, so a sector draws only the electrons
# that can reach its rows, and still gets exactly the draws the whole frame gets.
SUB_NOISE = 0
SUB_XRAYS = 1
SUB_ELECTRONS = 2  # + component * n_bands + band
_SUB_MULT = np.uint64(0xD1B54A32D192ED03)


def mix64_int(z: int) -> int:
    """SplitMix64 finaliser on Python ints (for keys derived once per simulator)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * int(_MIX1)) & _MASK64
    z = ((z ^ (z >> 27)) * int(_MIX2)) & _MASK64
    return z ^ (z >> 31)


@njit(inline="always")
def mix64(z):
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def next_bits(state):
    """Next 64 random bits of the SplitMix64 stream held in state[0]."""
    state[0] += GOLDEN
    return mix64(state[0])


@njit(inline="always")
def uniform(state):
    """Uniform float in [0, 1)."""
    return float(next_bits(state) >> np.uint64(11)) * _INV_2_53


@njit(inline="always")
def below(state, n):
    """Uniform integer in [0, n) (n << 2**53, so the modulo bias is negligible)."""
    return int((next_bits(state) >> np.uint64(11)) % np.uint64(n))


@njit(inline="always")
def substream(frame_key, index):
    """Starting state of sub-stream ``index`` of the frame whose stream key is frame_key."""
    return mix64(frame_key ^ mix64(np.uint64(index + 1) * _SUB_MULT))


@njit(nogil=True, cache=True)
def poisson(state, lam):
    """Poisson deviate: multiplication method below 10, Hoermann's PTRS rejection above."""
    if lam <= 0.0:
        return 0
    if lam < 10.0:
        limit = math.exp(-lam)
        k = 0
        prod = uniform(state)
        while prod > limit:
            k += 1
            prod *= uniform(state)
        return k
    slam = math.sqrt(lam)
    loglam = math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2.0)
    while True:
        u = uniform(state) - 0.5
        v = uniform(state)
        us = 0.5 - abs(u)
        k = math.floor((2.0 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= vr:
            return int(k)
        if k < 0 or (us < 0.013 and v > us):
            continue
        if math.log(v) + math.log(invalpha) - math.log(a / (us * us) + b) <= -lam + k * loglam - math.lgamma(k + 1.0):
            return int(k)


@njit(nogil=True, cache=True)
def stream_keys(key, indices):
    """(n,) uint64 starting states of the streams of items `indices` (n,) int64 under `key`."""
    out = np.empty(indices.shape[0], np.uint64)
    for i in range(indices.shape[0]):
        out[i] = mix64(key ^ mix64(np.uint64(indices[i]) + GOLDEN))
    return out


@njit(nogil=True, cache=True)
def sector_uniforms(key, frame_indices, n_modules):
    """(n, n_modules) uniforms in [0, 1), one per sector of each frame index (n,) int64."""
    out = np.empty((frame_indices.shape[0], n_modules))
    state = np.empty(1, np.uint64)
    for i in range(frame_indices.shape[0]):
        state[0] = mix64(key ^ mix64(np.uint64(frame_indices[i]) + GOLDEN))
        for m in range(n_modules):
            out[i, m] = uniform(state)
    return out
