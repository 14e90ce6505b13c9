"""Round trips through the real analysis tools: LiberTEM, py4DSTEM and HyperSpy open what
``stemstream export`` wrote and compute exactly our summed pattern and virtual images.

These run in their own environment (``pip install '.[interop]'``: py4DSTEM 0.14.18 pins NumPy 1),
not in the main suite (pyproject's norecursedirs leaves this folder out): ``.ci/run`` makes that
environment and runs ``pytest tests/interop`` in it. The tools are imported outright, not skipped
when absent: in that environment a missing one is a failure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import stemstream
from stemstream.formats.exports import export
from stemstream.formats.sparse_h5 import SparseCountsWriter

import hyperspy.api as hs  # noqa: E402  (after the stemstream imports, as the tools' own order)
import libertem.api as lt  # noqa: E402
import py4DSTEM  # noqa: E402

SCAN_SHAPE = (7, 6)  # (rows, cols): not square, so a swapped axis shows
FRAME_SHAPE = (32, 32)


@pytest.fixture(scope="module")
def counted(tmp_path_factory) -> Path:
    """Our writer's file: 7 x 6 scan, 2 frames per position (pixels hit in both), some empty."""
    rng = np.random.default_rng(140)
    n_pix = FRAME_SHAPE[0] * FRAME_SHAPE[1]
    path = tmp_path_factory.mktemp("counted") / "scan.h5"
    n_positions = SCAN_SHAPE[0] * SCAN_SHAPE[1]
    events = []
    for slot in range(n_positions * 2):
        n = 0 if slot % 11 == 3 else int(rng.integers(5, 80))
        events.append(np.sort(rng.choice(n_pix, size=n, replace=False)).astype(np.uint32))
    with SparseCountsWriter(path, SCAN_SHAPE, FRAME_SHAPE, frames_per_position=2) as writer:
        writer.write(np.arange(n_positions * 2), events)
    return path


def ring(shape, inner, outer) -> np.ndarray:
    rows, cols = np.indices(shape)
    r = np.hypot(rows - shape[0] / 2, cols - shape[1] / 2)
    return ((r >= inner) & (r < outer)).astype(np.float64)


@pytest.mark.parametrize(("factor", "crop"), [(1, None), (2, (slice(1, 6), slice(2, 6)))])
def test_libertem_sum_and_virtual_detector_equal_ours(counted, tmp_path, factor, crop):
    from libertem.udf.masks import ApplyMasksUDF
    from libertem.udf.sum import SumUDF

    scan = stemstream.open(counted, factor)
    scan = scan.cropped(*crop) if crop else scan
    toml = tmp_path / "scan.toml"
    export(scan, "libertem", toml)
    mask = ring(scan.detector_shape, 3 / factor, 12 / factor)
    with lt.Context.make_with("inline") as ctx:
        ds = ctx.load("raw_csr", path=str(toml))
        assert tuple(ds.shape) == (*scan.scan_shape, *scan.detector_shape)
        summed = ctx.run_udf(ds, SumUDF())["intensity"].data
        virtual = ctx.run_udf(ds, ApplyMasksUDF(mask_factories=[lambda: mask]))["intensity"].data[..., 0]
        assert ctx.load("auto", path=str(toml)).shape == ds.shape  # LiberTEM recognises the descriptor itself
    np.testing.assert_array_equal(summed, scan.summed_pattern())
    np.testing.assert_array_equal(virtual, scan.virtual_image(mask))


def test_py4dstem_reads_a_datacube_whose_binned_sum_equals_ours(counted, tmp_path):
    scan = stemstream.open(counted)
    out = tmp_path / "cube.h5"
    export(scan, "py4dstem", out)
    cube = py4DSTEM.read(str(out))
    assert isinstance(cube, py4DSTEM.DataCube)
    assert cube.data.shape == (*SCAN_SHAPE, *FRAME_SHAPE)
    np.testing.assert_array_equal(cube.data, scan.region())
    cube.bin_Q(4)  # py4DSTEM's own binning of the detector
    np.testing.assert_array_equal(cube.data.sum(axis=(0, 1)), scan.binned(4).summed_pattern())

    binned_out = tmp_path / "cube_bin4.h5"
    export(scan.binned(4), "py4dstem", binned_out)
    np.testing.assert_array_equal(py4DSTEM.read(str(binned_out)).data, cube.data)


@pytest.mark.parametrize("suffix", [".hspy", ".zspy"])
def test_hyperspy_loads_lazily_and_its_navigation_sum_equals_ours(counted, tmp_path, suffix):
    scan = stemstream.open(counted, 2)
    out = tmp_path / f"cube{suffix}"
    export(scan, "hyperspy", out)
    signal = hs.load(str(out), lazy=True)
    assert signal._lazy and signal.axes_manager.signal_dimension == 2
    assert signal.axes_manager.navigation_shape == SCAN_SHAPE[::-1]  # HyperSpy lists (x, y)
    assert [a.name for a in signal.axes_manager.signal_axes] == ["kx", "ky"]
    summed = signal.sum(axis=signal.axes_manager.navigation_axes)
    summed.compute()
    np.testing.assert_array_equal(summed.data, scan.summed_pattern())
