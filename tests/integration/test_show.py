"""``stemstream show`` and ``stemstream analyze``: real subprocesses on real counted files."""

from __future__ import annotations

import struct
import subprocess
import sys

import h5py
import pytest

from test_web import make_counted_file


def _stemstream(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "stemstream", *args], capture_output=True, text=True, timeout=timeout)


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_show_renders_the_stored_images_the_overview_and_the_ledger(tmp_path):
    path = make_counted_file(tmp_path / "FOURD_250101_1200_00001_00003.h5", scan_number=3)
    out = tmp_path / "figures"
    r = _stemstream("show", str(path), "-o", str(out))
    assert r.returncode == 0, r.stderr
    pngs = sorted(out.glob("*.png"))
    names = {p.name for p in pngs}
    stem = path.stem
    for name in ("virtual_detectors_bright_field", "virtual_detectors_annular_dark_field", "center_of_mass_dpc_phase",
                 "summed_pattern_pattern", "overview", "ledger"):
        assert f"{stem}_{name}.png" in names
    for p in pngs:  # every file it wrote is a PNG and is named in the output
        assert str(p) in r.stdout.replace("\n", "")
        width, height = _png_size(p)
        assert max(width, height) >= 256  # small scans are enlarged
    assert "computed" not in r.stdout  # the file had /analysis


def test_show_computes_images_of_a_file_without_analysis_and_leaves_the_file_alone(tmp_path):
    path = make_counted_file(tmp_path / "FOURD_250101_1200_00001_00005.h5", scan_number=5, analyse=False)
    before = path.read_bytes()
    r = _stemstream("show", str(path))
    assert r.returncode == 0, r.stderr
    assert "holds no /analysis results: computed them now" in r.stdout
    assert (tmp_path / f"{path.stem}_virtual_detectors_bright_field.png").exists()  # beside the file by default
    assert (tmp_path / f"{path.stem}_ledger.png").exists()
    assert path.read_bytes() == before


def test_analyze_stores_results_in_the_file_and_writes_pngs(tmp_path):
    path = make_counted_file(tmp_path / "FOURD_250101_1200_00001_00006.h5", scan_number=6, analyse=False)
    r = _stemstream("analyze", str(path), "-o", str(tmp_path / "png"))
    assert r.returncode == 0, r.stderr
    assert "analysed 30 frames" in r.stdout and "under /analysis" in r.stdout
    with h5py.File(path, "r") as f:
        assert "virtual_detectors" in f["analysis"] and "center_of_mass" in f["analysis"]
    assert len(list((tmp_path / "png").glob("*.png"))) >= 5


@pytest.mark.parametrize("command", ["show", "analyze"])
def test_bad_files_get_one_sentence_and_exit_code_2(tmp_path, command):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    for target in (junk, tmp_path / "missing.h5"):
        r = _stemstream(command, str(target))
        assert r.returncode == 2, r.stdout + r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr
