"""The writer's CPU per frame, without sockets: the EVENTS and ANALYSIS messages of a scan, as node
groups send them (block by block, partial analyses every few blocks), decoded and applied by one
WriterScan as the writer role does (pipeline.writer.role.Writer.handle), then closed.

    python benchmarks/bench_writer.py --scan-shape 256x256 --events-per-frame 600 --repeats 3

Prints the CPU time per frame (process time: the writer is one thread) of each stage and the
rate against the 4D Camera's 87,000 frames/s, which one writer must take (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import parse_shape

from stemstream.analysis import ScanAnalyses, default_analyses
from stemstream.core.config import FlowSettings
from stemstream.core.detector import FRAME_SHAPE, N_MODULES
from stemstream.core.scan_spec import CalibrationSettings, ScanSpec
from stemstream.counting.thresholds import fixed_thresholds
from stemstream.formats import wire
from stemstream.formats.ledger import sector_tally
from stemstream.pipeline.writer.scan import ScanHooks, WriterScan

DETECTOR_RATE = 87_000  # frames/s of the 4D Camera
N_PIXELS = FRAME_SHAPE[0] * FRAME_SHAPE[1]
ALL = (1 << N_MODULES) - 1


def messages(shape: tuple[int, int], block_frames: int, events_per_frame: int, analysis_every: int,
             nodes: int, seed: int) -> list[list[bytes]]:
    """The scan's messages as bytes off the wire: per block an EVENTS message of its frames (a
    random ``events_per_frame`` pixels each), blocks dealt to ``nodes`` node groups in turn, an
    ANALYSIS message of each node group's partials after every ``analysis_every`` of its blocks,
    and a DONE per node group. shape: (rows, cols) of positions."""
    rng = np.random.default_rng(seed)
    n = shape[0] * shape[1]
    analyses = default_analyses(FRAME_SHAPE, {})
    partials = {node: ScanAnalyses(analyses, shape) for node in range(nodes)}
    pool = np.sort(rng.choice(N_PIXELS, size=(64, events_per_frame), replace=True), axis=1).astype(np.uint32)
    out, since = [], [0] * nodes
    for block, start in enumerate(range(0, n, block_frames)):
        node = block % nodes
        frames = np.arange(start, min(start + block_frames, n))
        lists = [np.unique(pool[(f * 7) % len(pool)]) for f in frames]
        offsets = np.zeros(len(frames) + 1, np.int64)
        np.cumsum([len(e) for e in lists], out=offsets[1:])
        flat = np.concatenate(lists)
        tally = sector_tally()
        tally["sectors_received"] = [len(frames)] * N_MODULES
        out.append(wire.encode_events(1, node, frames.astype(np.uint32), frames.astype(np.int64),
                                      np.full(len(frames), ALL, np.uint8), offsets, flat, block=block, ledger=tally))
        partials[node].accumulate(frames.astype(np.int64), flat, offsets)
        since[node] += 1
        if since[node] == analysis_every:
            out.append(wire.encode_analysis(1, node, partials[node].take_partials()))
            since[node] = 0
    for node in range(nodes):
        out.append(wire.encode_analysis(1, node, partials[node].take_partials()))
        out.append(wire.encode_done(1, node, sector_tally(), [0] * N_MODULES))
    return [[bytes(memoryview(np.ascontiguousarray(p))) if not isinstance(p, bytes) else p for p in m] for m in out]


def run_once(spec: ScanSpec, msgs: list[list[bytes]], out_dir: Path) -> dict:
    hooks = ScanHooks(latest_spec=lambda: spec, heartbeat=lambda: None, node_heard=lambda node: True,
                      reject=lambda reason, detail: None, check_space=lambda: None)
    analyses = default_analyses(FRAME_SHAPE, {})
    t0 = time.process_time()
    scan = WriterScan(spec, out_dir, analyses, FlowSettings(), hooks)
    t_open = time.process_time()
    reports = 0
    for i, parts in enumerate(msgs):  # as Writer.handle does
        kind = wire.kind_of(parts)
        if kind == wire.EVENTS:
            scan.receive_events(wire.decode_events(parts, N_PIXELS))
        elif kind == wire.ANALYSIS:
            envelope = wire.analysis_envelope(parts)
            scan.receive_partials(envelope["node"], envelope["stream"], parts[2:])
        else:
            scan.receive_done(wire.decode_done(parts))
        if i % 32 == 0 and scan.commits_changed:  # the writer reports commits every 0.1 s
            scan.commit_report()
            reports += 1
    t_stream = time.process_time()
    summary = scan.close()
    t_close = time.process_time()
    Path(summary["path"]).unlink()
    for image in summary["images"]:
        Path(image).unlink(missing_ok=True)
    return {"open": t_open - t0, "stream": t_stream - t_open, "close": t_close - t_stream, "total": t_close - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan-shape", type=parse_shape, default=(256, 256), help="ROWSxCOLS positions")
    parser.add_argument("--events-per-frame", type=int, default=600, help="~600 at the paper's dose")
    parser.add_argument("--block-frames", type=int, default=32)
    parser.add_argument("--analysis-every", type=int, default=16, help="blocks between a node group's partials")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows, cols = args.scan_shape
    n = rows * cols
    msgs = messages(args.scan_shape, args.block_frames, args.events_per_frame, args.analysis_every, args.nodes, 1)
    spec = ScanSpec(number=1, epoch=1, shape=args.scan_shape, frames_per_position=1, nodes=list(range(args.nodes)),
                    block_frames=args.block_frames, file_name="FOURD_bench_writer.h5",
                    calibration=CalibrationSettings(4.0, 175.0, 1200, 640),
                    thresholds=fixed_thresholds(28.0, 1000.0))
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-writer-") as tmp:
        for _ in range(args.repeats):
            runs.append(run_once(spec, msgs, Path(tmp)))
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"writer, {rows} x {cols} scan ({n:,} frames, ~{args.events_per_frame} events/frame), "
          f"median of {args.repeats}, CPU s: " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
    per_frame_ms = 1e3 * med["total"] / n
    print(f"CPU per frame: {per_frame_ms:.4f} ms (stream only {1e3 * med['stream'] / n:.4f} ms); "
          f"one core takes {1e3 / per_frame_ms:,.0f} frames/s = {1e3 / per_frame_ms / DETECTOR_RATE:.2f}x "
          f"the detector's {DETECTOR_RATE:,} frames/s")


if __name__ == "__main__":
    main()
