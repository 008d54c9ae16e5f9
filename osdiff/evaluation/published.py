"""Published rate-quality points of other codecs (package data), as evaluation curves.

The numbers are transcribed from the DiffEIC authors' results workbook (see
`osdiff/evaluation/published_data/README.md`): published numbers, measured by others on their
images, machines and protocols. They place osdiff's curves among the field's; they are not
a like-for-like re-measurement.
"""
from __future__ import annotations

import csv
import math
from importlib import resources

from ..errors import OSDiffError

REFERENCES = ("kodak", "tecnick", "clic2020")
METRICS = ("lpips", "dists", "psnr", "ms_ssim", "fid", "kid")
CITATION = ("published points: Li et al., Toward Extreme Image Compression with Latent Feature "
            "Guidance and Diffusion Prior, IEEE TCSVT 2025 (GitHub huai-chang/DiffEIC, "
            "indicators/results.xlsx @ 9c21915)")


def load_published(dataset: str) -> dict[str, list[dict]]:
    """{method: [points sorted by bpp]} for one of `REFERENCES`, in the shape of
    `summary["curves"][codec]` (setting "", images 0, bpp, every metric in `METRICS`; NaN
    where the source gives none), so `curve_bd_rate` takes them directly."""
    if dataset not in REFERENCES:
        raise OSDiffError(f"unknown published reference {dataset!r}; choose one of {', '.join(REFERENCES)}")
    text = resources.files(__package__).joinpath("published_data", f"{dataset}.csv").read_text(encoding="utf-8")
    curves: dict[str, list[dict]] = {}
    for row in csv.DictReader(text.splitlines()):
        point = {"setting": "", "images": 0, "bpp": float(row["bpp"])}
        point.update({m: float(row[m]) if row[m] else math.nan for m in METRICS})
        curves.setdefault(row["method"], []).append(point)
    for pts in curves.values():
        pts.sort(key=lambda p: p["bpp"])
    return curves
