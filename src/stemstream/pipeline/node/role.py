"""Node group: reassembles frames from the 4 modules' sectors, counts them, sends events on.

Sectors arrive in routing blocks (``block_frames`` consecutive frame numbers, one message per
module and block). Each module's stream is in block order, so a block is *settled* once, for every
module, its part arrived, or a later block of that module arrived, or the module ended: a part
that is still absent then will never come. A settled block with all parts is counted; one with
absent parts is counted with those sectors zero-filled (incomplete frames), unless the producer
said it spilled that part to disk (the next message of that module lists the blocks it spilled):
then the parts present are spilled too, in the receivers' format, so that a later replay of the
spill directory reassembles and counts those frames whole.

Each (scan, routing generation) is a stream of its own (see pipeline.routing): after a failover
the producers resend what the writer had not committed on a new stream, so the block order that
the settling rule relies on holds within each stream; a stream a newer generation supersedes is
dropped (the writer has fenced it). Every finished block, even one with no frame or one spilled,
is reported to the writer with its block number, and an ANALYSIS message follows the events
at least every ``_PARTIALS_INTERVAL_S``: the writer commits a stream's events when their
partials arrive, so what a node group that dies had in flight is either wholly committed or
wholly resent.

Flow control is per module: each module arrives on its own socket, and a module that is
``max_pending_blocks`` blocks ahead of the others is not read until they catch up, which holds its
producer back (backpressure) instead of growing memory or dropping anything. If the modules that
a waiting block lacks stay silent for ``end_timeout_s`` (a dead producer), the oldest waiting block
is counted as it stands. While thresholds are being calibrated, no module is read once that many
complete blocks wait.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import numba
import numpy as np
import zmq

from stemstream.analysis import ScanAnalyses, default_analyses, warm_up
from stemstream.counting.kernel import ElectronCounter
from stemstream.counting.sectors import count_from_sectors
from stemstream.counting.thresholds import PixelHistogram, Thresholds, draw_sample_weights
from stemstream.formats import wire
from stemstream.formats.raw import FRAME_SHAPE, N_MODULES, RECORD_BYTES, RECORD_DTYPE, RawModuleWriter, sector_rows
from stemstream.formats.ledger import sector_tally
from stemstream.pipeline.role import Role
from stemstream.pipeline.routing import generation, scan_nodes
from stemstream.transport.shared_memory import Attachments
from stemstream.pipeline.spill import spill_directory

log = logging.getLogger(__name__)

# How often a node group sends its analyses' partial results to the writer: live images, and the
# writer's commit point (producers free their resend buffers once blocks are committed).
_PARTIALS_INTERVAL_S = 0.2


@dataclass
class Block:
    parts: dict[int, list[np.ndarray]] = field(default_factory=dict)  # module -> record arrays
    first_seen: float = field(default_factory=time.monotonic)

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
        for module in range(N_MODULES):
            rows = sector_rows(module)
            data = self.buffers[module]["data"] if self.buffers[module] is not None else None
            for i, k in enumerate(self.records[:, module].tolist()):
                frames[i, rows] = data[k] if k >= 0 else 0
        return frames


class NodeScan:
    """One scan as seen by one node group."""

    def __init__(self, node: "NodeGroup", spec: dict, stream: int = 0):
        self.node = node
        self.spec = spec
        self.stream = stream
        self.number = int(spec["scan"])
        self.rows, self.cols = spec["scan_shape"]
        self.block_frames = int(spec["block_frames"])
        self.n_nodes = len(scan_nodes(spec))
        self._uncommitted = False  # events sent that no ANALYSIS message followed yet
        self.pending: dict[int, Block] = {}
        self.done_blocks: set[int] = set()
        self.ends: dict[int, wire.EndMessage] = {}
        self.first_end_at: float | None = None
        self.last_activity = time.monotonic()
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
        self.live = ScanAnalyses(node.analyses, (self.rows, self.cols))
        self._next_partials = 0.0
        self._calibration_sent = False
        self._histogram = PixelHistogram()
        cal = spec["calibration"]
        self._quota = math.ceil(cal["calibration_frames"] / self.n_nodes)
        self._weights = draw_sample_weights(self._quota, math.ceil(cal["samples"] / self.n_nodes), seed=1000 + node.index)
        self._sampled = 0
        self._sampled_blocks: set[int] = set()
        self._next_threshold_poll = 0.0
        if spec.get("thresholds"):
            self._set_thresholds(spec["thresholds"])

    # -- thresholds --------------------------------------------------------------------------------

    def _set_thresholds(self, t: dict) -> None:
        thresholds = Thresholds(**t)
        self.counter = ElectronCounter(thresholds.background, thresholds.xray, FRAME_SHAPE)

    def _poll_thresholds(self) -> None:
        now = time.monotonic()
        if now < self._next_threshold_poll:
            return
        self._next_threshold_poll = now + 0.05
        try:
            reply = self.node.control.request("get_scan", timeout_s=1.0, scan=self.number)
        except Exception:  # control briefly away: try again at the next poll
            return
        if reply.get("ok") and reply["scan"].get("thresholds"):
            self._set_thresholds(reply["scan"]["thresholds"])

    def _send_calibration(self) -> None:
        values = np.flatnonzero(self._histogram.counts)
        self.node.control.request(
            "calibration", timeout_s=5.0, scan=self.number, node=self.node.index,
            values=(values - 65536).tolist(), counts=self._histogram.counts[values].tolist(),
            n_frames=self._histogram.n_frames,
        )
        self._calibration_sent = True

    def _sample_for_calibration(self, number: int, block: Block) -> None:
        indexed = self._index(number, block, count_ledger=False)
        frames = indexed.frames(self._frames)
        complete = np.flatnonzero(indexed.present == (1 << N_MODULES) - 1)
        for i in complete:
            if self._sampled >= self._quota:
                break
            w = int(self._weights[self._sampled])
            if w:
                self._histogram.add(frames[i], weight=w)
            self._sampled += 1
        self._sampled_blocks.add(number)

    @property
    def waiting_for_thresholds(self) -> bool:
        return self.counter is None

    # -- input -------------------------------------------------------------------------------------

    def add_sectors(self, msg: wire.SectorsMessage) -> None:
        self.last_activity = time.monotonic()
        self.spilled_parts.update((b, msg.module) for b in msg.spilled)
        self.highest_block[msg.module] = max(self.highest_block[msg.module], msg.block)
        if msg.block in self.done_blocks:
            self._reject("late_sector", msg.module, len(msg.records))
            return
        block = self.pending.setdefault(msg.block, Block())
        block.parts.setdefault(msg.module, []).append(msg.records)

    def add_end(self, msg: wire.EndMessage) -> None:
        self.last_activity = time.monotonic()
        self.spilled_parts.update((b, msg.module) for b in msg.spilled_blocks)
        self.ends[msg.module] = msg
        if self.first_end_at is None:
            self.first_end_at = time.monotonic()

    def _reject(self, reason: str, module: int | None, count: int = 1, tally: dict | None = None) -> None:
        """Count rejected records: in the scan's totals, and in ``tally`` (the block's counts that
        go with its events), else in the counts the DONE message carries."""
        self.rejected_reasons[reason] += count
        tally = self.unblocked if tally is None else tally
        tally["rejected_reasons"][reason] = tally["rejected_reasons"].get(reason, 0) + count
        if module is not None:
            self.sectors_rejected[module] += count
            tally["sectors_rejected"][module] += count
        self.node.reject(reason, f"scan {self.number}, {count} record(s)")

    # -- assembly and counting ---------------------------------------------------------------------

    def _index(self, number: int, block: Block, count_ledger: bool = True) -> IndexedBlock:
        """Check a block's records (bad ones rejected, duplicates dropped) and index its frames;
        with ``count_ledger``, count its sectors (totals and the block's own tally)."""
        first = number * self.block_frames
        tally = sector_tally() if count_ledger else None
        buffers: list = [None] * N_MODULES
        for module, arrays in block.parts.items():
            records = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
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
                if count_ledger and mask.any():
                    self._reject(reason, module, int(mask.sum()), tally)
                bad |= mask
            good = np.flatnonzero(~bad)
            # duplicates: keep the first copy of each frame number
            _, first_idx = np.unique(h["frame_number"][good], return_index=True)
            if count_ledger and len(first_idx) < len(good):
                self.sectors_duplicate[module] += len(good) - len(first_idx)
                tally["sectors_duplicate"][module] += len(good) - len(first_idx)
            good = good[np.sort(first_idx)]
            if count_ledger:
                self.sectors_received[module] += len(good)
                tally["sectors_received"][module] += len(good)
            # a copy only when records were dropped; otherwise the received buffer itself
            buffers[module] = records if len(good) == len(records) else records[good]
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
            for module in range(N_MODULES):
                missing = int((index[:, module] < 0).sum())
                self.sectors_missing[module] += missing
                tally["sectors_missing"][module] += missing
        return IndexedBlock(all_numbers.astype(np.uint32), positions, present, buffers, index, tally)

    def _send_events(self, number: int, frame_numbers, positions, present, offsets, events, tally: dict) -> None:
        self.node.send_events(wire.encode_events(self.number, self.node.index, frame_numbers, positions, present,
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
        self.node.counters["frames_counted"] += len(assembled.frame_numbers)
        self.node.counters["events"] += len(counted.events)

    def _spill_block(self, number: int, block: Block) -> None:
        """Write an incomplete block's records to the spill directory (receivers' format), under
        dst 100 + node index so that they never collide with a producer's spill files."""
        out = spill_directory(self.node.config.pipeline.spill_dir, self.number)
        out.mkdir(parents=True, exist_ok=True)
        frames = set()
        for module, arrays in block.parts.items():
            writer = self._spill_writers.get(module)
            if writer is None:
                writer = self._spill_writers[module] = RawModuleWriter(out, self.number, module, dst=100 + self.node.index)
            for records in arrays:
                writer.write(records)
                frames.update(records["header"]["frame_number"].tolist())
        self.done_blocks.add(number)
        tally = sector_tally()
        tally["frames_spilled"] = len(frames)
        self._send_empty(number, tally)

    # -- progress ----------------------------------------------------------------------------------

    def _settled(self, number: int, block: Block) -> bool:
        return all(m in block.parts or self.highest_block[m] > number or m in self.ends for m in range(N_MODULES))

    def _ready(self, final: bool) -> list[int]:
        if final:
            return sorted(self.pending)
        ready = sorted(n for n, b in self.pending.items() if self._settled(n, b))
        waiting = [n for n in self.pending if n not in ready]
        if waiting:
            oldest = min(waiting)
            absent = [m for m in range(N_MODULES) if m not in self.pending[oldest].parts]
            # Only when the modules it holds wait on it (memory bound reached) and a module it
            # lacks has a dead producer (control stopped hearing from it): count it as it stands.
            # A slow producer is waited for: backpressure and spilling bound that wait upstream.
            blocking = any(self.node.module_gated(m) for m in range(N_MODULES) if m not in absent)
            if blocking and any(self.node.role_is_dead(f"producer-{m}") for m in absent):
                ready.append(oldest)
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
        flow = self.node.config.flow
        idle = time.monotonic() - self.last_activity
        if self.first_end_at is not None and idle > flow.end_timeout_s:
            return True
        return idle > flow.scan_timeout_s

    def step(self) -> None:
        """Count what can be counted; finish the scan when it ended or timed out."""
        final = self.ended or self.timed_out()
        if self.counter is None:
            # Calibration: sample the first complete blocks, send the histogram once the quota is
            # met (or the scan ended), then wait for control's thresholds.
            for number in sorted(self.pending):
                if self._sampled >= self._quota:
                    break
                if number not in self._sampled_blocks and (self.pending[number].modules == N_MODULES or final):
                    self._sample_for_calibration(number, self.pending[number])
            if not self._calibration_sent and (self._sampled >= self._quota or final):
                self._send_calibration()
            if self._calibration_sent:
                self._poll_thresholds()
            if self.counter is None:
                if final and time.monotonic() - self.last_activity > self.node.config.flow.scan_timeout_s:
                    log.error("scan %d: no thresholds from control; the scan's frames cannot be counted", self.number)
                    self._finish(failed=True)
                return
        for number in self._ready(final):
            self.node.tick()  # a long backlog must not look like a dead node group to control
            block = self.pending.pop(number)
            if any((number, m) in self.spilled_parts for m in range(N_MODULES) if m not in block.parts):
                self._spill_block(number, block)
            else:
                self._count_block(number, block)
        now = time.monotonic()
        if self._uncommitted and (now >= self._next_partials or (final and not self.pending)):
            # live images a few times a second, the writer's commit point; everything before DONE
            self.node.send_events(wire.encode_analysis(self.number, self.node.index, self.live.take_partials(),
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
            "sectors_spilled_by_producers": [self.ends[m].spilled if m in self.ends else 0 for m in range(N_MODULES)],
            "failed": failed,
        }
        self.node.send_done(wire.encode_done(self.number, self.node.index, ledger, lost, stream=self.stream))
        self.finished = True
        log.info("node %d finished scan %d (stream %d)", self.node.index, self.number, self.stream)


class NodeGroup(Role):
    """Listens on node_base_port + index; sends events and DONE to the writer."""

    name = "node"

    def __init__(self, config, index: int = 0, context: zmq.Context | None = None, advertise_host: str = ""):
        """``advertise_host``: the address producers and gateway reach this node group at, told to
        control when it registers (default: ``[network] node_hosts[index]``, else ``host``)."""
        super().__init__(config, index, context)
        hosts = config.network.node_hosts
        self.advertise_host = advertise_host or (hosts[index] if index < len(hosts) else config.network.host)
        self.inputs: list[zmq.Socket] = []
        for module in range(N_MODULES):
            sock = self.data_socket(zmq.PULL)
            sock.bind(config.network.bind(config.network.node_port(index, module)))
            self.inputs.append(sock)
        self.events_out = self.data_socket(zmq.PUSH, hwm=64, linger_ms=5000)
        self.events_out.connect(config.network.writer())
        self.scans: dict[tuple[int, int], NodeScan] = {}  # (scan, stream) -> its state
        self.shared = Attachments(config.network.shm_dir)  # producers' segments, on one host
        numba.set_num_threads(min(config.counting.workers, numba.config.NUMBA_NUM_THREADS))
        self.analyses = default_analyses(FRAME_SHAPE, config.analysis)
        # Load (on a fresh machine: compile, seconds each) every kernel a scan uses now, not when
        # the first scan's frames wait: a node group busy compiling mid-scan stalls past the
        # producers' patience, and they spill.
        counter = ElectronCounter(28.0, 1000.0, FRAME_SHAPE)
        counter.count(np.zeros((1, *FRAME_SHAPE), np.uint16))
        for writable in (True, False):  # received buffers are read-only (another compiled variant)
            blank = np.zeros(1, RECORD_DTYPE)
            blank.flags.writeable = writable
            count_from_sectors(counter, [blank] * N_MODULES, np.zeros((1, N_MODULES), np.int64))
        PixelHistogram().add(np.zeros(FRAME_SHAPE, np.uint16), weight=1)
        warm_up(self.analyses)

    def send_events(self, parts: list) -> None:
        # Events are small (~2 kB a frame): copying beats pyzmq's zero-copy bookkeeping.
        self.events_out.send_multipart(parts)

    def send_done(self, parts: list) -> None:
        self.events_out.send_multipart(parts)

    def registration(self) -> dict:
        return {"host": self.advertise_host}

    def stats(self) -> dict:
        s = super().stats()
        s["pending_blocks"] = sum(len(sc.pending) for sc in self.scans.values())
        s["scans"] = sorted({number for number, _ in self.scans})
        return s

    def _stream(self, number: int, stream: int) -> NodeScan | None:
        """The state of (scan, stream), opened on first use; None if control has no such open
        scan or a newer routing generation superseded the stream."""
        scan = self.scans.get((number, stream))
        if scan is None:
            spec = self.scan_spec(number, stream=stream)
            if spec is None:
                raise wire.MessageError("unknown_scan", f"scan {number}")
            if stream < generation(spec):
                return None
            scan = self.scans[(number, stream)] = NodeScan(self, spec, stream)
        return scan

    def _supersede(self) -> None:
        """Drop the streams of scans whose routing generation moved on: the writer fenced them,
        and the producers resend what they held."""
        for key, scan in list(self.scans.items()):
            spec = self.scan_specs.get(key[0])
            if spec is not None and key[1] < generation(spec):
                del self.scans[key]
                self.counters["streams_superseded"] += 1
                log.warning("node %d: scan %d stream %d superseded by routing generation %d",
                            self.index, key[0], key[1], generation(spec))

    def module_gated(self, module: int) -> bool:
        """True when this module's input must wait for the others (or for calibration)."""
        limit = self.config.flow.max_pending_blocks
        for scan in self.scans.values():
            if scan.waiting_for_thresholds and scan.complete_pending() >= limit:
                return True
            if scan.waiting_with(module) >= limit:
                return True
        return False

    def _check_route(self, msg, module: int) -> None:
        """A message must reach this node group on its own module's input."""
        if msg.node != self.index:
            raise wire.MessageError("wrong_node", f"routed to {msg.node}, this is {self.index}")
        if msg.module != module:
            raise wire.MessageError("wrong_module", f"module {msg.module} on module {module}'s input")

    def handle(self, parts: list, module: int) -> None:
        """One message from ``module``'s input; bad ones are counted and logged, never raised."""
        try:
            kind = wire.kind_of(parts)
            if kind == wire.SECTORS:
                msg = wire.decode_sectors(parts)
                self._check_route(msg, module)
                if msg.shm is not None:
                    self.shared.validate_name(msg.shm["name"])
                    msg.records = self.shared.records(msg.shm, msg.shm["nbytes"] // RECORD_BYTES)
                scan = self._stream(msg.scan, msg.stream)
                if scan is not None:
                    scan.add_sectors(msg)
            elif kind == wire.END:
                msg = wire.decode_end(parts)
                self._check_route(msg, module)
                scan = self._stream(msg.scan, msg.stream)
                if scan is not None:
                    scan.add_end(msg)
            else:
                raise wire.MessageError("unexpected_kind", repr(kind))
            if scan is None:
                self.counters["messages_superseded"] += 1
        except wire.MessageError as exc:
            self.reject(exc.reason, str(exc))

    def run(self) -> None:
        while not self.shutdown:
            poller = zmq.Poller()
            for module, sock in enumerate(self.inputs):
                if not self.module_gated(module):
                    poller.register(sock, zmq.POLLIN)
            events = dict(poller.poll(20))
            for module, sock in enumerate(self.inputs):
                if sock not in events:
                    continue
                for _ in range(8):
                    try:
                        parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.handle(parts, module)
                    if self.module_gated(module):
                        break
            if not events:
                time.sleep(0.001) if any(self.module_gated(m) for m in range(N_MODULES)) else None
            for key, scan in list(self.scans.items()):
                scan.step()
                if scan.finished:
                    del self.scans[key]
                    self.mark_finished(scan.spec)
                    gc.collect()  # the scan's buffers go now, not at some later scan's expense
            self.tick()
            self._supersede()
        self.leave()
        for sock in self.inputs:
            sock.close(0)
        self.events_out.close()
