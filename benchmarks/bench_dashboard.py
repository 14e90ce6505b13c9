"""Does watching slow the pipeline? The same scan streamed with no dashboard, with the dashboard
running and nobody watching, and with 3 headless browsers (Debian's chromium via Playwright)
showing the live page (or 3 plain WebSocket clients with ``--clients ws``). Target: at most 5%
fewer frames/s with 3 browsers than with no dashboard.

One local pipeline (every role a process on this machine, as ``stemstream run``) streams every
scan; the dashboard (``stemstream serve``) is started and stopped between conditions, and the
conditions take turns round after round so that drift of the machine hits them alike. Frames/s
is the writer's: frames written / seconds from the scan's start to its file closed. With watchers
the writer also renders live images (it does only while someone watches), so that cost counts.

    python benchmarks/bench_dashboard.py --shape 128x128 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from stemstream.core.config import PipelineConfig
from stemstream.deploy.local import LocalPipeline, ProducerSource
from stemstream.web.server import free_port
from common import parse_shape

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"]




class Dashboard:
    """``stemstream serve`` for the pipeline's config, as its own process."""

    def __init__(self, config_path: Path, port: int, log: Path):
        self.url = f"http://127.0.0.1:{port}/"
        env = {**os.environ, "STEMSTREAM_TOKEN": "bench"}
        self.proc = subprocess.Popen([sys.executable, "-m", "stemstream", "serve", "--config", str(config_path),
                                      "--port", str(port)], stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        import urllib.request

        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.url + "api/status", timeout=1).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the dashboard did not start (see {log})") from None
                time.sleep(0.2)
        self.ps = psutil.Process(self.proc.pid)

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class Browsers:
    """N headless Chromium pages on the live page, each in its own browser context (own renderer)."""

    def __init__(self, url: str, n: int):
        from playwright.sync_api import sync_playwright

        self.pw = sync_playwright().start()
        self.browser = self.pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        self.pages = []
        for _ in range(n):
            page = self.browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
            page.goto(url)
            page.wait_for_function("document.getElementById('control-state').textContent === 'connected'",
                                   timeout=20000)
            self.pages.append(page)

    def processes(self) -> list[psutil.Process]:
        """Chromium's processes and Playwright's driver (descendants of this process)."""
        return [p for p in psutil.Process().children(recursive=True)
                if any(n in (p.name() or "") for n in ("chrom", "node"))]

    def images_seen(self) -> list[int]:
        return [p.evaluate("document.querySelectorAll('#live-images img').length") for p in self.pages]

    def close(self) -> None:
        self.browser.close()
        self.pw.stop()


class SocketClients:
    """N plain WebSocket clients that read every message (what a browser receives, without drawing)."""

    def __init__(self, url: str, n: int):
        import websockets

        self.received = [0] * n
        self.stop_flag = False
        ws_url = url.replace("http://", "ws://") + "ws"

        async def client(i: int) -> None:
            async with websockets.connect(ws_url, max_size=None) as ws:
                while not self.stop_flag:
                    try:
                        await asyncio.wait_for(ws.recv(), 0.5)
                        self.received[i] += 1
                    except asyncio.TimeoutError:
                        pass

        async def all_clients() -> None:
            await asyncio.gather(*(client(i) for i in range(n)))

        self.thread = threading.Thread(target=lambda: asyncio.run(all_clients()), daemon=True)
        self.thread.start()
        time.sleep(1.0)

    def processes(self) -> list[psutil.Process]:
        return []

    def images_seen(self) -> list[int]:
        return self.received

    def close(self) -> None:
        self.stop_flag = True
        self.thread.join(5)


def cpu_of(processes: list[psutil.Process]) -> float:
    total = 0.0
    for p in processes:
        try:
            t = p.cpu_times()
            total += t.user + t.system + getattr(t, "children_user", 0) + getattr(t, "children_system", 0)
        except psutil.Error:
            pass
    return total


def role_cpu(pipeline: LocalPipeline) -> dict[str, float]:
    return {k: r["stats"].get("cpu_s", 0.0) for k, r in pipeline.status()["roles"].items()}


def scan(pipeline: LocalPipeline, number: int, shape: tuple[int, int]) -> float:
    summary = pipeline.run_scan(number, shape, timeout_s=600)
    ledger = summary["ledger"]
    if ledger["frames_complete"] != ledger["frames_expected"]:
        raise RuntimeError(f"scan {number} incomplete: {ledger}")
    Path(summary["path"]).unlink(missing_ok=True)
    return summary["frames_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="128x128", help="scan shape ROWSxCOLS")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (none, idle, watched) scans")
    parser.add_argument("--clients", choices=["browsers", "ws"], default="browsers")
    parser.add_argument("--watchers", type=int, default=3)
    args = parser.parse_args()
    if args.clients == "browsers" and not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing (apt-get install chromium): using WebSocket clients instead")
        args.clients = "ws"
    shape = parse_shape(args.shape)
    work = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    config = PipelineConfig()
    config.pipeline.output_dir = str(work / "out")
    config.pipeline.spill_dir = str(work / "spill")
    config.network.transport, config.network.ipc_dir = "ipc", str(work / "sockets")
    (work / "sockets").mkdir()
    config.counting.background_threshold, config.counting.xray_threshold = 28.0, 1000.0
    port = free_port("127.0.0.1", 18400, tries=100)
    watched_name = f"{args.watchers} {'browsers' if args.clients == 'browsers' else 'WS clients'}"
    conditions = ["no dashboard", "dashboard, nobody watching", f"dashboard, {watched_name}"]
    fps: dict[str, list[float]] = {c: [] for c in conditions}
    cpu: dict[str, dict[str, list[float]]] = {c: {"pipeline": [], "writer": [], "dashboard": [], "watchers": []}
                                              for c in conditions}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; scan {args.shape} "
          f"({shape[0] * shape[1]:,} frames), {args.rounds} rounds")
    number = 0

    def measured(condition: str, dashboard: Dashboard | None, procs: list[psutil.Process]) -> None:
        nonlocal number
        number += 1
        r0, d0, b0 = role_cpu(pipeline), dashboard.cpu_s() if dashboard else 0.0, cpu_of(procs)
        fps[condition].append(scan(pipeline, number, shape))
        time.sleep(2 * config.flow.heartbeat_s)  # the roles' next heartbeats carry their CPU time
        r1 = role_cpu(pipeline)
        cpu[condition]["pipeline"].append(sum(r1[k] - r0.get(k, 0.0) for k in r1 if not k.startswith("dashboard")))
        cpu[condition]["writer"].append(r1.get("writer-0", 0.0) - r0.get("writer-0", 0.0))
        cpu[condition]["dashboard"].append(dashboard.cpu_s() - d0 if dashboard else 0.0)
        cpu[condition]["watchers"].append(cpu_of(procs) - b0)

    seen: list = []

    def run_condition(k: int) -> None:
        if k == 0:
            measured(conditions[0], None, [])
            return
        dashboard = Dashboard(pipeline.config_path, port, work / "dashboard.log")
        try:
            time.sleep(1.0)
            if k == 1:
                measured(conditions[1], dashboard, [])
                return
            watchers = Browsers(dashboard.url, args.watchers) if args.clients == "browsers" \
                else SocketClients(dashboard.url, args.watchers)
            try:
                time.sleep(1.0)
                measured(conditions[2], dashboard, watchers.processes())
                seen[:] = watchers.images_seen()
            finally:
                watchers.close()
        finally:
            dashboard.stop()

    with LocalPipeline(config.validate(), work / "pipeline", ProducerSource(seed=1)) as pipeline:
        pipeline.start()
        number += 1
        scan(pipeline, number, (32, 32))  # warm-up
        for r in range(args.rounds):
            order = [(r + i) % 3 for i in range(3)]  # each condition first, middle and last in turn
            for k in order:
                run_condition(k)
            line = f"round {r + 1}: " + ", ".join(f"{c} {fps[c][-1]:,.0f}" for c in conditions) + " frames/s"
            if args.clients == "ws":
                line += f" (each WebSocket client got {seen} messages)"
            print(line, flush=True)
    base = statistics.median(fps[conditions[0]])
    print(f"\n{'condition':<30} {'frames/s':>9} {'runs':>22} {'vs none':>8}   CPU s per scan: pipeline (writer) / dashboard / watchers")
    for c in conditions:
        med = statistics.median(fps[c])
        runs = " ".join(f"{v:,.0f}" for v in fps[c])
        m = {k: statistics.median(v) for k, v in cpu[c].items()}
        print(f"{c:<30} {med:>9,.0f} {runs:>22} {med / base:>7.3f}x   "
              f"{m['pipeline']:.2f} ({m['writer']:.2f}) / {m['dashboard']:.2f} / {m['watchers']:.2f}")
    # the machine's pace drifts between rounds: compare within each round, then take the median
    paired = [w / n for w, n in zip(fps[conditions[2]], fps[conditions[0]])]
    slowdown = 1 - statistics.median(paired)
    # frames/s on a shared machine is noisy; CPU time is not: where the pipeline is CPU-bound, the
    # share of CPU the watching adds is the slowdown to expect
    none_cpu = statistics.median(cpu[conditions[0]]["pipeline"])
    extra_server = statistics.median(cpu[conditions[2]]["writer"]) - statistics.median(cpu[conditions[0]]["writer"]) \
        + statistics.median(cpu[conditions[2]]["dashboard"])
    extra_all = extra_server + statistics.median(cpu[conditions[2]]["watchers"])
    print(f"\nslowdown with {watched_name}: {100 * slowdown:.1f}% (median of the rounds' ratios "
          f"{' '.join(f'{x:.3f}' for x in paired)}; target <= 5%)")
    print(f"CPU added per scan by watching: {extra_server:.2f} s on the server side (writer's live images, "
          f"dashboard) = {100 * extra_server / none_cpu:.1f}% of the pipeline's {none_cpu:.2f} s; "
          f"{100 * extra_all / none_cpu:.1f}% with the watchers themselves on this machine")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
