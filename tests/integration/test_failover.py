"""Node groups dying, joining and leaving: real role processes, real sockets, SIGKILL.

The scan's file after a failover must be the file of a clean run of the same scan, event for
event, with the failover in its ledger (docs/reliability.md).
"""

from __future__ import annotations

import signal
import time

import h5py
import numpy as np
import pytest

from pipeline_support import assert_same_events, test_config, wait_for, wait_until_closed, wait_until_counted
from stemstream.deploy.local import LocalPipeline, ProducerSource

pytestmark = pytest.mark.slow

SHAPE = (32, 32)  # (rows, cols)
N_FRAMES = SHAPE[0] * SHAPE[1]


def failover_config(tmp_path, shared_memory: bool = False):
    # ports for three node groups; the embedded run starts two, the third joins later
    config = test_config(tmp_path, nodes=3, shared_memory=shared_memory)
    config.pipeline.nodes = 2
    config.pipeline.block_frames = 16
    config.flow.dead_after_s = 2.0
    # No spilling: the failover alone must carry the scan through.
    config.flow.backpressure_timeout_s = 30.0
    config.flow.scan_timeout_s = 60.0
    return config.validate()


def complete(summary: dict) -> None:
    """Every frame complete, and every sector counted once (received), none missing or duplicate,
    whichever node group counted it and however often it was resent."""
    ledger = summary["ledger"]
    assert ledger["frames_complete"] == N_FRAMES, ledger
    assert ledger["frames_incomplete"] == ledger["frames_missing"] == 0, ledger
    assert ledger["sectors_received"] == [N_FRAMES] * 4, ledger
    assert ledger["sectors_missing"] == ledger["sectors_duplicate"] == ledger["sectors_rejected"] == [0] * 4, ledger


def assert_same_analyses(a: str, b: str) -> None:
    """Every array under /analysis equal (the live analyses merged from the node groups'
    partials, or recomputed from recovered events)."""
    def arrays(path):
        found = {}
        with h5py.File(path, "r") as f:
            f["analysis"].visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return found

    ours, theirs = arrays(a), arrays(b)
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-12, err_msg=name)


def producer_counter(pipeline, name: str) -> int:
    roles = pipeline.status()["roles"]
    return sum(r["stats"]["counters"].get(name, 0) for k, r in roles.items() if k.startswith("producer"))


def test_node_group_killed_mid_scan_fails_over_and_a_joining_one_is_used_next(tmp_path):
    # shared memory: the resent blocks are read again from the producers' slots
    config = failover_config(tmp_path, shared_memory=True)
    with LocalPipeline(config, tmp_path / "work", ProducerSource(seed=3, rate=400)) as pipeline:
        pipeline.start()
        clean = pipeline.run_scan(1, SHAPE, timeout_s=120)
        complete(clean)
        assert "failovers" not in clean["ledger"]

        # The same scan again; node group 1 dies a quarter of the way in.
        reply = pipeline.control.request("start_scan", scan_number=1, scan_shape=list(SHAPE))
        assert reply["ok"] and reply["scan"]["nodes"] == [0, 1]
        wait_until_counted(pipeline, N_FRAMES + N_FRAMES // 4)
        pipeline.kill("node-1")
        failed_over = wait_until_closed(pipeline, 1)
        resent = producer_counter(pipeline, "blocks_resent")

        # Node group 1 is gone: the next scan uses node group 0 alone ...
        # (scan number 1 again each time: the simulated frames depend on it)
        alone = pipeline.run_scan(1, SHAPE, timeout_s=120)
        spec_alone = pipeline.control.request("get_scan", scan=1)["scan"]
        # ... and one that registers between scans is used from the next one on.
        pipeline.start_node(2)
        pipeline.wait_for_roles({"node-2"})
        joined = pipeline.run_scan(1, SHAPE, timeout_s=120)
        spec_joined = pipeline.control.request("get_scan", scan=1)["scan"]

    complete(failed_over)
    failovers = failed_over["ledger"]["failovers"]
    assert [f["dead"] for f in failovers.values()] == [[1]], failovers
    assert resent > 0
    assert_same_events(failed_over["path"], clean["path"])
    assert_same_analyses(failed_over["path"], clean["path"])

    assert spec_alone["nodes"] == [0]
    complete(alone)
    assert spec_joined["nodes"] == [0, 2]
    complete(joined)
    assert_same_events(alone["path"], clean["path"])
    assert_same_events(joined["path"], clean["path"])


def test_node_group_killed_and_restarted_at_once_is_failed_over_as_a_new_process(tmp_path):
    """Issue 12, finding 2: node group 1 is SIGKILLed mid-scan and started again at once, well
    within dead_after_s, so control never finds it silent. Its new process says so in its first
    heartbeat; control starts a new routing generation then and there, the producers resend what
    the dead process held, and the file is the clean run's with nothing claimed lost."""
    config = failover_config(tmp_path)
    config.flow.dead_after_s = 40.0  # longer than any restart here: silence alone fails nothing over
    with LocalPipeline(config, tmp_path / "work", ProducerSource(seed=3, rate=400)) as pipeline:
        pipeline.start()
        clean = pipeline.run_scan(1, SHAPE, timeout_s=120)
        complete(clean)

        assert pipeline.control.request("start_scan", scan_number=1, scan_shape=list(SHAPE))["ok"]
        wait_until_counted(pipeline, N_FRAMES + N_FRAMES // 4)
        pipeline.kill("node-1")
        pipeline.start_node(1)
        summary = wait_until_closed(pipeline, 1, timeout_s=120)
        resent = producer_counter(pipeline, "blocks_resent")

    complete(summary)
    ledger = summary["ledger"]
    assert ledger["sectors_lost"] == [0] * 4 and not ledger["node_groups_missing"], ledger
    failovers = ledger["failovers"]
    assert [(f["dead"], "node group 1 restarted" in f["reason"]) for f in failovers.values()] == [([], True)], failovers
    assert resent > 0
    assert_same_events(summary["path"], clean["path"])
    assert_same_analyses(summary["path"], clean["path"])


def test_gateway_killed_and_restarted_mid_scan_resends_what_its_queues_held(tmp_path):
    """The gateway dies (SIGKILL) with blocks in its queues and is started again: it finds the
    scan running, control starts a new routing generation, and the producers resend every block
    not committed; nothing is counted incomplete."""
    config = failover_config(tmp_path)
    with LocalPipeline(config, tmp_path / "work", ProducerSource(seed=3, rate=400)) as pipeline:
        pipeline.start()
        clean = pipeline.run_scan(1, SHAPE, timeout_s=120)
        complete(clean)

        assert pipeline.control.request("start_scan", scan_number=1, scan_shape=list(SHAPE))["ok"]
        wait_until_counted(pipeline, N_FRAMES + N_FRAMES // 3)
        pipeline.kill("gateway-0")
        time.sleep(0.5)
        pipeline.start_gateway(0)
        summary = wait_until_closed(pipeline, 1)
        resent = producer_counter(pipeline, "blocks_resent")

    complete(summary)
    failovers = summary["ledger"]["failovers"]
    assert [f["reason"] for f in failovers.values()] == ["gateway 0 restarted"], failovers
    assert resent > 0
    assert_same_events(summary["path"], clean["path"])
    assert_same_analyses(summary["path"], clean["path"])


def test_control_killed_and_restarted_mid_scan_takes_its_scan_back_and_the_file_is_whole(tmp_path):
    """Control dies (SIGKILL) a third of the way into a scan and is started again 1 s later: the
    other roles carry on meanwhile, the new control reads its scans back from its state file, the
    writer reports its commits again, and the scan ends as a clean run does."""
    config = failover_config(tmp_path)
    with LocalPipeline(config, tmp_path / "work", ProducerSource(seed=3, rate=400)) as pipeline:
        pipeline.start()
        clean = pipeline.run_scan(1, SHAPE, timeout_s=120)
        complete(clean)
        before = pipeline.control.request("get_scan", scan=1)["scan"]

        reply = pipeline.control.request("start_scan", scan_number=1, scan_shape=list(SHAPE))
        assert reply["ok"]
        spec = reply["scan"]
        wait_until_counted(pipeline, N_FRAMES + N_FRAMES // 3)
        pipeline.kill("control")
        time.sleep(1.0)
        pipeline.start_control()
        summary = wait_until_closed(pipeline, 1)
        status = pipeline.status()
        writer_log = " ".join((pipeline.log_dir / "writer.log").read_text().split())  # unwrapped
        next_scan = pipeline.control.request("start_scan", scan_number=2, scan_shape=[4, 4])
        assert next_scan["ok"]
        pipeline.control.request("get_scan", scan=2)

    complete(summary)
    assert "failovers" not in summary["ledger"], summary["ledger"]["failovers"]  # nobody was failed over
    assert summary["path"] == str(tmp_path / "out" / spec["file_name"])
    assert_same_events(summary["path"], clean["path"])
    assert_same_analyses(summary["path"], clean["path"])
    assert "control was restarted" in writer_log
    # the restarted control has the earlier scan's record, and numbers files on from the last one
    assert spec["epoch"] == before["epoch"] + 1 and next_scan["scan"]["epoch"] == spec["epoch"] + 1
    assert {"writer-0", "node-0", "node-1", "producer-0"} <= set(status["roles"])


def test_writer_killed_and_restarted_mid_scan_completes_the_scan_from_its_journal(tmp_path):
    config = failover_config(tmp_path)
    out = tmp_path / "out"
    with LocalPipeline(config, tmp_path / "work", ProducerSource(seed=3, rate=400)) as pipeline:
        pipeline.start()
        clean = pipeline.run_scan(1, SHAPE, timeout_s=120)
        complete(clean)

        reply = pipeline.control.request("start_scan", scan_number=1, scan_shape=list(SHAPE))
        assert reply["ok"]
        final = out / reply["scan"]["file_name"]
        wait_until_counted(pipeline, N_FRAMES + N_FRAMES // 3)
        pipeline.kill("writer")
        # nothing at the final name while the scan is unfinished; the journal holds the commits
        left = sorted(p.name for p in out.iterdir() if p.name.startswith(final.name))
        assert left == [final.name + ".journal", final.name + ".partial"], left
        pipeline.start_writer()
        summary = wait_until_closed(pipeline, 1)
        resent = producer_counter(pipeline, "blocks_resent")

    complete(summary)
    assert summary["path"] == str(final) and final.exists()
    assert not (out / (final.name + ".partial")).exists()
    wait_for(lambda: not (out / (final.name + ".journal")).exists(), 10, "the journal removed after the close")
    failovers = summary["ledger"]["failovers"]
    assert [f["reason"] for f in failovers.values()] == ["writer restarted"], failovers
    assert resent > 0
    assert_same_events(summary["path"], clean["path"])
    assert_same_analyses(summary["path"], clean["path"])


@pytest.mark.parametrize("dead_after_s", [5.0, 30.0], ids=["failover", "backpressure"])
def test_node_group_that_stops_for_10_s_then_resumes_loses_nothing(tmp_path, dead_after_s):
    """SIGSTOP for 10 s: with the default dead_after_s (5 s) its work fails over and, resumed, it
    drops its superseded stream; with dead_after_s above the stall, backpressure holds the
    producers until it reads again. Either way the file is the clean run's."""
    config = failover_config(tmp_path)
    config.flow.dead_after_s = dead_after_s
    with LocalPipeline(config, tmp_path / "work", ProducerSource(seed=3, rate=400)) as pipeline:
        pipeline.start()
        clean = pipeline.run_scan(1, SHAPE, timeout_s=120)
        assert pipeline.control.request("start_scan", scan_number=1, scan_shape=list(SHAPE))["ok"]
        wait_until_counted(pipeline, N_FRAMES + N_FRAMES // 4)
        pipeline.kill("node-1", signal.SIGSTOP)
        time.sleep(10.0)
        pipeline.kill("node-1", signal.SIGCONT)
        summary = wait_until_closed(pipeline, 1)
        spilled = producer_counter(pipeline, "records_spilled")
    complete(summary)
    assert spilled == 0
    assert bool(summary["ledger"].get("failovers")) == (dead_after_s < 10)
    assert_same_events(summary["path"], clean["path"])


def clusters_file(summary: dict) -> np.ndarray:
    """Each frame's events in a cluster-method scan's file, once checked: every frame accounted
    for with its sub-pixel positions, two per event, and every frame's single-electron model
    named (cluster_models: node groups fit their own, per stream; pipeline.writer.counting)."""
    from stemstream.formats.sparse_h5 import read_counted
    from stemstream.formats.sparse_h5.layout import SUBPIXEL_POSITIONS

    complete(summary)
    counted = read_counted(summary["path"])
    meta = counted.metadata["stemstream"]
    assert meta["counting_method"] == "clusters" and meta["ledger"]["frames_at_pixel_centres"] == 0
    events = counted.frames.reshape(-1)
    with h5py.File(summary["path"], "r") as f:
        points = f[SUBPIXEL_POSITIONS][()]
    assert [len(p) for p in points] == [2 * len(e) for e in events]
    models = meta["cluster_models"]
    assert {"node_0", "node_1"} <= set(models), sorted(models)
    assert sum(int(m["frames"]) for m in models.values()) == len(events), models
    # the analysis of the positions (node groups' partials, or the writer's own after a failover
    # or from the journal) is that of the positions the file keeps
    bins = np.floor((np.concatenate(list(points)).reshape(-1, 2).astype(np.float64) + 0.5) * 2).astype(int)
    expected = np.zeros((2 * 576, 2 * 576), np.int64)
    np.add.at(expected, tuple(np.clip(bins, 0, 2 * 576 - 1).T), 1)
    with h5py.File(summary["path"], "r") as f:
        assert np.array_equal(f["analysis/upsampled_pattern/pattern"][()], expected)
    return np.array([len(e) for e in events])


def clusters_pipeline(tmp_path) -> LocalPipeline:
    config = failover_config(tmp_path)
    config.counting.method = "clusters"
    config.analysis = {"enabled": ["virtual_detectors", "summed_pattern", "center_of_mass", "upsampled_pattern"]}
    return LocalPipeline(config, tmp_path / "work", ProducerSource(seed=3, rate=400))


def assert_close_counts(ours: np.ndarray, clean: np.ndarray) -> None:
    """Which frames changed hands, and which complete frames each node group calibrated from,
    depend on timing: a frame's count may differ by an electron or two, the scan's not by more
    than models fitted to different frames differ."""
    assert abs(ours.sum() - clean.sum()) < 0.02 * clean.sum()
    assert np.abs(ours - clean).mean() < 0.01 * clean.mean()


def test_node_group_killed_mid_scan_with_the_cluster_method(tmp_path):
    """The cluster method's path through a failover: node group 1 dies a quarter of the way in,
    node group 0 counts what it left with its own single-electron model (each node group fits its
    own, docs/counting.md). The file names every model that counted its frames, the dead node
    group's too. Every frame is accounted for and comes with its sub-pixel positions,
    two per event, and the counts stay within 1 % of a clean run's frame by frame: not the same
    events, as the models differ (the frames each node group calibrates from, the first complete
    ones it receives, depend on timing)."""
    with clusters_pipeline(tmp_path) as pipeline:
        pipeline.start(timeout_s=180)  # a fresh machine compiles the cluster kernels at the node groups' start
        clean = pipeline.run_scan(1, SHAPE, timeout_s=120)
        reply = pipeline.control.request("start_scan", scan_number=1, scan_shape=list(SHAPE))
        assert reply["ok"] and reply["scan"]["nodes"] == [0, 1]
        wait_until_counted(pipeline, N_FRAMES + N_FRAMES // 4)
        pipeline.kill("node-1")
        failed_over = wait_until_closed(pipeline, 1)

    assert [f["dead"] for f in failed_over["ledger"]["failovers"].values()] == [[1]]
    # (measured: 670,699 and 668,048 events, frames 2.7 electrons apart on average of ~655)
    assert_close_counts(clusters_file(failed_over), clusters_file(clean))


def test_writer_killed_and_restarted_mid_cluster_scan_keeps_positions_and_models_from_its_journal(tmp_path):
    """The writer dies a third into a cluster-method scan: its successor rebuilds the committed
    blocks from the journal, sub-pixel positions and the models that counted them included, and
    the node groups stream the rest again in a new generation (new streams, so new models)."""
    with clusters_pipeline(tmp_path) as pipeline:
        pipeline.start(timeout_s=180)
        clean = pipeline.run_scan(1, SHAPE, timeout_s=120)
        assert pipeline.control.request("start_scan", scan_number=1, scan_shape=list(SHAPE))["ok"]
        wait_until_counted(pipeline, N_FRAMES + N_FRAMES // 3)
        pipeline.kill("writer")
        pipeline.start_writer()
        restarted = wait_until_closed(pipeline, 1)

    assert [f["reason"] for f in restarted["ledger"]["failovers"].values()] == ["writer restarted"]
    assert_close_counts(clusters_file(restarted), clusters_file(clean))
