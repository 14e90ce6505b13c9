"""The cluster counting method on the stream (docs/counting.md): a scan streamed through real
roles on loopback with ``[counting] method = "clusters"`` gives the events of the offline
``count --method clusters`` of the same raw files, with the same sub-pixel positions, and its file
says how it was counted; an analysis of those positions (upsampled_pattern) runs live as offline; an unknown method is one sentence on the command line."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pipeline_support import assert_same_events, test_config
from stemstream.counting.offline import CountOptions, count_raw_scan
from stemstream.deploy.local import LocalPipeline, ProducerSource
from stemstream.formats.sparse_h5 import read_counted
from stemstream.formats.sparse_h5.layout import SUBPIXEL_POSITIONS
from stemstream.sources.simulator import SimulationConfig, simulate_to_directory

pytestmark = pytest.mark.slow


def subpixel_positions(path) -> list[np.ndarray]:
    """The file's sub-pixel positions, one flat (row, col, ...) float32 array per slot."""
    with h5py.File(path, "r") as f:
        return list(f[SUBPIXEL_POSITIONS][()])


def test_a_scan_streamed_with_clusters_equals_its_offline_cluster_count(tmp_path):
    # One node group calibrates its single-electron model from the scan's first 64 complete
    # frames, as the offline count does: the same model, so the same events (with several node
    # groups each fits its own from its share, docs/counting.md "Limits").
    raw = tmp_path / "raw"
    simulate_to_directory(raw, SimulationConfig(scan_shape=(8, 8), seed=4))
    offline = count_raw_scan([raw], tmp_path / "offline.h5", CountOptions(background=28.0, xray=1000.0,
                                                                           method="clusters"))
    config = test_config(tmp_path, nodes=1, gateway=False)
    config.counting.method = "clusters"
    # an analysis of the electrons' sub-pixel positions, live: the node group's partials merged by the writer
    config.analysis = {"enabled": ["summed_pattern", "upsampled_pattern"]}
    with LocalPipeline(config, tmp_path / "work", ProducerSource(replay=[raw])) as pipeline:
        pipeline.start(timeout_s=180)  # a fresh machine compiles the cluster kernels at the node group's start
        summary = pipeline.run_scan(1, (8, 8), 1, timeout_s=120)
    assert summary["state"] == "closed"
    assert_same_events(summary["path"], offline.output)
    streamed_points, offline_points = subpixel_positions(summary["path"]), subpixel_positions(offline.output)
    assert len(streamed_points) == len(offline_points) == 64 and sum(map(len, offline_points)) > 0
    for slot, (got, expected) in enumerate(zip(streamed_points, offline_points)):
        np.testing.assert_array_equal(got, expected, err_msg=f"slot {slot}")
    streamed = read_counted(summary["path"]).metadata["stemstream"]
    expected = read_counted(offline.output).metadata["stemstream"]
    assert streamed["counting_method"] == expected["counting_method"] == "clusters"
    assert streamed["cluster_model"] == {**expected["cluster_model"], "node_group": 0}
    assert "cluster_models" not in streamed  # one node group, one model
    assert streamed["ledger"]["frames_at_pixel_centres"] == 0  # every frame came with its positions
    # live, the 2x pattern of the positions the file keeps: as offline on the offline count's file
    with h5py.File(summary["path"], "r") as f:
        live = f["analysis/upsampled_pattern/pattern"][()]
    points = np.concatenate(offline_points).reshape(-1, 2).astype(np.float64)
    bins = np.clip(np.floor((points + 0.5) * 2).astype(int), 0, [2 * 576 - 1, 2 * 576 - 1])
    expected_pattern = np.zeros((2 * 576, 2 * 576), np.int64)
    np.add.at(expected_pattern, (bins[:, 0], bins[:, 1]), 1)
    assert np.array_equal(live, expected_pattern) and live.sum() == len(points)
    from stemstream.analysis import UpsampledPattern
    from stemstream.analysis.offline import analyze_counted_file

    again = analyze_counted_file(offline.output, [UpsampledPattern()], write=False, png=False)
    assert np.array_equal(again.results["upsampled_pattern"]["pattern"], live)


def test_run_refuses_an_unknown_counting_method_in_one_sentence(tmp_path):
    from typer.testing import CliRunner

    from stemstream.cli.app import app

    result = CliRunner().invoke(app, ["run", "--simulate", "2x2", "--method", "peaks", "-o", str(tmp_path),
                                      "--no-dashboard"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: [counting] method must be one of maxima, clusters, got 'peaks'"]
