"""Control's edge, on real ZeroMQ sockets: every request is checked against its schema before control
acts on it (numbers finite and in range), and a request that changes something is answered only
for an authenticated sender: the session token without CURVE, the CURVE handshake with it."""

from __future__ import annotations

import logging
import stat
import threading

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline_support import test_config, wait_for
from stemstream.pipeline.control import fields
from stemstream.pipeline.control.service import Control
from stemstream.transport import session_token
from stemstream.transport.control_client import ControlClient
from stemstream.transport.curve import create_keys
from stemstream.transport.messages import pack_control

INF = float("inf")
HISTOGRAM = {"values": [0, 1], "counts": [5, 3], "n_frames": 1}
# A request of every kind that changes something, well formed.
CHANGING = [
    ("shutdown", {}),
    ("start_scan", {"scan_number": 1, "scan_shape": [4, 4]}),
    ("heartbeat", {"role": "node", "id": 0, "stats": {}, "host": "127.0.0.1"}),
    ("leave", {"role": "node", "id": 0}),
    ("committed", {"scan": 1, "ranges": [[0, 1]], "fenced": 0, "done": []}),
    ("writer_restarted", {"scan": 1}),
    ("gateway_restarted", {"id": 0}),
    ("calibration", {"scan": 1, "node": 0, **HISTOGRAM}),
    ("scan_done", {"scan": 1, "ok": True, "summary": {}}),
]


class Served:
    """A control answering on its socket in a thread; a client with the session token and one
    without."""

    def __init__(self, config):
        self.config = config
        self.control = Control(config)
        self.thread = threading.Thread(target=self.control.serve, kwargs={"stop_after_shutdown_s": 0.1}, daemon=True)
        self.thread.start()
        self.trusted = ControlClient.for_config(config, timeout_s=5.0)
        self.anonymous = ControlClient(config.network.control(), timeout_s=5.0)

    def close(self) -> None:
        if self.thread.is_alive():
            self.trusted.request("shutdown", timeout_s=2.0)
            self.thread.join(5)
        self.trusted.close()
        self.anonymous.close()


def _served_again(config) -> Served | None:
    """A control on the port of one that just stopped (None while ZeroMQ still holds it)."""
    try:
        return Served(config)
    except zmq.ZMQError:
        return None


@pytest.fixture
def served(tmp_path):
    s = Served(test_config(tmp_path))
    yield s
    s.close()


def test_a_request_that_changes_something_needs_the_session_token_and_an_anonymous_shutdown_stops_nothing(served):
    path = session_token.token_path(served.config)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text().strip()) == 32
    for op, request in CHANGING:
        for token in ({}, {"token": "0" * 32}, {"token": 5}):  # none, a guessed one, not even a string
            reply = served.anonymous.request(op, **request, **token)
            assert reply["ok"] is False and reply["unauthenticated"] is True, (op, reply)
            assert "session token" in reply["error"]
    # nothing changed: control still serves, no role, no scan, not shutting down
    status = served.anonymous.request("status")  # reading needs no token
    assert status["ok"] and status["roles"] == {} and status["scans"] == {}
    assert served.thread.is_alive() and not served.control.shutting_down
    assert served.control.unauthenticated == 3 * len(CHANGING)
    # the pipeline's own clients (the token from its file) are answered
    assert served.trusted.request("heartbeat", role="node", id=0, stats={}, host="127.0.0.1")["ok"]
    assert served.trusted.request("start_scan", scan_number=1, scan_shape=[4, 4])["ok"]
    assert served.anonymous.request("get_scan", scan=1)["state"] == "running"
    assert served.trusted.request("shutdown")["ok"]
    served.thread.join(5)
    assert not served.thread.is_alive()


def test_a_client_reads_the_token_again_when_a_restarted_control_made_a_new_one(tmp_path):
    config = test_config(tmp_path)
    first = Served(config)
    client = first.trusted
    assert client.request("heartbeat", role="writer", id=0, stats={})["ok"]  # the token is read, and kept
    first.close()
    session_token.token_path(config).unlink()  # the next control makes a new one
    second = wait_for(lambda: _served_again(config), 10, "control's port free again")
    try:
        assert second.control.token != first.control.token
        client = ControlClient.for_config(config, timeout_s=5.0)
        client._token = first.control.token  # as a role that read the old file keeps it
        assert client.request("heartbeat", role="writer", id=0, stats={})["ok"]
        assert client._token == second.control.token
    finally:
        client.close()
        second.close()


@pytest.mark.parametrize("op, request_", [
    ("get_scan", {"scan": INF}),
    ("get_scan", {"scan": -1}),
    ("start_scan", {"scan_number": INF, "scan_shape": [4, 4]}),
    ("start_scan", {"scan_number": 2, "scan_shape": [4, INF]}),
    ("start_scan", {"scan_number": 2, "scan_shape": [4, 4], "frames_per_position": 1e300}),
    ("start_scan", {"scan_number": 2, "scan_shape": [4, 4], "thresholds": {"background": INF, "xray": 1000.0}}),
    ("heartbeat", {"role": "node", "id": 1e300, "stats": {}}),
    ("heartbeat", {"role": "node", "id": 65536, "stats": {}}),
    ("committed", {"scan": 1, "ranges": [[0, INF]], "fenced": 0}),
    ("calibration", {"scan": 1, "node": 0, "values": [0], "counts": [2**41], "n_frames": 1}),
    ("calibration", {"scan": 1, "node": 0, "values": [0.5], "counts": [1], "n_frames": 1}),
])
def test_numbers_out_of_range_are_refused_in_one_sentence_and_change_nothing(served, op, request_):
    trusted = served.trusted
    assert trusted.request("heartbeat", role="node", id=0, stats={}, host="127.0.0.1")["ok"]
    assert trusted.request("start_scan", scan_number=1, scan_shape=[4, 4])["ok"]
    before = trusted.request("status")
    reply = trusted.request(op, **request_)
    assert reply["ok"] is False and "\n" not in reply["error"] and len(reply["error"]) < 200, reply
    after = trusted.request("status")
    assert after["scans"] == before["scans"] and set(after["roles"]) == set(before["roles"])
    # and control goes on at once: a scan starts on the node group registered
    assert trusted.request("start_scan", scan_number=3, scan_shape=[4, 4])["scan"]["nodes"] == [0]


def test_with_curve_the_link_authenticates_and_no_token_is_made(tmp_path):
    keys = tmp_path / "keys"
    create_keys(keys)
    config = test_config(tmp_path)
    config.security.curve, config.security.keys_dir = True, str(keys)
    served = Served(config)
    try:
        assert served.trusted.token_file is None and not session_token.token_path(config).exists()
        assert served.trusted.request("start_scan", scan_number=1, scan_shape=[4, 4])["ok"] is False  # no node group
        assert served.trusted.request("shutdown")["ok"]
        served.thread.join(5)
        assert not served.thread.is_alive()
    finally:
        served.close()


# -- every schema, fuzzed in process ---------------------------------------------------------------

LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=5),
                 st.binary(max_size=5))
VALUE = st.recursive(LEAF, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                     max_leaves=8)
NAMES = sorted({"instance", "scan", "scan_number", "scan_shape", "frames_per_position", "nodes", "file_name", "resume",
                "thresholds", "ranges", "fenced", "done", "role", "id", "stats", "host", "node", "values", "counts",
                "n_frames", "ok", "summary"})
PLAUSIBLE = st.one_of(VALUE, st.integers(0, 3), st.just([[0, 1]]), st.just([4, 4]), st.just([0, 1]),
                      st.just("node"), st.just({"background": 1.0, "xray": 2.0}))


def test_every_request_of_every_schema_gets_a_checked_answer_never_a_crash(tmp_path, caplog):
    config = test_config(tmp_path, fixed=False)
    control = Control(config)
    for n in (0, 1):
        assert control.handle({"op": "heartbeat", "role": "node", "id": n, "stats": {}})["ok"]
    assert control.handle({"op": "start_scan", "scan_number": 1, "scan_shape": [8, 8]})["ok"]
    ops = sorted(op for op in fields.SCHEMAS if op != "shutdown")

    @settings(max_examples=1500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(ops), st.dictionaries(st.sampled_from(NAMES), PLAUSIBLE, max_size=6))
    def ask(op, request):
        reply = control.handle({**request, "op": op})
        assert isinstance(reply["ok"], bool) and (reply["ok"] or isinstance(reply["error"], str))
        pack_control(reply)
        pack_control(control.handle({"op": "status"}))  # what it keeps still travels
        control.save()

    try:
        with caplog.at_level(logging.ERROR, logger="stemstream.pipeline.control.service"):
            ask()
    finally:
        control.socket.close(0)
    assert not [r for r in caplog.records if "request failed" in r.getMessage()], "a field no schema checks"
