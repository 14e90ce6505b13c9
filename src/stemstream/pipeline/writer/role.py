"""Writer: each scan's counted file, written while the scan runs, closed with its ledger.

Events arrive from the node groups in any order; the writer gives each frame its slot (position x
frames per position + the frame's rank at that position) and appends it to the scan's
SparseCountsWriter, which writes to a temporary name and renames on close. The scan closes when
every node group of its routing generation sent DONE, or when the flow timeouts run out (the
ledger then says what is missing). A scan started with ``resume`` adds frames to an existing file
(the replay of a spill).

Commits: a node group's events are held until the ANALYSIS (or DONE) message that follows them
on the same stream arrives; then events and partials are applied together and their blocks are
*committed*, which the writer tells control (producers then free those blocks). When control
starts a new routing generation after a failover, the writer *fences* the old streams: what they
left uncommitted is dropped and anything more from them ignored, so every block is written once,
from either the old generation or the resent copy (see pipeline.routing).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from stemstream.core.version import SOFTWARE_VERSION
from stemstream.analysis import ScanAnalyses, default_analyses
from stemstream.analysis.run import png_bytes, scale_image, store_results, write_pngs
from stemstream.counting.thresholds import Thresholds
from stemstream.formats import wire
from stemstream.formats.raw import FRAME_SHAPE, N_MODULES
from stemstream.formats.sparse_h5 import SparseCountsWriter, read_counted
from stemstream.formats.ledger import ScanLedger
from stemstream.pipeline.writer.journal import Journal, journal_path, read_journal
from stemstream.pipeline.role import Role
from stemstream.pipeline.routing import alive_nodes, generation, to_ranges

log = logging.getLogger(__name__)

_ALL_MODULES = (1 << N_MODULES) - 1
# Live images go to control this often while a scan runs (the dashboard wants >= 2 per second).
_LIVE_INTERVAL_S = 0.4
# Commits go to control at most this often (producers free their resend buffers from them).
_COMMIT_REPORT_S = 0.1

# -- disk checks ---------------------------------------------------------------------------------
# HDF5 (2.0.0, through h5py 3.16) crashes the process with a segmentation fault when the disk
# fills inside a write, so the writer never lets it get there: a scan needs this much free space
# to start, and fails cleanly (partial file deleted, control told, the writer goes on) as soon as
# free space drops below it. The reserve covers a flush of buffered frames (~4 MB at most) and
# what close() writes: the /analysis images and the ledger's mask, a few bytes per position.
RESERVE_BYTES = 64 * 1024 * 1024
RESERVE_BYTES_PER_POSITION = 64


class OutputDirError(OSError):
    """The output directory cannot take files; the message is one sentence."""


def check_output_dir(path: Path) -> None:
    """Create ``path`` if needed and prove that a file can be created in it (a permission check
    says nothing for root, nor for a read-only file system); OutputDirError if not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".stemstream-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputDirError(exc.errno, f"the output directory {path} is not writable: {exc.strerror or exc}") from None


def check_free_space(path: Path, positions: int) -> None:
    """OSError(ENOSPC) when ``path``'s file system has less room than a scan of ``positions``
    positions needs to go on (RESERVE_BYTES + RESERVE_BYTES_PER_POSITION per position)."""
    need = RESERVE_BYTES + RESERVE_BYTES_PER_POSITION * positions
    free = shutil.disk_usage(path).free
    if free < need:
        raise OSError(errno.ENOSPC, f"only {free / 1e6:.1f} MB free in {path}, a scan of {positions} positions "
                                    f"needs at least {need / 1e6:.1f} MB to go on")


class WriterScan:
    def __init__(self, writer: "Writer", spec: dict):
        self.writer = writer
        self.spec = spec
        self.number = int(spec["scan"])
        self.shape = tuple(spec["scan_shape"])
        self.fpp = int(spec["frames_per_position"])
        self.n_nodes = len(spec["nodes"])
        self.generation = generation(spec)
        self.alive = alive_nodes(spec)
        self.pending: dict[tuple[int, int], list[wire.EventsMessage]] = {}  # (node, stream) -> not committed
        self.committed: set[int] = set()  # blocks whose events are applied
        self.commits_changed = True  # control has not heard of the latest commits
        self.frames_superseded = 0  # frames of fenced streams, dropped (their blocks were resent)
        self.duplicate_blocks = 0
        self.path = Path(writer.config.pipeline.output_dir) / spec["file_name"]
        self.ledger = ScanLedger(self.number, self.shape, self.fpp)
        self.started = time.time()
        self.first_event_at: float | None = None
        self.last_activity = time.monotonic()
        self.first_done_at: float | None = None
        self.done_nodes: dict[int, wire.DoneMessage] = {}
        self.frames_spilled = 0
        self.sectors_lost = [0] * N_MODULES
        self.n_events = 0
        self.closed = False
        self.rank = np.zeros(self.shape[0] * self.shape[1], np.uint16)  # frames so far per position
        self.held: dict[int, list] = {}  # position -> [(frame number, events)] not yet written
        check_free_space(self.path.parent, len(self.rank))  # before any data is accepted
        self.out = SparseCountsWriter(self.path, self.shape, FRAME_SHAPE, self.fpp, overwrite=True)
        self.analyses = ScanAnalyses(writer.analyses, self.shape)
        self.pngs: list[Path] = []
        if spec.get("resume") and self.path.exists():
            self._carry_over(self.path)
        self.recovered = self._recover()
        self.journal = Journal(journal_path(self.path), self.number, int(spec["epoch"]))

    def _recover(self) -> bool:
        """A writer that died mid-scan left its journal: rewrite what it had committed (the
        analyses recomputed from the events, the node groups' partials being gone). True when
        this scan's journal was there (even with nothing committed yet)."""
        path = journal_path(self.path)
        if not path.exists():
            return False
        messages = read_journal(path, self.number, int(self.spec["epoch"]))
        if messages is None:
            path.unlink()  # another scan's or epoch's: stale
            return False
        for msg in messages:
            if msg.block >= 0:
                self.committed.add(msg.block)
            self.add_events(msg)
            self.analyses.accumulate(msg.positions, msg.events, msg.offsets)
        log.warning("scan %d: a previous writer died mid-scan; %d committed block(s) recovered from %s",
                    self.number, len(messages), path)
        return True

    def _carry_over(self, path: Path) -> None:
        """Resume: copy the frames already in the file (and its ledger) into the new file."""
        old = read_counted(path)
        written = old.written
        ledger = old.metadata.get("stemstream", {}).get("ledger", {})
        if "frames_complete" in ledger:
            prior = ScanLedger.from_dict({**ledger, "scan_number": self.number, "scan_rows": self.shape[0],
                                          "scan_cols": self.shape[1], "frames_per_position": self.fpp})
            self.ledger.merge(prior)
            self.frames_spilled = 0
        frames = old.frames.reshape(-1)
        mask = written.reshape(-1).astype(bool) if written is not None else np.ones(len(frames), bool)
        slots = np.flatnonzero(mask)
        if len(slots):
            self.out.write(slots, [frames[i] for i in slots])
            np.add.at(self.rank, slots // self.fpp, 1)
            self.n_events += int(sum(len(frames[i]) for i in slots))
        log.info("scan %d: resuming %s with %d frames already counted", self.number, path, len(slots))

    # -- commits and failover ------------------------------------------------------------------------

    def _current(self, stream: int) -> bool:
        """False (and the message is dropped) for a stream that a newer generation superseded."""
        self.last_activity = time.monotonic()
        if stream < self.generation:
            self.writer.counters["messages_superseded"] += 1
            return False
        return True

    def receive_events(self, msg: wire.EventsMessage) -> None:
        if self._current(msg.stream):
            self.pending.setdefault((msg.node, msg.stream), []).append(msg)

    def receive_partials(self, node: int, stream: int, parts: list) -> None:
        if self._current(stream):
            self._commit((node, stream))
            self.add_partials(parts)

    def receive_done(self, msg: wire.DoneMessage) -> None:
        if self._current(msg.stream):
            self._commit((msg.node, msg.stream))
            self.add_done(msg)

    def _commit(self, key: tuple[int, int]) -> None:
        for msg in self.pending.pop(key, []):
            if msg.block >= 0:
                if msg.block in self.committed:  # resent after a fence that came too late
                    self.duplicate_blocks += 1
                    continue
                self.committed.add(msg.block)
                self.commits_changed = True
            self.journal.add(msg)  # before control hears of the commit
            self.add_events(msg)

    def follow(self, spec: dict) -> None:
        """Take a new routing generation: fence the older streams."""
        if generation(spec) <= self.generation:
            return
        dropped = sum(len(m.frame_numbers) for msgs in self.pending.values() for m in msgs)
        self.frames_superseded += dropped
        self.pending.clear()
        self.spec = spec
        self.generation, self.alive = generation(spec), alive_nodes(spec)
        self.done_nodes.clear()  # DONE of an older generation says nothing of the resent blocks
        self.first_done_at = None
        self.commits_changed = True
        self.last_activity = time.monotonic()
        log.warning("scan %d: routing generation %d (node groups %s); %d uncommitted frame(s) dropped, to be resent",
                    self.number, self.generation, self.alive, dropped)

    def commit_report(self) -> dict:
        self.journal.sync()  # what control hears of is on disk first
        self.commits_changed = False
        return {"scan": self.number, "ranges": to_ranges(self.committed), "fenced": self.generation,
                "done": sorted(self.done_nodes)}

    # -- applying ----------------------------------------------------------------------------------

    def add_events(self, msg: wire.EventsMessage) -> None:
        self.last_activity = time.monotonic()
        if msg.ledger is not None:  # the block's sector counts: added once, when it is committed
            self.ledger.add_sector_tally(msg.ledger)
            self.frames_spilled += int(msg.ledger.get("frames_spilled", 0))
        if len(msg.frame_numbers) == 0:  # a block finished without frames to write (spilled, or all lost)
            return
        check_free_space(self.path.parent, len(self.rank))  # one statvfs call, ~2 us
        if self.first_event_at is None:
            self.first_event_at = time.time()
        positions = msg.positions
        ok = (positions >= 0) & (positions < len(self.rank))
        if not ok.all():
            self.writer.reject("position_out_of_bounds", f"{int((~ok).sum())} frame(s)")
        complete = msg.present == _ALL_MODULES
        self.ledger.frames_complete += int(complete[ok].sum())
        self.ledger.frames_incomplete += int((~complete[ok]).sum())
        self.n_events += int(msg.offsets[-1]) if len(msg.offsets) else 0
        if self.fpp == 1:
            self._write(positions[ok], msg.events, msg.offsets, np.flatnonzero(ok))
            return
        # Several frames per position: a position's frames may come from two node groups (when
        # a routing block ends between them); hold them until all are in, then write them in
        # frame-number order, so slot j is the j-th frame as offline counting numbers them.
        for i in np.flatnonzero(ok):
            p = int(positions[i])
            held = self.held.setdefault(p, [])
            held.append((int(msg.frame_numbers[i]), msg.events[msg.offsets[i]:msg.offsets[i + 1]].copy()))
            if len(held) + self.rank[p] >= self.fpp:
                self._release(p)

    def _release(self, p: int) -> None:
        held = sorted(self.held.pop(p))
        events = [e for _, e in held]
        offsets = np.zeros(len(events) + 1, np.int64)
        np.cumsum([len(e) for e in events], out=offsets[1:])
        flat = np.concatenate(events) if events else np.empty(0, np.uint32)
        self._write(np.full(len(events), p, np.int64), flat, offsets, np.arange(len(events)))

    def _write(self, positions: np.ndarray, events: np.ndarray, offsets: np.ndarray, index: np.ndarray) -> None:
        """Write frames ``index`` of (events, offsets) at ``positions`` (one per index), each at its
        position's next free slot; frames beyond frames_per_position are counted, not written."""
        slots = np.full(len(index), -1, np.int64)
        for k, p in enumerate(positions.tolist()):
            j = self.rank[p]
            if j >= self.fpp:
                self.ledger.frames_over_capacity += 1
                continue
            self.rank[p] = j + 1
            slots[k] = p * self.fpp + j
        keep = np.flatnonzero(slots >= 0)
        if len(keep) == len(index) and np.array_equal(index, np.arange(len(offsets) - 1)):
            self.out.write_flat(slots, events, offsets)
        elif len(keep):
            self.out.write(slots[keep], [events[offsets[index[k]]:offsets[index[k] + 1]] for k in keep])

    def add_partials(self, parts: list) -> None:
        self.last_activity = time.monotonic()
        self.analyses.merge_parts(parts)

    def live_images(self) -> dict[str, bytes]:
        """The analyses' current images as PNG bytes, ``<analysis>/<name>`` -> PNG. Scan images
        show positions not yet scanned as blank (NaN), so the colour scale follows the data that
        is in; frame-sized images are binned 2 x 2 (what a browser tile shows, a quarter of the
        cost of rendering)."""
        scanned = (self.rank > 0).reshape(self.shape)
        images = {}
        for name, views in self.analyses.views().items():
            for key, view in views.items():
                image = np.asarray(view.image, np.float64)
                if image.shape == self.shape:
                    image = np.where(scanned, image, np.nan)
                elif image.shape[0] % 2 == 0 and image.shape[1] % 2 == 0 and image.size > 4 * len(self.rank):
                    image = image.reshape(image.shape[0] // 2, 2, image.shape[1] // 2, 2).sum(axis=(1, 3))
                images[f"{name}/{key}"] = png_bytes(scale_image(image, view.kind))
        return images

    def progress(self) -> dict:
        return {"frames_written": self.ledger.frames_received, "frames_expected": self.ledger.frames_expected,
                "frames_complete": self.ledger.frames_complete, "frames_incomplete": self.ledger.frames_incomplete,
                "events": self.n_events, "seconds": time.time() - self.started}

    def add_done(self, msg: wire.DoneMessage) -> None:
        self.last_activity = time.monotonic()
        if msg.node in self.done_nodes:
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

    def _thresholds_from_control(self) -> dict | None:
        """Calibrated thresholds are decided after the scan starts: ask control for them."""
        try:
            reply = self.writer.control.request("get_scan", timeout_s=2.0, scan=self.number)
        except Exception:
            return None
        return reply.get("scan", {}).get("thresholds") if reply.get("ok") else None

    def should_close(self) -> bool:
        missing = set(self.alive) - set(self.done_nodes)
        if self.alive and not missing:
            return True
        flow = self.writer.config.flow
        idle = time.monotonic() - self.last_activity
        # A missing node group that control knows is either slow or about to be failed over
        # (control decides that after dead_after_s): wait for it, up to scan_timeout_s.
        unknown = all(f"node-{n}" not in self.writer.role_ages for n in missing)
        if self.first_done_at is not None and idle > flow.end_timeout_s and unknown:
            return True
        return idle > flow.scan_timeout_s

    def close(self) -> dict:
        check_free_space(self.path.parent, len(self.rank))
        for p in sorted(self.held):
            self._release(p)
        thresholds = self.spec.get("thresholds") or self._thresholds_from_control()
        if thresholds:
            self.out.set_metadata("electron_counting", Thresholds(**thresholds).stempy_attributes())
        elapsed = time.time() - self.started
        for key in list(self.pending):  # a stream whose DONE never came: apply what it sent
            self._commit(key)
        missing_nodes = sorted(set(self.alive) - set(self.done_nodes))
        ledger = self.ledger.as_dict()
        ledger["frames_spilled"] = self.frames_spilled
        ledger["sectors_lost"] = list(self.sectors_lost)
        ledger["node_groups_missing"] = missing_nodes
        failovers = self.spec.get("failovers", [])
        if failovers:  # by generation: HDF5 attributes hold maps and lists of numbers, not lists of maps
            ledger["failovers"] = {str(f["generation"]): {k: v for k, v in f.items() if k != "generation"}
                                   for f in failovers}
            ledger["frames_superseded"] = self.frames_superseded
            ledger["duplicate_blocks"] = self.duplicate_blocks
        summary = {
            "scan": self.number,
            "path": str(self.path),
            "ledger": ledger,
            "events": self.n_events,
            "seconds": elapsed,
            "frames_per_second": self.ledger.frames_received / elapsed if elapsed > 0 else 0.0,
            "thresholds": thresholds,
        }
        self.out.set_metadata("stemstream", {
            "software": "stemstream", "software_version": SOFTWARE_VERSION, "mode": "stream",
            "scan_number": self.number, "node_groups": self.n_nodes, "seconds": elapsed,
            "events": self.n_events, "ledger": ledger,
        })
        results = self.analyses.finish()
        store_results(self.out.h5file, self.analyses.analyses, results,
                      info={**self.analyses.info(), "source": "stream"})
        self.out.close()
        self.journal.close(delete=True)  # the file holds it all now
        summary["closed_wall"] = time.time()  # file renamed into place (wall clock, s)
        try:
            self.pngs = write_pngs(self.analyses.analyses, results, self.path.parent, self.path.stem)
        except OSError as exc:
            log.warning("scan %d: images not written: %s", self.number, exc)
        summary["images"] = [str(p) for p in self.pngs]
        self.closed = True
        if missing_nodes:
            log.warning("scan %d closed without DONE from node group(s) %s", self.number, missing_nodes)
        log.info("scan %d written to %s", self.number, self.path)
        return summary


class Writer(Role):
    name = "writer"

    def __init__(self, config, index: int = 0, context: zmq.Context | None = None):
        check_output_dir(Path(config.pipeline.output_dir))  # refuse to start, before any data
        super().__init__(config, index, context)
        self.failed: dict[int, int] = {}  # scan -> epoch, of scans abandoned after an I/O error
        self.events_in = self.data_socket(zmq.PULL, hwm=64)
        self.events_in.bind(config.network.bind(config.network.writer_port))
        self.scans: dict[int, WriterScan] = {}
        self.unreported: dict[int, dict] = {}  # scan -> its scan_done report, control not reached yet
        self.analyses = default_analyses(FRAME_SHAPE, config.analysis)
        self._next_live = 0.0
        self._next_commit_report = 0.0

    def _scan(self, number: int) -> WriterScan | None:
        scan = self.scans.get(number)
        if scan is None:
            spec = self.scan_spec(number)
            if spec is not None:
                scan = self._open(spec)
        return scan

    def _open(self, spec: dict) -> WriterScan | None:
        """A scan's state and file; None if the file cannot be created (the scan fails)."""
        try:
            scan = self.scans[int(spec["scan"])] = WriterScan(self, spec)
        except OSError as exc:
            self._fail(spec, exc)
            return None
        if scan.recovered:
            self._restarted(scan)
        return scan

    def _restarted(self, scan: WriterScan) -> None:
        """This writer took over a running scan from one that died: whatever it had not
        committed is lost with it, so control starts a new routing generation and the producers
        stream it all again."""
        try:
            reply = self.control.request("writer_restarted", timeout_s=5.0, scan=scan.number)
        except Exception as exc:
            log.error("scan %d: could not ask control to resend what a dead writer lost: %s", scan.number, exc)
            return
        if reply.get("ok"):
            self.scan_specs[scan.number] = reply["scan"]
            scan.follow(reply["scan"])

    def _failed(self, number: int) -> bool:
        """True for a scan (this epoch of it) abandoned after an I/O error."""
        epoch = self.failed.get(number)
        spec = self.scan_specs.get(number)
        return epoch is not None and (spec is None or int(spec["epoch"]) == epoch)

    def _fail(self, spec: dict, exc: OSError, scan: WriterScan | None = None) -> None:
        """Abandon a scan after an I/O error (disk full, directory gone): no file at its final
        path, control told it failed and why; the writer goes on with the other scans."""
        number = int(spec["scan"])
        path = Path(self.config.pipeline.output_dir) / spec["file_name"]
        if scan is not None:
            try:
                scan.out.abort()  # deletes the partial file
                scan.journal.close(delete=True)
            except OSError as abort_exc:
                log.warning("scan %d: could not delete %s: %s", number, scan.out.tmp_path, abort_exc)
            self.scans.pop(number, None)
        error = f"cannot write {path}: {exc.strerror or exc}"
        log.error("scan %d failed, %s; no file was left at that path: stream the scan again once the disk has room",
                  number, error)
        self.failed[number] = int(spec["epoch"])
        self.mark_finished(spec)
        self.counters["scans_failed"] += 1
        summary = {"scan": number, "error": error,
                   "frames_written": scan.out.slots_written if scan is not None else 0}
        self._report_done(number, ok=False, summary=summary)

    def handle(self, parts: list) -> None:
        number = None
        try:
            kind = wire.kind_of(parts)
            if kind == wire.EVENTS:
                msg = wire.decode_events(parts, FRAME_SHAPE[0] * FRAME_SHAPE[1])
                number, apply = msg.scan, lambda scan: scan.receive_events(msg)
            elif kind == wire.ANALYSIS:
                envelope = wire.analysis_envelope(parts)
                number = envelope["scan"]
                apply = lambda scan: scan.receive_partials(envelope["node"], envelope["stream"], parts[2:])  # noqa: E731
            elif kind == wire.DONE:
                msg = wire.decode_done(parts)
                number, apply = msg.scan, lambda scan: scan.receive_done(msg)
            else:
                raise wire.MessageError("unexpected_kind", repr(kind))
            if not self._failed(number):
                scan = self.known_scan(number)
        except wire.MessageError as exc:
            if number is None or not self._failed(number):
                self.reject(exc.reason, str(exc))
                return
        if self._failed(number):  # the rest of a scan that failed: not malformed, not written
            self.counters["messages_of_failed_scans"] += 1
            return
        try:
            apply(scan)
        except OSError as exc:  # the disk is full or gone: this scan fails, the writer goes on
            self._fail(scan.spec, exc, scan)

    def _close(self, scan: WriterScan) -> None:
        try:
            summary = scan.close()
        except OSError as exc:
            self._fail(scan.spec, exc, scan)
            return
        del self.scans[scan.number]
        self.mark_finished(scan.spec)
        self.counters["scans_closed"] += 1
        self._report_done(scan.number, ok=True, summary=summary)

    def _report_done(self, number: int, ok: bool, summary: dict) -> None:
        """Tell control a scan ended; while control is away, keep telling it (every heartbeat):
        the scan's client waits for this, and a restarted control has the scan still running."""
        self.unreported[number] = {"scan": number, "ok": ok, "summary": summary}
        self._report_unreported(first=True)

    def _report_unreported(self, first: bool = False) -> None:
        for number, report in list(self.unreported.items()):
            try:
                self.control.request("scan_done", timeout_s=2.0, **report)
            except Exception as exc:  # control away: the file and its metadata still say it all
                (log.warning if first else log.debug)("could not report the end of scan %d to control yet: %s",
                                                      number, exc)
                return
            del self.unreported[number]

    def control_restarted(self) -> None:
        for scan in self.scans.values():
            scan.commits_changed = True  # the new control knows none of the ranges

    def tick(self, interval_s: float | None = None) -> None:
        due = time.monotonic() >= self._next_heartbeat
        super().tick(interval_s)
        if due and self.unreported:
            self._report_unreported()

    def report_commits(self) -> None:
        """Follow each open scan's routing generation, and tell control what was committed
        (producers free their resend buffers; after a fence, they resend the rest)."""
        now = time.monotonic()
        for scan in list(self.scans.values()):
            spec = self.scan_specs.get(scan.number)
            if spec is not None and int(spec["epoch"]) == int(scan.spec["epoch"]):
                scan.follow(spec)
            if scan.commits_changed and now >= self._next_commit_report:
                try:
                    self.control.request("committed", timeout_s=1.0, **scan.commit_report())
                except Exception as exc:  # control busy: the next report carries it all
                    scan.commits_changed = True
                    log.debug("commits of scan %d not reported: %s", scan.number, exc)
        if now >= self._next_commit_report:
            self._next_commit_report = now + _COMMIT_REPORT_S

    def publish_live(self) -> None:
        """Send each open scan's live images and progress to control (for the dashboard)."""
        now = time.monotonic()
        if now < self._next_live:
            return
        self._next_live = now + _LIVE_INTERVAL_S
        for scan in self.scans.values():
            if scan.analyses.frames == 0 and scan.ledger.frames_received == 0:
                continue
            # Rendering costs the writer more than writing: only while someone is watching.
            images = scan.live_images() if self.live_wanted else {}
            try:
                self.control.request("live_images", timeout_s=1.0, scan=scan.number, images=images,
                                     progress=scan.progress())
            except Exception as exc:  # control busy or away: live images are best effort
                log.debug("live images of scan %d not sent: %s", scan.number, exc)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.events_in, zmq.POLLIN)
        while not self.shutdown:
            self.publish_live()
            self.report_commits()
            if poller.poll(20):
                for _ in range(64):
                    try:
                        parts = self.events_in.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.handle(parts)
            for scan in list(self.scans.values()):
                if scan.should_close():
                    self._close(scan)
            # a scan control knows of but no frame reached: open it so its timeout can close it
            for number, spec in list(self.scan_specs.items()):
                if number not in self.scans and not self.is_finished(spec):
                    self._open(spec)
            self.tick()
        for scan in list(self.scans.values()):
            self._close(scan)
        self.events_in.close(0)
