"""Control: the scan lifecycle, threshold calibration across node groups, status of every role.

One ROUTER socket answers small msgpack requests (``op`` names the request); every request gets a
reply. Roles learn about scans from the replies to their heartbeats, so no broadcast can be missed
by a late joiner. Requests:

- ``heartbeat {role, id, stats, host}`` -> ``{scans: [spec...], shutdown, ages, acks, instance}``:
  the open scans, how long ago each role last checked in (node groups tell a dead producer from
  a slow one), the blocks the writer committed per open scan (producers free their resend
  buffers), and this control process's id (a new one tells the roles control was restarted).
  A node group's heartbeat registers it, with the host it listens on; ``leave {role, id}``
  unregisters it. A scan uses the node groups registered (and alive) when it starts.
- ``start_scan {scan_number, scan_shape, frames_per_position, [nodes], ...}`` -> ``{scan: spec}``.
- ``committed {scan, ranges, fenced, done}`` from the writer: blocks committed, the routing
  generation it has fenced, node groups done in it. ``writer_restarted {scan}``: a new generation.
  A node group of a running scan silent for ``[flow] dead_after_s`` is failed over: a new
  routing generation without it (see pipeline.routing). ``gateway_restarted {id}``: a gateway
  that finds scans running at its start gets a new generation for each (its queues died with
  the gateway before it).
- ``get_scan {scan}`` -> ``{scan: spec}`` (thresholds appear once calibrated).
- ``calibration {scan, node, values, counts, n_frames}``: a node group's pixel histogram.
- ``scan_done {scan, summary}`` from the writer; ``status {}``; ``shutdown {}``.
- Control restarted keeps its scans: see pipeline.control_state ([pipeline] state_file).
- ``live_images {scan, images, progress}`` from the writer (PNG bytes by name, a few times a
  second); ``live {scan}`` -> ``{images, progress, updated}``: the latest, for the dashboard.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from stemstream.counting.thresholds import (
    CalibrationError,
    PixelHistogram,
    fixed_thresholds,
    thresholds_from_histogram,
)
from stemstream.core.config import PipelineConfig
from stemstream.transport.curve import curve_for
from stemstream.transport.messages import MessageError, pack_control, unpack_control
from stemstream.pipeline.control.state import (
    FINISHED_KEPT,
    StateFileError,
    histogram_from_sparse,
    histogram_to_sparse,
    load_state,
    save_state,
    set_aside,
)
from stemstream.pipeline.routing import alive_nodes, generation

log = logging.getLogger(__name__)

# The writer renders live images only while someone asked for them this recently (seconds).
_LIVE_WANTED_S = 5.0
# Finished scans control remembers (their summaries and last live images; oldest forgotten first).
FINISHED_IN_MEMORY = 200
# How long calibration waits for the node groups' histograms before fitting what it has.
CALIBRATION_TIMEOUT_S = 10.0


def scan_file_name(scan_number: int, sequence: int, when: float) -> str:
    """Facility-style name: FOURD_{YYMMDD}_{HHMM}_{sequence:05}_{scan:05}.h5."""
    stamp = time.strftime("%y%m%d_%H%M", time.localtime(when))
    return f"FOURD_{stamp}_{sequence:05d}_{scan_number:05d}.h5"


@dataclass
class ScanState:
    spec: dict
    started: float
    state: str = "running"  # running -> closed | failed
    histogram: PixelHistogram | None = None
    contributors: set[int] = field(default_factory=set)
    summary: dict | None = None
    images: dict = field(default_factory=dict)  # latest live images: name -> PNG bytes
    progress: dict = field(default_factory=dict)
    images_updated: float = 0.0
    committed: list = field(default_factory=list)  # the writer's committed block ranges
    done_nodes: set[int] = field(default_factory=set)  # node groups done in the current generation
    all_silent_logged: bool = False


class Control:
    def __init__(self, config: PipelineConfig, context: zmq.Context | None = None):
        self.config = config
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.curve = curve_for(config)
        if self.curve is not None:
            self.curve.server(self.socket)
        self.socket.bind(config.network.bind(config.network.control_port))
        self.scans: dict[int, ScanState] = {}
        self.roles: dict[str, dict] = {}
        self.sequence = 0
        self.shutting_down = False
        self.rejected = 0
        self.last_live_request = 0.0
        self.instance = uuid.uuid4().hex  # new in every control process: roles see a restart
        self.state_path = Path(config.pipeline.state_file) if config.pipeline.state_file else None
        self.changed = False  # a scan changed since the state file was written
        self._save_failing = False
        if self.state_path is not None:
            self._restore()

    # -- state across restarts (pipeline.control_state) ------------------------------------------

    def _restore(self) -> None:
        try:
            saved = load_state(self.state_path)
        except StateFileError as exc:
            self._set_aside(str(exc))
            return
        if saved is None:
            return
        now = time.time()
        fresh = now - float(saved.get("saved_at", 0)) <= self.config.flow.scan_timeout_s
        self.sequence = int(saved.get("sequence", 0))
        try:
            for number, kept in saved["scans"].items():
                state = ScanState(spec=kept["spec"], started=float(kept["started"]), state=kept["state"],
                                  summary=kept.get("summary"), contributors=set(kept.get("contributors", [])),
                                  done_nodes=set(kept.get("done_nodes", [])))
                if state.state == "running":
                    histogram = PixelHistogram()
                    histogram.counts = histogram_from_sparse(kept.get("histogram", {}), histogram.counts.size)
                    histogram.n_frames = int(kept.get("histogram", {}).get("n_frames", 0))
                    state.histogram = histogram
                if state.state == "running" and not fresh:
                    state.state = "failed"
                    state.summary = {"error": "control was down longer than [flow] scan_timeout_s while the scan ran"}
                self.scans[int(number)] = state
        except (KeyError, TypeError, ValueError) as exc:
            self.scans.clear()
            self._set_aside(f"{self.state_path} holds a scan control cannot read ({exc})")
            return
        running = [n for n, s in self.scans.items() if s.state == "running"]
        for number in running:
            # Node groups of a running scan must check in again: one that died while control
            # was away is failed over once dead_after_s passes without a word from it.
            for n in alive_nodes(self.scans[number].spec):
                self.roles.setdefault(f"node-{n}", {"role": "node", "id": n, "seen": now, "stats": {}, "restored": True})
        log.warning("control restarted: %d scan(s) from %s, running: %s", len(self.scans), self.state_path, running or "none")

    def _set_aside(self, problem: str) -> None:
        """Start with no scans; keep the unreadable state file for a look, out of the way."""
        try:
            where = f"moved to {set_aside(self.state_path).name}"
        except OSError as exc:
            where = f"could not move it aside ({exc.strerror or exc}), it will be overwritten"
        log.error("%s; %s, starting with no scans", problem, where)

    def _save(self) -> None:
        finished = sorted((n for n, s in self.scans.items() if s.state != "running"),
                          key=lambda n: self.scans[n].started)[-FINISHED_KEPT:]
        keep = [n for n, s in self.scans.items() if s.state == "running"] + finished
        scans = {}
        for n in keep:
            s = self.scans[n]
            histogram = histogram_to_sparse(s.histogram.counts) if s.histogram is not None else {}
            histogram["n_frames"] = s.histogram.n_frames if s.histogram is not None else 0
            scans[n] = {"spec": s.spec, "started": s.started, "state": s.state, "summary": s.summary,
                        "contributors": sorted(s.contributors), "done_nodes": sorted(s.done_nodes),
                        "histogram": histogram if s.state == "running" else {}}
        try:
            save_state(self.state_path, {"sequence": self.sequence, "scans": scans})
        except OSError as exc:  # control goes on; only a restart would lose the scans
            if not self._save_failing:  # once, not at every change
                log.error("cannot write control's state file %s: %s; a restarted control will not have "
                          "the scans", self.state_path, exc.strerror or exc)
            self._save_failing = True
        else:
            if self._save_failing:
                log.info("control's state file %s written again", self.state_path)
            self._save_failing = False
        self.changed = False

    # -- requests ---------------------------------------------------------------------------------

    def _open_specs(self) -> list[dict]:
        return [s.spec for s in self.scans.values() if s.state == "running"]

    def handle(self, request: dict) -> dict:
        op = request.get("op")
        handler = getattr(self, f"_op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown request {op!r}"}
        try:
            return handler(request)
        except (KeyError, TypeError, ValueError) as exc:
            return {"ok": False, "error": f"bad {op} request: {exc}"}

    def _op_heartbeat(self, req: dict) -> dict:
        key = f"{req['role']}-{req.get('id', 0)}"
        self.roles[key] = {"role": req["role"], "id": req.get("id", 0), "seen": time.time(), "stats": req.get("stats", {})}
        now = time.time()
        if req["role"] == "node":
            self.roles[key]["host"] = str(req.get("host") or self.config.network.host)
        ages = {k: now - v["seen"] for k, v in self.roles.items()}
        live_wanted = now - self.last_live_request < _LIVE_WANTED_S
        acks = {str(n): s.committed for n, s in self.scans.items() if s.state == "running"}
        return {"ok": True, "scans": self._open_specs(), "shutdown": self.shutting_down, "ages": ages,
                "live_wanted": live_wanted, "acks": acks, "instance": self.instance}

    def _op_leave(self, req: dict) -> dict:
        """A role stopping on purpose: not used by later scans, and failed over at once in a
        running one."""
        role = self.roles.get(f"{req['role']}-{req.get('id', 0)}")
        if role is not None:
            role["seen"], role["left"] = 0.0, True
        log.info("%s %s left", req["role"], req.get("id", 0))
        return {"ok": True}

    def live_nodes(self) -> dict[int, str]:
        """Registered node groups heard from recently: id -> host they listen on."""
        now = time.time()
        return {int(v["id"]): v.get("host", self.config.network.host) for v in self.roles.values()
                if v["role"] == "node" and now - v["seen"] < self.config.flow.dead_after_s}

    def _op_status(self, req: dict) -> dict:
        now = time.time()
        roles = {k: {**v, "age_s": now - v["seen"]} for k, v in self.roles.items()}
        scans = {
            str(n): {"spec": s.spec, "state": s.state, "summary": s.summary, "started": s.started}
            for n, s in self.scans.items()
        }
        return {"ok": True, "roles": roles, "scans": scans}

    def _op_start_scan(self, req: dict) -> dict:
        number = int(req["scan_number"])
        if number in self.scans and self.scans[number].state == "running":
            return {"ok": False, "error": f"scan {number} is already running"}
        rows, cols = (int(v) for v in req["scan_shape"])
        if rows < 1 or cols < 1 or rows > 65535 or cols > 65535:
            return {"ok": False, "error": f"scan shape {rows}x{cols} must be 1 to 65535 rows and cols"}
        fpp = int(req.get("frames_per_position", 1))
        if fpp < 1:
            return {"ok": False, "error": "frames_per_position must be at least 1"}
        counting = self.config.counting
        registered = self.live_nodes()
        nodes = sorted(int(n) for n in req["nodes"]) if req.get("nodes") is not None else sorted(registered)
        if not nodes or any(n < 0 or n > 65535 for n in nodes):
            return {"ok": False, "error": "no node group has registered with control yet (start `stemstream node`)"
                    if not nodes else f"node group ids must be 0 to 65535, got {nodes}"}
        now = time.time()
        self.sequence += 1
        first_generation = generation(self.scans[number].spec) + 1 if number in self.scans else 0
        spec = {
            "scan": number,
            "epoch": self.sequence,  # tells a resumed scan from its first run
            "scan_shape": [rows, cols],
            "frames_per_position": fpp,
            "nodes": nodes,
            "node_hosts": {str(n): registered.get(n, self._configured_host(n)) for n in nodes},
            # Routing generation: one more after each failover. A scan number used again starts
            # above its last run's, so a message of the earlier run is never taken for this one.
            "generation": first_generation,
            "alive": nodes,
            "fenced": first_generation,  # the generation the writer has fenced (dropped what older ones left)
            "failovers": [],
            "block_frames": self.config.pipeline.block_frames,
            "file_name": req.get("file_name") or scan_file_name(number, self.sequence, now),
            "resume": bool(req.get("resume", False)),
            "calibration": {
                "sigma": counting.sigma, "xray_sigma": counting.xray_sigma,
                "samples": counting.samples, "calibration_frames": counting.calibration_frames,
            },
            "thresholds": None,
        }
        fixed = req.get("thresholds")
        if fixed is None and counting.fixed:
            fixed = {"background": counting.background_threshold, "xray": counting.xray_threshold}
        if fixed is not None:
            spec["thresholds"] = fixed_thresholds(float(fixed["background"]), float(fixed["xray"])).as_dict()
        self.scans[number] = ScanState(spec=spec, started=now, histogram=PixelHistogram())
        self.changed = True
        log.info("scan %d started: %dx%d, %d frame(s) per position, node group(s) %s", number, rows, cols, fpp, nodes)
        return {"ok": True, "scan": spec}

    def _configured_host(self, node: int) -> str:
        hosts = self.config.network.node_hosts
        return hosts[node] if node < len(hosts) else self.config.network.host

    def _op_committed(self, req: dict) -> dict:
        state = self.scans.get(int(req["scan"]))
        if state is None or state.state != "running":
            return {"ok": True}
        ranges = [[int(a), int(b)] for a, b in req["ranges"]]
        fenced = int(req["fenced"])
        if fenced == generation(state.spec):  # done_nodes of an older generation mean nothing now
            state.committed = ranges
            done = {int(n) for n in req.get("done", [])}
            # the ranges themselves are not kept (the writer reports them again to a new control)
            self.changed |= fenced != state.spec["fenced"] or done != state.done_nodes
            state.spec["fenced"] = fenced
            state.done_nodes = done
        return {"ok": True}

    def _op_writer_restarted(self, req: dict) -> dict:
        """The writer lost what it had not committed: everything uncommitted is streamed again."""
        state = self.scans.get(int(req["scan"]))
        if state is None or state.state != "running":
            return {"ok": False, "error": f"scan {req['scan']} is not running"}
        self._new_generation(state, dead=[], reason="writer restarted")
        return {"ok": True, "scan": state.spec}

    def _op_gateway_restarted(self, req: dict) -> dict:
        """A gateway started while scans run: the one before it died with messages in its queues
        (or it joins late and nothing reached the node groups through it), so everything
        uncommitted is streamed again."""
        gateway = int(req.get("id", 0))
        running = [state for state in self.scans.values() if state.state == "running"]
        for state in running:
            self._new_generation(state, dead=[], reason=f"gateway {gateway} restarted")
        return {"ok": True, "scans": [state.spec for state in running]}

    def _new_generation(self, state: ScanState, dead: list[int], reason: str) -> None:
        spec = state.spec
        spec["generation"] = generation(spec) + 1
        spec["alive"] = [n for n in alive_nodes(spec) if n not in dead]
        spec["failovers"].append({"generation": spec["generation"], "dead": dead, "reason": reason,
                                  "at": time.time(), "committed_blocks": sum(b - a for a, b in state.committed)})
        state.done_nodes = set()
        self.changed = True
        waiting = spec["thresholds"] is None and state.contributors
        if waiting and spec["alive"] and set(spec["alive"]) <= state.contributors:
            self._fit(state)  # the dead node group's histogram will not come
        log.warning("scan %d: %s; routing generation %d streams everything uncommitted to node group(s) %s",
                    spec["scan"], reason, spec["generation"], spec["alive"])

    def _op_get_scan(self, req: dict) -> dict:
        state = self.scans.get(int(req["scan"]))
        if state is None:
            return {"ok": False, "error": f"unknown scan {req['scan']}"}
        return {"ok": True, "scan": state.spec, "state": state.state, "summary": state.summary}

    def _op_calibration(self, req: dict) -> dict:
        state = self.scans.get(int(req["scan"]))
        if state is None or state.state != "running" or state.spec["thresholds"] is not None:
            return {"ok": True}  # late or unneeded contribution
        node = int(req["node"])
        if node in state.contributors:
            return {"ok": True}
        values = np.asarray(req["values"], np.int64)
        counts = np.asarray(req["counts"], np.int64)
        if values.shape != counts.shape or (values.size and (values.min() < -65536 or values.max() >= 65536)):
            return {"ok": False, "error": "calibration histogram has mismatched or out-of-range values"}
        np.add.at(state.histogram.counts, values + 65536, counts)
        state.histogram.n_frames += int(req.get("n_frames", 0))
        state.contributors.add(node)
        self.changed = True
        if len(state.contributors) >= len(alive_nodes(state.spec)):
            self._fit(state)
        return {"ok": True}

    def _fit(self, state: ScanState) -> None:
        cal = state.spec["calibration"]
        try:
            thresholds = thresholds_from_histogram(state.histogram, cal["sigma"], cal["xray_sigma"])
        except CalibrationError as exc:
            log.error("scan %d: %s; the scan cannot be counted", state.spec["scan"], exc)
            state.state = "failed"
            state.summary = {"error": str(exc)}
            self.changed = True
            return
        state.spec["thresholds"] = thresholds.as_dict()
        self.changed = True
        log.info("scan %d calibrated: background %.2f ADU, X-ray %.1f ADU from %d frames",
                 state.spec["scan"], thresholds.background, thresholds.xray, state.histogram.n_frames)

    def _op_scan_done(self, req: dict) -> dict:
        state = self.scans.get(int(req["scan"]))
        if state is not None:
            state.state = "closed" if req.get("ok", True) else "failed"
            state.summary = req.get("summary")
            state.histogram = None  # 1 MB a scan; a session runs hundreds
            self.changed = True
            self._forget_old_scans()
        return {"ok": True}

    def _forget_old_scans(self) -> None:
        """Keep the most recent FINISHED_IN_MEMORY finished scans (status, the dashboard): a
        session of 60 scans an hour must not grow control without bound."""
        finished = sorted((n for n, s in self.scans.items() if s.state != "running"), key=lambda n: self.scans[n].started)
        for number in finished[:-FINISHED_IN_MEMORY]:
            del self.scans[number]

    def _op_live_images(self, req: dict) -> dict:
        state = self.scans.get(int(req["scan"]))
        if state is not None:
            images = req.get("images", {})
            if not isinstance(images, dict) or not all(isinstance(v, bytes) for v in images.values()):
                return {"ok": False, "error": "images must map names to PNG bytes"}
            state.progress = dict(req.get("progress", {}))
            if images:  # the writer leaves them out while nobody watches
                state.images, state.images_updated = images, time.time()
        return {"ok": True}

    def _op_live(self, req: dict) -> dict:
        self.last_live_request = time.time()
        state = self.scans.get(int(req["scan"]))
        if state is None:
            return {"ok": False, "error": f"unknown scan {req['scan']}"}
        return {"ok": True, "images": state.images, "progress": state.progress, "updated": state.images_updated,
                "state": state.state}

    def _op_shutdown(self, req: dict) -> dict:
        """Every role stops. A scan still running is ended on purpose, not by a crash: it is
        listed failed (the writer's report, if it closes the scan on its way out, replaces
        that), so a control started later does not take it up again from the state file."""
        self.shutting_down = True
        for state in self.scans.values():
            if state.state == "running":
                state.state = "failed"
                state.summary = {"error": "the pipeline was shut down while the scan ran"}
                self.changed = True
        return {"ok": True}

    # -- loop -------------------------------------------------------------------------------------

    def _fail_over(self) -> None:
        """Start a new routing generation for every running scan that a dead node group (silent
        for ``dead_after_s``, not done) belongs to."""
        now = time.time()
        for state in self.scans.values():
            if state.state != "running":
                continue
            dead = []
            for n in alive_nodes(state.spec):
                seen = self.roles.get(f"node-{n}", {}).get("seen")
                # one control never heard of (named in start_scan) is unknown, not dead
                if n not in state.done_nodes and seen is not None and now - seen > self.config.flow.dead_after_s:
                    dead.append(n)
            if dead and len(dead) == len(alive_nodes(state.spec)):
                # Nobody to take the work over: a new generation would only throw away what is in
                # flight. If they come back the scan goes on; if not, it ends at its timeouts.
                if not state.all_silent_logged:
                    log.error("scan %d: no node group of it is answering (%s)", state.spec["scan"], dead)
                    state.all_silent_logged = True
            elif dead:
                self._new_generation(state, dead, f"node group(s) {dead} stopped answering")

    def _tick(self) -> None:
        now = time.time()
        self._fail_over()
        for state in self.scans.values():
            waiting = state.state == "running" and state.spec["thresholds"] is None
            if waiting and state.contributors and now - state.started > CALIBRATION_TIMEOUT_S:
                log.warning("scan %d: calibrating from %d of %d node groups (the others sent nothing)",
                            state.spec["scan"], len(state.contributors), len(alive_nodes(state.spec)))
                self._fit(state)

    def serve(self, stop_after_shutdown_s: float = 2.0) -> None:
        """Answer requests until a shutdown request, then keep answering a moment so every role
        hears about it in a heartbeat reply."""
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        shutdown_at = None
        while True:
            if self.shutting_down and shutdown_at is None:
                shutdown_at = time.time()
            if shutdown_at is not None and time.time() - shutdown_at > stop_after_shutdown_s:
                break
            if poller.poll(100):
                parts = self.socket.recv_multipart()
                if len(parts) < 2:
                    self.rejected += 1
                    continue
                identity, payload = parts[0], parts[-1]
                try:
                    reply = self.handle(unpack_control(payload))
                except MessageError as exc:
                    self.rejected += 1
                    log.warning("rejected control message: %s", exc)
                    reply = {"ok": False, "error": str(exc)}
                self._tick()
                if self.changed and self.state_path is not None:
                    self._save()  # before the reply: what a role was told survives a restart
                self.socket.send_multipart([identity, pack_control(reply)])
            else:
                self._tick()
            if self.changed and self.state_path is not None:
                self._save()
        self.socket.close(0)
