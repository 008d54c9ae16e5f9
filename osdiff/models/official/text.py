"""The empty-prompt embedding of SD 2.x's OpenCLIP text encoder, computed from its weights.

SD 2.1 (ldm's FrozenOpenCLIPEmbedder, layer "penultimate") conditions on the output of the
second-to-last transformer block followed by the final LayerNorm. The codec always uses the
empty prompt, whose OpenCLIP token ids are fixed: start (49406), end (49407), then zeros up to
77 tokens, so no tokenizer (and no download) is needed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SOT, EOT, CONTEXT_LENGTH = 49406, 49407, 77


def empty_prompt_tokens(context_length: int = CONTEXT_LENGTH) -> Tensor:
    """open_clip.tokenize("") without the tokenizer: (1, context_length) int64."""
    ids = torch.zeros(1, context_length, dtype=torch.long)
    ids[0, 0], ids[0, 1] = SOT, EOT
    return ids


def text_layers(weights: dict[str, Tensor]) -> int:
    """Transformer blocks in an OpenCLIP text state dict (keys without the model prefix)."""
    blocks = {k.split(".")[2] for k in weights if k.startswith("transformer.resblocks.")}
    return len(blocks)


@torch.no_grad()
def openclip_penultimate(weights: dict[str, Tensor], tokens: Tensor, heads: int) -> Tensor:
    """OpenCLIP text transformer (state dict `weights`: token_embedding, positional_embedding,
    transformer.resblocks.*, ln_final) on `tokens` (B, L): all blocks but the last, then
    ln_final -> (B, L, width) float32, with a causal mask as OpenCLIP."""
    w = {k: v.float() for k, v in weights.items()}
    x = F.embedding(tokens, w["token_embedding.weight"]) + w["positional_embedding"][: tokens.shape[1]]
    b, n, width = x.shape
    mask = torch.full((n, n), float("-inf")).triu_(1)
    for i in range(text_layers(w) - 1):
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (width,), w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        q, k, v = F.linear(h, w[p + "attn.in_proj_weight"], w[p + "attn.in_proj_bias"]).chunk(3, -1)
        split = lambda t: t.reshape(b, n, heads, width // heads).transpose(1, 2)  # noqa: E731
        att = (split(q) * (width // heads) ** -0.5) @ split(k).transpose(-1, -2) + mask
        h = (att.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, width)
        x = x + F.linear(h, w[p + "attn.out_proj.weight"], w[p + "attn.out_proj.bias"])
        h = F.layer_norm(x, (width,), w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        h = F.linear(F.gelu(F.linear(h, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"])), w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
        x = x + h
    return F.layer_norm(x, (width,), w["ln_final.weight"], w["ln_final.bias"])


def empty_prompt_embedding(weights: dict[str, Tensor], heads: int) -> Tensor:
    """(1, 77, width): what SD 2.x's UNet receives for the prompt ""."""
    return openclip_penultimate(weights, empty_prompt_tokens(weights["positional_embedding"].shape[0]), heads)
