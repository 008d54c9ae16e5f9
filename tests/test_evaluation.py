"""Evaluation: metric sanity, BD-rate on curves with known answers, end-to-end report."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from osdiff.evaluation.bdrate import bd_rate, quality_at_rate, rate_at_quality
from osdiff.evaluation.codecs import classical_codec
from osdiff.evaluation.metrics import MetricSuite, colour_shift, detail_retention, psnr


def _photo(seed=0, h=96, w=128) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([np.sin(x / 5.0), np.cos(y / 7.0), np.sin((x + y) / 3.0)], 0) * 0.35 + 0.5
    img += rng.normal(0, 0.03, img.shape)
    return torch.from_numpy(np.clip(img, 0, 1)).float()[None]


def test_identical_images():
    x = _photo()
    m = MetricSuite()(x, x)
    assert m["psnr"] == math.inf
    assert m["ms_ssim"] == pytest.approx(1.0, abs=1e-5) and m["haarpsi"] == pytest.approx(1.0, abs=1e-4)
    assert m["ms_gmsd"] == pytest.approx(0.0, abs=1e-6) and m["detail_retention"] == pytest.approx(1.0)


def test_heavier_compression_scores_worse():
    from osdiff.imageio import to_tensor
    from osdiff.imageio import tensor_to_pil

    x = _photo()
    pil = tensor_to_pil(x)
    jpeg = classical_codec("jpeg")
    suite = MetricSuite()
    low = suite(to_tensor(jpeg.encode(pil, 5)[1]), x)
    high = suite(to_tensor(jpeg.encode(pil, 90)[1]), x)
    for name in ("psnr", "ms_ssim", "haarpsi", "vsi", "fsim", "vif"):
        assert high[name] > low[name], name
    assert high["ms_gmsd"] < low["ms_gmsd"]


def test_detail_retention_sees_blur():
    x = _photo()
    blurred = torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
    assert detail_retention(blurred, x) < 0.5
    assert psnr(x, x) == math.inf


def test_colour_shift_measures_a_cast_in_levels():
    x = _photo() * 0.8
    tinted = x.clone()
    tinted[:, 2] += 6 / 255  # blue raised by 6 levels, red lowered by 2
    tinted[:, 0] -= 2 / 255
    assert colour_shift(tinted, x) == pytest.approx(6.0, abs=1e-3)
    assert colour_shift(x, x) == 0.0
    assert MetricSuite()(tinted, x)["colour_shift"] == pytest.approx(6.0, abs=1e-3)


def test_lpips_from_local_weights_is_zero_on_identical(tmp_path):
    import torchvision

    torch.manual_seed(0)
    backbone = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), backbone)
    linear = tmp_path / "lin.pth"
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate([64, 192, 384, 256, 256])}, linear)
    suite = MetricSuite(str(backbone), str(linear))
    assert "lpips" in suite.names and "lpips" not in suite.unavailable
    x = _photo()
    assert suite(x, x)["lpips"] == pytest.approx(0.0, abs=1e-7)
    assert suite(x.flip(-1), x)["lpips"] > 0


def test_missing_weights_reported_unavailable():
    suite = MetricSuite()
    assert "lpips" not in suite.names
    assert {"lpips", "dists"} <= set(suite.unavailable)


def test_bd_rate_known_answers():
    rates = [0.1, 0.2, 0.4, 0.8]
    quality = [30.0, 33.0, 36.0, 39.0]
    assert bd_rate(rates, quality, [r * 0.5 for r in rates], quality) == pytest.approx(-50.0, abs=1e-6)
    assert bd_rate(rates, quality, [r * 1.25 for r in rates], quality) == pytest.approx(25.0, abs=1e-6)
    # lower-is-better metric: same logic with quality mirrored
    assert bd_rate(rates, [-q for q in quality], [r * 0.5 for r in rates], [-q for q in quality], higher_is_better=False) == pytest.approx(-50.0, abs=1e-6)
    # no overlap in quality, or too few points
    assert bd_rate(rates, quality, rates, [q + 20 for q in quality]) is None
    assert bd_rate(rates, quality, [0.1], [30.0]) is None
    assert rate_at_quality(rates, quality, 33.0) == pytest.approx(0.2)
    assert quality_at_rate(rates, quality, 0.4) == pytest.approx(36.0)
    assert quality_at_rate(rates, quality, 5.0) is None


def test_end_to_end_eval_report(tmp_path, tiny_codec_folder, capsys):
    from osdiff.cli import main

    data = tmp_path / "data"
    data.mkdir()
    from osdiff.imageio import tensor_to_pil

    for i in range(2):
        tensor_to_pil(_photo(i, 80, 104)).save(data / f"img{i}.png")
    out = tmp_path / "results"
    assert main(["eval", str(data), "--codecs", "osdiff-tiny,jpeg,webp", "--model", str(tiny_codec_folder), "--out", str(out)]) == 0
    for name in ("per_image.csv", "aggregate.csv", "summary.json", "report.html", "plots/rd_psnr.png", "plots/rd_haarpsi.png"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    refs = re.findall(r"src='([^']+)'", html)
    assert refs and all((out / r).is_file() for r in refs)
    assert "unavailable" in html.lower()
    for label in ("original", "osdiff-tiny", "jpeg", "webp"):  # side-by-side crops, one per codec
        assert (out / "crops" / f"img0_{label}.png").is_file(), label
    rows = (out / "per_image.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * (4 + len(classical_codec("jpeg").settings) + len(classical_codec("webp").settings))
    # resume: nothing is recomputed, nothing duplicated
    assert main(["eval", str(data), "--codecs", "osdiff-tiny,jpeg,webp", "--model", str(tiny_codec_folder), "--out", str(out), "--no-crops"]) == 0
    assert (out / "per_image.csv").read_text().strip().splitlines() == rows
    assert "codec vs jpeg" in capsys.readouterr().out


def test_dists_from_local_weights(tmp_path):
    import torchvision

    from osdiff.evaluation.dists import DISTS

    torch.manual_seed(0)
    vgg = tmp_path / "vgg16.pth"
    torch.save(torchvision.models.vgg16(weights=None).features.state_dict(), vgg)
    ab = tmp_path / "ab.pt"
    torch.save({"alpha": torch.rand(1, 1475, 1, 1), "beta": torch.rand(1, 1475, 1, 1)}, ab)
    suite = MetricSuite(dists_backbone=str(vgg), dists_weights=str(ab))
    assert "dists" in suite.names
    x = _photo()
    assert suite(x, x)["dists"] == pytest.approx(0.0, abs=1e-5)
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    assert suite(noisy, x)["dists"] > suite((x + 0.02 * torch.randn_like(x)).clamp(0, 1), x)["dists"] > 0


def test_fid_kid_formulas():
    from osdiff.evaluation.fid import fid, kid

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid(a, a + 3.0) == pytest.approx(8 * 9.0, rel=1e-3)
    assert abs(kid(a, rng.normal(size=(400, 8)))) < 0.05 < kid(a, a + 3.0)


def test_fid_plumbing_with_stand_in_features(tmp_path, monkeypatch):
    """The runner's FID/KID path, with a stand-in for Inception (its weights are not here)."""
    import osdiff.evaluation.fid as fid_module
    from osdiff.evaluation.codecs import classical_codec
    from osdiff.evaluation.runner import evaluate
    from osdiff.imageio import tensor_to_pil

    class StandIn:
        def __init__(self, path):
            self.proj = torch.randn(3 * 16 * 16, 32, generator=torch.Generator().manual_seed(0)).double()

        def __call__(self, image):
            p = torch.nn.functional.adaptive_avg_pool2d(image, 16).double().reshape(1, -1)
            return np.repeat((p @ self.proj).numpy(), 4, axis=0) + np.random.default_rng(0).normal(size=(4, 32))

    monkeypatch.setattr(fid_module, "InceptionFeatures", StandIn)
    data = tmp_path / "d"
    data.mkdir()
    for i in range(2):
        tensor_to_pil(_photo(i, 64, 64)).save(data / f"{i}.png")
    jpeg = classical_codec("jpeg")
    jpeg.settings = [5, 90]
    summary = evaluate(data, [jpeg], tmp_path / "out", MetricSuite(), crops=False, inception="unused")
    pts = {p["setting"]: p for p in summary["curves"]["jpeg"]}
    assert pts["90"]["patches_inception"] == 8 and math.isfinite(pts["90"]["fid"]) and math.isfinite(pts["5"]["kid"])
    assert "fid" not in summary["unavailable_metrics"]
    assert {"fid", "kid", "kid_taef2"} <= set(summary["metrics"])


def test_texture_kid_sees_blur_and_noise():
    """kid_taef2's features (the shipped TAEF2 encoder): a photo's patches against themselves
    score lower than against the same patches blurred or noised."""
    from PIL import ImageFilter

    from osdiff.evaluation.patch_sets import TAEF2TextureStatistics, standardised_kid, texture_patches
    from osdiff.imageio import tensor_to_pil, to_tensor

    image = _photo(3, 320, 384)
    assert texture_patches(image).shape == (30, 3, 64, 64)
    features = TAEF2TextureStatistics()
    real = features(image)
    assert real.shape == (30, 384) and features(image[..., :50, :]).shape[0] == 0
    blurred = to_tensor(tensor_to_pil(image).filter(ImageFilter.GaussianBlur(2)))
    noisy = (image + 0.1 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    same = standardised_kid(real, features((image * 255).round() / 255))
    assert same < 0.5 * standardised_kid(real, features(blurred))
    assert same < 0.5 * standardised_kid(real, features(noisy))


def test_texture_kid_in_eval_and_refilled_on_resume(tmp_path):
    """kid_taef2 is computed per (codec, setting), written to aggregate.csv with a BD-rate, and
    rows evaluated before it existed get their features on the next run (no duplicated rows)."""
    import shutil

    from osdiff.evaluation.runner import evaluate
    from osdiff.imageio import tensor_to_pil

    data = tmp_path / "d"
    data.mkdir()
    for i in range(2):
        tensor_to_pil(_photo(i, 192, 128)).save(data / f"{i}.png")
    jpeg, webp = classical_codec("jpeg"), classical_codec("webp")
    jpeg.settings, webp.settings = [5, 60, 95], [5, 60, 95]
    out = tmp_path / "out"
    summary = evaluate(data, [jpeg, webp], out, MetricSuite(), anchor="jpeg", crops=False)
    pts = {p["setting"]: p for p in summary["curves"]["jpeg"]}
    assert pts["5"]["patches_taef2"] == 12 and pts["5"]["kid_taef2"] > pts["95"]["kid_taef2"]
    assert "kid_taef2" in summary["bd_rate_percent"]["webp"]
    assert "kid_taef2" in (out / "aggregate.csv").read_text().splitlines()[0]
    assert "kid_taef2" in (out / "report.html").read_text()
    rows = (out / "per_image.csv").read_text()
    shutil.rmtree(out / "features")
    again = evaluate(data, [jpeg, webp], out, MetricSuite(), anchor="jpeg", crops=False)
    assert (out / "per_image.csv").read_text() == rows
    assert again["curves"]["jpeg"][0]["kid_taef2"] == pytest.approx(summary["curves"]["jpeg"][0]["kid_taef2"])


def test_parse_qualities():
    from osdiff import OSDiffError
    from osdiff.evaluation.codecs import parse_qualities

    assert parse_qualities("2, 1,1.5,2.0,1.3") == [1, 1.30078125, 1.5, 2]
    assert [type(q) for q in parse_qualities("1,1.5")] == [int, float]
    for bad in ("", "1,abc", "0.5", "1,-2", "inf", "nan"):
        with pytest.raises(OSDiffError, match="--qualities"):
            parse_qualities(bad)


def test_eval_dense_qualities_for_codecs_with_gains(tmp_path, tiny_codec_folder, capsys):
    import csv

    from osdiff.cli import main
    from osdiff.imageio import tensor_to_pil

    data = tmp_path / "data"
    data.mkdir()
    tensor_to_pil(_photo(0, 64, 80)).save(data / "img0.png")
    out = tmp_path / "results"
    argv = ["eval", str(data), "--codecs", "osdiff-tiny,jpeg", "--model", str(tiny_codec_folder), "--out", str(out),
            "--no-crops", "--qualities", "1,1.5,2.25,3"]
    assert main(argv) == 0
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["setting"] for r in rows if r["codec"] == "osdiff-tiny") == ["1", "1.5", "2.25", "3"]
    assert len([r for r in rows if r["codec"] == "jpeg"]) == len(classical_codec("jpeg").settings)
    capsys.readouterr()
    assert main(argv[:-1] + ["1,9"]) == 1  # above the highest level
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--qualities" in err[0]
    assert main(["eval", str(data), "--codecs", "jpeg", "--out", str(out), "--qualities", "1,2"]) == 1
    assert "none of the codecs" in capsys.readouterr().err
