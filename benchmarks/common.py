"""What the benchmark scripts share (they run as ``python benchmarks/NAME.py``, which puts this
folder on the import path)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from stemstream.cli.support import UserError
from stemstream.cli.support import parse_shape as _parse_shape
from stemstream.transport.ports import free_port_block  # noqa: F401  (re-exported for the benchmarks)
from stemstream.sources.simulator import DetectorSimulator, SimulationConfig


def parse_shape(text: str) -> tuple[int, int]:
    """ROWSxCOLS as (rows, cols), for argparse (``type=parse_shape``) and plain calls."""
    try:
        return _parse_shape(text, "scan shape")
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def stemstream_command() -> list[str]:
    """The installed entry point next to this interpreter, as a user runs it."""
    script = Path(sys.executable).with_name("stemstream")
    return [str(script)] if script.exists() else [sys.executable, "-m", "stemstream.cli.app"]


def simulated_frames(config: SimulationConfig, n_frames: int) -> np.ndarray:
    """The first n_frames frames of a simulated scan, (n, 576, 576) uint16, rendered 32 at a time
    into one array (batches of <= 32 frames avoid fresh-memory page faults, see the simulator)."""
    sim = DetectorSimulator(config)
    frames = np.empty((n_frames, 576, 576), np.uint16)
    for start in range(0, n_frames, 32):
        count = min(32, n_frames - start)
        sim.batch(start, count, out=frames[start : start + count])
    return frames
