"""One scan as one node group sees it: frames reassembled from the 4 modules' sectors, counted, and
their events sent on. No sockets: a :class:`NodeScan` reaches the outside only through the
:class:`NodePorts` it is given (pipeline.node.role gives the node group's; tests give lists).

Sectors arrive in routing blocks (``block_frames`` consecutive frame numbers, one message per
module and block). Each module's stream is in block order, so a block is *settled* once, for every
module, its part arrived, or a later block of that module arrived, or the module ended: a part
that is still absent then will never come. A settled block with all parts is counted; one with
absent parts is counted with those sectors zero-filled (incomplete frames), unless the producer
said it spilled that part to disk (the next message of that module lists the blocks it spilled):
then the parts present are spilled too, in the receivers' format, so that a later replay of the
spill directory reassembles and counts those frames whole.

A NodeScan is one stream: one (scan, routing generation) (see core.scan_spec). Every finished
block, even one with no frame or one spilled, is reported to the writer with its block number,
and an ANALYSIS message follows the events at least every ``_PARTIALS_INTERVAL_S``: the writer
commits a stream's events when their partials arrive, so what a node group that dies had in
flight is either wholly committed or wholly resent.

Until the scan's spec carries thresholds, the first complete blocks are sampled into a pixel
histogram; it goes to control once this node group's share of the calibration frames is met (or
the scan ended), and counting starts when a spec with thresholds is visible.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stemstream.analysis import Analysis, ScanAnalyses
from stemstream.core.config import FlowSettings
from stemstream.core.detector import FRAME_SHAPE, MODULES, N_MODULES, sector_rows
from stemstream.core.scan_spec import ScanSpec
from stemstream.core.thresholds import Thresholds
from stemstream.counting.kernel import ElectronCounter
from stemstream.counting.sectors import count_from_sectors
from stemstream.counting.thresholds import PixelHistogram, draw_sample_weights
from stemstream.formats import wire
from stemstream.formats.ledger import sector_tally
from stemstream.formats.raw import RawModuleWriter
from stemstream.pipeline.spill import spill_directory

log = logging.getLogger(__name__)

# How often a node group sends its analyses' partial results to the writer: live images, and the
# writer's commit point (producers free their resend buffers once blocks are committed).
_PARTIALS_INTERVAL_S = 0.2
ALL_MODULES = (1 << N_MODULES) - 1  # a frame's ``present`` mask when every sector arrived


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
    clock: Callable[[], float] = time.monotonic


@dataclass
class Block:
    parts: dict[int, list[np.ndarray]] = field(default_factory=dict)  # module -> record arrays

    @property
    def modules(self) -> int:
        return len(self.parts)


@dataclass
class IndexedBlock:
    """A block's frames as references into the received records, without copying pixels."""

    frame_numbers: np.ndarray  # (n,) uint32, ascending
    positions: np.ndarray  # (n,) int64
    present: np.ndarray  # (n,) uint8 bit mask of modules
    buffers: list  # module -> RECORD_DTYPE array of the records kept (or None)
    records: np.ndarray  # (n, 4) int64 index into buffers[module], -1 where the sector is missing
    tally: dict | None = None  # the block's sector counts (stemstream.formats.ledger.sector_tally), if counted

    def frames(self, out: np.ndarray) -> np.ndarray:
        """The frames assembled into ``out`` (at least n x 576 x 576 uint16); missing sectors zero."""
        frames = out[: len(self.frame_numbers)]
        for module in MODULES:
            rows = sector_rows(module)
            data = self.buffers[module]["data"] if self.buffers[module] is not None else None
            for i, k in enumerate(self.records[:, module].tolist()):
                frames[i, rows] = data[k] if k >= 0 else 0
        return frames


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
        self.spilled_parts: set[tuple[int, int]] = set()  # (block, module) a producer spilled
        self._spill_writers: dict[int, RawModuleWriter] = {}
        self._frames = np.empty((self.block_frames, *FRAME_SHAPE), np.uint16)  # calibration only
        self.counter: ElectronCounter | None = None
        self.live = ScanAnalyses(ports.analyses, (self.rows, self.cols))
        self._next_partials = 0.0
        self._calibration_sent = False
        self._histogram = PixelHistogram()
        n_nodes = len(spec.nodes)
        cal = spec.calibration
        self._quota = math.ceil(cal.calibration_frames / n_nodes)
        self._weights = draw_sample_weights(self._quota, math.ceil(cal.samples / n_nodes), seed=1000 + ports.index)
        self._sampled = 0
        self._sampled_blocks: set[int] = set()
        if spec.thresholds is not None:
            self._set_thresholds(spec.thresholds)

    # -- thresholds --------------------------------------------------------------------------------

    def _set_thresholds(self, thresholds: Thresholds) -> None:
        self.counter = ElectronCounter(thresholds.background, thresholds.xray, FRAME_SHAPE)

    def _take_thresholds(self) -> None:
        """Control's thresholds arrive in this scan's spec, in a heartbeat reply (the node group
        heartbeats often while a scan awaits them: see NodeGroup.run)."""
        spec = self.ports.latest_spec(self.number)
        if spec is not None and spec.epoch == self.spec.epoch and spec.thresholds is not None:
            self._set_thresholds(spec.thresholds)

    @property
    def awaiting_thresholds(self) -> bool:
        """True once this node group sent its histogram, until control's thresholds came."""
        return self.counter is None and self._calibration_sent

    @property
    def waiting_for_thresholds(self) -> bool:
        return self.counter is None

    def _sample_for_calibration(self, number: int, block: Block) -> None:
        indexed = self._index(number, block, count_ledger=False)
        frames = indexed.frames(self._frames)
        for i in np.flatnonzero(indexed.present == ALL_MODULES):
            if self._sampled >= self._quota:
                break
            w = int(self._weights[self._sampled])
            if w:
                self._histogram.add(frames[i], weight=w)
            self._sampled += 1
        self._sampled_blocks.add(number)

    def _calibrate(self, final: bool) -> bool:
        """Sample the first complete blocks, send the histogram once the quota is met (or the
        scan ended), then look for control's thresholds. True once they are here."""
        for number in sorted(self.pending):
            if self._sampled >= self._quota:
                break
            if number not in self._sampled_blocks and (self.pending[number].modules == N_MODULES or final):
                self._sample_for_calibration(number, self.pending[number])
        if not self._calibration_sent and (self._sampled >= self._quota or final):
            self.ports.send_calibration(self.number, self._histogram.to_wire())
            self._calibration_sent = True
        if self._calibration_sent:
            self._take_thresholds()
        return self.counter is not None

    # -- input -------------------------------------------------------------------------------------

    def add_sectors(self, msg: wire.SectorsMessage) -> None:
        self.last_activity = self.ports.clock()
        self.spilled_parts.update((b, msg.module) for b in msg.spilled)
        self.highest_block[msg.module] = max(self.highest_block[msg.module], msg.block)
        if msg.block in self.done_blocks:
            self._reject("late_sector", msg.module, len(msg.records))
            return
        block = self.pending.setdefault(msg.block, Block())
        block.parts.setdefault(msg.module, []).append(msg.records)

    def add_end(self, msg: wire.EndMessage) -> None:
        self.last_activity = self.ports.clock()
        self.spilled_parts.update((b, msg.module) for b in msg.spilled_blocks)
        self.ends[msg.module] = msg
        if self.first_end_at is None:
            self.first_end_at = self.last_activity

    def _reject(self, reason: str, module: int | None, count: int = 1, tally: dict | None = None) -> None:
        """Count rejected records: in the scan's totals, and in ``tally`` (the block's counts that
        go with its events), else in the counts the DONE message carries."""
        self.rejected_reasons[reason] += count
        tally = self.unblocked if tally is None else tally
        tally["rejected_reasons"][reason] = tally["rejected_reasons"].get(reason, 0) + count
        if module is not None:
            self.sectors_rejected[module] += count
            tally["sectors_rejected"][module] += count
        self.ports.reject(reason, f"scan {self.number}, {count} record(s)")

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

    def _send_events(self, number: int, frame_numbers, positions, present, offsets, events, tally: dict) -> None:
        self.ports.send(wire.encode_events(self.number, self.ports.index, frame_numbers, positions, present,
                                           offsets, events, block=number, stream=self.stream, ledger=tally))
        self._uncommitted = True

    def _send_empty(self, number: int, tally: dict) -> None:
        """Tell the writer a block is finished without frames to write (spilled, or none came)."""
        empty = np.empty(0, np.uint32)
        self._send_events(number, empty, np.empty(0, np.int64), np.empty(0, np.uint8), np.zeros(1, np.int64), empty,
                          tally)

    def _count_block(self, number: int, block: Block) -> None:
        assembled = self._index(number, block)
        self.done_blocks.add(number)
        if len(assembled.frame_numbers) == 0:
            self._send_empty(number, assembled.tally)
            return
        # counted where the sectors were received: no frame is assembled
        counted = count_from_sectors(self.counter, assembled.buffers, assembled.records)
        self._send_events(number, assembled.frame_numbers, assembled.positions, assembled.present,
                          counted.offsets, counted.events, assembled.tally)
        self.live.accumulate(assembled.positions, counted.events, counted.offsets)
        self.ports.counters["frames_counted"] += len(assembled.frame_numbers)
        self.ports.counters["events"] += len(counted.events)

    def _spill_block(self, number: int, block: Block) -> None:
        """Write an incomplete block's records to the spill directory (receivers' format), under
        dst 100 + node index so that they never collide with a producer's spill files."""
        out = spill_directory(self.ports.spill_dir, self.number)
        out.mkdir(parents=True, exist_ok=True)
        frames = set()
        for module, arrays in block.parts.items():
            writer = self._spill_writers.get(module)
            if writer is None:
                writer = RawModuleWriter(out, self.number, module, dst=100 + self.ports.index)
                self._spill_writers[module] = writer
            for records in arrays:
                writer.write(records)
                frames.update(records["header"]["frame_number"].tolist())
        self.done_blocks.add(number)
        tally = sector_tally()
        tally["frames_spilled"] = len(frames)
        self._send_empty(number, tally)

    # -- progress ----------------------------------------------------------------------------------

    def _settled(self, number: int, block: Block) -> bool:
        return all(m in block.parts or self.highest_block[m] > number or m in self.ends for m in MODULES)

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
        return len(self.ends) == N_MODULES

    def timed_out(self) -> bool:
        flow = self.ports.flow
        idle = self.ports.clock() - self.last_activity
        if self.first_end_at is not None and idle > flow.end_timeout_s:
            return True
        return idle > flow.scan_timeout_s

    def step(self, give_up_oldest: bool = False) -> None:
        """Count what can be counted; finish the scan when it ended or timed out. With
        ``give_up_oldest`` the oldest block still waiting for parts is counted as it stands (the
        node group decides when: see NodeGroup.give_up_waiting)."""
        final = self.ended or self.timed_out()
        if self.counter is None and not self._calibrate(final):
            if final and self.ports.clock() - self.last_activity > self.ports.flow.scan_timeout_s:
                log.error("scan %d: no thresholds from control; the scan's frames cannot be counted", self.number)
                self._finish(failed=True)
            return
        for number in self._ready(final, give_up_oldest):
            self.ports.keepalive()
            block = self.pending.pop(number)
            if any((number, m) in self.spilled_parts for m in MODULES if m not in block.parts):
                self._spill_block(number, block)
            else:
                self._count_block(number, block)
        now = self.ports.clock()
        if self._uncommitted and (now >= self._next_partials or (final and not self.pending)):
            # live images a few times a second, the writer's commit point; everything before DONE
            self.ports.send(wire.encode_analysis(self.number, self.ports.index, self.live.take_partials(),
                                                 stream=self.stream))
            self._uncommitted = False
            self._next_partials = now + _PARTIALS_INTERVAL_S
        if final and not self.pending:
            self._finish()

    def _finish(self, failed: bool = False) -> None:
        for writer in self._spill_writers.values():
            writer.close()
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
        self.ports.send(wire.encode_done(self.number, self.ports.index, ledger, lost, stream=self.stream))
        self.finished = True
        log.info("node %d finished scan %d (stream %d)", self.ports.index, self.number, self.stream)
