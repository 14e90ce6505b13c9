"""What the cluster method calibrates from the data besides one electron's charge: the hot pixels
(counting.cluster_counter.hot_pixels), left out of the calibration and of the counts, and the
charge an electron leaves beside its cluster (its halo, SingleElectronModel.halo_mean), so that a
frame's total charge counts crowded electrons as it counts lone ones (docs/counting.md).

Planted electrons and frames as in test_cluster_counting (its helpers).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_cluster_counting import BACKGROUND, XRAY, as_frame, blank, plant

from stemstream.core.detector import FRAME_SHAPE, N_MODULES
from stemstream.core.thresholds import fixed_thresholds
from stemstream.counting.cluster_counter import HOT_MIN_FRAMES, ClusterCounter, calibrate_cluster_model, hot_pixels
from stemstream.formats.raw import make_sector_records

HOT_ADU = 300.0


def electrons_frame(rng, pairs: bool = False, sigma: float = 0.3) -> tuple[np.ndarray, int]:
    """A 576 x 576 frame (rows, cols) of electrons 14 px apart from a random start (charges
    80-160 ADU, a charge cloud of ``sigma`` px), or with ``pairs`` two at each place 1.3 px apart
    (each its own peak, the clusters touching); and how many electrons."""
    frame, n = blank(rng), 0
    r0, c0 = rng.integers(8, 22, 2)
    for r in range(r0, 566, 14):
        for c in range(c0, 566, 14):
            y, x = r + rng.uniform(-0.4, 0.4), c + rng.uniform(-0.4, 0.4)
            plant(frame, y, x, rng.uniform(80, 160), sigma)
            n += 1
            if pairs:
                angle = rng.uniform(0, 2 * np.pi)
                plant(frame, y + 1.3 * np.sin(angle), x + 1.3 * np.cos(angle), rng.uniform(80, 160), sigma)
                n += 1
    return as_frame(frame), n


def test_the_frame_count_does_not_grow_with_crowding():
    """Electrons whose clusters touch lift each other's spilled charge above the threshold: the
    clusters' own charge per electron grows with crowding (counting 4.1 % too many of these
    pairs before the halo was counted), the charge with the halos does not (0.2 %)."""
    rng = np.random.default_rng(21)
    calibration, _ = electrons_frame(rng, sigma=0.45)
    model = calibrate_cluster_model(calibration[None], fixed_thresholds(BACKGROUND, XRAY))
    assert model.halo_mean > model.mean  # a 0.45 px cloud leaves charge below the threshold
    counter = ClusterCounter(BACKGROUND, XRAY, model)
    for pairs in (False, True):
        frames, electrons = zip(*[electrons_frame(rng, pairs, sigma=0.45) for _ in range(3)])
        counted = counter.count(np.stack(frames)).counts.sum()
        assert counted / sum(electrons) == pytest.approx(1.0, abs=0.02), "pairs" if pairs else "lone electrons"


def test_hot_pixels_are_pixels_lit_alone_in_almost_every_frame():
    rng = np.random.default_rng(3)
    n, shape, lo = HOT_MIN_FRAMES + 4, (64, 64), 27
    frames = rng.normal(20.0, 1.0, (n, *shape))
    hot = [5 * 64 + 5, 30 * 64 + 40, 63 * 64 + 63]  # one in a corner
    for p in hot:
        frames[:, p // 64, p % 64] = HOT_ADU
    # A bright disc at high dose: its pixels lit in 19 of 20 frames, as are their neighbours.
    lit = rng.random((n, 6, 6)) < 0.95
    lit[:, 0, 0] = np.arange(n) > 0
    frames[:, 40:46, 10:16] += np.where(lit, rng.uniform(40, 200, (n, 6, 6)), 0.0)
    frames[:, 50, 50] += np.where(np.arange(n) % 2 == 0, 100.0, 0.0)  # lit in half the frames
    frames = as_frame(frames)
    assert hot_pixels(frames, lo).tolist() == hot
    assert hot_pixels(frames[: HOT_MIN_FRAMES - 1], lo).tolist() == []  # too few frames to tell


def test_hot_pixels_neither_bias_the_calibration_nor_count():
    """Hot pixels make one-pixel clusters that look like isolated electrons: left in, 20 of them
    moved the fitted mean charge by 0.16 % here (between electrons 14 px apart few are isolated;
    up to 30 % in the simulator's sparser frames); left out, the model is that of the same frames
    without them (3e-5: an electron beside one loses its charge there), and they count no
    electron, streamed or not."""
    rng = np.random.default_rng(8)
    thresholds = fixed_thresholds(BACKGROUND, XRAY)
    clean = np.stack([electrons_frame(rng)[0] for _ in range(HOT_MIN_FRAMES)])
    hot = np.array([r * FRAME_SHAPE[1] + c for r in range(17, 566, 110) for c in range(17, 566, 110)])[:20]
    with_hot = clean.reshape(len(clean), -1).copy()
    with_hot[:, hot] = HOT_ADU
    with_hot = with_hot.reshape(clean.shape)
    model = calibrate_cluster_model(with_hot, thresholds)
    reference = calibrate_cluster_model(clean, thresholds)
    assert model.hot_pixels == tuple(hot.tolist()) and reference.hot_pixels == ()
    assert model.attributes()["hot_pixels"] == 20
    assert model.mean == pytest.approx(reference.mean, rel=2e-4)
    assert model.n_clusters == reference.n_clusters
    only_hot = np.full((1, *FRAME_SHAPE), 20, np.uint16)
    only_hot.reshape(-1)[hot] = HOT_ADU
    assert ClusterCounter(BACKGROUND, XRAY, model).count(only_hot).counts.tolist() == [0]
    assert ClusterCounter(BACKGROUND, XRAY, reference).count(only_hot).counts[0] >= 20  # counted unless masked
    buffers = [make_sector_records(1, np.zeros(1, np.uint32), (1, 1), np.zeros(1), only_hot, m) for m in range(N_MODULES)]
    streamed = ClusterCounter(BACKGROUND, XRAY, model).count_sectors(buffers, np.zeros((1, N_MODULES), np.int64))
    assert streamed.counts.tolist() == [0]
    for off_the_frame in (-1, FRAME_SHAPE[0] * FRAME_SHAPE[1]):
        with pytest.raises(ValueError, match="hot pixels outside the frame"):
            ClusterCounter(BACKGROUND, XRAY, dataclasses.replace(model, hot_pixels=(off_the_frame,)))
