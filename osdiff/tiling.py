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


def axis_tiles(size: int, tile: int, overlap: int, align: int) -> list[tuple[int, int]]:
    """(start, end) of the tiles along one axis: as few as cover `size` with at most `tile`
    each and at least `overlap` between neighbours, all of one length (the last may be up to
    `align - 1` longer), spread evenly so the overlaps are no wider than they must be. Starts
    are multiples of `align`."""
    if size <= tile:
        return [(0, size)]
    count = -(-(size - overlap) // (tile - overlap))
    while True:
        length = -(-(size + (count - 1) * overlap) // (count * align)) * align
        while length <= tile:
            starts = [(i * (size - length) // (count - 1)) // align * align for i in range(count)]
            ends = [s + length for s in starts[:-1]] + [size]
            if all(ends[i] - starts[i + 1] >= overlap for i in range(count - 1)):
                return list(zip(starts, ends))
            length += align  # rounding the starts down ate into an overlap
        count += 1


def _axis_tiles(size: int, tile: int, overlap: int, align: int) -> list[tuple[int, int, int, int]]:
    """(start, end, overlap with the previous tile, overlap with the next one) along one axis."""
    spans = axis_tiles(size, tile, overlap, align)
    return [(s, e, spans[i - 1][1] - s if i > 0 else 0, e - spans[i + 1][0] if i + 1 < len(spans) else 0)
            for i, (s, e) in enumerate(spans)]


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
    rows, cols = _axis_tiles(height, tile, overlap, align), _axis_tiles(width, tile, overlap, align)
    if len(rows) == 1 and len(cols) == 1:
        return fn(*inputs)
    # 1-D blending weights per row and per column of tiles, in output pixels
    ramp_y = [_ramp(int((y1 - y0) * scale), int(lead * scale), int(trail * scale)) for y0, y1, lead, trail in rows]
    ramp_x = [_ramp(int((x1 - x0) * scale), int(lead * scale), int(trail * scale)) for x0, x1, lead, trail in cols]
    out = weight = None
    for (y0, y1, _, _), wy in zip(rows, ramp_y):
        for (x0, x1, _, _), wx in zip(cols, ramp_x):
            piece = fn(*[t[..., y0:y1, x0:x1] for t in inputs]).float()
            if out is None:
                out = torch.zeros(*piece.shape[:2], int(height * scale), int(width * scale), dtype=torch.float32, device=piece.device)
                weight = torch.zeros(1, 1, *out.shape[-2:], dtype=torch.float32, device=piece.device)
            w = (wy[:, None] * wx[None, :]).to(piece.device)
            oy, ox = int(y0 * scale), int(x0 * scale)
            out[..., oy:oy + piece.shape[-2], ox:ox + piece.shape[-1]] += piece * w
            weight[..., oy:oy + piece.shape[-2], ox:ox + piece.shape[-1]] += w
    return out / weight
