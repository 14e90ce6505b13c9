"""How the cluster method shares out a crowded frame's electrons: a cluster of several peaks
split into its peaks' basins (counting.cluster_basins), the hidden electrons' rate from the local
density (counting.clusters._local_hidden), and the frame's correction, which may give one
cluster many electrons (counting.cluster_model.reconcile).

Planted electrons and frames as in test_cluster_counting (its helpers).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_cluster_counting import as_frame, blank, plant

from stemstream.counting.cluster_basins import split_basins
from stemstream.counting.cluster_counter import _scratch
from stemstream.counting.cluster_labels import label_clusters
from stemstream.counting.cluster_model import SingleElectronModel, reconcile
from stemstream.counting.clusters import _TILE, _local_hidden

LO, HI, PEDESTAL = 26, 2000, 20.0


def labelled(frame: np.ndarray):
    """The clusters of a uint16 frame (rows, cols) and the thread arrays they are in."""
    label, used, pixels, peaks, tables, sums, gains, where = scratch = _scratch(frame.shape)
    n = label_clusters(frame.reshape(-1), *frame.shape, LO, HI, PEDESTAL, pixels, peaks, tables, sums)
    return n, scratch


def test_a_cluster_of_two_peaks_splits_into_their_basins():
    rng = np.random.default_rng(4)
    frame = blank(rng, (40, 40))
    plant(frame, 10.0, 10.0, 150.0, 0.5)  # two electrons 2 px apart: one cluster, two peaks
    plant(frame, 10.0, 12.0, 110.0, 0.5)
    plant(frame, 30.0, 30.0, 120.0, 0.5)  # a lone one, left whole
    frame = as_frame(frame)
    n, (label, used, pixels, peaks, tables, sums, gains, where) = labelled(frame)
    assert n == 2 and list(tables[:2, 2]) == [2, 1]
    before = [sorted(pixels[tables[j, 0] : tables[j, 0] + tables[j, 1]]) for j in range(n)]
    charge = sums[:n, 0].copy()
    flat = frame.reshape(-1)
    n = split_basins(flat, 40, 40, LO, HI, PEDESTAL, pixels, tables, sums, n, label, peaks)
    assert n == 3 and list(tables[:3, 2]) == [1, 1, 1]
    basins = [pixels[tables[j, 0] : tables[j, 0] + tables[j, 1]] for j in range(3)]
    # The two basins are the first cluster's pixels, each around its own electron's pixel
    assert sorted(np.concatenate([basins[0], basins[2]])) == before[0] and list(basins[1]) == before[1]
    assert 10 * 40 + 10 in basins[0] and 10 * 40 + 12 in basins[2]
    for j, members in enumerate(basins):
        w = flat[members].astype(float) - PEDESTAL
        assert sums[j, 0] == np.float64(w.sum()) or abs(sums[j, 0] - w.sum()) < 1e-9
        assert abs(sums[j, 1] - (w * (members // 40)).sum()) < 1e-6
        assert abs(sums[j, 2] - (w * (members % 40)).sum()) < 1e-6
        # every member's way up stays in its basin: no member of another basin is higher beside it
        for p in members:
            r, c = divmod(int(p), 40)
            near = [q for q in range(40 * 40) if abs(q // 40 - r) <= 1 and abs(q % 40 - c) <= 1]
            top = max((q for q in near if LO <= flat[q] <= HI), key=lambda q: (flat[q], -q))
            assert top in members
    assert abs(sums[0, 0] + sums[2, 0] - charge[0]) < 1e-6
    assert not label.any()  # the basin image is clear again for the next cluster


def test_a_split_needs_room_in_the_tables():
    rng = np.random.default_rng(5)
    frame = blank(rng, (20, 20))
    plant(frame, 10.0, 8.0, 150.0, 0.5)
    plant(frame, 10.0, 10.0, 150.0, 0.5)
    plant(frame, 10.0, 12.0, 150.0, 0.5)
    frame = as_frame(frame)
    n, (label, used, pixels, peaks, tables, sums, gains, where) = labelled(frame)
    assert n == 1 and tables[0, 2] == 3
    small = tables[:2].copy()  # room for one more cluster, not two
    small_sums = sums[:2].copy()
    assert split_basins(frame.reshape(-1), 20, 20, LO, HI, PEDESTAL, pixels, small, small_sums, n, label, peaks) == 1
    assert small[0, 2] == 3
    assert split_basins(frame.reshape(-1), 20, 20, LO, HI, PEDESTAL, pixels, tables, sums, n, label, peaks) == 3


def test_hidden_electrons_go_where_the_electrons_crowd():
    """A dense tile and a lone cluster far away: the frame's hidden electrons (charge over peaks)
    go to the dense tile's clusters in proportion to the density around them. The rates per peak
    times the peaks add up to the frame's hidden electrons."""
    rows = cols = 8 * _TILE
    n = 11
    tables = np.zeros((n, 4), np.int64)
    sums = np.zeros((n, 5))
    pixels = np.zeros(n, np.int64)
    tile_e = np.zeros((8, 8))
    tile_p = np.zeros((8, 8))
    for j in range(n):
        pixels[j] = (5 * _TILE + 3 + 2 * j) * cols + 5 * _TILE + 3 if j < 10 else 3
        tables[j] = (j, 4, 1, 0)
        sums[j, 0] = 200.0
    tile_e[5, 5], tile_p[5, 5] = 30.0, 10  # 10 clusters, 30 electrons by charge: 20 hidden
    tile_e[0, 0], tile_p[0, 0] = 1.0, 1
    electrons = _local_hidden(rows, cols, pixels, tables, sums, n, tile_e, tile_p, 50.0)
    assert electrons == 31.0
    rate = np.exp(sums[:n, 4])
    # the densities over 3 x 3 tiles: 30 electrons on 9 tiles, 1 on the corner's 4
    assert np.allclose(rate[:10], rate[0]) and rate[0] / rate[10] == pytest.approx((30 / 9) / (1 / 4))
    assert (rate * tables[:n, 2]).sum() == pytest.approx(20.0)


def test_the_frame_correction_may_give_one_cluster_many_electrons():
    """A cluster whose charge says 30 electrons more than counted takes them all; one round per
    electron and cluster, at most 8 rounds (until 2026-12-05), gave it 8."""
    model = SingleElectronModel(pedestal=20.0, mean=100.0, shape=4.0, min_charge=10.0).params
    tables = np.array([[0, 400, 50, 50], [400, 1, 1, 1]], np.int64)
    sums = np.array([[8000.0, 0, 0, -1, 0.0], [100.0, 0, 0, -1, math.log(0.01)]])
    reconcile(tables, sums, 2, 30, model, np.empty(2))
    assert list(tables[:, 3]) == [80, 1]
    reconcile(tables, sums, 2, -35, model, np.empty(2))  # never below a cluster's peaks
    assert list(tables[:, 3]) == [50, 1]
