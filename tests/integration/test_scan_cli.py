"""``stemstream scan`` against a pipeline already running (here: the local launcher on loopback),
also after one of its node groups died, and without the pipeline's session token."""

from __future__ import annotations

import copy
import subprocess
import sys
import threading

import pytest

from pipeline_support import test_config, wait_for
from stemstream.deploy.local import LocalPipeline, ProducerSource
from stemstream.deploy.scan import required_roles, roles_a_scan_waits_for
from stemstream.pipeline.control.service import Control
from stemstream.transport.control_client import ControlClient
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


def status_of(roles: dict[str, float]) -> dict:
    """Control's status with these roles' heartbeat ages (seconds)."""
    return {"roles": {key: {"age_s": age} for key, age in roles.items()}}


def test_a_scan_waits_for_the_node_groups_starting_never_for_one_that_died(tmp_path):
    config = test_config(tmp_path, nodes=3)
    others = {"writer-0": 0.1, "gateway-0": 0.1, **{f"producer-{m}": 0.1 for m in range(4)}}
    dead = config.flow.silent_after_s + 1
    # node-2 not heard of yet: worth waiting for; node-1 silent: never
    assert roles_a_scan_waits_for(status_of({**others, "node-0": 0.1, "node-1": dead}), config) == (set(), {"node-2"})
    assert roles_a_scan_waits_for(status_of({**others, "node-0": 0.1, "node-1": dead, "node-2": dead}),
                                  config) == (set(), set())
    # no node group alive, or another role missing: the scan cannot start
    assert roles_a_scan_waits_for(status_of({**others, "node-0": dead}), config)[0] == {"node-0", "node-1", "node-2"}
    assert roles_a_scan_waits_for(status_of({"writer-0": 0.1, "node-0": 0.1}), config)[0] == {
        "gateway-0", *(f"producer-{m}" for m in range(4))}


@pytest.mark.slow
def test_a_scan_after_a_node_group_died_runs_on_the_node_groups_alive(tmp_path):
    config = test_config(tmp_path)  # two node groups
    with LocalPipeline(config, tmp_path / "work", ProducerSource(seed=7)) as pipeline:
        pipeline.start()
        pipeline.kill("node-1")
        silent = max(config.flow.silent_after_s, config.flow.dead_after_s)
        wait_for(lambda: pipeline.status()["roles"]["node-1"]["age_s"] > silent + 0.5, 30, "node-1 silent")
        result = scan_command("--config", str(pipeline.config_path), "--shape", "6x5", "--scan-number", "4",
                              "--wait-roles", "20")
        status = pipeline.status()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "not answering: node-1" in result.stdout and "every frame accounted for" in result.stdout
    closed = status["scans"]["4"]
    assert closed["state"] == "closed" and closed["spec"]["nodes"] == [0]
    assert closed["summary"]["ledger"]["frames_complete"] == 30


def test_a_scan_without_the_session_token_is_refused_in_one_line(tmp_path):
    config = test_config(tmp_path)
    control = Control(config)
    serving = threading.Thread(target=control.serve, kwargs={"stop_after_shutdown_s": 0.1}, daemon=True)
    serving.start()
    stop = threading.Event()

    def roles_check_in():  # every role of the config, as if they ran
        client = ControlClient.for_config(config, timeout_s=5.0)
        while not stop.is_set():
            for key in required_roles(config):
                name, ident = key.rsplit("-", 1)
                assert client.request("heartbeat", role=name, id=int(ident), stats={})["ok"]
            stop.wait(0.3)
        client.request("shutdown")
        client.close()

    beating = threading.Thread(target=roles_check_in, daemon=True)
    beating.start()
    elsewhere = copy.deepcopy(config)
    elsewhere.security.token_file = str(tmp_path / "elsewhere.token")  # not where control wrote it
    try:
        result = scan_command("--config", str(elsewhere.write(tmp_path / "pipeline.toml")), "--shape", "4x4",
                              "--wait-roles", "20")
    finally:
        stop.set()
        beating.join(10)
        serving.join(10)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "control refused scan 1" in lines[0] and "session token" in lines[0], result.stderr
    assert "elsewhere.token holds no token" in lines[0] and not control.scans
