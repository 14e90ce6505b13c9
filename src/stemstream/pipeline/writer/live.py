"""The writer's live results: the images and progress of its scans, for the dashboard.

The writer holds every scan's analyses, so it answers for them itself, on a socket of its own
(``[network] live_port``); control carries the scan lifecycle only. A ROUTER socket answers

- ``{op: "live", scan: N}`` -> a small map ``{ok, scan, names, progress, updated, state}``
  followed by one frame of PNG bytes per name (images are ~10-100 kB each: they travel as frames
  of their own, never inside msgpack, whose maps are capped at 64 kB);
  ``{ok: false, error}`` for a scan the writer has not seen.

Rendering costs the writer more than writing, so images are rendered only while someone asked
within ``WANTED_S``, at most every ``RENDER_INTERVAL_S``. The last images of the latest
``KEPT_CLOSED`` closed scans stay available (the dashboard shows them until the next scan).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import zmq

from stemstream.transport.messages import MessageError, pack_control, unpack_control

log = logging.getLogger(__name__)

WANTED_S = 5.0  # images are rendered while someone asked this recently (s)
RENDER_INTERVAL_S = 0.4  # at most this often per scan
KEPT_CLOSED = 8  # closed scans whose last images are still served
_REQUESTS_PER_PASS = 32  # answered per call of serve(): the data path must not wait on viewers


@dataclass
class LiveScan:
    """What the writer last rendered of one scan."""

    images: dict[str, bytes] = field(default_factory=dict)  # "<analysis>/<view>" -> PNG
    progress: dict = field(default_factory=dict)
    updated: float = 0.0  # Unix time of the images
    state: str = "running"  # running -> closed | failed
    rendered_at: float = 0.0  # monotonic


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
        """True when scan ``number``'s images should be rendered again now."""
        live = self.scans.get(number)
        return self.wanted and (live is None or time.monotonic() - live.rendered_at >= RENDER_INTERVAL_S)

    def update(self, number: int, progress: dict, images: dict[str, bytes] | None = None, state: str = "running") -> None:
        """The scan's latest progress, and images when they were rendered (None: keep the last)."""
        live = self.scans.setdefault(number, LiveScan())
        self.scans.move_to_end(number)
        live.progress, live.state = dict(progress), state
        if images is not None:
            live.images, live.updated, live.rendered_at = images, time.time(), time.monotonic()
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
