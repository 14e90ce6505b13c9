"""Producers follow their scan's state, with every role a process on real sockets: when every node
group of a scan dies and the writer closes it with frames missing, the producers stop streaming it,
spill every frame the file lacks (a replay can complete it), stream the next scan on restarted node
groups at once, and obey a shutdown within a second."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from pipeline_support import test_config, wait_until_closed, wait_until_counted
from stemstream.core.detector import MODULES, RECORD_DTYPE
from stemstream.deploy.local import LocalPipeline, ProducerSource
from stemstream.formats.sparse_h5 import read_counted
from stemstream.pipeline.spill import spill_directory


def spilled_frames(spill_dir: str, scan: int) -> dict[int, set[int]]:
    """Frame numbers in the scan's spill files, per module."""
    frames = {m: set() for m in MODULES}
    for path in sorted(spill_directory(spill_dir, scan).glob("*.data")):
        records = np.fromfile(path, RECORD_DTYPE)
        for m in MODULES:
            if f"_module{m}_" in path.name:
                frames[m].update(records["header"]["frame_number"].tolist())
    return frames


@pytest.mark.slow
def test_a_scan_whose_node_groups_all_died_is_spilled_whole_and_the_next_one_streams_on_restarted_node_groups(
        tmp_path):
    config = test_config(tmp_path, nodes=2, gateway=False)
    config.flow.scan_timeout_s = 6.0  # the writer closes a scan that gets nothing for this long
    shape = (32, 32)  # 1,024 frames at 100 frames/s: the node groups die early in it
    with LocalPipeline(config, tmp_path / "work", ProducerSource(seed=4, rate=100)) as pipeline:
        pipeline.start()
        assert pipeline.control.request("start_scan", scan_number=1, scan_shape=list(shape))["ok"]
        wait_until_counted(pipeline, 96)
        for node in ("node-0", "node-1"):
            pipeline.kill(node)
        first = wait_until_closed(pipeline, 1, timeout_s=120)
        for node in (0, 1):
            pipeline.start_node(node)
        pipeline.wait_for_roles({"node-0", "node-1"})
        second = pipeline.run_scan(2, (8, 8), timeout_s=120)
        assert pipeline.control.request("shutdown")["ok"]
        t0 = time.monotonic()
        for m in MODULES:
            pipeline.processes[f"producer-{m}"].wait(10)
        shutdown_s = time.monotonic() - t0
        exit_codes = [pipeline.processes[f"producer-{m}"].returncode for m in MODULES]
        logs = [" ".join((tmp_path / "work" / "logs" / f"producer-{m}.log").read_text().split())  # unwrapped
                for m in MODULES]
    ledger = first["ledger"]
    assert 0 < ledger["frames_complete"] < ledger["frames_expected"] == 1024
    # every frame the file lacks is in every module's spill: `stemstream replay` can complete it
    written = read_counted(first["path"]).written.reshape(-1)
    lacking = set(np.flatnonzero(~written).tolist())
    spilled = spilled_frames(config.pipeline.spill_dir, 1)
    assert lacking and all(lacking <= spilled[m] for m in MODULES), {m: len(lacking - spilled[m]) for m in MODULES}
    assert all("scan 1 is over: it was closed with frames missing; spilled" in text for text in logs)
    # the next scan, on the restarted node groups, is whole
    assert second["state"] == "closed" and second["ledger"]["frames_complete"] == 64
    # the producers stopped on their own, at once (SIGKILL would give -9)
    assert exit_codes == [0] * len(MODULES) and shutdown_s < 3.0, (exit_codes, shutdown_s)
    assert Path(first["path"]).name.endswith(".incomplete.h5")
