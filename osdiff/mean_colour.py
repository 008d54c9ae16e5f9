"""Mean colour as side information: 3 bytes that remove a decoder's global colour cast.

The encoder stores the original image's mean R, G and B in 8-bit levels (one byte each, the
last string of the file for a model whose config sets `mean_colour`); the decoder shifts each
channel of its output by the one offset that, after clipping to [0, 1], gives that mean
(found by bisection, so a bright or dark image still reaches it). It corrects a
global cast only, not a local hue error; it costs 24 bits (+ a 4-byte string length) per image.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .errors import OSDiffError

MEAN_COLOUR_BYTES = 3
_TOLERANCE = 0.05 / 255  # a plain shift that lands this close is kept
_BISECTIONS = 16  # offset found to 2/2**16 of the range: well under 0.01 levels


def mean_colour_bytes(image: Tensor) -> bytes:
    """Image (1,3,H,W) in [0,1], unpadded -> 3 bytes: each channel's mean in 8-bit levels."""
    means = (image.float().mean(dim=(0, 2, 3)) * 255).round().clamp(0, 255)
    return bytes(int(v) for v in means.tolist())


def match_mean_colour(image: Tensor, data: bytes) -> Tensor:
    """Decoded image (1,3,H,W) in [0,1] and `mean_colour_bytes` of the original -> the image
    with each channel shifted by the offset whose clipped result has that mean (float32)."""
    if len(data) != MEAN_COLOUR_BYTES:
        raise OSDiffError(f"corrupted file: mean colour is {len(data)} bytes, not {MEAN_COLOUR_BYTES}")
    target = torch.tensor(list(data), dtype=torch.float32, device=image.device).view(1, 3, 1, 1) / 255
    image = image.float()
    out = (image + target - image.mean(dim=(0, 2, 3), keepdim=True)).clamp(0, 1)
    if (out.mean(dim=(0, 2, 3), keepdim=True) - target).abs().max() < _TOLERANCE:
        return out  # the plain shift clipped (almost) nothing: the usual case
    low, high = torch.full_like(target, -1.0), torch.full_like(target, 1.0)  # offsets giving all 0 / all 1
    for _ in range(_BISECTIONS):  # the clipped mean rises monotonically with the offset
        middle = (low + high) / 2
        below = (image + middle).clamp(0, 1).mean(dim=(0, 2, 3), keepdim=True) < target
        low, high = torch.where(below, middle, low), torch.where(below, high, middle)
    return (image + (low + high) / 2).clamp(0, 1)


__all__ = ["MEAN_COLOUR_BYTES", "mean_colour_bytes", "match_mean_colour"]
