"""The writer's live-results service (pipeline.writer.live.LiveService) on a real loopback socket,
asked by the client the dashboard uses (transport.control_client.ControlClient.request_parts); its
pace; and the live images of scans of any size (LiveImages)."""

from __future__ import annotations

import struct
import types
from concurrent.futures import ThreadPoolExecutor

import msgpack
import numpy as np
import pytest
import zmq

from stemstream.analysis.center_of_mass import CenterOfMass
from stemstream.analysis.example_radial_profile import RadialProfile
from stemstream.analysis.scan import ScanAnalyses
from stemstream.analysis.virtual_detectors import SummedPattern, VirtualDetectors
from stemstream.core.detector import FRAME_SHAPE
from stemstream.formats.png import png_bytes, scale_image
from stemstream.pipeline.writer import live as live_module
from stemstream.pipeline.writer.live import KEPT_CLOSED, LIVE_SIDE, RENDER_INTERVAL_S, LiveImages, LiveService
from stemstream.transport.control_client import ControlClient
from stemstream.transport.messages import unpack_control
from stemstream.transport.ports import free_port_block

# The service is asked at most this many times 20 ms apart for one reply (a bound, not a pace:
# each wait ends as soon as a request is there).
_MAX_POLLS = 500


@pytest.fixture
def live():
    context = zmq.Context()
    service = LiveService(context)
    endpoint = f"tcp://127.0.0.1:{free_port_block(1)}"
    service.bind(endpoint)
    client = ControlClient(endpoint, context, timeout_s=10.0)
    try:
        yield service, client, endpoint, context
    finally:
        client.close()
        service.close()
        context.term()


def ask(service: LiveService, client: ControlClient, scan) -> tuple[dict, list[bytes]]:
    """The client's request in a thread, the service served here until the reply is in."""
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(client.request_parts, "live", scan=scan)
        for _ in range(_MAX_POLLS):
            if reply.done():
                break
            service.socket.poll(20)
            service.serve()
        return reply.result(timeout=0)


def send_raw(service: LiveService, dealer: zmq.Socket, body: bytes) -> dict:
    """Send ``body`` as a request from a bare socket; the reply's map."""
    dealer.send_multipart([b"", body])
    for _ in range(_MAX_POLLS):
        service.socket.poll(20)
        service.serve()
        if dealer.poll(0):
            break
    return unpack_control(dealer.recv_multipart(zmq.NOBLOCK)[0])


def images() -> dict[str, bytes]:
    ramp = np.arange(12.0).reshape(3, 4)
    return {"virtual_detectors/bright_field": png_bytes(scale_image(ramp, "sequential")),
            "center_of_mass/phase": png_bytes(scale_image(-ramp, "diverging"))}


def test_an_unknown_scan_gets_ok_false(live):
    service, client, _, _ = live
    reply, frames = ask(service, client, 3)
    assert reply["ok"] is False and "no scan 3" in reply["error"] and frames == []


def test_a_scan_s_names_and_exact_png_bytes_come_back_as_frames(live):
    service, client, _, _ = live
    pngs = images()
    assert all(p.startswith(b"\x89PNG") for p in pngs.values())
    service.update(7, {"frames_written": 12, "frames_expected": 16}, pngs)
    reply, frames = ask(service, client, 7)
    assert reply["ok"] is True and reply["scan"] == 7 and reply["state"] == "running"
    assert reply["names"] == list(pngs) and frames == list(pngs.values())
    assert reply["progress"] == {"frames_written": 12, "frames_expected": 16} and reply["updated"] > 0
    # progress without new images keeps the last images; closing changes the state
    service.update(7, {"frames_written": 16, "frames_expected": 16}, None, state="closed")
    reply, frames = ask(service, client, 7)
    assert reply["progress"]["frames_written"] == 16 and reply["state"] == "closed"
    assert frames == list(pngs.values())


def test_wanted_turns_true_after_a_request(live):
    service, client, _, _ = live
    service.update(1, {"frames_written": 0})
    assert not service.wanted and not service.due(1)  # nobody asked: nothing is rendered
    ask(service, client, 1)
    assert service.wanted and service.due(1)  # asked, and scan 1 has no images yet


@pytest.mark.parametrize("body", [b"\xc1 not msgpack", msgpack.packb([1, 2, 3]),
                                  msgpack.packb({"op": "live", "scan": "seven"})],
                         ids=["garbage", "not a map", "scan not an integer"])
def test_a_bad_request_gets_an_error_is_counted_and_the_service_goes_on(live, body):
    service, client, endpoint, context = live
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    try:
        reply = send_raw(service, dealer, body)
    finally:
        dealer.close()
    assert reply["ok"] is False and reply["error"].startswith("bad request")
    assert service.rejected == 1
    service.update(2, {"frames_written": 1}, images())
    reply, frames = ask(service, client, 2)
    assert reply["ok"] is True and len(frames) == 2 and service.rejected == 1


def test_closed_scans_beyond_kept_closed_are_forgotten(live):
    service, client, _, _ = live
    service.update(100, {"frames_written": 1})  # still running: never forgotten
    closed = list(range(1, KEPT_CLOSED + 3))
    for number in closed:
        service.update(number, {"frames_written": number}, images(), state="closed")
    assert [n for n in closed if ask(service, client, n)[0]["ok"]] == closed[2:]
    assert ask(service, client, 100)[0]["ok"] is True


# -- pace -------------------------------------------------------------------------------------------


@pytest.fixture
def clock(monkeypatch):
    """The service's clock, moved by hand: [seconds]."""
    now = [1000.0]
    monkeypatch.setattr(live_module, "time", types.SimpleNamespace(monotonic=lambda: now[0], time=lambda: now[0]))
    return now


def writer_renders(service: LiveService, clock, every_s: float, render_s: float, seconds: float) -> int:
    """The writer's loop as pipeline.writer.role runs it: every ``every_s`` it asks whether scan 1
    is due and renders it if so, which takes ``render_s``; a viewer asks all along."""
    renders, start = 0, clock[0]
    while clock[0] - start < seconds:
        service.last_request = clock[0]
        pass_started = clock[0]
        if service.due(1):
            renders += 1
            clock[0] += render_s
            service.update(1, {"frames_written": renders}, {"k": b"png"})
        clock[0] = max(clock[0], pass_started + every_s)
    return renders


def test_the_writer_renders_at_its_pace_however_long_a_render_takes(clock):
    service = LiveService(zmq.Context.instance())
    try:
        # asked every 0.41 s, rendering 0.35 s: every ask renders, ~2.4 images a second (the
        # interval counted from the end of the last render skipped every other one: 1.2 a second)
        assert writer_renders(service, clock, 0.41, 0.35, 10.0) == 25
        # asked as fast as it can go: at most one render per RENDER_INTERVAL_S
        assert writer_renders(service, clock, 0.01, 0.0, 9.0) <= 9.0 / RENDER_INTERVAL_S + 1
    finally:
        service.close()


# -- live images of scans of any size ----------------------------------------------------------------


def analyses() -> list:
    return [VirtualDetectors(), SummedPattern(), CenterOfMass(), RadialProfile(bins=3)]


def random_frames(rng, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One frame per position, electrons round a disc off the detector centre (CoM not flat)."""
    counts = rng.integers(0, 30, len(positions))
    offsets = np.zeros(len(positions) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    rows = np.clip(rng.normal(300, 60, offsets[-1]), 0, FRAME_SHAPE[0] - 1).astype(np.int64)
    cols = np.clip(rng.normal(260 + 0.001 * np.repeat(positions, counts), 60), 0, FRAME_SHAPE[1] - 1).astype(np.int64)
    return np.asarray(positions, np.int64), (rows * FRAME_SHAPE[1] + cols).astype(np.uint32), offsets


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR."""
    return struct.unpack(">II", png[16:24])


def test_a_scan_wider_than_a_live_image_is_shown_by_blocks_each_as_one_position_with_its_frames():
    """Blocks of 3 x 3 positions (the last row of blocks 1 position high): each block's image is
    what the analysis gives for one position holding all the block's frames, per scanned position
    for the virtual detectors; blocks without a frame are blank."""
    rng = np.random.default_rng(3)
    shape = (700, 300)
    live = LiveImages(shape)
    assert live.factor == 3 and live.coarse_shape == (234, 100)
    full = ScanAnalyses(analyses(), shape)
    blocks = ScanAnalyses(analyses(), live.coarse_shape)  # the oracle: each frame at its block
    frames = np.zeros(shape[0] * shape[1], np.uint16)
    # a raster scan stopped mid-row of a block, and a few positions further on
    positions = np.r_[np.arange(0, 250 * 300 + 131), rng.choice(np.arange(260 * 300, 700 * 300), 500, replace=False)]
    batch = random_frames(rng, positions)
    full.accumulate(*batch)
    frames[positions] += 1
    rows, cols = np.divmod(positions, shape[1])
    blocks.accumulate((rows // 3) * live.coarse_shape[1] + cols // 3, batch[1], batch[2])
    scanned = np.add.reduceat(np.add.reduceat((frames > 0).reshape(shape).astype(int), np.arange(0, 700, 3), 0),
                              np.arange(0, 300, 3), 1)

    shown = live.images(full, frames)
    expected = {f"{a}/{k}": v.image for a, views in blocks.views().items() for k, v in views.items()}
    assert shown.keys() == expected.keys()
    for key, (image, kind) in shown.items():
        if key == "summed_pattern/pattern":  # a frame-sized image: means of 2 x 2 pixels
            want = expected[key].reshape(288, 2, 288, 2).mean(axis=(1, 3))
            np.testing.assert_allclose(image, want)
            continue
        per_position = key.startswith(("virtual_detectors/", "radial_profile/"))  # sums: per scanned position
        want = np.where(scanned > 0, expected[key] / (np.maximum(scanned, 1) if per_position else 1), np.nan)
        np.testing.assert_allclose(image, want, rtol=1e-9, atol=1e-9, err_msg=key)  # NaN where NaN


def test_binning_follows_the_positions_touched_and_equals_binning_all_of_it():
    rng = np.random.default_rng(5)
    shape = (40, 900)  # blocks of 4 x 4
    full = ScanAnalyses(analyses(), shape)
    frames = np.zeros(shape[0] * shape[1], np.uint16)
    live = LiveImages(shape)

    def add(positions, touch=True):
        full.accumulate(*random_frames(rng, positions))
        np.add.at(frames, positions, 1)
        if touch:
            live.touched(int(positions.min()), int(positions.max()) + 1)

    add(np.arange(0, 5000))
    live.render(full, frames)
    add(np.arange(5000, 9100))
    add(np.arange(100, 300))  # second frames at positions already shown
    before = live.images(full, frames)
    for key, (image, kind) in live.images(full, frames).items():  # nothing new: the same images
        np.testing.assert_array_equal(image, before[key][0])
    scratch = LiveImages(shape).images(full, frames)
    for key, (image, kind) in before.items():
        np.testing.assert_array_equal(image, scratch[key][0], err_msg=key)
    # frames at positions nobody said were touched are not binned: a render's cost follows the
    # frames that came since the last one, not the scan's size
    add(np.arange(20000, 21000), touch=False)
    stale = live.images(full, frames)
    assert np.isnan(stale["virtual_detectors/bright_field"][0][5]).all()
    assert not np.isnan(LiveImages(shape).images(full, frames)["virtual_detectors/bright_field"][0][5]).all()


def test_live_pngs_stay_within_live_side_whatever_the_scan_size():
    rng = np.random.default_rng(8)
    shape = (300, 4096)
    full = ScanAnalyses(analyses(), shape)
    frames = np.zeros(shape[0] * shape[1], np.uint16)
    positions = np.arange(0, 70 * 4096 + 17)
    full.accumulate(*random_frames(rng, positions))
    frames[positions] = 1
    pngs = LiveImages(shape).render(full, frames)
    assert png_size(pngs["virtual_detectors/bright_field"]) == (274, 20)  # blocks of 15 x 15 positions
    assert png_size(pngs["summed_pattern/pattern"]) == (288, 288)
    assert all(max(png_size(p)) <= LIVE_SIDE for p in pngs.values())
