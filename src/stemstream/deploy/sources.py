"""What the producers stream, as a launch names it: the detector simulator or a scan's raw files.

A :class:`ProducerSource` travels to each producer process as command-line options
(:meth:`ProducerSource.arguments`); ``stemstream producer`` turns those options back into one and
hands the producer :meth:`ProducerSource.factory`, which makes the source of each scan from the
scan's spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the sources load numba (about a second): only producers import them
    from stemstream.core.scan_spec import ScanSpec
    from stemstream.sources.modules import ReplayModule, SimulatedModule


@dataclass
class ProducerSource:
    """What the producers stream: the simulator (dose, seed, rate, drops) or raw files."""

    replay: list[Path] | None = None
    dose: float = 0.002
    seed: int = 0
    rate: float = 0.0
    drop_sectors: float = 0.0

    def arguments(self) -> list[str]:
        """The ``stemstream producer`` options that stand for this source."""
        if self.replay:
            return [a for p in self.replay for a in ("--replay", str(p))]
        return ["--dose", str(self.dose), "--seed", str(self.seed), "--rate", str(self.rate),
                "--drop-sectors", str(self.drop_sectors)]

    def factory(self, module: int) -> ReplayFactory | SimulatorFactory:
        """The producer's ``source_factory`` for detector module ``module``."""
        if self.replay:
            return ReplayFactory(list(self.replay), module)
        return SimulatorFactory(self, module)


class ReplayFactory:
    """Each scan streams the records of its scan number from the raw files, one module's."""

    def __init__(self, paths: list[Path], module: int):
        self.paths = paths
        self.module = module

    def __call__(self, spec: ScanSpec) -> ReplayModule:
        from stemstream.sources.modules import ReplayModule

        return ReplayModule(self.paths, self.module, spec.block_frames, spec.number)


class SimulatorFactory:
    """Each scan is simulated afresh, seeded by the source's seed plus the scan number (so scans
    differ, and a scan number streamed again gives the same frames)."""

    def __init__(self, source: ProducerSource, module: int):
        self.source = source
        self.module = module

    def __call__(self, spec: ScanSpec) -> SimulatedModule:
        from stemstream.sources.modules import SimulatedModule

        s = self.source
        return SimulatedModule(spec, self.module, dose=s.dose, seed=s.seed + spec.number, rate=s.rate,
                               drop_sector_probability=s.drop_sectors)

    def warm_up(self) -> None:
        """Render one frame's sector, so the simulator's compiled code is loaded before the
        first scan rather than during it (the producer calls this when it starts)."""
        from stemstream.sources.simulator import DetectorSimulator, SimulationConfig

        DetectorSimulator(SimulationConfig(scan_shape=(1, 1))).records(0, 1, self.module)
