"""What a node group learns from a stream's first frames before it counts them: the thresholds
and, for the cluster method, the single-electron model.

Thresholds are agreed by every node group of the scan: until the spec carries them, each node
group samples its share of the calibration frames (from its first complete blocks) into a pixel
histogram, sends it to control once the share is met (or the scan ended), and control fits the
thresholds from all the histograms and puts them in the spec. The cluster method's model is not
agreed: each node group then calibrates its own from the complete frames of its first settled
blocks, ``CLUSTER_FRAMES`` of them as offline (counting.cluster_counter.ClusterSample), so node
groups differ by their samples' noise (docs/counting.md, "Limits"; the file keeps each model).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from stemstream.core.detector import FRAME_SHAPE, N_MODULES
from stemstream.core.scan_spec import ScanSpec
from stemstream.core.thresholds import Thresholds
from stemstream.counting.cluster_counter import ClusterCounter, ClusterSample
from stemstream.counting.kernel import ElectronCounter
from stemstream.counting.thresholds import PixelHistogram, draw_sample_weights
from stemstream.pipeline.node.blocks import Block, IndexedBlock

ALL_MODULES = (1 << N_MODULES) - 1  # a frame's ``present`` mask when every sector arrived


class StreamCalibration:
    """One stream's calibration on node group ``node``; ``method``: [counting] method."""

    def __init__(self, spec: ScanSpec, node: int, method: str):
        self.epoch, self.method = spec.epoch, method
        self.thresholds: Thresholds | None = None
        self.counter: ElectronCounter | ClusterCounter | None = None  # once thresholds (and model) are here
        self.sent = False  # the histogram went to control
        self._histogram = PixelHistogram()
        cal, n_nodes = spec.calibration, len(spec.nodes)
        self._quota = math.ceil(cal.calibration_frames / n_nodes)
        self._weights = draw_sample_weights(self._quota, math.ceil(cal.samples / n_nodes), seed=1000 + node)
        self._sampled = 0
        self._sampled_blocks: set[int] = set()
        self._frames = np.empty((spec.block_frames, *FRAME_SHAPE), np.uint16)  # a block's frames, assembled
        self._model = ClusterSample()
        self._model_blocks: set[int] = set()
        if spec.thresholds is not None:
            self.take(spec.thresholds)

    @property
    def awaiting_thresholds(self) -> bool:
        """True once the histogram was sent, until control's thresholds came."""
        return self.thresholds is None and self.sent

    def take(self, thresholds: Thresholds) -> None:
        self.thresholds = thresholds
        if self.method == "maxima":  # clusters: once the model is calibrated too
            self.counter = ElectronCounter(thresholds.background, thresholds.xray, FRAME_SHAPE)

    def step(self, blocks: list[tuple[int, Block]], index: Callable[[int, Block], IndexedBlock],
             settled: Callable[[int, Block], bool], final: bool, gated: bool,
             send: Callable[[dict], None], latest_spec: Callable[[], ScanSpec | None]) -> bool:
        """Go as far as the stream's pending ``blocks`` (number, block), ascending, allow. index:
        a block's frames (its sectors not counted in the ledger); settled: no part of the block
        may still come; final: the stream ended; gated: the blocks waiting reached the memory
        bound; send: the histogram to control; latest_spec: the scan's newest spec. True once
        the counter is ready; raises ClusterCalibrationError when the model cannot be fitted."""
        if self.thresholds is None:
            for number, block in blocks:
                if self._sampled >= self._quota:
                    break
                if number not in self._sampled_blocks and (block.modules == N_MODULES or final):
                    self._sample_histogram(number, index(number, block))
            if not self.sent and (self._sampled >= self._quota or final):
                send(self._histogram.to_wire())
                self.sent = True
            spec = latest_spec() if self.sent else None
            if spec is not None and spec.epoch == self.epoch and spec.thresholds is not None:
                self.take(spec.thresholds)
        if self.thresholds is not None and self.counter is None:
            self._calibrate_model(blocks, index, settled, final or gated)
        return self.counter is not None

    def _sample_histogram(self, number: int, indexed: IndexedBlock) -> None:
        frames = indexed.frames(self._frames)
        for i in np.flatnonzero(indexed.present == ALL_MODULES):
            if self._sampled >= self._quota:
                break
            w = int(self._weights[self._sampled])
            if w:
                self._histogram.add(frames[i], weight=w)
            self._sampled += 1
        self._sampled_blocks.add(number)

    def _calibrate_model(self, blocks, index, settled, now: bool) -> None:
        """The model from the complete frames of the first settled blocks, once it has its
        frames (or ``now``: the stream ended or the memory bound is reached)."""
        for number, block in blocks:
            if self._model.full or not (now or settled(number, block)):
                break
            if number not in self._model_blocks:
                indexed = index(number, block)
                self._model.add(indexed.frames(self._frames)[indexed.present == ALL_MODULES])
                self._model_blocks.add(number)
        if self._model.full or now:
            self.counter = self._model.counter(self.thresholds)
