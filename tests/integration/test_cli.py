"""The command line as a user meets it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import os
import shutil
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stemstream.formats.sparse_h5 import read_counted


def stemstream(*args, cwd=None, timeout=300, tmpdir=None) -> subprocess.CompletedProcess:
    """``stemstream ARGS``; with ``tmpdir``, its temporary files (a run's logs) go there."""
    env = {**os.environ, "TMPDIR": str(tmpdir)} if tmpdir is not None else None
    return subprocess.run([sys.executable, "-m", "stemstream", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    result = stemstream("simulate", raw, "--scan-shape", "6x5", "--seed", "2", "--frames-per-position", "2")
    assert result.returncode == 0, result.stderr
    return raw


def test_simulate_writes_module_and_status_files(simulated):
    assert len(list(simulated.glob("data_scan0000000001_module*_dst0_file0.data"))) == 4
    assert len(list(simulated.glob("4dstem_rec_status_*_scan_1.json"))) == 4


def test_count_writes_a_file_stempy_reads_and_prints_the_summary(simulated, tmp_path):
    out = tmp_path / "counted.h5"
    result = stemstream("count", simulated, "-o", out)
    assert result.returncode == 0, result.stderr
    assert "every frame accounted for" in result.stdout and "calibrated" in result.stdout
    stempy_io = pytest.importorskip("stempy.io")
    array = stempy_io.load_electron_counts(str(out))
    ours = read_counted(out)
    assert array.scan_shape == (6, 5) and ours.frames_per_position == 2
    for a, b in zip(array.data.ravel(), ours.frames.ravel()):
        assert np.array_equal(np.sort(a), b)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["count", "/nonexistent/dir", "-o", "x.h5"], ["/nonexistent/dir", "no such file"]),
        (["count", "RAW", "-o", "x.h5", "--background-threshold", "30"], ["both"]),
        (["count", "RAW", "-o", "x.h5", "--background-threshold", "900", "--xray-threshold", "30"], ["X-ray"]),
        (["count", "RAW", "-o", "x.h5", "--dark", "missing.npy"], ["missing.npy", "does not exist"]),
        (["count", "RAW", "-o", "/nonexistent/out.h5"], ["does not exist"]),
        (["simulate", "OUT", "--scan-shape", "64by64"], ["ROWSxCOLS"]),
        (["simulate", "OUT", "--dose", "-1"], ["dose"]),
        (["run", "--simulate", "8x8", "--config", "BADCONFIG"], ["unknown setting", "nodez"]),
        (["run"], ["--simulate", "--replay"]),
        (["gateway", "--index", "1"], ["--index 1 must be 0 to 0", "gateway_hosts names 1 gateway"]),
        (["gateway", "--index", "2", "--config", "TWOGATEWAYS"], ["--index 2 must be 0 to 1"]),
    ],
)
def test_bad_input_gets_one_clear_line_and_exit_code_2(simulated, tmp_path, args, fragments):
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[pipeline]\nnodez = 3\n")
    two_gateways = tmp_path / "two.toml"
    two_gateways.write_text('[network]\ngateway_hosts = ["127.0.0.1", "127.0.0.1"]\n')
    named = {"RAW": simulated, "OUT": tmp_path / "o", "BADCONFIG": bad_config, "TWOGATEWAYS": two_gateways}
    args = [str(named.get(a, a)) for a in args]
    assert_one_line_error(stemstream(*args, cwd=tmp_path), *fragments)


def test_truncated_raw_file_is_reported_and_the_rest_counted(simulated, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in simulated.glob("*.data"):
        data = f.read_bytes()
        (raw / f.name).write_bytes(data[:-1000] if "module3" in f.name else data)
    out = tmp_path / "counted.h5"
    result = stemstream("count", raw, "-o", out, "--background-threshold", "28", "--xray-threshold", "1000")
    assert result.returncode == 0, result.stderr
    assert "truncated_record" in result.stderr and "byte offset" in result.stderr
    ledger = read_counted(out).metadata["stemstream"]["ledger"]
    assert ledger["frames_incomplete"] == 1 and ledger["frames_complete"] == 59


@pytest.mark.slow
def test_run_streams_simulated_scans_and_exits_zero_when_complete(tmp_path):
    result = stemstream("run", "--simulate", "6x6", "--scans", "2", "-o", tmp_path / "out",
                        "--background-threshold", "28", "--xray-threshold", "1000", cwd=tmp_path, tmpdir=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    files = sorted((tmp_path / "out").glob("FOURD_*.h5"))
    assert [f.name[-8:] for f in files] == ["00001.h5", "00002.h5"]
    assert result.stdout.count("every frame accounted for") == 2
    assert not list(tmp_path.glob("stemstream-run-*")), "a successful run removes its logs"
    assert "logs:" not in result.stdout


@pytest.mark.slow
def test_demo_writes_its_file_in_the_current_directory(tmp_path):
    # without a terminal: full speed, no prompt at the end
    result = stemstream("demo", "--scan-shape", "8x8", "--keep-logs", cwd=tmp_path, tmpdir=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "press Enter" not in result.stdout
    logs = re.search(r"logs: (\S+)", result.stdout)
    assert logs and (Path(logs.group(1)) / "writer.log").exists(), result.stdout
    assert not list(tmp_path.glob("stemstream-run-*/sockets"))
    files = list(tmp_path.glob("FOURD_*.h5"))
    assert len(files) == 1
    assert read_counted(files[0]).scan_shape == (8, 8)
    assert "every frame accounted for" in result.stdout and "calibrated" in result.stdout


def test_replay_resumes_the_scans_incomplete_file_under_its_whole_name(simulated, tmp_path):
    from stemstream.deploy.session import replay_target
    from stemstream.formats.sparse_h5 import SparseCountsWriter

    name = "FOURD_261204_0551_00003_00001"
    SparseCountsWriter(tmp_path / f"{name}.h5", (6, 5), frames_per_position=2).close(tmp_path / f"{name}.incomplete.h5")
    target = replay_target(simulated, tmp_path)
    assert target.file == tmp_path / f"{name}.incomplete.h5"
    assert target.file_name == f"{name}.h5"  # the writer finds the incomplete file by it
    assert target.scan.shape == (6, 5) and target.scan.frames_per_position == 2


def test_replay_beside_a_dead_writers_journal_is_refused_until_it_is_recovered(simulated, tmp_path):
    """The replay's writer (a new epoch of the scan) would delete the journal as stale, and with it
    every block the dead writer had committed and no file holds."""
    journal = tmp_path / "FOURD_261204_0551_00001_00001.h5.journal"
    journal.write_bytes(b"committed blocks")
    spill = tmp_path / "spill"
    shutil.copytree(simulated, spill)
    result = stemstream("replay", spill, "-o", tmp_path, cwd=tmp_path, tmpdir=tmp_path)
    assert_one_line_error(result, journal.name, "stemstream recover", "first")
    assert journal.read_bytes() == b"committed blocks"
    assert spill.exists() and not list(tmp_path.glob("FOURD_*.h5"))


def test_replay_into_a_file_that_holds_every_frame_is_refused_and_changes_nothing(simulated, tmp_path):
    from stemstream.formats.sparse_h5 import SparseCountsWriter

    name = "FOURD_261204_0551_00001_00001.h5"
    writer = SparseCountsWriter(tmp_path / name, (6, 5), frames_per_position=2)
    writer.set_metadata("stemstream", {"ledger": {"frames_expected": 60, "frames_complete": 60}})
    writer.close()
    before = (tmp_path / name).read_bytes()
    spill = tmp_path / "spill"
    shutil.copytree(simulated, spill)
    result = stemstream("replay", spill, "-o", tmp_path, cwd=tmp_path, tmpdir=tmp_path)
    assert_one_line_error(result, name, "already holds every frame of scan 1", "nothing to replay")
    assert (tmp_path / name).read_bytes() == before
    assert spill.exists() and sorted(p.name for p in spill.iterdir()) == sorted(p.name for p in simulated.iterdir())
