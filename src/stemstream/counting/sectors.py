"""Counting frames straight from their 4 sectors' records, without assembling the frames.

A node group receives each module's sectors as raw records (header + 144 x 576 pixels) in one
buffer per message. Assembling 576 x 576 frames would copy every pixel once more; instead each
sector is counted in place as a 144-row frame, and the events on a sector's first or last row are
then checked against the adjacent sector's boundary row, the only neighbours the 144-row count
did not see. A strict maximum of the whole frame is a strict maximum of its stripe, so this check
only removes events, and the result equals counting the assembled frame (missing sectors count
as zero rows, as in the assembled frame). Plain thresholds only (no dark, gain or row-dark).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from stemstream.counting.kernel import ElectronCounter, count_frame_int
from stemstream.formats.raw import FRAME_COLS, HEADER_BYTES, N_MODULES, RECORD_BYTES, SECTOR_PIXELS, SECTOR_ROWS

_RECORD_WORDS = RECORD_BYTES // 2
_HEADER_WORDS = HEADER_BYTES // 2


@njit(nogil=True, cache=True, inline="always")
def _sector(buffer, record):
    start = record * _RECORD_WORDS + _HEADER_WORDS
    return buffer[start : start + SECTOR_PIXELS].reshape(SECTOR_ROWS, FRAME_COLS)


@njit(nogil=True, cache=True)
def _blocked_by_row(row, col, v, hi):
    # Does a neighbour in ``row`` (the adjacent sector's boundary row) block an event of value v
    # at column col? Same rule as the kernel: it blocks if it survives thresholding and is >= v.
    for c in range(max(col - 1, 0), min(col + 2, FRAME_COLS)):
        n = row[c]
        if n >= v and n <= hi:
            return True
    return False


@njit(nogil=True, cache=True)
def _count_from_sectors(b0, b1, b2, b3, records, lo, hi, out, counts, scratch):
    n = records.shape[0]
    for i in range(n):
        total = 0
        for k in range(N_MODULES):
            r = records[i, k]
            if r < 0:
                continue
            buffer = b0 if k == 0 else (b1 if k == 1 else (b2 if k == 2 else b3))
            sector = _sector(buffer, r)
            found = count_frame_int(sector, lo, hi, scratch)
            for e in range(found):
                p = np.int64(scratch[e])
                row = p // FRAME_COLS
                col = p - row * FRAME_COLS
                v = sector[row, col]
                keep = True
                if row == SECTOR_ROWS - 1 and k < N_MODULES - 1 and records[i, k + 1] >= 0:
                    below = (b1 if k == 0 else (b2 if k == 1 else b3))
                    keep = not _blocked_by_row(_sector(below, records[i, k + 1])[0], col, v, hi)
                if keep and row == 0 and k > 0 and records[i, k - 1] >= 0:
                    above = (b0 if k == 1 else (b1 if k == 2 else b2))
                    keep = not _blocked_by_row(_sector(above, records[i, k - 1])[SECTOR_ROWS - 1], col, v, hi)
                if keep:
                    out[i, total] = p + k * SECTOR_PIXELS
                    total += 1
        counts[i] = total


_EMPTY = np.zeros(0, np.uint16)
_EMPTY.flags.writeable = False


def sector_words(buffers: list) -> list:
    """Module k's records ``buffers[k]`` (RECORD_DTYPE, or None) as uint16 words, every one
    read-only. numba compiles a kernel once per combination of writable and read-only arguments
    (received buffers are read-only, a missing module's stand-in or a test's arrays are not): 16
    variants of 6-8 s each, one compiled mid-scan when a module goes missing. Read-only views
    make it one."""
    words = []
    for b in buffers:
        if b is None or len(b) == 0:
            words.append(_EMPTY)
            continue
        view = np.ascontiguousarray(b).view(np.uint16)
        view.flags.writeable = False  # the view only: the caller's array stays as it was
        words.append(view)
    return words


def count_from_sectors(counter: ElectronCounter, buffers: list, records: np.ndarray):
    """Count n frames given as sector records: ``buffers[k]`` is module k's RECORD_DTYPE array
    (or None), ``records`` (n, 4) the index of each frame's sector in it (-1: missing).
    Returns CountedFrames, equal to ``counter.count`` of the assembled frames."""
    if counter.params[7] != 0:
        raise ValueError("counting from sectors supports plain thresholds only (no dark, gain or row-dark)")
    words = sector_words(buffers)
    n = len(records)
    out, counts = counter.event_buffers(n)
    if n:
        scratch = np.empty(out.shape[1], np.uint32)
        lo, hi = counter.params[0], counter.params[1]
        _count_from_sectors(words[0], words[1], words[2], words[3], np.ascontiguousarray(records, np.int64),
                            lo, hi, out, counts, scratch)
    return counter.compact(n)
