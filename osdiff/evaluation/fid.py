"""FID and KID on 256x256 patches (the HiFiC / PerCo protocol), from Inception-v3 features.

The Inception weights (torch-fidelity's `pt_inception-2015-12-05-6726825d.pth`) cannot be
downloaded here: they come from a local path (option, OSDIFF_INCEPTION_WEIGHTS, or the torch
hub cache); without them FID/KID are reported unavailable."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
PATCH = 256


def inception_weights(path: str | None) -> str | None:
    path = path or os.environ.get("OSDIFF_INCEPTION_WEIGHTS")
    if path:
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    return cached if os.path.isfile(cached) else None


class InceptionFeatures:
    """2048-d pool features of every non-overlapping 256x256 patch of an image."""

    def __init__(self, weights_path: str) -> None:
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=weights_path).eval()

    @torch.no_grad()
    def __call__(self, image: Tensor) -> np.ndarray:
        """(1,3,H,W) in [0,1] -> (patches, 2048); images smaller than a patch give none."""
        _, _, h, w = image.shape
        patches = [image[:, :, y : y + PATCH, x : x + PATCH]
                   for y in range(0, h - PATCH + 1, PATCH) for x in range(0, w - PATCH + 1, PATCH)]
        if not patches:
            return np.zeros((0, 2048), np.float64)
        batch = (torch.cat(patches) * 255).round().to(torch.uint8)
        return self.net(batch).double().numpy()


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two feature sets."""
    from scipy import linalg

    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def kid(real: np.ndarray, fake: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (Bińkowski et al. 2018)."""
    d = real.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    m, n = len(real), len(fake)
    kxx, kyy, kxy = k(real, real), k(fake, fake), k(real, fake)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())
