"""The dashboard's lines to the pipeline: poll them, remember what the page needs, push it to browsers.

One asyncio task (:meth:`LiveMonitor.run`) asks control a few times a second for ``status`` (the
scans' lifecycle, the roles' heartbeats) and, while a scan runs and someone watches, asks the
writer's live service (``[network] live_port``) for that scan's latest images and progress; the
writer renders live images only while someone asks. Each tick builds one JSON text that every
WebSocket client gets (a client that falls behind gets only the latest: its queue holds two
messages). Images travel as PNG data URLs, and only when the writer published new ones. Scans
that control reports closed go into the catalog.

Requests are blocking ZeroMQ calls: they run on one worker thread, so the event loop never waits
on them and no socket is shared between threads.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psutil

from stemstream.analysis.stored import image_label, image_order
from stemstream.core.config import FlowSettings, PipelineConfig
from stemstream.core.detector import MODULES
from stemstream.core.scan_spec import ScanSpec, SpecError
from stemstream.transport.control_client import ControlClient, ControlUnavailable
from stemstream.transport.curve import curve_for
from stemstream.web.catalog import RECENT, Catalog, catalog_row_json, image_links

log = logging.getLogger(__name__)

#: Seconds between polls while a browser watches, and while nobody does (catalog upkeep only).
#: Faster than the writer renders (~0.4 s, pipeline.writer.live): every image it renders is pushed.
POLL_WATCHED_S = 0.25
POLL_IDLE_S = 1.0


@dataclass(eq=False)
class Client:
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=2))
    sent: int = 0

    def offer(self, text: str) -> None:
        """Queue ``text``; a client whose queue is full loses its oldest message, not the newest."""
        while True:
            try:
                self.queue.put_nowait(text)
                return
            except asyncio.QueueFull:
                try:
                    self.queue.get_nowait()
                except asyncio.QueueEmpty:  # pragma: no cover
                    pass


@dataclass
class ScanEntry:
    """One scan of control's ``status`` reply, its spec read."""

    spec: ScanSpec
    state: str  # running | closed | failed
    started: float | None  # Unix time
    summary: dict  # the writer's summary once the scan closed, else {}


def read_scans(scans: dict) -> dict[int, ScanEntry]:
    """The scans of a ``status`` reply by number; one whose spec cannot be read is left out."""
    out = {}
    for number, scan in scans.items():
        try:
            spec = ScanSpec.from_wire(scan.get("spec") if isinstance(scan, dict) else None)
        except SpecError as exc:  # a control of another version: show the others
            log.debug("scan %s left out: %s", number, exc)
            continue
        out[spec.number] = ScanEntry(spec, scan.get("state"), scan.get("started"), scan.get("summary") or {})
    return out


def _health(age_s: float, flow: FlowSettings) -> str:
    if age_s <= max(3 * flow.heartbeat_s, 1.5):
        return "ok"
    if age_s <= flow.silent_after_s:
        return "late"
    return "silent"


def _role_row(key: str, role: dict, flow: FlowSettings) -> dict:
    stats = role.get("stats", {}) or {}
    age = float(role.get("age_s", 0.0))
    return {
        "key": key,
        "role": role.get("role", key),
        "id": role.get("id", 0),
        "age_s": round(age, 2),
        "health": _health(age, flow),
        "counters": stats.get("counters", {}),
        "rejected": sum((stats.get("rejected") or {}).values()),
        "rejected_reasons": stats.get("rejected", {}),
        "cpu_s": round(float(stats.get("cpu_s", 0.0)), 1),
        "rss_mib": round(float(stats.get("rss", 0)) / 2**20, 1),
        "pending_blocks": stats.get("pending_blocks"),
    }


def _role_sort(key: str) -> tuple:
    order = {"control": 0, "producer": 1, "gateway": 2, "node": 3, "writer": 4, "dashboard": 5}
    kind, _, index = key.partition("-")
    return (order.get(kind, 9), int(index) if index.isdigit() else 0, key)


def _counts(entry: ScanEntry, progress: dict) -> dict:
    """Frames and events of a scan: the ledger's once it closed, else the writer's live progress."""
    summary = entry.summary
    ledger = summary.get("ledger") if isinstance(summary.get("ledger"), dict) else None
    if ledger is not None:
        return {"ledger": ledger, "frames_written": ledger.get("frames_received", 0),
                "frames_complete": ledger.get("frames_complete", 0),
                "frames_incomplete": ledger.get("frames_incomplete", 0), "events": summary.get("events", 0),
                "seconds": summary.get("seconds", 0.0), "fps_mean": summary.get("frames_per_second", 0.0)}
    written = progress.get("frames_written", 0)
    seconds = progress.get("seconds", time.time() - (entry.started if entry.started is not None else time.time()))
    return {"ledger": None, "frames_written": written, "frames_complete": progress.get("frames_complete", 0),
            "frames_incomplete": progress.get("frames_incomplete", 0), "events": progress.get("events", 0),
            "seconds": seconds, "fps_mean": written / seconds if seconds else 0.0}


class RateMeter:
    """Frames per second over the last few seconds from (seconds, frames) samples."""

    def __init__(self, window_s: float = 2.0):
        self.window_s = window_s
        self.samples: collections.deque = collections.deque()

    def add(self, seconds: float, frames: int) -> None:
        if self.samples and seconds <= self.samples[-1][0]:
            return
        self.samples.append((seconds, frames))
        while len(self.samples) > 2 and seconds - self.samples[1][0] >= self.window_s:
            self.samples.popleft()

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, f0), (t1, f1) = self.samples[0], self.samples[-1]
        return (f1 - f0) / (t1 - t0) if t1 > t0 else 0.0


class LiveMonitor:
    def __init__(self, config: PipelineConfig, catalog: Catalog, *, exit_on_shutdown: bool = False,
                 url: str = "", heartbeat: bool = True):
        self.config = config
        self.catalog = catalog
        self.exit_on_shutdown = exit_on_shutdown
        self.url = url
        self.heartbeat = heartbeat
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="control")
        self.control = ControlClient.for_config(config, timeout_s=1.0)
        self.live = ControlClient(config.network.live(), self.control.context, timeout_s=1.0, curve=curve_for(config))
        self.clients: set[Client] = set()
        self.on_shutdown = None  # set by the server: called when control says the pipeline stops
        self.roles: dict = {}  # control's status: role key -> heartbeat age and stats
        self.scans: dict[int, ScanEntry] = {}  # control's status: the scans it knows
        self.control_ok = False
        self.control_error = "not asked yet"
        self.catalogued: dict[tuple, int] = {}  # (scan, epoch) -> catalog entry
        self.current: int | None = None  # the scan the live panel shows
        self.current_epoch: int | None = None
        self.progress: dict = {}
        self.images: dict[str, str] = {}  # key -> data URL of the current scan's latest live images
        self.images_updated = 0.0
        self.images_version = 0
        self.rates = RateMeter()
        self.state_text = ""
        self.images_text = ""
        self.catalog_text = ""
        self._catalog_version = -1
        self._next_heartbeat = 0.0
        self.counters = collections.Counter()
        self._process = psutil.Process(os.getpid())
        self.stopped = False

    # -- the pipeline (on the worker thread) ------------------------------------------------------

    def _request(self, op: str, **fields) -> dict:
        return self.control.request(op, timeout_s=1.0, **fields)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if not self.heartbeat or now < self._next_heartbeat:
            return
        self._next_heartbeat = now + max(self.config.flow.heartbeat_s, 0.5)
        cpu = self._process.cpu_times()
        rss = self._process.memory_info().rss
        stats = {"counters": {"clients": len(self.clients), **self.counters}, "rejected": {}, "rss": rss,
                 "peak_rss": rss, "pid": os.getpid(), "cpu_s": cpu.user + cpu.system, "url": self.url}
        reply = self._request("heartbeat", role="dashboard", id=0, stats=stats)
        if reply.get("shutdown") and self.exit_on_shutdown and self.on_shutdown is not None:
            log.info("control is shutting the pipeline down: the dashboard stops too")
            self.on_shutdown()

    def poll_once(self, watched: bool) -> None:
        """One round: status (+ catalog upkeep), and live images of the current scan if watched."""
        try:
            self._heartbeat()
            status = self._request("status")
        except ControlUnavailable as exc:
            self.control_ok, self.control_error = False, str(exc)
            return
        self.control_ok, self.control_error = True, ""
        self.roles = status.get("roles", {})
        self.scans = read_scans(status.get("scans", {}))
        self._catalogue_finished()
        self._pick_current()
        current = self.scans.get(self.current) if self.current is not None else None
        if watched and current is not None and current.state == "running":
            self._ask_live(current.spec.number)

    def _catalogue_finished(self) -> None:
        for number, scan in self.scans.items():
            key = scan.spec.key
            if scan.state in ("closed", "failed") and key not in self.catalogued:
                try:
                    entry = self.catalog.add_summary(scan.summary, scan.started, scan.state)
                except Exception as exc:  # the database is away: try again next round
                    log.warning("scan %s not catalogued: %s", number, exc)
                    continue
                self.catalogued[key] = entry if entry is not None else -1

    def _ask_live(self, number: int) -> None:
        """The writer's latest live images and progress of scan ``number``: a map naming the
        images, then one frame of PNG bytes per name."""
        try:
            reply, frames = self.live.request_parts("live", scan=number)
        except ControlUnavailable as exc:  # the writer is away or busy: control's status still shows
            self.control_error = str(exc)
            return
        names = reply.get("names") or []
        if not reply.get("ok") or len(names) != len(frames):  # e.g. the writer has not opened it yet
            log.debug("no live results of scan %d: %s", number, reply.get("error", "names and images differ"))
            return
        self._take_live(reply, dict(zip(map(str, names), frames)))

    def _pick_current(self) -> None:
        scans = self.scans
        running = [(s.started or 0, n) for n, s in scans.items() if s.state == "running"]
        if running:
            number = max(running)[1]
        elif scans:
            number = max((s.started or 0, n) for n, s in scans.items())[1]
        else:
            number = None
        epoch = scans[number].spec.epoch if number is not None else None
        if (number, epoch) != (self.current, self.current_epoch):
            self.current, self.current_epoch = number, epoch
            self.progress, self.images, self.images_updated = {}, {}, 0.0
            self.rates = RateMeter()
            self.images_version += 1

    def _take_live(self, live: dict, images: dict[str, bytes]) -> None:
        progress = live.get("progress") or {}
        if progress:
            self.progress = progress
            self.rates.add(float(progress.get("seconds", 0.0)), int(progress.get("frames_written", 0)))
        updated = float(live.get("updated") or 0.0)
        if updated > self.images_updated and images:
            self.images_updated = updated
            self.images = {k: "data:image/png;base64," + base64.b64encode(v).decode("ascii") for k, v in images.items()}
            self.images_version += 1

    # -- what the page gets -----------------------------------------------------------------------

    def _final_images(self, entry: int | None) -> list[dict]:
        """The images of a closed scan's catalog entry (the PNGs beside its file)."""
        row = self.catalog.get(entry) if entry is not None and entry >= 0 else None
        if not row:
            return []
        return image_links(entry, image_order(row["images"]), f"?v={int(row['closed'] or 0)}")

    def scan_state(self) -> dict | None:
        scan = self.scans.get(self.current) if self.current is not None else None
        if scan is None:
            return None
        spec = scan.spec
        rows, cols = spec.shape
        expected = rows * cols * spec.frames_per_position
        counts = _counts(scan, self.progress)
        entry = self.catalogued.get(spec.key)
        thresholds = spec.thresholds.as_dict() if spec.thresholds is not None else scan.summary.get("thresholds")
        return {
            "number": self.current,
            "epoch": spec.epoch,
            "state": scan.state,
            "file_name": spec.file_name,
            "path": scan.summary.get("path"),
            "scan_shape": [rows, cols],
            "frames_per_position": spec.frames_per_position,
            "started": scan.started,
            "frames_expected": expected,
            "frames_written": counts["frames_written"],
            "frames_complete": counts["frames_complete"],
            "frames_incomplete": counts["frames_incomplete"],
            "frames_missing": max(expected - counts["frames_written"], 0),
            "events": counts["events"],
            "seconds": counts["seconds"],
            "fps_now": self.rates.rate() if scan.state == "running" else 0.0,
            "fps_mean": counts["fps_mean"],
            "thresholds": thresholds,
            "calibrating": thresholds is None and scan.state == "running",
            "ledger": counts["ledger"],
            "error": scan.summary.get("error"),
            "catalog_id": entry if entry is not None and entry >= 0 else None,
            "final_images": self._final_images(entry),
            "images_version": self.images_version,
        }

    def modules(self, roles: dict) -> list[dict]:
        rows = []
        for m in MODULES:
            role = roles.get(f"producer-{m}", {})
            counters = (role.get("stats") or {}).get("counters", {})
            rows.append({"module": m, "present": bool(role), "records_sent": counters.get("records_sent", 0),
                         "records_spilled": counters.get("records_spilled", 0)})
        return rows

    def build_state(self) -> str:
        roles = self.roles if self.control_ok else {}
        flow = self.config.flow
        message = {
            "type": "state",
            "time": time.time(),
            "control": {"ok": self.control_ok, "endpoint": self.config.network.control(), "error": self.control_error},
            "roles": [_role_row(k, roles[k], flow) for k in sorted(roles, key=_role_sort)],
            "modules": self.modules(roles),
            "scan": self.scan_state() if self.control_ok else None,
            "running": sorted(n for n, s in self.scans.items() if s.state == "running") if self.control_ok else [],
            "catalog_version": self.catalog.version,
        }
        return json.dumps(message, default=str)

    def build_images(self) -> str:
        """The current scan's live images as one message, all of them every time: the writer
        keeps each within 288 pixels a side (pipeline.writer.live), the summed pattern too."""
        keys = image_order(self.images)
        return json.dumps({"type": "images", "scan": self.current, "version": self.images_version,
                           "updated": self.images_updated,
                           "images": [{"key": k, "label": image_label(k), "src": self.images[k]} for k in keys]})

    def build_catalog(self) -> str:
        return json.dumps({"type": "catalog", "count": self.catalog.count(),
                           "scans": [catalog_row_json(r) for r in self.catalog.list(RECENT)]}, default=str)

    def greeting(self) -> list[str]:
        """What a newly connected browser gets first: the latest of everything."""
        return [t for t in (self.state_text, self.images_text, self.catalog_text) if t]

    # -- loop -------------------------------------------------------------------------------------

    def broadcast(self, text: str) -> None:
        for client in list(self.clients):
            client.offer(text)
        self.counters["messages"] += 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_images = -1
        while not self.stopped:
            t0 = time.monotonic()
            watched = bool(self.clients)
            try:
                await loop.run_in_executor(self.executor, self.poll_once, watched)
                # catalog reads and JSON on the worker too: the event loop only sends
                self.state_text = await loop.run_in_executor(self.executor, self.build_state)
                if watched:  # the state first: it tells the page which scan the images belong to
                    self.broadcast(self.state_text)
                if self.images_version != last_images:
                    last_images = self.images_version
                    self.images_text = await loop.run_in_executor(self.executor, self.build_images)
                    if self.clients:
                        self.broadcast(self.images_text)
                if self.catalog.version != self._catalog_version:
                    self._catalog_version = self.catalog.version
                    self.catalog_text = await loop.run_in_executor(self.executor, self.build_catalog)
                    self.broadcast(self.catalog_text)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad round stop the dashboard
                log.exception("dashboard poll failed")
            period = POLL_WATCHED_S if self.clients else POLL_IDLE_S
            await asyncio.sleep(max(period - (time.monotonic() - t0), 0.02))

    def request(self, op: str, **fields):
        """A control request from an API handler, run on the worker thread (awaitable)."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self.executor, lambda: self._request(op, **fields))

    def close(self) -> None:
        self.stopped = True
        self.executor.submit(self.control.close)
        self.executor.submit(self.live.close)
        self.executor.shutdown(wait=True, cancel_futures=True)
