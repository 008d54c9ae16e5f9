"""Per-image quality metrics on (1,3,H,W) tensors in [0,1].

The field's perceptual metrics lead: LPIPS (AlexNet v0.1; VGG by option) and DISTS, with
their ImageNet backbones found locally (osdiff.quality.backbones; `make install` provides them);
then PSNR and MS-SSIM for fidelity; then the other piq metrics (HaarPSI, MS-GMSD, VSI, FSIM,
VIF); the local colour error and added texture the eye sees (osdiff.quality.artifacts: CIEDE2000
of 16-px windows, overall and where saturated, and spurious texture); and two diagnostics (detail
retention, colour shift). FID/KID and the in-house proxy
kid_taef2 are distribution metrics (osdiff.evaluation.patch_sets). A metric whose weights are
missing is reported unavailable with how to get them, never replaced by something else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import OSDiffError
from ..quality.artifacts import delta_e, delta_e_saturated, grid_texture, spurious_texture
from ..quality.pixel import colour_shift, detail_retention, luma_gradients, psnr  # noqa: F401 (re-exported)

HIGHER_IS_BETTER = {
    "lpips": False, "lpips_vgg": False, "dists": False,
    "psnr": True, "ms_ssim": True, "haarpsi": True, "ms_gmsd": False, "vsi": True, "fsim": True,
    "vif": True, "detail_retention": True, "colour_shift": False,
    "delta_e": False, "delta_e_saturated": False, "spurious_texture": False, "grid_texture": False,
    # distribution metrics (osdiff.evaluation.patch_sets), per (codec, setting)
    "fid": False, "kid": False, "kid_taef2": False,
}
# the order of columns, tables and plots: the field's metrics first, in-house ones last
HEADLINE = ("lpips", "lpips_vgg", "dists", "fid", "kid", "psnr", "ms_ssim")
SECONDARY = ("delta_e", "delta_e_saturated", "spurious_texture", "grid_texture", "haarpsi", "ms_gmsd", "vsi", "fsim", "vif", "detail_retention", "colour_shift", "kid_taef2")
# diagnostics with an ideal value (1 and 0), not a quality scale (a blurred image adds no
# texture): no BD-rate for them
DIAGNOSTIC = ("detail_retention", "colour_shift", "spurious_texture", "grid_texture")
# measured on pixels, no network
PIXEL = {"psnr": psnr, "delta_e": delta_e, "delta_e_saturated": delta_e_saturated,
         "spurious_texture": spurious_texture, "grid_texture": grid_texture, "detail_retention": detail_retention, "colour_shift": colour_shift}
PIQ = ("ms_ssim", "haarpsi", "ms_gmsd", "vsi", "fsim", "vif")


def headline_order(names: list[str]) -> list[str]:
    """`names` with the headline metrics first, then the secondary ones, then anything else."""
    rank = {n: i for i, n in enumerate(HEADLINE + SECONDARY)}
    return sorted(names, key=lambda n: rank.get(n, len(rank)))


def rd_metrics(names: list[str]) -> list[str]:
    """The metrics of `names` that BD-rates are computed for (all but the diagnostics)."""
    return [n for n in names if n not in DIAGNOSTIC]


def _piq(name: str):
    import piq

    return {
        "ms_ssim": lambda a, b: piq.multi_scale_ssim(a, b, data_range=1.0),
        "haarpsi": lambda a, b: piq.haarpsi(a, b, data_range=1.0),
        "ms_gmsd": lambda a, b: piq.multi_scale_gmsd(a, b, data_range=1.0),
        "vsi": lambda a, b: piq.vsi(a, b, data_range=1.0),
        "fsim": lambda a, b: piq.fsim(a, b, data_range=1.0),
        "vif": lambda a, b: piq.vif_p(a, b, data_range=1.0),
    }[name]


@dataclass
class MetricSuite:
    """Computes every available per-image metric; `unavailable` says which are not, and why.
    `lpips_net`: 'alex' (column `lpips`, the field's metric) or 'vgg' (column `lpips_vgg`);
    `only`: just these metrics (None: all; FID/KID are always measured, kid_taef2 when named)."""

    lpips_net: str = "alex"
    only: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.lpips_net not in ("alex", "vgg"):
            raise OSDiffError(f"LPIPS network {self.lpips_net!r}: choose alex or vgg")
        self.lpips_name = "lpips" if self.lpips_net == "alex" else "lpips_vgg"
        self.unavailable: dict[str, str] = {}
        self._lpips = self._dists = self._ref = None
        self._ref_features: dict[str, list[Tensor]] = {}
        everything = {self.lpips_name, "dists", *PIXEL, *PIQ, "fid", "kid", "kid_taef2"}
        if self.only is not None and not set(self.only) <= everything:
            raise OSDiffError(f"unknown metric(s) {', '.join(sorted(set(self.only) - everything))}; "
                              f"per-image metrics: {', '.join(headline_order(sorted(everything)))}")
        from ..quality.dists import pretrained_dists
        from ..quality.lpips import pretrained_lpips

        self._lpips = self._load(self.lpips_name, lambda: pretrained_lpips(self.lpips_net))
        self._dists = self._load("dists", pretrained_dists)
        self._cheap = [n for n in (*PIXEL, *PIQ) if self.wanted(n)]

    def wanted(self, name: str) -> bool:
        """Whether metric `name` is to be measured (`only`)."""
        return self.only is None or name in self.only

    def _load(self, name: str, loader):
        """The network of metric `name`, or None when left out or its weights are missing (then
        `unavailable` says how to get them)."""
        from ..quality.backbones import BackboneMissing

        if not self.wanted(name):
            return None
        try:
            return loader()
        except BackboneMissing as exc:
            self.unavailable[name] = str(exc)
            return None

    @property
    def names(self) -> list[str]:
        learned = ([self.lpips_name] if self._lpips is not None else []) + (["dists"] if self._dists is not None else [])
        return headline_order(learned + self._cheap)

    @torch.no_grad()
    def __call__(self, x: Tensor, ref: Tensor) -> dict[str, float]:
        """Every metric of `x` against `ref`; the reference's LPIPS and DISTS features are kept
        while the same `ref` tensor comes back (an evaluation scores each photo many times)."""
        if self._ref is not ref:
            self._ref, self._ref_features = ref, {}
        cached = self._ref_features
        x, ref = x.float().clamp(0, 1), ref.float().clamp(0, 1)
        out = {n: PIXEL[n](x, ref) if n in PIXEL else piq_metric(n, x, ref) for n in self._cheap}
        if self._lpips is not None:
            if "lpips" not in cached:
                cached["lpips"] = self._lpips.features(ref)
            out[self.lpips_name] = float(self._lpips(x, ref, cached["lpips"]).mean())
        if self._dists is not None:
            if "dists" not in cached:
                cached["dists"] = self._dists.features(ref)
            out["dists"] = float(self._dists(x, ref, cached["dists"]).mean())
        return out


@torch.no_grad()
def piq_metric(name: str, x: Tensor, ref: Tensor) -> float:
    """One piq metric (ms_ssim, haarpsi, ms_gmsd, vsi, fsim, vif) of images in [0,1];
    images under 161 px are padded (MS-SSIM's 5 scales and VSI/FSIM need room); nan on failure."""
    x, ref = x.float().clamp(0, 1), ref.float().clamp(0, 1)
    if min(ref.shape[-2:]) < 161:
        x, ref = _pad_small(x), _pad_small(ref)
    try:
        return float(_piq(name)(x, ref))
    except (ValueError, RuntimeError, AssertionError):
        return math.nan


def _pad_small(t: Tensor, side: int = 161) -> Tensor:
    h, w = t.shape[-2:]
    return F.pad(t, (0, max(0, side - w), 0, max(0, side - h)), mode="replicate")
