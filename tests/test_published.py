"""Published reference points (package data): they load as evaluation curves, hold the
values of the source workbook, and feed `curve_bd_rate` directly."""
from __future__ import annotations

import math

import pytest

from osdiff.errors import OSDiffError
from osdiff.evaluation.bdrate import curve_bd_rate
from osdiff.evaluation.metrics import HIGHER_IS_BETTER
from osdiff.evaluation.published import CITATION, METRICS, REFERENCES, load_published

METHODS = {"DiffEIC", "RDEIC-2", "RDEIC-5", "HiFiC", "MS-ILLM", "PerCo", "ELIC", "VQIR", "BPG", "VTM"}


@pytest.mark.parametrize("dataset", REFERENCES)
def test_every_dataset_loads_as_curves(dataset):
    curves = load_published(dataset)
    assert set(curves) == METHODS
    for pts in curves.values():
        assert len(pts) >= 2
        assert [p["bpp"] for p in pts] == sorted(p["bpp"] for p in pts)
        for p in pts:
            assert set(p) == {"setting", "images", "bpp", *METRICS}
            assert p["setting"] == "" and p["images"] == 0 and 0 < p["bpp"] < 1
            assert all(isinstance(p[m], float) for m in METRICS)
            assert 0 < p["lpips"] < 1 and 0 < p["dists"] < 1 and 0 < p["ms_ssim"] < 1 and 5 < p["psnr"] < 40
    has_fid = dataset != "kodak"  # the workbook gives no FID/KID on Kodak (24 images)
    assert all(math.isfinite(p["fid"]) == has_fid and math.isfinite(p["kid"]) == has_fid
               for pts in curves.values() for p in pts)


def test_metric_names_are_the_evaluation_names():
    assert set(METRICS) <= set(HIGHER_IS_BETTER)
    assert set(METRICS) == {"lpips", "dists", "psnr", "ms_ssim", "fid", "kid"}


@pytest.mark.parametrize("method,bpp,lpips,dists", [
    ("HiFiC", 0.07901635, 0.1786, 0.152636967599391),
    ("HiFiC", 0.1491, 0.0926, 0.103646593789259),
    ("MS-ILLM", 0.0809326171875, 0.1099, 0.108859911561012),
    ("RDEIC-2", 0.0655348036024305, 0.1227, 0.0879402408997217),
])
def test_known_kodak_points(method, bpp, lpips, dists):
    points = [p for p in load_published("kodak")[method] if p["bpp"] == bpp]
    assert len(points) == 1
    p = points[0]
    assert (p["lpips"], p["dists"]) == (lpips, dists)
    # as the papers print them (3 decimals)
    assert (round(p["bpp"], 3), round(p["lpips"], 3), round(p["dists"], 3)) == (
        round(bpp, 3), round(lpips, 3), round(dists, 3))


def test_kid_is_raw_not_scaled():
    kids = [p["kid"] for pts in load_published("tecnick").values() for p in pts]
    assert max(kids) < 0.1 and min(kids) > -0.01  # raw KID (unbiased, can dip below 0)


@pytest.mark.parametrize("dataset", REFERENCES)
def test_bd_rate_of_a_curve_against_itself_is_zero(dataset):
    checked = 0
    for pts in load_published(dataset).values():
        for m in METRICS:
            bd = curve_bd_rate(pts, pts, m, HIGHER_IS_BETTER[m])
            if bd is not None:
                assert bd == pytest.approx(0.0, abs=1e-9)
                checked += 1
    assert checked >= 10 * 4


def test_unknown_dataset_names_the_choices():
    with pytest.raises(OSDiffError, match="kodak, tecnick, clic2020") as exc:
        load_published("div2k")
    assert "\n" not in str(exc.value)


def test_citation_is_one_line():
    assert "\n" not in CITATION and "DiffEIC" in CITATION and "TCSVT" in CITATION
