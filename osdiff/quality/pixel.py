"""Pixel-level measures of images (1,3,H,W) or (B,3,H,W) in [0,1].

PSNR has one convention in osdiff: on 8-bit images (peak 255), the mean squared error over
every value of the batch, +inf for identical images. `psnr` takes [0,1] tensors (rounded to 8
bits first), `psnr_uint8` 8-bit arrays of any shape."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def psnr_from_mse(mse: float) -> float:
    """dB for a mean squared error of 8-bit values; 0 gives +inf."""
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def psnr(x: Tensor, ref: Tensor) -> float:
    """dB on 8-bit-rounded images; identical images give +inf."""
    a, b = (x * 255).round(), (ref * 255).round()
    return psnr_from_mse(F.mse_loss(a, b).item())


def psnr_uint8(x: np.ndarray, ref: np.ndarray) -> float:
    """`psnr` for 8-bit arrays (H,W,3 or any shape, the same for both), in float64; identical
    arrays give +inf."""
    if x.shape != ref.shape:
        raise ValueError(f"psnr: shapes differ, {x.shape} and {ref.shape}")
    return psnr_from_mse(float(np.mean((x.astype(np.float64) - ref.astype(np.float64)) ** 2)))


def psnr_tensor(x: Tensor, ref: Tensor) -> Tensor:
    """`psnr` as a 0-d tensor (no device sync; for training logs), `x` clamped to [0, 1] first."""
    a, b = (x.detach().clamp(0, 1) * 255).round(), (ref.detach() * 255).round()
    return 10 * torch.log10(255.0**2 / F.mse_loss(a, b))


def luma(t: Tensor) -> Tensor:
    """Images (B,3,H,W) -> their luma (B,H,W), Rec. 601 weights."""
    return 0.299 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2]


def luma_gradients(t: Tensor) -> tuple[Tensor, Tensor]:
    """Images (B,3,H,W) -> horizontal (B,1,H,W-1) and vertical (B,1,H-1,W) differences of
    their luma (Rec. 601 weights)."""
    y = luma(t)[:, None]
    return y[..., :, 1:] - y[..., :, :-1], y[..., 1:, :] - y[..., :-1, :]


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
