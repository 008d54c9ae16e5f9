"""Fixed text conditioning for the denoising UNet.

The codec never takes a prompt. For Stable Diffusion the UNet still needs
`encoder_hidden_states`: the empty-prompt CLIP embedding, computed once from the model
folder's text encoder (`from_text_encoder`) and stored here, so no text encoder runs per
image. For our own tiny UNet the embedding is a learned (1, tokens, dim) tensor.
"""
from __future__ import annotations

import os

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn


class ConditioningEmbedding(ModelMixin, ConfigMixin):
    """Holds the (1, num_tokens, dim) embedding passed to the UNet's cross-attention."""

    @register_to_config
    def __init__(self, num_tokens: int = 1, dim: int = 64) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(1, num_tokens, dim))

    def forward(self, batch_size: int = 1) -> Tensor:
        """(batch_size, num_tokens, dim)."""
        return self.embedding.expand(batch_size, -1, -1)

    @classmethod
    @torch.no_grad()
    def from_text_encoder(cls, model_folder: str | os.PathLike, prompt: str = "") -> "ConditioningEmbedding":
        """Encode `prompt` once with the folder's `tokenizer/` and `text_encoder/` (CLIP)."""
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(model_folder, subfolder="tokenizer", local_files_only=True)
        encoder = CLIPTextModel.from_pretrained(model_folder, subfolder="text_encoder", local_files_only=True)
        ids = tokenizer(
            prompt, padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids
        hidden = encoder(ids)[0].float()
        module = cls(num_tokens=hidden.shape[1], dim=hidden.shape[2])
        module.embedding.data.copy_(hidden)
        return module
