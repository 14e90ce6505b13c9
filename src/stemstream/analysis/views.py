"""What an analysis shows: :class:`View`, a 2-D image and how to colour it, and the PNG files made
of views (the writer's and ``stemstream analyze``'s ``<stem>_<analysis>_<result>.png``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from stemstream.formats.png import SCALE_KINDS, image_png

#: How a view may be coloured (see stemstream.formats.png.scale_image).
VIEW_KINDS = SCALE_KINDS


@dataclass(frozen=True)
class View:
    """A 2-D image to render and how to scale it: 'sequential' (grey, percentile clipped),
    'diverging' (blue-white-red about the median) or 'log' (grey, log scale)."""

    image: np.ndarray
    kind: str = "sequential"

    def __post_init__(self) -> None:
        if self.kind not in VIEW_KINDS:
            raise ValueError(f"view kind must be one of {VIEW_KINDS}, got {self.kind!r}")
        if np.ndim(self.image) != 2:
            raise ValueError(f"a view must be a 2-D image, got shape {np.shape(self.image)}")


class Shows(Protocol):
    """What :func:`write_pngs` needs of an analysis (stemstream.analysis.interface.Analysis has it)."""

    name: str

    def show(self, results: Mapping[str, np.ndarray]) -> dict[str, View]: ...


def render_png(array: np.ndarray, path: str | os.PathLike, kind: str = "sequential") -> Path:
    """Write a 2-D array as a PNG (stemstream.formats.png.image_png: colour-scaled, small images
    enlarged to 256 pixels on the longer side, large ones shrunk to 1024). The file appears
    atomically. Returns the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(image_png(array, kind))
    os.replace(tmp, path)
    return path


def write_pngs(
    analyses: Iterable[Shows],
    results: Mapping[str, Mapping[str, np.ndarray]],
    out_dir: str | os.PathLike,
    stem: str,
) -> list[Path]:
    """Render what each analysis shows as ``out_dir/<stem>_<analysis>_<name>.png``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for a in analyses:
        for key, view in a.show(results[a.name]).items():
            paths.append(render_png(view.image, out_dir / f"{stem}_{a.name}_{key}.png", view.kind))
    return paths
