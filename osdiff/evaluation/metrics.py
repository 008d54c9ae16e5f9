"""Image quality metrics on (1,3,H,W) tensors in [0,1], from piq where it has them.

Weight-free: PSNR, MS-SSIM, HaarPSI, MS-GMSD, VSI, FSIM, VIF, detail retention and colour shift.
LPIPS and DISTS need ImageNet backbone weights that cannot be fetched here: they are read
from local paths (options, OSDIFF_LPIPS_BACKBONE / OSDIFF_LPIPS_LINEAR /
OSDIFF_DISTS_BACKBONE / OSDIFF_DISTS_WEIGHTS, or torchvision checkpoints in the torch hub
cache). FID/KID (osdiff.evaluation.fid) need Inception weights the same way; the realism
proxy kid_taef2 (osdiff.evaluation.patch_sets) uses the TAEF2 encoder shipped with
osdiff-tiny. A metric without its weights is reported as unavailable with the reason, never
replaced by something else.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

HIGHER_IS_BETTER = {
    "psnr": True, "ms_ssim": True, "haarpsi": True, "ms_gmsd": False, "vsi": True, "fsim": True,
    "vif": True, "detail_retention": True, "colour_shift": False, "lpips": False, "dists": False,
    # distribution metrics (osdiff.evaluation.patch_sets), per (codec, setting)
    "fid": False, "kid": False, "kid_taef2": False,
}


def psnr(x: Tensor, ref: Tensor) -> float:
    """dB on 8-bit-rounded images; identical images give +inf."""
    a, b = (x * 255).round(), (ref * 255).round()
    mse = F.mse_loss(a, b).item()
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def luma_gradients(t: Tensor) -> tuple[Tensor, Tensor]:
    """Images (B,3,H,W) -> horizontal (B,1,H,W-1) and vertical (B,1,H-1,W) differences of
    their luma (Rec. 601 weights)."""
    luma = (0.299 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2])[:, None]
    return luma[..., :, 1:] - luma[..., :, :-1], luma[..., 1:, :] - luma[..., :-1, :]


def detail_retention(x: Tensor, ref: Tensor) -> float:
    """High-frequency energy of `x` relative to `ref`: mean squared luma gradient ratio.
    1.0 keeps the original's detail; below 1 is over-smoothed; above 1 adds texture/noise."""
    def energy(t: Tensor) -> float:
        gx, gy = luma_gradients(t)
        return float(gx.pow(2).mean() + gy.pow(2).mean())

    base = energy(ref)
    return energy(x) / base if base > 0 else 1.0


def colour_shift(x: Tensor, ref: Tensor) -> float:
    """Colour cast in 8-bit levels: the largest difference, over R, G and B, between the mean of
    that channel in `x` and in `ref` (0 = the same average colour)."""
    diff = (x.float().mean(dim=(0, 2, 3)) - ref.float().mean(dim=(0, 2, 3))).abs()
    return float(diff.max()) * 255.0


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
    """Computes every available metric; `unavailable` says which are not, and why."""

    lpips_backbone: str | None = None  # torchvision AlexNet ImageNet state dict
    lpips_linear: str | None = None  # LPIPS v0.1 alex.pth
    dists_backbone: str | None = None  # torchvision VGG16 ImageNet state dict
    dists_weights: str | None = None  # DISTS alpha/beta (weights.pt)

    def __post_init__(self) -> None:
        env = os.environ.get
        self.lpips_backbone = self.lpips_backbone or env("OSDIFF_LPIPS_BACKBONE") or _hub_file("alexnet-owt-7be5be79.pth")
        self.lpips_linear = self.lpips_linear or env("OSDIFF_LPIPS_LINEAR")
        self.dists_backbone = self.dists_backbone or env("OSDIFF_DISTS_BACKBONE") or _hub_file("vgg16-397923af.pth")
        self.dists_weights = self.dists_weights or env("OSDIFF_DISTS_WEIGHTS")
        self.unavailable: dict[str, str] = {}
        self._lpips = self._dists = None
        if self.lpips_backbone and self.lpips_linear:
            from ..training.losses import LPIPS

            self._lpips = LPIPS(self.lpips_backbone, self.lpips_linear)
        else:
            self.unavailable["lpips"] = "needs AlexNet ImageNet weights (--lpips-backbone) and LPIPS linear weights (--lpips-linear)"
        if self.dists_backbone and self.dists_weights:
            from .dists import DISTS

            self._dists = DISTS(self.dists_backbone, self.dists_weights)
        else:
            self.unavailable["dists"] = "needs VGG16 ImageNet weights (--dists-backbone) and DISTS alpha/beta (--dists-weights)"

    @property
    def names(self) -> list[str]:
        names = ["psnr", "ms_ssim", "haarpsi", "ms_gmsd", "vsi", "fsim", "vif", "detail_retention", "colour_shift"]
        return names + (["lpips"] if self._lpips is not None else []) + (["dists"] if self._dists is not None else [])

    @torch.no_grad()
    def __call__(self, x: Tensor, ref: Tensor) -> dict[str, float]:
        x, ref = x.float().clamp(0, 1), ref.float().clamp(0, 1)
        out = {"psnr": psnr(x, ref), "detail_retention": detail_retention(x, ref), "colour_shift": colour_shift(x, ref)}
        for name in ("ms_ssim", "haarpsi", "ms_gmsd", "vsi", "fsim", "vif"):
            out[name] = piq_metric(name, x, ref)
        if self._lpips is not None:
            out["lpips"] = float(self._lpips(x, ref).mean())
        if self._dists is not None:
            out["dists"] = float(self._dists(x, ref).mean())
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


def _hub_file(name: str) -> str | None:
    """A torchvision checkpoint already in the usual torch hub cache, if any."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    return path if os.path.isfile(path) else None


def _pad_small(t: Tensor, side: int = 161) -> Tensor:
    h, w = t.shape[-2:]
    return F.pad(t, (0, max(0, side - w), 0, max(0, side - h)), mode="replicate")
