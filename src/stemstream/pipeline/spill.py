"""Where spilled records go: raw module files in the receivers' format, one directory per scan."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stemstream.formats.raw import RawModuleWriter, raw_file_name


def spill_directory(spill_root: str | Path, scan_number: int) -> Path:
    """The directory holding a scan's spilled records (producers' and node groups')."""
    return Path(spill_root) / f"scan_{scan_number:05d}"


def spill_writer(directory: Path, scan_number: int, module: int, dst: int) -> RawModuleWriter:
    """A writer of ``module``'s spilled records in ``directory``, under the first ``dst`` from the
    one given that no other writer holds: its first file is created here, exclusively. A role
    started again, or a node group's next stream of the same scan, then never writes over a
    spill already there (a writer opens its files with truncation)."""
    directory.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            with open(directory / raw_file_name(scan_number, module, dst), "xb"):
                return RawModuleWriter(directory, scan_number, module, dst=dst)
        except FileExistsError:
            dst += 1


class SpillFiles:
    """One scan's spill files of one writer of them: a file per module, opened on first use, under
    ``dst`` (a producer writes its module's under the scan's epoch, node group n under 100 + n;
    see spill_writer when that is taken)."""

    def __init__(self, spill_root: str | Path, scan_number: int, dst: int):
        self.directory = spill_directory(spill_root, scan_number)
        self.scan_number, self.dst = scan_number, dst
        self.writers: dict[int, RawModuleWriter] = {}

    def write(self, parts: dict[int, list[np.ndarray]]) -> set[int]:
        """Append module -> record arrays; returns their frame numbers."""
        frames = set()
        for module, arrays in parts.items():
            writer = self.writers.get(module)
            if writer is None:
                writer = self.writers[module] = spill_writer(self.directory, self.scan_number, module, self.dst)
            for records in arrays:
                writer.write(records)
                frames.update(records["header"]["frame_number"].tolist())
        return frames

    def close(self) -> None:
        """Close the files (a later write goes on in a new file of the same writer)."""
        for writer in self.writers.values():
            writer.close()


@dataclass
class LateParts:
    """What a node group keeps of a stream it finished: the parts (block, module) it counted
    without, their producer silent, and the spill files of the blocks' other parts. Such a part
    that comes after all is spilled beside them, so that a replay completes those frames."""

    given_up: set[tuple[int, int]]
    spill: SpillFiles

    def take(self, block: int, module: int, records: np.ndarray) -> bool:
        """Spill a part of a block given up on (False: not one, nothing done)."""
        if (block, module) not in self.given_up:
            return False
        self.spill.write({module: [records]})
        self.spill.close()  # on disk now: no close may come later
        return True
