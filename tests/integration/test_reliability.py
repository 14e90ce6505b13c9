"""Faults and bad input beyond the data path's messages (those are in test_fuzz.py): malformed
raw files and configs get one clear sentence; an unwritable or full output directory fails before
data is accepted, or fails the scan cleanly (no half-written file at the final path) while the
writer goes on; many scans in one session lose nothing and do not grow any role's memory."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from pipeline_support import InProcessControl, test_config
from stemstream.analysis import ScanAnalyses
from stemstream.core.config import ConfigError, config_from_dict, load_config
from stemstream.deploy.settings import check_analyses
from stemstream.formats import wire
from stemstream.formats.raw import N_MODULES
from stemstream.formats.sparse_h5 import read_counted
from stemstream.pipeline.writer import role as writer_module
from stemstream.pipeline.control.service import Control
from stemstream.pipeline.writer.role import OutputDirError, Writer
from stemstream.sources.simulator import SimulationConfig, simulate_to_directory


def stemstream(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stemstream", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- malformed raw files ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_scan(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    simulate_to_directory(raw, SimulationConfig(scan_shape=(4, 4), seed=3))
    return raw


def test_garbage_in_a_correctly_named_raw_file_is_rejected_per_record_and_the_rest_counted(raw_scan, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in raw_scan.glob("*.data"):
        data = f.read_bytes()
        (raw / f.name).write_bytes(np.random.default_rng(1).bytes(len(data)) if "module2" in f.name else data)
    out = tmp_path / "counted.h5"
    result = stemstream("count", raw, "-o", out, "--background-threshold", "28", "--xray-threshold", "1000")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "rejected record" in result.stderr
    ledger = read_counted(out).metadata["stemstream"]["ledger"]
    assert list(ledger["sectors_rejected"]) == [0, 0, 16, 0] and list(ledger["sectors_received"]) == [16, 16, 0, 16]
    assert ledger["frames_incomplete"] == 16 and ledger["frames_complete"] == 0


def test_raw_files_of_nothing_but_garbage_end_with_one_clear_sentence(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "data_scan0000000001_module0_dst0_file0.data").write_bytes(np.random.default_rng(2).bytes(3 * 165_904 + 77))
    result = stemstream("count", raw, "-o", tmp_path / "c.h5", "--background-threshold", "28", "--xray-threshold", "1000")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # the rejected records' log lines name files and offsets; the error itself is one line
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "every sector record in the raw files given was rejected" in errors[0]


@pytest.mark.parametrize("name, fragment", [
    ("data_scan0000000001_module7_dst0_file0.data", "module 7 in the file name is outside 0..3"),
    ("scan1.data", "file name carries no module number"),
])
def test_raw_file_with_a_wrong_name_is_one_clear_sentence(raw_scan, tmp_path, name, fragment):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / name).write_bytes(next(raw_scan.glob("*module1*.data")).read_bytes())
    assert fragment in one_line_error(stemstream("count", raw, "-o", tmp_path / "c.h5"))


# -- malformed configs -----------------------------------------------------------------------------


@pytest.mark.parametrize("data, fragment", [
    ({"network": {"control_port": "5550"}}, "[network] control_port must be an integer"),
    ({"network": {"host": 127}}, "[network] host must be a string"),
    ({"network": {"node_hosts": "10.0.0.1"}}, "[network] node_hosts must be a list of strings"),
    ({"network": []}, "[network] must be a table of settings"),
    ({"pipeline": {"block_frames": 3.5}}, "[pipeline] block_frames must be an integer"),
    ({"pipeline": {"output_dir": ["a"]}}, "[pipeline] output_dir must be a string"),
    ({"counting": {"sigma": "four"}}, "[counting] sigma must be a number"),
    ({"counting": {"workers": True}}, "[counting] workers must be an integer"),
    ({"flow": {"heartbeat_s": "0.5"}}, "[flow] heartbeat_s must be a number"),
    ({"flow": {"send_hwm": 0}}, "[flow] send_hwm must be at least 1"),
    ({"security": {"curve": 1}}, "[security] curve must be true or false"),
    ({"security": {"keys_dir": 5}}, "[security] keys_dir must be a string"),
    ({"analysis": "everything"}, "[analysis] must be a table of settings"),
    ({"analysis": {"no_such_analysis": {}}}, "[analysis]"),
])
def test_a_config_with_a_wrong_type_in_any_section_is_one_sentence_naming_it(data, fragment):
    with pytest.raises(ConfigError) as info:
        check_analyses(config_from_dict(data))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_config_file_of_garbage_is_one_sentence(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)
    assert "not valid TOML" in one_line_error(stemstream("control", "--config", bad))


# -- unwritable or full output directory -------------------------------------------------------------


@contextlib.contextmanager
def writer_in_process(tmp_path, output_dir: Path | None = None):
    """A writer and control in this process (no role loop): messages go to writer.handle()."""
    config = test_config(tmp_path, nodes=1)
    if output_dir is not None:
        config.pipeline.output_dir = str(output_dir)
    control = Control(config)
    writer = Writer(config)
    writer.control = InProcessControl(control)
    try:
        yield writer, control
    finally:
        writer.events_in.close(0)
        control.socket.close(0)


def events_message(scan: int, frames: range) -> list:
    rng = np.random.default_rng(frames.start)
    events = [np.sort(rng.choice(576 * 576, 5, replace=False)).astype(np.uint32) for _ in frames]
    offsets = np.zeros(len(events) + 1, np.int64)
    np.cumsum([len(e) for e in events], out=offsets[1:])
    return wire.encode_events(scan, 0, np.array(frames, np.uint32), np.array(frames, np.int64),
                              np.full(len(events), 0b1111, np.uint8), offsets, np.concatenate(events))


def commit(writer: Writer, scan: int, frames: range) -> None:
    """Events of ``frames`` and the ANALYSIS message after them, which makes the writer commit
    (write) them."""
    writer.handle(events_message(scan, frames))
    partials = ScanAnalyses(writer.analyses, (4, 4)).take_partials()
    writer.handle(wire.encode_analysis(scan, 0, partials))


def done_message(scan: int) -> list:
    ledger = {"sectors_received": [16] * N_MODULES, "sectors_missing": [0] * N_MODULES,
              "sectors_duplicate": [0] * N_MODULES, "sectors_rejected": [0] * N_MODULES}
    return wire.encode_done(scan, 0, ledger, [0] * N_MODULES)


def start_scan(control: Control, number: int) -> dict:
    reply = control.handle({"op": "start_scan", "scan_number": number, "scan_shape": [4, 4], "nodes": [0]})
    assert reply["ok"]
    return reply["scan"]


@pytest.mark.parametrize("where", ["under a file", "a file"])
def test_writer_refuses_to_start_when_the_output_directory_cannot_take_files(tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory is expected")
    output = blocker / "out" if where == "under a file" else blocker
    config = test_config(tmp_path)
    config.pipeline.output_dir = str(output)
    with pytest.raises(OutputDirError, match=f"the output directory {output} is not writable"):
        Writer(config)
    line = one_line_error(stemstream("writer", "--config", config.write(tmp_path / "pipeline.toml")))
    assert f"the output directory {output} is not writable" in line


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str, read_only: bool = False):
    """A small tmpfs at ``path`` (needs root and mount rights); skips the test without them."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, f"stemstream-{uuid.uuid4().hex[:8]}", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_writer_refuses_a_read_only_output_directory_even_as_root(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "1m", read_only=True) as output:
        assert output.stat().st_mode & 0o200  # the permission bits say yes (and root may write anyway)...
        config = test_config(tmp_path)
        config.pipeline.output_dir = str(output)
        with pytest.raises(OutputDirError, match="Read-only file system"):  # ...the file system says no
            Writer(config)


def test_no_space_while_writing_fails_the_scan_cleanly_and_the_writer_goes_on(tmp_path):
    with writer_in_process(tmp_path) as (writer, control):
        start_scan(control, 1)
        commit(writer, 1, range(0, 8))
        scan = writer.scans[1]
        final, partial = scan.path, scan.out.tmp_path
        assert partial.exists() and not final.exists()

        def disk_full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        scan.out.write_flat = scan.out.write = disk_full
        commit(writer, 1, range(8, 16))
        # the scan failed: nothing at the final path, the partial file gone, control told why
        assert not final.exists() and not partial.exists() and 1 not in writer.scans
        state = control.scans[1]
        assert state.state == "failed" and "No space left on device" in state.summary["error"]
        assert str(final) in state.summary["error"] and state.summary["frames_written"] == 8
        # the rest of that scan is dropped and counted, not rejected as malformed
        commit(writer, 1, range(8, 12))
        writer.handle(done_message(1))
        assert writer.counters["messages_of_failed_scans"] == 3 and not writer.rejected  # events, analysis, done
        assert writer.counters["scans_failed"] == 1
        # and the next scan is written as usual
        start_scan(control, 2)
        commit(writer, 2, range(0, 16))
        writer.handle(done_message(2))
        assert writer.scans[2].should_close()
        writer._close(writer.scans[2])
        assert control.scans[2].state == "closed"
        assert read_counted(control.scans[2].summary["path"]).metadata["stemstream"]["ledger"]["frames_complete"] == 16


def test_too_little_free_space_fails_the_scan_before_any_data_is_accepted(tmp_path, monkeypatch):
    with writer_in_process(tmp_path) as (writer, control):
        monkeypatch.setattr(writer_module, "RESERVE_BYTES", 1 << 62)  # more than any disk has
        start_scan(control, 1)
        commit(writer, 1, range(0, 8))
        state = control.scans[1]
        assert state.state == "failed" and "MB free in" in state.summary["error"]
        assert state.summary["frames_written"] == 0
        assert not list(Path(writer.config.pipeline.output_dir).iterdir())
        assert writer.counters["messages_of_failed_scans"] == 2 and not writer.rejected  # events, analysis


def test_a_scan_too_large_for_the_writers_memory_fails_in_one_sentence_and_the_writer_goes_on(tmp_path):
    """65535 x 65535 positions (the largest shape control accepts) would need ~0.8 TB of
    per-position results in the writer: the scan fails before any data is written, saying how
    much it needs, instead of the writer dying of a MemoryError; the next scan is written."""
    with writer_in_process(tmp_path) as (writer, control):
        reply = control.handle({"op": "start_scan", "scan_number": 1, "scan_shape": [65535, 65535], "nodes": [0]})
        assert reply["ok"], reply
        commit(writer, 1, range(0, 8))
        state = control.scans[1]
        assert state.state == "failed", state.state
        error = state.summary["error"]
        assert "a scan of 65535 x 65535 positions needs ~" in error and "GB of memory in the writer" in error, error
        assert not list(Path(writer.config.pipeline.output_dir).iterdir())
        start_scan(control, 2)
        commit(writer, 2, range(0, 16))
        writer.handle(done_message(2))
        assert writer.scans[2].should_close()
        writer._close(writer.scans[2])
        assert control.scans[2].state == "closed", control.scans[2].state


@pytest.mark.slow
def test_stemstream_run_onto_a_nearly_full_disk_says_so_and_leaves_no_file(tmp_path):
    with mounted_tmpfs(tmp_path / "small", "8m") as output:
        result = stemstream("run", "--simulate", "4x4", "-o", output, "--background-threshold", "28",
                            "--xray-threshold", "1000", "--no-dashboard", cwd=tmp_path)
        assert result.returncode == 1, result.stdout + result.stderr
        text = " ".join(result.stdout.replace("│", " ").split())  # the summary panel, unwrapped
        assert "scan 1 failed: cannot write" in text and "MB free in" in text and "needs at least" in text
        assert not list(output.glob("*.h5")) and not list(output.glob("*.partial"))
    # A failed run keeps its logs and names them (the folder is the test's to remove).
    kept = re.search(r"logs: (\S+)", result.stdout)
    assert kept and Path(kept.group(1)).is_dir(), result.stdout
    shutil.rmtree(Path(kept.group(1)).parent)


# -- soak ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_six_scans_in_one_session_lose_no_frame_and_no_role_grows(tmp_path):
    """benchmarks/bench_soak.py, briefly (the full run is 20 scans of 64x64, docs/reliability.md).
    After 2 warm-up scans, the highest RSS at rest of each role over scans 5-6 may be at most
    64 MiB above the highest over scans 3-4: more than the ~60 MiB a node group's RSS swings while
    a finished scan's buffers await collection, less than holding one block of all 4 modules
    (21 MB) per scan would add over those scans (see the script's docstring)."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_soak.py"
    out = tmp_path / "soak.json"
    result = subprocess.run([sys.executable, str(script), "--scans", "6", "--shape", "16x16", "--warmup", "2",
                             "--bound-mib", "64", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    assert [s["state"] for s in data["scans"]] == ["closed"] * 6
    assert all(s["complete"] and s["frames_lost"] == 0 and s["frames_complete"] == 256 for s in data["scans"])
    assert set(data["verdict"]) >= {"control-0", "gateway-0", "node-0", "node-1", "writer-0", "producer-0"}
    for role, v in data["verdict"].items():
        assert v["flat"] and v["rise_mib"] < 64, (role, v)
