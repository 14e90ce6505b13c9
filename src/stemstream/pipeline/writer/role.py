"""Writer: the role that writes each scan's counted file while the scan runs (pipeline.writer.scan
holds one scan's file and state).

The writer pulls the node groups' EVENTS, ANALYSIS and DONE messages from one socket
(``[network] writer_port``) and hands each to its scan, opened when its first message arrives or
when control's heartbeat replies name it. It tells control what each scan committed (producers
free those blocks; after a failover they resend the rest), follows the routing generations and
thresholds those replies carry, closes a scan when every node group of its generation sent DONE
or the flow timeouts run out, and reports the end of every scan to control, until control hears
it. A scan whose disk fills or vanishes fails alone: its partial file is deleted and the writer
goes on. The dashboard's live images come from the writer's own service (pipeline.writer.live).
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
import psutil
import zmq

from stemstream.analysis import default_analyses, warm_up
from stemstream.core.detector import FRAME_SHAPE
from stemstream.core.scan_spec import ScanSpec
from stemstream.formats import wire
from stemstream.formats.sparse_h5 import SparseCountsWriter
from stemstream.pipeline.role import Role, message_size
from stemstream.pipeline.routing import to_ranges
from stemstream.pipeline.writer.files import existing_file, finished_summary
from stemstream.pipeline.writer.journal import journal_path
from stemstream.pipeline.writer.live import LiveService
from stemstream.pipeline.writer.scan import ScanHooks, WriterScan

log = logging.getLogger(__name__)

# Live progress (and images, while someone watches) is refreshed this often while a scan runs.
_LIVE_INTERVAL_S = 0.4
# Commits go to control at most this often (producers free their resend buffers from them).
_COMMIT_REPORT_S = 0.1


def load_writer_kernels(analyses) -> None:
    """Compile, or load from numba's cache, every kernel the writer runs: the analyses' merge and
    views, and the counted file's check of each batch of events (one frame into a throw-away
    file). Loading them mid-scan cost the first scan ~0.7 s of its commits (a py-spy profile of
    the writer); compiling them is deploy.kernels'."""
    warm_up(analyses)
    with tempfile.TemporaryDirectory(prefix="stemstream-kernels-") as tmp:
        out = SparseCountsWriter(Path(tmp) / "warm.h5", (1, 1))
        try:
            out.write_flat(np.zeros(1, np.int64), np.zeros(1, np.uint32), np.array([0, 1], np.int64))
        finally:
            out.abort()


# -- disk checks ---------------------------------------------------------------------------------
# HDF5 (2.0.0, through h5py 3.16) crashes the process with a segmentation fault when the disk
# fills inside a write, so the writer never lets it get there: a scan needs this much free space
# to start, and fails cleanly (partial file deleted, control told, the writer goes on) as soon as
# free space drops below it. The reserve covers a flush of buffered frames (~4 MB at most) and
# what close() writes: the /analysis images and the ledger's mask, a few bytes per position.
RESERVE_BYTES = 64 * 1024 * 1024
RESERVE_BYTES_PER_POSITION = 64


# -- memory check --------------------------------------------------------------------------------
# Beyond its analyses' sums the writer holds a few bytes per position (frame ranks, flags) and,
# while it closes, the results and the DPC's Fourier arrays (complex, several at once): ~128 bytes.
CLOSE_BYTES_PER_POSITION = 128


def bytes_per_position(analyses, frames_per_position: int) -> int:
    """What the writer holds per scan position at most: the analyses' per-position sums (their
    partial for two positions less that for one: summed patterns and the like cost the same
    whatever the scan), a rank, per frame a written and an incomplete flag and a frame number
    (pipeline.writer.incomplete), and what close() computes."""
    def nbytes(shape: tuple[int, int]) -> int:  # shape: (rows, cols) of positions
        return sum(a.nbytes for an in analyses for a in an.new_partial(shape).values() if hasattr(a, "nbytes"))

    return nbytes((1, 2)) - nbytes((1, 1)) + 4 + 6 * frames_per_position + CLOSE_BYTES_PER_POSITION


def check_memory(analyses, spec: ScanSpec) -> None:
    """OSError(ENOMEM) for a scan whose per-position results could not fit in this machine's
    available memory (a 65535 x 65535 scan needs ~0.8 TB): the scan fails with that sentence
    instead of the writer dying of a MemoryError, or of the kernel's OOM killer, mid-scan."""
    need = spec.n_positions * bytes_per_position(analyses, spec.frames_per_position)
    available = psutil.virtual_memory().available
    if need > available:
        rows, cols = spec.shape
        raise OSError(errno.ENOMEM, f"a scan of {rows} x {cols} positions needs ~{need / 1e9:.1f} GB of memory in "
                                    f"the writer for its per-position results, {available / 1e9:.1f} GB is available")


# -- the summary control hears -------------------------------------------------------------------
# Control's messages are small (transport.messages.MAX_ENVELOPE_BYTES, 64 KiB): the ledger's blocks
# lacking a module travel as ranges, and not at all beyond this many (the file's ledger names them).
MAX_LACKING_RANGES = 2048


def summary_for_control(number: int, summary: dict) -> dict:
    """``summary`` as control takes it: the ledger's ``blocks_lacking`` (module -> blocks) as
    module -> block ranges (pipeline.routing), left out past MAX_LACKING_RANGES ranges (a producer
    started again late then cannot learn what to spill of this scan; said in the log)."""
    ledger = summary.get("ledger")
    lacking = ledger.get("blocks_lacking") if isinstance(ledger, dict) else None
    if not lacking:
        return summary
    ranges = {module: to_ranges(int(b) for b in blocks) for module, blocks in lacking.items()}
    if sum(len(r) for r in ranges.values()) > MAX_LACKING_RANGES:
        log.warning("scan %d: the blocks lacking a module are too scattered to tell control (%d ranges); "
                    "the file's ledger names them", number, sum(len(r) for r in ranges.values()))
        ranges = {}
    ledger = {k: v for k, v in ledger.items() if k != "blocks_lacking"}
    return {**summary, "ledger": {**ledger, "blocks_lacking": ranges} if ranges else ledger}


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


class Writer(Role):
    name = "writer"

    def __init__(self, config, index: int = 0, context: zmq.Context | None = None):
        """Refuses (OutputDirError) an output directory that cannot take files. Binds nothing:
        :meth:`run` calls :meth:`bind` first."""
        check_output_dir(Path(config.pipeline.output_dir))  # refuse to start, before any data
        super().__init__(config, index, context)
        self.output_dir = Path(config.pipeline.output_dir)
        self.failed: dict[int, int] = {}  # scan -> epoch, of scans abandoned after an I/O error
        self.events_in = self.data_socket(zmq.PULL, hwm=64)
        self.live = LiveService(self.context, self.curve)
        self.scans: dict[int, WriterScan] = {}
        self.unreported: dict[int, dict] = {}  # scan -> its scan_done report, control not reached yet
        self.analyses = default_analyses(FRAME_SHAPE, config.analysis)
        self._next_live = 0.0
        self._next_commit_report = 0.0

    def bind(self) -> None:
        """Listen for the node groups' messages and the dashboard's live requests."""
        net = self.config.network
        self.events_in.bind(net.bind(net.writer_port))
        self.live.bind(net.bind(net.live_port))

    # -- opening and failing scans -----------------------------------------------------------------

    def _scan(self, number: int) -> WriterScan | None:
        scan = self.scans.get(number)
        if scan is None:
            spec = self.scan_spec(number)
            if spec is not None:
                scan = self._open(spec)
        return scan

    def _latest_spec(self, spec: ScanSpec) -> ScanSpec | None:
        """Control's newest spec of ``spec``'s scan, if still of the same epoch (same run)."""
        latest = self.scan_specs.get(spec.number)
        return latest if latest is not None and latest.epoch == spec.epoch else None

    def _hooks(self, spec: ScanSpec) -> ScanHooks:
        """What a scan of ``spec`` may ask of this writer; the disk reserve stays the writer's
        policy (RESERVE_BYTES, read at each check)."""
        return ScanHooks(
            latest_spec=lambda: self._latest_spec(spec),
            heartbeat=lambda: self.tick(force=True),
            node_heard=lambda node: f"node-{node}" in self.role_ages,
            reject=self.reject,
            check_space=lambda: check_free_space(self.output_dir, spec.n_positions),
        )

    def _open(self, spec: ScanSpec) -> WriterScan | None:
        """A scan's state and file; None if the file cannot be created (the scan fails) or a
        writer before this one finished it already."""
        if self._finished_before(spec):
            return None
        try:
            check_memory(self.analyses, spec)
            scan = WriterScan(spec, self.output_dir, self.analyses, self.config.flow, self._hooks(spec),
                              subpixel_positions=self.config.counting.method == "clusters")
        except MemoryError:  # the estimate's margin was not enough: the scan fails, not the writer
            self._fail(spec, OSError(errno.ENOMEM, "not enough memory to open the scan's results"))
            return None
        except OSError as exc:
            self._fail(spec, exc)
            return None
        self.scans[spec.number] = scan
        if scan.recovered:
            self._restarted(scan)
        return scan

    def _finished_before(self, spec: ScanSpec) -> bool:
        """A writer that died after renaming this run's file into place, before control heard of
        it: the file is the scan's result (pipeline.writer.files); report it, write nothing."""
        path = existing_file(self.output_dir, spec)
        summary = finished_summary(path, spec) if path is not None else None
        if summary is None:
            return False
        journal_path(Path(self.output_dir) / spec.file_name).unlink(missing_ok=True)
        log.warning("scan %d: %s was finished by a writer that died before reporting it; reporting it now",
                    spec.number, path)
        self.mark_finished(spec)
        self.counters["scans_closed"] += 1
        self._report_done(spec.number, ok=True, summary=summary)
        return True

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
            self.tick(force=True)  # the reply to this heartbeat carries the new generation
            spec = self._latest_spec(scan.spec)
            if spec is not None:
                scan.follow(spec)

    def _failed(self, number: int) -> bool:
        """True for a scan (this epoch of it) abandoned after an I/O error."""
        epoch = self.failed.get(number)
        spec = self.scan_specs.get(number)
        return epoch is not None and (spec is None or spec.epoch == epoch)

    def _fail(self, spec: ScanSpec, exc: OSError, scan: WriterScan | None = None) -> None:
        """Abandon a scan after an I/O error (disk full, directory gone): no file at its final
        path, control told it failed and why; the writer goes on with the other scans."""
        number = spec.number
        if scan is not None:
            scan.abort()  # deletes the partial file
            self.scans.pop(number, None)
        if isinstance(exc, FileExistsError):
            error = f"{exc.strerror}: choose another file name (or move that file away)"
            log.error("scan %d failed: %s", number, error)
        else:
            error = f"cannot write {self.output_dir / spec.file_name}: {exc.strerror or exc}"
            log.error("scan %d failed, %s; no file was left at that path: stream the scan again once the disk "
                      "has room", number, error)
        self.failed[number] = spec.epoch
        self.mark_finished(spec)
        self.live.update(number, scan.progress() if scan is not None else {}, state="failed")
        self.counters["scans_failed"] += 1
        summary = {"scan": number, "error": error, "frames_written": scan.frames_written if scan is not None else 0}
        self._report_done(number, ok=False, summary=summary)

    # -- messages ----------------------------------------------------------------------------------

    def handle(self, parts: list) -> None:
        """One message of a node group: decoded, checked, handed to its scan. One of a scan not
        known yet while control is away is held (Role.hold)."""
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
            if self.hold(number, (parts,), message_size(parts)):
                return
            if not self._failed(number):
                scan = self.known_scan(number)
        except wire.MessageError as exc:
            if exc.reason == "unknown_scan" and self.hold(number, (parts,), message_size(parts), unknown=True):
                return
            if number is None or not self._failed(number):
                self.reject(exc.reason, str(exc))
                return
        if self._failed(number):  # the rest of a scan that failed: not malformed, not written
            self.counters["messages_of_failed_scans"] += 1
            return
        try:
            if not apply(scan):
                self.counters["messages_superseded"] += 1  # of a stream a newer generation fenced
        except OSError as exc:  # the disk is full or gone: this scan fails, the writer goes on
            self._fail(scan.spec, exc, scan)

    # -- closing and reporting ---------------------------------------------------------------------

    def _close(self, scan: WriterScan) -> None:
        try:
            summary = scan.close()
        except OSError as exc:
            self._fail(scan.spec, exc, scan)
            return
        del self.scans[scan.number]
        self.mark_finished(scan.spec)
        self.counters["scans_closed"] += 1
        self.live.update(scan.number, scan.progress(), scan.live_images() if self.live.wanted else None, state="closed")
        self._report_done(scan.number, ok=True, summary=summary)

    def _report_done(self, number: int, ok: bool, summary: dict) -> None:
        """Tell control a scan ended; while control is away, keep telling it (every heartbeat):
        the scan's client waits for this, and a restarted control has the scan still running."""
        self.unreported[number] = {"scan": number, "ok": ok, "summary": summary_for_control(number, summary)}
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

    def tick(self, interval_s: float | None = None, force: bool = False) -> None:
        due = force or time.monotonic() >= self._next_heartbeat
        super().tick(interval_s, force)
        if due and self.unreported:
            self._report_unreported()

    def report_commits(self) -> None:
        """Follow each open scan's routing generation, and tell control what was committed
        (producers free their resend buffers; after a fence, they resend the rest)."""
        now = time.monotonic()
        for scan in list(self.scans.values()):
            spec = self._latest_spec(scan.spec)
            if spec is not None:
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
        """Answer the dashboard's live requests; refresh each open scan's progress, and its
        images while someone is watching (pipeline.writer.live)."""
        self.live.serve()
        now = time.monotonic()
        if now < self._next_live:
            return
        self._next_live = now + _LIVE_INTERVAL_S
        for scan in self.scans.values():
            if scan.has_frames:
                images = scan.live_images() if self.live.due(scan.number) else None
                self.live.update(scan.number, scan.progress(), images)

    # -- the loop ----------------------------------------------------------------------------------

    def _receive(self, poller: zmq.Poller) -> None:
        """Handle what arrived within 20 ms, at most 64 messages (the loop's other duties wait);
        nothing while the messages held for control's return fill their bound."""
        self.release_held(self.handle)
        if self.held_full:
            time.sleep(0.02)
            return
        if not poller.poll(20):
            return
        for _ in range(64):
            try:
                parts = self.events_in.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.handle(parts)
            if self.held_full:
                return

    def run(self) -> None:
        load_writer_kernels(self.analyses)  # before the first scan's frames wait on them
        self.bind()
        poller = zmq.Poller()
        poller.register(self.events_in, zmq.POLLIN)
        while not self.shutdown:
            self.publish_live()
            self.report_commits()
            self._receive(poller)
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
        self.live.close()
