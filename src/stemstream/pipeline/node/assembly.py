"""One scan as one node group sees it: frames reassembled from the 4 modules' sectors, counted, and
their events sent on. No sockets: a :class:`NodeScan` reaches the outside only through the
:class:`NodePorts` it is given (pipeline.node.role gives the node group's; tests give lists).

Sectors arrive in routing blocks (``block_frames`` consecutive frame numbers, one message per
module and block). A block the spec does not route to this node group's stream (past the scan's
frames, or another's) is refused and counted. Each module's stream is in block order, so a block
is *settled* once, for every module, its part arrived, or a later block of that module arrived,
or the module is *closed*: its END came and every block the spec routes here (core.scan_spec:
ScanSpec.blocks_of) came from it, was counted, spilled or committed (the writer has it from an
earlier routing generation). An END cannot close a module ahead of its blocks, so a forged one
settles nothing; a block a module never sends (the simulator sends every one, with no record when
all were dropped; a replayed file may lack one) keeps it open until its producer is gone or
``scan_timeout_s``. A resumed scan (a replay of a spill) brings only what was spilled: its ENDs
close at once. A settled block with all parts is counted; one with absent parts is counted with
those sectors zero-filled (incomplete frames), unless the producer said it spilled that part (the
next message of that module lists the blocks it spilled): then the parts present are spilled
too, in the receivers' format, so that a replay of the spill directory counts those frames whole
(so is a block counted while a module's producer was silent: see _give_up).

A stream finishes when every module is closed. After an END, the others are waited for only
``end_timeout_s`` when control stopped hearing from their producers: a live producer's blocks may
sit behind a dead node group's queue (at a gateway) until its failover supersedes this stream,
and finishing before would commit those frames incomplete. ``scan_timeout_s`` of silence ends any wait.

A NodeScan is one stream: one (scan, routing generation) (see core.scan_spec). Every finished
block, even one with no frame or one spilled, is reported to the writer with its block number,
and an ANALYSIS message follows the events at least every ``_PARTIALS_INTERVAL_S``: the writer
commits a stream's events when their partials arrive, so what a node group that dies had in
flight is either wholly committed or wholly resent.

Until the scan's spec carries thresholds, the first complete blocks are sampled into a pixel
histogram; it goes to control once this node group's share of the calibration frames is met (or
the scan ended), and counting starts when a spec with thresholds is visible. The cluster method
then calibrates its single-electron model from this node group's first complete frames, its own.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stemstream.analysis import Analysis, ScanAnalyses
from stemstream.core.config import FlowSettings
from stemstream.core.detector import MODULES, N_MODULES
from stemstream.core.scan_spec import ScanSpec
from stemstream.counting.cluster_counter import ClusterCalibrationError, ClusterCounter
from stemstream.counting.kernel import ElectronCounter
from stemstream.counting.sectors import count_from_sectors
from stemstream.formats import wire
from stemstream.formats.ledger import sector_tally
from stemstream.pipeline.routing import in_ranges
from stemstream.pipeline.node.blocks import Block, IndexedBlock
from stemstream.pipeline.node.calibration import StreamCalibration
from stemstream.pipeline.spill import LateParts, SpillFiles

log = logging.getLogger(__name__)

# How often a node group sends its analyses' partial results to the writer: live images, and the
# writer's commit point (producers free their resend buffers once blocks are committed).
_PARTIALS_INTERVAL_S = 0.2
# Positions whose analysis partials a node group holds between two sends (~3 MB with the default
# analyses); a block far from them sends them first (ScanAnalyses.fits).
PARTIALS_WINDOW = 65536


@dataclass(frozen=True)
class NodePorts:
    """All a NodeScan uses of the node group that holds it: plain values, and callables for what
    goes out and for the newest spec control gave."""

    index: int  # this node group
    flow: FlowSettings  # end_timeout_s, scan_timeout_s
    analyses: list[Analysis]  # what every scan runs on its counted frames
    spill_dir: str | Path  # [pipeline] spill_dir
    counters: Counter  # the node group's counters: frames_counted, events
    send: Callable[[list], None]  # an EVENTS, ANALYSIS or DONE message (its parts) to the writer
    send_calibration: Callable[[int, dict], None]  # (scan, PixelHistogram.to_wire()) to control
    latest_spec: Callable[[int], ScanSpec | None]  # a scan's newest spec from control's heartbeat replies
    reject: Callable[[str, str], None]  # (reason, detail): count and log a rejected message
    keepalive: Callable[[], None]  # heartbeat if due: a long backlog must not look like a dead node group
    producer_dead: Callable[[int], bool]  # module -> control has stopped hearing from its producer
    committed: Callable[[int], list]  # a scan's block ranges the writer has committed (routing.to_ranges)
    clock: Callable[[], float] = time.monotonic
    method: str = "maxima"  # [counting] method: "maxima" or "clusters" (docs/counting.md)


class NodeScan:
    """One stream (scan, routing generation) as seen by one node group."""

    def __init__(self, ports: NodePorts, spec: ScanSpec, stream: int = 0):
        self.ports = ports
        self.spec = spec
        self.stream = stream
        self.number = spec.number
        self.rows, self.cols = spec.shape
        self.block_frames = spec.block_frames
        self._uncommitted = False  # events sent that no ANALYSIS message followed yet
        self.pending: dict[int, Block] = {}
        self.done_blocks: set[int] = set()
        self.ends: dict[int, wire.EndMessage] = {}
        self.first_end_at: float | None = None
        self.last_activity = ports.clock()
        self.finished = False
        # Sector counts over the whole scan (this node group's view); the writer's ledger gets
        # them per block instead (see stemstream.formats.ledger.sector_tally), plus what no block carried.
        self.unblocked = sector_tally()
        self.sectors_received = [0] * N_MODULES
        self.sectors_missing = [0] * N_MODULES
        self.sectors_duplicate = [0] * N_MODULES
        self.sectors_rejected = [0] * N_MODULES
        self.rejected_reasons: Counter = Counter()
        self.highest_block = [-1] * N_MODULES  # highest block received per module
        self._routed: set[int] | None = None
        self.arrived: list[set[int]] = [set() for _ in MODULES]  # blocks received per module
        self.owed: dict[int, set[int]] = {}  # module that sent END -> blocks routed here still to come from it
        self._owed_acks: list | None = None  # the commits the owed blocks were last checked against
        self.spilled_parts: set[tuple[int, int]] = set()  # (block, module) a producer spilled
        self.given_up: set[tuple[int, int]] = set()  # (block, module) counted without, its producer silent
        self.frames_spilled: dict[int, int] = {}  # block given up on -> its frames spilled, until its events go
        self._spill = SpillFiles(ports.spill_dir, self.number, dst=100 + ports.index)
        self.calibration = StreamCalibration(spec, ports.index, ports.method)
        # the positions of the partials not yet sent, at most PARTIALS_WINDOW: memory flat in the scan's size
        self.live = ScanAnalyses(ports.analyses, (self.rows, self.cols), window=PARTIALS_WINDOW)
        self._next_partials = 0.0

    # -- thresholds --------------------------------------------------------------------------------

    @property
    def counter(self) -> ElectronCounter | ClusterCounter | None:
        """What counts the stream's frames, once calibrated (pipeline.node.calibration)."""
        return self.calibration.counter

    @property
    def awaiting_thresholds(self) -> bool:
        """True once this node group sent its histogram, until control's thresholds came."""
        return self.calibration.awaiting_thresholds

    @property
    def waiting_for_thresholds(self) -> bool:
        return self.counter is None

    def _calibrate(self, final: bool) -> bool:
        """Calibrate from the pending blocks (thresholds through control, whose spec brings them
        in a heartbeat reply: the node group heartbeats often meanwhile, see NodeGroup.run; then
        the cluster method's model). True once counting can start; a model that cannot be
        fitted fails this node group's stream."""
        try:
            return self.calibration.step(
                sorted(self.pending.items()), lambda n, b: self._index(n, b, count_ledger=False), self._settled,
                final, self.complete_pending() >= self.ports.flow.max_pending_blocks,
                lambda histogram: self.ports.send_calibration(self.number, histogram),
                lambda: self.ports.latest_spec(self.number))
        except ClusterCalibrationError as exc:
            log.error("scan %d: %s; node group %d cannot count its frames", self.number, exc, self.ports.index)
            self._finish(failed=True)
            return False

    # -- input -------------------------------------------------------------------------------------

    def _block_problem(self, blocks: list[int]) -> str | None:
        """Why a message naming ``blocks`` cannot be for this node group's stream (None: it can)."""
        problems = (self.spec.block_problem(block, self.ports.index) for block in blocks)
        return next((problem for problem in problems if problem is not None), None)

    def add_sectors(self, msg: wire.SectorsMessage) -> None:
        problem = self._block_problem([msg.block, *msg.spilled])
        if problem is not None:
            self._reject(problem, msg.module, len(msg.records), detail=f"block {msg.block}")
            return
        self.last_activity = self.ports.clock()
        self.spilled_parts.update((b, msg.module) for b in msg.spilled)
        self.highest_block[msg.module] = max(self.highest_block[msg.module], msg.block)
        self.arrived[msg.module].add(msg.block)
        self.owed.get(msg.module, set()).discard(msg.block)
        if msg.block in self.done_blocks:  # late: spilled beside the other parts if the block was given up on
            if (msg.block, msg.module) in self.given_up:
                self._spill.write({msg.module: [msg.records]})
            else:
                self._reject("late_sector", msg.module, len(msg.records))
            return
        block = self.pending.setdefault(msg.block, Block())
        block.parts.setdefault(msg.module, []).append(msg.records)

    def add_end(self, msg: wire.EndMessage) -> None:
        problem = self._block_problem(msg.spilled_blocks)
        if problem is not None:
            self._reject(problem, msg.module, 0, detail=f"END of module {msg.module}")
            return
        self.last_activity = self.ports.clock()
        self.spilled_parts.update((b, msg.module) for b in msg.spilled_blocks)
        self.ends[msg.module] = msg  # the last one counts: a module's real END follows its blocks
        self.owed[msg.module] = self._owed_by(msg.module)
        if self.first_end_at is None:
            self.first_end_at = self.last_activity

    def _owed_by(self, module: int) -> set[int]:
        """The blocks routed here that ``module`` has not sent nor spilled, and that are neither
        counted nor committed."""
        if self.spec.resume:  # a replay of a spill: only what was spilled comes
            return set()
        if self._routed is None:  # the blocks the spec routes to this stream, once
            self._routed = set(self.spec.blocks_of(self.ports.index).tolist())
        spilled = {b for b, m in self.spilled_parts if m == module}
        owed = self._routed - self.arrived[module] - self.done_blocks - spilled
        ranges = self.ports.committed(self.number)
        return {b for b in owed if not in_ranges(ranges, b)}

    def _closed(self, module: int) -> bool:
        """True once ``module`` sent END and nothing routed here is still owed by it."""
        return module in self.ends and not self.owed[module]

    def _settle_owed(self) -> None:
        """Forget owed blocks the writer has committed meanwhile (resent after a failover, a
        producer skips those it saw committed; the commits reach this node group a heartbeat later)."""
        if not any(self.owed.values()):
            return
        ranges = self.ports.committed(self.number)
        if ranges == self._owed_acks:
            return
        self._owed_acks = [list(r) for r in ranges]
        for owed in self.owed.values():
            owed.difference_update([b for b in owed if in_ranges(ranges, b)])

    def _reject(self, reason: str, module: int | None, count: int = 1, tally: dict | None = None,
                detail: str = "") -> None:
        """Count a rejected message and its ``count`` records: the records in the scan's totals,
        and in ``tally`` (the block's counts that go with its events), else in the counts the DONE
        message carries."""
        self.ports.reject(reason, f"scan {self.number}, {count} record(s)" + (f", {detail}" if detail else ""))
        if not count:
            return
        self.rejected_reasons[reason] += count
        tally = self.unblocked if tally is None else tally
        tally["rejected_reasons"][reason] = tally["rejected_reasons"].get(reason, 0) + count
        if module is not None:
            self.sectors_rejected[module] += count
            tally["sectors_rejected"][module] += count

    # -- assembly and counting ---------------------------------------------------------------------

    def _accept(self, module: int, records: np.ndarray, first: int, tally: dict | None) -> np.ndarray:
        """The records of one module's part that belong to this block, first copy of each frame;
        with a ``tally``, the others counted (rejected with a reason, or duplicate)."""
        h = records["header"]
        checks = (
            ("other_scan_number", h["scan_number"] != self.number),
            ("scan_shape_mismatch", (h["scan_width"] != self.cols) | (h["scan_height"] != self.rows)),
            ("position_out_of_bounds", (h["x"] >= self.cols) | (h["y"] >= self.rows)),
            ("wrong_block", (h["frame_number"] < first) | (h["frame_number"] >= first + self.block_frames)),
        )
        bad = np.zeros(len(records), bool)
        for reason, mask in checks:
            mask = mask & ~bad
            if tally is not None and mask.any():
                self._reject(reason, module, int(mask.sum()), tally)
            bad |= mask
        good = np.flatnonzero(~bad)
        _, first_idx = np.unique(h["frame_number"][good], return_index=True)
        if tally is not None:
            duplicates = len(good) - len(first_idx)
            self.sectors_duplicate[module] += duplicates
            tally["sectors_duplicate"][module] += duplicates
            self.sectors_received[module] += len(first_idx)
            tally["sectors_received"][module] += len(first_idx)
        good = good[np.sort(first_idx)]
        # a copy only when records were dropped; otherwise the received buffer itself
        return records if len(good) == len(records) else records[good]

    def _index(self, number: int, block: Block, count_ledger: bool = True) -> IndexedBlock:
        """Check a block's records (bad ones rejected, duplicates dropped) and index its frames;
        with ``count_ledger``, count its sectors (totals and the block's own tally)."""
        first = number * self.block_frames
        tally = sector_tally() if count_ledger else None
        buffers: list = [None] * N_MODULES
        for module, arrays in block.parts.items():
            records = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
            buffers[module] = self._accept(module, records, first, tally)
        numbers = [b["header"]["frame_number"] for b in buffers if b is not None]
        all_numbers = np.unique(np.concatenate(numbers)) if numbers else np.empty(0, np.uint32)
        n = len(all_numbers)
        index = np.full((n, N_MODULES), -1, np.int64)
        present = np.zeros(n, np.uint8)
        positions = np.full(n, -1, np.int64)
        for module, records in enumerate(buffers):
            if records is None:
                continue
            h = records["header"]
            idx = np.searchsorted(all_numbers, h["frame_number"])
            index[idx, module] = np.arange(len(records))
            present[idx] |= np.uint8(1 << module)
            pos = h["y"].astype(np.int64) * self.cols + h["x"]
            unset = positions[idx] < 0
            positions[idx[unset]] = pos[unset]
        if count_ledger:
            for module in MODULES:
                missing = int((index[:, module] < 0).sum())
                self.sectors_missing[module] += missing
                tally["sectors_missing"][module] += missing
        return IndexedBlock(all_numbers.astype(np.uint32), positions, present, buffers, index, tally)

    def _send_events(self, number: int, frame_numbers, positions, present, offsets, events, tally: dict,
                     subpixel: np.ndarray | None = None) -> None:
        tally["frames_spilled"] += self.frames_spilled.pop(number, 0)  # (counted, and spilled by _give_up)
        self.ports.send(wire.encode_events(self.number, self.ports.index, frame_numbers, positions, present,
                                           offsets, events, block=number, stream=self.stream, ledger=tally,
                                           subpixel=subpixel, counting=self._counting()))
        self._uncommitted = True

    def _counting(self) -> dict:
        """How this stream counts, as its EVENTS and DONE messages say (pipeline.writer.counting;
        the cluster method's model once calibrated)."""
        model = self.counter.model.attributes() if isinstance(self.counter, ClusterCounter) else None
        return {"method": self.ports.method, "model": model}

    def _send_empty(self, number: int, tally: dict) -> None:
        """Tell the writer a block is finished without frames to write (spilled, or none came)."""
        empty = np.empty(0, np.uint32)
        self._send_events(number, empty, np.empty(0, np.int64), np.empty(0, np.uint8), np.zeros(1, np.int64), empty,
                          tally)

    def _done(self, number: int) -> None:
        self.done_blocks.add(number)
        for owed in self.owed.values():
            owed.discard(number)

    def _count_block(self, number: int, block: Block) -> None:
        assembled = self._index(number, block)
        self._done(number)
        if len(assembled.frame_numbers) == 0:
            self._send_empty(number, assembled.tally)
            return
        subpixel = None  # the maxima method's events are pixels: no sub-pixel positions go
        if isinstance(self.counter, ClusterCounter):  # clusters cross sectors: it assembles each frame
            counted = self.counter.count_sectors(assembled.buffers, assembled.records)
            subpixel = counted.positions
        else:  # counted where the sectors were received: no frame is assembled
            counted = count_from_sectors(self.counter, assembled.buffers, assembled.records)
        if not self.live.fits(assembled.positions):  # far from the pending partials: send those first
            self._send_partials()
        self._send_events(number, assembled.frame_numbers, assembled.positions, assembled.present,
                          counted.offsets, counted.events, assembled.tally, subpixel)
        self.live.accumulate(assembled.positions, counted.events, counted.offsets, subpixel)
        self.ports.counters["frames_counted"] += len(assembled.frame_numbers)
        self.ports.counters["events"] += len(counted.events)

    def _spill_block(self, number: int, block: Block) -> None:
        """Write a block a producer spilled part of to the spill directory (receivers' format)."""
        frames = self._spill.write(block.parts)
        self._done(number)
        tally = sector_tally()
        tally["frames_spilled"] = len(frames)
        self._send_empty(number, tally)

    def _give_up(self, number: int, block: Block) -> None:
        """A block counted without modules that may yet send it (their producer silent): its parts
        are spilled too, and theirs if they come, so that a replay completes its frames (counted
        in the ledger's frames_spilled with the block's events)."""
        lacking = self._lacking(number, block)
        if lacking:
            self.given_up.update((number, m) for m in lacking)
            self.frames_spilled[number] = len(self._spill.write(block.parts))

    # -- progress ----------------------------------------------------------------------------------

    def _lacking(self, number: int, block: Block) -> list[int]:
        """The modules that may yet send a part of block ``number`` in this stream."""
        return [m for m in MODULES if m not in block.parts and self.highest_block[m] <= number and not self._closed(m)]

    def _settled(self, number: int, block: Block) -> bool:
        return not self._lacking(number, block)

    def oldest_unsettled(self) -> tuple[list[int], list[int]] | None:
        """(modules it holds, modules it lacks) of the oldest block still waiting for parts that
        may come; None when no block waits so."""
        waiting = [n for n, b in self.pending.items() if not self._settled(n, b)]
        if not waiting:
            return None
        parts = self.pending[min(waiting)].parts
        return [m for m in MODULES if m in parts], [m for m in MODULES if m not in parts]

    def _ready(self, final: bool, give_up_oldest: bool) -> list[int]:
        if final:
            return sorted(self.pending)
        ready = sorted(n for n, b in self.pending.items() if self._settled(n, b))
        waiting = [n for n in self.pending if n not in ready]
        if give_up_oldest and waiting:
            ready.append(min(waiting))
        return ready

    def complete_pending(self) -> int:
        """Blocks with every module in that wait (for thresholds)."""
        return sum(1 for b in self.pending.values() if b.modules == N_MODULES)

    def waiting_with(self, module: int) -> int:
        """Incomplete blocks that already hold this module's part."""
        return sum(1 for b in self.pending.values() if module in b.parts and b.modules < N_MODULES)

    @property
    def ended(self) -> bool:
        """Every module closed: all of the stream is in."""
        return all(self._closed(m) for m in MODULES)

    def timed_out(self) -> bool:
        """Silence for ``scan_timeout_s``; or, after an END, for ``end_timeout_s`` when every
        module not closed has a producer control stopped hearing from. A live producer's module
        is waited for: its blocks may be held up behind a dead node group's queue, and its
        failover resends them (superseding this stream) only after ``dead_after_s``."""
        flow, idle = self.ports.flow, self.ports.clock() - self.last_activity
        if idle > flow.scan_timeout_s or self.first_end_at is None or idle <= flow.end_timeout_s:
            return idle > flow.scan_timeout_s
        return all(self.ports.producer_dead(m) for m in MODULES if not self._closed(m))

    def step(self, give_up_oldest: bool = False) -> None:
        """Count what can be counted; finish the scan when it ended or timed out. With
        ``give_up_oldest`` the oldest block still waiting for parts is counted as it stands (the
        node group decides when: see NodeGroup.give_up_waiting)."""
        self._settle_owed()
        final = self.ended or self.timed_out()
        if self.counter is None and not self._calibrate(final):
            if final and not self.finished and self.ports.clock() - self.last_activity > self.ports.flow.scan_timeout_s:
                log.error("scan %d: no thresholds from control; the scan's frames cannot be counted", self.number)
                self._finish(failed=True)
            return
        for number in self._ready(final, give_up_oldest):
            self.ports.keepalive()
            block = self.pending.pop(number)
            if any((number, m) in self.spilled_parts for m in MODULES if m not in block.parts):
                self._spill_block(number, block)
            else:
                self._give_up(number, block)
                self._count_block(number, block)
        now = self.ports.clock()
        if self._uncommitted and (now >= self._next_partials or (final and not self.pending)):
            # live images a few times a second, the writer's commit point; everything before DONE
            self._send_partials()
        if final and not self.pending:
            self._finish()

    def _send_partials(self) -> None:
        """The analyses' partials of the frames sent since the last ones: the writer commits the
        blocks sent before them when they arrive."""
        self.ports.send(wire.encode_analysis(self.number, self.ports.index, self.live.take_partials(),
                                             stream=self.stream))
        self._uncommitted = False
        self._next_partials = self.ports.clock() + _PARTIALS_INTERVAL_S

    def late_parts(self) -> LateParts | None:
        """What the node group keeps once this stream finished, for the parts of blocks it counted
        without them (None: none)."""
        return LateParts(self.given_up, self._spill) if self.given_up else None

    def _finish(self, failed: bool = False) -> None:
        self._spill.close()
        lost = [0] * N_MODULES
        for module, end in self.ends.items():
            lost[module] = max(end.sent - self.sectors_received[module] - self.sectors_rejected[module]
                               - self.sectors_duplicate[module], 0)
        ledger = {
            **self.unblocked,  # the blocks' own counts went with their events
            "modules_ended": sorted(self.ends),
            "sectors_spilled_by_producers": [self.ends[m].spilled if m in self.ends else 0 for m in MODULES],
            "failed": failed,
        }
        self.ports.send(wire.encode_done(self.number, self.ports.index, ledger, lost, stream=self.stream,
                                         counting=self._counting()))
        self.finished = True
        log.info("node %d finished scan %d (stream %d)", self.ports.index, self.number, self.stream)
