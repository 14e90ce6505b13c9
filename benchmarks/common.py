"""What the benchmark scripts share (they run as ``python benchmarks/NAME.py``, which puts this
folder on the import path)."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

import numpy as np

from stemstream.cli_support import UserError
from stemstream.cli_support import parse_shape as _parse_shape
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
    return [str(script)] if script.exists() else [sys.executable, "-m", "stemstream.cli"]


def simulated_frames(config: SimulationConfig, n_frames: int) -> np.ndarray:
    """The first n_frames frames of a simulated scan, (n, 576, 576) uint16, rendered 32 at a time
    into one array (batches of <= 32 frames avoid fresh-memory page faults, see the simulator)."""
    sim = DetectorSimulator(config)
    frames = np.empty((n_frames, 576, 576), np.uint16)
    for start in range(0, n_frames, 32):
        count = min(32, n_frames - start)
        sim.batch(start, count, out=frames[start : start + count])
    return frames


def free_port_block(size: int) -> int:
    """A base port with ``size`` consecutive ports after it free on 127.0.0.1 (checked by binding
    each), for a pipeline config that must not collide with other runs on the machine."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + size >= 65000:
            continue
        taken = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                taken.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in taken:
                s.close()
    raise RuntimeError(f"no block of {size} free ports on 127.0.0.1")
