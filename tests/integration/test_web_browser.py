"""The dashboard in a real browser: headless Chromium (Debian's package, driven by Playwright) opens
the page of a running pipeline, starts a simulated scan from the page's form, sees the live
images change while frames stream, and after the scan closes shows the numbers in the file.

Chromium comes from the system's package manager: if /usr/bin/chromium is missing and we are root,
the session fixture installs Debian's ``chromium`` package (no browser download by Playwright).
"""

from __future__ import annotations

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


@pytest.fixture
def pipeline(tmp_path):
    config = test_config(tmp_path)
    config.network.dashboard_port = free_port("127.0.0.1", 18200, tries=200)
    # ~300 frames/s per producer: a 40 x 40 scan streams for ~5 s, long enough to watch it
    with LocalPipeline(config, tmp_path / "work", ProducerSource(rate=300), dashboard=True,
                       dashboard_token=TOKEN) as p:
        p.start()
        assert p.dashboard_url, p.dashboard_failed
        yield p


def _text(page, selector: str) -> str:
    return page.locator(selector).text_content() or ""


def test_live_page_follows_a_scan_and_ends_with_the_files_numbers(chromium, pipeline):
    page = chromium.new_page(viewport={"width": 1280, "height": 1400})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(pipeline.dashboard_url)
    page.wait_for_function("document.getElementById('control-state').textContent === 'connected'", timeout=15000)

    # start the scan from the page, as a user with the token would
    page.fill("#start-form input[name=scan_shape]", "40x40")
    page.fill("#start-form input[name=scan_number]", "21")
    page.fill("#start-form input[name=token]", TOKEN)
    page.click("#start-form button[type=submit]")
    page.wait_for_function("document.getElementById('start-result').textContent.startsWith('scan 21 started')",
                           timeout=10000)
    page.wait_for_function("document.getElementById('scan-number').textContent === '21'", timeout=10000)

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
