"""Loss terms. Images are (B,3,H,W) in [0,1]; latents (B,C,h,w); rates in bits per pixel."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import OSDiffError
from ..quality.lpips import LPIPS
from ..quality.pixel import luma_gradients


def bits_per_pixel(likelihoods: dict[str, Tensor], num_pixels: int) -> Tensor:
    """Per-sample rate (B,) in bits per image pixel from the entropy models' likelihoods."""
    bits = sum(-torch.log2(lk).flatten(1).sum(1) for lk in likelihoods.values())
    return bits / num_pixels


def generator_adversarial(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss: softplus(-D(fake))."""
    return F.softplus(-fake_logits).mean()


def discriminator_adversarial(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """softplus(-D(real)) + softplus(D(fake))."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def low_pass_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE of 16x16 block means (average colour and brightness; what a colour cast moves)."""
    return F.mse_loss(F.avg_pool2d(pred, 16, ceil_mode=True), F.avg_pool2d(target, 16, ceil_mode=True))


def local_detail_loss(x_hat: Tensor, x: Tensor, window: int = 16, floor: float = 1e-4) -> Tensor:
    """(B,) mean |log| ratio of local detail: the squared luma gradients (images in [0,1])
    averaged over `window` x `window`-pixel windows, of `x_hat` against `x`, each plus `floor`
    (about the gradient energy of 8-bit sensor noise, so flat windows count little). 0 when
    every window keeps the photo's detail; smoothing and added noise cost alike. The local form
    of evaluation's detail retention, which is the global ratio."""
    def energy(t: Tensor) -> Tensor:
        gx, gy = luma_gradients(t)
        return F.avg_pool2d(F.pad(gx, (0, 1)).pow(2) + F.pad(gy, (0, 0, 0, 1)).pow(2), window) + floor

    return (energy(x_hat.clamp(0, 1)).log() - energy(x).log()).abs().mean(dim=(1, 2, 3))


class PerceptualLoss(nn.Module):
    """1 - similarity for weight-free metrics (piq MS-SSIM, HaarPSI), or LPIPS v0.1 on
    `lpips_net` ('vgg', the usual training loss, or 'alex'), its weights found locally
    (osdiff.quality.backbones). Lower is better."""

    def __init__(self, kind: str = "ms-ssim", lpips_net: str = "vgg", encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.kind = kind
        if kind == "lpips":
            self.lpips = LPIPS(lpips_net)
        elif kind == "taesd-features":
            if encoder is None:
                raise OSDiffError("perceptual_kind 'taesd-features' needs the TAEF2 autoencoder (tiny.autoencoder: taef2)")
            self.features = EncoderFeatureDistance(encoder)
        elif kind not in ("ms-ssim", "haarpsi"):
            raise OSDiffError(f"unknown perceptual loss {kind!r} (ms-ssim, haarpsi, lpips or taesd-features)")

    def forward(self, x_hat: Tensor, x: Tensor) -> Tensor:
        """(B,) losses."""
        import piq

        x_hat = x_hat.clamp(0, 1)
        if self.kind == "ms-ssim":
            # 5 scales need >160 px; smaller crops use fewer scales
            scales = max(1, min(5, int(math.log2(min(x.shape[-2:]) / 11)) + 1))
            weights = torch.tensor([0.0448, 0.2856, 0.3001, 0.2363, 0.1333][:scales], device=x.device)
            return 1.0 - piq.multi_scale_ssim(x_hat, x, data_range=1.0, scale_weights=weights / weights.sum(), reduction="none")
        if self.kind == "haarpsi":
            return 1.0 - piq.haarpsi(x_hat, x, data_range=1.0, reduction="none")
        if self.kind == "taesd-features":
            return self.features(x_hat, x)
        return self.lpips(x_hat, x)


class EncoderFeatureDistance(nn.Module):
    """LPIPS-style distance in a frozen TAESD encoder's feature space (no ImageNet weights
    needed): the activations after the residual blocks at 1, 1/2, 1/4 and 1/8 resolution, each
    unit-normalised over channels, squared differences averaged, the four levels weighted equally.
    The encoder (an nn.Sequential taking images in [0,1]) is shared, not copied, and frozen."""

    TAPS = (1, 5, 9, 13)

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = [encoder]  # a list: not registered, so not saved or trained with the loss
        encoder.requires_grad_(False)

    def _features(self, x: Tensor) -> list[Tensor]:
        out, h = [], x
        for i, layer in enumerate(self.encoder[0]):
            h = layer(h)
            if i in self.TAPS:
                out.append(h / (h.norm(dim=1, keepdim=True) + 1e-6))
            if i == self.TAPS[-1]:
                break
        return out

    def forward(self, x_hat: Tensor, x: Tensor) -> Tensor:
        """(B,) distances of images in [0,1]."""
        with torch.no_grad():
            ref = self._features(x)
        return sum((a - b).pow(2).sum(1).mean(dim=(1, 2)) for a, b in zip(self._features(x_hat), ref)) / len(ref)


@torch.no_grad()
def decoder_channel_weights(decode, latents: Tensor, sigma: float = 0.3, seed: int = 0) -> Tensor:
    """(C,) weights, mean 1: for each latent channel, the mean squared change of `decode`'s
    output (images in [-1,1]) when Gaussian noise of std `sigma` is added to that channel of
    `latents` (B,C,h,w) alone. A diagonal, small-error estimate of the decoder's pixel metric."""
    gen = torch.Generator("cpu").manual_seed(seed)
    base = decode(latents)
    out = []
    for c in range(latents.shape[1]):
        noise = torch.zeros_like(latents)
        noise[:, c] = sigma * torch.randn(latents[:, c].shape, generator=gen).to(latents.device)
        out.append((decode(latents + noise) - base).pow(2).mean())
    w = torch.stack(out).float()
    return w / w.mean()
