"""What one scan is, as control decides it and every role reads it: the typed scan spec.

Control makes a :class:`ScanSpec` when a scan starts and changes it as the scan goes (a new
routing generation after a failover, the generation the writer has fenced, the thresholds once
calibrated). Roles learn it only from the replies to their heartbeats (``heartbeat`` ->
``{scans: [spec...]}``), never by asking for it on their own; a role that needs a newer one
sooner heartbeats sooner. On the wire a spec is the msgpack map of :meth:`ScanSpec.to_wire`;
:meth:`ScanSpec.from_wire` is the only reader of that map and checks every field.

Routing. A scan's routing block ``b`` (frames ``b * block_frames ..``) belongs to
``nodes[b % len(nodes)]``. When a node group dies mid-scan (or the writer or a gateway restarts),
control starts a new routing *generation* with the node groups still ``alive``: the writer drops
whatever it had not committed from earlier generations (it *fences* them), and the producers
resend every block the writer has not committed, in the new generation, to a node group alive
in it. Each (node group, generation, module) is one stream in block order, which is what lets a
node group tell a part that will still come from one that never will. A scan number used again
starts above its last run's generation, and gets a new ``epoch``, so nothing of an earlier run is
taken for the new one.

Which blocks a node group may be sent is the spec's too (:meth:`ScanSpec.blocks_of`,
:meth:`ScanSpec.block_problem`): a node group refuses a block number its spec does not route to
it, and holds a module open until every block routed to it has come from that module.

Incarnations. ``instances`` names the process (its incarnation, new at every start) of each node
group serving the scan, as control last heard it. A node group that answers under another one
was restarted and lost what it held: control starts a new routing generation at once, as after a
death (pipeline.control.scans), rather than waiting ``dead_after_s`` for a silence that never comes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from stemstream.core.detector import MAX_NODE_ID, MAX_SCAN_SIDE
from stemstream.core.thresholds import Thresholds

_SHAPE = re.compile(r"^\s*(\d+)\s*[xX,]\s*(\d+)\s*$")
# An incarnation is a short token (a uuid's hex); anything longer is not one.
MAX_INSTANCE_CHARS = 64
# Blocks routed at once by blocks_of: bounds its memory on the largest scans (~40 MB).
_ROUTING_CHUNK = 1 << 20
# A scan's frames are numbered from 0 (the simulated producers) or from 1 (the receivers, and the
# simulator's receiver files); a frame's block is frame_number // block_frames either way.
LAST_FIRST_FRAME = 1


class SpecError(ValueError):
    """A scan spec (or a scan shape) that cannot be used; the message is one sentence."""


def check_scan_shape(rows: int, cols: int, what: str = "scan shape") -> tuple[int, int]:
    """(rows, cols) when both fit the detector's uint16 header fields; SpecError otherwise."""
    if not (1 <= rows <= MAX_SCAN_SIDE and 1 <= cols <= MAX_SCAN_SIDE):
        raise SpecError(f"{what} needs 1 to {MAX_SCAN_SIDE} rows and columns, got {rows}x{cols}")
    return rows, cols


def parse_scan_shape(text: str, what: str = "scan shape") -> tuple[int, int]:
    """``ROWSxCOLS`` (e.g. ``128x256``) as (rows, cols); SpecError otherwise."""
    match = _SHAPE.match(str(text))
    if not match:
        raise SpecError(f"{what} must look like ROWSxCOLS (e.g. 64x64), got {text!r}")
    return check_scan_shape(int(match.group(1)), int(match.group(2)), what)


@dataclass
class CalibrationSettings:
    """How a scan's thresholds are calibrated from its own frames (the [counting] settings)."""

    sigma: float
    xray_sigma: float
    samples: int
    calibration_frames: int


@dataclass
class Failover:
    """One change of routing generation: which node groups were dropped and why."""

    generation: int
    dead: list[int]
    reason: str
    at: float  # Unix time
    committed_blocks: int  # blocks the writer had committed when it happened


@dataclass
class ScanSpec:
    """One scan. ``shape`` is (rows, cols) of scan positions; ``node_hosts`` maps a node group to
    the host it listens on."""

    number: int
    epoch: int  # tells a run of a scan number from an earlier run of the same number
    shape: tuple[int, int]  # (rows, cols)
    frames_per_position: int
    nodes: list[int]
    block_frames: int
    file_name: str
    calibration: CalibrationSettings
    node_hosts: dict[int, str] = field(default_factory=dict)
    generation: int = 0  # routing generation, one more after each failover
    alive: list[int] | None = None  # node groups of the current generation (None: all of them)
    fenced: int = 0  # the generation the writer has fenced
    failovers: list[Failover] = field(default_factory=list)
    resume: bool = False  # a replay into an existing file
    thresholds: Thresholds | None = None  # None until calibrated
    instances: dict[int, str] = field(default_factory=dict)  # node group -> the process serving it

    def __post_init__(self):
        if self.alive is None:
            self.alive = list(self.nodes)

    # -- what the spec implies ------------------------------------------------------------------

    @property
    def key(self) -> tuple[int, int]:
        """(scan number, epoch): one run of one scan."""
        return self.number, self.epoch

    @property
    def n_positions(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def n_frames(self) -> int:
        return self.n_positions * self.frames_per_position

    @property
    def n_blocks(self) -> int:
        return -(-self.n_frames // self.block_frames)

    @property
    def last_block(self) -> int:
        """The highest block number a frame of the scan can have (frames numbered from 0 or 1)."""
        return (self.n_frames - 1 + LAST_FIRST_FRAME) // self.block_frames

    def host_of(self, node: int) -> str:
        """The host node group ``node`` listens on ("" when control did not say)."""
        return self.node_hosts.get(node, "")

    def route(self, block: int) -> tuple[int, int] | None:
        """(node group, generation) that counts ``block`` now; None when no node group is alive."""
        if not self.alive:
            return None
        owner = self.nodes[block % len(self.nodes)]
        return (owner if owner in self.alive else self.alive[block % len(self.alive)]), self.generation

    def blocks_of(self, node: int) -> np.ndarray:
        """The blocks :meth:`route` gives node group ``node`` in the current generation that hold
        a frame of the scan whether its frames are numbered from 0 or from 1, ascending (int64)."""
        if node not in self.alive:
            return np.empty(0, np.int64)
        nodes, alive = np.asarray(self.nodes), np.asarray(self.alive)
        found = []
        first, stop = LAST_FIRST_FRAME // self.block_frames, (self.n_frames - 1) // self.block_frames + 1
        for start in range(first, stop, _ROUTING_CHUNK):
            blocks = np.arange(start, min(start + _ROUTING_CHUNK, stop), dtype=np.int64)
            owner = nodes[blocks % len(nodes)]
            target = np.where(np.isin(owner, alive), owner, alive[blocks % len(alive)])
            found.append(blocks[target == node])
        return np.concatenate(found) if found else np.empty(0, np.int64)

    def block_problem(self, block: int, node: int) -> str | None:
        """Why node group ``node`` cannot be sent ``block`` in the current generation (a
        rejection reason), or None when it can."""
        if block > self.last_block:
            return "block_not_in_scan"
        target = self.route(block)
        if target is None or target[0] != node:
            return "block_not_routed_here"
        return None

    def new_generation(self, dead: list[int], reason: str, at: float, committed_blocks: int) -> None:
        """Start the next routing generation without the node groups ``dead``."""
        self.generation += 1
        self.alive = [n for n in self.alive if n not in dead]
        self.failovers.append(Failover(self.generation, list(dead), reason, at, committed_blocks))

    # -- the wire form ----------------------------------------------------------------------------

    def to_wire(self) -> dict:
        return {
            "scan": self.number,
            "epoch": self.epoch,
            "scan_shape": list(self.shape),
            "frames_per_position": self.frames_per_position,
            "nodes": list(self.nodes),
            "node_hosts": {str(n): h for n, h in self.node_hosts.items()},
            "generation": self.generation,
            "alive": list(self.alive),
            "fenced": self.fenced,
            "failovers": [vars(f).copy() for f in self.failovers],
            "block_frames": self.block_frames,
            "file_name": self.file_name,
            "resume": self.resume,
            "calibration": vars(self.calibration).copy(),
            "thresholds": None if self.thresholds is None else self.thresholds.as_dict(),
            "instances": {str(n): i for n, i in self.instances.items()},
        }

    @classmethod
    def from_wire(cls, data) -> ScanSpec:
        """The spec of a :meth:`to_wire` map; SpecError naming the first bad field otherwise."""
        if not isinstance(data, dict):
            raise SpecError("a scan spec must be a map")
        try:
            return cls._from_wire(data)
        except SpecError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise SpecError(f"a scan spec field is missing or of the wrong type ({type(exc).__name__}: {exc})") from None

    @classmethod
    def _from_wire(cls, d: dict) -> ScanSpec:
        rows, cols = (_integer(v, "scan_shape") for v in d["scan_shape"])
        nodes = [_integer(n, "nodes", 0, MAX_NODE_ID) for n in d["nodes"]]
        if not nodes:
            raise SpecError("a scan spec names no node group")
        alive = [_integer(n, "alive", 0, MAX_NODE_ID) for n in d.get("alive", nodes)]
        cal = d["calibration"]
        thresholds = d.get("thresholds")
        return cls(
            number=_integer(d["scan"], "scan"),
            epoch=_integer(d["epoch"], "epoch"),
            shape=check_scan_shape(rows, cols),
            frames_per_position=_integer(d["frames_per_position"], "frames_per_position", 1),
            nodes=nodes,
            block_frames=_integer(d["block_frames"], "block_frames", 1),
            file_name=_text(d["file_name"], "file_name"),
            calibration=CalibrationSettings(float(cal["sigma"]), float(cal["xray_sigma"]), int(cal["samples"]),
                                            int(cal["calibration_frames"])),
            node_hosts={_integer(int(n), "node_hosts", 0, MAX_NODE_ID): _text(h, "node_hosts")
                        for n, h in dict(d.get("node_hosts", {})).items()},
            generation=_integer(d.get("generation", 0), "generation"),
            alive=alive,
            fenced=_integer(d.get("fenced", 0), "fenced"),
            failovers=[Failover(int(f["generation"]), [int(n) for n in f["dead"]], str(f["reason"]), float(f["at"]),
                                int(f.get("committed_blocks", 0))) for f in d.get("failovers", [])],
            resume=bool(d.get("resume", False)),
            thresholds=None if thresholds is None else Thresholds.from_dict(thresholds),
            instances={_integer(int(n), "instances", 0, MAX_NODE_ID): _instance(i)
                       for n, i in dict(d.get("instances", {})).items()},
        )


def _integer(value, name: str, low: int = 0, high: int = 2**63 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(f"a scan spec's {name} must be an integer {low} to {high}, got {value!r}")
    return value


def _text(value, name: str) -> str:
    if not isinstance(value, str):
        raise SpecError(f"a scan spec's {name} must be text, got {value!r}")
    return value


def _instance(value) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_INSTANCE_CHARS:
        raise SpecError(f"a scan spec's instances must be tokens of 1 to {MAX_INSTANCE_CHARS} characters, "
                        f"got {value!r:.80}")
    return value
