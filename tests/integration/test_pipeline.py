"""The streaming pipeline end to end: real role processes, real ZeroMQ sockets on loopback."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from pipeline_support import assert_same_events, frames_by_slot, test_config, wait_until_counted
from stemstream.counting.kernel import ElectronCounter
from stemstream.counting.offline import CountOptions, count_raw_scan
from stemstream.counting.sectors import count_from_sectors
from stemstream.deploy.local import LocalPipeline, ProducerSource
from stemstream.formats import wire
from stemstream.formats.raw import N_MODULES, RECORD_DTYPE
from stemstream.formats.sparse_h5 import read_counted
from stemstream.pipeline.writer.files import whole_name
from stemstream.sources.simulator import DetectorSimulator, SimulationConfig, simulate_to_directory

pytestmark = pytest.mark.slow


def ledger_of(path):
    return read_counted(path).metadata["stemstream"]["ledger"]


@pytest.mark.parametrize("shared_memory, gateways", [(False, 1), (True, 1), (False, 2)],
                         ids=["sockets", "shared-memory", "two-gateways"])
def test_streamed_file_equals_offline_count_of_the_same_raw_files(tmp_path, shared_memory, gateways):
    raw = tmp_path / "raw"
    simulate_to_directory(raw, SimulationConfig(scan_shape=(10, 12), frames_per_position=2, seed=3,
                                                drop_sector_probability=0.01))
    offline = count_raw_scan([raw], tmp_path / "offline.h5", CountOptions(background=28.0, xray=1000.0))
    config = test_config(tmp_path, shared_memory=shared_memory)
    if gateways > 1:  # gateway 0 forwards modules 0 and 2, gateway 1 modules 1 and 3
        config.network.gateway_hosts = ["127.0.0.1"] * gateways
    with LocalPipeline(config, tmp_path / "work", ProducerSource(replay=[raw])) as pipeline:
        pipeline.start()
        summary = pipeline.run_scan(1, (10, 12), 2, timeout_s=120)
        # Each module through its own gateway: one SECTORS message per (block, module) and one END
        # per (node group, module). Counters come with heartbeats, so wait for the last one.
        blocks = -(-10 * 12 * 2 // config.pipeline.block_frames)
        expected = [(blocks + config.pipeline.nodes) * (N_MODULES // gateways)] * gateways
        deadline = time.monotonic() + 10
        while (forwarded := [pipeline.status()["roles"][f"gateway-{g}"]["stats"]["counters"].get("forwarded", 0)
                             for g in range(gateways)]) != expected and time.monotonic() < deadline:
            time.sleep(0.2)
    assert forwarded == expected
    assert summary["state"] == "closed"
    assert_same_events(summary["path"], offline.output)
    streamed = summary["ledger"]
    assert streamed["frames_complete"] == offline.ledger.frames_complete
    assert streamed["frames_incomplete"] == offline.ledger.frames_incomplete > 0
    assert streamed["sectors_missing"] == offline.ledger.sectors_missing


def test_dropped_sectors_make_incomplete_frames_in_the_ledger(tmp_path):
    config = test_config(tmp_path, gateway=False)
    drop = 0.02
    with LocalPipeline(config, tmp_path / "work", ProducerSource(seed=5, drop_sectors=drop)) as pipeline:
        pipeline.start()
        summary = pipeline.run_scan(1, (8, 8), timeout_s=120)
    # the producers simulate scan 1 with seed 5 + 1 (see the producer command)
    sim = DetectorSimulator(SimulationConfig(scan_shape=(8, 8), seed=6, scan_number=1, first_frame_number=0,
                                             drop_sector_probability=drop))
    dropped = sim.dropped_sectors(sim.batch(0, 64))
    ledger = summary["ledger"]
    assert dropped.any()
    assert ledger["frames_incomplete"] == int((dropped.any(axis=1) & ~dropped.all(axis=1)).sum())
    assert ledger["frames_missing"] == int(dropped.all(axis=1).sum())
    assert ledger["sectors_missing"] == [int(v) for v in (dropped & ~dropped.all(axis=1, keepdims=True)).sum(axis=0)]
    assert ledger_of(summary["path"])["frames_incomplete"] == ledger["frames_incomplete"]


def test_killed_producer_gives_missing_sectors_and_a_clean_end(tmp_path):
    config = test_config(tmp_path)
    with LocalPipeline(config, tmp_path / "work", ProducerSource(rate=300)) as pipeline:
        pipeline.start()
        control_reply = pipeline.control.request("start_scan", scan_number=1, scan_shape=[24, 24])
        assert control_reply["ok"]
        wait_until_counted(pipeline, 100)
        pipeline.kill("producer-2")
        t0 = time.monotonic()
        while pipeline.status()["scans"]["1"]["state"] == "running":
            assert time.monotonic() - t0 < 60, "the scan never ended"
            time.sleep(0.2)
        summary = pipeline.status()["scans"]["1"]["summary"]
    ledger = summary["ledger"]
    assert 0 < ledger["sectors_received"][2] < 576
    assert ledger["sectors_received"][0] == 576
    assert ledger["frames_incomplete"] == 576 - ledger["sectors_received"][2]
    assert ledger["frames_complete"] + ledger["frames_incomplete"] == 576


def test_stalled_node_group_spills_and_the_replay_completes_the_scan(tmp_path):
    raw = tmp_path / "raw"
    # big enough that the sockets' buffers cannot absorb node group 1's share during the stall
    simulate_to_directory(raw, SimulationConfig(scan_shape=(32, 32), seed=4))
    reference = count_raw_scan([raw], tmp_path / "reference.h5", CountOptions(background=28.0, xray=1000.0))
    config = test_config(tmp_path)
    config.flow.send_hwm = 1
    config.flow.max_pending_blocks = 2
    config.pipeline.block_frames = 8
    with LocalPipeline(config, tmp_path / "work", ProducerSource(replay=[raw])) as pipeline:
        pipeline.start()
        pipeline.kill("node-1", signal.SIGSTOP)  # stalls: reads nothing, answers nothing
        reply = pipeline.control.request("start_scan", scan_number=1, scan_shape=[32, 32])
        assert reply["ok"]
        time.sleep(4.0)  # longer than the producers' patience (1 s): they spill
        pipeline.kill("node-1", signal.SIGCONT)
        t0 = time.monotonic()
        while pipeline.status()["scans"]["1"]["state"] == "running":
            assert time.monotonic() - t0 < 60
            time.sleep(0.2)
        first = pipeline.status()["scans"]["1"]["summary"]
        spilled = sum(r["stats"]["counters"].get("records_spilled", 0)
                      for k, r in pipeline.status()["roles"].items() if k.startswith("producer"))
    assert spilled > 0
    assert first["ledger"]["frames_spilled"] > 0 or first["ledger"]["frames_missing"] > 0
    spill_dir = tmp_path / "spill" / "scan_00001"
    assert any(spill_dir.glob("*.data"))
    config2 = test_config(tmp_path)
    with LocalPipeline(config2, tmp_path / "work2", ProducerSource(replay=[spill_dir])) as pipeline:
        pipeline.start()
        final = pipeline.run_scan(1, (32, 32), resume=True, file_name=first["path"].rsplit("/", 1)[-1], timeout_s=120)
    # the resume names the file as the first run left it (NAME.incomplete.h5 when frames were
    # missing); the whole scan is NAME.h5, one file
    assert final["path"] == str(Path(first["path"]).with_name(whole_name(Path(first["path"]).name)))
    assert not Path(first["path"]).exists() or first["path"] == final["path"]
    assert final["ledger"]["frames_complete"] == 1024, (str(first["ledger"]), str(final["ledger"]))
    assert final["ledger"]["frames_incomplete"] == 0
    assert_same_events(final["path"], reference.output)


def test_bad_messages_are_rejected_counted_and_the_scan_still_completes(tmp_path):
    raw = tmp_path / "raw"
    simulate_to_directory(raw, SimulationConfig(scan_shape=(8, 8), seed=2))
    reference = count_raw_scan([raw], tmp_path / "reference.h5", CountOptions(background=28.0, xray=1000.0))
    config = test_config(tmp_path)
    with LocalPipeline(config, tmp_path / "work", ProducerSource(replay=[raw])) as pipeline:
        pipeline.start()
        ctx = zmq.Context.instance()
        to_node = ctx.socket(zmq.PUSH)
        to_node.connect(config.network.node(0, 1))
        to_gateway = ctx.socket(zmq.PUSH)
        to_gateway.connect(config.network.gateway(3))
        good = np.zeros(1, RECORD_DTYPE)
        good["header"]["scan_number"] = 99  # another scan's number
        garbage = [
            [b"S", b"\xc1not msgpack", b"x"],
            [b"Z", b"{}"],
            [b"S", wire.pack_map({"scan": 1, "module": 1, "block": 0, "node": 0, "n": 1}), b"short"],
            wire.encode_sectors(1, 2, 0, 0, good),  # module 2 on module 1's stream
            [b"E", wire.pack_map({"scan": 1, "module": 1})],
        ]
        for parts in garbage:
            to_node.send_multipart(parts)
            to_gateway.send_multipart(parts)
        time.sleep(0.5)
        summary = pipeline.run_scan(1, (8, 8), timeout_s=120)
        status = pipeline.status()
        to_node.close(0)
        to_gateway.close(0)
    rejected_node = sum(status["roles"]["node-0"]["stats"]["rejected"].values())
    rejected_gateway = sum(status["roles"]["gateway-0"]["stats"]["rejected"].values())
    assert rejected_node == len(garbage)
    assert rejected_gateway == len(garbage)
    assert summary["ledger"]["frames_complete"] == 64
    assert_same_events(summary["path"], reference.output)


def test_several_scans_in_one_session_each_get_their_own_file(tmp_path):
    config = test_config(tmp_path)
    paths = []
    with LocalPipeline(config, tmp_path / "work", ProducerSource(seed=1)) as pipeline:
        pipeline.start()
        for number in (1, 2, 3):
            summary = pipeline.run_scan(number, (4, 6), timeout_s=120)
            assert summary["state"] == "closed" and summary["ledger"]["frames_complete"] == 24
            paths.append(summary["path"])
    assert len(set(paths)) == 3
    assert [read_counted(p).scan_shape for p in paths] == [(4, 6)] * 3
    assert not np.array_equal(frames_by_slot(paths[0])[0], frames_by_slot(paths[1])[0])  # other seeds


def test_a_node_group_compiles_everything_a_scan_needs_before_it_registers(tmp_path):
    """On a fresh machine every kernel compiles on first use (seconds each): one compiled mid-scan
    stalls the node group until control declares it dead and the producers spill (this happened:
    received buffers are read-only, another compiled variant than the warm-up's). After the
    node group's start-up, counting what arrives must compile nothing new, whichever modules
    are there and whoever owns their buffers."""
    import numba

    from stemstream.analysis import ScanAnalyses
    from stemstream.counting import sectors, thresholds
    from stemstream.pipeline.node.role import NodeGroup

    node = NodeGroup(test_config(tmp_path), 0).start()
    try:
        dispatchers = [getattr(m, name) for m in (sectors, thresholds) for name in dir(m)
                       if isinstance(getattr(m, name), numba.core.registry.CPUDispatcher)]
        before = {d: len(d.signatures) for d in dispatchers}
        sim = DetectorSimulator(SimulationConfig(scan_shape=(4, 4), seed=2))
        received = [np.frombuffer(sim.records(0, 16, m).tobytes(), RECORD_DTYPE) for m in range(4)]  # read-only
        assert not received[0].flags.writeable
        counter = ElectronCounter(28.0, 1000.0, (576, 576))
        records = np.tile(np.arange(16), (4, 1)).T.copy()
        counted = count_from_sectors(counter, received, records)
        # A module missing (its stand-in is no received buffer) or buffers of this process's own
        # (writable, as a spill's replay has): the same compiled kernel, not one of 16 variants.
        missing = records.copy()
        missing[:, 1] = -1
        count_from_sectors(counter, [received[0], None, received[2], received[3]], missing)
        count_from_sectors(counter, [r.copy() for r in received[:2]] + received[2:], records)
        thresholds.PixelHistogram().add(sim.batch(0, 1).frames[0], weight=2)
        ScanAnalyses(node.analyses, (4, 4)).accumulate(np.arange(16), counted.events, counted.offsets)
        assert {d: len(d.signatures) for d in dispatchers} == before
    finally:
        node.close()
