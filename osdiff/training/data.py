"""Images in RAM and batches that depend only on (seed, stage, step), so a resumed run sees
exactly the batches an uninterrupted one would."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import OSDiffError
from ..imageio import PHOTO_SUFFIXES, open_image
from ..imageio import find_images as list_images



def find_images(folders: list[str], base: Path | None = None) -> list[Path]:
    files: list[Path] = []
    for folder in folders:
        p = Path(folder)
        if not p.is_absolute() and base is not None:
            p = base / p
        if not p.is_dir():
            raise OSDiffError(f"{p}: image folder not found")
        files += list_images(p, PHOTO_SUFFIXES)
    if not files:
        raise OSDiffError(f"no images in {folders}")
    return files


def load_images(files: list[Path], max_side: int) -> list[np.ndarray]:
    """RGB uint8 arrays (H,W,3), downscaled with Lanczos so the long side <= max_side."""
    out = []
    for f in files:
        img = open_image(f)
        scale = max_side / max(img.size)
        if scale < 1:
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
        out.append(np.asarray(img))
    return out


def whole_photo(image: np.ndarray, multiple: int = 8) -> torch.Tensor:
    """(1,3,H,W) float in [0,1]: a whole uint8 (H0,W0,3) photo, trimmed at the right and bottom
    to multiples of `multiple` pixels."""
    h, w = (image.shape[0] // multiple) * multiple, (image.shape[1] // multiple) * multiple
    return torch.from_numpy(np.array(image[:h, :w])).permute(2, 0, 1)[None].float().div_(255.0)


def center_crops(images: list[np.ndarray], crop: int) -> torch.Tensor:
    """(N,3,crop,crop) float in [0,1]: the centre of every image at least `crop` pixels a side
    (the fixed validation batch)."""
    patches = []
    for im in images:
        h, w = im.shape[:2]
        if min(h, w) >= crop:
            y, x = (h - crop) // 2, (w - crop) // 2
            patches.append(im[y : y + crop, x : x + crop])
    if not patches:
        raise OSDiffError(f"no validation image is at least {crop}x{crop} pixels")
    return torch.from_numpy(np.stack(patches)).permute(0, 3, 1, 2).float().div_(255.0)


class CropSampler:
    """Random crops with horizontal flips; batch k of process r is a pure function of
    (seed, stage, k, r) (process 0: of (seed, stage, k), as in a single-process run)."""

    def __init__(self, images: list[np.ndarray], crop: int, batch_size: int, seed: int, stage: int, rank: int = 0) -> None:
        self.images = [im for im in images if min(im.shape[:2]) >= crop]
        if not self.images:
            raise OSDiffError(f"no training image is at least {crop}x{crop} pixels")
        self.crop, self.batch_size, self.seed, self.stage, self.rank = crop, batch_size, seed, stage, rank

    def batch(self, step: int, rank: int | None = None) -> torch.Tensor:
        """(B,3,crop,crop) float in [0,1]; `rank` overrides the sampler's process (rank 0: the
        batches every process shares, e.g. for statistics)."""
        rng = batch_rng(self.seed, self.stage, step, self.rank if rank is None else rank)
        out = np.empty((self.batch_size, self.crop, self.crop, 3), dtype=np.uint8)
        for i in range(self.batch_size):
            im = self.images[rng.integers(len(self.images))]
            y = rng.integers(im.shape[0] - self.crop + 1)
            x = rng.integers(im.shape[1] - self.crop + 1)
            patch = im[y : y + self.crop, x : x + self.crop]
            out[i] = patch[:, ::-1] if rng.random() < 0.5 else patch
        return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)


def batch_rng(seed: int, stage: int, step: int, rank: int = 0) -> np.random.Generator:
    """The random numbers of one batch: process 0 draws what a single process draws."""
    return np.random.default_rng([seed, stage, step] if rank == 0 else [seed, stage, step, rank])
