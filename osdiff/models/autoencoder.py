"""Latent autoencoder: image x (B,3,H,W) in [-1,1] <-> latent z (B,4,H/8,W/8).

Two kinds are supported behind `encode_latent` / `decode_latent`:
- diffusers `AutoencoderKL` (the Stable Diffusion VAE), latents scaled by its `scaling_factor`
  (0.18215 for SD 2.1), and `AutoencoderTiny` (TAESD shape);
- `TAESDAutoencoder` (osdiff.models.taesd): the frozen pretrained TAEF2 encoder (32 channels)
  with a slim distilled decoder and per-channel latent normalisation: osdiff-tiny v2;
- `TinyAutoencoder`, our own small autoencoder (osdiff-tiny v1). Its decoder
  keeps the full-resolution layers thin and upsamples by pixel shuffle, for CPU decode speed.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from .taesd import TAESDAutoencoder

LATENT_DOWNSCALE = 8  # pixels per latent pixel, for every supported autoencoder


class ResidualBlock(nn.Module):
    """conv3x3 - SiLU - conv3x3 with identity skip; keeps shape (B,C,H,W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


class TinyAutoencoder(ModelMixin, ConfigMixin):
    """Small deterministic autoencoder with an 8x downscale and `latent_channels` channels.

    Encoder: three stride-2 convolutions then residual blocks at 1/8 resolution.
    Decoder: residual blocks at 1/8 resolution, then three conv + PixelShuffle(2) stages whose
    widths shrink towards full resolution (`decoder_channels`).
    """

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 4,
        encoder_channels: tuple[int, ...] = (16, 32, 64, 64),
        decoder_channels: tuple[int, ...] = (64, 48, 32, 16),
        num_blocks: int = 2,
        scaling_factor: float = 1.0,
    ) -> None:
        super().__init__()
        e0, e1, e2, e3 = encoder_channels
        d0, d1, d2, d3 = decoder_channels
        act = nn.SiLU
        self.encoder = nn.Sequential(
            nn.Conv2d(3, e0, 3, stride=2, padding=1), act(),
            nn.Conv2d(e0, e1, 3, stride=2, padding=1), act(),
            nn.Conv2d(e1, e2, 3, stride=2, padding=1), act(),
            nn.Conv2d(e2, e3, 3, padding=1),
            *[ResidualBlock(e3) for _ in range(num_blocks)],
            nn.Conv2d(e3, latent_channels, 3, padding=1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, d0, 3, padding=1), act(),
            *[ResidualBlock(d0) for _ in range(num_blocks)],
            nn.Conv2d(d0, d1 * 4, 3, padding=1), nn.PixelShuffle(2), act(),
            nn.Conv2d(d1, d2 * 4, 3, padding=1), nn.PixelShuffle(2), act(),
            nn.Conv2d(d2, d3 * 4, 3, padding=1), nn.PixelShuffle(2), act(),
            nn.Conv2d(d3, 3, 3, padding=1),
        )

    def encode(self, x: Tensor) -> Tensor:
        """(B,3,H,W) in [-1,1] -> unscaled latent (B,C,H/8,W/8)."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latent (B,C,h,w) -> image (B,3,8h,8w), roughly in [-1,1]."""
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


LatentAutoencoder = AutoencoderKL | AutoencoderTiny | TinyAutoencoder | TAESDAutoencoder


def encode_latent(vae: LatentAutoencoder, image: Tensor) -> Tensor:
    """Image (B,3,H,W) in [-1,1] -> scaled latent (B,C,H/8,W/8), deterministic (the mode)."""
    if isinstance(vae, AutoencoderKL):
        return vae.encode(image).latent_dist.mode() * vae.config.scaling_factor
    if isinstance(vae, AutoencoderTiny):
        return vae.encode(image).latents
    if isinstance(vae, TinyAutoencoder):
        return vae.encode(image) * vae.config.scaling_factor
    if isinstance(vae, TAESDAutoencoder):
        return vae.encode(image)
    raise TypeError(f"unsupported latent autoencoder {type(vae).__name__}")


def decode_latent(vae: LatentAutoencoder, latent: Tensor) -> Tensor:
    """Scaled latent (B,C,h,w) -> image (B,3,8h,8w) in [-1,1] (clamped)."""
    if isinstance(vae, AutoencoderKL):
        image = vae.decode(latent / vae.config.scaling_factor).sample
    elif isinstance(vae, AutoencoderTiny):
        image = vae.decode(latent).sample
    elif isinstance(vae, TinyAutoencoder):
        image = vae.decode(latent / vae.config.scaling_factor)
    elif isinstance(vae, TAESDAutoencoder):
        image = vae.decode(latent)
    else:
        raise TypeError(f"unsupported latent autoencoder {type(vae).__name__}")
    return image.clamp(-1.0, 1.0)


def latent_channels(vae: LatentAutoencoder) -> int:
    """Channels of the latent the autoencoder produces."""
    return int(vae.config.latent_channels)


__all__ = ["TAESDAutoencoder", "TinyAutoencoder", "encode_latent", "decode_latent", "latent_channels", "LATENT_DOWNSCALE"]
