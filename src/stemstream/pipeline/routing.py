"""What the writer has committed, as block ranges (which node group counts a block is the scan
spec's: core.scan_spec.ScanSpec.route).

Commits travel as sorted, disjoint half-open ranges of block numbers ``[[start, stop], ...]``.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable


def to_ranges(blocks: Iterable[int]) -> list[list[int]]:
    """Sorted block numbers as disjoint half-open ranges."""
    ranges: list[list[int]] = []
    for b in sorted(set(blocks)):
        if ranges and ranges[-1][1] == b:
            ranges[-1][1] = b + 1
        else:
            ranges.append([b, b + 1])
    return ranges


def in_ranges(ranges: list[list[int]], block: int) -> bool:
    """True when ``block`` lies in one of the sorted half-open ``ranges``."""
    i = bisect_right(ranges, [block, float("inf")]) - 1
    return i >= 0 and ranges[i][0] <= block < ranges[i][1]
