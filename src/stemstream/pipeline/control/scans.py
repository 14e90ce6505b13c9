"""Control's scans: a scan's spec made from a ``start_scan`` request, and what happens to a running
scan afterwards (the writer's commits, failover to a new routing generation, calibration from the
node groups' pixel histograms, its end)."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from stemstream.core.config import PipelineConfig
from stemstream.core.detector import MAX_FRAME_NUMBER
from stemstream.core.scan_spec import MAX_INSTANCE_CHARS, CalibrationSettings, ScanSpec
from stemstream.core.thresholds import Thresholds
from stemstream.counting.thresholds import (
    CalibrationError,
    PixelHistogram,
    fixed_thresholds,
    thresholds_from_histogram,
)
from stemstream.pipeline.control import fields
from stemstream.pipeline.control.fields import RequestError

log = logging.getLogger(__name__)

# Finished scans control remembers (their summaries; oldest forgotten first).
FINISHED_IN_MEMORY = 200
# How long calibration waits for the node groups' histograms before fitting what it has.
CALIBRATION_TIMEOUT_S = 10.0
# A node group's histogram holds a sample of frames (calibration_frames, about a thousand);
# a bound keeps the sum of them an integer msgpack can carry.
MAX_SAMPLE_FRAMES = 2**40


def scan_file_name(scan_number: int, sequence: int, when: float) -> str:
    """Facility-style name: FOURD_{YYMMDD}_{HHMM}_{sequence:05}_{scan:05}.h5."""
    stamp = time.strftime("%y%m%d_%H%M", time.localtime(when))
    return f"FOURD_{stamp}_{sequence:05d}_{scan_number:05d}.h5"


_NAMED = re.compile(r"FOURD_\d{6}_\d{4}_(\d{5,})_\d{5,}[.]")


def last_sequence(output_dir: Path) -> int:
    """The highest sequence number of the files already in ``output_dir`` (0: none, or a
    directory this host cannot see). A new control continues from it, as the receivers' scan
    numbers continue, so the names of a session's files never collide."""
    try:
        names = [p.name for p in Path(output_dir).iterdir()]
    except OSError:
        return 0
    found = (_NAMED.match(name) for name in names)
    return max((int(m.group(1)) for m in found if m), default=0)


def new_spec(req: dict, number: int, sequence: int, first_generation: int, config: PipelineConfig,
             registered: dict[int, str], highest_node: int, now: float) -> ScanSpec:
    """The spec of scan ``number`` a ``start_scan`` request asks for; RequestError when it cannot
    be. ``registered``: the node groups alive now (id -> host), used when the request names none;
    ``sequence``: the scan's place in this control's history (its epoch and file name)."""
    rows, cols = fields.scan_shape(req)
    fpp = fields.integer(req, "frames_per_position", 1, default=1)
    if rows * cols * fpp > MAX_FRAME_NUMBER + 1:
        raise RequestError(f"a {rows}x{cols} scan of {fpp} frames per position has more frames than the "
                           "headers' uint32 frame numbers can count")
    nodes = fields.node_ids(req["nodes"], "nodes", highest_node) if req.get("nodes") is not None else sorted(registered)
    if not nodes:
        raise RequestError("no node group has registered with control yet (start `stemstream node`)")
    counting = config.counting
    spec = ScanSpec(
        number=number,
        epoch=sequence,  # tells a resumed scan from its first run
        shape=(rows, cols),
        frames_per_position=fpp,
        nodes=nodes,
        node_hosts={n: registered.get(n, configured_host(config, n)) for n in nodes},
        generation=first_generation,
        fenced=first_generation,
        block_frames=config.pipeline.block_frames,
        file_name=fields.file_name(req) or scan_file_name(number, sequence, now),
        resume=fields.flag(req, "resume", False),
        calibration=CalibrationSettings(sigma=counting.sigma, xray_sigma=counting.xray_sigma,
                                        samples=counting.samples, calibration_frames=counting.calibration_frames),
    )
    spec.thresholds = _fixed_thresholds(req, config)
    return spec


def configured_host(config: PipelineConfig, node: int) -> str:
    hosts = config.network.node_hosts
    return hosts[node] if node < len(hosts) else config.network.host


def _fixed_thresholds(req: dict, config: PipelineConfig) -> Thresholds | None:
    """Thresholds the request or the config fixes; None: the scan is calibrated."""
    given = fields.optional_mapping(req, "thresholds")
    counting = config.counting
    if given is None and not counting.fixed:
        return None
    if given is None:
        return fixed_thresholds(counting.background_threshold, counting.xray_threshold)
    background = fields.number(given.get("background"), "thresholds.background")
    xray = fields.number(given.get("xray"), "thresholds.xray")
    try:
        return fixed_thresholds(background, xray)
    except ValueError as exc:
        raise RequestError(str(exc)) from None


@dataclass
class ScanState:
    """One scan as control keeps it: its spec and what is known of its progress."""

    spec: ScanSpec
    started: float  # Unix time
    state: str = "running"  # running -> closed | failed
    histogram: PixelHistogram | None = None
    contributors: set[int] = field(default_factory=set)
    summary: dict | None = None
    committed: list = field(default_factory=list)  # the writer's committed block ranges
    done_nodes: set[int] = field(default_factory=set)  # node groups done in the current generation
    all_silent_logged: bool = False
    # epoch -> how each earlier run of this scan number ended (run_outcome), for a producer that
    # still holds blocks of one when the next run starts (not in the state file: a producer that
    # cannot learn it keeps its blocks, pipeline.scan_ending)
    earlier_runs: dict[int, str] = field(default_factory=dict)
    ended_at: float | None = None  # Unix time the run closed or failed (not in the state file)

    @property
    def running(self) -> bool:
        return self.state == "running"

    def outcome(self) -> str:
        """How this run ended: "whole" (closed with every frame), "incomplete" (closed with
        frames missing), "failed", or "running"."""
        if self.state != "closed":
            return self.state
        ledger = (self.summary or {}).get("ledger")
        expected = ledger.get("frames_expected") if isinstance(ledger, dict) else None
        whole = expected is not None and ledger.get("frames_complete") == expected
        return "whole" if whole else "incomplete"

    def fail(self, error: str) -> None:
        self.state = "failed"
        self.summary = {"error": error}
        self.ended_at = time.time()

    def finish(self, ok: bool, summary: dict | None) -> None:
        """The writer's report of the scan's end."""
        self.state = "closed" if ok else "failed"
        self.summary = summary
        self.histogram = None  # 1 MB a scan; a session runs hundreds
        self.ended_at = time.time()

    def blocks_lacking(self, module: int) -> list[int]:
        """The blocks of which the closed file holds frames without ``module``'s sectors, as the
        writer's summary gives them (``blocks_lacking``: module -> half-open block ranges,
        pipeline.writer.role.summary_for_control; whatever else a summary holds is ignored)."""
        ledger = (self.summary or {}).get("ledger") if self.state == "closed" else None
        lacking = ledger.get("blocks_lacking") if isinstance(ledger, dict) else None
        ranges = lacking.get(str(module)) if isinstance(lacking, dict) else None
        if not isinstance(ranges, list):
            return []
        n = self.spec.n_blocks
        blocks: set[int] = set()
        for r in ranges:
            if isinstance(r, list) and len(r) == 2 and all(type(b) is int for b in r):
                blocks.update(range(max(r[0], 0), min(r[1], n)))
        return sorted(blocks)

    # -- the writer's commits, routing generations ----------------------------------------------

    def record_commits(self, ranges: list[list[int]], fenced: int, done: set[int]) -> bool:
        """The writer's report: blocks committed, the generation it fenced, node groups done in it.
        True when something the state file keeps changed."""
        if fenced != self.spec.generation:  # done nodes of an older generation mean nothing now
            return False
        # the ranges are not kept in the state file: the writer reports them again to a new control
        self.committed = ranges
        changed = fenced != self.spec.fenced or done != self.done_nodes
        self.spec.fenced = fenced
        self.done_nodes = done
        return changed

    def new_generation(self, dead: list[int], reason: str, now: float) -> None:
        """Everything uncommitted is streamed again, in a new routing generation without ``dead``."""
        spec = self.spec
        spec.new_generation(dead, reason, at=now, committed_blocks=sum(b - a for a, b in self.committed))
        self.done_nodes = set()
        if spec.thresholds is None and self.contributors and self._all_histograms_in():
            self.fit()  # the dead node group's histogram will not come
        log.warning("scan %d: %s; routing generation %d streams everything uncommitted to node group(s) %s",
                    spec.number, reason, spec.generation, spec.alive)

    def hear_node(self, node: int, instance, now: float) -> bool:
        """Node group ``node`` checked in as process ``instance`` (its incarnation, new at every
        start; None: it did not say). Another process than the one serving the scan was restarted:
        whatever the old one held but the writer had not committed died with it, and its successor
        takes nothing of the old stream (the producers keep sending it later blocks, and its DONE
        would count what went to the old process as lost). So unless it was done in the current
        generation, a new routing generation starts at once, as after a death, and the producers
        resend everything uncommitted; the new process, alive and listening, serves it with the
        others. True when the spec changed (an incarnation learnt, or a new generation)."""
        if not isinstance(instance, str) or not 0 < len(instance) <= MAX_INSTANCE_CHARS or node not in self.spec.nodes:
            return False
        known = self.spec.instances.get(node)
        if known == instance:
            return False
        self.spec.instances[node] = instance
        if known is not None and self.running and node in self.spec.alive and node not in self.done_nodes:
            self.new_generation([], f"node group {node} restarted (a new process) mid-scan", now)
        return True

    def silent_nodes(self, seen: dict[int, float], now: float, dead_after_s: float) -> list[int]:
        """Node groups of the current generation, not done, silent for ``dead_after_s``. One
        control never heard of (named in start_scan) is unknown, not silent."""
        return [n for n in self.spec.alive
                if n not in self.done_nodes and n in seen and now - seen[n] > dead_after_s]

    def fail_over(self, seen: dict[int, float], now: float, dead_after_s: float) -> bool:
        """A new routing generation without the node groups silent for ``dead_after_s`` (``seen``:
        node group -> when control last heard from it). True when one began."""
        dead = self.silent_nodes(seen, now, dead_after_s)
        if not dead:
            return False
        if len(dead) == len(self.spec.alive):
            # Nobody to take the work over: a new generation would only throw away what is in
            # flight. If they come back the scan goes on; if not, it ends at its timeouts.
            if not self.all_silent_logged:
                log.error("scan %d: no node group of it is answering (%s)", self.spec.number, dead)
                self.all_silent_logged = True
            return False
        self.new_generation(dead, f"node group(s) {dead} stopped answering", now)
        return True

    # -- calibration ----------------------------------------------------------------------------

    def wants_histogram(self, node: int) -> bool:
        return self.running and self.spec.thresholds is None and node not in self.contributors

    def add_histogram(self, node: int, histogram: PixelHistogram) -> None:
        """Node group ``node``'s pixel histogram; thresholds are fitted once every node group alive
        sent one."""
        if self.histogram.n_frames + histogram.n_frames > MAX_SAMPLE_FRAMES:
            raise RequestError(f"a calibration sample of more than {MAX_SAMPLE_FRAMES} frames is not one")
        self.histogram.merge(histogram)
        self.contributors.add(node)
        if self._all_histograms_in():
            self.fit()

    def _all_histograms_in(self) -> bool:
        return bool(self.spec.alive) and set(self.spec.alive) <= self.contributors

    def calibration_overdue(self, now: float) -> bool:
        """Some node groups sent their histograms, the others nothing for CALIBRATION_TIMEOUT_S."""
        waiting = self.running and self.spec.thresholds is None and self.contributors
        return bool(waiting) and now - self.started > CALIBRATION_TIMEOUT_S

    def fit(self) -> None:
        """Thresholds from the histograms gathered; the scan fails when they cannot be fitted."""
        cal = self.spec.calibration
        try:
            thresholds = thresholds_from_histogram(self.histogram, cal.sigma, cal.xray_sigma)
        except CalibrationError as exc:
            log.error("scan %d: %s; the scan cannot be counted", self.spec.number, exc)
            self.fail(str(exc))
            return
        self.spec.thresholds = thresholds
        log.info("scan %d calibrated: background %.2f ADU, X-ray %.1f ADU from %d frames",
                 self.spec.number, thresholds.background, thresholds.xray, self.histogram.n_frames)


def forget_old_scans(scans: dict[int, ScanState]) -> None:
    """Keep the most recent FINISHED_IN_MEMORY finished scans (status, the dashboard): a session
    of 60 scans an hour must not grow control without bound."""
    finished = sorted((n for n, s in scans.items() if not s.running), key=lambda n: scans[n].started)
    for number in finished[:-FINISHED_IN_MEMORY]:
        del scans[number]
