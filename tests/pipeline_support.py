"""Helpers for the pipeline tests: a config on free loopback ports, and reading results back."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from stemstream.core.config import PipelineConfig
from stemstream.transport.ports import free_port_block
from stemstream.formats.sparse_h5 import read_counted


def test_config(tmp_path: Path, nodes: int = 2, gateway: bool = True, fixed: bool = True,
                shared_memory: bool = False) -> PipelineConfig:
    """Every role on 127.0.0.1, fresh ports, short timeouts, output and spill under tmp_path;
    blocks through the sockets, or through shared memory."""
    config = PipelineConfig()
    base = free_port_block(8 + 4 * nodes)
    net = config.network
    net.bind_host = "127.0.0.1"
    net.control_port, net.writer_port, net.gateway_port, net.node_base_port = base, base + 1, base + 2, base + 8
    net.live_port = base + 6
    config.pipeline.nodes = nodes
    config.pipeline.gateway = gateway
    config.pipeline.output_dir = str(tmp_path / "out")
    config.pipeline.spill_dir = str(tmp_path / "spill")
    config.pipeline.state_file = str(tmp_path / "control.state")  # never another test's scans
    if fixed:
        config.counting.background_threshold = 28.0
        config.counting.xray_threshold = 1000.0
    config.flow.end_timeout_s = 2.0
    config.flow.scan_timeout_s = 30.0
    config.flow.backpressure_timeout_s = 1.0
    config.flow.heartbeat_s = 0.2
    config.network.shared_memory = shared_memory
    return config.validate()


test_config.__test__ = False  # a helper, not a test


def frames_by_slot(path: str | Path) -> np.ndarray:
    """The counted file's frames as a flat object array, one entry per slot."""
    return read_counted(path).frames.reshape(-1)


def assert_same_events(a: str | Path, b: str | Path) -> None:
    fa, fb = frames_by_slot(a), frames_by_slot(b)
    assert len(fa) == len(fb)
    different = [i for i in range(len(fa)) if not np.array_equal(fa[i], fb[i])]
    assert not different, f"{len(different)} slots differ, first {different[:5]}"


def frames_counted(pipeline) -> int:
    """Frames the node groups have counted so far, from their heartbeats."""
    roles = pipeline.status()["roles"]
    return sum(r["stats"]["counters"].get("frames_counted", 0) for k, r in roles.items() if k.startswith("node"))


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.05):
    """Poll ``condition()`` until it returns something true (returned), failing the test with
    ``what`` after ``timeout_s``: the bounded wait tests use instead of sleeping."""
    t0 = time.monotonic()
    while not (result := condition()):
        assert time.monotonic() - t0 < timeout_s, f"{what} within {timeout_s} s"
        time.sleep(poll_s)
    return result


def wait_until_counted(pipeline, n: int, timeout_s: float = 60) -> None:
    t0 = time.monotonic()
    while frames_counted(pipeline) < n:
        assert time.monotonic() - t0 < timeout_s, f"fewer than {n} frames counted in {timeout_s} s"
        time.sleep(0.05)


def wait_until_closed(pipeline, scan: int, timeout_s: float = 90) -> dict:
    """Wait for the writer to close (or fail) ``scan``; its summary."""
    t0 = time.monotonic()
    while (state := pipeline.status()["scans"][str(scan)])["state"] == "running":
        assert time.monotonic() - t0 < timeout_s, f"scan {scan} did not end within {timeout_s} s"
        time.sleep(0.1)
    return state["summary"]


class InProcessControl:
    """Stands in for a role's ControlClient: requests answered by an in-process Control."""

    def __init__(self, control):
        self.control = control

    def request(self, op: str, timeout_s: float | None = None, **fields) -> dict:
        return self.control.handle({"op": op, **fields})

    def close(self) -> None:
        pass
