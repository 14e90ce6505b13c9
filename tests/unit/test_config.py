"""The pipeline config: defaults on localhost, TOML round trip, one sentence per mistake."""

from __future__ import annotations

import pytest

from stemstream.core.config import ConfigError, PipelineConfig, config_from_dict, load_config


def test_defaults_put_every_role_on_localhost():
    config = load_config(None)
    assert config.network.control() == "tcp://127.0.0.1:5550"
    assert config.network.node(1, 2) == f"tcp://127.0.0.1:{5560 + 4 + 2}"
    assert not config.counting.fixed


def test_written_config_reads_back_equal(tmp_path):
    config = PipelineConfig()
    config.pipeline.nodes = 3
    config.network.node_hosts = ["10.1.0.1", "10.1.0.2", "10.1.0.3"]
    config.counting.background_threshold, config.counting.xray_threshold = 27.5, 900.0
    again = load_config(config.write(tmp_path / "p.toml"))
    assert again == config
    assert again.network.node(2, 0) == "tcp://10.1.0.3:5568"


def test_ipc_transport_names_sockets_in_its_directory():
    config = config_from_dict({"network": {"transport": "ipc", "ipc_dir": "/run/ss"}})
    assert config.network.gateway(3) == f"ipc:///run/ss/{5552 + 3}"


def test_several_gateways_share_the_modules_each_on_its_host():
    one = config_from_dict({"network": {"gateway_host": "gw"}}).network
    assert one.gateways == 1 and one.gateway_modules(0) == [0, 1, 2, 3] and one.gateway(3) == "tcp://gw:5555"
    two = config_from_dict({"network": {"gateway_hosts": ["recv0", "recv1"]}}).network
    assert two.gateways == 2 and two.gateway_modules(0) == [0, 2] and two.gateway_modules(1) == [1, 3]
    assert [two.gateway(m) for m in range(4)] == ["tcp://recv0:5552", "tcp://recv1:5553", "tcp://recv0:5554",
                                                  "tcp://recv1:5555"]
    four = config_from_dict({"network": {"gateway_hosts": ["r0", "r1", "r2", "r3"]}}).network
    assert [four.gateway_modules(g) for g in range(4)] == [[0], [1], [2], [3]]


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"pipline": {}}, "unknown section [pipline]"),
        ({"pipeline": {"nodez": 2}}, "unknown setting 'nodez' in [pipeline]"),
        ({"pipeline": {"nodes": "two"}}, "[pipeline] nodes must be an integer"),
        ({"pipeline": {"nodes": 0}}, "[pipeline] nodes must be 1 to 1024"),
        ({"pipeline": {"gateway": "yes"}}, "must be true or false"),
        ({"counting": {"background_threshold": 28}}, "give both"),
        ({"counting": {"background_threshold": 28, "xray_threshold": 20}}, "must be above"),
        ({"flow": {"end_timeout_s": -1}}, "[flow] end_timeout_s must be a positive"),
        ({"network": {"control_port": 70000}}, "[network] control_port must be a port"),
        ({"network": {"transport": "udp"}}, "transport must be"),
        ({"network": {"gateway_hosts": ["a", "b", "c", "d", "e"]}}, "gateway_hosts names at most 4 gateways"),
        ({"network": {"gateway_hosts": ["a", ""]}}, "no empty name"),
        ({"network": {"gateway_hosts": "recv0"}}, "[network] gateway_hosts must be a list of strings"),
        ({"counting": {"method": "peaks"}}, "[counting] method must be one of maxima, clusters"),
    ],
)
def test_each_mistake_gets_one_sentence_naming_the_setting(data, fragment):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_both_counting_methods_are_accepted_by_a_pipeline_config():
    # streamed as well as offline (docs/counting.md): clusters is no longer refused
    for method in ("maxima", "clusters"):
        assert config_from_dict({"counting": {"method": method}}).counting.method == method


def test_unreadable_or_invalid_toml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[pipeline\nnodes = 2")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
