"""The writer's live-results service (pipeline.writer.live.LiveService) on a real loopback socket,
asked by the client the dashboard uses (transport.control_client.ControlClient.request_parts)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import msgpack
import numpy as np
import pytest
import zmq

from stemstream.formats.png import png_bytes, scale_image
from stemstream.pipeline.writer.live import KEPT_CLOSED, LiveService
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
