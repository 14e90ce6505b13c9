"""The incomplete frames of a scan's file (some sectors never came): named in its ledger, and set
aside when a replay resumes the file, so that the replay puts each such frame, whole, in its slot.

The ledger names them by slot and by frame number: ``incomplete``, a flag per slot (positions,
frames per position), and ``incomplete_frames``, the flagged slots' frame numbers in slot order. A
replay knows a frame by its frame number (with several frames per position the number is what
tells which slot it is); a file of one frame per position that does not list the numbers (written
before they were) by its position.
"""

from __future__ import annotations

import numpy as np


class IncompleteFrames:
    """The slots of a scan's file that hold an incomplete frame, and their frames' numbers."""

    def __init__(self, n_slots: int):
        self.flags = np.zeros(n_slots, bool)
        self.numbers = np.zeros(n_slots, np.uint32)  # (zero pages: memory only where frames are marked)

    def mark(self, slots: np.ndarray, numbers: np.ndarray) -> None:
        self.flags[slots] = True
        self.numbers[slots] = numbers

    def mark_in_order(self, first_slot: int, end_slot: int, frames: list[tuple]) -> None:
        """Mark the incomplete ones of ``frames`` ((frame number, events, whole), in frame-number
        order) as written from ``first_slot`` on, one a slot; those from ``end_slot`` on (past
        their position's last slot) are not written."""
        slots = first_slot + np.arange(min(len(frames), max(end_slot - first_slot, 0)), dtype=np.int64)
        lacking = [k for k in range(len(slots)) if not frames[k][2]]
        self.mark(slots[lacking], [frames[k][0] for k in lacking])

    def ledger(self, frames_per_position: int) -> dict:
        """What the file's ledger says of them (``incomplete``, ``incomplete_frames``)."""
        return {"incomplete": self.flags.reshape(-1, frames_per_position).astype(np.uint8),
                "incomplete_frames": self.numbers[np.flatnonzero(self.flags)]}


class SetAside:
    """The incomplete frames of a file a replay resumes, kept out of the new file until the replay
    brings one of them whole (it takes that frame's slot) or the scan closes (the others are
    written back as they were, with their sub-pixel positions ``subpixel``, a (k, 2) array a
    frame, when the file had them). Known by frame number, or ``by_position`` (= slot: one frame
    per position)."""

    def __init__(self, slots: np.ndarray = (), events: list = (), numbers: np.ndarray | None = None,
                 by_position: bool = False, subpixel: list | None = None):
        self.by_number = not by_position
        numbers = np.zeros(len(slots), np.int64) if numbers is None else numbers  # (not listed: unknown)
        keys = numbers if self.by_number else slots
        subpixel = [None] * len(slots) if subpixel is None else subpixel
        self.frames = {int(k): (int(s), e, int(n), p) for k, s, e, n, p in zip(keys, slots, events, numbers, subpixel)}

    def __len__(self) -> int:
        return len(self.frames)

    def slots(self) -> np.ndarray:
        return np.array([item[0] for item in self.frames.values()], np.int64)

    def take(self, frame_numbers: np.ndarray, positions: np.ndarray, whole: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Of a message's frames, those (a mask) that are ``whole`` and were set aside, no longer
        set aside; and the slots they take, in their order."""
        keys = frame_numbers if self.by_number else positions
        taken, slots = np.zeros(len(keys), bool), []
        for i in np.flatnonzero(whole) if self.frames else ():
            found = self.frames.pop(int(keys[i]), None)
            if found is not None:
                taken[i] = True
                slots.append(found[0])
        return taken, np.array(slots, np.int64)

    def rest(self) -> tuple[np.ndarray, list, np.ndarray, list]:
        """The frames still set aside, in slot order: (slots, events, frame numbers (0: not
        known), sub-pixel positions (None: not in the file)); none is set aside after."""
        items = sorted(self.frames.values(), key=lambda item: item[0])
        self.frames = {}
        return (np.array([s for s, _, _, _ in items], np.int64), [e for _, e, _, _ in items],
                np.array([n for _, _, n, _ in items], np.int64), [p for _, _, _, p in items])
