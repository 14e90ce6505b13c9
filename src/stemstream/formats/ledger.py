"""The per-scan frame ledger: every frame and every sector accounted for (docs/architecture.md, rule 1).

A frame is *complete* when all 4 sectors arrived, *incomplete* when some did (the missing stripes
are zero-filled, the frame is still counted), *missing* when no sector of it arrived. Sector
records that could not be used are *rejected* with a reason; a second copy of a sector already
received is a *duplicate*.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from stemstream.core.detector import N_MODULES


SECTOR_COUNTS = ("sectors_received", "sectors_missing", "sectors_duplicate", "sectors_rejected")


def _per_module() -> list[int]:
    return [0] * N_MODULES


def sector_tally() -> dict:
    """A node group's sector counts of one routing block (sent with the block's events, so the
    writer adds them when it commits the block: exact however often the block was resent) or of
    what no block carried (sent at the end of the scan): SECTOR_COUNTS per module, rejection
    reasons, frames spilled."""
    return {**{name: _per_module() for name in SECTOR_COUNTS}, "rejected_reasons": {}, "frames_spilled": 0}


@dataclass
class ScanLedger:
    """Counts for one scan. scan_shape is (rows, cols) of scan positions."""

    scan_number: int
    scan_shape: tuple[int, int]
    frames_per_position: int = 1
    frames_complete: int = 0
    frames_incomplete: int = 0
    frames_over_capacity: int = 0  # frames at a position that already held frames_per_position
    sectors_received: list[int] = field(default_factory=_per_module)
    sectors_missing: list[int] = field(default_factory=_per_module)  # in frames that were received
    sectors_duplicate: list[int] = field(default_factory=_per_module)
    sectors_rejected: list[int] = field(default_factory=_per_module)
    rejected_reasons: Counter = field(default_factory=Counter)
    # module -> routing blocks holding frames without its sectors (for a producer that was dead
    # then: it spills them for a replay); not carried over by merge or from_dict
    blocks_lacking: dict[int, set[int]] = field(default_factory=dict)

    @property
    def frames_expected(self) -> int:
        rows, cols = self.scan_shape
        return rows * cols * self.frames_per_position

    @property
    def frames_received(self) -> int:
        """Frames of which at least one sector arrived and that were written."""
        return self.frames_complete + self.frames_incomplete

    @property
    def frames_missing(self) -> int:
        """Expected frames of which nothing was written."""
        return max(self.frames_expected - self.frames_received, 0)

    @property
    def all_accounted(self) -> bool:
        """True when every expected frame arrived complete and nothing was rejected or dropped."""
        return (
            self.frames_complete == self.frames_expected
            and self.frames_incomplete == 0
            and self.frames_over_capacity == 0
            and sum(self.sectors_rejected) == 0
        )

    def reject(self, reason: str, module: int | None = None, count: int = 1) -> None:
        """Count ``count`` sector records rejected for ``reason`` (a short snake_case phrase)."""
        self.rejected_reasons[reason] += count
        if module is not None and 0 <= module < N_MODULES:
            self.sectors_rejected[module] += count

    def add_sector_tally(self, tally: dict, block: int = -1) -> None:
        """Add a node group's sector counts (see sector_tally; missing keys count as zero), those
        of routing block ``block`` if it is one (>= 0)."""
        for name in SECTOR_COUNTS:
            theirs = tally.get(name)
            if theirs:  # (once per block: kept to one list comprehension)
                setattr(self, name, [a + int(b) for a, b in zip(getattr(self, name), theirs)])
        missing = tally.get("sectors_missing")
        if block >= 0 and missing and any(missing):
            for module in (m for m, n in enumerate(missing) if n):
                self.blocks_lacking.setdefault(module, set()).add(block)
        reasons = tally.get("rejected_reasons")
        if reasons:
            self.rejected_reasons.update({str(k): int(v) for k, v in reasons.items()})

    def merge(self, other: ScanLedger) -> None:
        """Add another partial ledger of the same scan (e.g. from another node group)."""
        self.frames_complete += other.frames_complete
        self.frames_incomplete += other.frames_incomplete
        self.frames_over_capacity += other.frames_over_capacity
        for name in SECTOR_COUNTS:
            mine, theirs = getattr(self, name), getattr(other, name)
            for m in range(N_MODULES):
                mine[m] += theirs[m]
        self.rejected_reasons.update(other.rejected_reasons)

    def as_dict(self) -> dict:
        """Flat, JSON- and HDF5-attribute-friendly form (lists of ints, no nested objects but
        the rejection reasons)."""
        return {
            "scan_number": self.scan_number,
            "scan_rows": self.scan_shape[0],
            "scan_cols": self.scan_shape[1],
            "frames_per_position": self.frames_per_position,
            "frames_expected": self.frames_expected,
            "frames_received": self.frames_received,
            "frames_complete": self.frames_complete,
            "frames_incomplete": self.frames_incomplete,
            "frames_missing": self.frames_missing,
            "frames_over_capacity": self.frames_over_capacity,
            "sectors_received": list(self.sectors_received),
            "sectors_missing": list(self.sectors_missing),
            "sectors_duplicate": list(self.sectors_duplicate),
            "sectors_rejected": list(self.sectors_rejected),
            "rejected_reasons": dict(self.rejected_reasons),
            **({"blocks_lacking": {str(m): sorted(b) for m, b in sorted(self.blocks_lacking.items())}}
               if self.blocks_lacking else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ScanLedger:
        ledger = cls(
            scan_number=int(d["scan_number"]),
            scan_shape=(int(d["scan_rows"]), int(d["scan_cols"])),
            frames_per_position=int(d["frames_per_position"]),
            frames_complete=int(d["frames_complete"]),
            frames_incomplete=int(d["frames_incomplete"]),
            frames_over_capacity=int(d.get("frames_over_capacity", 0)),
        )
        for name in SECTOR_COUNTS:
            setattr(ledger, name, [int(v) for v in d[name]])
        ledger.rejected_reasons = Counter({str(k): int(v) for k, v in dict(d.get("rejected_reasons", {})).items()})
        return ledger
