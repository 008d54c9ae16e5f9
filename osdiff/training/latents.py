"""Latents of the training photos, computed once by the frozen encoder and kept on disk.

With a frozen pretrained encoder (TAEF2), every stage that works in latent space would run the
same encoder on the same pixels at every step; on a CPU that is most of a step's cost. The
cache holds each photo's raw latent (float16, (C, H/8, W/8) of the photo cropped to multiples
of 8), and `LatentCropSampler` cuts aligned (pixels, latent) crop pairs from it.

No flips: TAEF2's latent is far from mirror-symmetric (measured on 4 CBSD68 crops: the mirrored
latent differs from the mirrored photo's latent by a normalised MSE of 0.54, and decodes at
19.0 dB instead of 27.0 dB), so a flipped latent would not be the latent of a flipped photo.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import OSDiffError
from ..verbosity import progress
from .data import CropSampler, batch_rng, whole_photo


def _key(files: list[Path], max_side: int, encoder: nn.Module) -> str:
    h = hashlib.sha256(f"max_side={max_side}".encode())
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    for name, value in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def cached_latents(images: list[np.ndarray], files: list[Path], max_side: int, encoder: nn.Module,
                   folder: Path, device: torch.device | str = "cpu") -> list[Tensor]:
    """Raw latents (float16, (C, H//8, W//8)) of `images` (uint8 (H, W, 3), as load_images
    returns them for `files`), read from `folder` when an earlier run of the same encoder on
    the same photos saved them, else computed (one photo at a time) and saved atomically."""
    path = folder / f"latents-{_key(files, max_side, encoder)}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    encoder = encoder.to(device).eval()
    out = []
    for im in progress(images, desc="encoding training photos", mininterval=10):
        out.append(encoder(whole_photo(im).to(device))[0].half().cpu())
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(out, tmp)
    os.replace(tmp, path)
    return out


class LatentCropSampler:
    """Aligned random crops of photos and their cached latents (no flips: see the module
    docstring); batch k of process r is a pure function of (seed, stage, k, r) (see CropSampler).

    crop 0: whole photos instead, one per batch (sizes differ), each trimmed at the right and
    bottom to a multiple of `align` latent pixels (e.g. a compressor's `latent_multiple`). For
    decoders with GroupNorm over the whole image (TAEF2's): on a crop its statistics, and with
    them the colours, differ from the whole image's."""

    def __init__(self, images: list[np.ndarray], latents: list[Tensor], crop: int, batch_size: int,
                 seed: int, stage: int, align: int = 1, rank: int = 0) -> None:
        if crop % 8:
            raise OSDiffError(f"crop must be a multiple of 8, got {crop}")
        if crop == 0 and batch_size != 1:
            raise OSDiffError(f"whole images (crop 0) come one per batch: batch_size must be 1, got {batch_size}")
        least = max(crop, 8 * align)
        if len(images) != len(latents):
            raise ValueError("LatentCropSampler: one latent per image")
        self.kept = [i for i, z in enumerate(latents) if min(z.shape[1:]) * 8 >= least]  # photos large enough
        if not self.kept:
            raise OSDiffError(f"no training image is at least {least}x{least} pixels")
        self.images, self.latents = [images[i] for i in self.kept], [latents[i] for i in self.kept]
        self.crop, self.batch_size, self.seed, self.stage, self.align = crop, batch_size, seed, stage, align
        self.rank = rank

    def _positions(self, step: int, rank: int | None) -> list[tuple[int, int, int]]:
        """(photo index, latent row, latent column) of each crop of batch `step` (crop 0: one
        whole photo at (0, 0))."""
        rng = batch_rng(self.seed, self.stage, step, self.rank if rank is None else rank)
        if self.crop == 0:
            return [(int(rng.integers(len(self.images))), 0, 0)]
        c = self.crop // 8
        out = []
        for _ in range(self.batch_size):
            k = rng.integers(len(self.images))
            z = self.latents[k]
            y = rng.integers(z.shape[1] - c + 1)
            x = rng.integers(z.shape[2] - c + 1)
            out.append((int(k), int(y), int(x)))
        return out

    def batch(self, step: int, rank: int | None = None) -> tuple[Tensor, Tensor]:
        """(pixels (B,3,crop,crop) float in [0,1], raw latents (B,C,crop/8,crop/8) float32);
        crop 0: (1,3,H,W) and (1,C,H/8,W/8) of one whole photo."""
        positions = self._positions(step, rank)
        if self.crop == 0:
            im, z = self.images[positions[0][0]], self.latents[positions[0][0]]
            x = whole_photo(im, 8 * self.align)
            return x, z[None, :, : x.shape[2] // 8, : x.shape[3] // 8].float()
        c = self.crop // 8
        pixels = np.empty((self.batch_size, self.crop, self.crop, 3), dtype=np.uint8)
        latents = []
        for i, (k, y, x) in enumerate(positions):
            im, z = self.images[k], self.latents[k]
            pixels[i] = im[8 * y : 8 * (y + c), 8 * x : 8 * (x + c)]
            latents.append(z[:, y : y + c, x : x + c])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
        return x, torch.stack(latents).float()

    def cut(self, maps: list[Tensor], step: int, scale: int, rank: int | None = None) -> Tensor:
        """The crops of batch `step` from per-photo maps (C, H*scale/8, W*scale/8) of the same
        photos (all of them, as given to the constructor) at `scale` times the latent resolution
        (e.g. 2: an encoder's 1/4-resolution features), float32 (B,C,scale*crop/8,scale*crop/8)."""
        c = scale * self.crop // 8
        return torch.stack([maps[self.kept[k]][:, scale * y : scale * y + c, scale * x : scale * x + c]
                            for k, y, x in self._positions(step, rank)]).float()

    def edges(self, step: int, rank: int | None = None) -> Tensor:
        """(B,4) bool for batch `step`: whether each crop's top, bottom, left and right side is
        its photo's own edge (there the crop saw what the cached latent's encoder saw)."""
        c = self.crop // 8
        rows = []
        for k, y, x in self._positions(step, rank):
            h, w = self.latents[k].shape[1:]
            rows.append([y == 0, self.crop == 0 or y + c == h, x == 0, self.crop == 0 or x + c == w])
        return torch.tensor(rows, dtype=torch.bool)


class EncodingSampler:
    """(photos, latents) batches by running a frozen encoder (`encode`) on each batch of crops."""

    def __init__(self, crops: CropSampler, encode, device) -> None:
        self.crops, self.encode, self.device = crops, encode, device

    @torch.no_grad()
    def batch(self, step: int, rank: int | None = None) -> tuple[Tensor, Tensor]:
        x = self.crops.batch(step, rank).to(self.device)
        return x, self.encode(x)
