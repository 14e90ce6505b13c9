"""Producer: stands in for one receiver server (one detector module) and streams its sectors.

For every scan control opens, the producer takes its module's records from a source (the live
simulator, or raw files to replay), sends each routing block to the node group that counts it
(see core.scan_spec), through the gateway or straight to the node groups, and ends with an END
marker to every node group.

Acknowledged delivery: a sent block stays in a bounded resend buffer (``[flow] retain_blocks``)
until the writer has committed it (control relays the commits in heartbeat replies). When control
starts a new routing generation (a node group died, or the writer restarted), the producer waits
until the writer has fenced the old one, then resends every block still held, in block order, to
the node groups alive in the new generation, and sends later blocks there too.

Backpressure: a send waits at most ``backpressure_timeout_s``; past that the block is spilled to
disk in the receivers' format (``spill_dir/scan_NNNNN``) and counted, and later blocks get only a
short grace until a send succeeds again, so a stalled consumer never stalls the detector side.

Following the scan's state: every wait and every block checks that control still runs this run of
the scan and that no shutdown came (within a heartbeat: a tenth of a second while streaming).
When the scan ended, control's ``get_scan`` says how (pipeline.scan_ending): closed whole, the
producer forgets it; closed with frames missing (or ended in a way control cannot tell, or at a
shutdown), it spills what the writer has not committed, the held blocks and the rest of the
source, so that ``stemstream replay`` completes the file; failed (the writer kept nothing of it),
it drops it: the scan is streamed again from its source. Either way it goes on with the next scan
at once, and a shutdown stops it within a second (only the held blocks are spilled then).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, defaultdict

import numpy as np
import zmq

from stemstream.core.scan_spec import ScanSpec
from stemstream.formats import wire
from stemstream.formats.raw import RawModuleWriter
from stemstream.formats.raw import RawFormatError
from stemstream.pipeline.role import Role
from stemstream.pipeline.routing import in_ranges
from stemstream.pipeline.scan_ending import ScanStopped, how_it_ended, missed_blocks
from stemstream.pipeline.spill import spill_directory, spill_writer
from stemstream.sources.protocol import SourceError
from stemstream.transport.control_client import ControlUnavailable
from stemstream.transport.shared_memory import SlotRing, segment_prefix

log = logging.getLogger(__name__)

_GRACE_AFTER_SPILL_S = 0.05


def ring_slots(config) -> int:
    """Shared-memory slots of a producer: one per block it may hold for resending, one being
    filled, one spare."""
    return config.flow.retain_blocks + 2


class OutgoingScan:
    """What a producer keeps of one scan while the writer has not closed it."""

    def __init__(self, spec: ScanSpec):
        self.spec = spec
        self.number = spec.number
        self.generation = spec.generation
        self.retained: dict[int, np.ndarray] = {}  # block -> records sent, not yet committed
        self.slots: dict[int, int] = {}  # block -> its shared-memory slot (shared_memory on)
        self.spilled: set[int] = set()  # blocks this module spilled to disk
        self.notices: defaultdict[tuple[int, int], list[int]] = defaultdict(list)  # (node, stream) -> spilled blocks to tell
        self.sent: Counter = Counter()  # (node, stream) -> records sent
        self.spilled_records = 0
        self.resent_blocks = 0
        self.source_done = False
        self.spill_writer: RawModuleWriter | None = None
        self.stopped: ScanStopped | None = None  # set once the scan is over for this producer


class Producer(Role):
    name = "producer"

    def __init__(self, config, module: int, source_factory, context: zmq.Context | None = None):
        """source_factory(spec: ScanSpec) -> a source (sources.protocol.ModuleSource), or None when
        this producer has nothing for that scan."""
        super().__init__(config, module, context)
        self.module = module
        self.source_factory = source_factory
        self.sockets: dict[int, zmq.Socket] = {}  # node group (or -1: the gateway) -> socket
        self.patience_s = config.flow.backpressure_timeout_s
        self.last_sent_wall = 0.0
        self.outgoing: dict[int, OutgoingScan] = {}
        self.ring: SlotRing | None = None
        self._filling: int | None = None  # the slot handed to the source for the block it renders
        self._current: OutgoingScan | None = None
        self._missed_asked = False  # asked control which blocks of closed scans it missed (_spill_missed)
        net = config.network
        if net.shared_memory:
            self.ring = SlotRing(net.shm_dir, f"{segment_prefix(net.control_port)}p{module}-{os.getpid()}",
                                 config.pipeline.block_frames, ring_slots(config))

    def stats(self) -> dict:
        s = super().stats()
        s["last_sent_wall"] = self.last_sent_wall  # when the last record left (wall clock, s)
        s["retained_blocks"] = sum(len(o.retained) for o in self.outgoing.values())
        return s

    def _socket_for(self, spec: ScanSpec, node: int) -> zmq.Socket:
        """The gateway's input for this module, or node group ``node``'s, connected on first use
        (node groups register with control, so a scan's spec says where they listen)."""
        key = -1 if self.config.pipeline.gateway else node
        sock = self.sockets.get(key)
        if sock is None:
            net = self.config.network
            if key == -1:
                endpoint = net.gateway(self.module)
            else:
                endpoint = net.node_at(spec.host_of(node), node, self.module)
            sock = self.sockets[key] = self.data_socket(zmq.PUSH, linger_ms=10000)
            sock.connect(endpoint)
        return sock

    def _send(self, out: OutgoingScan, parts: list, node: int, patience_s: float) -> bool | None:
        """Send within ``patience_s``: True if sent, False if the consumer did not take it in time,
        None if a new routing generation began meanwhile (the message's route is stale)."""
        sock = self._socket_for(out.spec, node)
        deadline = time.monotonic() + patience_s
        while True:
            try:
                sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                sock.poll(min(50, max(1, int(remaining * 1000))), zmq.POLLOUT)
                self.tick(interval_s=0.1)
                self._check(out)
                if self._generation_changed(out):
                    return None

    # -- acknowledgements and failover -------------------------------------------------------------

    def _latest(self, out: OutgoingScan) -> ScanSpec:
        """The newest spec of ``out``'s scan, as long as it is the same run (epoch) of it."""
        spec = self.scan_specs.get(out.number, out.spec)
        return spec if spec.epoch == out.spec.epoch else out.spec

    def _over(self, number: int, out: OutgoingScan) -> bool:
        """True once control closed this run of the scan (or started the scan number again)."""
        spec = self.scan_specs.get(number, out.spec)
        return number not in self.open_scans or spec.epoch != out.spec.epoch

    def _check(self, out: OutgoingScan) -> None:
        """Raise ScanStopped once this run of the scan is over for the producer: control no longer
        runs it, or the pipeline is shutting down."""
        if out.stopped is None and (self.shutdown or self._over(out.number, out)):
            out.stopped = self._ending(out)
        if out.stopped is not None:
            raise out.stopped

    def _ending(self, out: OutgoingScan) -> ScanStopped | None:
        """How this run of the scan ended, as control tells it (pipeline.scan_ending); None:
        control still runs it and no shutdown came."""
        try:
            reply = self.control.request("get_scan", timeout_s=0.5, scan=out.number)
        except ControlUnavailable:
            reply = {}
        stopped = how_it_ended(reply, out.spec.epoch, self.shutdown)
        if stopped is None:
            self.tick(force=True)  # a heartbeat reply missed the scan: the next one lists it again
        return stopped

    def _generation_changed(self, out: OutgoingScan) -> bool:
        return self._latest(out).generation > out.generation

    def _release(self, out: OutgoingScan) -> None:
        """Forget the blocks the writer has committed."""
        ranges = self.acks.get(out.number)
        if ranges and out.retained:
            for block in [b for b in out.retained if in_ranges(ranges, b)]:
                self._drop(out, block)

    def _drop(self, out: OutgoingScan, block: int) -> None:
        """Forget a retained block; its shared-memory slot can take another."""
        out.retained.pop(block, None)
        slot = out.slots.pop(block, None)
        if slot is not None:
            self.ring.release(slot)

    def _buffer_for(self, n: int) -> np.ndarray | None:
        """Where the source should put the next block's ``n`` records: a shared-memory slot, once
        the resend buffer has room (None: the source allocates, the block may be spilled)."""
        out = self._current
        if self.ring is None or out is None or n > self.ring.slot_records:
            return None
        try:
            if not self._wait_for_room(out, self.patience_s + self.config.flow.dead_after_s):
                return None
        except ScanStopped:  # the source allocates; the producer's loop stops at this block
            return None
        self._filling = self.ring.acquire()
        return None if self._filling is None else self.ring.view(self._filling, n)

    def _into_slot(self, records: np.ndarray, slot: int | None) -> tuple[np.ndarray, int | None]:
        """The records in a shared-memory slot (copied there if the source did not fill one)."""
        if self.ring is None or len(records) > self.ring.slot_records:
            return records, None
        if slot is None:
            slot = self.ring.acquire()
            if slot is None:
                return records, None
            view = self.ring.view(slot, len(records))
            view[:] = records
            records = view
        return records, slot

    def _wait_for_room(self, out: OutgoingScan, patience_s: float) -> bool:
        """Wait (at most ``patience_s``) until the resend buffer has room; a failover met on the
        way is carried out. False if no room came in time."""
        t0 = time.monotonic()
        deadline = t0 + patience_s
        while True:
            self._release(out)
            if self._generation_changed(out):
                self._follow(out)
            if len(out.retained) < self.config.flow.retain_blocks:
                if time.monotonic() > t0 + 0.001:
                    # time the source stood still for commits (retain_blocks too small for the rate?)
                    self.counters["waited_for_commits_ms"] += int(1e3 * (time.monotonic() - t0))
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
            self.tick(interval_s=0.05)
            self._check(out)

    def _follow(self, out: OutgoingScan) -> None:
        """Move to the spec's newer routing generation: once the writer has fenced it (dropped
        what older generations left uncommitted), resend every block not committed."""
        deadline = time.monotonic() + self.patience_s
        spec = self._latest(out)
        while spec.fenced < spec.generation and time.monotonic() < deadline:
            time.sleep(0.02)
            self.tick(interval_s=0.05)
            self._check(out)
            spec = self._latest(out)
        if spec.fenced < spec.generation:
            log.warning("producer %d: the writer did not fence generation %d of scan %d in %.0f s; resending anyway",
                        self.module, spec.generation, out.number, self.patience_s)
        out.spec, out.generation = spec, spec.generation
        self._release(out)
        ranges = self.acks.get(out.number, [])
        for block in sorted(out.spilled):  # the new node groups must not wait for these parts
            target = spec.route(block)
            if target is not None and not in_ranges(ranges, block):
                out.notices[target].append(block)
        resend = sorted(out.retained)
        log.warning("producer %d: scan %d routing generation %d, resending %d block(s) not committed",
                    self.module, out.number, out.generation, len(resend))
        for block in resend:
            records = out.retained.pop(block)
            out.resent_blocks += 1
            self.counters["blocks_resent"] += 1
            self._send_block(out, block, records, self.patience_s, retained_ok=True, slot=out.slots.pop(block, None))
        if out.source_done:
            self._end(out)

    # -- sending -----------------------------------------------------------------------------------

    def _send_block(self, out: OutgoingScan, block: int, records: np.ndarray, patience: float,
                    retained_ok: bool = False, slot: int | None = None) -> bool:
        """Send one block to its node group, keeping it for resending; spill it if that cannot
        be done within ``patience``. ``slot``: the shared-memory slot the records are in, if any.
        True if sent (or spilled because the writer committed the block before it went out: it
        was counted without this module). ScanStopped: the block is held with the others not committed."""
        try:
            while True:
                self._check(out)
                if self._generation_changed(out):
                    self._follow(out)
                # A full resend buffer waits for commits; a dead node group holds them up until its
                # failover, so that wait may last dead_after_s longer than a slow consumer's.
                if not retained_ok and not self._wait_for_room(out, patience + self.config.flow.dead_after_s):
                    break
                if in_ranges(self.acks.get(out.number, []), block):  # counted without this module: it looked dead
                    self._write_spill(out, block, records, f"block {block} was counted without this module")
                    if slot is not None:
                        self.ring.release(slot)
                    return True  # (no stall) on disk beside the node group's spill of the others: a replay completes it
                target = out.spec.route(block)
                if target is None:
                    break
                node, stream = target
                records, slot = self._into_slot(records, slot)
                notices = out.notices.pop(target, [])
                shm = self.ring.descriptor(slot, len(records)) if slot is not None else None
                message = wire.encode_sectors(out.number, self.module, block, node, records, notices, stream, shm)
                sent = self._send(out, message, node, patience)
                if sent:
                    out.retained[block] = records
                    if slot is not None:
                        out.slots[block] = slot
                    out.sent[target] += len(records)
                    self.counters["records_sent"] += len(records)
                    self.last_sent_wall = time.time()
                    self.tick(interval_s=0.1)  # heartbeats (and commits) keep coming while a scan streams
                    return True
                out.notices[target] = notices + out.notices.get(target, [])
                if sent is False:
                    break
                # sent is None: a new generation began while waiting; route again
        except ScanStopped:
            out.retained[block] = records
            if slot is not None:
                out.slots[block] = slot
            raise
        self._spill(out, block, records, patience)
        if slot is not None:
            self.ring.release(slot)
        return False

    def _spill(self, out: OutgoingScan, block: int, records: np.ndarray, patience: float) -> None:
        """The consumer is behind beyond the bound: write the block to disk instead."""
        self._write_spill(out, block, records, f"node groups blocked for {patience:.1f} s")
        target = out.spec.route(block)
        if target is not None:
            out.notices[target].append(block)
        self.tick(interval_s=0.1)

    def _write_spill(self, out: OutgoingScan, block: int, records: np.ndarray, why: str) -> None:
        """Append a block to this scan's spill files (opened, and said so, on first use)."""
        if out.spill_writer is None:
            directory = spill_directory(self.config.pipeline.spill_dir, out.number)
            out.spill_writer = spill_writer(directory, out.number, self.module, dst=out.spec.epoch)
            log.warning("producer %d: %s; spilling scan %d to %s", self.module, why, out.number, directory)
        out.spill_writer.write(records)
        out.spilled.add(block)
        out.spilled_records += len(records)
        self.counters["records_spilled"] += len(records)

    def _end(self, out: OutgoingScan) -> None:
        """END of this module's part of the scan to every node group of the current generation."""
        for node in out.spec.alive:
            target = (node, out.generation)
            end = wire.encode_end(out.number, self.module, node, out.sent[target], out.spilled_records,
                                  out.notices.pop(target, []), stream=out.generation)
            if self._send(out, end, node, self.config.flow.scan_timeout_s) is False:  # None: a failover resends it
                log.error("producer %d: could not deliver the end of scan %d to node group %d",
                          self.module, out.number, node)

    def produce(self, spec: ScanSpec) -> dict:
        """Stream one scan; returns what was sent and spilled."""
        if spec.number in self.outgoing:  # an earlier run of this scan number
            self._stop(self.outgoing[spec.number])
        out = self._current = self.outgoing[spec.number] = OutgoingScan(spec)
        blocks = self._blocks(spec)
        patience = self.patience_s
        t0 = time.monotonic()
        try:
            for block, records in blocks:
                slot, self._filling = self._filling, None
                # After a spill, later blocks get only a short grace until a send succeeds again,
                # so a stalled consumer never stalls the detector side.
                sent = self._send_block(out, block, records, patience, slot=slot)
                patience = self.patience_s if sent else _GRACE_AFTER_SPILL_S
            self._current = None
            out.source_done = True
            if out.spill_writer is not None:
                out.spill_writer.flush()  # complete on disk now; closed when the scan is
            self._end(out)
        except ScanStopped as stopped:
            self._current = None  # the rest of the source allocates its own blocks
            self._wind_up(out, stopped, blocks)
        self.mark_finished(spec)
        seconds = time.monotonic() - t0
        sent = sum(out.sent.values())
        log.info("producer %d: scan %d sent %d records, spilled %d, in %.2f s", self.module, out.number, sent,
                 out.spilled_records, seconds)
        return {"sent": sent, "spilled": out.spilled_records, "seconds": seconds}

    def _blocks(self, spec: ScanSpec):
        """The blocks of this module's records of ``spec``'s scan, from the source; none, with
        one line and a count, when the source cannot give them (the scan still gets its END,
        so it ends at once with those frames missing in its ledger)."""
        try:
            source = self.source_factory(spec)
            if source is not None:
                yield from source.blocks(self._buffer_for)
        except (SourceError, RawFormatError, OSError) as exc:
            self.rejected["scan_not_in_source"] += 1
            log.error("producer %d: nothing (more) to stream of scan %d: %s", self.module, spec.number, exc)

    def _stop(self, out: OutgoingScan) -> None:
        """Wind up ``out`` if it is over (at a shutdown every scan is; how it ended: :meth:`_ending`)."""
        try:
            self._check(out)
        except ScanStopped as stopped:
            self._wind_up(out, stopped)

    def _wind_up(self, out: OutgoingScan, stopped: ScanStopped, rest=()) -> None:
        """This run of the scan is over: spill what the writer has not committed (the blocks held,
        then the ``rest`` of the source unless the pipeline is shutting down) when it is worth
        keeping, else drop it; forget the scan."""
        held = sorted(out.retained)
        spilled, cut_short = 0, False
        if stopped.keep:
            why = f"scan {out.number} ended ({stopped.why})"
            try:
                for block in held:
                    self._write_spill(out, block, out.retained[block], why)
                for block, records in rest:
                    self._write_spill(out, block, records, why)
                    spilled += 1
                    self.tick(interval_s=0.1)
                    if self.shutdown:  # obeyed within a second: the source keeps the rest
                        cut_short = True
                        break
            except OSError as exc:
                log.error("producer %d: could not spill scan %d: %s", self.module, out.number, exc)
        if not stopped.whole:
            self.counters["scans_stopped"] += 1
            log.warning("producer %d: scan %d is over: %s; %s the %d block(s) held, not committed%s%s", self.module,
                        out.number, stopped.why, "spilled" if stopped.keep else "dropped", len(held),
                        f"; spilled the {spilled} not sent" if spilled else "",
                        "; the rest was not streamed (shutting down)" if cut_short else "")
        self._forget(out.number)

    def _service(self) -> None:
        """Scans already sent: free what the writer committed, carry out a late failover, wind up
        the scans that are over. At this process's first word with control: spill what it missed."""
        if not self._missed_asked and self.control_instance is not None:
            self._spill_missed()
        for out in list(self.outgoing.values()):
            try:
                self._check(out)
                self._release(out)
                if out.source_done and self._generation_changed(out):
                    self._follow(out)
            except ScanStopped as stopped:
                self._wind_up(out, stopped)

    def _spill_missed(self) -> None:
        """Spill what the source has of the blocks that scans control closed lately counted
        without this module, unless this process streamed them (pipeline.scan_ending.missed_blocks),
        so that ``stemstream replay`` completes those frames. Asked once, when control answers."""
        try:
            reply = self.control.request("missed_blocks", timeout_s=1.0, module=self.module)
        except ControlUnavailable:
            return  # asked again at the next turn
        self._missed_asked = True
        for spec, blocks in missed_blocks(reply):
            if not self.is_finished(spec) and spec.number not in self.outgoing:
                self._spill_blocks(spec, blocks)
                self.mark_finished(spec)

    def _spill_blocks(self, spec: ScanSpec, blocks: set[int]) -> None:
        """Spill this module's part of ``blocks`` of ``spec``'s scan from the source."""
        def wanted():
            for block, records in self._blocks(spec):
                self.tick(interval_s=0.1)  # a simulator renders (and paces) the blocks skipped too
                if block in blocks:
                    yield block, records

        out = self.outgoing[spec.number] = OutgoingScan(spec)
        why = f"it was closed without this module's part of {len(blocks)} block(s)"
        self._wind_up(out, ScanStopped(why, keep=True), wanted())

    def _forget(self, number: int) -> None:
        out = self.outgoing.pop(number)
        for block in list(out.retained):
            self._drop(out, block)
        if out.spill_writer is not None:
            out.spill_writer.close()

    def _next_scan(self) -> ScanSpec | None:
        """The scan to stream next: of those control runs and this producer has not streamed, the
        one control started first (a scan control ended or refused meanwhile is never streamed)."""
        todo = [s for s in self.scan_specs.values() if s.number in self.open_scans and not self.is_finished(s)]
        return min(todo, key=lambda s: (s.epoch, s.number), default=None)

    def run(self) -> None:
        warm_up = getattr(self.source_factory, "warm_up", None)
        if warm_up is not None:
            warm_up()  # load compiled code before the first scan, not during it
        while not self.shutdown:
            # Idle, a producer asks often: a new scan's first frames should not wait a heartbeat.
            self.tick(interval_s=0.05)
            self._service()
            spec = self._next_scan()
            if spec is None:
                time.sleep(0.02)
                continue
            self.produce(spec)
        for out in list(self.outgoing.values()):
            self._stop(out)  # shutting down: every scan is over for this producer
        for sock in self.sockets.values():
            sock.close()
        if self.ring is not None:
            self.ring.close()
