"""Where spilled records go: raw module files in the receivers' format, one directory per scan."""

from __future__ import annotations

from pathlib import Path


def spill_directory(spill_root: str | Path, scan_number: int) -> Path:
    """The directory holding a scan's spilled records (producers' and node groups')."""
    return Path(spill_root) / f"scan_{scan_number:05d}"
