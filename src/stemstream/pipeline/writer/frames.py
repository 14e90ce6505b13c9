"""The frames the writer puts in a scan's file, as flat arrays: their events and, when the file keeps
them, their sub-pixel positions (the cluster method's, docs/counting.md); and the slot each frame
takes at its position.

Every path that writes frames (a message's, those held until their position is complete, those
a resume carries over or sets aside, those a dead writer's journal gives back) passes them as
:class:`Frames`, so the positions travel with the events wherever the events go. A file that
keeps positions gets its events' pixel centres for frames that came without (a node group that
counted by maxima, a resumed file written without them), counted in the file's ledger as
``frames_at_pixel_centres``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from stemstream.analysis.batch import pixel_centres
from stemstream.formats import wire

_NO_POINTS = np.empty((0, 2), np.float32)


def with_subpixel(msg: wire.EventsMessage) -> tuple[wire.EventsMessage, int]:
    """``msg`` with sub-pixel positions: its own, else its events' pixel centres; and how many
    of its frames got pixel centres."""
    if msg.subpixel is not None or not len(msg.events):
        return msg, 0
    return replace(msg, subpixel=pixel_centres(msg.events)), len(msg.frame_numbers)


@dataclass
class Frames:
    """Frame i's pixels ``events[offsets[i]:offsets[i + 1]]`` and their sub-pixel (row, col)
    ``subpixel[offsets[i]:offsets[i + 1]]`` ((events, 2) float32; None: none came with them)."""

    events: np.ndarray
    offsets: np.ndarray
    subpixel: np.ndarray | None = None

    @classmethod
    def joined(cls, events: list, subpixel: list | None = None) -> Frames:
        """Single frames' event lists as one batch, with their sub-pixel positions (a (k, 2)
        array a frame; None for a frame without: its pixel centres) when ``subpixel`` is given."""
        offsets = np.zeros(len(events) + 1, np.int64)
        np.cumsum([len(e) for e in events], out=offsets[1:])
        flat = np.concatenate(events).astype(np.uint32, copy=False) if events else np.empty(0, np.uint32)
        if subpixel is None:
            return cls(flat, offsets)
        points = [pixel_centres(e) if s is None else np.asarray(s, np.float32).reshape(-1, 2)
                  for e, s in zip(events, subpixel)]
        return cls(flat, offsets, np.concatenate([_NO_POINTS, *points]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def frame(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Frame ``i``'s events and sub-pixel positions (None: none), copied out of the batch."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.events[a:b].copy(), None if self.subpixel is None else self.subpixel[a:b].copy()

    def select(self, index: np.ndarray) -> Frames:
        """The frames ``index`` (in that order) as a batch of their own; this one when it is all of them."""
        index = np.asarray(index, np.int64)
        if len(index) == len(self) and np.array_equal(index, np.arange(len(self))):
            return self
        lengths = np.diff(self.offsets)[index]
        offsets = np.zeros(len(index) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        take = np.repeat(self.offsets[index] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Frames(self.events[take], offsets, None if self.subpixel is None else self.subpixel[take])

    def points(self) -> np.ndarray:
        """The events' sub-pixel positions, their pixel centres when none came."""
        return pixel_centres(self.events) if self.subpixel is None else self.subpixel


def first_frames_in_order(rank: np.ndarray, fpp: int, positions: np.ndarray, whole: bool) -> bool:
    """True for the common batch, written in one call without sorting: one frame per position,
    a ``whole`` message's frames, at increasing positions none of which has a frame yet (``rank``:
    frames so far per position); each frame's slot is its position."""
    return (fpp == 1 and whole and len(positions) > 0 and bool(np.all(positions[1:] > positions[:-1]))
            and not rank[positions].any())


def next_slots(rank: np.ndarray, fpp: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The slot of each frame at ``positions`` (several may share one): its position's next free
    ones, in the frames' order; and which are past their position's ``fpp`` slots (not to be
    written). ``rank`` (frames so far per position) is advanced. Vectorised, in int64: slot
    numbers pass 65,535 as soon as a scan has more positions."""
    order = np.argsort(positions, kind="stable")  # frames of one position keep their order
    by_position = positions[order]
    first = np.r_[True, by_position[1:] != by_position[:-1]] if len(by_position) else np.empty(0, bool)
    starts = np.maximum.accumulate(np.where(first, np.arange(len(by_position)), 0))
    taken = np.empty(len(positions), np.int64)
    taken[order] = rank[by_position].astype(np.int64) + np.arange(len(by_position)) - starts
    touched, counts = np.unique(by_position, return_counts=True)
    rank[touched] = np.minimum(rank[touched].astype(np.int64) + counts, fpp)
    return positions * fpp + taken, taken >= fpp
