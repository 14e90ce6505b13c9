"""How the cluster method shares out a crowded frame's electrons: a frame labelled by its peaks'
basins (counting.cluster_basins), the hidden electrons' rate from the local
density (counting.clusters._local_hidden), and the frame's correction, which may give one
cluster many electrons (counting.cluster_model.reconcile).

Planted electrons and frames as in test_cluster_counting (its helpers).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_cluster_counting import as_frame, blank, plant

from stemstream.core.detector import FRAME_SHAPE

from scipy import ndimage

from stemstream.counting.cluster_basins import label_basins
from stemstream.counting.cluster_counter import _scratch
from stemstream.counting.cluster_model import SingleElectronModel, reconcile
from stemstream.counting.clusters import _TILE, _local_hidden

LO, HI, PEDESTAL = 26, 2000, 20.0


def labelled(frame: np.ndarray, most: int | None = None, lo: int = LO, hi: int = HI):
    """The basins of a uint16 frame (rows, cols) and the thread arrays they are in (tables and
    sums cut to ``most`` rows when given)."""
    label, used, pixels, peaks, tables, sums, gains, where = _scratch(frame.shape)
    if most is not None:
        tables, sums = tables[:most], sums[:most]
    n = label_basins(frame.reshape(-1), *frame.shape, lo, hi, PEDESTAL, pixels, peaks, tables, sums, label, used)
    return n, (label, used, pixels, peaks, tables, sums, gains, where)


def way_up_of(flat: np.ndarray, cols: int, p: int) -> int:
    """The highest member among p and its 8 neighbours, the lower flat index on a tie, by numpy."""
    rows = flat.size // cols
    r, c = divmod(p, cols)
    near = [rr * cols + cc for rr in range(max(r - 1, 0), min(r + 2, rows)) for cc in range(max(c - 1, 0), min(c + 2, cols))]
    return max((q for q in near if LO <= flat[q] <= HI), key=lambda q: (int(flat[q]), -q))


def test_a_cluster_of_two_peaks_is_labelled_as_their_basins():
    rng = np.random.default_rng(4)
    frame = blank(rng, (40, 40))
    plant(frame, 10.0, 10.0, 150.0, 0.5)  # two electrons 2 px apart: one cluster, two peaks
    plant(frame, 10.0, 12.0, 110.0, 0.5)
    plant(frame, 30.0, 30.0, 120.0, 0.5)  # a lone one: its cluster is its basin
    frame = as_frame(frame)
    flat = frame.reshape(-1)
    n, (label, used, pixels, peaks, tables, sums, gains, where) = labelled(frame)
    member = (frame >= LO) & (frame <= HI)
    clusters, n_clusters = ndimage.label(member, structure=np.ones((3, 3)))
    assert n_clusters == 2 and n == 3 and list(tables[:3, 2]) == [1, 1, 1]
    basins = [pixels[tables[j, 0] : tables[j, 0] + tables[j, 1]] for j in range(3)]
    # Numbered in raster order of their peaks; the two first are the first cluster's pixels, each
    # around its own electron's pixel; every member once, in raster order within its basin
    assert 10 * 40 + 10 in basins[0] and 10 * 40 + 12 in basins[1] and 30 * 40 + 30 in basins[2]
    assert sorted(np.concatenate(basins[:2])) == list(np.flatnonzero(clusters.reshape(-1) == clusters[10, 10]))
    assert sorted(basins[2]) == list(np.flatnonzero(clusters.reshape(-1) == clusters[30, 30]))
    assert all(list(b) == sorted(b) for b in basins)
    halo_total = 0.0
    for j, members in enumerate(basins):
        w = flat[members].astype(float) - PEDESTAL
        r, c = members // 40, members % 40
        assert list(sums[j, [0, 1, 2, 3, 6, 7]]) == pytest.approx(
            [w.sum(), (w * r).sum(), (w * c).sum(), (w * r * r).sum(), (w * c * c).sum(), (w * r * c).sum()], rel=1e-12)
        # every member's way up stays in its basin, and its peak is the one pixel that is its own
        for p in members:
            assert way_up_of(flat, 40, int(p)) in members
        assert sum(way_up_of(flat, 40, int(p)) == p for p in members) == 1
        halo_total += sums[j, 4]
    # The halos: each pixel below LO beside a member (4-neighbours) counted once, in one basin
    halo = ~member & ndimage.binary_dilation(member, structure=ndimage.generate_binary_structure(2, 1))
    assert halo_total == pytest.approx((frame[halo].astype(float) - PEDESTAL).sum(), rel=1e-12)
    assert not label.any() and not used.any()  # both images clear again for the next frame


def _basins_by_numpy(frame: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's peak (flat index; -1 off the members) by following every member's way up,
    computed for the whole frame at once: the highest member among it and its 8 neighbours,
    ties to the lower flat index. Also the peaks, in raster order."""
    rows, cols = frame.shape
    member = (frame >= lo) & (frame <= hi)
    key = np.pad(np.where(member, frame.astype(np.int64), -1), 1, constant_values=-2)
    index = np.pad(np.arange(frame.size).reshape(rows, cols), 1, constant_values=frame.size)
    best_key, best = key[1:-1, 1:-1].copy(), index[1:-1, 1:-1].copy()
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            k = key[1 + dr : 1 + dr + rows, 1 + dc : 1 + dc + cols]
            i = index[1 + dr : 1 + dr + rows, 1 + dc : 1 + dc + cols]
            better = (k > best_key) | ((k == best_key) & (i < best))
            best_key, best = np.where(better, k, best_key), np.where(better, i, best)
    up = np.where(member, best, -1).reshape(-1)
    peak_of = up.copy()
    while True:  # pointer jumping to the roots (peaks point at themselves)
        nxt = np.where(peak_of >= 0, up[np.maximum(peak_of, 0)], -1)
        if np.array_equal(nxt, peak_of):
            return peak_of, np.flatnonzero(up == np.arange(frame.size))
        peak_of = nxt


def _basins_against_numpy(frame: np.ndarray, lo: int, hi: int) -> int:
    """label_basins against _basins_by_numpy: the same basins in the same order (raster order of
    their peaks), their pixels in raster order, their charge sums, and the halos' total."""
    rows, cols = frame.shape
    flat = frame.reshape(-1)
    n, (label, used, pixels, peaks, tables, sums, gains, where) = labelled(frame, lo=lo, hi=hi)
    peak_of, tops = _basins_by_numpy(frame, lo, hi)
    assert n == len(tops)
    assert list(tables[:n, 2]) == [1] * n
    # Pixels grouped by their peak, peaks in raster order (a stable sort keeps raster order within)
    key = np.where(peak_of >= 0, peak_of, frame.size)
    order = np.argsort(key, kind="stable")
    bounds = np.searchsorted(key[order], tops)
    sizes = np.bincount(np.searchsorted(tops, peak_of[peak_of >= 0]), minlength=n)
    assert np.array_equal(tables[:n, 1], sizes)
    for j in range(n):
        mine = pixels[tables[j, 0] : tables[j, 0] + tables[j, 1]]
        assert np.array_equal(mine, order[bounds[j] : bounds[j] + sizes[j]]), f"basin {j}"
    basin = np.searchsorted(tops, peak_of[peak_of >= 0])
    at = np.flatnonzero(peak_of >= 0)
    w, r, c = flat[at].astype(float) - PEDESTAL, at // cols, at % cols
    for column, values in ((0, w), (1, w * r), (2, w * c), (3, w * r * r), (6, w * c * c), (7, w * r * c)):
        assert sums[:n, column] == pytest.approx(np.bincount(basin, values, minlength=n), rel=1e-12, abs=1e-9)
    halo_total = sums[:n, 4].sum()
    member = (frame >= lo) & (frame <= hi)
    halo = (frame < lo) & ndimage.binary_dilation(member, structure=ndimage.generate_binary_structure(2, 1))
    assert halo_total == pytest.approx((frame[halo].astype(float) - PEDESTAL).sum(), rel=1e-9, abs=1e-6)
    assert not label.any() and not used.any()
    return n


def test_basins_match_a_numpy_steepest_ascent_across_blocks_rows_and_edges():
    """The scan's ways up across its 64-pixel words and 96-pixel blocks, at the frame's edges and
    corners (the scalar way up) and in the columns after the last block; plateaus (one peak, the
    lower flat index), X-ray pixels (not members), and frames where most pixels are members."""
    rng = np.random.default_rng(9)
    for shape in ((40, 200), (7, 96), (1, 1), (3, 5), (2, 97), FRAME_SHAPE):
        for density in (0.01, 0.3, 0.7, 1.0):
            frame = rng.integers(0, LO, shape).astype(np.uint16)
            on = rng.random(shape) < density
            frame[on] = rng.integers(LO, LO + 20, on.sum())  # many ties between neighbours
            frame[rng.random(shape) < 0.01] = 3000
            _basins_against_numpy(frame, LO, HI)
    assert _basins_against_numpy(np.full((30, 120), 50, np.uint16), LO, HI) == 1  # one plateau: one peak


def test_labelling_stops_at_the_tables_size():
    """A frame of more peaks than the tables hold keeps the basins it has room for, whole, and
    leaves its images clear."""
    rng = np.random.default_rng(5)
    frame = blank(rng, (20, 20))
    for col in (4.0, 8.0, 12.0):  # three lone electrons in one row, apart
        plant(frame, 10.0, col, 150.0, 0.5)
    frame = as_frame(frame)
    n, (label, used, pixels, peaks, tables, sums, gains, where) = labelled(frame)
    assert n == 3
    full = [sorted(pixels[tables[j, 0] : tables[j, 0] + tables[j, 1]]) for j in range(3)]
    n, (label, used, pixels, peaks, tables, sums, gains, where) = labelled(frame, most=2)
    assert n == 2
    assert [sorted(pixels[tables[j, 0] : tables[j, 0] + tables[j, 1]]) for j in range(2)] == full[:2]
    assert not label.any() and not used.any()


def test_hidden_electrons_go_where_the_electrons_crowd():
    """A dense tile and a lone cluster far away: the frame's hidden electrons (charge over peaks)
    go to the dense tile's clusters in proportion to the density around them. The rates per peak
    times the peaks add up to the frame's hidden electrons."""
    rows = cols = 8 * _TILE
    n = 11
    tables = np.zeros((n, 4), np.int64)
    sums = np.zeros((n, 8))
    tile_e = np.zeros((8, 8))
    tile_p = np.zeros((8, 8))
    for j in range(n):
        tables[j] = (j, 4, 1, 5 * 8 + 5 if j < 10 else 0)  # its tile, flat (_frame_charge)
        sums[j, 0] = 200.0
    tile_e[5, 5], tile_p[5, 5] = 30.0, 10  # 10 clusters, 30 electrons by charge: 20 hidden
    tile_e[0, 0], tile_p[0, 0] = 1.0, 1
    electrons = _local_hidden(rows, cols, tables, sums, n, tile_e, tile_p, 50.0)
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
    sums = np.array([[8000.0, 0, 0, -1, 0.0, math.log(8000.0)], [100.0, 0, 0, -1, math.log(0.01), math.log(100.0)]])
    reconcile(tables, sums, 2, 30, model, np.empty(2))
    assert list(tables[:, 3]) == [80, 1]
    reconcile(tables, sums, 2, -35, model, np.empty(2))  # never below a cluster's peaks
    assert list(tables[:, 3]) == [50, 1]
