"""The compiled electron-counting kernel: thresholds plus strict 8-neighbour local maxima.

Semantics follow ``stempy.image.electron_count_frame`` (stempy 3.6.0) exactly, checked by tests:

- Without a gain map, the dark value is truncated to an integer and subtracted from the raw
  ``uint16`` value with 16-bit wrap-around (a negative result becomes a huge value, which the X-ray
  threshold then removes).
- With a gain map ``g``, the value is ``(float32(raw) - float32(dark)) * float32(1 / g)``, a float.
- A value ``<= background`` or ``>= xray`` counts as 0.
- An electron is recorded at a pixel strictly greater than all its (thresholded) 8 neighbours;
  neighbours outside the frame are skipped. Plateaus give no event.

All kernels release the GIL; :func:`count_frames` spreads a batch over all numba threads.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange
from numba.cpython.unsafe.numbers import trailing_zeros

from stemstream.core.detector import FRAME_SHAPE
from stemstream.formats.raw_pread import fetch_add, read_frame

# Pixels per block in the fast scan: a block whose maximum is below the background threshold is
# skipped after one vectorised pass, which is what most of a sparse frame is. Blocks of 96 and 192
# columns measured fastest (blocks of 64 and 128 do not vectorise; 288 hit too often); unsigned
# indices keep numba from emitting the negative-index wrap-around that stops LLVM vectorising.
# A multiple of 8: the hit mask is read as uint64 words.
_BLOCK = 96
# Multiplying a uint64 of eight 0/1 bytes by this puts byte i's bit at bit 56 + i (the partial
# products land on distinct bits, so nothing carries): ">> 56" packs 8 mask bytes into 8 bits.
_GATHER = np.uint64(0x0102040810204080)


def max_events_per_frame(frame_shape: tuple[int, int]) -> int:
    """Upper bound of events in one frame of (rows, cols): strict maxima are never adjacent."""
    rows, cols = frame_shape
    return ((rows + 1) // 2) * ((cols + 1) // 2)


@njit(nogil=True, cache=True, inline="always")
def _blocks(n, v, hi):
    # A neighbour blocks the event only if it survives thresholding (<= hi; it is then > 0
    # whenever it is >= v because v >= lo) and is not smaller than v.
    return n >= v and n <= hi


@njit(nogil=True, cache=True)
def _is_event_int(flat, r, c, v, hi, rows, cols):
    p = r * cols + c
    has_left = c > 0
    has_right = c + 1 < cols
    if has_left and _blocks(flat[p - 1], v, hi):
        return False
    if has_right and _blocks(flat[p + 1], v, hi):
        return False
    if r > 0:
        q = p - cols
        if _blocks(flat[q], v, hi):
            return False
        if has_left and _blocks(flat[q - 1], v, hi):
            return False
        if has_right and _blocks(flat[q + 1], v, hi):
            return False
    if r + 1 < rows:
        q = p + cols
        if _blocks(flat[q], v, hi):
            return False
        if has_left and _blocks(flat[q - 1], v, hi):
            return False
        if has_right and _blocks(flat[q + 1], v, hi):
            return False
    return True


@njit(nogil=True, cache=True, inline="always")
def _kept(n, hi):
    # A neighbour's value after the X-ray cut; the background cut does not matter for a
    # neighbour, since a candidate is >= lo and a neighbour below lo never blocks it.
    return n if n <= hi else np.uint16(0)


@njit(nogil=True, cache=True)
def count_frame_int(frame, lo, hi, out):
    """Events of one C-contiguous uint16 frame (rows, cols); a pixel survives thresholding when
    ``lo <= value <= hi``. Writes flat indices ``row * cols + col`` (ascending) to ``out`` and
    returns how many.

    Two passes per block of _BLOCK pixels of a row: the block's maximum (one vectorised read)
    skips the ~90 % of blocks with no pixel >= lo; a hit block gets the full 8-neighbour test on
    all its pixels at once (vectorised, branch-free: candidates sit at random places, so a branch
    per candidate mispredicts), into a byte mask whose set bytes are then visited.
    """
    rows, cols = frame.shape
    flat = frame.reshape(-1)
    n_events = 0
    if lo > 65535:
        return 0
    lo16 = np.uint16(lo)
    hi16 = np.uint16(min(hi, 65535))
    mask = np.zeros(_BLOCK, np.uint8)
    mwords = mask.view(np.uint64)
    block = np.uint64(_BLOCK)
    ucols = np.uint64(cols)
    n_blocks = ucols // block
    tail_start = np.int64(n_blocks * block)
    for r in range(rows):
        row_base = np.uint64(r) * ucols
        # The vector test reads the row above and below, one pixel beyond the block on each
        # side: rows 0, 1, rows-2 and rows-1 take the scalar path, so no read leaves the frame.
        interior_row = r >= 2 and r + 3 <= rows
        for b in range(n_blocks):
            base = row_base + b * block
            m = np.uint16(0)  # frames are uint16; a wider accumulator would not vectorise
            for j in range(block):
                m = max(m, flat[base + j])
            if m < lo16:
                continue
            if interior_row:
                up = base - ucols
                dn = base + ucols
                for j in range(block):
                    v = flat[base + j]
                    n = max(_kept(flat[base + j - np.uint64(1)], hi16), _kept(flat[base + j + np.uint64(1)], hi16))
                    n = max(n, _kept(flat[up + j - np.uint64(1)], hi16))
                    n = max(n, _kept(flat[up + j], hi16))
                    n = max(n, _kept(flat[up + j + np.uint64(1)], hi16))
                    n = max(n, _kept(flat[dn + j - np.uint64(1)], hi16))
                    n = max(n, _kept(flat[dn + j], hi16))
                    n = max(n, _kept(flat[dn + j + np.uint64(1)], hi16))
                    mask[j] = np.uint8((v >= lo16) & (v <= hi16) & (n < v))
                # Columns 0 and cols-1 have no left / right neighbour: the vector pass read
                # the other row's edge pixel there, so check them again.
                if b == 0:
                    v = flat[base]
                    mask[0] = np.uint8(v >= lo16 and v <= hi16 and _is_event_int(flat, r, 0, v, hi, rows, cols))
                if b == n_blocks - np.uint64(1) and tail_start == cols:
                    v = flat[base + block - np.uint64(1)]
                    mask[_BLOCK - 1] = np.uint8(v >= lo16 and v <= hi16 and _is_event_int(flat, r, cols - 1, v, hi, rows, cols))
                # Gather the 0/1 mask bytes into bits, 8 bytes per multiply (the products of the
                # magic number's bits never collide, so no carries), then visit only set bits.
                for h in range((_BLOCK + 63) // 64):
                    bits = np.uint64(0)
                    for k in range(min(8, _BLOCK // 8 - 8 * h)):
                        bits |= ((mwords[8 * h + k] * _GATHER) >> np.uint64(56)) << np.uint64(8 * k)
                    while bits != 0:
                        out[n_events] = np.int64(base) + 64 * h + np.int64(trailing_zeros(bits))
                        n_events += 1
                        bits &= bits - np.uint64(1)
            else:
                for j in range(block):
                    v = flat[base + j]
                    if v >= lo16 and v <= hi16:
                        c = np.int64(b * block + j)
                        if _is_event_int(flat, r, c, v, hi, rows, cols):
                            out[n_events] = np.int64(base + j)
                            n_events += 1
        for c in range(tail_start, cols):
            v = flat[r * cols + c]
            if v >= lo and v <= hi and _is_event_int(flat, r, c, v, hi, rows, cols):
                out[n_events] = r * cols + c
                n_events += 1
    return n_events


@njit(nogil=True, cache=True)
def count_frame_float(values, background, xray, out):
    """Events of one float frame (rows, cols) with float thresholds (the gain-map path)."""
    rows, cols = values.shape
    n_events = 0
    for r in range(rows):
        for c in range(cols):
            v = values[r, c]
            if not (v > background and v < xray):
                continue
            event = True
            for dr in (-1, 0, 1):
                rr = r + dr
                if rr < 0 or rr >= rows:
                    continue
                for dc in (-1, 0, 1):
                    if dr == 0 and dc == 0:
                        continue
                    cc = c + dc
                    if cc < 0 or cc >= cols:
                        continue
                    n = values[rr, cc]
                    if n > background and n < xray and n >= v:
                        event = False
            if event:
                out[n_events] = r * cols + c
                n_events += 1
    return n_events


@njit(nogil=True, cache=True)
def _subtract_dark(frame, dark_int, scratch):
    rows, cols = frame.shape
    for r in range(rows):
        for c in range(cols):
            # uint16 wrap-around, as stempy
            scratch[r, c] = np.uint16((np.int64(frame[r, c]) - dark_int[r, c]) & 0xFFFF)


@njit(nogil=True, cache=True)
def _apply_dark_gain(frame, dark_f32, inv_gain, scratch):
    rows, cols = frame.shape
    for r in range(rows):
        for c in range(cols):
            # stempy's gain path keeps the dark reference as float32 (no truncation, no wrap)
            scratch[r, c] = (np.float32(frame[r, c]) - dark_f32[r, c]) * inv_gain[r, c]


@njit(nogil=True, cache=True)
def _half_row_stat(values, use_mean):
    if use_mean:
        total = np.float32(0.0)
        for v in values:
            total += np.float32(v)
        return total / np.float32(values.shape[0])
    return np.float32(np.median(values.astype(np.float32)))


@njit(nogil=True, cache=True)
def _to_u16(x):
    # C++ float -> uint16 conversion as compiled on x86-64: truncate to int32, keep 16 bits
    return np.uint16(np.int64(np.int32(x)) & 0xFFFF)


@njit(nogil=True, cache=True)
def _apply_row_dark(frame, dark_f32, inv_gain, optimized_mean, use_mean, float_path, scratch_u16, scratch_f32):
    """stempy's row-dark: each half-row (the right half takes the odd column) is scaled by
    ``optimized_mean / stat(half-row of the raw frame)`` after the dark is subtracted; the
    integer path truncates to uint16 after each step, as stempy's uint16 frames do."""
    rows, cols = frame.shape
    left = cols // 2
    for r in range(rows):
        for start, stop in ((0, left), (left, cols)):
            stat = _half_row_stat(frame[r, start:stop], use_mean)
            scale = np.float32(optimized_mean) / stat if stat > 0 else np.float32(1.0)
            for c in range(start, stop):
                if float_path:
                    v = (np.float32(frame[r, c]) - dark_f32[r, c]) * scale
                    scratch_f32[r, c] = v * inv_gain[r, c]
                else:
                    v = _to_u16(np.float32(frame[r, c]) - dark_f32[r, c])
                    scratch_u16[r, c] = _to_u16(np.float32(v) * scale)


@njit(nogil=True, cache=True)
def count_one(frame, params, scratch_u16, scratch_f32, out):
    """Events of one (rows, cols) uint16 frame with an ElectronCounter's ``params`` (its
    :attr:`ElectronCounter.params` tuple); the scratch frames are (rows, cols) uint16 / float32
    of the caller's thread. Writes ``out`` as :func:`count_frame_int` does; returns how many."""
    lo, hi, background, xray, dark_int, dark_f32, inv_gain, mode, optimized_mean, use_mean = params
    # mode 0: raw integers; 1: dark subtracted integers; 2: dark and gain, floats;
    # 3: row-dark, integers; 4: row-dark and gain, floats.
    if mode == 0:
        return count_frame_int(frame, lo, hi, out)
    if mode == 1:
        _subtract_dark(frame, dark_int, scratch_u16)
        return count_frame_int(scratch_u16, lo, hi, out)
    if mode == 2:
        _apply_dark_gain(frame, dark_f32, inv_gain, scratch_f32)
        return count_frame_float(scratch_f32, background, xray, out)
    if mode == 3:
        _apply_row_dark(frame, dark_f32, inv_gain, optimized_mean, use_mean, False, scratch_u16, scratch_f32)
        return count_frame_int(scratch_u16, lo, hi, out)
    _apply_row_dark(frame, dark_f32, inv_gain, optimized_mean, use_mean, True, scratch_u16, scratch_f32)
    return count_frame_float(scratch_f32, background, xray, out)


@njit(nogil=True, parallel=True, cache=True)
def _count_batch(frames, params, out, counts, n_chunks):
    # One chunk per thread, each with its own scratch frames, frames interleaved over chunks.
    n, rows, cols = frames.shape
    for k in prange(n_chunks):
        scratch_u16 = np.empty((rows, cols), np.uint16)
        scratch_f32 = np.empty((rows, cols), np.float32)
        for i in range(k, n, n_chunks):
            counts[i] = count_one(frames[i], params, scratch_u16, scratch_f32, out[i])


@njit(nogil=True, parallel=True, cache=True)
def read_count(fds, source_file, source_record, indices, params, frames, out, counts, failed, n_chunks):
    """Read (raw_pread.read_frame) and count the frames at FrameTable ``indices``, each thread
    into its own scratch frame ``frames[k]`` and straight on to counting it while it is in the
    thread's cache (see counting.from_files). ``failed[i]``: -1, or the module whose read failed.
    Here, not in from_files.py: numba's cache only notices edits to the file of the cached
    function, so it lives next to the kernel it compiles in."""
    n = indices.shape[0]
    next_frame = np.zeros(1, np.int64)
    for k in prange(n_chunks):
        rows, cols = frames.shape[1], frames.shape[2]
        scratch_u16 = np.empty((rows, cols), np.uint16)
        scratch_f32 = np.empty((rows, cols), np.float32)
        frame = frames[k]
        while True:
            # Threads take the next frame when free (not a fixed share: on a busy machine one
            # thread may be descheduled, and the others should not wait for it).
            i = fetch_add(next_frame, 0, 1)
            if i >= n:
                break
            failed[i] = read_frame(fds, source_file, source_record, indices[i], frame)
            counts[i] = 0 if failed[i] >= 0 else count_one(frame, params, scratch_u16, scratch_f32, out[i])


@njit(nogil=True, cache=True)
def _compact(out, counts, flat, offsets):
    # An element loop, not a slice assignment: numba compiles a slice assignment's shape
    # mismatch message (string formatting), 4 of a fresh install's 18 s compiling a node group.
    offsets[0] = 0
    for i in range(counts.shape[0]):
        k = counts[i]
        start = offsets[i]
        for j in range(k):
            flat[start + j] = out[i, j]
        offsets[i + 1] = start + k


@dataclass
class CountedFrames:
    """Electron events of a batch of frames, flat: frame ``i`` holds
    ``events[offsets[i]:offsets[i+1]]``, sorted flat pixel indices ``row * cols + col``."""

    events: np.ndarray  # (total,) uint32
    offsets: np.ndarray  # (n + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def frame(self, i: int) -> np.ndarray:
        return self.events[self.offsets[i] : self.offsets[i + 1]]

    def per_frame(self) -> list[np.ndarray]:
        """One array (a view) per frame."""
        return np.split(self.events, self.offsets[1:-1])

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


def _integer_window(background: float, xray: float) -> tuple[int, int]:
    """For integer values, ``background < v < xray`` is ``lo <= v <= hi``."""
    lo = math.floor(background) + 1
    hi = math.ceil(xray) - 1
    return max(lo, 1), min(hi, np.iinfo(np.int64).max)


def _sparse_rows(shape: tuple[int, int], dtype) -> np.ndarray:
    """A zero array on an anonymous memory map: only the pages written become resident. The
    event rows are sized for the densest possible frame (331 kB for 576 x 576) but a frame fills
    a few kB; numpy's own large arrays ask for transparent huge pages, which would make every
    2 MB that a row touches resident (85 MB for 256 rows instead of ~1 MB)."""
    count = shape[0] * shape[1]
    buffer = mmap.mmap(-1, max(count * np.dtype(dtype).itemsize, 1))
    return np.frombuffer(buffer, dtype, count).reshape(shape)


class ElectronCounter:
    """Counts batches of frames with fixed thresholds, reusing its buffers between batches.

    background and xray thresholds are in ADU (after dark subtraction and gain); dark is a
    (rows, cols) reference in ADU (any float dtype; truncated to integers as stempy does);
    gain is a (rows, cols) map that values are divided by (stempy's Python convention).
    row_dark applies stempy's row-dark correction, which needs ``optimized_mean`` (ADU, the
    fitted pedestal of the calibration); row_dark_use_mean picks mean (True) or median.
    """

    def __init__(
        self,
        background: float,
        xray: float,
        frame_shape: tuple[int, int] = FRAME_SHAPE,
        dark: np.ndarray | None = None,
        gain: np.ndarray | None = None,
        row_dark: bool = False,
        optimized_mean: float = 0.0,
        row_dark_use_mean: bool = True,
    ):
        if row_dark and not optimized_mean > 0:
            raise ValueError("row-dark correction needs the calibrated pedestal (optimized_mean > 0 ADU)")
        self.row_dark = row_dark
        self._optimized_mean = float(optimized_mean)
        self._use_mean = bool(row_dark_use_mean)
        self.background = float(background)
        self.xray = float(xray)
        self.frame_shape = tuple(frame_shape)
        self._lo, self._hi = _integer_window(self.background, self.xray)
        for name, arr in (("dark reference", dark), ("gain map", gain)):
            if arr is not None and tuple(arr.shape) != self.frame_shape:
                raise ValueError(f"{name} has shape {tuple(arr.shape)}, frames have {self.frame_shape} (rows, cols)")
        self._dark_f32 = np.zeros(self.frame_shape, np.float32) if dark is None else np.asarray(dark, np.float32)
        # Without a gain map stempy truncates the dark reference to integers (toward zero)
        self._dark_int = self._dark_f32.astype(np.int64)
        if gain is None:
            self._inv_gain = np.ones(self.frame_shape, np.float32)
        else:
            with np.errstate(divide="ignore"):
                self._inv_gain = np.power(np.asarray(gain, np.float32), np.float32(-1)).astype(np.float32)
        if row_dark:
            self._mode = 4 if gain is not None else 3
        else:
            self._mode = 2 if gain is not None else (1 if dark is not None else 0)
        self._out = np.empty((0, max_events_per_frame(self.frame_shape)), np.uint32)
        self._counts = np.empty(0, np.int64)

    def count(self, frames: np.ndarray) -> CountedFrames:
        """Count a batch of frames, shape (n, rows, cols) ``uint16``."""
        if frames.ndim == 2:
            frames = frames[np.newaxis]
        if frames.dtype != np.uint16:
            raise TypeError(f"frames must be uint16, got {frames.dtype}")
        if tuple(frames.shape[1:]) != self.frame_shape:
            raise ValueError(f"frames have shape {tuple(frames.shape[1:])}, counter expects {self.frame_shape} (rows, cols)")
        n = frames.shape[0]
        _, counts = self.event_buffers(n)
        if n:
            frames = np.ascontiguousarray(frames)
            _count_batch(frames, self.params, self._out, counts, min(n, numba.get_num_threads()))
        return self.compact(n)

    @property
    def params(self) -> tuple:
        """The thresholds and corrections as the compiled :func:`count_one` takes them."""
        return (
            self._lo, self._hi, self.background, self.xray, self._dark_int, self._dark_f32, self._inv_gain,
            self._mode, self._optimized_mean, self._use_mean,
        )

    def event_buffers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-frame event rows (n, max events per frame) uint32 and counts (n,) int64 for a
        batch of n frames, reused between batches (untouched rows cost no memory)."""
        if self._out.shape[0] < n:
            self._out = _sparse_rows((n, self._out.shape[1]), np.uint32)
            self._counts = np.empty(n, np.int64)
        return self._out[:n], self._counts[:n]

    def compact(self, n: int) -> CountedFrames:
        """The first n frames of :meth:`event_buffers`, filled by a kernel, as CountedFrames."""
        counts = self._counts[:n]
        offsets = np.empty(n + 1, np.int64)
        flat = np.empty(int(counts.sum()), np.uint32)
        _compact(self._out, counts, flat, offsets)
        return CountedFrames(flat, offsets)


def count_frame(frame: np.ndarray, background: float, xray: float, dark: np.ndarray | None = None, gain: np.ndarray | None = None) -> np.ndarray:
    """Events of one (rows, cols) uint16 frame: sorted flat indices ``row * cols + col``."""
    counter = ElectronCounter(background, xray, frame.shape, dark, gain)
    return counter.count(frame).frame(0).copy()
