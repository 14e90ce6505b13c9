"""Analyses that take the electrons' sub-pixel positions (Analysis.subpixel), with the built-in
one, upsampled_pattern: the bins of known points, a numpy reference over random ones, any split
into partials, frames outside the scan dropped with their points, pixel centres for events
counted without positions (strict maxima) equal to the summed pattern, bad points refused, and
offline from a counted file that keeps the positions."""

from __future__ import annotations

import re

import numpy as np
import pytest

from stemstream.analysis import ScanAnalyses, SummedPattern, UpsampledPattern, build_analysis
from stemstream.analysis.offline import analyze_counted_file
from stemstream.formats.sparse_h5 import CountedFileError, SparseCountsWriter

FRAME = (10, 12)  # (rows, cols): small, with rows != cols so a swapped axis shows


def pattern_of(analyses_or_one, scan_shape, batches) -> dict:
    """Results after accumulating ``batches`` of (positions, events, offsets, points)."""
    analyses = analyses_or_one if isinstance(analyses_or_one, list) else [analyses_or_one]
    scan = ScanAnalyses(analyses, scan_shape)
    for batch in batches:
        scan.accumulate(*batch)
    return scan.finish()


def reference(points: np.ndarray, factor: int) -> np.ndarray:
    """Electrons per bin by numpy: pixel r spans [r - 0.5, r + 0.5), each split in ``factor``."""
    rows, cols = FRAME[0] * factor, FRAME[1] * factor
    r = np.clip(np.floor((points[:, 0].astype(np.float64) + 0.5) * factor).astype(int), 0, rows - 1)
    c = np.clip(np.floor((points[:, 1].astype(np.float64) + 0.5) * factor).astype(int), 0, cols - 1)
    return np.bincount(r * cols + c, minlength=rows * cols).reshape(rows, cols)


def random_batch(rng, n_frames: int, n_positions: int):
    """Frames at random positions with random events and points near their pixels (one may be a
    neighbour's, as the cluster method's second electron on a taken pixel)."""
    counts = rng.integers(0, 6, n_frames)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    # each frame's pixels sorted and unique, as the counting gives them and the file keeps them
    events = np.concatenate([np.empty(0, np.uint32)] + [np.sort(rng.choice(FRAME[0] * FRAME[1], k, replace=False))
                                                        for k in counts]).astype(np.uint32)
    centres = np.stack([events // FRAME[1], events % FRAME[1]], axis=1)
    points = np.clip(centres + rng.uniform(-1.2, 1.2, centres.shape), -0.5, np.array(FRAME) - 0.5)
    return rng.integers(0, n_positions, n_frames).astype(np.int64), events, offsets, points.astype(np.float32)


def test_known_points_land_in_their_bins_edges_included():
    points = np.array([[3.2, 4.4], [3.0, 4.0], [2.6, 3.6], [9.5, 11.5], [-0.5, -0.5], [4.24, 0.0]], np.float32)
    events = np.array([40, 40, 40, 119, 0, 48], np.uint32)
    results = pattern_of(UpsampledPattern(FRAME, factor=2), (1, 2), [(np.array([0, 1]), events, np.array([0, 3, 6]),
                                                                       points)])
    pattern = results["upsampled_pattern"]["pattern"]
    assert pattern.shape == (20, 24)
    found = {tuple(int(v) for v in rc): int(pattern[tuple(rc)]) for rc in np.argwhere(pattern)}
    # (3.2, 4.4) and (3.0, 4.0): bin (7, 9); (2.6, 3.6): (6, 8); the far corner (9.5, 11.5): the
    # last bin; the near corner: (0, 0); (4.24, 0.0): (9, 1)
    assert found == {(7, 9): 2, (6, 8): 1, (19, 23): 1, (0, 0): 1, (9, 1): 1}


@pytest.mark.parametrize("factor", [2, 3, 8])
def test_random_points_equal_a_numpy_reference_under_any_split(factor):
    rng = np.random.default_rng(factor)
    batches = [random_batch(rng, 40, 6) for _ in range(5)]
    expected = reference(np.concatenate([b[3] for b in batches]), factor)
    one = build_analysis("upsampled_pattern", FRAME, {"factor": factor})
    assert np.array_equal(pattern_of(one, (2, 3), batches)["upsampled_pattern"]["pattern"], expected)
    # split among two "node groups" whose partials a "writer" merges
    writer = ScanAnalyses([one], (2, 3))
    for part in (batches[:2], batches[2:]):
        node = ScanAnalyses([one], (2, 3))
        for batch in part:
            node.accumulate(*batch)
        writer.merge_parts(node.take_partials())
    assert np.array_equal(writer.finish()["upsampled_pattern"]["pattern"], expected)


def test_frames_outside_the_scan_are_dropped_with_their_points():
    rng = np.random.default_rng(1)
    positions, events, offsets, points = random_batch(rng, 30, 4)
    positions[::3] = [-1, 4, 99, 7, -5, 4, 4, 12, 9, 100]  # outside a scan of 4
    inside = (positions >= 0) & (positions < 4)
    kept = np.repeat(inside, np.diff(offsets))
    results = pattern_of(UpsampledPattern(FRAME), (2, 2), [(positions, events, offsets, points)])
    assert np.array_equal(results["upsampled_pattern"]["pattern"], reference(points[kept], 2))


def test_without_points_each_event_is_its_pixel_centre_and_the_blocks_sum_to_the_summed_pattern():
    rng = np.random.default_rng(2)
    positions, events, offsets, _ = random_batch(rng, 50, 4)
    results = pattern_of([UpsampledPattern(FRAME, factor=3), SummedPattern(FRAME)], (2, 2),
                         [(positions, events, offsets, None)])
    up, summed = results["upsampled_pattern"]["pattern"], results["summed_pattern"]["pattern"]
    assert np.array_equal(up[1::3, 1::3], summed)  # the centre's bin, (3r + 1, 3c + 1)
    assert up.sum() == summed.sum() == len(events)
    assert np.array_equal(up.reshape(FRAME[0], 3, FRAME[1], 3).sum(axis=(1, 3)), summed)


@pytest.mark.parametrize("points, message", [
    (np.zeros((3, 2), np.float32), "points must be (4, 2)"),
    (np.zeros((4, 3), np.float32), "points must be (4, 2)"),
    (np.zeros((4, 2), np.int32), "points must be (4, 2)"),
    (np.array([[0, 0], [0, 0], [np.nan, 0], [0, 0]], np.float32), "not finite or lies outside"),
    (np.array([[0, 0], [0, 0], [10.0, 0], [0, 0]], np.float32), "outside the 10 x 12 frame"),
    (np.array([[0, -0.6], [0, 0], [0, 0], [0, 0]], np.float32), "outside the 10 x 12 frame"),
])
def test_bad_points_are_refused_in_one_sentence(points, message):
    batch = (np.array([0]), np.array([1, 2, 3, 4], np.uint32), np.array([0, 4]), points)
    for run in (lambda: pattern_of(UpsampledPattern(FRAME), (1, 1), [batch]),
                lambda: UpsampledPattern(FRAME).accumulate(UpsampledPattern(FRAME).new_partial((1, 1)), *batch)):
        with pytest.raises(ValueError, match=re.escape(message)):
            run()


@pytest.mark.parametrize("factor", [1, 9, 2.0, True, "2"])
def test_a_bad_factor_is_refused_naming_it(factor):
    with pytest.raises(ValueError, match="upsampled_pattern factor must be an integer in 2..8"):
        build_analysis("upsampled_pattern", FRAME, {"factor": factor})


def counted_file(path, batches, subpixel: bool, scan_shape=(2, 3)):
    """A counted file of ``batches`` (each position's frame written once), with their positions
    when ``subpixel``."""
    writer = SparseCountsWriter(path, scan_shape, FRAME, subpixel_positions=subpixel)
    for positions, events, offsets, points in batches:
        writer.write_flat(positions, events, offsets, points if subpixel else None)
    writer.close()
    return path


def one_frame_a_position(rng, n_positions: int):
    positions, events, offsets, points = random_batch(rng, n_positions, 1)
    return np.arange(n_positions, dtype=np.int64), events, offsets, points


def test_offline_from_a_file_that_keeps_positions_and_from_one_that_does_not(tmp_path):
    rng = np.random.default_rng(3)
    batch = one_frame_a_position(rng, 6)
    with_points = counted_file(tmp_path / "clusters.h5", [batch], subpixel=True)
    out = analyze_counted_file(with_points, [UpsampledPattern(FRAME)], write=False, png=False, batch_frames=2)
    assert np.array_equal(out.results["upsampled_pattern"]["pattern"], reference(batch[3], 2))
    without = counted_file(tmp_path / "maxima.h5", [batch], subpixel=False)
    out = analyze_counted_file(without, [UpsampledPattern(FRAME)], write=False, png=False, batch_frames=2)
    centres = np.stack([batch[1] // FRAME[1], batch[1] % FRAME[1]], axis=1).astype(np.float32)
    assert np.array_equal(out.results["upsampled_pattern"]["pattern"], reference(centres, 2))


def test_offline_says_in_one_sentence_when_a_files_positions_do_not_match_its_events(tmp_path):
    import h5py

    from stemstream.formats.sparse_h5.layout import SUBPIXEL_POSITIONS

    rng = np.random.default_rng(4)
    path = counted_file(tmp_path / "clusters.h5", [one_frame_a_position(rng, 6)], subpixel=True)
    with h5py.File(path, "r+") as f:
        stored = f[SUBPIXEL_POSITIONS]
        stored[2] = np.zeros(2 * len(stored[2]) + 2, np.float32)  # one (row, col) too many
    with pytest.raises(CountedFileError, match="sub-pixel positions .* do not match its events"):
        analyze_counted_file(path, [UpsampledPattern(FRAME)], write=False, png=False)
