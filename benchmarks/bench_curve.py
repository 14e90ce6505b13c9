"""What CURVE encryption costs: throughput with and without it.

1. A PUSH/PULL pair over TCP on loopback (sender and receiver in separate processes, as on two
   hosts) moving 5 MB messages, the size of a routing block of one module (32 sector records of
   166 kB): MB/s plaintext and with CURVE, and the ratio.
2. With ``--scan``: one scan streamed through the local pipeline (every role a process on this
   machine, TCP on loopback), plaintext and with CURVE on every link: frames/s and the ratio.

    python benchmarks/bench_curve.py --messages 200 --repeats 3 --scan 64x64
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

MESSAGE_BYTES = 32 * 165_904  # one routing block of one module: 5.3 MB


def _keys(directory: Path):
    from stemstream.core.config import PipelineConfig
    from stemstream.transport.curve import create_keys, curve_for

    if not (directory / "server.key").exists():
        create_keys(directory)
    config = PipelineConfig()
    config.security.curve = True
    config.security.keys_dir = str(directory)
    return curve_for(config)


def _sender(endpoint: str, n: int, keys_dir: str | None) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.sndhwm = 4
    sock.sndbuf = 4 * 1024 * 1024
    if keys_dir:
        _keys(Path(keys_dir)).client(sock)
    sock.connect(endpoint)
    payload = np.random.default_rng(0).integers(0, 2**16, MESSAGE_BYTES // 2, dtype=np.uint16)
    for _ in range(n):
        sock.send(payload, copy=False)
    sock.send(b"end")
    sock.close(linger=-1)
    ctx.term()


def pair_throughput(n: int, keys_dir: Path | None) -> float:
    """MB/s of n messages of MESSAGE_BYTES from a sender process to this one."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.rcvhwm = 4
    sock.rcvbuf = 4 * 1024 * 1024
    if keys_dir is not None:
        _keys(keys_dir).server(sock)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    proc = mp.get_context("spawn").Process(target=_sender, args=(f"tcp://127.0.0.1:{port}", n,
                                                                  str(keys_dir) if keys_dir else None))
    proc.start()
    first = sock.recv(copy=False)  # the clock starts at the first message (after the handshake)
    t0 = time.perf_counter()
    received = len(first.buffer)
    while True:
        frame = sock.recv(copy=False)
        if len(frame.buffer) == 3 and frame.bytes == b"end":
            break
        received += len(frame.buffer)
    seconds = time.perf_counter() - t0
    proc.join()
    sock.close(0)
    if keys_dir is not None:
        from stemstream.transport.curve import stop_authenticator

        stop_authenticator(ctx)
    ctx.term()
    assert received == n * MESSAGE_BYTES
    return (received - MESSAGE_BYTES) / seconds / 1e6


def scan_rate(shape: tuple[int, int], curve: bool, work: Path) -> float:
    """Frames/s of one simulated scan through the local pipeline (TCP on loopback)."""
    from stemstream.core.config import PipelineConfig
    from stemstream.deploy.local import LocalPipeline, ProducerSource

    config = PipelineConfig()
    config.counting.background_threshold, config.counting.xray_threshold = 28.0, 1000.0
    config.pipeline.output_dir = str(work / "out")
    config.pipeline.spill_dir = str(work / "spill")
    config.flow.heartbeat_s = 0.2
    Path(config.pipeline.output_dir).mkdir(parents=True, exist_ok=True)
    if curve:
        _keys(work / "keys")
        config.security.curve = True
        config.security.keys_dir = str(work / "keys")
    config.validate()
    with LocalPipeline(config, work / "roles", ProducerSource(seed=1)) as pipeline:
        pipeline.start()
        pipeline.run_scan(1, (8, 8), timeout_s=300)  # warm-up
        summary = pipeline.run_scan(2, shape, timeout_s=600)
    assert summary["state"] == "closed" and summary["ledger"]["frames_complete"] == shape[0] * shape[1], summary
    return summary["ledger"]["frames_complete"] / summary["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200, help="5 MB messages per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scan", default="", help="also stream one scan ROWSxCOLS with and without CURVE")
    args = parser.parse_args()
    print(f"{platform.node()}: {mp.cpu_count()} CPUs, libzmq {zmq.zmq_version()}, pyzmq {zmq.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys"
        _keys(keys)
        plain, curve = [], []
        for _ in range(args.repeats):  # interleaved, so drifting load hits both alike
            plain.append(pair_throughput(args.messages, None))
            curve.append(pair_throughput(args.messages, keys))
        p, c = statistics.median(plain), statistics.median(curve)
        print(f"PUSH/PULL, {MESSAGE_BYTES / 1e6:.1f} MB messages x {args.messages}, TCP loopback, median of {args.repeats}:")
        print(f"  plaintext {p:8.0f} MB/s   (runs {', '.join(f'{v:.0f}' for v in plain)})")
        print(f"  CURVE     {c:8.0f} MB/s   (runs {', '.join(f'{v:.0f}' for v in curve)})")
        print(f"  CURVE / plaintext = {c / p:.2f}; one module's 4D Camera stream is ~{87_000 * 165_904 / 1e6:.0f} MB/s")
        if args.scan:
            rows, cols = (int(v) for v in args.scan.lower().split("x"))
            rates = {}
            for label, on in (("plaintext", False), ("CURVE", True)):
                rates[label] = scan_rate((rows, cols), on, Path(tmp) / label)
                print(f"pipeline scan {rows}x{cols}, {label:9s}: {rates[label]:7.0f} frames/s")
            print(f"  CURVE / plaintext = {rates['CURVE'] / rates['plaintext']:.2f}")


if __name__ == "__main__":
    main()
