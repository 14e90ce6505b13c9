"""The chaos's faults (tests/chaos_support.py runs them): the fault classes, a trial's seeded
schedule, and the forged and garbage messages: control requests with bad fields or without the
session token, well-formed forged blocks and END markers at a node group's input, and random bytes
at the node groups', the gateway's and the writer's inputs.

Which forgeries a fault sends is drawn with its schedule (:meth:`Injector.draw`, shown in the
schedule), and the bytes of the garbage from the fault itself, so a seed gives the same messages.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import msgpack
import numpy as np
import zmq

from stemstream.core.detector import N_MODULES, RECORD_BYTES, RECORD_DTYPE
from stemstream.formats import wire
from stemstream.transport.control_client import ControlClient, ControlUnavailable

ROLE_FAMILIES = ("node", "writer", "gateway", "control", "producer")
MESSAGE_FAULTS = ("forge:control", "forge:node", "garbage:node", "garbage:gateway", "garbage:writer")
# Every fault class a schedule draws from, "what:whom"; kill_at_close kills the writer the moment
# the scan's file appears under its final name (between the rename and its report to control).
FAULT_CLASSES = (*(f"{a}:{r}" for a in ("kill", "stop") for r in ROLE_FAMILIES), "kill_at_close:writer",
                 *MESSAGE_FAULTS)


@dataclass(frozen=True)
class Fault:
    """One fault of a schedule: ``kind`` (a FAULT_CLASSES entry) on the process ``target`` (e.g.
    "node-1", "producer-2", "writer") ``at_s`` seconds after the scan started; ``hold_s`` until a
    killed role is started again or a stopped one resumed; ``detail``: which forged messages."""

    at_s: float
    kind: str
    target: str
    hold_s: float = 0.0
    detail: str = ""

    def __str__(self) -> str:
        when = "at close" if self.kind.startswith("kill_at_close") else f"{self.at_s:.2f}s"
        hold = f" for {self.hold_s:.1f}s" if self.hold_s else ""
        return f"{when} {self.kind.split(':')[0]} {self.target}{hold}{' ' + self.detail if self.detail else ''}"


def draw_schedule(seed: int, classes: tuple[str, ...], window_s: float, nodes: int, most: int = 3) -> list[Fault]:
    """1 to ``most`` faults of ``classes`` at random moments of the first ``window_s`` seconds of
    a scan, the same for the same seed."""
    rng = random.Random(seed)
    faults = []
    for _ in range(rng.randint(1, most)):
        kind = rng.choice(classes)
        action, family = kind.split(":")
        target = {"node": f"node-{rng.randrange(nodes)}", "producer": f"producer-{rng.randrange(N_MODULES)}",
                  "gateway": "gateway-0"}.get(family, family)
        hold = {"kill": rng.uniform(0.2, 4.0), "stop": rng.uniform(0.5, 6.0),
                "kill_at_close": rng.uniform(0.2, 2.0)}.get(action, 0.0)
        detail = Injector.draw(kind, rng)
        faults.append(Fault(round(rng.uniform(0.0, window_s), 2), kind, target, round(hold, 1), detail))
    return sorted(faults, key=lambda f: f.at_s)


INF = float("inf")
LAST_BLOCK = 2**32 - 1
SCAN = object()  # stands for the running scan's number in the requests below

# name -> (sent with the session token, op, fields): every one must be refused (ok false), none
# may stop or stall control. Without the token, requests that would change something; with it,
# requests whose fields are out of range.
CONTROL_FORGERIES = {
    "anon_shutdown": (False, "shutdown", {}),
    "anon_start": (False, "start_scan", {"scan_number": 9001, "scan_shape": [4, 4]}),
    "anon_writer_restarted": (False, "writer_restarted", {"scan": SCAN}),
    "anon_gateway_restarted": (False, "gateway_restarted", {"id": 0}),
    "anon_committed": (False, "committed", {"scan": SCAN, "ranges": [[0, 1_000_000]], "fenced": 0, "done": []}),
    "anon_scan_done": (False, "scan_done", {"scan": SCAN, "ok": False, "summary": {"error": "forged"}}),
    "anon_leave": (False, "leave", {"role": "node", "id": 0}),
    "anon_heartbeat": (False, "heartbeat", {"role": "node", "id": 0, "stats": {}, "instance": "forged"}),
    "get_scan_inf": (True, "get_scan", {"scan": INF}),
    "get_scan_2^64-1": (True, "get_scan", {"scan": 2**64 - 1}),  # msgpack carries no larger integer
    "start_inf": (True, "start_scan", {"scan_number": INF, "scan_shape": [4, 4]}),
    "start_negative": (True, "start_scan", {"scan_number": -1, "scan_shape": [4, 4]}),
    "start_shape_0": (True, "start_scan", {"scan_number": 9002, "scan_shape": [0, 4]}),
    "start_shape_inf": (True, "start_scan", {"scan_number": 9003, "scan_shape": [4, INF]}),
    "start_shape_70000": (True, "start_scan", {"scan_number": 9004, "scan_shape": [70000, 70000]}),
    "start_fpp_0": (True, "start_scan", {"scan_number": 9005, "scan_shape": [4, 4], "frames_per_position": 0}),
    "heartbeat_id_1e300": (True, "heartbeat", {"role": "node", "id": 1e300, "stats": {}}),
    "heartbeat_id_2^40": (True, "heartbeat", {"role": "node", "id": 2**40, "stats": {}}),
    "committed_inf": (True, "committed", {"scan": SCAN, "ranges": [[0, INF]], "fenced": 0, "done": []}),
    "scan_done_inf": (True, "scan_done", {"scan": INF, "ok": True, "summary": {}}),
    "calibration_inf": (True, "calibration", {"scan": SCAN, "node": 0, "values": [INF], "counts": [-1],
                                              "n_frames": INF}),
}
# Well-formed messages a node group must not let change the scan (see Injector._node_forgery).
NODE_FORGERIES = ("block_max", "end", "garbage_records", "spilled_notice", "end_spilled", "next_generation")


class Injector:
    """Sends one fault's messages; what went wrong (a forgery control accepted, control silent
    afterwards) comes back as sentences."""

    def __init__(self, config):
        self.network = config.network
        self.context = zmq.Context.instance()
        self.trusted = ControlClient.for_config(config, timeout_s=3.0)
        self.anonymous = ControlClient(config.network.control(), timeout_s=3.0)

    def close(self) -> None:
        self.trusted.close()
        self.anonymous.close()

    @staticmethod
    def draw(kind: str, rng: random.Random) -> str:
        """Which messages a fault of ``kind`` sends, drawn with its schedule ("" for other kinds)."""
        if kind == "forge:control":
            return ",".join(rng.sample(sorted(CONTROL_FORGERIES), rng.randint(3, 6))) + ",junk"
        if kind == "forge:node":
            return f"module {rng.randrange(N_MODULES)}: " + ",".join(rng.sample(NODE_FORGERIES, rng.randint(1, 3)))
        if kind.startswith("garbage:"):
            return f"x{rng.randint(20, 200)}"
        return ""

    def send(self, fault, scan: int, control_up: bool) -> list[str]:
        """Send ``fault``'s messages during scan ``scan``; ``control_up``: control runs and is not
        stopped (else its silence is no finding)."""
        rng = random.Random(str(fault))
        family = fault.kind.split(":")[1]
        if fault.kind == "forge:control":
            return self._control(fault.detail.split(",")[:-1], scan, rng, control_up)
        if fault.kind == "forge:node":
            return self._node_forgery(fault, scan, rng)
        count = int(fault.detail[1:])
        if family == "node":
            node = int(fault.target.split("-")[1])
            endpoints = [self.network.node(node, m) for m in range(N_MODULES)]
        elif family == "gateway":
            endpoints = [self.network.gateway(m) for m in range(N_MODULES)]
        else:
            endpoints = [self.network.writer()]
        for endpoint in endpoints:
            self._push(endpoint, [garbage(rng) for _ in range(count // len(endpoints) + 1)])
        return []

    def _push(self, endpoint: str, messages: list[list]) -> None:
        sock = self.context.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.connect(endpoint)
        for parts in messages:
            try:
                sock.send_multipart(parts, flags=zmq.NOBLOCK)
            except zmq.Again:
                break
        sock.close(linger=1000)

    def _control(self, names: list[str], scan: int, rng: random.Random, control_up: bool) -> list[str]:
        problems = []
        for name in names:
            trusted, op, fields = CONTROL_FORGERIES[name]
            fields = {k: scan if v is SCAN else v for k, v in fields.items()}
            try:
                reply = (self.trusted if trusted else self.anonymous).request(op, **fields)
            except ControlUnavailable:
                if control_up:
                    problems.append(f"control did not answer the forged request {name}")
                continue
            if reply.get("ok") is not False:
                problems.append(f"control accepted the forged request {name}: {str(reply)[:200]}")
        self._junk_to_control(rng)
        if control_up:
            try:
                self.anonymous.request("status", timeout_s=5.0)
            except ControlUnavailable:
                problems.append(f"control stopped answering after the forged requests {names} and junk")
        return problems

    def _junk_to_control(self, rng: random.Random) -> None:
        sock = self.context.socket(zmq.DEALER)
        sock.connect(self.network.control())
        for _ in range(5):
            sock.send_multipart([b"", rng.randbytes(rng.randint(0, 300))], flags=zmq.NOBLOCK)
            sock.send_multipart(garbage(rng), flags=zmq.NOBLOCK)
        sock.close(linger=500)

    def _node_forgery(self, fault, scan: int, rng: random.Random) -> list[str]:
        """Well-formed forged messages for the running scan's current routing generation, at node
        group ``fault.target``'s input of one module: a block numbered 2^32-1 without records, an
        END that claims nothing was sent, records of random bytes for a real block, notices that
        real blocks were spilled (in a block's envelope and in an END), a block of a generation
        control has not started."""
        try:
            reply = self.anonymous.request("get_scan", scan=scan)
        except ControlUnavailable:
            return []  # control is down: the forgery needs the scan's generation
        if not reply.get("ok"):
            return []
        spec = reply["scan"]
        node = int(fault.target.split("-")[1])
        module = int(fault.detail.split(":")[0].split()[1])
        gen = int(spec["generation"])
        rows, cols = spec["scan_shape"]
        n_blocks = -(-rows * cols * spec["frames_per_position"] // spec["block_frames"])
        real = sorted(rng.sample(range(n_blocks), min(3, n_blocks)))
        empty = np.empty(0, RECORD_DTYPE)
        junk = np.frombuffer(rng.randbytes(rng.randint(1, 4) * RECORD_BYTES), RECORD_DTYPE)
        made = {
            "block_max": lambda: wire.encode_sectors(scan, module, LAST_BLOCK, node, empty, stream=gen),
            "end": lambda: wire.encode_end(scan, module, node, sent=0, stream=gen),
            "garbage_records": lambda: wire.encode_sectors(scan, module, real[0], node, junk, stream=gen),
            "spilled_notice": lambda: wire.encode_sectors(scan, module, real[0], node, empty, spilled=real, stream=gen),
            "end_spilled": lambda: wire.encode_end(scan, module, node, sent=0, spilled_blocks=real, stream=gen),
            "next_generation": lambda: wire.encode_sectors(scan, module, real[0], node, empty, stream=gen + 1),
        }
        names = fault.detail.split(": ")[1].split(",")
        self._push(self.network.node(node, module), [made[name]() for name in names])
        return []


def garbage(rng: random.Random) -> list[bytes]:
    """A multipart message of random bytes, now and then behind a real kind byte or with an
    envelope that decodes to a map of nonsense."""
    first = rng.choice([wire.SECTORS, wire.END, wire.EVENTS, wire.DONE, wire.ANALYSIS, rng.randbytes(rng.randint(0, 4))])
    parts = [first]
    for _ in range(rng.randint(0, 6)):
        if rng.random() < 0.3:
            parts.append(msgpack.packb({rng.choice(["scan", "node", "n", "block", "x"]): rng.choice(
                [rng.randint(-2**40, 2**40), INF, "x", None, [1, 2]]) for _ in range(rng.randint(1, 4))}))
        else:
            parts.append(rng.randbytes(rng.randint(0, 400)))
    return parts
