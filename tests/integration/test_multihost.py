"""The pipeline on several "hosts": every role in its own network namespace with its own address,
the namespaces joined by veth pairs on a bridge, the roles talking TCP across it.

This is the facility deployment on one machine: each role is started as ``stemstream <role>
--config FILE`` inside its namespace, exactly as on its own host, and the scan is started with
``stemstream scan`` from an operator "host" of its own. The counted file must equal, event for
event, the one ``stemstream run`` writes for the same simulated scan on one host.

Needs root and iproute2 (``ip netns``); skipped with the reason otherwise. The bridge lives in a
namespace of its own too, so the machine's own network is never touched; names carry this
process's pid, so parallel runs do not collide.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline_support import assert_same_events
from stemstream.core.config import PipelineConfig
from stemstream.formats.raw import N_MODULES, RECORD_BYTES
from stemstream.formats.sparse_h5 import read_counted

pytestmark = pytest.mark.slow

SUBNET = "10.77.0"
SCAN_SHAPE = (32, 32)  # (rows, cols)
SEED, DOSE = 11, 0.002
NODES = 2
GATEWAYS = 2


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


class Lab:
    """Network namespaces as hosts on one bridged /24, and the processes started in them."""

    def __init__(self, log_dir: Path):
        self.prefix = f"stemstream-mh{os.getpid()}"
        self.switch = f"{self.prefix}-switch"
        self.log_dir = log_dir
        self.namespaces: list[str] = []
        self.hosts: dict[str, str] = {}  # host name -> address
        self.processes: dict[str, subprocess.Popen] = {}

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def build_switch(self) -> None:
        self._add_namespace(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "mtu", "9000", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def add_host(self, name: str, last_octet: int) -> str:
        """A namespace with eth0 at SUBNET.last_octet on the bridge; returns its address."""
        ns = self.namespace(name)
        self._add_namespace(ns)
        port = f"p{last_octet}"
        # Made inside the switch namespace, so no interface name ever appears in the machine's own.
        _ip("-n", self.switch, "link", "add", port, "mtu", "9000", "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        address = f"{SUBNET}.{last_octet}"
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        self.hosts[name] = address
        return address

    def namespace(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def start(self, host: str, key: str, args: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{key}.log", "wb")
        cmd = ["ip", "netns", "exec", self.namespace(host), sys.executable, "-m", "stemstream", *args]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        self.processes[key] = proc
        return proc

    def run(self, host: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        cmd = ["ip", "netns", "exec", self.namespace(host), sys.executable, "-m", "stemstream", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    def rx_bytes(self, host: str) -> int:
        out = _ip("-n", self.namespace(host), "-s", "-j", "link", "show", "eth0").stdout
        return int(json.loads(out)[0]["stats64"]["rx"]["bytes"])

    def log_tails(self) -> str:
        tails = []
        for key in self.processes:
            lines = (self.log_dir / f"{key}.log").read_text(errors="replace").strip().splitlines()[-5:]
            tails.append(f"--- {key} (exit {self.processes[key].poll()})\n" + "\n".join(lines))
        return "\n".join(tails)

    def cleanup(self) -> None:
        """Stop every process (TERM, then KILL), then delete every namespace; never raises."""
        for proc in self.processes.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc in self.processes.values():
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)
        for ns in reversed(self.namespaces):
            _ip("netns", "del", ns, check=False)
        self.namespaces.clear()


@pytest.fixture
def lab(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root, and this test does not run as root")
    if shutil.which("ip") is None:
        pytest.skip("network namespaces need iproute2's `ip` command, which is not installed")
    (tmp_path / "logs").mkdir()
    lab = Lab(tmp_path / "logs")
    try:
        try:
            lab.build_switch()
        except RuntimeError as exc:
            pytest.skip(f"cannot create network namespaces here ({exc})")
        yield lab
    finally:
        lab.cleanup()
    leftover = [line for line in _ip("netns", "list").stdout.splitlines() if line.startswith(lab.prefix)]
    assert not leftover, f"namespaces left behind: {leftover}"


def multihost_config(lab: Lab, tmp_path: Path) -> PipelineConfig:
    config = PipelineConfig()
    net = config.network
    net.control_host = lab.add_host("control", 1)
    net.writer_host = lab.add_host("writer", 2)
    # two gateways, as at a facility with one per pair of receivers: modules 0, 2 and 1, 3
    net.gateway_hosts = [lab.add_host(f"gateway{g}", 3 + g) for g in range(GATEWAYS)]
    net.node_hosts = [lab.add_host(f"node{i}", 21 + i) for i in range(NODES)]
    for m in range(N_MODULES):
        lab.add_host(f"producer{m}", 11 + m)
    lab.add_host("operator", 30)
    net.host = "192.0.2.1"  # TEST-NET: a role whose host the config forgot to name connects nowhere
    net.bind_host = "*"
    net.transport = "tcp"
    config.pipeline.nodes = NODES
    config.pipeline.gateway = True
    config.pipeline.output_dir = str(tmp_path / "multihost")
    config.pipeline.spill_dir = str(tmp_path / "spill")
    config.pipeline.state_file = str(tmp_path / "control.state")
    config.counting.background_threshold, config.counting.xray_threshold = 28.0, 1000.0
    config.flow.heartbeat_s = 0.2
    config.flow.end_timeout_s = 2.0
    return config.validate()


def test_roles_on_separate_hosts_give_the_same_file_as_the_embedded_run(lab, tmp_path):
    config = multihost_config(lab, tmp_path)
    Path(config.pipeline.output_dir).mkdir()
    path = str(config.write(tmp_path / "pipeline.toml"))
    lab.start("control", "control", ["control", "--config", path])
    lab.start("writer", "writer", ["writer", "--config", path])
    for i in range(NODES):
        lab.start(f"node{i}", f"node-{i}", ["node", "--config", path, "--index", str(i)])
    for g in range(GATEWAYS):
        lab.start(f"gateway{g}", f"gateway-{g}", ["gateway", "--config", path, "--index", str(g)])
    for m in range(N_MODULES):
        lab.start(f"producer{m}", f"producer-{m}", ["producer", "--config", path, "--module", str(m),
                                                    "--seed", str(SEED), "--dose", str(DOSE)])
    rows, cols = SCAN_SHAPE
    gateway_rx_before = [lab.rx_bytes(f"gateway{g}") for g in range(GATEWAYS)]
    # Roles start slowly on a loaded machine (imports, compiled kernels): --wait-roles covers that.
    scan = lab.run("operator", ["scan", "--config", path, "--shape", f"{rows}x{cols}", "--scan-number", "1",
                                "--wait-roles", "180", "--timeout", "300"], timeout=600)
    assert scan.returncode == 0, f"{scan.stdout}\n{scan.stderr}\n{lab.log_tails()}"
    assert "every frame accounted for" in scan.stdout
    # The sectors really crossed the network: each gateway host received at least every raw byte
    # of its two modules.
    n_frames = rows * cols
    for g in range(GATEWAYS):
        assert lab.rx_bytes(f"gateway{g}") - gateway_rx_before[g] >= n_frames * 2 * RECORD_BYTES

    files = list(Path(config.pipeline.output_dir).glob("*.h5"))
    assert len(files) == 1, files
    ledger = read_counted(files[0]).metadata["stemstream"]["ledger"]
    assert ledger["frames_expected"] == ledger["frames_complete"] == n_frames
    assert ledger["frames_incomplete"] == ledger["frames_missing"] == 0
    assert sum(ledger["sectors_rejected"]) == 0

    embedded_dir = tmp_path / "embedded"
    embedded = subprocess.run(
        [sys.executable, "-m", "stemstream", "run", "--simulate", f"{rows}x{cols}", "--seed", str(SEED),
         "--dose", str(DOSE), "--background-threshold", "28", "--xray-threshold", "1000",
         "--nodes", str(NODES), "--no-dashboard", "--output", str(embedded_dir)],
        capture_output=True, text=True, timeout=600)
    assert embedded.returncode == 0, embedded.stdout + embedded.stderr
    (embedded_file,) = embedded_dir.glob("*.h5")
    assert_same_events(files[0], embedded_file)
