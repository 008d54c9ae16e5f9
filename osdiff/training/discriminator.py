"""Discriminator in the UNet's feature space (training only, no inference cost).

A copy of the denoising UNet's encoder (conv_in, time embedding, down blocks) and middle
block, initialised from the UNet's weights, followed by a small head that gives patch logits.
It judges latents noised to a random timestep: real (true latent) vs reconstructed.
"""
from __future__ import annotations

import copy

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor, nn


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
