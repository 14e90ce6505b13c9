"""Compiling the analyses' kernels before the first scan needs them."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from stemstream.analysis.interface import Analysis
from stemstream.analysis.scan import ScanAnalyses


def warm_up(analyses: Iterable[Analysis]) -> None:
    """Run every step once on a one-electron scan, so numba compiles (or loads its cache) before
    the first real batch, whose frames would otherwise wait seconds: call it when a node group or
    the writer starts."""
    analyses = list(analyses)
    node = ScanAnalyses(analyses, (1, 1))
    node.accumulate(np.zeros(1, np.int64), np.zeros(1, np.uint32), np.array([0, 1], np.int64))
    writer = ScanAnalyses(analyses, (1, 1))
    writer.merge_parts(node.take_partials())
    writer.views()
