"""The dashboard's catalog and HTTP API, against a real control role (in a thread), a stand-in for
the writer's live service (a ROUTER socket) and real counted files; the browser test is in
test_web_browser.py."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from fastapi.testclient import TestClient

from stemstream.analysis.offline import analyze_counted_file
from stemstream.formats.sparse_h5 import SparseCountsWriter
from stemstream.pipeline.control.service import Control
from stemstream.transport.control_client import ControlClient
from stemstream.transport.messages import pack_control, unpack_control
from stemstream.web.access import MAX_BODY_BYTES
from stemstream.web.app import create_app
from stemstream.web.catalog import MAX_INTEGER, Catalog, CatalogError, catalog_url
from stemstream.web.live import read_scans

from pipeline_support import test_config
from scan_specs import make_spec

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make_counted_file(path: Path, scan_shape=(6, 5), scan_number=4, analyse=True) -> Path:
    """A small counted file as the writer leaves it: events, a ledger, /analysis and PNGs beside."""
    rng = np.random.default_rng(scan_number)
    n = scan_shape[0] * scan_shape[1]
    with SparseCountsWriter(path, scan_shape, (576, 576), 1, overwrite=True) as out:
        events = [np.unique(rng.integers(0, 576 * 576, 40)).astype(np.uint32) for _ in range(n)]
        out.write(np.arange(n), events)
        total = sum(len(e) for e in events)
        out.set_metadata("stemstream", {
            "software": "stemstream", "scan_number": scan_number, "events": total, "seconds": 1.5,
            "ledger": {"scan_number": scan_number, "scan_rows": scan_shape[0], "scan_cols": scan_shape[1],
                       "frames_per_position": 1, "frames_expected": n, "frames_received": n,
                       "frames_complete": n, "frames_incomplete": 0, "frames_missing": 0,
                       "frames_over_capacity": 0, "sectors_received": [n] * 4, "sectors_missing": [0] * 4,
                       "sectors_duplicate": [0] * 4, "sectors_rejected": [0] * 4},
        })
    if analyse:
        analyze_counted_file(path)
    return path


def summary_for(path: Path, scan_number: int, events: int, n: int) -> dict:
    return {"scan": scan_number, "path": str(path), "events": events, "seconds": 2.0, "frames_per_second": n / 2.0,
            "thresholds": {"background": 28.0, "xray": 1000.0, "calculated": False},
            "ledger": {"scan_number": scan_number, "scan_rows": 6, "scan_cols": 5, "frames_per_position": 1,
                       "frames_expected": n, "frames_received": n, "frames_complete": n, "frames_incomplete": 0,
                       "frames_missing": 0, "sectors_received": [n] * 4, "sectors_missing": [0] * 4,
                       "sectors_duplicate": [0] * 4, "sectors_rejected": [0] * 4, "sectors_lost": [0] * 4},
            "images": []}


# -- catalog --------------------------------------------------------------------------------------


def test_catalog_records_updates_hides_and_indexes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    a = make_counted_file(out / "FOURD_250101_1200_00001_00004.h5", scan_number=4)
    b = make_counted_file(out / "FOURD_250101_1201_00002_00005.h5", scan_number=5, analyse=False)
    catalog = Catalog(catalog_url(None, out))
    assert catalog.url.endswith("/out/catalog.db")

    entry = catalog.add_summary(summary_for(a, 4, 1200, 30), started=time.time() - 3)
    row = catalog.get(entry)
    assert row["scan_number"] == 4 and row["frames_complete"] == 30 and row["accounted"] is True
    assert "virtual_detectors/bright_field" in row["images"]  # the PNGs beside the file, by key
    # the same file again (a resumed scan) updates its row
    assert catalog.add_summary(summary_for(a, 4, 1300, 30)) == entry
    assert catalog.get(entry)["events"] == 1300 and catalog.count() == 1
    # a failed scan has no file: nothing to catalogue
    assert catalog.add_summary({"scan": 9, "error": "calibration failed"}) is None

    # the directory index adds the other file from its own metadata, once
    assert catalog.index_directory(out) == 1
    assert catalog.index_directory(out) == 0
    other = catalog.list(scan_number=5)[0]
    assert other["source"] == "file" and other["frames_complete"] == 30 and other["events"] > 0
    assert other["scan_rows"] == 6 and other["scan_cols"] == 5

    # deleting hides the entry, and indexing again does not bring it back
    assert catalog.hide(other["id"]) and not catalog.hide(other["id"])
    assert catalog.get(other["id"]) is None
    assert catalog.index_directory(out) == 0 and catalog.count() == 1
    assert b.exists()  # the file is never touched
    catalog.close()


def test_catalog_accepts_urls_and_refuses_bad_ones_in_one_sentence(tmp_path):
    assert catalog_url(str(tmp_path / "x.db"), ".") == f"sqlite:///{tmp_path / 'x.db'}"
    assert catalog_url("sqlite:///:memory:", ".") == "sqlite:///:memory:"
    Catalog("sqlite:///:memory:").close()
    for url, words in (("nosuchdb://host/db", "no driver"), ("sqlite:////no/such/folder/c.db", "does not exist"),
                       ("::not a url::", "not a database URL")):
        with pytest.raises(CatalogError) as info:
            Catalog(url)
        assert words in str(info.value) and "\n" not in str(info.value)


# -- HTTP API against a real control ----------------------------------------------------------------


@pytest.fixture
def control(tmp_path):
    config = test_config(tmp_path)
    ctl = Control(config)
    thread = threading.Thread(target=ctl.serve, kwargs={"stop_after_shutdown_s": 0.1}, daemon=True)
    thread.start()
    client = ControlClient.for_config(config)
    # one node group checks in, as `stemstream node` would: scans need one to start
    assert client.request("heartbeat", role="node", id=0, stats={}, host="127.0.0.1")["ok"]
    yield config
    client.request("shutdown", timeout_s=2.0)
    client.close()
    thread.join(5)


@pytest.fixture
def dashboard(control, tmp_path):
    out = Path(control.pipeline.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    catalog = Catalog(catalog_url(None, out))
    app = create_app(control, catalog, TOKEN, open_reads=True)
    with TestClient(app) as client:
        client.catalog = catalog
        client.out = out
        yield client
    catalog.close()


def _entry(client, path: Path, number: int) -> int:
    return client.catalog.add_summary(summary_for(path, number, 1234, 30), started=time.time())


def test_pages_and_api_read_the_catalog(dashboard):
    path = make_counted_file(dashboard.out / "FOURD_250101_1200_00001_00007.h5", scan_number=7)
    entry = _entry(dashboard, path, 7)

    page = dashboard.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "FOURD_250101_1200_00001_00007.h5" in page.text and "/static/live.js" in page.text

    listing = dashboard.get("/api/scans").json()
    assert listing["count"] == 1 and listing["scans"][0]["scan_number"] == 7
    one = dashboard.get(f"/api/scans/{entry}").json()
    assert one["frames_complete"] == 30 and one["events"] == 1234 and one["file_url"] == f"/scans/{entry}/file"
    assert {im["key"] for im in one["images"]} >= {"virtual_detectors/bright_field", "center_of_mass/dpc_phase"}

    scan_page = dashboard.get(f"/scans/{entry}")
    assert scan_page.status_code == 200 and "every frame accounted for" in scan_page.text
    download = dashboard.get(f"/scans/{entry}/file")
    assert download.status_code == 200 and download.content == path.read_bytes()
    assert path.name in download.headers["content-disposition"]
    png = dashboard.get(f"/scans/{entry}/images/virtual_detectors/bright_field")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")

    # no PNGs beside the file: the images come from /analysis in the file
    for p in dashboard.out.glob("*.png"):
        p.unlink()
    png = dashboard.get(f"/scans/{entry}/images/summed_pattern/pattern")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")

    status = dashboard.get("/api/status").json()
    assert status["type"] == "state" and "roles" in status


def test_unknown_scans_and_bad_requests_get_clear_errors(dashboard):
    r = dashboard.get("/api/scans/999")
    assert r.status_code == 404 and r.json()["error"] == "there is no scan 999 in the catalog"
    r = dashboard.get("/scans/999", headers={"Accept": "text/html"})
    assert r.status_code == 404 and "there is no scan 999 in the catalog" in r.text and "<html" in r.text
    assert dashboard.get("/scans/999/file").status_code == 404
    assert dashboard.get("/api/scans/abc").status_code == 422
    assert dashboard.get("/api/scans?limit=0").status_code == 422
    r = dashboard.get("/no/such/page")
    assert r.status_code == 404 and "no page /no/such/page" in r.json()["error"]

    r = dashboard.post("/api/scans", headers=AUTH, json={"scan_shape": "12 by 3"})
    assert r.status_code == 422 and "ROWSxCOLS" in r.json()["error"]
    r = dashboard.post("/api/scans", headers=AUTH, json={"scan_shape": "4x4", "frames_per_position": 0})
    assert r.status_code == 422 and "frames_per_position" in r.json()["error"]
    r = dashboard.post("/api/scans", headers=AUTH, json={"scan_shape": "4x4", "colour": "red"})
    assert r.status_code == 422 and "colour" in r.json()["error"]
    r = dashboard.post("/api/scans", headers={**AUTH, "Content-Type": "application/json"}, content=b"{not json")
    assert r.status_code == 400 and r.json()["error"] == "the request body is not valid JSON"


def test_mutations_need_the_token(dashboard, control):
    path = make_counted_file(dashboard.out / "FOURD_250101_1200_00001_00008.h5", scan_number=8, analyse=False)
    entry = _entry(dashboard, path, 8)

    assert dashboard.post("/api/scans", json={"scan_shape": "4x4"}).status_code == 401
    assert dashboard.post("/api/scans", json={"scan_shape": "4x4"},
                          headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert dashboard.delete(f"/api/scans/{entry}").status_code == 401
    assert dashboard.delete(f"/api/scans/{entry}", headers={"X-Stemstream-Token": "nope"}).status_code == 403

    r = dashboard.post("/api/scans", json={"scan_shape": "4x6", "frames_per_position": 2}, headers=AUTH)
    assert r.status_code == 202, r.text
    started = r.json()
    assert started["scan"] == 9  # one above the highest scan number known
    assert started["scan_shape"] == [4, 6] and started["frames_per_position"] == 2
    state = ControlClient.for_config(control).request("get_scan", scan=9)
    assert state["ok"] and state["state"] == "running"
    # the same scan again while it runs: control refuses, the API says why
    r = dashboard.post("/api/scans", json={"scan_shape": [4, 6], "scan_number": 9}, headers=AUTH)
    assert r.status_code == 409 and "already running" in r.json()["error"]

    r = dashboard.delete(f"/api/scans/{entry}", headers=AUTH)
    assert r.status_code == 200 and r.json()["deleted"] == entry
    assert dashboard.get(f"/api/scans/{entry}").status_code == 404
    assert dashboard.delete(f"/api/scans/{entry}", headers=AUTH).status_code == 404
    assert path.exists()


def asgi_request(app, method: str, path: str, headers: dict[str, str], chunks: list[bytes]) -> tuple[int, dict, int]:
    """Call the application as a server would, the body in ``chunks`` (one message each, the
    length declared only if ``headers`` says so): (status, the reply's map, chunks it read)."""
    read, sent = 0, []

    async def receive():
        nonlocal read
        if read < len(chunks):
            read += 1
            return {"type": "http.request", "body": chunks[read - 1], "more_body": read < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), read


FIFTY_MB = [b"x" * 2**16] * 800  # 50 MiB in 64 KiB messages


def test_a_change_without_the_token_is_refused_before_its_body_is_read(dashboard):
    r = dashboard.post("/api/scans", headers={"Content-Type": "application/json"}, content=b"{not json")
    assert r.status_code == 401 and "token" in r.json()["error"]
    r = dashboard.post("/api/scans", headers={"Authorization": "Bearer wrong"}, content=b"{not json")
    assert r.status_code == 403
    assert dashboard.delete(f"/api/scans/{2**70}").status_code == 401
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Content-Length": str(50 * 2**20)}):
        status, reply, read = asgi_request(dashboard.app, "POST", "/api/scans", headers, FIFTY_MB)
        assert status in (401, 403) and reply["status"] == status and read == 0


def test_a_body_over_the_limit_gets_413_and_is_not_read_whole(dashboard):
    r = dashboard.post("/api/scans", headers={**AUTH, "Content-Type": "application/json"},
                       content=b" " * (MAX_BODY_BYTES + 1))
    assert r.status_code == 413 and "over 1,048,576 bytes" in r.json()["error"]
    # declared in Content-Length: refused unread
    status, reply, read = asgi_request(dashboard.app, "POST", "/api/scans",
                                       {**AUTH, "Content-Length": str(50 * 2**20)}, FIFTY_MB)
    assert (status, reply["status"], read) == (413, 413, 0)
    # no length said (chunked): read only until it passes the limit
    status, reply, read = asgi_request(dashboard.app, "POST", "/api/scans", AUTH, FIFTY_MB)
    assert status == 413 and "\n" not in reply["error"] and read == MAX_BODY_BYTES // 2**16 + 1
    # within the limit, a body in several messages reaches the route whole
    body = json.dumps({"scan_shape": "12 by 3", "frames_per_position": 1}).encode()
    headers = {**AUTH, "Content-Type": "application/json"}
    status, reply, read = asgi_request(dashboard.app, "POST", "/api/scans", headers, [body[:10], body[10:]])
    assert status == 422 and "ROWSxCOLS" in reply["error"] and read == 2


def test_numbers_beyond_the_catalogs_integers_get_a_one_line_422(dashboard):
    huge = 2**70
    for url in (f"/api/scans/{huge}", f"/scans/{huge}", f"/scans/{huge}/file", f"/scans/{huge}/images/a/b",
                f"/api/scans?offset={huge}", f"/api/scans?scan_number={huge}", f"/scans?offset={huge}",
                f"/api/scans/{MAX_INTEGER + 1}", "/api/scans/-1"):
        r = dashboard.get(url)
        assert r.status_code == 422, url
        assert "\n" not in r.json()["error"] and "or equal to" in r.json()["error"], url
    r = dashboard.delete(f"/api/scans/{huge}", headers=AUTH)
    assert r.status_code == 422 and f"less than or equal to {MAX_INTEGER}" in r.json()["error"]
    assert dashboard.get(f"/api/scans/{MAX_INTEGER}").status_code == 404  # in range: not there


def test_user_text_is_escaped(dashboard):
    nasty = '<script>alert("x")</script>'
    path = make_counted_file(dashboard.out / "FOURD_250101_1200_00001_00011.h5", scan_number=11, analyse=False)
    summary = summary_for(path, 11, 10, 30)
    summary["ledger"]["rejected_reasons"] = {nasty: 1}
    entry = dashboard.catalog.add_summary(summary)
    page = dashboard.get(f"/scans/{entry}")
    assert page.status_code == 200
    assert nasty not in page.text and "&lt;script&gt;" in page.text
    r = dashboard.get("/scans/<b>x</b>", headers={"Accept": "text/html"})
    assert "<b>x</b>" not in r.text


def test_reads_need_the_token_off_loopback(control, tmp_path):
    catalog = Catalog("sqlite:///:memory:")
    app = create_app(control, catalog, TOKEN, open_reads=False, index_output=False)
    with TestClient(app) as client:
        assert client.get("/api/scans").status_code == 401
        assert client.get("/api/scans", headers=AUTH).status_code == 200
        r = client.get("/?token=" + TOKEN, follow_redirects=False)  # a link with the token: cookie, then clean URL
        assert r.status_code == 303 and "token" not in r.headers["location"]
        assert client.get("/").status_code == 200  # the cookie now
        assert client.get("/api/scans", headers={"Authorization": "Bearer wrong"}).status_code == 403
        # the cookie lets a browser read, never change anything (no cross-site requests)
        r = client.post("/api/scans", json={"scan_shape": "4x4"})
        assert r.status_code == 401 and "token" in r.json()["error"]
    catalog.close()


def test_websocket_pushes_the_state_and_the_scans_control_reports_closed(dashboard, control):
    path = make_counted_file(dashboard.out / "FOURD_250101_1200_00001_00012.h5", scan_number=12)
    ctl = ControlClient.for_config(control)
    assert ctl.request("start_scan", scan_number=12, scan_shape=[6, 5])["ok"]
    with dashboard.websocket_connect("/ws") as ws:
        kinds = set()
        deadline = time.monotonic() + 10
        while "state" not in kinds and time.monotonic() < deadline:
            msg = ws.receive_json()
            kinds.add(msg["type"])
            if msg["type"] == "state":
                assert msg["control"]["ok"] and msg["scan"]["number"] == 12 and msg["scan"]["state"] == "running"
        assert "state" in kinds
        # the writer reports the scan done: the dashboard catalogues it and pushes the new list
        ctl.request("scan_done", scan=12, ok=True, summary=summary_for(path, 12, 777, 30))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            msg = ws.receive_json()
            if msg["type"] == "catalog" and msg["scans"]:
                assert msg["scans"][0]["scan_number"] == 12 and msg["scans"][0]["events"] == 777
                break
        else:
            pytest.fail("no catalog push after the scan closed")
    ctl.close()


class FakeWriterLive:
    """The writer's live service as the dashboard sees it: a ROUTER socket on ``[network]
    live_port`` that answers ``live {scan}`` with a map naming the images, then one PNG frame each."""

    def __init__(self, endpoint: str, images: dict[str, bytes], progress: dict):
        self.images, self.progress = images, progress
        self.asked: list[dict] = []
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)  # the socket is the thread's from now on
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            if not self.socket.poll(50):
                continue
            identity, *_, body = self.socket.recv_multipart()
            request = unpack_control(body)
            self.asked.append(request)
            names = list(self.images)
            reply = {"ok": True, "scan": request["scan"], "names": names, "progress": self.progress,
                     "updated": time.time(), "state": "running"}
            self.socket.send_multipart([identity, pack_control(reply), *(self.images[n] for n in names)])
        self.socket.close(0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def test_websocket_pushes_the_writers_live_images_and_progress(dashboard, control):
    images = {"virtual_detectors/bright_field": b"\x89PNG bright field", "summed_pattern/pattern": b"\x89PNG pattern"}
    progress = {"frames_written": 7, "frames_complete": 6, "frames_incomplete": 1, "events": 99, "seconds": 1.0}
    writer = FakeWriterLive(control.network.live(), images, progress)
    ctl = ControlClient.for_config(control)
    assert ctl.request("start_scan", scan_number=13, scan_shape=[6, 5])["ok"]
    try:
        with dashboard.websocket_connect("/ws") as ws:
            pushed, scan = {}, None
            deadline = time.monotonic() + 10
            while (not pushed or scan is None) and time.monotonic() < deadline:
                msg = ws.receive_json()
                if msg["type"] == "images" and msg["scan"] == 13 and msg["images"]:
                    pushed = {im["key"]: im["src"] for im in msg["images"]}
                if msg["type"] == "state" and msg["scan"] and msg["scan"]["frames_written"] == 7:
                    scan = msg["scan"]
        assert pushed == {k: "data:image/png;base64," + base64.b64encode(v).decode("ascii") for k, v in images.items()}
        assert scan["number"] == 13 and scan["state"] == "running" and scan["scan_shape"] == [6, 5]
        assert scan["frames_complete"] == 6 and scan["frames_incomplete"] == 1 and scan["events"] == 99
        assert scan["frames_missing"] == 30 - 7 and scan["thresholds"]["background"] == 28.0
        assert writer.asked and all(r == {"op": "live", "scan": 13} for r in writer.asked)
    finally:
        writer.close()
        ctl.close()


def test_a_scan_whose_spec_cannot_be_read_is_left_out():
    good = {"spec": make_spec(3, (2, 5)).to_wire(), "state": "running", "started": 1.0, "summary": None}
    scans = read_scans({"3": good, "4": {"spec": {"scan": 4}, "state": "running"}, "5": "not a map"})
    assert list(scans) == [3] and scans[3].spec.shape == (2, 5) and scans[3].summary == {}


# -- the command ------------------------------------------------------------------------------------


def _stemstream(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "stemstream", *args], capture_output=True, text=True, timeout=timeout)


def test_serve_refuses_bad_input_in_one_sentence(tmp_path):
    r = _stemstream("serve", "--catalog", "nosuchdb://x/y", "--port", "1")
    assert r.returncode == 2 and "error:" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _stemstream("serve", "--port", "70000")
    assert r.returncode == 2 and "--port must be 1 to 65535" in r.stderr
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _stemstream("serve", "--port", str(port), "--catalog", f"sqlite:///{tmp_path}/c.db")
    assert r.returncode == 2 and "in use" in r.stderr
