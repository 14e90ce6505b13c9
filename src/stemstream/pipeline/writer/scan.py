"""One scan in the writer: its counted file, the slot of each frame, commits and fencing, the ledger.

Events arrive from the node groups in any order; each frame gets its slot (position x frames per
position + the frame's rank at that position) in the scan's SparseCountsWriter, which writes to
a temporary name and renames on close. A scan started with ``resume`` adds frames to an existing
file (the replay of a spill).

Commits: a node group's events are held until the ANALYSIS (or DONE) message that follows them
on the same stream arrives; then events and partials are applied together and their blocks are
*committed*, which the writer tells control (producers then free those blocks). When control
starts a new routing generation after a failover, the scan *fences* the old streams: what they
left uncommitted is dropped and anything more from them ignored, so every block is written once,
from either the old generation or the resent copy (see core.scan_spec).

A WriterScan holds no socket: what it needs of the writer that holds it (the latest spec from
control's heartbeats, a heartbeat now, the disk check) comes in :class:`ScanHooks`.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stemstream.analysis import Analysis, ScanAnalyses
from stemstream.analysis.batch import select_frames
from stemstream.analysis.results_store import store_results
from stemstream.analysis.views import write_pngs
from stemstream.core.config import FlowSettings
from stemstream.core.detector import FRAME_SHAPE, N_MODULES
from stemstream.core.scan_spec import ScanSpec
from stemstream.core.thresholds import Thresholds
from stemstream.core.version import SOFTWARE_VERSION
from stemstream.formats import wire
from stemstream.formats.ledger import ScanLedger
from stemstream.formats.partials import decode_partials
from stemstream.formats.sparse_h5 import SparseCountsWriter
from stemstream.pipeline.routing import BlockRanges
from stemstream.pipeline.writer.counting import CountingRecord
from stemstream.pipeline.writer.files import existing_file, frames_to_resume, scan_paths
from stemstream.pipeline.writer.frames import Frames, first_frames_in_order, next_slots, with_subpixel
from stemstream.pipeline.writer.incomplete import IncompleteFrames, SetAside
from stemstream.pipeline.writer.journal import Journal, journal_path, read_journal
from stemstream.pipeline.writer.live import LiveImages
from stemstream.transport.messages import MessageError

log = logging.getLogger(__name__)

_ALL_MODULES = (1 << N_MODULES) - 1


@dataclass(frozen=True)
class ScanHooks:
    """What a scan asks of the writer that holds it."""

    latest_spec: Callable[[], ScanSpec | None]  # control's newest spec of this scan and epoch (None: none yet)
    heartbeat: Callable[[], None]  # heartbeat control now: its reply brings newer specs
    node_heard: Callable[[int], bool]  # control has heard from node group n (it may yet fail it over)
    reject: Callable[[str, str], None]  # count a rejected message: (reason, detail)
    check_space: Callable[[], None]  # OSError(ENOSPC) when the disk has too little room for this scan to go on


class WriterScan:
    """One scan's file and state. ``shape`` is (rows, cols) of scan positions. With
    ``subpixel_positions`` the file keeps each event's sub-pixel position (pipeline.writer.frames)."""

    def __init__(self, spec: ScanSpec, output_dir: Path, analyses: Sequence[Analysis], flow: FlowSettings,
                 hooks: ScanHooks, subpixel_positions: bool = False):
        self.spec = spec
        self.number = spec.number
        self.shape = spec.shape  # (rows, cols)
        self.fpp = spec.frames_per_position
        self.generation = spec.generation
        self.alive = list(spec.alive)
        self.flow = flow
        self.hooks = hooks
        self.pending: dict[tuple[int, int], list[wire.EventsMessage]] = {}  # (node, stream) -> not committed
        self.committed = BlockRanges()  # blocks whose events are applied
        self.commits_changed = True  # control has not heard of the latest commits
        self.frames_superseded = 0  # frames of fenced streams, dropped (their blocks were resent)
        self.duplicate_blocks = 0
        self.path, self.incomplete_path = scan_paths(output_dir, spec)
        self.ledger = ScanLedger(self.number, self.shape, self.fpp)
        self.started = time.time()
        self.last_activity = time.monotonic()
        self.first_done_at: float | None = None
        self.done_nodes: dict[int, wire.DoneMessage] = {}
        self.counting = CountingRecord()  # the method and models of the frames committed
        self.frames_spilled = 0
        self.sectors_lost = [0] * N_MODULES
        self.n_events = 0  # events so far, held frames too (progress); the file has out.events_written
        self.closed = False
        # frames so far per position (uint16 unless a position takes more frames: memory per position)
        self.rank = np.zeros(spec.n_positions, np.uint16 if self.fpp <= 65535 else np.uint32)
        self.live = LiveImages(self.shape)  # the dashboard's images, binned as frames arrive
        self.held: dict[int, list] = {}  # position -> [(frame number, events, whole, sub-pixel)] not yet written
        self.replaces: Path | None = None  # resume: the incomplete file the resumed one replaces
        self.carried: np.ndarray | None = None  # resume: positions the file being resumed held whole
        self.frames_duplicate = 0  # frames a replay brought again, already in the resumed file
        # Slots holding an incomplete frame (named in the file's ledger, for a replay to complete),
        # and on resume the file's incomplete frames, set aside until replayed whole.
        self.incomplete = IncompleteFrames(spec.n_positions * self.fpp)
        self.provisional = SetAside()
        hooks.check_space()  # before any data is accepted
        earlier = existing_file(output_dir, spec)
        if earlier is not None and not spec.resume:  # never written over: see pipeline.writer.files
            raise FileExistsError(errno.EEXIST, f"{earlier} already exists and is not replaced")
        self.subpixel = subpixel_positions
        self.frames_at_pixel_centres = 0  # frames of a file with sub-pixel positions that came without
        self.out = SparseCountsWriter(self.path, self.shape, FRAME_SHAPE, self.fpp, overwrite=spec.resume,
                                      subpixel_positions=subpixel_positions)
        self.analyses = ScanAnalyses(analyses, self.shape)
        try:
            if earlier is not None:
                self._carry_over(earlier)
            self.recovered = self._recover()
            self.journal = Journal.for_scan(journal_path(self.path), spec, subpixel_positions)
        except OSError:
            self.out.abort()  # no partial file left behind by a scan that never opened
            raise

    def _recover(self) -> bool:
        """A writer that died mid-scan left its journal: rewrite what it had committed (the
        analyses recomputed from the events, the node groups' partials being gone). True when
        this scan's journal was there (even with nothing committed yet)."""
        path = journal_path(self.path)
        if not path.exists():
            return False
        messages = read_journal(path, self.number, self.spec.epoch)
        if messages is None:
            path.unlink()  # another scan's or epoch's: stale
            return False
        for msg in messages:
            if msg.block >= 0:
                self.committed.add(msg.block)
            self.add_events(self._positioned(msg))
            if self.carried is None:  # (a resumed scan's add_events accumulates them itself)
                self.analyses.accumulate(msg.positions, msg.events, msg.offsets, msg.subpixel)
        log.warning("scan %d: a previous writer died mid-scan; %d committed block(s) recovered from %s",
                    self.number, len(messages), path)
        return True

    def _carry_over(self, path: Path) -> None:
        """Resume (a replay): copy the frames already in the file, its ledger and what its frames
        add to the analyses into the new file. From here on the analyses follow the frames
        written, not the node groups' partials, so that frames the replay brings again (positions
        the file held whole) change nothing."""
        earlier, slots, events, points, self.provisional = frames_to_resume(path, self.fpp)
        ledger = earlier.get("ledger", {})
        self.counting.carry(earlier, len(slots) + len(self.provisional))
        if "frames_complete" in ledger:
            prior = ScanLedger.from_dict({**ledger, "scan_number": self.number, "scan_rows": self.shape[0],
                                          "scan_cols": self.shape[1], "frames_per_position": self.fpp})
            self.ledger.merge(prior)
            self.ledger.frames_incomplete -= len(self.provisional)  # counted again once placed
            self.frames_spilled = int(ledger.get("frames_spilled", 0))
        if len(slots):
            frames = Frames.joined(events, points)
            self.frames_at_pixel_centres += len(slots) if self.subpixel and points is None else 0
            self._put(slots, frames)
            np.add.at(self.rank, slots // self.fpp, 1)
            self.analyses.accumulate(slots // self.fpp, frames.events, frames.offsets, frames.subpixel)
            self.n_events += int(frames.offsets[-1])
        np.add.at(self.rank, self.provisional.slots() // self.fpp, 1)  # kept: replayed whole, or written back
        self.carried = self.rank >= self.fpp
        log.info("scan %d: resuming %s with %d frames already counted", self.number, path, len(slots))
        if path != self.path:
            self.replaces = path  # the incomplete file, removed once the resumed one is closed

    # -- commits and failover ----------------------------------------------------------------------

    def _current(self, stream: int) -> bool:
        """False (and the message is dropped) for a stream that a newer generation superseded."""
        self.last_activity = time.monotonic()
        return stream >= self.generation

    def receive_events(self, msg: wire.EventsMessage) -> bool:
        """Hold a node group's events until its stream commits them; False if superseded."""
        if not self._current(msg.stream):
            return False
        self.pending.setdefault((msg.node, msg.stream), []).append(msg)
        return True

    def receive_partials(self, node: int, stream: int, parts: list) -> bool:
        """The ANALYSIS message after a node group's events: commit them with these (False: superseded)."""
        if not self._current(stream):
            return False
        self._commit((node, stream), parts)
        self.last_activity = time.monotonic()
        return True

    def receive_done(self, msg: wire.DoneMessage) -> bool:
        """A node group finished the scan: commit what it sent last; False if superseded."""
        if not self._current(msg.stream):
            return False
        self._commit((msg.node, msg.stream))
        self._add_done(msg)
        return True

    def _commit(self, key: tuple[int, int], parts: list | None = None) -> None:
        """Write a stream's pending events, each block once, and add them to the analyses: the
        node group's ``parts`` if they cover exactly the frames written, else computed here. They
        cover more when a block was committed already (resent after a failover while commits
        lagged, counted again), fewer when events never came; at close there may be none."""
        fresh, again = [], 0
        for msg in self.pending.pop(key, []):
            if msg.block >= 0:
                if not self.committed.add(msg.block):  # resent after a fence that came too late
                    self.duplicate_blocks += 1
                    again += 1
                    continue
                self.commits_changed = True
            self.journal.add(msg, self.hooks.latest_spec())  # before control hears of the commit
            self._add_tally(msg.ledger, msg.block)
            fresh.append(self._positioned(msg))
        batch = wire.concat_events(fresh) if fresh else None
        if batch is not None:  # the blocks of one commit written as one batch: the writer's cost is per call
            self.add_events(batch)
        if self.carried is not None:  # a resumed scan's analyses follow the frames it writes (add_events)
            return
        frames = 0 if batch is None else len(batch.frame_numbers)
        if parts is not None and not again and self._merge(parts, frames):
            return
        if batch is not None:
            self.analyses.accumulate(batch.positions, batch.events, batch.offsets, batch.subpixel)

    def _positioned(self, msg: wire.EventsMessage) -> wire.EventsMessage:
        """``msg`` with the sub-pixel positions a file that keeps them needs (counted when they are
        its pixel centres), so that those of a batch of several messages stay with their events."""
        msg, centred = with_subpixel(msg) if self.subpixel else (msg, 0)
        self.frames_at_pixel_centres += centred
        return msg

    def _merge(self, parts: list, frames: int) -> bool:
        """Merge a node group's partials if they cover ``frames`` frames; False (nothing merged)
        if not, or if they do not fit this scan's analyses (counted as rejected)."""
        try:
            info = decode_partials(parts).info
            if info.get("frames", 0) + info.get("skipped", 0) != frames:
                return False
            window = self.analyses.merge_parts(parts).window
        except MessageError as exc:
            self.hooks.reject(exc.reason, str(exc))
            return False
        if window is not None:
            self.live.touched(*window)
        return True

    def follow(self, spec: ScanSpec) -> None:
        """Take a new routing generation: fence the older streams."""
        if spec.generation <= self.generation:
            return
        stale = [key for key in self.pending if key[1] < spec.generation]  # (a newer stream's may be here already)
        dropped = sum(len(m.frame_numbers) for key in stale for m in self.pending.pop(key))
        self.frames_superseded += dropped
        self.spec = spec
        self.generation, self.alive = spec.generation, list(spec.alive)
        # a DONE of an older generation says nothing of the resent blocks; one of this one stands
        self.done_nodes = {n: d for n, d in self.done_nodes.items() if d.stream >= spec.generation}
        self.first_done_at = self.first_done_at if self.done_nodes else None
        self.commits_changed = True
        self.last_activity = time.monotonic()
        log.warning("scan %d: routing generation %d (node groups %s); %d uncommitted frame(s) dropped, to be resent",
                    self.number, self.generation, self.alive, dropped)

    def commit_report(self) -> dict:
        """What control is told (op ``committed``): blocks committed, generation fenced, DONEs."""
        self.journal.sync()  # what control hears of is on disk first
        self.commits_changed = False
        return {"scan": self.number, "ranges": self.committed.ranges(), "fenced": self.generation,
                "done": sorted(self.done_nodes)}

    # -- applying ----------------------------------------------------------------------------------

    def add_events(self, msg: wire.EventsMessage) -> None:
        """Write a committed message's frames (or hold them until their position is complete)."""
        self.counting.note(msg.node, msg.stream, msg.counting, len(msg.frame_numbers))
        self.last_activity = time.monotonic()
        self._add_tally(msg.ledger, msg.block)
        if len(msg.frame_numbers) == 0:  # a block finished without frames to write (spilled, or all lost)
            return
        self.hooks.check_space()  # one statvfs call, ~2 us
        positions = msg.positions
        ok = (positions >= 0) & (positions < len(self.rank))
        if not ok.all():
            self.hooks.reject("position_out_of_bounds", f"{int((~ok).sum())} frame(s)")
        complete = msg.present == _ALL_MODULES
        frames = Frames(msg.events, msg.offsets, msg.subpixel)
        if self.carried is not None:  # a replay: what the resumed file held whole stays as it was
            # an incomplete frame of the resumed file is replaced by that frame whole only, in its slot
            taken, slots = self.provisional.take(msg.frame_numbers, positions, ok & complete)
            again = ok & ~taken & self.carried[np.where(ok, positions, 0)]
            self.frames_duplicate += int(again.sum())
            ok &= ~again
            self.analyses.accumulate(*select_frames(positions, msg.events, msg.offsets, ok, msg.subpixel))
            self._put(slots, frames.select(np.flatnonzero(taken)))
            self.ledger.frames_complete += len(slots)
            self.n_events += int(np.diff(msg.offsets)[taken].sum())
            ok &= ~taken
        if self.fpp == 1:  # (several frames per position: marked when written, _release)
            first = ok.copy()
            first[ok] = self.rank[positions[ok]] == 0
            self.incomplete.mark(positions[first & ~complete], msg.frame_numbers[first & ~complete])
        self.ledger.frames_complete += int(complete[ok].sum())
        self.ledger.frames_incomplete += int((~complete[ok]).sum())
        self.n_events += int(np.diff(msg.offsets)[ok].sum()) if len(msg.offsets) > 1 else 0
        if self.fpp == 1:
            self._write(positions[ok], frames, np.flatnonzero(ok))
            return
        # Several frames per position: a position's frames may come from two node groups (when
        # a routing block ends between them); hold them until all are in, then write them in
        # frame-number order, so slot j is the j-th frame as offline counting numbers them.
        for i in np.flatnonzero(ok):
            p = int(positions[i])
            held = self.held.setdefault(p, [])
            events, subpixel = frames.frame(i)
            held.append((int(msg.frame_numbers[i]), events, complete[i], subpixel))
            if len(held) + self.rank[p] >= self.fpp:
                self._release(p)

    def _add_tally(self, tally: dict | None, block: int) -> None:
        """A block's sector counts: added once, when it is committed."""
        if tally is not None:
            self.ledger.add_sector_tally(tally, block)
            self.frames_spilled += int(tally.get("frames_spilled", 0))

    def _release(self, p: int) -> None:
        held = sorted(self.held.pop(p), key=lambda item: item[0])
        self.incomplete.mark_in_order(p * self.fpp + int(self.rank[p]), (p + 1) * self.fpp, held)  # as _write puts them
        frames = Frames.joined([e for _, e, _, _ in held], [s for _, _, _, s in held] if self.subpixel else None)
        self._write(np.full(len(held), p, np.int64), frames, np.arange(len(held)))

    def _restore_provisional(self) -> None:
        """A resume: the file's incomplete frames that the replay did not bring whole, back in their slots."""
        slots, events, numbers, points = self.provisional.rest()
        self.frames_at_pixel_centres += sum(p is None for p in points) if self.subpixel else 0
        frames = Frames.joined(events, points if self.subpixel else None)
        self.ledger.frames_incomplete += len(slots)
        self.incomplete.mark(slots, numbers)
        self.n_events += int(frames.offsets[-1])
        self.analyses.accumulate(slots // self.fpp, frames.events, frames.offsets, frames.subpixel)
        self._put(slots, frames)

    def _write(self, positions: np.ndarray, frames: Frames, index: np.ndarray) -> None:
        """Write ``frames`` ``index`` at ``positions`` (one per index), each at its position's
        next free slot (frames.next_slots); frames beyond frames_per_position are counted, not written."""
        positions = np.asarray(positions, np.int64)
        if len(positions):
            self.live.touched(int(positions.min()), int(positions.max()) + 1)
        if first_frames_in_order(self.rank, self.fpp, positions, len(index) == len(frames)):  # the usual block
            self.rank[positions] = 1
            self._put(positions, frames)
            return
        slots, over = next_slots(self.rank, self.fpp, positions)
        self.ledger.frames_over_capacity += int(over.sum())
        keep = np.flatnonzero(~over)
        if len(keep):
            self._put(slots[keep], frames.select(index[keep]))

    def _put(self, slots: np.ndarray, frames: Frames) -> None:
        """Write ``frames`` in ``slots``, with their sub-pixel positions when the file keeps them."""
        self.out.write_flat(slots, frames.events, frames.offsets, frames.points() if self.subpixel else None)

    def _add_done(self, msg: wire.DoneMessage) -> None:
        self.last_activity = time.monotonic()
        if msg.node in self.done_nodes and self.done_nodes[msg.node].stream >= msg.stream:
            return
        self.done_nodes[msg.node] = msg
        self.commits_changed = True
        if self.first_done_at is None:
            self.first_done_at = time.monotonic()
        d = msg.ledger  # what no block's EVENTS message carried (late sectors ...)
        self.ledger.add_sector_tally(d)
        self.frames_spilled += int(d.get("frames_spilled", 0))
        for m in range(N_MODULES):
            self.sectors_lost[m] += int(msg.lost[m]) if m < len(msg.lost) else 0

    # -- what the writer shows and reports ---------------------------------------------------------

    @property
    def frames_written(self) -> int:
        return self.out.slots_written

    @property
    def has_frames(self) -> bool:
        """Some frame (or partial result) of this scan has arrived."""
        return self.analyses.frames > 0 or self.ledger.frames_received > 0

    def live_images(self) -> dict[str, bytes]:
        """The analyses' current images as PNG bytes, ``<analysis>/<name>`` -> PNG, at most
        LIVE_SIDE pixels a side whatever the scan's size (pipeline.writer.live.LiveImages)."""
        return self.live.render(self.analyses, self.rank)

    def progress(self) -> dict:
        return {"frames_written": self.ledger.frames_received, "frames_expected": self.ledger.frames_expected,
                "frames_complete": self.ledger.frames_complete, "frames_incomplete": self.ledger.frames_incomplete,
                "events": self.n_events, "seconds": time.time() - self.started}

    # -- closing -----------------------------------------------------------------------------------

    def should_close(self) -> bool:
        """Every node group of the generation sent DONE, or the flow timeouts ran out."""
        missing = set(self.alive) - set(self.done_nodes)
        if self.alive and not missing:
            return True
        idle = time.monotonic() - self.last_activity
        # A missing node group that control knows is either slow or about to be failed over
        # (control decides that after dead_after_s): wait for it, up to scan_timeout_s.
        unknown = not any(self.hooks.node_heard(n) for n in missing)
        if self.first_done_at is not None and idle > self.flow.end_timeout_s and unknown:
            return True
        return idle > self.flow.scan_timeout_s

    def _thresholds(self) -> Thresholds | None:
        """Calibrated thresholds are decided after the scan starts and reach the writer in the
        specs of control's heartbeat replies; if none has brought them yet, heartbeat now."""
        for spec in (self.hooks.latest_spec(), self.spec):
            if spec is not None and spec.thresholds is not None:
                return spec.thresholds
        self.hooks.heartbeat()
        spec = self.hooks.latest_spec()
        return None if spec is None else spec.thresholds

    def _final_ledger(self) -> dict:
        ledger = self.ledger.as_dict()
        ledger["frames_spilled"] = self.frames_spilled
        ledger["sectors_lost"] = list(self.sectors_lost)
        ledger["node_groups_missing"] = sorted(set(self.alive) - set(self.done_nodes))
        failovers = self.spec.failovers
        if failovers:  # by generation: HDF5 attributes hold maps and lists of numbers, not lists of maps
            ledger["failovers"] = {str(f.generation): {k: v for k, v in vars(f).items() if k != "generation"}
                                   for f in failovers}
            ledger["frames_superseded"] = self.frames_superseded
            ledger["duplicate_blocks"] = self.duplicate_blocks
        if self.carried is not None:
            ledger["frames_replayed_again"] = self.frames_duplicate
        if self.subpixel:
            ledger["frames_at_pixel_centres"] = self.frames_at_pixel_centres
        return ledger

    def close(self) -> dict:
        """Write what is left, the metadata, ledger and analyses; rename the file into place.
        Returns the scan's summary (what the writer reports to control)."""
        self.hooks.check_space()
        for key in list(self.pending):  # a stream whose DONE never came: apply what it sent
            self._commit(key)
        for p in sorted(self.held):  # positions that never got all their frames
            self._release(p)
        self._restore_provisional()
        thresholds = self._thresholds()
        if thresholds is not None:
            self.out.set_metadata("electron_counting", thresholds.stempy_attributes())
        elapsed = time.time() - self.started
        ledger = self._final_ledger()
        in_file = {**ledger, **self.incomplete.ledger(self.fpp)}
        self.out.set_metadata("stemstream", {
            "software": "stemstream", "software_version": SOFTWARE_VERSION, "mode": "stream",
            "scan_number": self.number, "epoch": self.spec.epoch, "node_groups": len(self.spec.nodes),
            "seconds": elapsed, "events": self.out.events_written, "ledger": in_file,
            **self.counting.metadata()})
        results = self.analyses.finish()
        store_results(self.out.h5file, self.analyses.analyses, results, info={**self.analyses.info(), "source": "stream"})
        # frames missing: the name says so (pipeline.writer.files); a replay completes it
        path = self.path if ledger["frames_missing"] == 0 else self.incomplete_path
        self.out.close(path)
        if self.replaces is not None and self.replaces != path:
            self.replaces.unlink(missing_ok=True)  # the resumed incomplete file, now in ``path``
        elif path != self.path:
            self.path.unlink(missing_ok=True)  # a resume that is still incomplete: one name only
        self.journal.close(delete=True)  # the file holds it all now
        summary = {
            "scan": self.number, "path": str(path), "ledger": ledger, "events": self.out.events_written,
            "seconds": elapsed, "frames_per_second": self.ledger.frames_received / elapsed if elapsed > 0 else 0.0,
            "thresholds": None if thresholds is None else thresholds.as_dict(),
            "closed_wall": time.time(),  # file renamed into place (wall clock, s)
        }
        try:
            pngs = write_pngs(self.analyses.analyses, results, path.parent, Path(self.spec.file_name).stem)
        except OSError as exc:
            log.warning("scan %d: images not written: %s", self.number, exc)
            pngs = []
        summary["images"] = [str(p) for p in pngs]
        self.closed = True
        if ledger["node_groups_missing"]:
            log.warning("scan %d closed without DONE from node group(s) %s", self.number, ledger["node_groups_missing"])
        log.info("scan %d written to %s", self.number, path)
        return summary

    def abort(self) -> None:
        """The scan failed: delete its partial file and journal (best effort)."""
        try:
            self.out.abort()
            self.journal.close(delete=True)
        except OSError as exc:
            log.warning("scan %d: could not delete %s: %s", self.number, self.out.tmp_path, exc)
