"""The shipped osdiff-tiny on a real photo (skipped where ../shared/data is absent)."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest

import osdiff
from osdiff.evaluation.metrics import MetricSuite
from osdiff.imageio import open_image, to_tensor

from .conftest import shared_photo

PHOTO = shared_photo()


@pytest.mark.skipif(PHOTO is None, reason="../shared/data/images is not here")
def test_every_level_round_trips_with_rising_rate_and_falling_distortion():
    codec = osdiff.load("osdiff-tiny")
    image = open_image(PHOTO)
    ref = to_tensor(image)
    suite = MetricSuite()
    bpps, psnrs, haarpsi = [], [], []
    for q in range(1, codec.num_quality_levels + 1):
        data = codec.compress(image, quality=q)
        out = codec.decompress(data)
        assert out.size == image.size
        m = suite(to_tensor(out), ref)
        bpps.append(len(data) * 8 / (image.width * image.height))
        psnrs.append(m["psnr"])
        haarpsi.append(m["haarpsi"])
    assert bpps == sorted(bpps) and len(set(bpps)) == len(bpps), bpps
    assert psnrs == sorted(psnrs), psnrs
    assert haarpsi == sorted(haarpsi), haarpsi
    assert 0.02 < bpps[0] and bpps[-1] < 1.0
    assert np.isfinite(psnrs).all() and psnrs[-1] > 20


@pytest.mark.skipif(PHOTO is None, reason="../shared/data/images is not here")
def test_shipped_hific_baseline_round_trips_every_level():
    """hific-tiny, the HiFiC-style baseline shipped for comparisons (issue 7). As a GAN codec
    its distortion need not fall at every level; its rate must rise."""
    codec = osdiff.load("hific-tiny")
    assert type(codec).__name__ == "BaselinePipeline" and codec.num_quality_levels == 4
    image = open_image(PHOTO)
    ref = to_tensor(image)
    bpps = []
    for q in range(1, 5):
        data = codec.compress(image, quality=q)
        out = codec.decompress(data)
        assert out.size == image.size
        assert MetricSuite()(to_tensor(out), ref)["psnr"] > 18
        bpps.append(len(data) * 8 / (image.width * image.height))
    assert bpps == sorted(bpps) and len(set(bpps)) == 4 and 0.02 < bpps[0] and bpps[-1] < 1.0, bpps
    assert "hific-tiny" in osdiff.available_models()


@pytest.mark.skipif(PHOTO is None, reason="../shared/data/images is not here")
def test_file_size_rises_over_the_whole_continuous_quality_range():
    """25 qualities from 1 to the highest level (most between levels): file size non-decreasing,
    up to a few bytes of coding noise, and rising overall."""
    codec = osdiff.load("osdiff-tiny")
    assert codec.continuous_quality
    image = open_image(PHOTO)
    qualities = np.linspace(1, codec.num_quality_levels, 25)
    sizes = [len(codec.compress(image, quality=float(q))) for q in qualities]
    noise = 8  # bytes
    assert all(b >= a - noise for a, b in zip(sizes, sizes[1:])), sizes
    assert sizes[-1] > 1.5 * sizes[0], sizes


@pytest.mark.skipif(PHOTO is None, reason="../shared/data/images is not here")
def test_target_size_on_a_photo_lands_within_ten_percent_of_the_budget():
    codec = osdiff.load("osdiff-tiny")
    image = open_image(PHOTO)
    low, high = (len(codec.compress(image, quality=q)) for q in (1, codec.num_quality_levels))
    for target in (round(low * 0.7 + high * 0.3), round(low * 0.2 + high * 0.8)):
        result = codec.encode(image, target_bytes=target)
        assert result.fits and 0.9 * target <= len(result.data) <= target, (target, len(result.data))
        assert result.encodes <= codec.rate_control.max_encodes and 1 < result.quality < codec.num_quality_levels
        assert codec.decompress(result.data).size == image.size


@pytest.mark.parametrize("fixture, model_hash", [("osdiff-tiny-v1.osd", "81e096754ff8fc9b"),
                                                  ("osdiff-tiny-v2.0.osd", "c39f390ff12a9d95"),
                                                  ("osdiff-tiny-v2.1.osd", "d045cc9b05b7b160"),
                                                  ("osdiff-tiny-v2.2.osd", "3c9448020dce29b2"),
                                                  ("osdiff-tiny-v2.3.osd", "778d10dfb5672597"),
                                                  ("osdiff-tiny-v2.4.osd", "f9e5072ae2669500"),
                                                  ("osdiff-tiny-v2.5.osd", "639f02c51bd4f764"),
                                                  ("osdiff-tiny-v2.6.osd", "16aa0c407ba5ae32"),
                                                  ("osdiff-tiny-v3.osd", "957e09885a3f3537"),
                                                  ("osdiff-tiny-v3.1.osd", "1ff957d163226c51"),
                                                  ("osdiff-tiny-v3.2.osd", "582b2c72ce728dac"),
                                                  ("osdiff-tiny-v3.3.osd", "ba46275e27e304be"),
                                                  ("osdiff-tiny-v3.4.osd", "1c60557375960c87"),
                                                  ("osdiff-tiny-v3.5.osd", "13a03f55e97cf999")])
def test_a_file_of_a_replaced_model_is_one_clear_line(tmp_path, fixture, model_hash):
    """osdiff-tiny v2 replaced v1, v2.1 v2.0, v2.2 v2.1, v2.3 v2.2, v2.4 v2.3, v2.5 v2.4, v2.6 v2.5, v3 v2.6, v3.1 v3 (the same bitstream, TAEF2's own decoder), v3.2 v3.1 (no UNet step above quality 4), v3.3 v3.2 (v3's objective on a GPU), v3.4 v3.3 (trained on), v3.5 v3.4 (its TAEF2 decoder fine-tuned toward the photos) and v3.6 v3.5 (a per-level realism: the step's output blended toward the hint), under the same name: their files
    (fixtures, made by each before the switch) are refused with one line naming the model hash;
    nothing is written."""
    from osdiff.cli import main

    old = Path(__file__).parent / "fixtures" / fixture
    out = tmp_path / "old.png"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["decompress", str(old), "-o", str(out)]) != 0
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and model_hash in lines[0] and "osdiff-tiny" in lines[0], lines
    assert not out.exists()
