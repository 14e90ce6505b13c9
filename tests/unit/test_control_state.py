"""Control's state file, in process: what a restarted control takes back, and what it refuses.

The restart of a real control process mid-scan is in tests/test_failover.py.
"""

from __future__ import annotations

import logging
import os
import time

import msgpack
import numpy as np

from pipeline_support import test_config
from stemstream.pipeline.control import scans as scans_module
from stemstream.pipeline.control.service import Control
from stemstream.pipeline.control.state import load_state


def _control(tmp_path, fixed: bool = True) -> Control:
    """An in-process control (its socket bound, not served; requests go to handle()) with the
    state file tmp_path/control.state. Fresh ports each time: a closed ZeroMQ socket lets go of
    its port a moment later, in ZeroMQ's own thread."""
    return Control(test_config(tmp_path, fixed=fixed))


def _close(control: Control) -> None:
    control.socket.close(0)


def _start(control: Control, number: int, **extra) -> dict:
    reply = control.handle({"op": "start_scan", "scan_number": number, "scan_shape": [4, 6], "nodes": [0, 1], **extra})
    assert reply["ok"], reply
    control.save()  # what serve() does after each request that changed a scan
    return reply["scan"]


def test_a_restarted_control_has_the_running_scan_its_calibration_and_generation(tmp_path):
    first = _control(tmp_path, fixed=False)
    done = _start(first, 1)
    first.handle({"op": "scan_done", "scan": 1, "ok": True, "summary": {"frames": 24}})
    spec = _start(first, 2)
    first_generation = spec["generation"]
    values = np.arange(-3, 40)
    first.handle({"op": "calibration", "scan": 2, "node": 0, "values": values.tolist(),
                  "counts": (values + 10).tolist(), "n_frames": 7})
    first.handle({"op": "writer_restarted", "scan": 2})
    first.save()
    histogram = first.scans[2].histogram.counts.copy()
    _close(first)

    second = _control(tmp_path, fixed=False)
    try:
        assert second.instance != first.instance
        state = second.scans[2]
        assert state.state == "running" and state.spec == first.scans[2].spec
        assert state.spec.generation == first_generation + 1 and state.contributors == {0}
        assert np.array_equal(state.histogram.counts, histogram) and state.histogram.n_frames == 7
        assert second.scans[1].state == "closed" and second.scans[1].summary == {"frames": 24}
        # the scan's node groups are expected back: the ones that do not come are failed over
        assert {"node-0", "node-1"} <= set(second.roles)
        beat = second.handle({"op": "heartbeat", "role": "producer", "id": 0})
        assert [s["scan"] for s in beat["scans"]] == [2] and beat["instance"] == second.instance
        # the sequence goes on: file names keep counting up
        assert _start(second, 3)["epoch"] == max(done["epoch"], spec["epoch"]) + 1
    finally:
        _close(second)


def test_a_scan_running_in_a_state_file_older_than_the_scan_timeout_is_not_revived(tmp_path):
    first = _control(tmp_path)
    _start(first, 5)
    _close(first)
    path = tmp_path / "control.state"
    saved = load_state(path)
    saved["saved_at"] = time.time() - first.config.flow.scan_timeout_s - 1
    path.write_bytes(msgpack.packb(saved, use_bin_type=True))

    second = _control(tmp_path)
    try:
        assert second.scans[5].state == "failed" and "scan_timeout_s" in second.scans[5].summary["error"]
        assert second.handle({"op": "heartbeat", "role": "producer", "id": 0})["scans"] == []
    finally:
        _close(second)


def test_an_unreadable_state_file_is_set_aside_with_one_log_line(tmp_path, caplog):
    path = tmp_path / "control.state"
    for content in (b"\x00garbage, not msgpack\xc1", msgpack.packb({"version": 99, "scans": {}}),
                    msgpack.packb({"version": 1, "saved_at": time.time(), "scans": {"1": {"spec": "?"}}})):
        path.write_bytes(content)
        with caplog.at_level(logging.ERROR, logger="stemstream.pipeline.control"):
            caplog.clear()
            control = _control(tmp_path)
        try:
            assert control.scans == {}
            assert len(caplog.records) == 1 and "starting with no scans" in caplog.records[0].getMessage()
            assert not path.exists()  # moved aside, kept for a look
            assert _start(control, 1)["scan"] == 1 and path.exists()
        finally:
            _close(control)
        for aside in tmp_path.glob("control.state.unreadable-*"):
            os.unlink(aside)


def test_no_state_file_when_state_file_is_empty(tmp_path):
    config = test_config(tmp_path)
    config.pipeline.state_file = ""
    control = Control(config)
    try:
        reply = control.handle({"op": "start_scan", "scan_number": 1, "scan_shape": [2, 2], "nodes": [0]})
        assert reply["ok"] and control.changed and control.state_file is None
        assert not list(tmp_path.glob("*.state*"))
    finally:
        _close(control)


def test_control_forgets_the_oldest_finished_scans_and_their_histograms(tmp_path, monkeypatch):
    """A session of hundreds of scans: control keeps the latest FINISHED_IN_MEMORY finished ones,
    without their calibration histograms (1 MB each)."""
    monkeypatch.setattr(scans_module, "FINISHED_IN_MEMORY", 3)
    control = _control(tmp_path)
    try:
        for number in range(1, 7):
            _start(control, number)
            assert control.scans[number].histogram is not None
            control.handle({"op": "scan_done", "scan": number, "ok": True, "summary": {}})
        _start(control, 7)  # running: kept whatever its age
        assert sorted(control.scans) == [4, 5, 6, 7]
        assert all(control.scans[n].histogram is None for n in (4, 5, 6))
        assert control.handle({"op": "get_scan", "scan": 2})["ok"] is False
    finally:
        _close(control)


def test_a_scan_running_at_a_shutdown_is_not_taken_up_by_the_next_control(tmp_path):
    first = _control(tmp_path)
    _start(first, 9)
    first.handle({"op": "shutdown"})
    first.save()
    # the writer closes what it has on its way out: its report still counts
    first.handle({"op": "scan_done", "scan": 9, "ok": True, "summary": {"frames": 3}})
    first.save()
    _close(first)
    second = _control(tmp_path)
    try:
        assert second.scans[9].state == "closed" and second.scans[9].summary == {"frames": 3}
        assert second.handle({"op": "heartbeat", "role": "producer", "id": 0})["scans"] == []
    finally:
        _close(second)
    third = _control(tmp_path)  # and without the writer's report: failed, with the reason
    try:
        _start(third, 10)
        third.handle({"op": "shutdown"})
        third.save()
    finally:
        _close(third)
    fourth = _control(tmp_path)
    try:
        assert fourth.scans[10].state == "failed" and "shut down" in fourth.scans[10].summary["error"]
    finally:
        _close(fourth)


def test_an_unwritable_state_file_is_said_once_and_control_goes_on(tmp_path, caplog):
    config = test_config(tmp_path)
    config.pipeline.state_file = str(tmp_path / "no-such-dir" / "control.state")
    control = Control(config)
    try:
        with caplog.at_level(logging.ERROR, logger="stemstream.pipeline.control"):
            for number in (1, 2, 3):
                _start(control, number)
        assert [r.getMessage() for r in caplog.records if "state file" in r.getMessage()] == [
            f"cannot write control's state file {config.pipeline.state_file}: No such file or directory; "
            "a restarted control will not have the scans"]
        assert sorted(control.scans) == [1, 2, 3]
    finally:
        _close(control)
