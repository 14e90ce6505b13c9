"""A routing block as a node group holds it: the parts (one per module) received so far, and its
frames indexed into those parts for counting, without copying a pixel."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stemstream.core.detector import MODULES, sector_rows


@dataclass
class Block:
    parts: dict[int, list[np.ndarray]] = field(default_factory=dict)  # module -> record arrays

    @property
    def modules(self) -> int:
        return len(self.parts)


@dataclass
class IndexedBlock:
    """A block's frames as references into the received records, without copying pixels."""

    frame_numbers: np.ndarray  # (n,) uint32, ascending
    positions: np.ndarray  # (n,) int64
    present: np.ndarray  # (n,) uint8 bit mask of modules
    buffers: list  # module -> RECORD_DTYPE array of the records kept (or None)
    records: np.ndarray  # (n, 4) int64 index into buffers[module], -1 where the sector is missing
    tally: dict | None = None  # the block's sector counts (stemstream.formats.ledger.sector_tally), if counted

    def frames(self, out: np.ndarray) -> np.ndarray:
        """The frames assembled into ``out`` (at least n x 576 x 576 uint16); missing sectors zero."""
        frames = out[: len(self.frame_numbers)]
        for module in MODULES:
            rows = sector_rows(module)
            data = self.buffers[module]["data"] if self.buffers[module] is not None else None
            for i, k in enumerate(self.records[:, module].tolist()):
                frames[i, rows] = data[k] if k >= 0 else 0
        return frames
