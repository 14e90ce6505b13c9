"""Compiling the roles' kernels once, before the roles start.

Every role that counts or simulates runs numba kernels, compiled on first use and cached on disk
(``cache=True``). On a fresh install the first ``run``/``demo`` would have each of its processes
(2 node groups, 4 producers, the writer) compile the same kernels at once on the same cores: over
a minute of CPU on a 2-core laptop, during which the roles cannot check in with control. Compiling
them here first, in one process, fills numba's cache; the roles then load it in a second or two.
On later runs this loads the cache too (about a second).
"""

from __future__ import annotations

from stemstream.analysis import default_analyses
from stemstream.core.config import PipelineConfig
from stemstream.core.detector import FRAME_SHAPE
from stemstream.deploy.sources import ProducerSource
from stemstream.pipeline.node.role import load_kernels


def compile_kernels(config: PipelineConfig, source: ProducerSource) -> None:
    """Compile (or load from the cache) what the node groups, the writer and, when the producers
    simulate, the simulator run."""
    load_kernels(default_analyses(FRAME_SHAPE, config.analysis))
    if not source.replay:
        from stemstream.sources.simulator import DetectorSimulator, SimulationConfig

        simulator = DetectorSimulator(SimulationConfig(scan_shape=(1, 2), dose=source.dose, seed=source.seed))
        simulator.records(0, 2, 0)
