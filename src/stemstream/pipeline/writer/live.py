"""The writer's live results: the images and progress of its scans, for the dashboard.

The writer holds every scan's analyses, so it answers for them itself, on a socket of its own
(``[network] live_port``); control carries the scan lifecycle only. A ROUTER socket answers

- ``{op: "live", scan: N}`` -> a small map ``{ok, scan, names, progress, updated, state}``
  followed by one frame of PNG bytes per name (images are ~10-100 kB each: they travel as frames
  of their own, never inside msgpack, whose maps are capped at 64 kB);
  ``{ok: false, error}`` for a scan the writer has not seen.

Rendering costs the writer more than writing, so images are rendered only while someone asked
within ``WANTED_S``, at most every ``RENDER_INTERVAL_S``, and they cost the same whatever the
scan's size: :class:`LiveImages` renders at most ``LIVE_SIDE`` pixels a side from blocks of
positions binned as frames arrive. The last images of the latest ``KEPT_CLOSED`` closed scans
stay available (the dashboard shows them until the next scan).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import zmq

from stemstream.analysis.scan import ScanAnalyses
from stemstream.formats.png import block_sums, png_bytes, scale_image, shrink
from stemstream.transport.messages import MessageError, pack_control, unpack_control

log = logging.getLogger(__name__)

WANTED_S = 5.0  # images are rendered while someone asked this recently (s)
# At most this often per scan, counted from the start of a render: the writer asks every 0.4 s
# (pipeline.writer.role), so each of its asks renders, ~2.5 images a second, however long rendering took.
RENDER_INTERVAL_S = 0.3
KEPT_CLOSED = 8  # closed scans whose last images are still served
_REQUESTS_PER_PASS = 32  # answered per call of serve(): the data path must not wait on viewers
# The longest side of a live image (px): about a dashboard tile (230-290 px wide), half a frame.
LIVE_SIDE = 288


@dataclass
class LiveScan:
    """What the writer last rendered of one scan."""

    images: dict[str, bytes] = field(default_factory=dict)  # "<analysis>/<view>" -> PNG
    progress: dict = field(default_factory=dict)
    updated: float = 0.0  # Unix time of the images
    state: str = "running"  # running -> closed | failed
    render_started: float = float("-inf")  # monotonic


class LiveService:
    """Answers live requests; the writer calls :meth:`update` and :meth:`serve` from its loop."""

    def __init__(self, context: zmq.Context, curve=None):
        """curve: a stemstream.transport.curve.Curve when [security] curve is on."""
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.server(self.socket)
        self.scans: OrderedDict[int, LiveScan] = OrderedDict()
        self.last_request = float("-inf")  # monotonic
        self.rejected = 0

    def bind(self, endpoint: str) -> None:
        self.socket.bind(endpoint)

    @property
    def wanted(self) -> bool:
        return time.monotonic() - self.last_request < WANTED_S

    def due(self, number: int) -> bool:
        """True when scan ``number``'s images should be rendered now; the caller then renders them
        and hands them to :meth:`update`. The interval runs from this answer, so the time a render
        takes does not stretch it."""
        if not self.wanted:
            return False
        live = self.scans.setdefault(number, LiveScan())
        now = time.monotonic()
        if now - live.render_started < RENDER_INTERVAL_S:
            return False
        live.render_started = now
        return True

    def update(self, number: int, progress: dict, images: dict[str, bytes] | None = None, state: str = "running") -> None:
        """The scan's latest progress, and images when they were rendered (None: keep the last)."""
        live = self.scans.setdefault(number, LiveScan())
        self.scans.move_to_end(number)
        live.progress, live.state = dict(progress), state
        if images is not None:
            live.images, live.updated = images, time.time()
        closed = [n for n, s in self.scans.items() if s.state != "running"]
        for n in closed[:-KEPT_CLOSED]:
            del self.scans[n]

    def serve(self) -> None:
        """Answer the requests waiting now (never blocks)."""
        for _ in range(_REQUESTS_PER_PASS):
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, body = parts[0], parts[-1]
            try:
                request = unpack_control(body)
                reply, frames = self._answer(request)
            except MessageError as exc:
                self.rejected += 1
                reply, frames = {"ok": False, "error": f"bad request: {exc}"}, []
            self.socket.send_multipart([identity, pack_control(reply), *frames])

    def _answer(self, request: dict) -> tuple[dict, list[bytes]]:
        if request.get("op") != "live":
            return {"ok": False, "error": f"unknown op {request.get('op')!r} (this is the writer's live service)"}, []
        number = request.get("scan")
        if isinstance(number, bool) or not isinstance(number, int):
            raise MessageError("bad_request", "scan must be an integer")
        self.last_request = time.monotonic()
        live = self.scans.get(number)
        if live is None:
            return {"ok": False, "error": f"the writer has no scan {number}"}, []
        names = list(live.images)
        return ({"ok": True, "scan": number, "names": names, "progress": live.progress, "updated": live.updated,
                 "state": live.state}, [live.images[name] for name in names])

    def close(self) -> None:
        self.socket.close(0)


def _binning(side: int) -> int:
    """The block side that brings ``side`` pixels within LIVE_SIDE."""
    return -(-side // LIVE_SIDE)


class LiveImages:
    """One scan's live images at most LIVE_SIDE pixels a side, for a scan of ``shape`` (rows, cols)
    of any size.

    Scan images come from the analyses' partial results binned into blocks of ``factor`` x
    ``factor`` positions: a block's partial is the mean of its scanned positions' partials.
    Per-position partials are sums over frames that merge by adding (analysis.interface), so an
    analysis finishes a block as one position holding the block's frames: a virtual detector
    gives electrons per position, the CoM that of the block's electrons, with no dimming where a
    block is half scanned. Binning follows the frames: only the blocks of positions
    :meth:`touched` since the last render are binned again, so a render costs about the same at
    4096 x 4096 positions as at 256 x 256. Other images (the summed pattern) are block means.
    """

    def __init__(self, shape: tuple[int, int]):
        self.shape = shape
        self.factor = _binning(max(shape))
        self.coarse_shape = (-(-shape[0] // self.factor), -(-shape[1] // self.factor))
        self.scanned = np.zeros(self.coarse_shape)  # positions with a frame, per block
        self.sums: dict[tuple[str, str], np.ndarray] = {}  # (analysis, partial) -> sums per block
        self.dirty = (0, shape[0] * shape[1])  # flat positions [lo, hi) changed since the last render

    def touched(self, lo: int, hi: int) -> None:
        """Positions ``lo`` to ``hi - 1`` (flat) got frames or partial results."""
        if hi > lo:
            old_lo, old_hi = self.dirty
            self.dirty = (lo, hi) if old_hi <= old_lo else (min(lo, old_lo), max(hi, old_hi))

    def render(self, analyses: ScanAnalyses, frames: np.ndarray) -> dict[str, bytes]:
        """``<analysis>/<view>`` -> PNG of every view of ``analyses``; ``frames`` (flat, per
        position) > 0 marks the positions scanned, the others stay blank (NaN) so the colour
        scale follows the data that is in."""
        images = self.images(analyses, frames)
        return {key: png_bytes(scale_image(image, kind)) for key, (image, kind) in images.items()}

    def images(self, analyses: ScanAnalyses, frames: np.ndarray) -> dict[str, tuple[np.ndarray, str]]:
        """What :meth:`render` draws: ``<analysis>/<view>`` -> (float image, colour scale kind)."""
        self._bin(analyses, frames)
        out = {}
        for a in analyses.analyses:
            partial = dict(analyses.partials[a.name])
            for key in a.per_position:
                sums = self._sums(a.name, key, analyses.partials[a.name][key])
                counts = np.maximum(self.scanned, 1).reshape(self.coarse_shape + (1,) * (sums.ndim - 2))
                partial[key] = (sums / counts).reshape(-1, *sums.shape[2:])
            for name, view in a.show(a.finish(partial, self.coarse_shape)).items():
                out[f"{a.name}/{name}"] = (self._shown(view.image), view.kind)
        return out

    def _bin(self, analyses: ScanAnalyses, frames: np.ndarray) -> None:
        """Bin again the rows of blocks that hold the positions touched since the last render.
        Only those with a frame matter (the others are drawn blank), and frames are never taken
        back: a band with none, such as most of a scan just begun, needs no binning."""
        lo, hi = self.dirty
        self.dirty = (0, 0)
        scanned = np.flatnonzero(frames[lo:hi])
        if not len(scanned):
            return
        lo, hi = lo + int(scanned[0]), lo + int(scanned[-1]) + 1
        rows, cols = self.shape
        f = self.factor
        first, last = lo // cols // f, (hi - 1) // cols // f + 1  # block rows
        r0, r1 = first * f, min(last * f, rows)  # position rows
        band = slice(r0 * cols, r1 * cols)
        self.scanned[first:last] = block_sums((frames[band] > 0).reshape(r1 - r0, cols), f)
        for a in analyses.analyses:
            for key in a.per_position:
                array = analyses.partials[a.name][key]
                sums = self._sums(a.name, key, array)
                sums[first:last] = block_sums(array[band].reshape(r1 - r0, cols, *array.shape[1:]), f)

    def _sums(self, name: str, key: str, array: np.ndarray) -> np.ndarray:
        """The block sums of partial array ``key`` of analysis ``name`` (zeros at first)."""
        sums = self.sums.get((name, key))
        if sums is None:
            sums = self.sums[(name, key)] = np.zeros(self.coarse_shape + array.shape[1:])
        return sums

    def _shown(self, image: np.ndarray) -> np.ndarray:
        """A view as drawn: scan images blank where no block was scanned, others as block means."""
        image = np.asarray(image, np.float64)
        if image.shape == self.coarse_shape:
            return np.where(self.scanned > 0, image, np.nan)
        return shrink(image, LIVE_SIDE)
