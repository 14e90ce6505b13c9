"""Bad input at the node groups' and the gateway's inputs: every malformed message is rejected and
counted exactly once, nothing crashes or hangs, and the good frames around them are counted
exactly as offline.

Two layers:

- in process (fast): hypothesis throws at least 10,000 malformed messages at ``NodeGroup.handle``
  and ``Gateway.route`` (truncated, oversized, wrong types, wrong module, wrong node, unknown scan,
  huge scan shapes, positions outside the scan, frames outside their block, other scans' numbers,
  duplicates, late sectors), with an in-process Control standing in for the control socket,
  interleaved with the good SECTORS messages of a small scan;
- real sockets: a LocalPipeline streams a scan while a few hundred malformed messages are pushed
  into a node group's and the gateway's inputs.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline_support import InProcessControl, assert_same_events, test_config
from stemstream.counting.kernel import ElectronCounter
from stemstream.counting.offline import CountOptions, count_raw_scan
from stemstream.deploy.local import LocalPipeline, ProducerSource
from stemstream.formats import wire
from stemstream.formats.raw import FRAME_SHAPE, N_MODULES, RECORD_BYTES, RECORD_DTYPE
from stemstream.formats.ledger import ScanLedger
from stemstream.pipeline.control.service import Control
from stemstream.pipeline.gateway import Gateway
from stemstream.pipeline.node.role import NodeGroup
from stemstream.sources.simulator import DetectorSimulator, SimulationConfig, simulate_to_directory

SCAN = 7
SHAPE = (8, 8)  # rows, cols
BLOCK_FRAMES = 4
BACKGROUND, XRAY = 28.0, 1000.0
KINDS = (wire.SECTORS, wire.END, wire.EVENTS, wire.DONE, wire.ANALYSIS)
# Reasons a node group gives per sector record (inside a well-formed message), not per message.
RECORD_REASONS = {"other_scan_number", "scan_shape_mismatch", "position_out_of_bounds", "wrong_block", "late_sector"}
MISSING = object()


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def sectors_envelope(module: int, block: int = 0, node: int = 0, n: int = 0, scan: int = SCAN) -> dict:
    return {"scan": scan, "module": module, "block": block, "node": node, "n": n, "spilled": []}


def end_envelope(module: int, node: int = 0, scan: int = SCAN) -> dict:
    return {"scan": scan, "module": module, "node": node, "sent": 0, "spilled": 0, "spilled_blocks": []}


# -- malformed messages --------------------------------------------------------------------------


@dataclass
class Bad:
    """A malformed message. node_reasons: what the node group may reject it for; gateway_reasons:
    the same at the gateway, or None when the gateway cannot tell (it reads only the envelope) and
    forwards it to the node group."""

    category: str
    module: int
    parts: list
    node_reasons: set
    gateway_reasons: set | None


def bad_int(low: int, high: int):
    """Anything a peer could put where an integer in low..high belongs, except such an integer."""
    return st.one_of(
        st.none(), st.booleans(), st.floats(), st.text(max_size=6), st.binary(max_size=6),
        st.lists(st.integers(0, 9), max_size=3), st.dictionaries(st.text(max_size=2), st.integers(0, 9), max_size=2),
        st.integers(-(2**63), low - 1), st.integers(high + 1, 2**64 - 1),
    )


def bad_block_list():
    """Not a list of block numbers."""
    bad_element = st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=3), st.integers(-(2**63), -1),
                            st.integers(2**32, 2**64 - 1))
    return st.one_of(
        st.none(), st.booleans(), st.integers(0, 2**32), st.text(max_size=4), st.dictionaries(st.text(max_size=2), st.integers(0, 9), min_size=1, max_size=2),
        st.tuples(st.lists(st.integers(0, 99), max_size=3), bad_element, st.lists(st.integers(0, 99), max_size=3)).map(
            lambda t: [*t[0], t[1], *t[2]]),
    )


SECTORS_FIELDS = {"scan": (0, 2**32 - 1), "module": (0, 3), "block": (0, 2**32 - 1), "node": (0, 65535),
                  "n": (0, wire.MAX_RECORDS_PER_MESSAGE)}
END_FIELDS = {"scan": (0, 2**32 - 1), "module": (0, 3), "node": (0, 65535), "sent": (0, 2**40), "spilled": (0, 2**40)}


@st.composite
def malformed(draw, nodes: int = 1, in_process: bool = True, scan: int = SCAN) -> Bad:
    """One malformed message of a random category, for module ``module``'s input."""
    module = draw(st.integers(0, N_MODULES - 1))
    categories = ["unknown_kind", "unexpected_kind", "part_count", "garbage_envelope", "not_a_map", "big_envelope",
                  "bad_field", "wrong_module", "wrong_node", "unknown_scan", "truncated", "oversized",
                  "record_count", "bad_descriptor"]
    if in_process:
        categories.append("empty")  # ZeroMQ cannot send a message of no parts
    category = draw(st.sampled_from(categories))
    is_end = draw(st.booleans())
    kind = wire.END if is_end else wire.SECTORS
    base = end_envelope(module, scan=scan) if is_end else sectors_envelope(module, scan=scan)

    def message(envelope) -> list:
        env = envelope if isinstance(envelope, bytes) else pack(envelope)
        return [kind, env] if is_end else [kind, env, b""]

    if category == "empty":
        return Bad(category, module, [], {"empty_message"}, {"empty_message"})
    if category == "unknown_kind":
        first = draw(st.binary(max_size=4).filter(lambda b: b not in KINDS))
        rest = draw(st.lists(st.binary(max_size=16), max_size=3))
        return Bad(category, module, [first, *rest], {"unknown_kind"}, {"unknown_kind"})
    if category == "unexpected_kind":
        first = draw(st.sampled_from([wire.EVENTS, wire.DONE, wire.ANALYSIS]))
        rest = draw(st.lists(st.binary(max_size=16), max_size=7))
        return Bad(category, module, [first, *rest], {"unexpected_kind"}, {"unexpected_kind"})
    if category == "part_count":
        right = 2 if is_end else 3
        count = draw(st.integers(1, 7).filter(lambda c: c != right))
        parts = [kind, pack(base), b"", b"x"][:count] + [b""] * max(count - 4, 0)
        return Bad(category, module, parts, {"wrong_part_count"}, {"wrong_part_count"})
    if category == "garbage_envelope":
        reasons = {"undecodable_envelope", "bad_envelope"}
        return Bad(category, module, message(draw(st.binary(max_size=64))), reasons, reasons)
    if category == "not_a_map":
        value = draw(st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=8), st.none(), st.booleans(),
                               st.floats(), st.lists(st.integers(0, 9), max_size=4)))
        return Bad(category, module, message(pack(value)), {"undecodable_envelope"}, {"undecodable_envelope"})
    if category == "big_envelope":
        pad = draw(st.integers(wire.MAX_ENVELOPE_BYTES, 4 * wire.MAX_ENVELOPE_BYTES))
        return Bad(category, module, message({**base, "pad": "x" * pad}), {"envelope_too_big"}, {"envelope_too_big"})
    if category == "bad_field":
        fields = END_FIELDS if is_end else SECTORS_FIELDS
        names = [*fields, "spilled_blocks" if is_end else "spilled"]
        name = draw(st.sampled_from(names))
        if name in fields:
            value = draw(st.one_of(st.just(MISSING), bad_int(*fields[name])))
        else:
            value = draw(bad_block_list())
        envelope = dict(base)
        if value is MISSING:
            del envelope[name]
        else:
            envelope[name] = value
        return Bad(category, module, message(envelope), {"bad_envelope"}, {"bad_envelope"})
    if category == "bad_descriptor":  # shared-memory descriptors that point nowhere sound
        n = draw(st.integers(0, 4))
        envelope = sectors_envelope(module, n=n, scan=scan)
        good = {"name": "stemstream-0-p0-1", "offset": 0, "nbytes": n * RECORD_BYTES}
        variant = draw(st.sampled_from(["shape", "size", "unknown", "name", "payload"]))
        if variant == "shape":  # not a map, or without a usable name or offset
            envelope["shm"] = draw(st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=8), st.just({"offset": 0}),
                                             st.just({**good, "name": 7}), st.just({**good, "offset": -1})))
            return Bad(category, module, [wire.SECTORS, pack(envelope), b""], {"bad_descriptor", "bad_envelope"},
                       {"bad_descriptor", "bad_envelope"})
        if variant == "size":  # bytes that are not the envelope's records
            envelope["shm"] = {**good, "nbytes": draw(st.integers(0, 10**6).filter(lambda v: v != n * RECORD_BYTES))}
            reasons = {"wrong_record_count", "bad_envelope"}
            return Bad(category, module, [wire.SECTORS, pack(envelope), b""], reasons, reasons)
        if variant == "unknown":  # a well-formed name of no segment, or a range beyond one
            envelope["shm"] = {**good, "name": f"stemstream-fuzz-{draw(st.integers(0, 10**9))}"}
        elif variant == "name":  # a path, not a segment name
            envelope["shm"] = {**good, "name": draw(st.sampled_from(["../../etc/passwd", "/dev/zero", "", "x" * 150]))}
        else:  # a payload as well as a descriptor
            envelope["shm"] = good
            return Bad(category, module, [wire.SECTORS, pack(envelope), bytes(RECORD_BYTES)], {"wrong_payload_size"}, None)
        return Bad(category, module, [wire.SECTORS, pack(envelope), b""], {"bad_descriptor"}, None)
    if category == "wrong_module":
        other = draw(st.integers(0, N_MODULES - 1).filter(lambda m: m != module))
        envelope = {**base, "module": other}
        return Bad(category, module, message(envelope), {"wrong_module"}, {"wrong_module"})
    if category == "wrong_node":
        envelope = {**base, "node": draw(st.integers(nodes, 65535))}
        return Bad(category, module, message(envelope), {"wrong_node"}, {"unknown_node"})
    if category == "unknown_scan":
        envelope = {**base, "scan": draw(st.integers(1000, 2**32 - 1))}
        return Bad(category, module, message(envelope), {"unknown_scan"}, {"unknown_scan"})
    # payloads that do not hold what the envelope says (the gateway forwards them unread)
    if category == "truncated":
        whole = draw(st.integers(0, 2))
        size = whole * RECORD_BYTES + draw(st.integers(1, RECORD_BYTES - 1))
        n = draw(st.sampled_from([whole, whole + 1]))
    elif category == "oversized":
        size = draw(st.integers(3 * RECORD_BYTES, 6_000_000).filter(lambda s: s % RECORD_BYTES))
        n = draw(st.integers(0, wire.MAX_RECORDS_PER_MESSAGE))
    else:  # record_count: whole records, but not as many as the envelope says
        whole = draw(st.integers(0, 2))
        size = whole * RECORD_BYTES
        n = draw(st.integers(0, wire.MAX_RECORDS_PER_MESSAGE).filter(lambda v: v != whole))
    envelope = sectors_envelope(module, n=n, scan=scan)
    envelope["block"] = draw(st.integers(0, 2**32 - 1))
    reason = "wrong_record_count" if category == "record_count" else "wrong_payload_size"
    return Bad(category, module, [wire.SECTORS, pack(envelope), bytes(size)], {reason}, None)


@dataclass
class BadRecords:
    """A well-formed SECTORS message of the open scan whose records are copies of good ones with
    one header field wrong (or none: a duplicate). late: aimed at a block already counted."""

    module: int
    late: bool
    pick: int
    mutations: list = field(default_factory=list)  # (kind, index in block, value)


@st.composite
def bad_records(draw) -> BadRecords:
    rows, cols = SHAPE

    def mutation():
        return st.one_of(
            st.tuples(st.just("duplicate"), st.integers(0, BLOCK_FRAMES - 1), st.none()),
            st.tuples(st.just("duplicate_altered"), st.integers(0, BLOCK_FRAMES - 1),
                      st.tuples(st.integers(0, cols - 1), st.integers(0, rows - 1))),
            st.tuples(st.just("other_scan_number"), st.integers(0, BLOCK_FRAMES - 1),
                      st.integers(0, 2**32 - 1).filter(lambda v: v != SCAN)),
            st.tuples(st.just("scan_shape_mismatch"), st.integers(0, BLOCK_FRAMES - 1),
                      st.tuples(st.integers(0, 65535), st.integers(0, 65535)).filter(lambda s: s != (cols, rows))),
            st.tuples(st.just("position_out_of_bounds"), st.integers(0, BLOCK_FRAMES - 1),
                      st.one_of(st.tuples(st.integers(cols, 65535), st.integers(0, rows - 1)),
                                st.tuples(st.integers(0, cols - 1), st.integers(rows, 65535)))),
            st.tuples(st.just("wrong_block"), st.integers(0, BLOCK_FRAMES - 1), st.integers(0, 2**32 - 1 - BLOCK_FRAMES)),
        )

    late = draw(st.integers(0, 3)) == 0  # one in 4 aimed at a block already counted
    return BadRecords(draw(st.integers(0, N_MODULES - 1)), late, draw(st.integers(0, 10**6)),
                      draw(st.lists(mutation(), min_size=1, max_size=3)))


# -- the in-process harness ------------------------------------------------------------------------


class Harness:
    """A node group (index 0 of 1) and a gateway in this process, a scan open at an in-process
    control, the scan's good sector records, and the bookkeeping of what was thrown at them."""

    def __init__(self, tmp_path):
        config = test_config(tmp_path, nodes=1)
        config.pipeline.block_frames = BLOCK_FRAMES
        config.flow.scan_timeout_s = 3600.0
        self.control = Control(config)
        assert self.control.handle({"op": "start_scan", "scan_number": SCAN, "scan_shape": list(SHAPE), "nodes": [0]})["ok"]
        self.out: list[list] = []  # what the node group sends the writer
        self.node = NodeGroup(config, 0, send=self.out.append)  # not started: no socket of its own
        self.node.control = InProcessControl(self.control)
        self.gateway = Gateway(config)
        self.gateway.control = InProcessControl(self.control)
        n = SHAPE[0] * SHAPE[1]
        sim = DetectorSimulator(SimulationConfig(scan_shape=SHAPE, seed=11, scan_number=SCAN, first_frame_number=0))
        self.frames = sim.batch(0, n).frames
        self.records = [sim.records(0, n, m) for m in range(N_MODULES)]
        self.n_blocks = n // BLOCK_FRAMES
        self.fed = 0
        self.via_gateway = 0
        self.messages_thrown = 0  # malformed messages
        self.record_messages_thrown = 0  # well-formed messages of bad records
        self.expected_reasons = [Counter() for _ in range(N_MODULES)]  # per-record rejections
        self.expected_duplicates = [0] * N_MODULES
        self.slowest_s = 0.0

    def close(self) -> None:
        for sock in [*self.gateway.inputs.values(),
                     *(s for row in self.gateway.outputs.values() for s in row.values()), self.control.socket]:
            sock.close(0)

    @property
    def scan(self):
        return self.node.scans[(SCAN, 0)]

    def deliver(self, parts: list, module: int, via_gateway: bool) -> None:
        """What the roles' loops do with a message from module ``module``'s input."""
        t0 = time.monotonic()
        if via_gateway:
            try:
                node, scan, stream = self.gateway.route(parts, module)
            except wire.MessageError as exc:
                self.gateway.reject(exc.reason, str(exc))
            else:
                assert (node, scan, stream) == (0, SCAN, 0)
                self.node.handle(parts, module)
        else:
            self.node.handle(parts, module)
        self.slowest_s = max(self.slowest_s, time.monotonic() - t0)

    def rejections(self) -> tuple[Counter, Counter]:
        return Counter(self.node.rejected), Counter(self.gateway.rejected)

    def feed_next_block(self) -> None:
        """The good SECTORS messages of the next block, modules in a block-dependent order,
        alternately straight to the node group and through the gateway."""
        block = self.fed
        before = self.rejections()
        for module in np.random.default_rng(block).permutation(N_MODULES).tolist():
            records = self.records[module][block * BLOCK_FRAMES:(block + 1) * BLOCK_FRAMES]
            envelope = sectors_envelope(module, block=block, n=len(records))
            self.deliver([wire.SECTORS, pack(envelope), records.tobytes()], module, via_gateway=(block + module) % 2 == 1)
        assert self.rejections() == before, "a good message was rejected"
        self.fed += 1

    def advance(self) -> None:
        """The node group's loop comes round: count what is ready, then the next block arrives."""
        if (SCAN, 0) in self.node.scans:
            self.scan.step()
        if self.fed < self.n_blocks:
            self.feed_next_block()

    def throw(self, bad: Bad, via_gateway: bool) -> None:
        node_before, gateway_before = self.rejections()
        self.deliver(bad.parts, bad.module, via_gateway)
        node_after, gateway_after = self.rejections()
        node_delta, gateway_delta = node_after - node_before, gateway_after - gateway_before
        self.messages_thrown += 1
        self.via_gateway += via_gateway
        if via_gateway and bad.gateway_reasons is not None:
            assert not node_delta and sum(gateway_delta.values()) == 1, (bad.category, node_delta, gateway_delta)
            assert set(gateway_delta) <= bad.gateway_reasons, (bad.category, gateway_delta)
        else:
            assert not gateway_delta and sum(node_delta.values()) == 1, (bad.category, node_delta, gateway_delta)
            assert set(node_delta) <= bad.node_reasons, (bad.category, node_delta)

    def throw_records(self, bad: BadRecords, via_gateway: bool) -> None:
        scan = self.scan
        done = sorted(scan.done_blocks)
        block = done[bad.pick % len(done)] if bad.late and done else self.fed - 1
        late = block in scan.done_blocks
        first = block * BLOCK_FRAMES
        good = self.records[bad.module][first:first + BLOCK_FRAMES]
        records = np.empty(len(bad.mutations), RECORD_DTYPE)
        rows, cols = SHAPE
        reasons = []
        for j, (kind, index, value) in enumerate(bad.mutations):
            records[j] = good[index]
            h = records["header"]
            if kind == "duplicate_altered":
                h["x"][j], h["y"][j] = value
                records["data"][j] = 0
            elif kind == "other_scan_number":
                h["scan_number"][j] = value
            elif kind == "scan_shape_mismatch":
                h["scan_width"][j], h["scan_height"][j] = value
            elif kind == "position_out_of_bounds":
                h["x"][j], h["y"][j] = value
            elif kind == "wrong_block":
                h["frame_number"][j] = value if value < first else value + BLOCK_FRAMES
            reasons.append("duplicate" if kind.startswith("duplicate") else kind)
        if late:
            self.expected_reasons[bad.module]["late_sector"] += len(records)
        else:
            for reason in reasons:
                if reason == "duplicate":
                    self.expected_duplicates[bad.module] += 1
                else:
                    self.expected_reasons[bad.module][reason] += 1
        node_before, gateway_before = self.rejections()
        envelope = sectors_envelope(bad.module, block=block, n=len(records))
        self.deliver([wire.SECTORS, pack(envelope), records.tobytes()], bad.module, via_gateway)
        node_delta = self.rejections()[0] - node_before
        assert self.rejections()[1] == gateway_before
        # rejected when the block is counted (per record, in the ledger), or now if it was counted
        assert node_delta == (Counter(late_sector=1) if late else Counter())
        self.record_messages_thrown += 1
        self.via_gateway += via_gateway

    def finish(self) -> tuple[wire.DoneMessage, dict[int, tuple], dict]:
        """Feed the rest of the scan and the end markers; the node group's DONE, its events, and
        the sector counts the writer would make of them (every block's, plus the DONE's)."""
        while self.fed < self.n_blocks:
            self.advance()
        for module in range(N_MODULES):
            end = wire.encode_end(SCAN, module, 0, sent=self.n_blocks * BLOCK_FRAMES)
            self.deliver(end, module, via_gateway=module % 2 == 0)
        scan = self.scan
        for _ in range(100):
            scan.step()
            if scan.finished:
                break
        assert scan.finished
        events, dones = {}, []
        sectors = ScanLedger(SCAN, SHAPE)
        for parts in self.out:
            kind = wire.kind_of(parts)
            if kind == wire.EVENTS:
                msg = wire.decode_events(parts, FRAME_SHAPE[0] * FRAME_SHAPE[1])
                assert msg.ledger is not None, f"block {msg.block} sent without its sector counts"
                sectors.add_sector_tally(msg.ledger)
                for i, number in enumerate(msg.frame_numbers.tolist()):
                    assert number not in events, f"frame {number} sent twice"
                    events[number] = (int(msg.positions[i]), int(msg.present[i]),
                                      msg.events[msg.offsets[i]:msg.offsets[i + 1]].copy())
            elif kind == wire.DONE:
                dones.append(wire.decode_done(parts))
        assert len(dones) == 1
        sectors.add_sector_tally(dones[0].ledger)
        return dones[0], events, sectors.as_dict()


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path)
    yield h
    h.close()


MALFORMED_MESSAGES = 10_000
RECORD_MESSAGES = 600
# Messages drawn per hypothesis example: its engine's own work per example (not the drawing) was
# half the test's time with one message an example.
THROWN_PER_EXAMPLE = 20


def test_ten_thousand_malformed_messages_each_rejected_once_and_the_good_frames_counted_as_offline(harness):
    total = MALFORMED_MESSAGES + RECORD_MESSAGES
    every = total // (harness.n_blocks + 1)
    calls = [0]
    # about one message in 18 is well-formed with bad records (they are ~0.7 MB each)
    case = st.integers(0, 17).flatmap(lambda k: bad_records() if k == 17 else malformed())

    @settings(max_examples=-(-total // THROWN_PER_EXAMPLE), deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(case, st.booleans(), st.integers(0, 255)),
                    min_size=THROWN_PER_EXAMPLE, max_size=THROWN_PER_EXAMPLE))
    def throw(thrown):
        for bad, via_gateway, step in thrown:
            calls[0] += 1
            if calls[0] % every == 0:
                harness.advance()
            if isinstance(bad, BadRecords):
                harness.throw_records(bad, via_gateway)
            else:
                harness.throw(bad, via_gateway)
            if step == 17:  # now and then the node group counts what is ready in the middle of it
                harness.scan.step()

    harness.feed_next_block()
    throw()
    done, events, ledger = harness.finish()

    # every malformed message rejected once, at the gateway or at the node group
    node_rejected, gateway_rejected = harness.rejections()
    message_level = sum(v for k, v in node_rejected.items() if k not in RECORD_REASONS) + sum(gateway_rejected.values())
    assert message_level == harness.messages_thrown >= MALFORMED_MESSAGES - RECORD_MESSAGES
    assert harness.messages_thrown + harness.record_messages_thrown >= MALFORMED_MESSAGES
    assert 0.3 < harness.via_gateway / (harness.messages_thrown + harness.record_messages_thrown) < 0.7
    # every bad record counted in the ledger, per module and reason; duplicates apart
    assert ledger["sectors_rejected"] == [sum(c.values()) for c in harness.expected_reasons]
    assert ledger["rejected_reasons"] == dict(sum(harness.expected_reasons, Counter()))
    assert ledger["sectors_duplicate"] == harness.expected_duplicates
    assert sum(ledger["sectors_rejected"]) > 100 and sum(harness.expected_duplicates) > 50
    n = SHAPE[0] * SHAPE[1]
    assert ledger["sectors_received"] == [n] * N_MODULES
    assert ledger["sectors_missing"] == [0] * N_MODULES
    assert done.lost == [0] * N_MODULES and not done.ledger["failed"]
    # the good frames: all of them, complete, where they belong, events as offline counting
    assert sorted(events) == list(range(n))
    counted = ElectronCounter(BACKGROUND, XRAY, FRAME_SHAPE).count(harness.frames)
    for number, (position, present, frame_events) in events.items():
        assert position == number and present == 0b1111
        assert np.array_equal(frame_events, counted.frame(number)), f"frame {number}"
    assert counted.offsets[-1] > 0
    assert harness.slowest_s < 1.0, f"one message took {harness.slowest_s:.2f} s"
    print(f"\n{harness.messages_thrown} malformed messages and {harness.record_messages_thrown} of bad records "
          f"({harness.via_gateway} via the gateway); rejected by the gateway {dict(gateway_rejected)}, by the node "
          f"group {dict(node_rejected)}; ledger {ledger['rejected_reasons']}, duplicates {ledger['sectors_duplicate']}")


def test_control_refuses_scan_shapes_outside_the_header_range(tmp_path):
    control = Control(test_config(tmp_path))
    try:
        for shape in ([70000, 8], [8, 0], [-1, 4]):
            reply = control.handle({"op": "start_scan", "scan_number": 1, "scan_shape": shape})
            assert not reply["ok"] and "scan shape" in reply["error"]
        for request in ({"op": "start_scan"}, {"op": "start_scan", "scan_number": "x", "scan_shape": [1, 1]},
                        {"op": "nonsense"}, {"op": 5}, {"op": "get_scan", "scan": None}):
            assert not control.handle(request)["ok"]
    finally:
        control.socket.close(0)


def test_node_group_checks_an_end_markers_module_and_node_group(harness):
    """The gateway checks them too; without a gateway the node group is the only check."""
    harness.feed_next_block()
    before = harness.rejections()[0]
    harness.node.handle(wire.encode_end(SCAN, 2, 0, sent=0), 1)  # module 2's END on module 1's input
    harness.node.handle(wire.encode_end(SCAN, 3, 5, sent=0), 3)  # node group 5's END at node group 0
    assert sum((harness.rejections()[0] - before).values()) == 2
    assert not harness.scan.ends


# -- real sockets ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_malformed_messages_on_real_sockets_during_a_scan_change_nothing(tmp_path):
    shape = (16, 16)
    raw = tmp_path / "raw"  # what the producers simulate for scan 1 with seed 8 (seed + scan number)
    simulate_to_directory(raw, SimulationConfig(scan_shape=shape, seed=9))
    reference = count_raw_scan([raw], tmp_path / "reference.h5", CountOptions(background=BACKGROUND, xray=XRAY))
    config = test_config(tmp_path, nodes=2)
    to_node, to_gateway = [], []

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(malformed(nodes=2, in_process=False, scan=1), st.booleans())
    def collect(bad, via_gateway):
        (to_gateway if via_gateway else to_node).append(bad)

    collect()
    ctx = zmq.Context.instance()
    # 150 frames/s: the scan lasts about 1.7 s, the messages are pushed during it
    with LocalPipeline(config, tmp_path / "work", ProducerSource(seed=8, rate=150)) as pipeline:
        pipeline.start()
        node_in = [ctx.socket(zmq.PUSH) for _ in range(N_MODULES)]
        gateway_in = [ctx.socket(zmq.PUSH) for _ in range(N_MODULES)]
        for m in range(N_MODULES):
            node_in[m].connect(config.network.node(0, m))
            gateway_in[m].connect(config.network.gateway(m))
        time.sleep(0.3)  # connected before the scan starts
        assert pipeline.control.request("start_scan", scan_number=1, scan_shape=list(shape))["ok"]
        pending = [(node_in, b) for b in to_node] + [(gateway_in, b) for b in to_gateway]
        np.random.default_rng(0).shuffle(pending)
        time.sleep(0.2)
        for sockets, bad in pending:
            sockets[bad.module].send_multipart(bad.parts)
            time.sleep(0.002)
        assert pipeline.status()["scans"]["1"]["state"] == "running", "the scan ended before the last message"
        t0 = time.monotonic()
        while pipeline.status()["scans"]["1"]["state"] == "running":
            assert time.monotonic() - t0 < 120, "the scan never ended"
            time.sleep(0.1)
        summary = pipeline.status()["scans"]["1"]["summary"]
        t0 = time.monotonic()
        while True:  # rejections reach control with the heartbeats
            roles = pipeline.status()["roles"]
            rejected = Counter()
            for key in ("node-0", "node-1", "gateway-0"):
                rejected.update(roles[key]["stats"]["rejected"])
            if sum(rejected.values()) >= len(pending) or time.monotonic() - t0 > 10:
                break
            time.sleep(0.2)
        for sock in node_in + gateway_in:
            sock.close(0)
    assert sum(rejected.values()) == len(pending) == 300
    assert set(rejected) <= {r for b in to_node + to_gateway for r in b.node_reasons | (b.gateway_reasons or set())}
    assert summary["ledger"]["frames_complete"] == shape[0] * shape[1]
    assert summary["ledger"]["sectors_rejected"] == [0] * N_MODULES
    assert_same_events(summary["path"], reference.output)
