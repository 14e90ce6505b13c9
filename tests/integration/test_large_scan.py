"""A scan past 65,536 positions streamed through every role, checked event for event against
counting the same frames offline.

The raw files of a 300 x 256 scan would take 51 GB, more than a test machine's disk, so the
reference is not ``stemstream count`` of raw files. The simulator's frames are a function of
(seed, frame index): the test renders the scan's frames again, a chunk at a time, and counts them
with the counting kernel alone, with the thresholds the streamed file says it used. Nothing of the
pipeline's reassembly, routing or writer takes part in that reference. For the frames on either
side of position 65,536, stempy alone checks the file too: its multi-pass reader reads the
producers' records of those frames from raw files, its counter counts them, its loader reads the
streamed file.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pipeline_support import test_config
from scan_specs import make_spec
from stemstream.core.detector import FRAME_COLS, FRAME_ROWS, FRAME_SHAPE, N_MODULES
from stemstream.counting.kernel import ElectronCounter
from stemstream.deploy.kernels import compile_kernels
from stemstream.deploy.session import LocalSession, PlannedScan
from stemstream.deploy.sources import ProducerSource
from stemstream.formats.raw import RawModuleWriter
from stemstream.formats.sparse_h5 import read_counted
from stemstream.sources.simulator import DetectorSimulator

pytestmark = pytest.mark.slow

SCAN = PlannedScan(1, (300, 256))  # (rows, cols): 76,800 positions, more than a uint16 numbers
# A low dose keeps the file and the test short; what is tested is where frames go, not the dose.
SOURCE = ProducerSource(dose=0.0005, seed=11)
CHUNK = 128  # frames rendered and counted at once: two buffers of 42 MB, whatever the scan size
STEMPY_FRAMES = range(65_536 - 48, 65_536 + 48)  # frame index = position: one frame per position


def producers_simulator() -> DetectorSimulator:
    """The simulator of SCAN as the producers make it: their own source factory gives its config
    (seed, dose, first frame number), so the reference cannot drift from what they stream."""
    spec = make_spec(number=SCAN.number, shape=SCAN.shape, frames_per_position=SCAN.frames_per_position)
    return DetectorSimulator(SOURCE.factory(0)(spec).config)


def reference_events(background: float, xray: float):
    """Yield (first frame index, CountedFrames) over the scan: its frames rendered again and
    counted by the kernel alone. The next chunk renders in a thread (the simulator releases the
    GIL) while this one is counted, into the other of two buffers."""
    simulator = producers_simulator()
    counter = ElectronCounter(background, xray, FRAME_SHAPE)
    buffers = np.empty((2, CHUNK, FRAME_ROWS, FRAME_COLS), np.uint16)
    starts = range(0, simulator.n_frames, CHUNK)

    def render(k: int) -> np.ndarray:
        n = min(CHUNK, simulator.n_frames - starts[k])
        return simulator.batch(starts[k], n, out=buffers[k % 2, :n]).frames

    with ThreadPoolExecutor(1) as renderer:
        rendered = renderer.submit(render, 0)
        for k, start in enumerate(starts):
            frames = rendered.result()
            if k + 1 < len(starts):
                rendered = renderer.submit(render, k + 1)
            yield start, counter.count(frames)


def stempy_events(raw_dir, background: float, xray: float) -> dict[int, np.ndarray]:
    """The events of the STEMPY_FRAMES as stempy finds them in the producers' records of them:
    written to raw files, read by stempy's multi-pass reader, counted by stempy."""
    stempy_io = pytest.importorskip("stempy.io")
    stempy_image = pytest.importorskip("stempy.image")
    simulator = producers_simulator()
    first, n = STEMPY_FRAMES.start, len(STEMPY_FRAMES)
    raw_dir.mkdir()
    paths = []
    for module in range(N_MODULES):
        with RawModuleWriter(raw_dir, SCAN.number, module) as writer:
            writer.write(simulator.records(first, n, module))
        paths += [str(p) for p in writer.paths]
    reader = stempy_io.reader(paths, version=stempy_io.FileVersion.VERSION5, backend="multi-pass")
    assert tuple(reader.scan_shape) == SCAN.shape
    events = {}
    for position in STEMPY_FRAMES:
        (block,) = reader.read_frames(position)
        counted = stempy_image.electron_count_frame(block.data, background_threshold=background, xray_threshold=xray)
        events[position] = np.sort(np.asarray(counted.data[0, 0], np.uint32))
    return events


def test_scan_past_65536_positions_streams_to_the_events_of_offline_counting(tmp_path):
    config = test_config(tmp_path)  # fixed thresholds: calibration is not what this test is about
    config.flow.scan_timeout_s = 300.0
    compile_kernels(config, SOURCE)  # once here, not in every role at once (a fresh checkout)
    t0 = time.monotonic()
    with LocalSession(config, SOURCE) as session:
        session.start()
        summary = session.run_scan(SCAN)
    seconds_streaming = time.monotonic() - t0
    assert summary["state"] == "closed"
    ledger = summary["ledger"]
    assert ledger["frames_complete"] == ledger["frames_expected"] == SCAN.frames
    assert ledger["frames_missing"] == ledger["frames_incomplete"] == 0

    counted = read_counted(summary["path"])
    assert counted.scan_shape == SCAN.shape and counted.frames.shape == (SCAN.frames, 1)
    assert counted.written.all()
    thresholds = counted.metadata["electron_counting"]
    background, xray = float(thresholds["background_threshold"]), float(thresholds["x_ray_threshold"])
    assert (background, xray) == (config.counting.background_threshold, config.counting.xray_threshold)
    streamed = counted.frames.reshape(-1)  # slot = frame index: one frame per position, the first is 0
    n_events = 0
    for start, expected in reference_events(background, xray):
        differ = [start + i for i in range(len(expected)) if not np.array_equal(streamed[start + i], expected.frame(i))]
        assert not differ, f"{len(differ)} frames differ from counting them offline, first {differ[:5]}"
        n_events += len(expected.events)
    assert n_events == counted.total_events() > 0

    stempy_io = pytest.importorskip("stempy.io")
    by_stempy = stempy_events(tmp_path / "raw", background, xray)
    loaded = stempy_io.load_electron_counts(summary["path"])
    assert tuple(loaded.scan_shape) == SCAN.shape
    for position, events in by_stempy.items():
        assert np.array_equal(np.sort(loaded.data[position, 0]), events), position
    print(f"streamed in {seconds_streaming:.1f} s, {n_events} events checked in {time.monotonic() - t0:.1f} s")
