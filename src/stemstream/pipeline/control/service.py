"""Control: the scan lifecycle, threshold calibration across node groups, status of every role.

One ROUTER socket answers small msgpack requests (``op`` names the request); every request gets a
reply, and a request control cannot use gets ``{ok: false, error}`` (one sentence; its fields are
checked against the request's schema in pipeline.control.fields before anything changes). A request
other than ``status`` and ``get_scan`` needs an authenticated sender: a CURVE link, or else the
session token (transport.session_token); without it the reply is ``{ok: false, unauthenticated:
true, error}``. Roles learn about scans from the replies to their heartbeats, so no broadcast can
be missed by a late joiner. Requests:

- ``heartbeat {role, id, stats, host, instance}`` -> ``{scans: [spec...], shutdown, ages, acks,
  instance}``: the open scans, how long ago each role last checked in (node groups tell a dead
  producer from a slow one), the blocks the writer committed per open scan (producers free their
  resend buffers), and this control process's id (a new one tells the roles control was
  restarted). A role's own ``instance`` is its process's: a node group heard under a new one
  mid-scan was restarted and is failed over at once (pipeline.control.scans.ScanState.hear_node).
  A node group's heartbeat registers it, with the host it listens on; ``leave {role, id}``
  unregisters it. A scan uses the node groups registered (and alive) when it starts.
- ``start_scan {scan_number, scan_shape, frames_per_position, [nodes], ...}`` -> ``{scan: spec}``.
- ``committed {scan, ranges, fenced, done}`` from the writer: blocks committed, the routing
  generation it has fenced, node groups done in it. ``writer_restarted {scan}``: a new generation.
  A node group of a running scan silent for ``[flow] dead_after_s`` is failed over: a new
  routing generation without it (see core.scan_spec). ``gateway_restarted {id}``: a gateway
  that finds scans running at its start gets a new generation for each (its queues died with
  the gateway before it).
- ``get_scan {scan}`` -> ``{scan: spec, state, summary}``: for clients waiting on a scan
  (``stemstream scan``); roles read specs from heartbeat replies only.
- ``calibration {scan, node, values, counts, n_frames}``: a node group's pixel histogram.
- ``scan_done {scan, ok, summary}`` from the writer; ``status {}``; ``shutdown {}``.
- ``missed_blocks {module}`` -> ``{scans: [{scan: spec, blocks}]}``: the blocks of scans closed
  lately that the file holds without that module's sectors, for a producer that just started.
- Control restarted keeps its scans: see pipeline.control.state ([pipeline] state_file).
- Specs travel as core.scan_spec.ScanSpec.to_wire() maps. Live images are not control's: the
  dashboard asks the writer for them (pipeline.writer.live).
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import zmq

from stemstream.core.config import PipelineConfig
from stemstream.core.detector import MAX_NODE_ID, N_MODULES
from stemstream.counting.thresholds import PixelHistogram
from stemstream.pipeline.control import fields
from stemstream.pipeline.control.fields import RequestError
from stemstream.pipeline.control.scans import ScanState, forget_old_scans, last_sequence, new_spec, scan_file_name
from stemstream.pipeline.control.state import StateFile
from stemstream.transport import session_token
from stemstream.transport.curve import curve_for
from stemstream.transport.messages import MessageError, pack_control, unpack_control

__all__ = ["Control", "scan_file_name"]

log = logging.getLogger(__name__)

_HIGHEST_PORT = 65535
# how many earlier runs of one scan number control remembers the end of (ScanState.earlier_runs)
_EARLIER_RUNS_KEPT = 8


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
        self.roles: dict[str, dict] = {}  # "node-3" -> {role, id, seen (Unix time), stats[, host]}
        self.sequence = 0
        self.shutting_down = False
        self.rejected = 0
        self.instance = uuid.uuid4().hex  # new in every control process: roles see a restart
        # Without CURVE, requests that change something must carry this (transport.session_token).
        self.token = None if self.curve is not None else self._session_token()
        self.unauthenticated = 0  # requests refused for want of the token
        self.state_file = StateFile(Path(config.pipeline.state_file)) if config.pipeline.state_file else None
        self.changed = False  # a scan changed since the state file was written
        if self.state_file is not None:
            self.scans, self.sequence = self.state_file.load(config.flow.scan_timeout_s)
            self._expect_node_groups_back()
        self.sequence = max(self.sequence, last_sequence(Path(config.pipeline.output_dir)))

    def _expect_node_groups_back(self) -> None:
        """Node groups of a scan running at a restart must check in again: one that died while
        control was away is failed over once dead_after_s passes without a word from it."""
        now = time.time()
        for state in (s for s in self.scans.values() if s.running):
            for n in state.spec.alive:
                self.roles.setdefault(f"node-{n}", {"role": "node", "id": n, "seen": now, "stats": {}, "restored": True})

    def _session_token(self) -> str:
        path = session_token.token_path(self.config)
        try:
            return session_token.ensure_token(path)
        except OSError as exc:
            log.error("cannot write the session token to %s (%s): no role or command can change anything here",
                      path, exc.strerror or exc)
            return session_token.new_token()

    def save(self) -> None:
        """Write the state file (what serve() does after each request that changed a scan)."""
        if self.state_file is not None:
            self.state_file.save(self.scans, self.sequence)
        self.changed = False

    @property
    def highest_node_id(self) -> int:
        """The highest node-group id whose inputs have TCP ports (node group n listens on
        N_MODULES ports from node_base_port + N_MODULES x n); ipc endpoints are file names."""
        net = self.config.network
        if net.transport == "ipc":
            return MAX_NODE_ID
        return min(MAX_NODE_ID, (_HIGHEST_PORT - net.node_port(0, N_MODULES - 1)) // N_MODULES)

    # -- requests ---------------------------------------------------------------------------------

    def handle(self, request: dict) -> dict:
        """Answer a request once its schema's checks passed (pipeline.control.fields). Whether
        its sender may ask it is decided at the socket (:meth:`_answer`)."""
        op = request.get("op")
        try:
            fields.check(request)
            return getattr(self, f"_op_{op}")(request)
        except RequestError as exc:
            return {"ok": False, "error": str(exc)}
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # a field no check covers: a bug
            log.exception("%s request failed", op)
            return {"ok": False, "error": f"bad {op} request: {exc}"}

    def _running(self, req: dict) -> ScanState | None:
        """The running scan a request names, if it runs."""
        state = self.scans.get(fields.scan_number(req))
        return state if state is not None and state.running else None

    def _op_heartbeat(self, req: dict) -> dict:
        name, ident = fields.role(req)
        if name == "node" and ident > self.highest_node_id:
            raise RequestError(f"node group ids must be 0 to {self.highest_node_id} (their ports), got {ident}")
        entry = {"role": name, "id": ident, "seen": time.time(), "stats": fields.mapping(req, "stats", {})}
        if name == "node":
            entry["host"] = fields.host(req, self.config.network.host)
            entry["instance"] = req.get("instance")
        self.roles[f"{name}-{ident}"] = entry
        now = time.time()
        if name == "node":
            self._heard_node(ident, entry["instance"], now)
        return {"ok": True, "scans": [s.spec.to_wire() for s in self.scans.values() if s.running],
                "shutdown": self.shutting_down, "ages": {k: now - v["seen"] for k, v in self.roles.items()},
                "acks": {str(n): s.committed for n, s in self.scans.items() if s.running}, "instance": self.instance}

    def _heard_node(self, node: int, instance, now: float) -> None:
        """A node group checked in as process ``instance``: one restarted mid-scan is failed over
        at once, before this heartbeat's reply tells it the scans (see ScanState.hear_node)."""
        for state in self.scans.values():
            if state.running and state.hear_node(node, instance, now):
                self.changed = True

    def _op_leave(self, req: dict) -> dict:
        """A role stopping on purpose: not used by later scans, and failed over at once in a
        running one."""
        name, ident = fields.role(req)
        role = self.roles.get(f"{name}-{ident}")
        if role is not None:
            role["seen"], role["left"] = 0.0, True
        log.info("%s %s left", name, ident)
        return {"ok": True}

    def live_nodes(self) -> dict[int, str]:
        """Registered node groups heard from recently: id -> host they listen on."""
        now = time.time()
        return {v["id"]: v.get("host", self.config.network.host) for v in self.roles.values()
                if v["role"] == "node" and now - v["seen"] < self.config.flow.dead_after_s}

    def _op_status(self, req: dict) -> dict:
        now = time.time()
        roles = {k: {**v, "age_s": now - v["seen"]} for k, v in self.roles.items()}
        scans = {str(n): {"spec": s.spec.to_wire(), "state": s.state, "summary": s.summary, "started": s.started}
                 for n, s in self.scans.items()}
        return {"ok": True, "roles": roles, "scans": scans}

    def _op_start_scan(self, req: dict) -> dict:
        number = fields.scan_number(req, "scan_number")
        earlier = self.scans.get(number)
        if earlier is not None and earlier.running:
            return {"ok": False, "error": f"scan {number} is already running"}
        now = time.time()
        # A scan number used again starts above its last run's routing generation, so a message
        # of the earlier run is never taken for this one.
        first_generation = earlier.spec.generation + 1 if earlier is not None else 0
        spec = new_spec(req, number, self.sequence + 1, first_generation, self.config, self.live_nodes(),
                        self.highest_node_id, now)
        self.sequence += 1
        state = self.scans[number] = ScanState(spec=spec, started=now, histogram=PixelHistogram())
        if earlier is not None:  # the runs before, as far back as the last few
            state.earlier_runs = {**earlier.earlier_runs, earlier.spec.epoch: earlier.outcome()}
            state.earlier_runs = dict(sorted(state.earlier_runs.items())[-_EARLIER_RUNS_KEPT:])
        for node in spec.nodes:  # the processes serving it now: another one later was restarted
            state.hear_node(node, self.roles.get(f"node-{node}", {}).get("instance"), now)
        self.changed = True
        log.info("scan %d started: %dx%d, %d frame(s) per position, node group(s) %s", number, *spec.shape,
                 spec.frames_per_position, spec.nodes)
        return {"ok": True, "scan": spec.to_wire()}

    def _op_committed(self, req: dict) -> dict:
        state = self._running(req)
        if state is None:
            return {"ok": True}
        ranges = fields.block_ranges(req, state.spec.n_blocks)
        fenced = fields.fenced(req)
        done = set(fields.done_nodes(req))
        self.changed |= state.record_commits(ranges, fenced, done)
        return {"ok": True}

    def _op_writer_restarted(self, req: dict) -> dict:
        """The writer lost what it had not committed: everything uncommitted is streamed again."""
        state = self._running(req)
        if state is None:
            return {"ok": False, "error": f"scan {req['scan']} is not running"}
        state.new_generation([], "writer restarted", time.time())
        self.changed = True
        return {"ok": True, "generation": state.spec.generation}  # the new spec: in the next heartbeat reply

    def _op_gateway_restarted(self, req: dict) -> dict:
        """A gateway started while scans run: the one before it died with messages in its queues
        (or it joins late and nothing reached the node groups through it), so everything
        uncommitted is streamed again."""
        gateway = fields.gateway_id(req)
        running = [state for state in self.scans.values() if state.running]
        for state in running:
            state.new_generation([], f"gateway {gateway} restarted", time.time())
            self.changed = True
        return {"ok": True, "scans": [state.spec.number for state in running]}

    def _op_get_scan(self, req: dict) -> dict:
        number = fields.scan_number(req)
        state = self.scans.get(number)
        if state is None:
            return {"ok": False, "error": f"unknown scan {number}"}
        return {"ok": True, "scan": state.spec.to_wire(), "state": state.state, "summary": state.summary,
                "earlier_runs": {str(epoch): outcome for epoch, outcome in state.earlier_runs.items()}}

    def _op_missed_blocks(self, req: dict) -> dict:
        """For a producer process that has just checked in: the scans closed in the last
        ``scan_timeout_s`` with blocks counted without its module (it was dead then: killed, and
        started again later than silent_after_s), and those blocks, which it spills from its
        source so that a replay completes their frames (pipeline.producer)."""
        module = fields.module(req)
        since = time.time() - self.config.flow.scan_timeout_s
        scans = []
        for state in self.scans.values():
            blocks = state.blocks_lacking(module) if (state.ended_at or 0.0) >= since else []
            if blocks:
                scans.append({"scan": state.spec.to_wire(), "blocks": blocks})
        return {"ok": True, "scans": scans}

    def _op_calibration(self, req: dict) -> dict:
        state = self._running(req)
        node = fields.node(req)
        if state is None or not state.wants_histogram(node):
            return {"ok": True}  # late or unneeded contribution
        if node not in state.spec.nodes:
            raise RequestError(f"node group {node} is not in scan {state.spec.number}")
        try:
            histogram = PixelHistogram.from_wire(req)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        state.add_histogram(node, histogram)
        self.changed = True
        return {"ok": True}

    def _op_scan_done(self, req: dict) -> dict:
        number = fields.scan_number(req)
        ok = fields.scan_ok(req)
        summary = fields.summary(req)
        state = self.scans.get(number)
        if state is not None:
            state.finish(ok, summary)
            self.changed = True
            forget_old_scans(self.scans)
        return {"ok": True}

    def _op_shutdown(self, req: dict) -> dict:
        """Every role stops. A scan still running is ended on purpose, not by a crash: it is
        listed failed (the writer's report, if it closes the scan on its way out, replaces
        that), so a control started later does not take it up again from the state file."""
        self.shutting_down = True
        for state in self.scans.values():
            if state.running:
                state.fail("the pipeline was shut down while the scan ran")
                self.changed = True
        return {"ok": True}

    # -- loop -------------------------------------------------------------------------------------

    def tick(self) -> None:
        """Fail over the node groups silent for dead_after_s; calibrate the scans whose missing
        histograms are overdue."""
        now = time.time()
        seen = {v["id"]: v["seen"] for v in self.roles.values() if v["role"] == "node"}
        for state in self.scans.values():
            if state.running and state.fail_over(seen, now, self.config.flow.dead_after_s):
                self.changed = True
            if state.calibration_overdue(now):
                log.warning("scan %d: calibrating from %d of %d node groups (the others sent nothing)",
                            state.spec.number, len(state.contributors), len(state.spec.alive))
                state.fit()
                self.changed = True

    def _answer(self, parts: list[bytes]) -> None:
        """Answer one request; the state file is written before the reply, so what a role was
        told survives a restart."""
        if len(parts) < 2:
            self.rejected += 1
            return
        identity, payload = parts[0], parts[-1]
        try:
            request = unpack_control(payload)
            reply = self._refusal(request) or self.handle(request)
        except MessageError as exc:
            self.rejected += 1
            log.warning("rejected control message: %s", exc)
            reply = {"ok": False, "error": str(exc)}
        self.tick()
        if self.changed:
            self.save()
        self.socket.send_multipart([identity, pack_control(reply)])

    def _refusal(self, request: dict) -> dict | None:
        """The reply to a request whose sender may not make it: one that changes something,
        without the session token, on a link CURVE did not authenticate. None: it may."""
        if self.token is None or fields.reads_only(request.get("op")):
            return None
        if session_token.matches(request.get(session_token.TOKEN_FIELD), self.token):
            return None
        self.rejected += 1
        self.unauthenticated += 1
        if self.unauthenticated <= 3:
            log.warning("refused a %.40r request without this pipeline's session token", request.get("op"))
        return {"ok": False, session_token.REFUSED_FIELD: True,
                "error": "this request needs the pipeline's session token (or [security] curve)"}

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
                self._answer(self.socket.recv_multipart())
            else:
                self.tick()
            if self.changed:
                self.save()
        self.socket.close(0)
