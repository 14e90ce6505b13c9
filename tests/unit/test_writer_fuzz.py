"""Whatever a node group's messages say, once the decoder lets them through, the writer's scan
takes them and closes its file: hypothesis sends decoder-valid EVENTS, ANALYSIS and DONE messages
of any content (frame numbers and positions inside or outside the scan, blocks resent or never
routed, streams of any generation, sector counts, sub-pixel positions, counting reports), with
failovers and a writer dying and restarting from its journal at any point between them. The
file closes and reads back, with the scan's shape and as many events as the writer reported.

Four such messages killed the writer (2026-12-05): a counting model's name or a rejection reason
with a '/' (the file's close failed on the attribute), a frame's pixels out of order (the write
failed at the commit), and, found by this test, a cluster-method block of frames without any
electron (the journal could not take its empty sub-pixel part); journaled, each killed the
restarted writer too. It also found the file's reported events counting frames beyond a
position's slots, which are not written. 150 examples here (~5 s); 2,000 passed once.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scan_specs import make_spec
from stemstream.analysis import UpsampledPattern, VirtualDetectors
from stemstream.core.config import FlowSettings
from stemstream.core.detector import N_MODULES
from stemstream.formats import wire
from stemstream.formats.ledger import SECTOR_COUNTS
from stemstream.formats.sparse_h5 import read_counted
from stemstream.pipeline.writer.scan import ScanHooks, WriterScan
from test_writer_counting import MODEL, on_the_wire
from test_writer_logic import partials

# an analysis of the sub-pixel positions too: the writer hands them on wherever frames go
ANALYSES = [VirtualDetectors(), UpsampledPattern()]

SHAPE, FPP = (2, 3), 2  # (rows, cols) positions, frames a position
N_PIXELS = 576 * 576
NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True)

frame_pixels = st.lists(st.integers(0, N_PIXELS - 1), max_size=4, unique=True).map(sorted)
tallies = st.none() | st.fixed_dictionaries(
    {name: st.lists(st.integers(0, 9), min_size=N_MODULES, max_size=N_MODULES) for name in SECTOR_COUNTS},
    optional={"rejected_reasons": st.dictionaries(NAMES, st.integers(0, 9), max_size=3),
              "frames_spilled": st.integers(0, 9)})
countings = st.none() | st.just({"method": "maxima", "model": None}) | st.builds(
    lambda mean: {"method": "clusters", "model": {**MODEL, "single_electron_mean": mean}}, st.floats(1, 500))


@st.composite
def events_messages(draw) -> list:
    n = draw(st.integers(0, 4))
    lists = [draw(frame_pixels) for _ in range(n)]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in lists])]).astype(np.int64)
    events = np.array([p for e in lists for p in e], np.uint32)
    subpixel = None
    if draw(st.booleans()):  # each event within half a pixel of its centre, or anywhere in the frame
        jitter = draw(st.floats(-0.5, 0.5))
        subpixel = np.stack([events // 576, events % 576], axis=1).astype(np.float32) + np.float32(jitter)
    return wire.encode_events(
        1, draw(st.integers(0, 2)), np.array(draw(st.lists(st.integers(0, 20), min_size=n, max_size=n)), np.uint32),
        np.array(draw(st.lists(st.integers(-2, 8), min_size=n, max_size=n)), np.int64),
        np.array(draw(st.lists(st.integers(0, 15), min_size=n, max_size=n)), np.uint8), offsets, events,
        block=draw(st.sampled_from([wire.NO_BLOCK, 0, 1, 2, 3, 2**32 - 1])), stream=draw(st.integers(0, 2)),
        ledger=draw(tallies), subpixel=subpixel, counting=draw(countings))


done_messages = st.builds(
    lambda node, stream, tally, lost, counting: wire.encode_done(1, node, {**(tally or {}), "failed": False}, lost,
                                                                 stream=stream, counting=counting),
    st.integers(0, 2), st.integers(0, 2), tallies, st.lists(st.integers(0, 9), min_size=4, max_size=4), countings)
steps = st.lists(st.one_of(events_messages(), done_messages,
                           st.tuples(st.just("analysis"), st.integers(0, 2), st.integers(0, 2)),
                           st.just("failover"), st.just("restart")), max_size=14)


def open_scan(directory: Path, spec, subpixel: bool) -> WriterScan:
    hooks = ScanHooks(latest_spec=lambda: spec, heartbeat=lambda: None, node_heard=lambda node: True,
                      reject=lambda reason, detail: None, check_space=lambda: None)
    return WriterScan(spec, directory, ANALYSES, FlowSettings(), hooks, subpixel_positions=subpixel)


def apply(scan, spec, step) -> None:
    """One step to the scan, as the writer's handle would (a message the decoder refuses is dropped)."""
    if step == "failover":
        newer = copy.deepcopy(scan.spec)
        newer.new_generation([1], "node group 1 silent", at=0.0, committed_blocks=0)
        scan.follow(newer)
    elif isinstance(step, tuple):
        scan.receive_partials(step[1], step[2], partials(spec, ANALYSES))
    else:
        try:
            kind = wire.kind_of(step)
            msg = (wire.decode_events(on_the_wire(step), N_PIXELS) if kind == wire.EVENTS
                   else wire.decode_done(on_the_wire(step)))
        except wire.MessageError:
            return
        (scan.receive_events if kind == wire.EVENTS else scan.receive_done)(msg)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps, subpixel=st.booleans())
def test_any_decoded_messages_leave_a_file_that_closes_and_reads_back(steps, subpixel):
    spec = make_spec(shape=SHAPE, frames_per_position=FPP, nodes=[0, 1, 2], block_frames=4)
    with tempfile.TemporaryDirectory() as directory:
        scan = open_scan(Path(directory), spec, subpixel=subpixel)
        for step in steps:
            if step == "restart":  # the writer dies (its HDF5 file lost, the journal kept); another takes over
                scan.commit_report()
                scan.out.abort()
                scan.journal.close(delete=False)
                scan = open_scan(Path(directory), spec, subpixel=subpixel)
            else:
                apply(scan, spec, step)
        summary = scan.close()
        counted = read_counted(summary["path"])
        assert counted.scan_shape == SHAPE and counted.frames_per_position == FPP
        assert summary["events"] == sum(len(e) for e in counted.frames.reshape(-1))  # the file's own events
