"""Cluster counting (counting.clusters, docs/counting.md) on frames with planted electrons: how
many, where (pixel and sub-pixel), at frame edges and sector boundaries; stempy's reader gives
the right dense counts from its files; ``count --method clusters`` end to end.

Planted electrons: a charge uniform in 100..140 ADU spread by a Gaussian cloud of 0.3 px over
the 3 x 3 pixels around the landing point, on a 20 ADU pedestal with 1 ADU read noise, thresholds
background 26 ADU / X-ray 2000 ADU. The single-electron model is calibrated from a frame of 400
isolated planted electrons, as ``count`` calibrates it from a scan.
"""

from __future__ import annotations

import dataclasses
import itertools

import h5py
import numpy as np
import pytest
from scipy import ndimage
from scipy.special import ndtr

from stemstream.core.config import config_from_dict
from stemstream.core.detector import FRAME_COLS, FRAME_SHAPE, N_MODULES, SECTOR_ROWS
from stemstream.core.thresholds import fixed_thresholds
from stemstream.counting.cluster_counter import ClusterCounter, calibrate_cluster_model
from stemstream.counting.cluster_labels import label_clusters
from stemstream.counting.cluster_model import ClusterCalibrationError
from stemstream.counting.clusters import _extras
from stemstream.formats.raw import make_sector_records
from stemstream.formats.sparse_h5 import SparseCountsWriter

BACKGROUND, XRAY = 26.0, 2000.0
# A lone electron's sub-pixel position is its cluster's charge-weighted centroid: the 3 x 3 cut
# and the background threshold pull it towards the landing pixel's centre by up to ~0.15 px at a
# 0.3 px cloud (measured 0.13 at most over 2000 plants).
POSITION_TOLERANCE = 0.25


def blank(rng, shape=FRAME_SHAPE) -> np.ndarray:
    return rng.normal(20.0, 1.0, shape)


def plant(frame: np.ndarray, y: float, x: float, charge: float, sigma: float = 0.3) -> None:
    """Add one electron landing at (y, x) (pixel centres at integers) to a float frame."""
    rows, cols = frame.shape
    r0, c0 = int(round(y)), int(round(x))
    for r in range(max(r0 - 1, 0), min(r0 + 2, rows)):
        for c in range(max(c0 - 1, 0), min(c0 + 2, cols)):
            fy = ndtr((r + 0.5 - y) / sigma) - ndtr((r - 0.5 - y) / sigma)
            fx = ndtr((c + 0.5 - x) / sigma) - ndtr((c - 0.5 - x) / sigma)
            frame[r, c] += charge * fy * fx


def as_frame(frame: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(frame), 0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def counter() -> ClusterCounter:
    rng = np.random.default_rng(100)
    frame = blank(rng)
    for r in range(8, 568, 28):
        for c in range(8, 568, 28):
            plant(frame, r + rng.uniform(-0.5, 0.5), c + rng.uniform(-0.5, 0.5), rng.uniform(100, 140))
    thresholds = fixed_thresholds(BACKGROUND, XRAY)
    model = calibrate_cluster_model(as_frame(frame)[None], thresholds)
    assert model.n_clusters == 400
    assert 100 < model.mean < 140 and model.shape > 20  # a narrow charge distribution
    return ClusterCounter(BACKGROUND, XRAY, model)


def count(counter, frame):
    counted = counter.count(as_frame(frame))
    return counted.frame(0).astype(np.int64), counted.frame_positions(0)


def test_isolated_electrons_are_counted_once_at_their_position(counter):
    rng = np.random.default_rng(1)
    frame = blank(rng)
    # Landing points up to 0.4 px from the pixel centre: which pixel an electron at 0.5 belongs
    # to is a coin toss for the centroid as for the truth.
    planted = [(r + rng.uniform(-0.4, 0.4), c + rng.uniform(-0.4, 0.4)) for r in range(10, 570, 20) for c in range(10, 570, 20)]
    for y, x in planted:
        plant(frame, y, x, rng.uniform(100, 140))
    events, positions = count(counter, frame)
    assert len(events) == len(planted)
    truth = np.array(planted)
    order = np.lexsort((np.rint(truth[:, 1]), np.rint(truth[:, 0])))  # events come sorted by pixel
    truth = truth[order]
    assert np.array_equal(events, (np.rint(truth[:, 0]) * FRAME_COLS + np.rint(truth[:, 1])).astype(np.int64))
    assert np.abs(positions - truth).max() < POSITION_TOLERANCE


@pytest.mark.parametrize("offsets", [
    [(0, 0), (0, 2)],  # a touching pair along a row: one cluster, two peaks
    [(0, 0), (2, 2)],  # a touching pair on a diagonal
    [(0, 0), (0, 2), (2, 0)],  # a triple in an L
    [(0, 0), (0, 2), (0, 4)],  # a triple in a row
    [(0, 0), (0, 0)],  # two on one pixel: one peak, twice the charge
    [(0, 0), (0, 0), (0, 2)],  # two on one pixel and one beside them
])
def test_touching_electrons_are_all_counted(counter, offsets):
    """Clusters of several electrons, 40 of each kind per frame (the frame's own total charge
    then says that hidden electrons are common, as in a bright-field disc)."""
    rng = np.random.default_rng(2)
    frame = blank(rng)
    planted = []
    for r in range(20, 560, 60):
        for c in range(20, 560, 120):
            for dy, dx in offsets:
                planted.append((r + dy + rng.uniform(-0.2, 0.2), c + dx + rng.uniform(-0.2, 0.2)))
                plant(frame, *planted[-1], rng.uniform(100, 140))
    events, positions = count(counter, frame)
    if len(set(offsets)) == len(offsets):  # a peak each: all counted
        assert len(events) == len(planted)
    else:  # electrons sharing a peak are counted from the charge: within 3 % over the frame
        assert abs(len(events) - len(planted)) <= 0.03 * len(planted)
    assert len(np.unique(events)) == len(events)  # stempy's frames are sets
    # Every planted electron has an event within 1 px (one to one), every event an electron.
    ev = np.stack([events // FRAME_COLS, events % FRAME_COLS], axis=1)
    free = np.ones(len(planted), bool)
    truth = np.rint(np.array(planted))
    for e in ev:
        near = np.flatnonzero(free & (np.abs(truth - e).max(axis=1) <= 1))
        assert near.size, f"an event at {tuple(e)} with no free planted electron within 1 px"
        free[near[0]] = False
    # Sub-pixel positions: each within 1 px of a planted electron (several in a cluster are
    # placed at its peaks, whose windows also hold some of the neighbours' charge).
    distance = np.abs(positions[:, None, :] - np.array(planted)[None]).max(axis=2).min(axis=1)
    assert distance.max() < 1.0


def test_electrons_too_close_for_a_peak_each_are_placed_where_their_charge_is(counter):
    """Two electrons on diagonal neighbours make one peak (the brighter); the second electron,
    counted from the charge, goes to the pixel whose charge the first does not explain: the
    other one, not next to the peak at random (measured: 78 of 90 electrons at their pixel, 45
    when the second went to the peak's nearest free pixel)."""
    rng = np.random.default_rng(8)
    frame = blank(rng)
    planted = []
    for r in range(20, 560, 60):
        for c in range(20, 560, 120):
            for dy, dx in [(0, 0), (1, 1)]:
                planted.append((r + dy + rng.uniform(-0.2, 0.2), c + dx + rng.uniform(-0.2, 0.2)))
                plant(frame, *planted[-1], rng.uniform(100, 140))
    events, _ = count(counter, frame)
    truth = {int(round(y)) * FRAME_COLS + int(round(x)) for y, x in planted}
    assert abs(len(events) - len(planted)) <= 0.05 * len(planted)
    assert len(truth & set(events.tolist())) >= 0.8 * len(planted)


def test_an_electron_beyond_the_peaks_goes_to_a_free_pixel_before_a_bright_peak():
    """A peak's own electron explains twice the single-electron mean of its pixel's charge
    (clusters._EXPLAINED): a bright deposit (230 ADU above the pedestal, 1.9 means) leaves less
    unexplained than a neighbour of 80 ADU, where the hidden electron is; with one mean
    explained (before 2026-12-04) it went to the peak's pixel, then to its nearest free pixel
    (the one above)."""
    rows, cols, pedestal, mean = 5, 5, 20.0, 120.0
    flat = np.full(rows * cols, 20, np.uint16)
    peak, faint = 2 * cols + 2, 2 * cols + 3
    flat[peak], flat[faint] = 250, 100
    used = np.zeros(rows * cols, np.uint8)
    used[peak] = 1
    members = np.array([peak, faint], np.int64)
    out, positions = np.zeros(4, np.uint32), np.zeros((4, 2), np.float32)
    n = _extras(flat, rows, cols, pedestal, mean, used, members, 0, len(members), 1, out, positions, 0, np.zeros(2),
                np.zeros(2), np.zeros(2, np.int64))
    assert n == 1 and out[0] == faint


def test_a_one_peak_clusters_spread_tells_one_electron_from_two():
    """Two electrons on neighbouring pixels mostly make one peak; with a broad single-electron
    charge (60-180 ADU), two faint ones (60-90 ADU each) have the charge of one bright one
    (130-180 ADU), but not its spread. The spread's evidence is calibrated from the isolated
    singles alone (and pairs composed of them). In a frame of 100 such singles and 100 such
    pairs the frame's total charge says ~48 electrons are missing: with the spread they go to
    the pairs (measured: 142 of the 200 pair electrons at their pixels, 97 singles counted once),
    by charge alone mostly to the singles (110 and 65)."""
    rng = np.random.default_rng(9)
    frame = blank(rng)
    for r in range(8, 568, 28):
        for c in range(8, 568, 28):
            plant(frame, r + rng.uniform(-0.5, 0.5), c + rng.uniform(-0.5, 0.5), rng.uniform(60, 180))
    model = calibrate_cluster_model(as_frame(frame)[None], fixed_thresholds(BACKGROUND, XRAY))
    llr = np.array(model.spread_llr).reshape(2, -1)  # 2, then 3 electrons, per spread bin of 0.04 px^2
    assert llr[0, 0] < -1 and llr[0, 15] > 1  # one pixel: one electron; 0.6 px^2: two
    rng = np.random.default_rng(10)
    frame = blank(rng)
    singles, pairs = [], []
    for k, (r, c) in enumerate((r, c) for r in range(20, 560, 27) for c in range(20, 560, 54)):
        if k % 2:
            singles.append(r * FRAME_COLS + c)
            plant(frame, r + rng.uniform(-0.5, 0.5), c + rng.uniform(-0.5, 0.5), rng.uniform(130, 180))
        else:
            pairs += [r * FRAME_COLS + c, r * FRAME_COLS + c + 1]
            for dx in (0, 1):
                plant(frame, r + rng.uniform(-0.5, 0.5), c + dx + rng.uniform(-0.5, 0.5), rng.uniform(60, 90))
    assert len(singles) == 100 and len(pairs) == 200
    found = {}
    for name, m in (("spread", model), ("charge only", dataclasses.replace(model, spread_llr=()))):
        events = set(ClusterCounter(BACKGROUND, XRAY, m).count(as_frame(frame)).frame(0).tolist())
        once = sum(p in events and not events & {p - 1, p + 1, p - FRAME_COLS, p + FRAME_COLS} for p in singles)
        found[name] = (len(events & set(pairs)), once)
    assert found["spread"][0] >= 135 and found["spread"][1] >= 92, found
    assert found["charge only"][0] < 120 and found["charge only"][1] < 80, found


def test_the_kernels_spread_is_the_calibrations():
    """The spread the kernel computes for a basin from its sums (counting.clusters._spread) is the
    one the calibration's patches and compositions are binned by (cluster_model._spreads_and_peaks)."""
    from stemstream.counting.cluster_model import _spreads_and_peaks
    from stemstream.counting.clusters import _spread

    rng = np.random.default_rng(11)
    for _ in range(20):
        frame = blank(rng, (12, 12))
        plant(frame, 5 + rng.uniform(-0.5, 0.5), 5 + rng.uniform(-0.5, 0.5), rng.uniform(60, 180))
        plant(frame, 6 + rng.uniform(-0.5, 0.5), 5 + rng.uniform(-0.5, 1.5), rng.uniform(60, 180))
        raw = as_frame(frame)
        member = (raw > BACKGROUND) & (raw < XRAY)
        pixels = np.flatnonzero(member)
        charge = raw.reshape(-1)[pixels] - 20.0
        q = charge.sum()
        rows, cols = pixels // 12, pixels % 12
        # from the basin's sums, as label_basins gives them
        got = _spread(len(pixels), q, (charge * rows).sum(), (charge * cols).sum(), (charge * rows**2).sum(),
                      (charge * cols**2).sum(), (charge * rows * cols).sum())
        want, _ = _spreads_and_peaks(raw[None].astype(np.float64) - 20.0, BACKGROUND + 1 - 20.0, XRAY - 1 - 20.0)
        assert got == pytest.approx(want[0], rel=1e-9, abs=1e-12)


def test_score_gains_are_the_difference_of_the_scores():
    """counting.cluster_model.reconcile ranks clusters by _gain, a shortcut for
    _score(n + step) - _score(n)."""
    from stemstream.counting.cluster_model import SingleElectronModel, _gain, _score

    llr = tuple(np.linspace(-3.0, 2.0, 2 * 32))  # spread bins of 2, then 3 electrons
    model = SingleElectronModel(pedestal=20.0, mean=120.0, shape=3.4, min_charge=16.0, spread_llr=llr).params
    for q in (50.0, 300.0, 5e4):
        for peaks in (1, 2, 300):
            for n in (1, 2, 3, 17, 299, 400):
                for step, log_hidden, spread in itertools.product((1, -1), (np.log(0.002), np.log(0.5)), (-1, 0, 20)):
                    want = (_score(q, np.log(q), n + step, peaks, log_hidden, spread, model)
                            - _score(q, np.log(q), n, peaks, log_hidden, spread, model))
                    got = _gain(np.log(q), n, peaks, step, log_hidden, spread, model)
                    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_electrons_at_frame_edges_and_corners(counter):
    rng = np.random.default_rng(3)
    frame = blank(rng)
    rows, cols = FRAME_SHAPE
    planted = [(0.1, 0.2), (0.0, cols - 1.2), (rows - 1.0, 0.3), (rows - 1.2, cols - 1.1), (0.0, 300.0), (250.0, cols - 1.0)]
    for y, x in planted:
        plant(frame, y, x, 120.0)
    events, positions = count(counter, frame)
    assert sorted(events.tolist()) == sorted(int(round(y)) * cols + int(round(x)) for y, x in planted)
    assert positions.min() >= 0 and positions[:, 0].max() <= rows - 1 and positions[:, 1].max() <= cols - 1


def _labels_against_scipy(frame: np.ndarray, lo: int, hi: int, pedestal: float = 20.3) -> int:
    """Cluster labelling (counting.cluster_labels) against scipy's 8-connected labelling: the
    same clusters in the same order (raster order of their first pixel), their pixels in raster
    order, peaks (members not smaller than any member neighbour, ties to the lower index) and
    charge sums. Returns the number of clusters."""
    rows, cols = frame.shape
    pixels, records = np.empty(frame.size + 8, np.int64), np.empty(frame.size, np.int64)
    tables, sums = np.empty((min(frame.size, 65535), 4), np.int64), np.empty((min(frame.size, 65535), 3))
    n = label_clusters(frame.reshape(-1), rows, cols, lo, hi, pedestal, pixels, records, tables, sums)
    member = (frame >= lo) & (frame <= hi)
    want, n_want = ndimage.label(member, structure=np.ones((3, 3)))
    assert n == n_want
    kept = np.pad(np.where(member, frame.astype(np.int64), -1), 1, constant_values=-1)
    index = np.pad(np.arange(frame.size).reshape(rows, cols), 1)
    peak = member.copy()
    for dr, dc in [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc]:
        w = kept[1 + dr : 1 + dr + rows, 1 + dc : 1 + dc + cols]
        s = index[1 + dr : 1 + dr + rows, 1 + dc : 1 + dc + cols]
        peak &= ~((w > frame) | ((w == frame) & (s < index[1:-1, 1:-1])))
    order = np.argsort(want.reshape(-1), kind="stable")
    bounds = np.searchsorted(want.reshape(-1)[order], np.arange(1, n + 2))
    for j in range(n):
        start, size, n_peaks = tables[j, :3]
        mine = pixels[start : start + size]
        assert np.array_equal(mine, order[bounds[j] : bounds[j + 1]]), f"cluster {j}"
        assert n_peaks == peak.reshape(-1)[mine].sum(), f"cluster {j}"
        q = frame.reshape(-1)[mine] - pedestal
        assert sums[j] == pytest.approx([q.sum(), (q * (mine // cols)).sum(), (q * (mine % cols)).sum()], rel=1e-12)
    return n


def test_cluster_labels_match_scipy_across_blocks_rows_and_edges():
    """The run-based labelling joins runs across the scan's 64-pixel words and 96-pixel blocks,
    across rows (diagonal touches too), merges clusters that meet only further down (a U), and
    keeps clusters at the frame's edges and corners and in the columns after the last block."""
    lo, hi = 30, 2000
    frame = np.full((40, 200), 20, np.uint16)  # 200 columns: two blocks of 96 and 8 columns after
    for c0, c1 in ((60, 70), (90, 100), (150, 170), (185, 199)):  # across words, blocks, the tail
        frame[5, c0:c1] = 50
    frame[6, 100] = frame[7, 101] = frame[8, 95] = 40  # diagonal touches, a cluster from below
    frame[9, 94:96] = 40
    frame[12:20, 10] = frame[12:20, 14] = 45  # a U closed at the bottom, plateaus for the peaks
    frame[20, 10:15] = 45
    frame[12, 12] = 60  # a lone peak between its arms
    frame[0, 0:3] = frame[39, 197:200] = frame[0, 199] = frame[39, 0] = 60  # edges and corners
    frame[1:40, 199] = 35
    frame[25, 40:50] = 55
    frame[25, 45] = 5000  # an X-ray pixel splits a run in two
    frame[30, 96] = frame[31, 95] = frame[32, 96] = frame[33, 191] = frame[34, 192] = 70
    assert _labels_against_scipy(frame, lo, hi) == 13
    rng = np.random.default_rng(9)
    for shape in ((40, 200), (7, 96), (1, 1), (3, 5), FRAME_SHAPE):
        for density in (0.01, 0.3, 0.7):
            frame = rng.integers(0, lo, shape).astype(np.uint16)
            on = rng.random(shape) < density
            frame[on] = rng.integers(lo, lo + 20, on.sum())  # many ties between neighbours
            frame[rng.random(shape) < 0.01] = 3000
            _labels_against_scipy(frame, lo, hi)


def test_sector_boundaries_count_as_the_assembled_frame(counter):
    """Electrons whose charge crosses a sector boundary are counted once, from the sectors as the
    stream gives them (ClusterCounter.count_sectors) exactly as from the assembled frame; a
    missing sector counts as zero rows."""
    rng = np.random.default_rng(4)
    frames = np.empty((3, *FRAME_SHAPE), np.uint16)
    for i in range(3):
        frame = blank(rng)
        for m in range(1, N_MODULES):
            edge = m * SECTOR_ROWS
            for c in range(10, 560, 25):
                plant(frame, edge - 0.5 + rng.uniform(-0.3, 0.3), c + rng.uniform(-0.4, 0.4), rng.uniform(100, 140))
        frames[i] = as_frame(frame)
    whole = counter.count(frames)
    # Charge split evenly over two rows: one peak (a plateau), its electrons from the charge.
    assert np.all(np.abs(whole.counts - 3 * 22) <= 1)
    buffers = [make_sector_records(1, np.arange(3, dtype=np.uint32), (1, 3), np.arange(3), frames, m) for m in range(N_MODULES)]
    records = np.tile(np.arange(3)[:, None], (1, N_MODULES))
    streamed = counter.count_sectors(buffers, records)
    assert np.array_equal(streamed.events, whole.events) and np.array_equal(streamed.offsets, whole.offsets)
    assert np.array_equal(streamed.positions, whole.positions)
    records[1, 2] = -1
    missing = frames[1].copy()
    missing[2 * SECTOR_ROWS : 3 * SECTOR_ROWS] = 0
    assert np.array_equal(counter.count_sectors(buffers, records).frame(1), counter.count(missing).frame(0))


def test_noise_and_xrays_are_not_electrons(counter):
    rng = np.random.default_rng(5)
    frame = blank(rng)
    frame[100, 100] = 27.0  # a noise pixel just above the background threshold
    frame[200, 200] = 5000.0  # an X-ray: above the X-ray threshold, removed as stempy removes it
    events, _ = count(counter, frame)
    assert len(events) == 0


def test_calibration_needs_isolated_single_electrons():
    rng = np.random.default_rng(6)
    frame = blank(rng)
    for c in range(10, 500, 10):
        plant(frame, 50.0, float(c), 120.0)
    with pytest.raises(ClusterCalibrationError, match="isolated single-electron clusters"):
        calibrate_cluster_model(as_frame(frame)[None], fixed_thresholds(BACKGROUND, XRAY))


def test_stempy_dense_counts_equal_the_electrons_counted(counter, tmp_path):
    """Two electrons on one pixel give two distinct pixels (stempy's reader counts a pixel listed
    twice once, and its frames are sets), so stempy's dense frame sums to the electrons counted."""
    io = pytest.importorskip("stempy.io")
    rng = np.random.default_rng(7)
    frames = np.empty((4, *FRAME_SHAPE), np.uint16)
    for i in range(4):
        frame = blank(rng)
        for c in range(20, 560, 30):
            plant(frame, 100.0, c, 120.0)
            plant(frame, 100.0, c, 120.0)  # a second electron on the same pixel
            # (the frame's total charge puts the clusters' counts right beyond its noise: charges
            # of the calibrated mean, so that it says 54 as the clusters do)
            plant(frame, 300.0 + i, c + 0.3, 120.0)
        frames[i] = as_frame(frame)
    counted = counter.count(frames)
    assert np.all(counted.counts == 3 * 18)
    path = tmp_path / "clusters.h5"
    with SparseCountsWriter(path, (2, 2), FRAME_SHAPE, subpixel_positions=True) as writer:
        writer.write_flat(np.arange(4), counted.events, counted.offsets, counted.positions)
    dense = io.load_electron_counts(str(path)).to_dense()
    assert np.array_equal(dense.reshape(4, -1).sum(axis=1), counted.counts)
    with h5py.File(path) as f:
        stored = f["subpixel/positions"][2].reshape(-1, 2)
    assert np.array_equal(stored, counted.frame_positions(2))


def test_the_default_method_is_stempys_maxima():
    assert config_from_dict({}).validate().counting.method == "maxima"


def test_count_method_clusters_end_to_end(tmp_path):
    """``count --method clusters`` on a simulated scan: the file says which method, holds the
    single-electron model and the positions, and counts within 5 % of the electrons."""
    from typer.testing import CliRunner

    from stemstream.cli.app import app
    from stemstream.sources.simulator import DetectorSimulator, SimulationConfig, simulate_to_directory

    io = pytest.importorskip("stempy.io")
    config = SimulationConfig(scan_shape=(8, 8), dose=0.005, seed=3)
    simulate_to_directory(tmp_path / "raw", config, 4096)
    out = tmp_path / "counted.h5"
    result = CliRunner().invoke(app, ["count", str(tmp_path / "raw"), "-o", str(out), "--method", "clusters", "--workers", "1"])
    assert result.exit_code == 0, result.output
    electrons = sum(int(b.electron_counts.sum()) for b in DetectorSimulator(config).batches(32))
    with h5py.File(out) as f:
        assert f["metadata/stemstream"].attrs["counting_method"] == "clusters"
        assert f["metadata/stemstream/cluster_model"].attrs["single_electron_mean"] > 0
        events = sum(len(e) for e in f["electron_events/frames"][:])
        assert sum(len(p) for p in f["subpixel/positions"][:]) == 2 * events
    assert abs(events / electrons - 1) < 0.05
    assert int(io.load_electron_counts(str(out)).sum(axis=(2, 3)).sum()) == events
    bad = CliRunner().invoke(app, ["count", str(tmp_path / "raw"), "-o", str(tmp_path / "x.h5"), "--method", "blobs"])
    assert bad.exit_code != 0 and "--method must be one of maxima, clusters" in bad.output
