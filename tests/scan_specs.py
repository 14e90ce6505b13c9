"""Scan specs for unit tests, made as control makes them (one place, so tests never hand-write
a spec map)."""

from __future__ import annotations

from stemstream.core.scan_spec import CalibrationSettings, ScanSpec


def make_spec(number: int = 1, shape: tuple[int, int] = (4, 4), nodes: list[int] | None = None, **fields) -> ScanSpec:
    """A spec of scan ``number`` of ``shape`` (rows, cols) positions on node groups ``nodes``."""
    fields.setdefault("epoch", 1)
    fields.setdefault("frames_per_position", 1)
    fields.setdefault("block_frames", 32)
    fields.setdefault("file_name", f"FOURD_test_{number:05d}.h5")
    fields.setdefault("calibration", CalibrationSettings(sigma=4.0, xray_sigma=175.0, samples=1200, calibration_frames=640))
    return ScanSpec(number=number, shape=shape, nodes=list(nodes if nodes is not None else [0]), **fields)
