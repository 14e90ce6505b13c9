"""How the pipeline scales with node groups, and what one gateway can forward: the measured inputs
of the scale-out arithmetic in docs/scaling.md.

(a) The local pipeline (4 producers simulating live, gateway, N node groups, writer, control; every
    role a process on this machine) with N = each of ``--nodes``: frames/s overall and per node
    group, the speed-up against the first N, and each role's CPU seconds per frame over the timed
    scan (from the ``cpu_s`` every role reports in its heartbeats).
(b) The gateway alone: a real gateway process (and control, which it reports to), fed by 4 PUSH
    sockets in this process sending pre-built SECTORS messages in the wire format
    (``wire.encode_sectors``, ``block_frames`` records per message, simulated sector data) and
    drained by PULL sinks that discard. Reported: frames/s and GB/s forwarded and the gateway's CPU
    seconds per GB; the limit it is compared with is the same senders and sinks connected straight
    to each other in the same run (one hop less).

    python benchmarks/bench_scaling.py --nodes 1 2 3 --shape 64x64 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import zmq

from common import free_port_block, parse_shape
from stemstream.core.config import PipelineConfig
from stemstream.deploy.local import LocalPipeline, ProducerSource
from stemstream.deploy.scan import wait_for_roles
from stemstream.formats import wire
from stemstream.formats.raw import N_MODULES, RECORD_BYTES
from stemstream.transport.control_client import ControlClient
from stemstream.sources.simulator import DetectorSimulator, SimulationConfig

FRAME_BYTES = N_MODULES * RECORD_BYTES  # one frame on the wire: 4 sector records


def load() -> float:
    return os.getloadavg()[0]


# -- (a) node groups ----------------------------------------------------------------------------------


def pipeline_config(work: Path, nodes: int, transport: str) -> PipelineConfig:
    config = PipelineConfig()
    config.pipeline.nodes = nodes
    config.pipeline.output_dir = str(work / "out")
    config.pipeline.spill_dir = str(work / "spill")
    Path(config.pipeline.output_dir).mkdir(parents=True, exist_ok=True)
    if transport == "ipc":
        config.network.transport, config.network.ipc_dir = "ipc", str(work / "sockets")
        (work / "sockets").mkdir(parents=True, exist_ok=True)
    else:
        base = free_port_block(8 + 4 * nodes)
        net = config.network
        net.bind_host = "127.0.0.1"
        net.control_port, net.writer_port, net.gateway_port, net.node_base_port = base, base + 1, base + 2, base + 8
        net.live_port = base + 6
    # fixed thresholds: calibration is not what scales here (bench_count_vs_stempy.py times it)
    config.counting.background_threshold, config.counting.xray_threshold = 28.0, 1000.0
    config.flow.heartbeat_s = 0.2  # fresher CPU counters; a heartbeat costs well under 1 ms
    return config.validate()


def cpu_by_role(status: dict) -> dict[str, float]:
    return {k: r["stats"].get("cpu_s", 0.0) for k, r in status["roles"].items()}


def counted_by_node(status: dict) -> dict[str, int]:
    return {k: r["stats"].get("counters", {}).get("frames_counted", 0)
            for k, r in status["roles"].items() if k.startswith("node")}


def node_scaling(nodes: int, shape: tuple[int, int], repeats: int, transport: str, work: Path) -> dict:
    """Timed scans (shape is (rows, cols)) on a fresh local pipeline with ``nodes`` node groups."""
    config = pipeline_config(work / f"nodes{nodes}", nodes, transport)
    n_frames = shape[0] * shape[1]
    runs = []
    with LocalPipeline(config, work / f"nodes{nodes}" / "pipeline", ProducerSource(seed=1)) as pipeline:
        pipeline.start(timeout_s=180)
        pipeline.run_scan(1, (4, 8), timeout_s=300)  # warm-up: first-scan costs (caches, connections)
        # Heartbeats carry the CPU counters: wait a few after the scan so the last one includes it
        # (and before, so the scan's start is not in the "before" figure).
        settle_s = 3 * config.flow.heartbeat_s
        for k in range(repeats):
            time.sleep(settle_s)
            before = pipeline.status()
            load_before = load()
            t0 = time.perf_counter()
            summary = pipeline.run_scan(2 + k, shape, timeout_s=3600)
            seconds = time.perf_counter() - t0
            time.sleep(settle_s)
            after = pipeline.status()
            ledger = summary["ledger"]
            cpu0, cpu1 = cpu_by_role(before), cpu_by_role(after)
            c0, c1 = counted_by_node(before), counted_by_node(after)
            runs.append({
                "seconds": seconds,
                "frames_per_s": n_frames / seconds,
                "complete": ledger["frames_complete"] == n_frames and ledger["frames_incomplete"] == 0,
                "cpu_ms_per_frame": {k: 1000 * (cpu1[k] - cpu0.get(k, 0.0)) / n_frames for k in sorted(cpu1)},
                "frames_per_node": {k: c1[k] - c0.get(k, 0) for k in sorted(c1)},
                "load": [load_before, load()],
            })
            Path(summary["path"]).unlink(missing_ok=True)
    best = max(runs, key=lambda r: r["frames_per_s"])
    return {"nodes": nodes, "runs": runs, "frames_per_s": best["frames_per_s"],
            "frames_per_s_per_node": best["frames_per_s"] / nodes, "cpu_ms_per_frame": best["cpu_ms_per_frame"],
            "complete": all(r["complete"] for r in runs)}


# -- (b) the gateway alone ----------------------------------------------------------------------------


def sector_messages(module: int, nodes: int, block_frames: int, n_blocks: int) -> list[list]:
    """n_blocks SECTORS messages of one module, routed block % nodes as producers route them; all
    share one array of simulated records (the gateway never looks inside)."""
    sim = DetectorSimulator(SimulationConfig(scan_shape=(1, block_frames), seed=module))
    records = sim.records(0, block_frames, module)
    return [wire.encode_sectors(1, module, b, b % nodes, records) for b in range(n_blocks)]


class Sinks:
    """PULL sockets bound where node groups would listen, drained by one thread that discards."""

    def __init__(self, context: zmq.Context, endpoints: list[str], hwm: int):
        self.sockets = []
        for endpoint in endpoints:
            sock = context.socket(zmq.PULL)
            sock.setsockopt(zmq.RCVHWM, hwm)
            sock.setsockopt(zmq.RCVBUF, 4 * 1024 * 1024)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(endpoint)
            self.sockets.append(sock)
        self.messages = 0
        self.bytes = 0
        self.stop = False
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        poller = zmq.Poller()
        for sock in self.sockets:
            poller.register(sock, zmq.POLLIN)
        while not self.stop:
            for sock, _ in poller.poll(50):
                while True:
                    try:
                        parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.bytes += len(parts[-1])
                    self.messages += 1

    def wait_for(self, messages: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.messages < messages:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def close(self) -> None:
        self.stop = True
        self.thread.join(5)
        for sock in self.sockets:
            sock.close(0)


def send_all(context: zmq.Context, endpoints: list[str], messages: list[list[list]], hwm: int) -> list[zmq.Socket]:
    """One PUSH socket and thread per module sending its messages without copies; returns the
    sockets (closed by the caller once everything arrived)."""
    sockets, threads = [], []
    for endpoint, module_messages in zip(endpoints, messages):
        sock = context.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.SNDBUF, 4 * 1024 * 1024)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sockets.append(sock)
        threads.append(threading.Thread(target=lambda s=sock, m=module_messages: [s.send_multipart(p, copy=False) for p in m]))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sockets


def hop(context: zmq.Context, send_to: list[str], sinks: Sinks, messages: list[list[list]], hwm: int,
        gateway_pid: int | None) -> dict:
    """Send every message, wait until the sinks have them all; rates and the gateway's CPU."""
    n_messages = sum(len(m) for m in messages)
    proc = psutil.Process(gateway_pid) if gateway_pid else None
    me = psutil.Process()  # the senders and the sinks: both ends of the hop(s)
    sinks.messages = sinks.bytes = 0
    cpu0 = sum(proc.cpu_times()[:2]) if proc else 0.0
    ends0 = sum(me.cpu_times()[:2])
    t0 = time.perf_counter()
    senders = send_all(context, send_to, messages, hwm)
    arrived = sinks.wait_for(n_messages, timeout_s=600)
    seconds = time.perf_counter() - t0
    cpu = (sum(proc.cpu_times()[:2]) - cpu0) if proc else 0.0
    ends = sum(me.cpu_times()[:2]) - ends0
    for sock in senders:
        sock.close(0)
    gb = sinks.bytes / 1e9
    return {"seconds": seconds, "all_arrived": arrived, "messages": sinks.messages, "gb": gb,
            "frames_per_s": sinks.bytes / RECORD_BYTES / N_MODULES / seconds, "gb_per_s": gb / seconds,
            "gateway_cpu_s": cpu, "gateway_cpu_s_per_gb": cpu / gb if gb else float("nan"),
            "ends_cpu_s_per_gb": ends / gb if gb else float("nan"), "load": load()}


def warm_and_time(context: zmq.Context, send_to: list[str], sink_at: list[str], messages: list[list[list]],
                  hwm: int, gateway_pid: int | None) -> dict:
    """A short warm-up (connections, first buffers), then the timed run, into the same sinks."""
    sinks = Sinks(context, sink_at, hwm)
    try:
        time.sleep(0.3)  # connections up before the clock starts
        hop(context, send_to, sinks, [m[:4] for m in messages], hwm, gateway_pid)
        return hop(context, send_to, sinks, messages, hwm, gateway_pid)
    finally:
        sinks.close()


def gateway_alone(sinks: int, block_frames: int, frames: int, work: Path) -> dict:
    config = PipelineConfig()
    config.pipeline.nodes = sinks
    config.pipeline.block_frames = block_frames
    base = free_port_block(8 + 4 * sinks)
    net = config.network
    net.bind_host = "127.0.0.1"
    net.control_port, net.writer_port, net.gateway_port, net.node_base_port = base, base + 1, base + 2, base + 8
    net.live_port = base + 6
    config.validate()
    path = config.write(work / "gateway.toml")
    n_blocks = max(frames // block_frames, 1)
    messages = [sector_messages(m, sinks, block_frames, n_blocks) for m in range(N_MODULES)]
    sink_endpoints = [net.bind(net.node_port(i, m)) for i in range(sinks) for m in range(N_MODULES)]
    context = zmq.Context()
    logs = open(work / "gateway.log", "wb")
    procs = [subprocess.Popen([sys.executable, "-m", "stemstream", role, "--config", str(path)],
                              stdout=logs, stderr=subprocess.STDOUT) for role in ("control", "gateway")]
    control = ControlClient.for_config(config, context, timeout_s=5.0)
    try:
        wait_for_roles(control, {"gateway-0"}, config, timeout_s=120)
        # the gateway routes only messages of a scan control has open, to that scan's node groups
        reply = control.request("start_scan", scan_number=1, scan_shape=[n_blocks, block_frames],
                                nodes=list(range(sinks)))
        if not reply.get("ok"):
            raise SystemExit(f"control refused the benchmark's scan: {reply.get('error')}")
        through = warm_and_time(context, [net.gateway(m) for m in range(N_MODULES)], sink_endpoints, messages,
                                config.flow.send_hwm, procs[1].pid)
        control.request("shutdown", timeout_s=2.0)
    finally:
        control.close()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        logs.close()
    # The limit: the same senders straight into the same sinks, one hop less (no gateway process).
    direct_base = free_port_block(4)
    direct_sinks = [f"tcp://127.0.0.1:{direct_base + m}" for m in range(N_MODULES)]
    direct = warm_and_time(context, direct_sinks, direct_sinks, messages, config.flow.send_hwm, None)
    context.term()
    return {"sinks": sinks, "block_frames": block_frames, "frames": n_blocks * block_frames,
            "through_gateway": through, "direct": direct,
            "ratio_gateway_to_direct": through["frames_per_s"] / direct["frames_per_s"]}


# -- output -------------------------------------------------------------------------------------------


def print_nodes(results: list[dict], shape: tuple[int, int]) -> None:
    print(f"\n(a) local pipeline, {shape[0]}x{shape[1]} scan ({shape[0] * shape[1]:,} frames), best of the repeats")
    first = results[0]["frames_per_s"]
    print(f"{'node groups':>11} {'frames/s':>9} {'per group':>10} {'vs first':>9} {'GB/s':>6} {'complete':>9}  load")
    for r in results:
        loads = ", ".join(f"{a:.1f}->{b:.1f}" for a, b in (run["load"] for run in r["runs"]))
        print(f"{r['nodes']:>11} {r['frames_per_s']:>9,.0f} {r['frames_per_s_per_node']:>10,.0f} "
              f"{r['frames_per_s'] / first:>8.2f}x {r['frames_per_s'] * FRAME_BYTES / 1e9:>6.2f} "
              f"{r['complete']!s:>9}  {loads}")
    roles = sorted({k for r in results for k in r["cpu_ms_per_frame"]})
    print("\nCPU ms per frame by role (user + system, over the timed scan):")
    print(f"{'role':>11} " + " ".join(f"{'N=' + str(r['nodes']):>8}" for r in results))
    for role in roles:
        print(f"{role:>11} " + " ".join(f"{r['cpu_ms_per_frame'].get(role, float('nan')):>8.3f}" for r in results))
    print(f"{'all roles':>11} " + " ".join(f"{sum(r['cpu_ms_per_frame'].values()):>8.3f}" for r in results))


def print_gateway(g: dict) -> None:
    t, d = g["through_gateway"], g["direct"]
    print(f"\n(b) gateway alone: {g['frames']:,} frames x 4 modules, {g['block_frames']} frames per message, "
          f"{g['sinks']} sink groups, TCP on loopback")
    print(f"{'path':>16} {'frames/s':>9} {'GB/s':>6} {'gateway CPU s/GB':>17} {'senders+sinks CPU s/GB':>23} "
          f"{'all arrived':>12} {'load':>5}")
    print(f"{'through gateway':>16} {t['frames_per_s']:>9,.0f} {t['gb_per_s']:>6.2f} {t['gateway_cpu_s_per_gb']:>17.3f} "
          f"{t['ends_cpu_s_per_gb']:>23.3f} {t['all_arrived']!s:>12} {t['load']:>5.1f}")
    print(f"{'direct (limit)':>16} {d['frames_per_s']:>9,.0f} {d['gb_per_s']:>6.2f} {'-':>17} "
          f"{d['ends_cpu_s_per_gb']:>23.3f} {d['all_arrived']!s:>12} {d['load']:>5.1f}")
    print(f"ratio gateway / direct: {g['ratio_gateway_to_direct']:.2f}; one gateway core at this CPU cost forwards "
          f"{1 / t['gateway_cpu_s_per_gb']:.2f} GB/s = {1e9 / t['gateway_cpu_s_per_gb'] / FRAME_BYTES:,.0f} frames/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3], help="node group counts to run")
    parser.add_argument("--shape", type=parse_shape, default=(64, 64), help="scan shape ROWSxCOLS for (a)")
    parser.add_argument("--repeats", type=int, default=1, help="timed scans per node group count (best reported)")
    parser.add_argument("--transport", choices=["ipc", "tcp"], default="ipc",
                        help="(a): ipc as `stemstream run` uses on one host, or tcp on loopback")
    parser.add_argument("--gateway-frames", type=int, default=4096, help="(b): frames sent through the gateway")
    parser.add_argument("--gateway-sinks", type=int, default=2, help="(b): node groups the gateway routes to")
    parser.add_argument("--block-frames", type=int, default=32, help="(b): frames per message")
    parser.add_argument("--skip-nodes", action="store_true", help="only (b)")
    parser.add_argument("--skip-gateway", action="store_true", help="only (a)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if any(n < 1 for n in args.nodes) or args.repeats < 1 or args.gateway_frames < 1 or args.gateway_sinks < 1:
        parser.error("--nodes, --repeats, --gateway-frames and --gateway-sinks must be at least 1")
    if not 1 <= args.block_frames <= 1024:
        parser.error("--block-frames must be 1 to 1024")
    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "load_at_start": load()}
    print(f"machine: {results['machine']}; load average at start {results['load_at_start']:.1f}")
    try:
        if not args.skip_nodes:
            results["shape"] = list(args.shape)
            results["nodes"] = [node_scaling(n, args.shape, args.repeats, args.transport, work) for n in args.nodes]
            print_nodes(results["nodes"], args.shape)
        if not args.skip_gateway:
            results["gateway"] = gateway_alone(args.gateway_sinks, args.block_frames, args.gateway_frames, work)
            print_gateway(results["gateway"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
