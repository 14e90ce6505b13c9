"""Where spilled records go: raw module files in the receivers' format, one directory per scan."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stemstream.formats.raw import RawModuleWriter


def spill_directory(spill_root: str | Path, scan_number: int) -> Path:
    """The directory holding a scan's spilled records (producers' and node groups')."""
    return Path(spill_root) / f"scan_{scan_number:05d}"


class SpillFiles:
    """One scan's spill files of one writer of them: a file per module, opened on first use, under
    ``dst`` (a producer writes its module's under the scan's epoch, node group n under 100 + n, so
    that they never collide)."""

    def __init__(self, spill_root: str | Path, scan_number: int, dst: int):
        self.directory = spill_directory(spill_root, scan_number)
        self.scan_number, self.dst = scan_number, dst
        self.writers: dict[int, RawModuleWriter] = {}

    def write(self, parts: dict[int, list[np.ndarray]]) -> set[int]:
        """Append module -> record arrays; returns their frame numbers."""
        self.directory.mkdir(parents=True, exist_ok=True)
        frames = set()
        for module, arrays in parts.items():
            writer = self.writers.get(module)
            if writer is None:
                writer = self.writers[module] = RawModuleWriter(self.directory, self.scan_number, module, dst=self.dst)
            for records in arrays:
                writer.write(records)
                frames.update(records["header"]["frame_number"].tolist())
        return frames

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
