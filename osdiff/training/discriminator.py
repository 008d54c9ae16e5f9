"""Discriminators (training only, no inference cost).

UNetFeatureDiscriminator, osdiff's own: in the UNet's feature space.

A copy of the denoising UNet's encoder (conv_in, time embedding, down blocks) and middle
block, initialised from the UNet's weights, followed by a small head that gives patch logits.
It judges latents noised to a random timestep: real (true latent) vs reconstructed.

ConditionalPatchDiscriminator, for the HiFiC-style baseline: judges image patches given the
quantised latent they were decoded from.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import Tensor, nn


def frozen_generator_loss(discriminator: nn.Module, *inputs) -> Tensor:
    """The non-saturating generator loss softplus(-D(fake)) with the discriminator's weights
    frozen for this evaluation (gradients reach the generator only)."""
    from .losses import generator_adversarial

    discriminator.requires_grad_(False)
    try:
        return generator_adversarial(discriminator(*inputs))
    finally:
        discriminator.requires_grad_(True)


class UNetFeatureDiscriminator(nn.Module):
    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.time_proj = copy.deepcopy(unet.time_proj)
        self.time_embedding = copy.deepcopy(unet.time_embedding)
        self.conv_in = copy.deepcopy(unet.conv_in)
        self.down_blocks = copy.deepcopy(unet.down_blocks)
        self.mid_block = copy.deepcopy(unet.mid_block)
        channels = unet.config.block_out_channels[-1]
        self.head = nn.Sequential(
            nn.GroupNorm(min(32, channels), channels), nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(),
            nn.Conv2d(channels, 1, 1),
        )

    def forward(self, noisy_latent: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        """(B,C,h,w) noised latents, (B,) timesteps, (B,T,D) context -> (B,1,h',w') logits."""
        emb = self.time_embedding(self.time_proj(timesteps).to(noisy_latent.dtype))
        h = self.conv_in(noisy_latent)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(h, emb, encoder_hidden_states=context)
            else:
                h, _ = block(h, emb)
        h = self.mid_block(h, emb, encoder_hidden_states=context)
        return self.head(h)


class ConditionalPatchDiscriminator(nn.Module):
    """HiFiC's conditional patch discriminator (Mentzer et al. 2020), narrower: the quantised
    latent is projected to 12 channels and nearest-upsampled to the image size, concatenated
    with the image, then 4x4 stride-2 spectrally normalised convolutions with LeakyReLU(0.2)
    and a 1x1 convolution give one logit per patch."""

    def __init__(self, latent_channels: int, channels: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        sn = nn.utils.spectral_norm
        self.condition = nn.Sequential(nn.Conv2d(latent_channels, 12, 3, padding=1), nn.LeakyReLU(0.2))
        layers: list[nn.Module] = []
        c_in = 3 + 12
        for c in channels:
            layers += [sn(nn.Conv2d(c_in, c, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            c_in = c
        layers.append(sn(nn.Conv2d(c_in, 1, 1)))
        self.body = nn.Sequential(*layers)

    def forward(self, image: Tensor, y_hat: Tensor) -> Tensor:
        """Image (B,3,H,W) in [0,1], quantised latent (B,M,h,w) -> logits (B,1,H/16,W/16)."""
        cond = F.interpolate(self.condition(y_hat), size=image.shape[-2:], mode="nearest")
        return self.body(torch.cat([image * 2 - 1, cond], dim=1))
