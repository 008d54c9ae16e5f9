"""DISTS (Ding et al. 2020, "Image Quality Assessment: Unifying Structure and Texture
Similarity"): VGG16 features with L2 pooling; per channel, structure (correlation) and texture
(mean) similarities weighted by the learned alpha/beta (shipped: osdiff/quality/weights, MIT).
Equal to the authors' DISTS_pytorch 0.1 module (tested)."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import OSDiffError
from .backbones import VGG16, backbone_state_dict

ALPHA_BETA = Path(__file__).resolve().parent / "weights" / "dists_alpha_beta.safetensors"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CHANNELS = (3, 64, 128, 256, 512, 512)


class L2Pool(nn.Module):
    """The Hanning-window L2 pooling DISTS uses instead of max pooling (stride 2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        a = np.hanning(5)[1:-1]
        g = torch.tensor(a[:, None] * a[None, :], dtype=torch.float32)
        self.register_buffer("filter", (g / g.sum())[None, None].repeat(channels, 1, 1, 1))
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        out = F.conv2d(x**2, self.filter, stride=2, padding=1, groups=self.channels)
        return (out + 1e-12).sqrt()


class DISTS(nn.Module):
    """(B,) 1 - DISTS similarity of images (B,3,H,W) in [0,1]; lower is more similar.
    `backbone` (torchvision VGG16 `features` state dict) and `alpha_beta` default to the
    pretrained ones (osdiff.quality.backbones; the package's alpha/beta)."""

    def __init__(self, backbone: dict[str, Tensor] | None = None, alpha_beta: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        import torchvision
        from safetensors.torch import load_file

        features = torchvision.models.vgg16(weights=None).features
        features.load_state_dict(backbone_state_dict(VGG16) if backbone is None else backbone)
        f = list(features)
        self.stages = nn.ModuleList([
            nn.Sequential(*f[0:4]),
            nn.Sequential(L2Pool(64), *f[5:9]),
            nn.Sequential(L2Pool(128), *f[10:16]),
            nn.Sequential(L2Pool(256), *f[17:23]),
            nn.Sequential(L2Pool(512), *f[24:30]),
        ])
        weights = load_file(str(ALPHA_BETA)) if alpha_beta is None else alpha_beta
        self.register_buffer("alpha", weights["alpha"].reshape(1, -1, 1, 1).float())
        self.register_buffer("beta", weights["beta"].reshape(1, -1, 1, 1).float())
        if self.alpha.shape[1] != sum(CHANNELS):
            raise OSDiffError(f"DISTS: expected {sum(CHANNELS)} alpha/beta weights, got {self.alpha.shape[1]}")
        self.register_buffer("mean", torch.tensor(MEAN)[None, :, None, None])
        self.register_buffer("std", torch.tensor(STD)[None, :, None, None])
        self.requires_grad_(False).eval()

    def features(self, x: Tensor) -> list[Tensor]:
        """The image and its five VGG stages' outputs."""
        h = (x - self.mean) / self.std
        out = [x]
        for stage in self.stages:
            h = stage(h)
            out.append(h)
        return out

    def forward(self, x: Tensor, ref: Tensor, ref_features: list[Tensor] | None = None) -> Tensor:
        """`ref_features`: `features(ref)` if already computed (a reference scored many times)."""
        fx, fr = self.features(x), self.features(ref) if ref_features is None else ref_features
        total = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha / total, CHANNELS, dim=1)
        betas = torch.split(self.beta / total, CHANNELS, dim=1)
        d1 = d2 = 0
        c1 = c2 = 1e-6
        for a, b, u, v in zip(alphas, betas, fx, fr):
            mu, mv = u.mean((2, 3), keepdim=True), v.mean((2, 3), keepdim=True)
            s1 = (2 * mu * mv + c1) / (mu**2 + mv**2 + c1)
            vu, vv = ((u - mu) ** 2).mean((2, 3), keepdim=True), ((v - mv) ** 2).mean((2, 3), keepdim=True)
            cov = (u * v).mean((2, 3), keepdim=True) - mu * mv
            s2 = (2 * cov + c2) / (vu + vv + c2)
            d1 = d1 + (a * s1).sum(1, keepdim=True)
            d2 = d2 + (b * s2).sum(1, keepdim=True)
        return (1 - (d1 + d2)).flatten()


@functools.lru_cache(maxsize=1)
def pretrained_dists() -> DISTS:
    """The pretrained DISTS, loaded once per process (frozen; shared by its callers)."""
    return DISTS()
