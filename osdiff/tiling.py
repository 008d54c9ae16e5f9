"""Overlapping tiles with linear blending, for coding large images in bounded memory.

`run_tiled(fn, inputs, scale, ...)` cuts the last two (spatial) dimensions of each input into
overlapping tiles, applies `fn` to each tile and blends the outputs (whose spatial size is
the tile's times `scale`) with weights that ramp linearly across each overlap, so no seam
shows. Tile positions depend only on the input size.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Callable

import torch
from torch import Tensor


def tile_starts(size: int, tile: int, overlap: int, align: int) -> list[int]:
    """Start offsets along one axis: every `tile - overlap`, the last tile ending at `size`
    (its start rounded down to `align`, so it may be up to `align - 1` longer)."""
    if size <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, size - tile, step))
    last = (size - tile) // align * align
    if last > starts[-1]:
        starts.append(last)
    return starts


def _extent(starts: list[int], i: int, size: int, tile: int) -> tuple[int, int]:
    return starts[i], size if i == len(starts) - 1 else starts[i] + tile


def _ramp(length: int, lead: int, trail: int) -> Tensor:
    """1-D weights: rising over the first `lead` samples, falling over the last `trail`."""
    w = torch.ones(length, dtype=torch.float32)
    if lead:
        w[:lead] = (torch.arange(lead, dtype=torch.float32) + 0.5) / lead
    if trail:
        w[length - trail:] = torch.minimum(w[length - trail:], (torch.arange(trail, 0, -1, dtype=torch.float32) - 0.5) / trail)
    return w


def run_tiled(fn: Callable[..., Tensor], inputs: list[Tensor], scale: Fraction | int, tile: int, overlap: int,
              align: int) -> Tensor:
    """Apply `fn(*tiles)` tile by tile and blend. `inputs` share their (H, W); outputs are
    (B, C, H*scale, W*scale); `tile`, `overlap`, `align` are in input pixels."""
    scale = Fraction(scale)
    height, width = inputs[0].shape[-2:]
    ys, xs = tile_starts(height, tile, overlap, align), tile_starts(width, tile, overlap, align)
    if len(ys) == 1 and len(xs) == 1:
        return fn(*inputs)
    out_h, out_w = int(height * scale), int(width * scale)
    out = weight = None
    for iy in range(len(ys)):
        y0, y1 = _extent(ys, iy, height, tile)
        for ix in range(len(xs)):
            x0, x1 = _extent(xs, ix, width, tile)
            piece = fn(*[t[..., y0:y1, x0:x1] for t in inputs]).float()
            if out is None:
                out = torch.zeros(*piece.shape[:2], out_h, out_w, dtype=torch.float32, device=piece.device)
                weight = torch.zeros(1, 1, out_h, out_w, dtype=torch.float32, device=piece.device)
            # overlap with the previous / next tile along each axis, in output pixels
            lead_y = int((_extent(ys, iy - 1, height, tile)[1] - y0) * scale) if iy > 0 else 0
            trail_y = int((y1 - ys[iy + 1]) * scale) if iy + 1 < len(ys) else 0
            lead_x = int((_extent(xs, ix - 1, width, tile)[1] - x0) * scale) if ix > 0 else 0
            trail_x = int((x1 - xs[ix + 1]) * scale) if ix + 1 < len(xs) else 0
            w = (_ramp(piece.shape[-2], lead_y, trail_y)[:, None] * _ramp(piece.shape[-1], lead_x, trail_x)[None, :]).to(piece.device)
            oy, ox = int(y0 * scale), int(x0 * scale)
            out[..., oy:oy + piece.shape[-2], ox:ox + piece.shape[-1]] += piece * w
            weight[..., oy:oy + piece.shape[-2], ox:ox + piece.shape[-1]] += w
    return out / weight
