"""`osdiff serve`'s JSON API: results, size matching, every limit, errors that leave the server up."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from osdiff.config import ServeLimits
from osdiff.evaluation.codecs import classical_codec
from osdiff.serve import create_app
from osdiff.serve.comparison import match_file_size

TestClient = pytest.importorskip("fastapi.testclient").TestClient


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 3, y * 2, (x + y)], -1) % 256 + rng.normal(0, 10, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(tiny_codec):
    return TestClient(create_app(tiny_codec, ServeLimits(max_upload_bytes=200_000, max_pixels=100_000)))


def assert_alive(client) -> None:
    assert client.get("/api/info").status_code == 200


def test_info_and_page(client, tiny_codec):
    info = client.get("/api/info").json()
    assert info["model"] == "tiny-test" and info["quality_levels"] == tiny_codec.num_quality_levels
    assert info["max_upload_bytes"] == 200_000 and info["max_pixels"] == 100_000
    assert info["precision"] == tiny_codec.network_precision and info["precision"] in ("float32", "bfloat16")
    page = client.get("/")
    assert page.status_code == 200 and "split position" in page.text
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200


def test_compress_then_decompress(client, tiny_codec):
    r = client.post("/api/compress?quality=3", content=png_bytes(64, 48))
    assert r.status_code == 200, r.text
    body = r.json()
    osd = base64.b64decode(body["file"])
    assert body["bytes"] == len(osd) and body["width"] == 64 and body["height"] == 48 and body["quality"] == 3
    assert body["bpp"] == pytest.approx(len(osd) * 8 / (64 * 48))
    assert body["psnr"] > 5 and 0 < body["lpips"] < 1 and 0 < body["dists"] < 1 and body["encode_s"] > 0 and body["decode_s"] > 0
    decoded = Image.open(io.BytesIO(base64.b64decode(body["png"])))
    assert decoded.size == (64, 48)
    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(tiny_codec.decompress(osd)))
    r = client.post("/api/decompress", content=osd)
    assert r.status_code == 200, r.text
    again = r.json()
    assert (again["width"], again["height"], again["quality"], again["model"]) == (64, 48, 3, "tiny-test")
    assert base64.b64decode(again["png"]) == base64.b64decode(body["png"])


def test_an_image_too_small_for_lpips_and_dists_gets_null_for_them(client):
    r = client.post("/api/compress?quality=3", content=png_bytes(20, 12))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["lpips"] is None and body["dists"] is None and body["psnr"] > 5


def test_compare_matches_file_sizes(client):
    r = client.post("/api/compare?quality=2", content=png_bytes(96, 80))
    assert r.status_code == 200, r.text
    body = r.json()
    names = [x["codec"] for x in body["results"]]
    assert names[0] == "tiny-test" and set(names[1:]) <= {"avif", "webp", "jpeg"} and "jpeg" in names
    # the field's metrics for every codec (the tiny test model is far worse than JPEG on both)
    assert all(0 < x["lpips"] < 1 and 0 < x["dists"] < 1 for x in body["results"])
    jpeg = next(x for x in body["results"] if x["codec"] == "jpeg")
    assert jpeg["lpips"] < body["results"][0]["lpips"] and jpeg["dists"] < body["results"][0]["dists"]
    target = body["results"][0]["bytes"]
    original = Image.open(io.BytesIO(base64.b64decode(body["original_png"])))
    assert original.size == (96, 80)
    for result in body["results"][1:]:
        data = base64.b64decode(result["file"])
        assert len(data) == result["bytes"]
        with Image.open(io.BytesIO(data)) as decoded:
            assert decoded.size == (96, 80)
    # jpeg: no neighbouring quality setting lands closer to osdiff's size
    codec = classical_codec("jpeg")
    for q in (jpeg["setting"] - 1, jpeg["setting"] + 1):
        if codec.quality_range[0] <= q <= codec.quality_range[1]:
            size = len(codec.encode_bytes(original, q))
            assert abs(jpeg["bytes"] - target) <= abs(size - target)


def test_match_file_size_is_closest_over_all_settings():
    image = Image.open(io.BytesIO(png_bytes(64, 64)))
    codec = classical_codec("jpeg")
    sizes = {q: len(codec.encode_bytes(image, q)) for q in range(codec.quality_range[0], codec.quality_range[1] + 1)}
    target = sizes[40] + 7
    best = match_file_size(codec, image, target)
    assert abs(len(best.data) - target) <= min(abs(s - target) for s in sizes.values()) + 0.02 * target


def test_compare_progress_stream(client):
    r = client.post("/api/compare?quality=1&progress=1&codecs=jpeg", content=png_bytes(48, 48))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    events = [json.loads(line) for line in r.text.splitlines()]
    assert [e["progress"] for e in events[:-1]] == [0, 1] and all(e["total"] == 2 for e in events[:-1])
    assert [x["codec"] for x in events[-1]["result"]["results"]] == ["tiny-test", "jpeg"]


@pytest.mark.parametrize("path", ["/api/compress", "/api/compare", "/api/decompress"])
def test_upload_over_byte_limit_declared(client, path):
    r = client.post(path, content=b"\0" * 200_001)
    assert r.status_code == 413 and "over the limit of 200000 bytes" in r.json()["error"]
    assert_alive(client)


def test_upload_over_byte_limit_streamed_without_length(client):
    def chunks():
        for _ in range(30):
            yield b"\0" * 10_000

    r = client.post("/api/compress", content=chunks())
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    assert_alive(client)


@pytest.mark.parametrize("path", ["/api/compress", "/api/compare"])
def test_image_over_pixel_limit(client, path):
    big = io.BytesIO()
    Image.new("RGB", (400, 300)).save(big, format="PNG")  # 120000 px, a few hundred bytes
    r = client.post(path, content=big.getvalue())
    assert r.status_code == 413 and "400x300 pixels is over the limit of 100000 pixels" in r.json()["error"]
    assert_alive(client)


def test_osd_over_pixel_limit(client, tiny_codec):
    osd = tiny_codec.compress(np.zeros((300, 400, 3), np.uint8), quality=1)
    r = client.post("/api/decompress", content=osd)
    assert r.status_code == 413 and "400x300" in r.json()["error"]
    assert_alive(client)


@pytest.mark.parametrize("path,body,message", [
    ("/api/compress", b"", "empty upload"),
    ("/api/compress", b"this is not an image", "not a readable image"),
    ("/api/compare", b"GIF89a\x01\x00", "not a readable image"),
    ("/api/decompress", b"\x89OSD\x01garbage", "truncated"),
    ("/api/decompress", b"not an osd file at all", "not an osdiff file"),
    ("/api/compress?quality=0", b"x", "quality must be a number from 1 to"),
    ("/api/compress?quality=two", b"x", "quality must be a number from 1 to"),
    ("/api/compare?codecs=gif", b"x", "unknown or unavailable codecs"),
])
def test_bad_input_is_one_line_400(client, path, body, message):
    r = client.post(path, content=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error and "\n" not in error
    assert_alive(client)


def test_corrupt_osd_payload(client, tiny_codec):
    osd = bytearray(tiny_codec.compress(np.full((32, 32, 3), 90, np.uint8), quality=2))
    osd[-3] ^= 0xFF  # the CRC no longer matches
    r = client.post("/api/decompress", content=bytes(osd))
    assert r.status_code == 400 and "\n" not in r.json()["error"]
    assert_alive(client)


def test_osd_of_another_model(client, sd_codec):
    osd = sd_codec.compress(np.full((32, 32, 3), 90, np.uint8))
    r = client.post("/api/decompress", content=osd)
    assert r.status_code == 400 and "not by the loaded model" in r.json()["error"]


def test_nothing_uploaded_touches_disk(client, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise AssertionError("an upload was spooled to disk")

    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", refuse)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert client.post("/api/compress?quality=1", content=png_bytes(32, 32)).status_code == 200


def test_serve_cli_refuses_busy_port_and_bad_limits(capsys):
    import socket

    from osdiff.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("osdiff: error: cannot listen on 127.0.0.1:") and err.count("\n") == 1
    assert main(["serve", "--port", "0"]) == 1
    assert main(["serve", "--max-pixels", "-1"]) == 1


def test_fractional_quality_and_its_errors(client, tiny_codec):
    info = client.get("/api/info").json()
    assert info["continuous_quality"] is True and info["quality_step"] == 1 / 256
    assert set(info["compare_settings"]) == set(info["compare_codecs"])
    r = client.post("/api/compress?quality=2.5", content=png_bytes(64, 48))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["quality"] == 2.5
    osd = base64.b64decode(body["file"])
    assert osd[4] == 2 and osd == tiny_codec.compress(Image.open(io.BytesIO(png_bytes(64, 48))).convert("RGB"), quality=2.5)
    assert client.post("/api/decompress", content=osd).json()["quality"] == 2.5
    for bad in ("0.5", "nan", "9", "two"):
        r = client.post(f"/api/compress?quality={bad}", content=png_bytes(16, 16))
        assert r.status_code == 400 and "quality must be a number from 1 to" in r.json()["error"]


def test_compare_matching_osdiff_to_a_classical_file(client):
    image_bytes = png_bytes(96, 80)
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    jpeg = classical_codec("jpeg")
    setting = 60
    target = len(jpeg.encode_bytes(image, setting))
    r = client.post(f"/api/compare?match=jpeg&setting={setting}&codecs=jpeg,webp", content=image_bytes)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["match"] == {"codec": "jpeg", "setting": setting, "bytes": target}
    osd, first = body["results"][0], body["results"][1]
    assert [x["codec"] for x in body["results"]] == ["tiny-test", "jpeg", "webp"]
    assert (first["setting"], first["bytes"]) == (setting, target)  # the classical file as it was asked for
    assert osd["encodes"] >= 1 and body["quality"] == osd["setting"]
    if osd["fits"]:
        assert osd["bytes"] <= target
    else:
        assert osd["setting"] == 1 and any("lowest quality" in w for w in body["warnings"])
    webp = body["results"][2]  # the others are matched to osdiff's file as before
    assert abs(webp["bytes"] - osd["bytes"]) <= max(osd["bytes"], webp["bytes"])


@pytest.mark.parametrize("query, message", [
    ("match=gif&setting=3", "unknown or unavailable codec"),
    ("match=jpeg", "setting of jpeg must be an integer from 1 to 95"),
    ("match=jpeg&setting=200", "setting of jpeg must be"),
    ("match=jpeg&setting=50&quality=2", "not both"),
])
def test_bad_match_is_one_line_400(client, query, message):
    r = client.post(f"/api/compare?{query}", content=png_bytes(16, 16))
    assert r.status_code == 400 and message in r.json()["error"]
    assert_alive(client)
