"""What a producer needs of a source of one detector module's records (sources.modules:
SimulatedModule, ReplayModule), and the error a source raises for a scan it cannot give."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np


class SourceError(ValueError):
    """A source cannot give the scan asked of it (e.g. raw files that hold no record of that
    scan number); the message is one sentence."""


class ModuleSource(Protocol):
    """One module's sector records of one scan, block by routing block.

    module: the detector module (0 .. N_MODULES-1) whose records it yields. block_frames: frames
    per routing block; block b holds frames ``b * block_frames .. (b + 1) * block_frames - 1``.
    """

    module: int
    block_frames: int

    def blocks(self, buffer_for: Callable[[int], np.ndarray | None] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(block, records)`` in ascending block order, each block once: all of the module's
        records of the block (a 1-D RECORD_DTYPE array, frame order), possibly none (every sector
        of the block dropped: the node group then knows not to wait for it). ``buffer_for(n)``, if
        given, returns the array to put a block's ``n`` records in (the producer's shared-memory
        slot, so they are written once), or None: the source then allocates its own."""
        ...
