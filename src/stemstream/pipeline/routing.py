"""What the writer has committed, as block ranges (which node group counts a block is the scan
spec's: core.scan_spec.ScanSpec.route).

Commits travel as sorted, disjoint half-open ranges of block numbers ``[[start, stop], ...]``.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator


def to_ranges(blocks: Iterable[int]) -> list[list[int]]:
    """Sorted block numbers as disjoint half-open ranges."""
    ranges: list[list[int]] = []
    for b in sorted(set(blocks)):
        if ranges and ranges[-1][1] == b:
            ranges[-1][1] = b + 1
        else:
            ranges.append([b, b + 1])
    return ranges


class BlockRanges:
    """A set of block numbers held as its sorted, disjoint half-open ranges.

    The writer's committed blocks: adding one and listing the ranges cost what the ranges
    number (one, while commits come in order), not what the blocks do. A set sorted into ranges
    at every commit report (every 0.1 s) cost 7 ms at the 32,768 blocks of a 1024 x 1024 scan.
    """

    def __init__(self, blocks: Iterable[int] = ()) -> None:
        self._starts: list[int] = []
        self._stops: list[int] = []
        self._count = 0
        for block in blocks:
            self.add(block)

    def add(self, block: int) -> bool:
        """Add ``block``; False when it was there already."""
        i = bisect_right(self._starts, block) - 1  # the range starting at or before ``block``
        if i >= 0 and block < self._stops[i]:
            return False
        self._count += 1
        joins_left = i >= 0 and self._stops[i] == block
        joins_right = i + 1 < len(self._starts) and self._starts[i + 1] == block + 1
        if joins_left and joins_right:  # fills the gap between two ranges
            self._stops[i] = self._stops[i + 1]
            del self._starts[i + 1], self._stops[i + 1]
        elif joins_left:
            self._stops[i] = block + 1
        elif joins_right:
            self._starts[i + 1] = block
        else:
            self._starts.insert(i + 1, block)
            self._stops.insert(i + 1, block + 1)
        return True

    def __contains__(self, block: int) -> bool:
        i = bisect_right(self._starts, block) - 1
        return i >= 0 and block < self._stops[i]

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        for start, stop in zip(self._starts, self._stops):
            yield from range(start, stop)

    def ranges(self) -> list[list[int]]:
        """``[[start, stop], ...]``, as ``to_ranges`` gives them."""
        return [[start, stop] for start, stop in zip(self._starts, self._stops)]


def in_ranges(ranges: list[list[int]], block: int) -> bool:
    """True when ``block`` lies in one of the sorted half-open ``ranges``."""
    i = bisect_right(ranges, [block, float("inf")]) - 1
    return i >= 0 and ranges[i][0] <= block < ranges[i][1]
