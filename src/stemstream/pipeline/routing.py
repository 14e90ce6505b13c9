"""Which node group counts a routing block, and what the writer has committed.

A scan's spec (made by control) names the node groups it uses (``nodes``, registered with control
when the scan started) and its routing *generation* (``generation``: 0 at the start, or one more
than the last run's when a scan number is used again). Block ``b``
belongs to ``nodes[b % len(nodes)]``. When a node group dies mid-scan (or the writer restarts),
control starts a new generation with the node groups still ``alive``: the writer drops whatever
it had not committed from earlier generations (it *fences* them), and the producers resend every
block the writer has not committed, and send every later block, in the new generation, to a
node group alive in it. Each (node group, generation, module) is one stream in block order, which
is what lets a node group tell a part that will still come from one that never will.

Commits travel as sorted, disjoint half-open ranges of block numbers ``[[start, stop], ...]``.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable


def scan_nodes(spec: dict) -> list[int]:
    """The node groups a scan was started with, in routing order."""
    return [int(n) for n in spec["nodes"]]


def generation(spec: dict) -> int:
    return int(spec.get("generation", 0))


def alive_nodes(spec: dict) -> list[int]:
    """The node groups of the scan's current generation (all of them until a failover)."""
    alive = spec.get("alive")
    return scan_nodes(spec) if alive is None else [int(n) for n in alive]


def route(spec: dict, block: int) -> tuple[int, int] | None:
    """(node group, stream) that counts ``block`` in the spec's current generation; None when no
    node group is left alive."""
    nodes = scan_nodes(spec)
    owner = nodes[block % len(nodes)]
    g = generation(spec)
    alive = alive_nodes(spec)
    if not alive:
        return None
    return (owner if owner in alive else alive[block % len(alive)]), g


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
