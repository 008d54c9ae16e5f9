"""End to end in real headless Chromium (Debian's `chromium`, driven by Playwright):
`osdiff serve` with the shipped model, a photo uploaded through the page, the split view,
a downloaded `.osd` that `osdiff decompress` accepts, a `.osd` dropped back in, a bad file.

The browser comes from the test set-up (`make test` runs scripts/install_browser.sh). Without
it these tests skip, unless OSDIFF_REQUIRE_BROWSER=1 (set by .ci/run) turns that into a failure."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from osdiff.cli import main as osdiff_main


def _chromium() -> str | None:
    return os.environ.get("OSDIFF_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _need_browser():
    sync_api = None
    try:
        from playwright import sync_api
    except ImportError:
        pass
    if sync_api is None or _chromium() is None:
        reason = "playwright" if sync_api is None else "Debian's chromium"
        if os.environ.get("OSDIFF_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason} is missing (run scripts/install_browser.sh)")
        pytest.skip(f"{reason} is not installed (scripts/install_browser.sh installs it)")
    return sync_api


@pytest.fixture(scope="module")
def server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "osdiff.cli", "serve", "--port", str(port), "--max-pixels", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/api/info", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"osdiff serve did not start: {proc.stdout.read()}")
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(server):
    sync_api = _need_browser()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        page = browser.new_page(accept_downloads=True, viewport={"width": 1200, "height": 900})
        page.set_default_timeout(120_000)
        page.goto(server)
        page.wait_for_function("Number(document.getElementById('quality').max) > 1")
        yield page
        browser.close()


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory) -> Path:
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:192, 0:256]
    img = np.stack([(x * 2 + 40 * np.sin(y / 9)) % 256, (y * 1.3) % 256, 128 + 100 * np.sin((x + y) / 17)], -1)
    img[60:120, 90:170] = [210, 40, 50]
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("e2e") / "photo.png"
    Image.fromarray(img).save(path)
    return path


def _images_loaded(page) -> bool:
    return page.evaluate("""() => ['img-left', 'img-right'].every(id => {
        const img = document.getElementById(id); return img.complete && img.naturalWidth > 0; })""")


def test_upload_compare_slider_download(page, photo_file, tmp_path):
    page.fill("#quality", "2.5")  # the model has gain vectors: a continuous quality
    assert page.text_content("#quality-value").startswith("2.5")
    page.set_input_files("#file", str(photo_file))
    page.wait_for_selector("#results tbody tr[data-codec='jpeg']")
    assert page.locator("#error").is_hidden()
    codecs = page.eval_on_selector_all("#results tbody tr", "rows => rows.map(r => r.dataset.codec)")
    assert codecs[0] == "osdiff-tiny" and {"avif", "webp", "jpeg"} <= set(codecs)
    page.wait_for_function("() => ['img-left','img-right'].every(id => document.getElementById(id).naturalWidth === 256)")
    assert _images_loaded(page)
    assert page.input_value("#left") == "original" and page.input_value("#right") == "osdiff-tiny"

    # the split moves with the range input and with a drag on the image
    page.fill("#slider", "20")
    assert "20%" in page.eval_on_selector("#img-right", "el => el.style.clipPath")
    box = page.locator("#canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] / 2, steps=5)
    page.mouse.up()
    assert abs(float(page.input_value("#slider")) - 80) < 2
    # any pair, and zoom
    page.select_option("#left", "avif")
    page.wait_for_function("() => document.getElementById('label-left').textContent === 'avif'")
    page.select_option("#zoom", "2")
    assert page.eval_on_selector("#canvas", "el => el.style.width") == "512px"

    with page.expect_download() as download:
        page.click("#download-osd")
    osd = tmp_path / "download.osd"
    download.value.save_as(osd)
    png = tmp_path / "decoded.png"
    assert osdiff_main(["decompress", str(osd), "-o", str(png)]) == 0
    with Image.open(png) as decoded:
        assert decoded.size == (256, 192)

    # a .osd dropped into the page is decoded
    page.set_input_files("#file", str(osd))
    page.wait_for_selector("#results tbody tr:only-child")
    page.wait_for_function("() => document.getElementById('img-left').naturalWidth === 256")
    assert page.input_value("#left") == "decoded"


def test_match_size_codes_osdiff_to_the_classical_codecs_file(page, photo_file):
    """"Match size": osdiff coded to the size of JPEG's file at the setting chosen on the page."""
    page.select_option("#match", "jpeg")
    assert page.is_visible("#match-setting") and page.is_disabled("#quality")
    page.fill("#match-setting", "10")
    with page.expect_request(lambda r: "/api/compare" in r.url) as request:
        page.set_input_files("#file", str(photo_file))
    assert "match=jpeg&setting=10" in request.value.url
    page.wait_for_selector("#results tbody tr[data-codec='jpeg']")
    page.wait_for_function("() => !document.getElementById('match').disabled")
    assert page.locator("#error").is_hidden()
    cells = page.eval_on_selector_all("#results tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))")
    assert cells[0][0] == "osdiff-tiny" and " encode" in cells[0][1]
    assert next(c for c in cells if c[0] == "jpeg")[1] == "10"
    header = page.eval_on_selector_all("#results thead th", "cells => cells.map(c => c.textContent)")
    lpips, dists = header.index("LPIPS ↓"), header.index("DISTS ↓")  # the field's metrics, every row
    assert all(0 < float(c[lpips]) < 1 and 0 < float(c[dists]) < 1 for c in cells), cells
    size = "id => fetch(document.getElementById(id).href).then(r => r.arrayBuffer()).then(b => b.byteLength)"
    osd_bytes, jpeg_bytes = page.evaluate(size, "download-osd"), page.evaluate(size, "download-jpeg")
    assert osd_bytes <= jpeg_bytes or "too large" in cells[0][1]
    reached = float(page.input_value("#quality"))  # the slider shows the quality reached (levels 1-5)
    shown = float(cells[0][1].split()[0])  # the table rounds to 3 decimals, halves up (JS Math.round)
    assert 1 <= reached <= 5 and abs(shown - reached) <= 0.0005 + 1e-9, (reached, cells[0][1])
    with page.expect_request(lambda r: "/api/compare" in r.url and "quality=" in r.url):
        page.select_option("#match", "")  # back to a quality: the photo is coded again
    page.wait_for_function("() => !document.getElementById('quality').disabled")  # until that ends


def test_bad_file_shows_error_and_server_stays_up(page, tmp_path, server):
    bad = tmp_path / "holiday.png"
    bad.write_text("this is not a picture")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error:not([hidden])")
    assert "not a readable image" in page.text_content("#error")
    broken = tmp_path / "broken.osd"
    broken.write_bytes(b"\x89OSD\x01\x02")
    page.set_input_files("#file", str(broken))
    page.wait_for_function("() => document.getElementById('error').textContent.includes('truncated')")
    big = tmp_path / "big.png"
    Image.new("RGB", (1200, 1000)).save(big)  # 1.2 MP; the server was started with --max-pixels 1
    page.set_input_files("#file", str(big))
    page.wait_for_function("() => document.getElementById('error').textContent.includes('over the limit')")
    assert urllib.request.urlopen(server + "/api/info", timeout=5).status == 200
