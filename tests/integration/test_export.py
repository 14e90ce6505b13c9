"""``stemstream export``: LiberTEM raw_csr, py4DSTEM EMD 1.0 (read back with emdfile) and HyperSpy
.hspy files hold exactly the counted file's electrons at the chosen binning and crop; bad input
gets one line and leaves nothing behind. The round trips through LiberTEM, py4DSTEM and HyperSpy
themselves are in tests/interop (their own environment)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import stemstream
from stemstream.core.detector import FRAME_SHAPE
from stemstream.formats import exports
from stemstream.formats.sparse_h5 import SparseCountsWriter

stempy_io = pytest.importorskip("stempy.io")


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stemstream", *map(str, args)], capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def counted(tmp_path_factory) -> Path:
    """A stempy-written file: 6 x 5 scan, 2 frames per position, 32 x 32 detector."""
    rng = np.random.default_rng(14)
    frames = np.empty((30, 2), dtype=object)
    for i in range(30):
        for j in range(2):
            n = 0 if i == 7 else 5 + (3 * i + j) % 40
            frames[i, j] = np.sort(rng.choice(1024, size=n, replace=False)).astype(np.uint32)
    path = tmp_path_factory.mktemp("counted") / "scan.h5"
    sa = stempy_io.SparseArray(data=frames, scan_shape=(6, 5), frame_shape=(32, 32), metadata={})
    stempy_io.save_electron_counts(str(path), sa)
    return path


def expected(path: Path, factor: int, rows=slice(None), cols=slice(None)) -> np.ndarray:
    dense = np.asarray(stempy_io.load_electron_counts(str(path)).to_dense()).astype(np.int64)[rows, cols]
    r, c, dr, dc = dense.shape
    return dense.reshape(r, c, dr // factor, factor, dc // factor, factor).sum(axis=(3, 5))


def test_libertem_raw_csr_is_the_sparse_scan(counted, tmp_path):
    import scipy.sparse

    out = tmp_path / "scan.toml"
    result = run_cli("export", counted, "--to", "libertem", "--bin", "2", "--crop", "1:5,2:", "-o", out)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert 'filetype = "raw_csr"' in text and "nav_shape = [4, 3]" in text and "sig_shape = [16, 16]" in text
    indptr = np.fromfile(tmp_path / "scan_indptr.raw", dtype="<i8")
    indices = np.fromfile(tmp_path / "scan_indices.raw", dtype="<i4")
    values = np.fromfile(tmp_path / "scan_values.raw", dtype=stemstream.open(counted, 2).dtype)
    matrix = scipy.sparse.csr_matrix((values, indices, indptr), shape=(12, 256))
    assert matrix.has_canonical_format  # sorted, unique pixels per position: any CSR reader takes it
    np.testing.assert_array_equal(matrix.toarray(), expected(counted, 2, slice(1, 5), slice(2, None)).reshape(12, 256))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.toml", "scan_indices.raw", "scan_indptr.raw", "scan_values.raw"]


def test_py4dstem_emd_datacube_read_back_with_emdfile(counted, tmp_path):
    emdfile = pytest.importorskip("emdfile")
    out = tmp_path / "cube.h5"
    result = run_cli("export", counted, "--to", "py4dstem", "--bin", "4", "-o", out)
    assert result.returncode == 0, result.stderr
    assert emdfile._is_EMD_file(str(out))
    with h5py.File(out) as f:
        assert (f.attrs["version_major"], f.attrs["version_minor"]) == (1, 0)
        group = f[f"{out.stem}/datacube"]
        assert group.attrs["python_class"] == "DataCube"  # what py4DSTEM reads as its DataCube
        cube = emdfile.Array.from_h5(group)  # emdfile's own reader of the array (py4DSTEM's base)
        facts = emdfile.Metadata.from_h5(f[f"{out.stem}/metadatabundle/stemstream"])
    np.testing.assert_array_equal(cube.data, expected(counted, 4))
    assert list(cube.dim_names) == ["Rx", "Ry", "Qx", "Qy"]
    assert (facts["frames_per_position"], facts["bin_factor"]) == (2, 4)


def test_hyperspy_hspy_signal_with_axes(counted, tmp_path):
    pytest.importorskip("rsciio")
    out = tmp_path / "cube.hspy"
    result = run_cli("export", counted, "--to", "hyperspy", "--bin", "2", "-o", out)
    assert result.returncode == 0, result.stderr
    with h5py.File(out) as f:
        assert f.attrs["file_format"] == "HyperSpy"
        group = f["Experiments/cube"]
        np.testing.assert_array_equal(group["data"][()], expected(counted, 2))
        names = [group[f"axis-{i}"].attrs["name"] for i in range(4)]
        navigate = [bool(group[f"axis-{i}"].attrs["navigate"]) for i in range(4)]
        assert names == ["scan_y", "scan_x", "ky", "kx"] and navigate == [True, True, False, False]
        assert group["axis-2"].attrs["scale"] == 2.0  # detector axes in unbinned pixels


def test_api_export_reports_progress_and_refuses_big_dense(counted, tmp_path):
    seen = []
    scan = stemstream.open(counted)
    exports.export(scan, "py4dstem", tmp_path / "a.h5", progress=seen.append)
    assert seen[-1] == 30
    with pytest.raises(exports.ExportError, match=r"over the .* limit: use --bin 2"):
        exports.export(scan, "hyperspy", tmp_path / "b.hspy", limit=30 * 1024 - 1)
    exports.export(scan, "hyperspy", tmp_path / "b.hspy", limit=30 * 1024 - 1, force=True)
    assert (tmp_path / "b.hspy").exists()


def test_cli_refuses_a_dense_export_over_the_limit(tmp_path):
    path = tmp_path / "big.h5"
    with SparseCountsWriter(path, (256, 256), FRAME_SHAPE) as writer:  # 21 GB dense, a few kB counted
        writer.write(np.array([0]), [np.array([5], dtype=np.uint32)])
    out = tmp_path / "big_emd.h5"
    result = run_cli("export", path, "--to", "py4dstem", "-o", out)
    assert_one_line_error(result, "21.7 GB", "--bin 2", "--force")
    assert not out.exists()


def test_bad_inputs_get_one_line_and_leave_nothing(counted, tmp_path):
    raw = tmp_path / "module0.data"
    raw.write_bytes(bytes(range(256)) * 64)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(counted.read_bytes()[: counted.stat().st_size // 2])
    no_events = tmp_path / "no_events.h5"
    with h5py.File(no_events, "w") as f:
        f.attrs["version"] = 3
        f.create_group("metadata")
    out = tmp_path / "out" / "x.h5"
    out.parent.mkdir()
    cases = [
        ((raw, "--to", "py4dstem"), "cannot be opened as HDF5"),
        ((truncated, "--to", "libertem"), "truncated.h5"),
        ((no_events, "--to", "hyperspy"), "no /electron_events"),
        ((counted, "--to", "py4dstem", "--bin", "7"), "binning must be one of 1, 2, 4, 8"),
        ((counted, "--to", "py4dstem", "--crop", "9:12,0:2"), "is empty"),
        ((counted, "--to", "matlab"), "--to must be one of"),
    ]
    for args, fragment in cases:
        suffix = ".toml" if "libertem" in args else ".hspy" if "hyperspy" in args else ".h5"
        assert_one_line_error(run_cli("export", *args, "-o", out.with_suffix(suffix)), fragment)
    assert_one_line_error(run_cli("export", counted, "--to", "py4dstem", "-o", tmp_path / "missing" / "x.h5"), "not writable")
    assert list(out.parent.iterdir()) == []


def test_unwritable_output_and_failed_write_leave_no_half_file(counted, tmp_path, monkeypatch):
    # a path under a regular file is unwritable even for root (CI runs as root)
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("a file, not a folder")
    assert_one_line_error(run_cli("export", counted, "--to", "libertem", "-o", not_a_folder / "x.toml"), "not writable")

    def fail_after_first_block(block, *args):
        raise OSError(28, "No space left on device")

    scan = stemstream.open(counted)
    monkeypatch.setattr(type(scan), "dense_block", fail_after_first_block)
    with pytest.raises(OSError, match="No space"):
        exports.export(scan, "py4dstem", tmp_path / "cube.h5")
    with pytest.raises(OSError, match="No space"):
        exports.export(scan, "libertem", tmp_path / "scan.toml", progress=lambda done: fail_after_first_block(None))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
