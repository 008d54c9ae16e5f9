"""DISTS (Ding et al. 2020) with weights from local files: torchvision VGG16 ImageNet weights
(the user supplies them; they cannot be fetched here) and the DISTS alpha/beta file."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import OSDiffError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


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
    """1 - DISTS similarity; lower is better; (B,) for images (B,3,H,W) in [0,1]."""

    def __init__(self, vgg16_path: str, alpha_beta_path: str) -> None:
        super().__init__()
        import torchvision

        features = torchvision.models.vgg16(weights=None).features
        state = torch.load(vgg16_path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier")}
        try:
            features.load_state_dict(state)
        except RuntimeError as exc:
            raise OSDiffError(f"{vgg16_path}: not torchvision VGG16 weights ({str(exc).splitlines()[0]})") from None
        f = list(features)
        self.stages = nn.ModuleList([
            nn.Sequential(*f[0:4]),
            nn.Sequential(L2Pool(64), *f[5:9]),
            nn.Sequential(L2Pool(128), *f[10:16]),
            nn.Sequential(L2Pool(256), *f[17:23]),
            nn.Sequential(L2Pool(512), *f[24:30]),
        ])
        self.channels = [3, 64, 128, 256, 512, 512]
        weights = torch.load(alpha_beta_path, map_location="cpu", weights_only=True)
        self.register_buffer("alpha", weights["alpha"].reshape(1, -1, 1, 1).float())
        self.register_buffer("beta", weights["beta"].reshape(1, -1, 1, 1).float())
        if self.alpha.shape[1] != sum(self.channels):
            raise OSDiffError(f"{alpha_beta_path}: expected {sum(self.channels)} alpha/beta weights")
        self.register_buffer("mean", torch.tensor(MEAN)[None, :, None, None])
        self.register_buffer("std", torch.tensor(STD)[None, :, None, None])
        self.requires_grad_(False).eval()

    def _features(self, x: Tensor) -> list[Tensor]:
        h = (x - self.mean) / self.std
        out = [x]
        for stage in self.stages:
            h = stage(h)
            out.append(h)
        return out

    def forward(self, x: Tensor, ref: Tensor) -> Tensor:
        fx, fr = self._features(x), self._features(ref)
        total = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha / total, self.channels, dim=1)
        betas = torch.split(self.beta / total, self.channels, dim=1)
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
