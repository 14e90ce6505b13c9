"""``stemstream scan`` against a pipeline already running (here: the local launcher on loopback)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline_support import test_config
from stemstream.deploy.local import LocalPipeline, ProducerSource
from stemstream.formats.sparse_h5 import read_counted


def scan_command(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stemstream", "scan", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_unreachable_control_is_one_line_and_exit_2(tmp_path):
    config = test_config(tmp_path)  # free ports: nothing listens on control's
    path = config.write(tmp_path / "pipeline.toml")
    result = scan_command("--config", str(path), "--shape", "4x4", "--wait-roles", "1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "did not answer" in lines[0] and config.network.control() in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("args, message", [
    (["--shape", "4by4"], "--shape must look like ROWSxCOLS"),
    (["--shape", "4x4", "--frames-per-position", "0"], "--frames-per-position must be at least 1"),
    (["--shape", "4x4", "--timeout", "-1"], "--timeout must be a positive number"),
])
def test_bad_options_are_one_line(tmp_path, args, message):
    path = test_config(tmp_path).write(tmp_path / "pipeline.toml")
    result = scan_command("--config", str(path), *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and message in result.stderr


@pytest.mark.slow
def test_scan_on_a_running_pipeline_writes_a_complete_file(tmp_path):
    config = test_config(tmp_path)
    with LocalPipeline(config, tmp_path / "work", ProducerSource(seed=7)) as pipeline:
        pipeline.start()
        result = scan_command("--config", str(pipeline.config_path), "--shape", "6x5", "--scan-number", "3",
                              "--frames-per-position", "2")
        status = pipeline.status()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stemstream scan" in result.stdout and "every frame accounted for" in result.stdout
    closed = status["scans"]["3"]
    assert closed["state"] == "closed"
    counted = read_counted(closed["summary"]["path"])
    assert counted.scan_shape == (6, 5) and counted.frames_per_position == 2
    ledger = counted.metadata["stemstream"]["ledger"]
    assert ledger["frames_complete"] == ledger["frames_expected"] == 60
