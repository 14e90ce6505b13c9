"""CURVE on the pipeline's links: `stemstream keys`, the [security] section, a scan streamed
encrypted, and peers without an authorised key refused, logged and kept out; without CURVE, a
client without the session token changes nothing."""

from __future__ import annotations

import stat
import subprocess
import sys

import numpy as np
import pytest
import zmq
import zmq.auth

from pipeline_support import assert_same_events, test_config, wait_for
from stemstream.counting.offline import CountOptions, count_raw_scan
from stemstream.core.config import ConfigError, config_from_dict, load_config
from stemstream.transport.curve import CurveKeyError, create_keys, curve_for
from stemstream.deploy.local import LocalPipeline, ProducerSource
from stemstream.formats import wire
from stemstream.formats.raw import RECORD_DTYPE
from stemstream.transport.control_client import ControlClient, ControlUnavailable
from stemstream.sources.simulator import SimulationConfig, simulate_to_directory


def stemstream(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stemstream", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def curve_config(tmp_path, **kwargs):
    keys = tmp_path / "keys"
    create_keys(keys)
    config = test_config(tmp_path, **kwargs)
    config.security.curve = True
    config.security.keys_dir = str(keys)
    return config.validate()


def test_keys_command_creates_key_pairs_and_authorises_the_client(tmp_path):
    keys = tmp_path / "keys"
    result = stemstream("keys", keys)
    assert result.returncode == 0, result.stderr
    for name in ("server", "client"):
        public, secret = zmq.auth.load_certificate(keys / f"{name}.key_secret")
        assert len(public) == len(secret) == 40
        assert stat.S_IMODE((keys / f"{name}.key_secret").stat().st_mode) == 0o600
    assert sorted(p.name for p in (keys / "authorized").iterdir()) == ["client.key"]
    assert zmq.auth.load_certificate(keys / "authorized" / "client.key")[0] == zmq.auth.load_certificate(keys / "client.key")[0]
    # a second run does not replace the keys
    again = stemstream("keys", keys)
    assert again.returncode == 2 and "already exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    # another site's own client pair, authorised at once
    assert stemstream("keys", keys, "--name", "site-b").returncode == 0
    assert sorted(p.name for p in (keys / "authorized").iterdir()) == ["client.key", "site-b.key"]
    old = zmq.auth.load_certificate(keys / "client.key")[0]
    assert stemstream("keys", keys, "--name", "client", "--force").returncode == 0
    assert zmq.auth.load_certificate(keys / "client.key")[0] != old


def test_security_section_reads_back_and_missing_keys_are_one_sentence(tmp_path):
    config = config_from_dict({"security": {"curve": True, "keys_dir": str(tmp_path / "nothing")}})
    assert config.security.curve and load_config(config.write(tmp_path / "p.toml")) == config
    with pytest.raises(CurveKeyError, match="is not a directory; create keys with `stemstream keys"):
        curve_for(config)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(CurveKeyError, match="cannot read the server public key"):
        curve_for(config)
    for data, fragment in [({"security": {"curve": "yes"}}, "[security] curve must be true or false"),
                           ({"security": {"client_key": "a/b"}}, "[security] client_key must be a key name"),
                           ({"security": {"curve": True, "keys_dir": ""}}, "needs keys_dir"),
                           ({"security": {"tls": True}}, "unknown setting 'tls' in [security]")]:
        with pytest.raises(ConfigError) as info:
            config_from_dict(data)
        assert fragment in str(info.value) and "\n" not in str(info.value)
    assert curve_for(config_from_dict({})) is None  # off by default


def test_a_role_without_its_keys_stops_with_one_sentence(tmp_path):
    config = test_config(tmp_path)
    config.security.curve = True
    config.security.keys_dir = str(tmp_path / "missing")
    path = config.write(tmp_path / "pipeline.toml")
    result = stemstream("control", "--config", path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "keys_dir" in lines[0] and "stemstream keys" in lines[0], result.stderr


def intruder_socket(ctx, tmp_path, server_public: bytes) -> zmq.Socket:
    """A PUSH socket with a CURVE key pair of its own, not authorised, that knows the server key."""
    create_keys(tmp_path / "intruder", names=["intruder"], authorize=[])
    public, secret = zmq.auth.load_certificate(tmp_path / "intruder" / "intruder.key_secret")
    sock = ctx.socket(zmq.PUSH)
    sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = secret, public, server_public
    sock.linger = 0
    return sock


@pytest.mark.slow
def test_scan_streamed_with_curve_equals_offline_and_unauthorised_peers_get_nothing_through(tmp_path):
    raw = tmp_path / "raw"
    simulate_to_directory(raw, SimulationConfig(scan_shape=(8, 8), seed=2))
    reference = count_raw_scan([raw], tmp_path / "reference.h5", CountOptions(background=28.0, xray=1000.0))
    config = curve_config(tmp_path)
    curve = curve_for(config)
    ctx = zmq.Context.instance()
    with LocalPipeline(config, tmp_path / "work", ProducerSource(replay=[raw])) as pipeline:
        pipeline.start()
        # a peer with a key of its own, and one without CURVE at all, at node group 0's module 1
        # input and at the gateway's module 2 input: records of the scan, and garbage
        intruder = intruder_socket(ctx, tmp_path, curve.server_public)
        intruder.connect(config.network.node(0, 1))
        plain = ctx.socket(zmq.PUSH)
        plain.linger = 0
        plain.connect(config.network.gateway(2))
        records = np.zeros(1, RECORD_DTYPE)
        records["header"]["scan_number"] = 1
        for sock, module in ((intruder, 1), (plain, 2)):
            for parts in (wire.encode_sectors(1, module, 0, 0, records), [b"S", b"\xc1garbage", b"x"]):
                try:
                    sock.send_multipart(parts, zmq.NOBLOCK)
                except zmq.Again:
                    pass
        # control answers no client without an authorised key either (nor one without CURVE)
        class IntruderKeys:
            def client(self, sock):
                public, secret = zmq.auth.load_certificate(tmp_path / "intruder" / "intruder.key_secret")
                sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = secret, public, curve.server_public

        for keys in (IntruderKeys(), None):
            with pytest.raises(ControlUnavailable):
                ControlClient(config.network.control(), ctx, timeout_s=1.0, curve=keys).request("status")
        summary = pipeline.run_scan(1, (8, 8), timeout_s=120)
        # the refusals reach control with the node group's next heartbeats
        roles = wait_for(lambda: (r := pipeline.status()["roles"])["node-0"]["stats"]["counters"].get("connections_refused")
                         and r, 30, "node-0 reported no refused connection")
        intruder.close(0)
        plain.close(0)
    assert summary["state"] == "closed" and summary["ledger"]["frames_complete"] == 64
    assert_same_events(summary["path"], reference.output)
    node, gateway = roles["node-0"]["stats"], roles["gateway-0"]["stats"]
    assert node["rejected"] == {} and gateway["rejected"] == {}  # nothing of theirs was delivered
    assert summary["ledger"]["sectors_rejected"] == [0, 0, 0, 0] and summary["ledger"]["sectors_duplicate"] == [0] * 4
    assert node["counters"]["connections_refused"] >= 1
    intruder_key = zmq.auth.load_certificate(tmp_path / "intruder" / "intruder.key")[0].decode()
    node_log, control_log = (" ".join((tmp_path / "work" / "logs" / f"{role}.log").read_text().split())  # unwrapped
                             for role in ("node-0", "control"))
    assert "refused a CURVE connection from 127.0.0.1: client key" in node_log and intruder_key in node_log
    assert "refused a CURVE connection" in control_log


@pytest.mark.slow
def test_an_anonymous_shutdown_stops_nothing_and_the_pipeline_streams_on(tmp_path):
    """Without CURVE the roles carry the session token control wrote; a client without it is
    answered only what it may read."""
    config = test_config(tmp_path)
    with LocalPipeline(config, tmp_path / "work", ProducerSource(seed=1)) as pipeline:
        pipeline.start()
        anonymous = ControlClient(config.network.control(), timeout_s=5.0)
        refused = anonymous.request("shutdown")
        assert refused["ok"] is False and refused["unauthenticated"] is True
        assert anonymous.request("start_scan", scan_number=9, scan_shape=[4, 4])["ok"] is False
        assert anonymous.request("status")["ok"]
        anonymous.close()
        summary = pipeline.run_scan(1, (8, 8), timeout_s=120)
        status = pipeline.status()
    assert summary["state"] == "closed" and summary["ledger"]["frames_complete"] == 64
    assert "9" not in status["scans"] and not status["roles"]["writer-0"]["stats"]["rejected"]
