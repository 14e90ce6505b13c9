"""Analyses (virtual detectors, summed pattern, centre of mass, DPC, the example): equal to stempy
3.6.0 on the same counted file, equal under any split into partials, stored without breaking
stempy's loader, rendered as PNGs, and strict about their parameters and inputs."""

from __future__ import annotations

import math
import struct
import zlib

import h5py
import numpy as np
import pytest

from stemstream.analysis import (
    ANALYSES,
    Analysis,
    CenterOfMass,
    RadialProfile,
    ScanAnalyses,
    SummedPattern,
    VirtualDetectors,
    build_analysis,
    decode_partials,
    default_analyses,
    dpc_phase,
    encode_partials,
    register,
    stempy_com,
)
from stemstream.analysis.offline import analyze_counted_file
from stemstream.analysis.results_store import load_results
from stemstream.analysis.views import render_png
from stemstream.formats.png import png_bytes, scale_image, shrink
from stemstream.formats.sparse_h5 import CountedFileError, SparseCountsWriter
from stemstream.transport.messages import MessageError

stempy_image = pytest.importorskip("stempy.image")
stempy_io = pytest.importorskip("stempy.io")

FRAME = (576, 576)
N_PIXELS = FRAME[0] * FRAME[1]


def diffraction_frames(rng, scan_shape, fpp, empty_every=11, disk=72.0):
    """(n_positions, fpp) object array of sorted unique uint32 events: a bright-field disk that moves
    with the position, a few electrons scattered anywhere, some empty frames and empty positions."""
    rows, cols = scan_shape
    frames = np.empty((rows * cols, fpp), dtype=object)
    for p in range(rows * cols):
        shift = 4.0 * np.array([np.sin(2 * np.pi * (p // cols) / rows), np.cos(2 * np.pi * (p % cols) / cols)])
        for j in range(fpp):
            if (p * fpp + j) % empty_every == 5 or p % 13 == 4:  # empty frames, some whole positions
                frames[p, j] = np.empty(0, np.uint32)
                continue
            n_disk = rng.poisson(120)
            radius = disk * np.sqrt(rng.random(n_disk))
            angle = rng.random(n_disk) * 2 * np.pi
            r = np.rint(288 + shift[0] + radius * np.sin(angle)).astype(np.int64)
            c = np.rint(288 + shift[1] + radius * np.cos(angle)).astype(np.int64)
            scattered = rng.integers(0, N_PIXELS, rng.poisson(40))
            frames[p, j] = np.unique(np.concatenate([r * 576 + c, scattered])).astype(np.uint32)
    return frames


def write_counted(path, frames, scan_shape):
    fpp = frames.shape[1]
    with SparseCountsWriter(path, scan_shape, FRAME, frames_per_position=fpp) as w:
        w.write(np.arange(frames.size), list(frames.reshape(-1)))
    return path


def flat_batch(frames, positions):
    """Frames of the given positions (all their frames) as (positions, events, offsets)."""
    fpp = frames.shape[1]
    per_frame = [frames[p, j] for p in positions for j in range(fpp)]
    offsets = np.zeros(len(per_frame) + 1, np.int64)
    np.cumsum([len(e) for e in per_frame], out=offsets[1:])
    events = np.concatenate(per_frame) if per_frame else np.empty(0, np.uint32)
    return np.repeat(np.asarray(positions, np.int64), fpp), events.astype(np.uint32), offsets


def one_pass(analyses, frames, scan_shape):
    scan = ScanAnalyses(analyses, scan_shape)
    scan.accumulate(*flat_batch(frames, range(frames.shape[0])))
    return scan


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """A counted file of a non-square scan, 2 frames per position, some empty, and its data."""
    rng = np.random.default_rng(7)
    scan_shape = (6, 9)
    frames = diffraction_frames(rng, scan_shape, 2)
    path = write_counted(tmp_path_factory.mktemp("counted") / "scan.h5", frames, scan_shape)
    return path, frames, scan_shape


@pytest.fixture(scope="module")
def counted_single(tmp_path_factory):
    """One frame per position (stempy's cropping around each position's CoM then matches ours)."""
    rng = np.random.default_rng(8)
    scan_shape = (5, 7)
    frames = diffraction_frames(rng, scan_shape, 1, empty_every=6)
    path = write_counted(tmp_path_factory.mktemp("counted1") / "scan1.h5", frames, scan_shape)
    return path, frames, scan_shape


# -- equal to stempy ------------------------------------------------------------------------------


@pytest.mark.parametrize("center", [None, (290.5, 283.25), (10.0, 500.0)])
def test_virtual_detectors_equal_stempy_create_stem_images(counted, center):
    path, _, scan_shape = counted
    sa = stempy_io.load_electron_counts(str(path))
    inner, outer = [0, 60], [50, 250]
    ref_center = (-1, -1) if center is None else (center[1], center[0])  # stempy: (x, y) = (col, row)
    ref = stempy_image.create_stem_images(sa, inner, outer, center=ref_center) / 65535

    vd = VirtualDetectors(FRAME, center=center, bright_field=(0, 50), annular_dark_field=(60, 250))
    res = analyze_counted_file(path, [vd], write=False, png=False).results["virtual_detectors"]
    assert res["bright_field"].shape == scan_shape
    np.testing.assert_array_equal(res["bright_field"], ref[0])
    np.testing.assert_array_equal(res["annular_dark_field"], ref[1])
    assert res["bright_field"].sum() > 0 and res["annular_dark_field"].sum() > 0
    # the counts image: every electron of every frame of the position
    np.testing.assert_array_equal(res["counts"], stempy_image.create_stem_images(sa, 0, 10_000) [0] / 65535)


def test_summed_pattern_equals_stempy(counted):
    path, frames, _ = counted
    sa = stempy_io.load_electron_counts(str(path))
    ref = stempy_image.calculate_sum_sparse(list(sa.data.reshape(-1)), sa.frame_shape)
    res = analyze_counted_file(path, [SummedPattern(FRAME)], write=False, png=False).results
    np.testing.assert_array_equal(res["summed_pattern"]["pattern"], ref)


@pytest.mark.parametrize("replace_nans", [True, False])
def test_center_of_mass_equals_stempy_com_sparse(counted, replace_nans):
    path, _, _ = counted
    sa = stempy_io.load_electron_counts(str(path))
    ref = stempy_image.com_sparse(sa, replace_nans=replace_nans)
    com = CenterOfMass(FRAME, replace_nans=replace_nans)
    res = analyze_counted_file(path, [com], write=False, png=False).results["center_of_mass"]
    assert res["com_row"].dtype == np.float32
    got = stempy_com(res)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    np.testing.assert_array_equal(got, ref)  # bit for bit, NaNs in the same places
    assert np.isnan(ref).any() != replace_nans
    # component 0 is the column: the disk moves along columns with cos(col)
    np.testing.assert_array_equal(res["com_col"], ref[0])


def test_center_of_mass_cropping_equals_stempy(counted, counted_single):
    path, _, _ = counted
    sa = stempy_io.load_electron_counts(str(path))
    # around a fixed centre (stempy's init_center is (row, col)): exact for any frames per position
    ref = stempy_image.com_sparse(sa, crop_to=60, init_center=(290, 286))
    res = analyze_counted_file(path, [CenterOfMass(FRAME, crop_to=60, crop_center=(290, 286))], write=False, png=False)
    np.testing.assert_array_equal(stempy_com(res.results["center_of_mass"]), ref)
    # around each frame's own CoM: stempy uses the position's CoM, the same with one frame per position
    path1, _, _ = counted_single
    sa1 = stempy_io.load_electron_counts(str(path1))
    for crop in (30, 75.5):
        ref = stempy_image.com_sparse(sa1, crop_to=crop, replace_nans=False)
        res = analyze_counted_file(path1, [CenterOfMass(FRAME, crop_to=crop, replace_nans=False)], write=False, png=False)
        np.testing.assert_array_equal(stempy_com(res.results["center_of_mass"]), ref)


@pytest.mark.parametrize("rotation_deg, flip", [(0.0, False), (30.0, False), (-75.0, True)])
def test_dpc_equals_stempy_phase_from_com_in_row_col_order(counted, rotation_deg, flip):
    path, _, _ = counted
    com = CenterOfMass(FRAME, rotation_deg=rotation_deg, flip=flip, reg=1e-3)
    res = analyze_counted_file(path, [com], write=False, png=False).results["center_of_mass"]
    field = np.stack([res["com_row"], res["com_col"]]).astype(np.float64)
    ref = stempy_image.phase_from_com(field, theta=math.radians(rotation_deg), flip=flip, reg=1e-3)
    np.testing.assert_allclose(res["dpc_phase"], ref, rtol=0, atol=1e-9 * np.abs(ref).max())


def test_dpc_of_stempy_component_order_is_ours_turned_90_degrees_and_flipped(counted):
    path, _, _ = counted
    sa = stempy_io.load_electron_counts(str(path))
    theta = 0.4
    ref = stempy_image.phase_from_com(stempy_image.com_sparse(sa).astype(np.float64), theta=theta)
    com = CenterOfMass(FRAME, rotation_deg=math.degrees(theta) + 90, flip=True)
    res = analyze_counted_file(path, [com], write=False, png=False).results["center_of_mass"]
    np.testing.assert_allclose(res["dpc_phase"], ref, rtol=0, atol=1e-9 * np.abs(ref).max())


def test_dpc_integrates_a_gradient_back_to_its_potential():
    rows, cols = 48, 64
    r, c = np.mgrid[:rows, :cols]
    potential = np.exp(-((r - 20.0) ** 2 + (c - 40.0) ** 2) / (2 * 6.0**2)) - 0.5 * np.exp(
        -((r - 32.0) ** 2 + (c - 15.0) ** 2) / (2 * 4.0**2)
    )
    g_r, g_c = np.gradient(potential)
    phase = dpc_phase(g_r + 288.0, g_c + 290.0)  # absolute CoM: the constant does not matter
    corr = np.corrcoef(phase.ravel(), potential.ravel())[0, 1]
    assert corr > 0.99
    # with NaNs (positions without electrons) it still integrates
    g_r[3, 4] = np.nan
    assert np.isfinite(dpc_phase(g_r, g_c)).all()


# -- partial + merge --------------------------------------------------------------------------------


def all_analyses():
    return [
        VirtualDetectors(FRAME, center=(287.5, 289.0), extra={"ring": (20, 40)}),
        SummedPattern(FRAME),
        CenterOfMass(FRAME, crop_to=90.0, crop_center=(288, 288), rotation_deg=10.0),
        RadialProfile(FRAME, bins=5),
    ]


def assert_same_results(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            np.testing.assert_array_equal(a[name][key], b[name][key], err_msg=f"{name}/{key}")


def test_partials_merged_in_any_split_equal_one_pass(counted):
    _, frames, scan_shape = counted
    reference = one_pass(all_analyses(), frames, scan_shape).finish()
    rng = np.random.default_rng(3)
    fpp = frames.shape[1]
    for trial in range(3):
        # frames (not positions) split over 3 node groups, shuffled, in batches of random size
        slots = rng.permutation(frames.size)
        parts = np.array_split(slots, 3)
        groups = []
        for part in parts:
            scan = ScanAnalyses(all_analyses(), scan_shape)
            for batch in np.array_split(part, rng.integers(1, 6)):
                per_frame = [frames.flat[s] for s in batch]
                offsets = np.zeros(len(batch) + 1, np.int64)
                np.cumsum([len(e) for e in per_frame], out=offsets[1:])
                events = np.concatenate(per_frame) if per_frame else np.empty(0, np.uint32)
                scan.accumulate(batch // fpp, events, offsets)
            groups.append(scan)
        merged = ScanAnalyses(all_analyses(), scan_shape)
        for k in rng.permutation(3):
            merged.merge(groups[k])
        assert_same_results(merged.finish(), reference)
        assert merged.frames == frames.size


def test_partials_over_the_wire_equal_one_pass(counted):
    """Node groups take deltas every few batches (windows of touched positions); the writer merges."""
    _, frames, scan_shape = counted
    reference = one_pass(all_analyses(), frames, scan_shape)
    writer = ScanAnalyses(all_analyses(), scan_shape)
    nodes = [ScanAnalyses(all_analyses(), scan_shape) for _ in range(2)]
    positions = np.arange(frames.shape[0])
    sent = 0
    for i, chunk in enumerate(np.array_split(positions, 9)):
        node = nodes[i % 2]
        node.accumulate(*flat_batch(frames, chunk))
        if i % 2:
            parts = node.take_partials()
            sent += sum(len(memoryview(p).cast("B")) for p in parts)
            writer.merge_parts(parts)
    for node in nodes:
        writer.merge_parts(node.take_partials())
    writer.merge_parts(nodes[0].take_partials())  # an empty delta changes nothing
    assert_same_results(writer.finish(), reference.finish())
    assert writer.frames == reference.frames and writer.events == reference.events
    # per-position arrays travel only for the touched window: far less than whole partials
    whole = sum(arr.nbytes for p in reference.partials.values() for arr in p.values())
    assert sent < 6 * whole


def test_a_node_groups_window_of_partials_gives_the_writer_the_whole_scans_results(counted):
    """A node group holds the partials of a few positions only (memory flat in the scan's size):
    a batch outside them is accumulated after a take; batches in any order, incl. ones going back
    over positions taken before, give the one-pass results. A batch that does not fit raises."""
    _, frames, scan_shape = counted
    reference = one_pass(all_analyses(), frames, scan_shape)
    writer = ScanAnalyses(all_analyses(), scan_shape)
    node = ScanAnalyses(all_analyses(), scan_shape, window=8)
    assert all(arr.shape[0] == 8 for name, p in node.partials.items() for key, arr in p.items()
               if key in node[name].per_position)
    rng = np.random.default_rng(5)
    chunks = np.array_split(np.arange(frames.shape[0]), 12)
    takes = 0
    for k in [*range(12), 3, 0]:  # then two blocks again (a resend after a failover)
        batch = flat_batch(frames, chunks[k])
        if not node.fits(batch[0]) or rng.random() < 0.2:
            writer.merge_parts(node.take_partials())
            takes += 1
        node.accumulate(*batch)
    writer.merge_parts(node.take_partials())
    again = ScanAnalyses(all_analyses(), scan_shape)
    for k in (3, 0):
        again.accumulate(*flat_batch(frames, chunks[k]))
    reference.merge(again)
    assert_same_results(writer.finish(), reference.finish())
    assert takes >= 6
    node.accumulate(*flat_batch(frames, chunks[1]))
    with pytest.raises(ValueError, match="do not fit the window"):
        node.accumulate(*flat_batch(frames, chunks[10]))
    with pytest.raises(ValueError, match="whole scan"):
        node.finish()


def test_summed_pattern_carries_past_255_per_pixel_in_updates_and_merges():
    n = 1500  # frames that all hit pixel 7 (and pixel 9 in every third)
    per_frame = [np.array([7, 9], np.uint32) if i % 3 == 0 else np.array([7], np.uint32) for i in range(n)]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in per_frame])])
    events = np.concatenate(per_frame)
    positions = np.zeros(n, np.int64)
    one = ScanAnalyses([SummedPattern(FRAME)], (1, 1))
    one.accumulate(positions, events, offsets)
    parts = []
    for lo, hi in [(0, 300), (300, 1100), (1100, n)]:
        s = ScanAnalyses([SummedPattern(FRAME)], (1, 1))
        s.accumulate(positions[lo:hi], events[offsets[lo] : offsets[hi]], offsets[lo : hi + 1] - offsets[lo])
        parts.append(s)
    merged = ScanAnalyses([SummedPattern(FRAME)], (1, 1))
    for s in parts[::-1]:
        merged.merge(s)
    for scan in (one, merged):
        pattern = scan.finish()["summed_pattern"]["pattern"]
        assert pattern.flat[7] == n and pattern.flat[9] == n // 3 and pattern.sum() == n + n // 3


def test_take_partials_resets_the_delta(counted):
    _, frames, scan_shape = counted
    node = ScanAnalyses([VirtualDetectors(FRAME), SummedPattern(FRAME)], scan_shape)
    node.accumulate(*flat_batch(frames, [3, 4]))
    assert node.pending == 2 * frames.shape[1]
    msg = decode_partials(node.take_partials())
    assert node.pending == 0
    assert msg.window == (3, 5)
    assert msg.partials["virtual_detectors"]["images"].shape == (2, 3)
    assert msg.info["frames"] == 2 * frames.shape[1]
    assert not node.partials["virtual_detectors"]["images"].any()
    assert not any(a.any() for a in node.partials["summed_pattern"].values())
    assert node.frames == 2 * frames.shape[1]  # the totals stay


def test_merge_parts_rejects_garbage_and_mismatches_without_changing_anything(counted):
    _, frames, scan_shape = counted
    writer = ScanAnalyses([VirtualDetectors(FRAME), CenterOfMass(FRAME)], scan_shape)
    writer.accumulate(*flat_batch(frames, [0, 1, 2]))
    before = {n: {k: v.copy() for k, v in p.items()} for n, p in writer.partials.items()}

    node = ScanAnalyses([VirtualDetectors(FRAME), CenterOfMass(FRAME)], scan_shape)
    node.accumulate(*flat_batch(frames, [5, 6]))
    good = node.take_partials()
    other = ScanAnalyses([VirtualDetectors(FRAME)], scan_shape)
    other.accumulate(*flat_batch(frames, [5]))
    # same arrays, other parameters: only the fingerprint tells
    radii = ScanAnalyses([VirtualDetectors(FRAME, bright_field=(0, 30)), CenterOfMass(FRAME)], scan_shape)
    radii.accumulate(*flat_batch(frames, [5]))
    bigger = ScanAnalyses([VirtualDetectors(FRAME), CenterOfMass(FRAME)], (scan_shape[0] + 1, scan_shape[1]))
    bigger.accumulate(*flat_batch(frames, [0]))
    bigger.accumulate(np.array([scan_shape[0] * scan_shape[1] + 3]), np.array([5], np.uint32), np.array([0, 1]))
    cases = {
        "empty": [],
        "garbage header": [b"\xc1\xc1\xc1", *good[1:]],
        "header not a map": [b"\x93\x01\x02\x03", *good[1:]],
        "missing part": good[:-1],
        "truncated array": [*good[:-1], bytes(good[-1])[:-8]],
        "other analyses": other.take_partials(),
        "other parameters": radii.take_partials(),
        "window beyond the scan": bigger.take_partials(),
    }
    for what, parts in cases.items():
        with pytest.raises(MessageError):
            writer.merge_parts(parts)
        for n, p in writer.partials.items():
            for k, v in p.items():
                np.testing.assert_array_equal(v, before[n][k], err_msg=what)
    writer.merge_parts(good)  # still serving


def test_encode_decode_validates_dtype_shape_and_window():
    parts = encode_partials({"a": {"x": np.arange(6, dtype=np.int64).reshape(3, 2), "y": np.ones(4, np.float32)}})
    msg = decode_partials(parts)
    np.testing.assert_array_equal(msg.partials["a"]["x"], np.arange(6).reshape(3, 2))
    assert msg.partials["a"]["y"].dtype == np.float32
    with pytest.raises(ValueError):
        encode_partials({"a": {"x": np.array([object()])}})
    import msgpack

    def forged(entries, window=None):
        return [msgpack.packb({"format": 1, "window": window, "info": {}, "arrays": entries}), np.zeros(2, np.int64)]

    for entries, window in [
        ([["a", "x", "|O", [2], False]], None),  # objects never travel
        ([["a", "x", "<i8", [3], False]], None),  # size disagrees
        ([["a", "x", "<i8", [2], True]], None),  # windowed without a window
        ([["a", "x", "<i8", [2], True]], [0, 5]),  # rows disagree with the window
        ([["a", "x/..", "<i8", [2], False]], None),  # not an identifier
        ([["a", "x", "<i8", [-2], False]], None),
    ]:
        with pytest.raises(MessageError):
            decode_partials(forged(entries, window))


# -- inputs ------------------------------------------------------------------------------------------


def test_frames_outside_the_scan_are_skipped_and_counted():
    scan = ScanAnalyses(all_analyses(), (2, 3))
    positions = np.array([-1, 0, 6, 5, 100])
    per_frame = [np.array([1, 2], np.uint32), np.array([288 * 576 + 288], np.uint32), np.array([7], np.uint32),
                 np.array([288 * 576 + 290, 300 * 576], np.uint32), np.array([9], np.uint32)]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in per_frame])])
    scan.accumulate(positions, np.concatenate(per_frame), offsets)
    assert (scan.frames, scan.events, scan.frames_skipped) == (2, 3, 3)
    res = scan.finish()
    assert res["summed_pattern"]["pattern"].sum() == 3
    np.testing.assert_array_equal(res["virtual_detectors"]["counts"], [[1, 0, 0], [0, 0, 2]])


def test_bad_batches_raise_value_error():
    scan = ScanAnalyses([VirtualDetectors(FRAME)], (2, 2))
    with pytest.raises(ValueError, match="outside the frame"):
        scan.accumulate([0], np.array([N_PIXELS], np.uint32), [0, 1])
    with pytest.raises(ValueError, match="offsets"):
        scan.accumulate([0, 1], np.array([1, 2], np.uint32), [0, 2, 1])
    with pytest.raises(ValueError, match="offsets"):
        scan.accumulate([0], np.array([1], np.uint32), [0, 2])
    with pytest.raises(ValueError, match="one more than positions"):
        scan.accumulate([0, 1], np.array([1], np.uint32), [0, 1])
    vd = VirtualDetectors(FRAME)
    with pytest.raises(ValueError, match="outside the frame"):
        vd.accumulate(vd.new_partial((2, 2)), [0], np.array([-3]), [0, 1])


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("virtual_detectors", {"bright_field": (50, 20)}, "inner radius must be smaller"),
        ("virtual_detectors", {"annular_dark_field": (-1, 20)}, ">= 0"),
        ("virtual_detectors", {"bright_field": (0, math.inf)}, "finite"),
        ("virtual_detectors", {"center": (288,)}, "center must be"),
        ("virtual_detectors", {"center": (288, math.nan)}, "finite"),
        ("virtual_detectors", {"extra": {"counts": (1, 2)}}, "taken"),
        ("virtual_detectors", {"extra": {"bad name": (1, 2)}}, "letters, digits"),
        ("virtual_detectors", {"radius": 3}, "no parameter 'radius'"),
        ("center_of_mass", {"crop_to": -5}, "positive radius"),
        ("center_of_mass", {"crop_center": (288, 288)}, "needs crop_to"),
        ("center_of_mass", {"flip": "yes"}, "true or false"),
        ("center_of_mass", {"reg": -1}, "reg"),
        ("radial_profile", {"bins": 0}, "bins"),
        ("nonexistent", {}, "unknown analysis 'nonexistent'"),
    ],
)
def test_bad_parameters_raise_value_error_naming_them(name, params, message):
    with pytest.raises(ValueError, match=message):
        build_analysis(name, FRAME, params)


def test_default_analyses_from_config():
    names = [a.name for a in default_analyses(FRAME)]
    assert names == ["virtual_detectors", "summed_pattern", "center_of_mass"]
    config = {
        "enabled": ["virtual_detectors", "radial_profile"],
        "virtual_detectors": {"center": [280, 290], "bright_field": [0, 70]},
        "radial_profile": {"bins": 3},
    }
    vd, rp = default_analyses(FRAME, config)
    assert vd.center == (280.0, 290.0) and vd.detectors["bright_field"] == (0.0, 70.0)
    assert rp.params["bins"] == 3
    for bad, message in [
        ({"enabled": "virtual_detectors"}, "list of names"),
        ({"enabled": ["virtual_detectors", "virtual_detectors"]}, "twice"),
        ({"vd": {}}, "unknown analysis 'vd'"),
        ({"center_of_mass": 3}, "table of parameters"),
        ({"modules": ["no_such_module_here"]}, "cannot be imported"),
    ]:
        with pytest.raises(ValueError, match=message):
            default_analyses(FRAME, bad)


def test_masks_follow_stempys_convention():
    vd = VirtualDetectors((20, 20), center=(7.5, 4.0), bright_field=(0, 3), annular_dark_field=(2, 5))
    r, c = np.mgrid[:20, :20]
    d2 = (r - 7.5) ** 2 + (c - 4.0) ** 2
    np.testing.assert_array_equal(vd.mask("bright_field"), d2 < 9)
    np.testing.assert_array_equal(vd.mask("annular_dark_field"), (d2 >= 4) & (d2 < 25))
    assert VirtualDetectors((21, 17)).center == (11.0, 9.0)  # round(n / 2), halves up, as stempy
    assert VirtualDetectors().center == (288.0, 288.0)


# -- the file, the PNGs, the example -------------------------------------------------------------------


def assert_same_tree(a, b):
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_same_tree(a[key], b[key])
    else:
        np.testing.assert_array_equal(a, b)


def read_png(path):
    """Minimal PNG reader for what render_png writes: 8-bit grey or RGB, filter 0."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + length
    width, height, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    channels = {0: 1, 2: 3}[colour]
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + width * channels)
    assert depth == 8 and not raw[:, 0].any()
    img = raw[:, 1:].reshape(height, width, channels)
    return img[:, :, 0] if channels == 1 else img


def test_analyze_writes_results_into_the_file_and_stempy_still_loads_it(counted, tmp_path):
    src, frames, scan_shape = counted
    path = tmp_path / "copy.h5"
    path.write_bytes(src.read_bytes())
    before = stempy_io.load_electron_counts(str(path))
    out = analyze_counted_file(path, out_dir=tmp_path / "png")
    after = stempy_io.load_electron_counts(str(path))
    assert after.scan_shape == before.scan_shape and after.frame_shape == before.frame_shape
    for a, b in zip(after.data.reshape(-1), before.data.reshape(-1)):
        np.testing.assert_array_equal(a, b)
    assert_same_tree(after.metadata, before.metadata)
    assert out.frames == frames.size and out.events == sum(len(e) for e in frames.reshape(-1))

    stored = load_results(path)
    assert_same_results(stored, out.results)
    with h5py.File(path, "r") as f:
        g = f["analysis/virtual_detectors"]
        np.testing.assert_array_equal(g.attrs["center"], [288.0, 288.0])
        assert "bright-field" in g["bright_field"].attrs["description"]
        assert g["annular_dark_field"].attrs["outer_radius"] == 288.0
        assert f["analysis"].attrs["frames"] == frames.size
        assert f["analysis"].attrs["source"] == "offline"
        com = f["analysis/center_of_mass"]
        assert "crop_to" not in com.attrs and '"crop_to": null' in com.attrs["params_json"]  # None: not stored
    # again with other parameters: the group is replaced, others kept
    analyze_counted_file(path, [VirtualDetectors(FRAME, bright_field=(0, 10))], png=False)
    stored = load_results(path)
    assert set(stored) == {"virtual_detectors", "summed_pattern", "center_of_mass"}
    assert stored["virtual_detectors"]["bright_field"].sum() < out.results["virtual_detectors"]["bright_field"].sum()

    names = sorted(p.name for p in out.pngs)
    assert "copy_virtual_detectors_bright_field.png" in names
    assert "copy_center_of_mass_dpc_phase.png" in names
    assert "copy_summed_pattern_pattern.png" in names
    for p in out.pngs:
        assert p.parent == tmp_path / "png"
        img = read_png(p)
        assert max(img.shape[:2]) >= 256
    assert read_png(tmp_path / "png" / "copy_center_of_mass_com_row.png").ndim == 3  # diverging: RGB
    grey = read_png(tmp_path / "png" / "copy_virtual_detectors_counts.png")
    assert grey.shape == (6 * 29, 9 * 29) and grey.min() == 0 and grey.max() == 255


def test_analyze_rejects_a_file_that_is_not_counted(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(CountedFileError):
        analyze_counted_file(bad)
    with pytest.raises(CountedFileError):
        analyze_counted_file(tmp_path / "missing.h5")


def test_analyze_refuses_analyses_for_another_frame_shape(counted):
    with pytest.raises(ValueError, match="frames"):
        analyze_counted_file(counted[0], [VirtualDetectors((256, 256))], write=False, png=False)


def test_batches_do_not_change_results(counted):
    path = counted[0]
    a = analyze_counted_file(path, all_analyses(), write=False, png=False, batch_frames=7).results
    b = analyze_counted_file(path, all_analyses(), write=False, png=False).results
    assert_same_results(a, b)


def test_scale_image_and_png_bytes(tmp_path):
    assert (scale_image(np.full((3, 4), 5.0)) == 128).all()  # flat: mid grey
    img = scale_image(np.array([[0.0, np.nan], [1.0, 2.0]]))
    assert img[0, 1] == 128 and img[0, 0] == 0 and img[1, 1] == 255
    div = scale_image(np.array([[-1.0, 0.0, 1.0]]), "diverging")
    assert div.shape == (1, 3, 3) and tuple(div[0, 1]) == (247, 247, 247)
    assert div[0, 0, 2] > div[0, 0, 0] and div[0, 2, 0] > div[0, 2, 2]  # blue below, red above
    log = scale_image(np.array([[0.0, 10.0, 1e6]]), "log")
    assert log[0, 0] < log[0, 1] < log[0, 2]
    with pytest.raises(ValueError):
        scale_image(np.zeros(4))
    with pytest.raises(ValueError):
        scale_image(np.zeros((2, 2)), "rainbow")
    p = render_png(np.arange(600.0).reshape(20, 30), tmp_path / "x.png")
    assert read_png(p).shape == (20 * 9, 30 * 9)
    assert png_bytes(np.zeros((2, 2, 3), np.uint8))[:8] == b"\x89PNG\r\n\x1a\n"


def test_large_images_are_written_as_block_means_at_most_1024_pixels_a_side(tmp_path):
    """A 4096 x 4096 scan's PNGs took 26 s of the writer's close at full size: they are shrunk
    (means of the finite pixels of each block; the file keeps every value), small ones untouched."""
    image = np.arange(12.0).reshape(3, 4)
    assert shrink(image, 4) is image
    image[0, 0] = np.nan
    np.testing.assert_array_equal(shrink(image, 2), [[(1 + 4 + 5) / 3, (2 + 3 + 6 + 7) / 4], [(8 + 9) / 2, (10 + 11) / 2]])
    assert np.isnan(shrink(np.full((4, 4), np.nan), 2)).all()
    p = render_png(np.arange(2050.0 * 3).reshape(2050, 3), tmp_path / "tall.png")
    assert read_png(p).shape == (684, 1)  # blocks of 3 x 3: ceil(2050 / 3) rows, one column


def test_example_radial_profile(counted):
    path, frames, scan_shape = counted
    assert ANALYSES["radial_profile"] is RadialProfile
    rp = build_analysis("radial_profile", FRAME, {"center": (290, 285), "inner": 10, "outer": 250, "bins": 6})
    res = analyze_counted_file(path, [rp], write=False, png=False).results["radial_profile"]["profile"]
    assert res.shape == (*scan_shape, 6)
    # reference: numpy over every frame's electrons
    width = (250 - 10) / 6
    ref = np.zeros_like(res)
    for p in range(frames.shape[0]):
        ev = np.concatenate(list(frames[p]))
        r = np.hypot(ev // 576 - 290.0, ev % 576 - 285.0)
        keep = (r >= 10) & (r < 250)
        ring = np.minimum(np.floor((r[keep] - 10) / width).astype(int), 5)
        ref[p // scan_shape[1], p % scan_shape[1]] = np.bincount(ring, minlength=6)
    np.testing.assert_array_equal(res, ref)
    assert set(rp.show({"profile": res})) == {f"ring_{k}" for k in range(6)}


def test_a_new_analysis_is_one_small_module(counted):
    """What docs/analyses.md walks through: subclass, kernel-free if numpy suffices, register."""

    class MaxElectrons(Analysis):
        name = "max_electrons_test"
        per_position = ("most",)

        def new_partial(self, scan_shape):
            return {"most": np.zeros(scan_shape[0] * scan_shape[1], np.int64)}

        def update(self, partial, positions, events, offsets):
            np.maximum.at(partial["most"], positions, np.diff(offsets))

        def merge(self, into, other):
            np.maximum(into["most"], other["most"], out=into["most"])

        def finish(self, partial, scan_shape):
            return {"most": partial["most"].reshape(scan_shape).copy()}

    register(MaxElectrons)
    try:
        path, frames, scan_shape = counted
        a = build_analysis("max_electrons_test", FRAME)
        res = analyze_counted_file(path, [a], write=False, png=False).results["max_electrons_test"]["most"]
        ref = np.vectorize(len)(frames).max(axis=1).reshape(scan_shape)
        np.testing.assert_array_equal(res, ref)
        with pytest.raises(ValueError, match="already registered"):

            class Clash(MaxElectrons):
                pass

            register(Clash)
    finally:
        ANALYSES.pop("max_electrons_test", None)


def test_pixel_row_col_is_exact_for_every_pixel():
    from numba import njit

    from stemstream.analysis.batch import pixel_row_col

    @njit
    def mismatches(n_pixels, cols):
        bad = 0
        inv = 1.0 / cols
        for e in range(n_pixels):
            r, c = pixel_row_col(np.uint32(e), cols, inv)
            bad += (r != e // cols) or (c != e % cols)
        return bad

    for rows, cols in [(576, 576), (577, 575), (1024, 1000), (4096, 4096), (3, 7)]:
        assert mismatches(rows * cols, cols) == 0


def test_old_format_files_give_the_same_results(counted, tmp_path):
    """Version 2 (one entry per frame plus its scan position) goes through stempy's conversion."""
    path, frames, scan_shape = counted
    v2 = tmp_path / "v2.h5"
    order = np.random.default_rng(5).permutation(frames.size)  # frames in any order
    with h5py.File(v2, "w") as f:
        f.attrs["version"] = 2
        g = f.create_group("electron_events")
        ds = g.create_dataset("frames", (frames.size,), dtype=h5py.vlen_dtype(np.uint32))
        for i, s in enumerate(order):
            ds[i] = frames.flat[s]
        ds.attrs["Nx"], ds.attrs["Ny"] = FRAME
        sp = g.create_dataset("scan_positions", data=(order // frames.shape[1]).astype(np.int64))
        sp.attrs["Nx"], sp.attrs["Ny"] = scan_shape[1], scan_shape[0]
    a = analyze_counted_file(v2, all_analyses(), write=False, png=False).results
    b = analyze_counted_file(path, all_analyses(), write=False, png=False).results
    assert_same_results(a, b)


def test_on_simulated_data_the_images_show_the_specimen(tmp_path):
    """End to end: simulator -> counting kernel -> counted file -> analyses. Bright field is dark
    over the grains, dark field bright, and the DPC phase of the cropped CoM follows the phase of
    the simulator's true beam deflection (so the default rotation and flip are the right way up)."""
    from stemstream.counting.kernel import ElectronCounter
    from stemstream.sources.simulator import DetectorSimulator, SimulationConfig

    scan_shape = (16, 20)
    sim = DetectorSimulator(SimulationConfig(scan_shape=scan_shape, dose=0.002, seed=3))
    counter = ElectronCounter(28.0, 2000.0)
    path = tmp_path / "sim.h5"
    with SparseCountsWriter(path, scan_shape) as w:
        for batch in sim.batches(64):
            counted = counter.count(batch.frames)
            w.write_flat(batch.positions, counted.events, counted.offsets)
    analyses = [VirtualDetectors(FRAME), CenterOfMass(FRAME, crop_to=80, crop_center=(288, 288))]
    res = analyze_counted_file(path, analyses, write=False, png=False).results
    everywhere = np.arange(scan_shape[0] * scan_shape[1])
    thickness = sim.specimen.grain_map(everywhere)[0].reshape(scan_shape)
    shift = sim.specimen.beam_shift(everywhere)
    true_phase = dpc_phase(shift[:, 0].reshape(scan_shape), shift[:, 1].reshape(scan_shape))

    def corr(a, b):
        return np.corrcoef(a.ravel(), b.ravel())[0, 1]

    assert corr(res["virtual_detectors"]["bright_field"], thickness) < -0.8
    assert corr(res["virtual_detectors"]["annular_dark_field"], thickness) > 0.8
    assert corr(res["center_of_mass"]["dpc_phase"], true_phase) > 0.8


def test_warm_up_runs_every_step():
    from stemstream.analysis import warm_up

    warm_up(all_analyses())
    warm_up(default_analyses((16, 16)))
