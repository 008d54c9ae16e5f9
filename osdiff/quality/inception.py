"""FID and KID on 256x256 patches (the HiFiC protocol, also PerCo's and MS-ILLM's): every
patch of a non-overlapping grid from the top-left corner, plus the same grid shifted by 128 px
in both directions, through the Inception-v3 "2015-12-05" FID network (torch-fidelity's, with
the weights of osdiff.quality.backbones) to its 2048-d pool3 features."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

PATCH = 256
OFFSET = PATCH // 2
FID_RELIABLE_PATCHES = 1000  # fewer patches: FID is indicative only (its bias grows as N falls)


def grid_patches(image: Tensor, patch: int = PATCH, offset: int = OFFSET) -> Tensor:
    """(1,3,H,W) -> (N,3,patch,patch): the plain grid, then the grid starting at (offset, offset)."""
    _, _, h, w = image.shape
    corners = [(y, x) for start in (0, offset) for y in range(start, h - patch + 1, patch)
               for x in range(start, w - patch + 1, patch)]
    if not corners:
        return image.new_zeros((0, 3, patch, patch))
    return torch.cat([image[:, :, y : y + patch, x : x + patch] for y, x in corners])


class InceptionFeatures:
    """(1,3,H,W) image in [0,1] -> (patches, 2048) float64 pool3 features of its grid patches."""

    def __init__(self, network: torch.nn.Module | None = None, batch: int = 16) -> None:
        from .backbones import pretrained_inception

        self.net = (network or pretrained_inception()).eval()
        self.batch = batch

    @torch.no_grad()
    def __call__(self, image: Tensor) -> np.ndarray:
        patches = (grid_patches(image.float().cpu().clamp(0, 1)) * 255).round().to(torch.uint8)
        out = [self.net(patches[i : i + self.batch])[0].double() for i in range(0, len(patches), self.batch)]
        return torch.cat(out).numpy() if out else np.zeros((0, 2048), np.float64)


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (N,D):
    |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2). With fewer samples than dimensions,
    tr sqrt(S1 S2) is the sum of the singular values of A B^T / sqrt((n-1)(m-1)) (A, B the
    centred features; the same eigenvalues, found in an n x m matrix instead of a D x D one)."""
    from scipy import linalg

    mu1, mu2 = real.mean(0), fake.mean(0)
    a, b = real - mu1, fake - mu2
    n, m = len(real), len(fake)
    if min(n, m) <= real.shape[1]:
        tr_covmean = np.linalg.svd(a @ b.T / np.sqrt((n - 1) * (m - 1)), compute_uv=False).sum()
    else:
        covmean, _ = linalg.sqrtm(np.cov(real, rowvar=False) @ np.cov(fake, rowvar=False), disp=False)
        tr_covmean = np.trace(covmean.real)
    return float(((mu1 - mu2) ** 2).sum() + (a**2).sum() / (n - 1) + (b**2).sum() / (m - 1) - 2 * tr_covmean)


def kid(real: np.ndarray, fake: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (Bińkowski et al. 2018) over all features."""
    d = real.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    m, n = len(real), len(fake)
    kxx, kyy, kxy = k(real, real), k(fake, fake), k(real, fake)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())


def kid_spread(real: np.ndarray, fake: np.ndarray, subsets: int = 100, size: int = 1000, seed: int = 0) -> float:
    """Standard deviation of KID over `subsets` random subsets (torch-fidelity's protocol) of
    min(`size`, half the smaller set) patches from each set: how much KID moves with the patches."""
    n = min(size, len(real) // 2, len(fake) // 2)
    if n < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    values = [kid(real[rng.choice(len(real), n, replace=False)], fake[rng.choice(len(fake), n, replace=False)])
              for _ in range(subsets)]
    return float(np.std(values))
