"""The dashboard in a real browser: headless Chromium (Debian's package, driven by Playwright) opens
the page of a running pipeline, starts a simulated scan from the page's form, sees the live
images change while frames stream, and after the scan closes shows the numbers in the file; and
on a scan wider than a live image, reads the images' pixels at moments while the scan runs.

Chromium comes from the system's package manager: if /usr/bin/chromium is missing and we are root,
the session fixture installs Debian's ``chromium`` package (no browser download by Playwright).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from urllib.parse import urljoin

import pytest

from stemstream.deploy.local import LocalPipeline, ProducerSource
from stemstream.formats.sparse_h5 import read_counted
from stemstream.web.server import free_port

from pipeline_support import test_config
from system_packages import install_debian_packages

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"]
TOKEN = "browser-test-token"


@pytest.fixture(scope="session")
def chromium():
    pytest.importorskip("playwright.sync_api", reason="playwright is in the test extras: pip install '.[test]'")
    reason = install_debian_packages(["chromium"], [CHROMIUM])
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@contextlib.contextmanager
def paced_pipeline(tmp_path, rate: float):
    """Every role and the dashboard, the simulated producers paced at ``rate`` frames/s each."""
    config = test_config(tmp_path)
    config.network.dashboard_port = free_port("127.0.0.1", 18200, tries=200)
    with LocalPipeline(config, tmp_path / "work", ProducerSource(rate=rate), dashboard=True,
                       dashboard_token=TOKEN) as p:
        p.start()
        assert p.dashboard_url, p.dashboard_failed
        yield p


@pytest.fixture
def pipeline(tmp_path):
    # ~300 frames/s per producer: a 40 x 40 scan streams for ~5 s, long enough to watch it
    with paced_pipeline(tmp_path, 300) as p:
        yield p


@pytest.fixture
def wide_scan_pipeline(tmp_path):
    # ~1,500 frames/s per producer: a 24 x 600 scan (14,400 frames) streams for ~10 s
    with paced_pipeline(tmp_path, 1500) as p:
        yield p


def _text(page, selector: str) -> str:
    return page.locator(selector).text_content() or ""


def _start_from_the_form(page, shape: str, number: int) -> None:
    page.fill("#start-form input[name=scan_shape]", shape)
    page.fill("#start-form input[name=scan_number]", str(number))
    page.fill("#start-form input[name=token]", TOKEN)
    page.click("#start-form button[type=submit]")
    page.wait_for_function(f"document.getElementById('start-result').textContent.startsWith('scan {number} started')",
                           timeout=10000)
    page.wait_for_function(f"document.getElementById('scan-number').textContent === '{number}'", timeout=10000)


# The pixels of the live images as the browser decoded them, drawn on a canvas: each image's size
# and a hash (FNV-1a) of its RGBA bytes (a few bytes to hand over, not a million numbers); null for
# an image not shown, or not a live one (the final images are the file's, by URL).
_LIVE_PIXELS = """(keys) => Object.fromEntries(keys.map((key) => {
  const img = document.querySelector(`#live-images img[data-key='${key}']`);
  if (!img || !img.complete || !img.naturalWidth || !img.src.startsWith('data:image/png')) return [key, null];
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const ctx = canvas.getContext('2d');
  ctx.drawImage(img, 0, 0);
  const rgba = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  let hash = 0x811c9dc5;
  for (let i = 0; i < rgba.length; i++) hash = Math.imul(hash ^ rgba[i], 0x01000193) >>> 0;
  return [key, {width: canvas.width, height: canvas.height, hash: hash}];
}))"""


def test_live_page_follows_a_scan_and_ends_with_the_files_numbers(chromium, pipeline):
    page = chromium.new_page(viewport={"width": 1280, "height": 1400})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(pipeline.dashboard_url)
    page.wait_for_function("document.getElementById('control-state').textContent === 'connected'", timeout=15000)

    # start the scan from the page, as a user with the token would
    _start_from_the_form(page, "40x40", 21)

    # a live image appears and changes while frames stream
    bright_field = "#live-images img[data-key='virtual_detectors/bright_field']"
    page.wait_for_selector(bright_field, timeout=15000)
    first = page.get_attribute(bright_field, "src")
    assert first.startswith("data:image/png;base64,")
    page.wait_for_function(
        "([sel, old]) => { const img = document.querySelector(sel); return img && img.getAttribute('src') !== old; }",
        arg=[bright_field, first], timeout=15000)
    assert _text(page, "#scan-state") == "running", "the image should change while the scan runs"
    assert int(page.get_attribute("#frames-written", "data-value")) < 1600
    for key in ("virtual_detectors/annular_dark_field", "center_of_mass/dpc_phase", "summed_pattern/pattern"):
        assert page.locator(f"#live-images img[data-key='{key}']").count() == 1

    # the scan closes: the page shows the file's numbers and links to it
    page.wait_for_function("document.getElementById('scan-state').textContent === 'closed'", timeout=60000)
    page.wait_for_selector("#scan-links a", timeout=10000)
    summary = pipeline.status()["scans"]["21"]["summary"]
    scan = read_counted(summary["path"])
    ledger = scan.metadata["stemstream"]["ledger"]
    assert int(page.get_attribute("#frames-complete", "data-value")) == ledger["frames_complete"] == 1600
    assert _text(page, "#frames-complete") == f"{ledger['frames_complete']:,}"
    assert int(page.get_attribute("#frames-incomplete", "data-value")) == ledger["frames_incomplete"]
    assert int(page.get_attribute("#events", "data-value")) == scan.total_events()
    assert _text(page, "#events") == f"{scan.total_events():,}"
    # the final images are the file's, not the last live ones
    src = page.get_attribute(bright_field, "src")
    assert src.startswith("/scans/") and "/images/virtual_detectors/bright_field" in src
    page.wait_for_function(f"document.querySelector(\"{bright_field}\").naturalWidth > 0", timeout=10000)

    # the catalog lists it; its page offers the file
    page.wait_for_selector("#catalog-body tr[data-id]", timeout=10000)
    page.click("#scan-links a")
    page.wait_for_selector("#download")
    assert _text(page, "#scan-number") == "21"
    assert int(page.get_attribute("#events", "data-value")) == scan.total_events()
    download = page.request.get(urljoin(page.url, page.get_attribute("#download", "href")))
    assert download.ok and download.body() == Path(summary["path"]).read_bytes()
    assert not errors, errors
    page.close()


def _scan_state(pipeline, number: int) -> str:
    return pipeline.status()["scans"][str(number)]["state"]


def test_live_images_form_pixel_by_pixel_while_a_wide_scan_streams(chromium, wide_scan_pipeline):
    """The virtual detectors, the DPC phase and the summed pattern change on the page between two
    moments before the scan closes (control says it still runs after the second), several times
    over; a scan 600 positions wide is shown binned by 3 (the writer's images stay within 288 px)."""
    pipeline = wide_scan_pipeline
    page = chromium.new_page(viewport={"width": 1280, "height": 1400})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(pipeline.dashboard_url)
    page.wait_for_function("document.getElementById('control-state').textContent === 'connected'", timeout=15000)
    _start_from_the_form(page, "24x600", 31)

    keys = ["virtual_detectors/bright_field", "virtual_detectors/annular_dark_field", "center_of_mass/dpc_phase",
            "summed_pattern/pattern"]
    first = last = None
    seen = []  # the distinct bright-field pixels read while the scan ran
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        pixels = page.evaluate(_LIVE_PIXELS, keys)
        if _scan_state(pipeline, 31) != "running":  # asked after reading: the read may be the end's
            break
        if all(pixels.values()):
            first, last = first or pixels, pixels
            if not seen or last[keys[0]]["hash"] != seen[-1]:
                seen.append(last[keys[0]]["hash"])
            if len(seen) >= 3 and all(last[k]["hash"] != first[k]["hash"] for k in keys):
                break
        time.sleep(0.1)
    assert first is not None, "no live image showed while the scan ran"
    unchanged = [k for k in keys if last[k]["hash"] == first[k]["hash"]]
    assert not unchanged, f"unchanged while the scan ran: {unchanged}"
    assert len(seen) >= 3, f"the bright field changed {len(seen) - 1} time(s) while the scan ran"
    assert (last[keys[0]]["width"], last[keys[0]]["height"]) == (200, 8)  # 24 x 600 positions, 3 x 3 a pixel
    assert max(last["summed_pattern/pattern"]["width"], last["summed_pattern/pattern"]["height"]) <= 288

    page.wait_for_function("document.getElementById('scan-state').textContent === 'closed'", timeout=90000)
    assert not errors, errors
    page.close()
