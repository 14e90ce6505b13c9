"""``stemstream recover``: a writer killed (SIGKILL) after committing blocks, with no pipeline left
to restart it, leaves its ``.partial`` and ``.journal``; the command makes the counted file of
what it committed, as a restarted writer would, and refuses bad input with one line, deleting
nothing."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from scan_specs import make_spec
from stemstream.analysis import ScanAnalyses, default_analyses
from stemstream.cli.app import app
from stemstream.core.config import FlowSettings
from stemstream.core.detector import FRAME_SHAPE, N_MODULES
from stemstream.counting.thresholds import fixed_thresholds
from stemstream.formats import wire
from stemstream.formats.sparse_h5 import read_counted
from stemstream.pipeline.writer.journal import Journal, journal_path
from stemstream.pipeline.writer.scan import ScanHooks, WriterScan

ALL = (1 << N_MODULES) - 1
N_PIXELS = FRAME_SHAPE[0] * FRAME_SHAPE[1]
ANALYSES = default_analyses(FRAME_SHAPE, {"enabled": ["virtual_detectors"]})  # one analysis: quick
CONFIG = '[analysis]\nenabled = ["virtual_detectors"]\n'
# Scan 1: 4x4, blocks of 4 frames; blocks 0, 1 and 3 committed, block 2 received but never
# committed. Scan 2: 2x4 at 2 frames per position, every block committed. In both, frame LACKING
# lacks module 1 (incomplete: in the file, named in the ledger).
SCAN_1 = {"number": 1, "shape": (4, 4), "block_frames": 4, "nodes": [0, 1]}
SCAN_2 = {"number": 2, "shape": (2, 4), "block_frames": 4, "frames_per_position": 2}
LACKING = 5
CALIBRATED = fixed_thresholds(31.5, 990.0)  # what control calibrated for scan 1 after it started


def frame_events(frame: int) -> np.ndarray:
    """Events that name their frame: a slot read back tells which frame landed there."""
    return np.array([frame, (1000 + frame) % N_PIXELS, (2000 + 7 * frame) % N_PIXELS], np.uint32)


def events(spec, frames: list[int], block: int, node: int = 0) -> wire.EventsMessage:
    """An EVENTS message of ``frames`` (frame LACKING without module 1), encoded and decoded as on the wire."""
    present = np.array([ALL & ~0b10 if f == LACKING else ALL for f in frames], np.uint8)
    offsets = np.arange(len(frames) + 1, dtype=np.int64) * 3
    parts = wire.encode_events(spec.number, node, np.array(frames, np.uint32),
                               np.array(frames, np.int64) // spec.frames_per_position, present, offsets,
                               np.concatenate([frame_events(f) for f in frames]), block=block,
                               counting={"method": "clusters", "model": {"single_electron_mean": 100.0 + node}})
    return wire.decode_events([bytes(memoryview(np.ascontiguousarray(p))) for p in parts], N_PIXELS)


def hooks(spec) -> ScanHooks:
    return ScanHooks(latest_spec=lambda: spec, heartbeat=lambda: None, node_heard=lambda node: True,
                     reject=lambda reason, detail: None, check_space=lambda: None)


def open_scan(directory: Path, spec, latest=None) -> WriterScan:
    """A writer's scan of ``spec``; control's newest spec of it ``latest`` (default: ``spec``)."""
    return WriterScan(spec, directory, ANALYSES, FlowSettings(), hooks(latest or spec))


def feed(scan: WriterScan, spec, committed: list[int], uncommitted: list[int]) -> None:
    """Blocks ``committed`` committed (their partials arrived), then ``uncommitted`` received only."""
    bf = spec.block_frames
    for block in committed:
        scan.receive_events(events(spec, list(range(block * bf, (block + 1) * bf)), block))
        assert scan.receive_partials(0, 0, ScanAnalyses(ANALYSES, spec.shape).take_partials())
    for block in uncommitted:
        scan.receive_events(events(spec, list(range(block * bf, (block + 1) * bf)), block, node=1))
    scan.commit_report()  # the journal on disk, as before control hears of the commits


def writer_dies(directory: str) -> None:
    """In a process of its own: the writer of scans 1 and 2 commits blocks, then is killed."""
    for fields, committed, uncommitted in ((SCAN_1, [0, 1, 3], [2]), (SCAN_2, [0, 1, 2, 3], [])):
        spec = make_spec(**fields)  # (thresholds to be calibrated: none yet)
        calibrated = replace(spec, thresholds=CALIBRATED) if spec.number == 1 else None
        feed(open_scan(Path(directory), spec, calibrated), spec, committed, uncommitted)
    os.kill(os.getpid(), signal.SIGKILL)


def recover(*args) -> object:
    return CliRunner().invoke(app, ["recover", *map(str, args)])


def slot_frames(path) -> list[list[int]]:
    """Which frame each slot holds (from frame_events), per position; -1 for an empty slot."""
    return [[int(f[0]) if len(f) else -1 for f in row] for row in read_counted(path).frames]


def test_recover_makes_the_files_of_a_killed_writers_journals(tmp_path):
    here = Path(__file__).parent
    code = f"import sys; sys.path[:0] = {[str(here), str(here.parent)]!r}; import test_recover as t; t.writer_dies(sys.argv[1])"
    died = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert died.returncode == -signal.SIGKILL, died.stderr
    one, two = make_spec(**SCAN_1), make_spec(**SCAN_2)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(f"{s.file_name}{suffix}" for s in (one, two) for suffix in (".journal", ".partial")), left
    with open(journal_path(tmp_path / one.file_name), "ab") as f:  # died while appending a record: torn
        f.write((1000).to_bytes(8, "little") + b"\x85torn")
    (tmp_path / "recover.toml").write_text(CONFIG)

    result = recover(tmp_path, "--config", tmp_path / "recover.toml")
    assert result.exit_code == 0, result.output
    incomplete, whole = tmp_path / "FOURD_test_00001.incomplete.h5", tmp_path / two.file_name
    assert result.stdout.splitlines() == [f"{incomplete}: 12 frames recovered (1 incomplete), 4 missing",
                                          f"{whole}: 16 frames recovered (1 incomplete), 0 missing"]
    assert sorted(p.name for p in tmp_path.glob("FOURD_*.h5*")) == [incomplete.name, whole.name]  # nothing else left

    # scan 1: the committed blocks' frames, each in its slot; block 2's frames missing, named so
    assert slot_frames(incomplete) == [[f] for f in range(8)] + [[-1]] * 4 + [[f] for f in range(12, 16)]
    counted = read_counted(incomplete)
    for f in (*range(8), *range(12, 16)):
        assert np.array_equal(counted.frames[f, 0], frame_events(f))
    ledger = counted.metadata["stemstream"]["ledger"]
    assert (ledger["frames_complete"], ledger["frames_incomplete"], ledger["frames_missing"]) == (11, 1, 4)
    assert counted.written.reshape(-1).tolist() == [f not in range(8, 12) for f in range(16)]
    assert list(ledger["incomplete_frames"]) == [LACKING]
    assert counted.metadata["stemstream"]["epoch"] == one.epoch
    # how its frames were counted, from the journal: node group 1's block was never committed
    assert counted.metadata["stemstream"]["counting_method"] == "clusters"
    assert counted.metadata["stemstream"]["cluster_model"] == {"single_electron_mean": 100.0, "node_group": 0}
    # the thresholds the scan's frames were counted with, calibrated after the writer opened it
    assert counted.metadata["electron_counting"]["background_threshold"] == CALIBRATED.background
    # scan 2: nothing missing, so the whole name; slot j of position p holds frame 2p + j
    assert slot_frames(whole) == [[2 * p, 2 * p + 1] for p in range(8)]
    ledger = read_counted(whole).metadata["stemstream"]["ledger"]
    assert ledger["frames_missing"] == 0 and list(ledger["incomplete_frames"]) == [LACKING]

    stempy_io = pytest.importorskip("stempy.io")
    array = stempy_io.load_electron_counts(str(incomplete))
    assert array.scan_shape == (4, 4)
    for a, b in zip(array.data.ravel(), counted.frames.ravel()):
        assert np.array_equal(np.sort(a), np.sort(b))


def refused(target, *fragments) -> None:
    """``stemstream recover target``: exit 2, one line on stderr with ``fragments``, nothing on stdout."""
    result = recover(target)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and not result.stdout.strip(), result.output
    for fragment in fragments:
        assert fragment in " ".join(result.stderr.split()), result.stderr  # (rich may wrap a long line)


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_recover_refuses_bad_input_with_one_line_and_deletes_nothing(tmp_path):
    spec = make_spec(**SCAN_1)
    refused(tmp_path / "nowhere", "does not exist")
    refused(tmp_path, "no writer's journal")
    (tmp_path / "notes.txt").write_text("x")
    refused(tmp_path / "notes.txt", "not a directory nor a writer's journal")

    cases = {name: tmp_path / name for name in ("older", "torn", "corrupt", "whole", "other_run", "live")}
    for directory in cases.values():
        directory.mkdir()
    journal = {name: journal_path(d / spec.file_name) for name, d in cases.items()}
    old = Journal(journal["older"], spec.number, spec.epoch)  # before the first record held the spec
    old.add(events(spec, [0, 1, 2, 3], 0))
    old.close(delete=False)
    journal["torn"].write_bytes((40).to_bytes(8, "little") + b"\x82")  # died as it wrote the first record
    for name in ("corrupt", "whole", "other_run"):
        good = Journal.for_scan(journal[name], spec, subpixel_positions=False)
        good.add(events(spec, [0, 1, 2, 3], 0))
        good.close(delete=False)
        if name == "corrupt":  # a record that is not msgpack, then a good one: not a torn tail
            with open(journal[name], "ab") as f:
                f.write((4).to_bytes(8, "little") + b"\xc1\xc1\xc1\xc1")
            more = Journal(journal[name], spec.number, spec.epoch)  # (appends: the first record is there)
            more.add(events(spec, [4, 5, 6, 7], 1))
            more.close(delete=False)
        (cases[name] / (spec.file_name + ".partial")).write_bytes(b"what the dead writer left")
    (cases["whole"] / spec.file_name).write_bytes(b"a finished scan")
    (cases["other_run"] / "FOURD_test_00001.incomplete.h5").write_bytes(b"an earlier run's file")
    live = open_scan(cases["live"], spec)  # a writer still writing: its partial file is locked
    feed(live, spec, [0], [])

    before = {name: contents(d) for name, d in cases.items()}
    refused(cases["older"], "older stemstream", "cannot be recovered")
    refused(journal["torn"], "holds no whole record")
    refused(cases["corrupt"], "is corrupt", "unreadable")
    refused(cases["whole"], "already exists", "never written over")
    refused(cases["other_run"], "already exists and is not replaced", "left as it is")
    refused(cases["live"], "still has scan 1's file open")
    assert {name: contents(d) for name, d in cases.items()} == before  # nothing deleted, nothing changed
    assert live.close()["ledger"]["frames_received"] == 4  # the live writer goes on unharmed
