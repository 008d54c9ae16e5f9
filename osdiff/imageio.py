"""Image input and output: anything a user hands us becomes a (1,3,H,W) float tensor in [0,1].

Files: PNG, JPEG, WebP, TIFF, GIF, BMP (whatever Pillow reads). Grayscale, palette, 16-bit
and CMYK become RGB; alpha is dropped with a warning; EXIF orientation is applied; animated
images give their first frame with a warning. Arrays: numpy (H,W), (H,W,3|4) uint8 / uint16 /
float in [0,1]; torch (3,H,W) or (1,3,H,W) float in [0,1] or uint8.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputTooLarge, OSDiffError, OSDiffWarning

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm")
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # training and evaluation sets


def open_image(path: str | os.PathLike) -> Image.Image:
    """Read a file fully with Pillow; any failure becomes an OSDiffError."""
    path = Path(path)
    if not path.is_file():
        raise OSDiffError(f"{path}: no such file")
    return _read(path, str(path))


def image_from_bytes(data: bytes, max_pixels: int | None = None, label: str = "upload") -> Image.Image:
    """Decode an image file held in memory. With `max_pixels`, the size is checked from the
    file's header before any pixel is decoded (InputTooLarge)."""
    return _read(io.BytesIO(data), label, max_pixels)


def _read(source, label: str, max_pixels: int | None = None) -> Image.Image:
    try:
        with Image.open(source) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise InputTooLarge(f"{label}: image of {img.width}x{img.height} pixels is over the limit of {max_pixels} pixels")
            if getattr(img, "n_frames", 1) > 1:
                warnings.warn("animated image, using its first frame", OSDiffWarning, stacklevel=3)
                img.seek(0)
            img.load()
            return pil_to_rgb(img)
    except OSDiffError:
        raise
    except UnidentifiedImageError:
        raise OSDiffError(f"{label}: not a readable image (not a format Pillow knows)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as exc:
        raise OSDiffError(f"{label}: not a readable image ({exc.__class__.__name__}: {exc})") from None


def pil_to_rgb(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any Pillow mode to 8-bit RGB."""
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if img.getchannel("A").getextrema()[0] < 255:
            warnings.warn("alpha channel dropped", OSDiffWarning, stacklevel=3)
        return img.convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
        arr = np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.clip(np.round(np.asarray(img, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return img.convert("RGB")


def to_tensor(image: ImageInput) -> torch.Tensor:
    """Any supported input -> float32 tensor (1,3,H,W) in [0,1]."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    if isinstance(image, Image.Image):
        arr = np.asarray(pil_to_rgb(image), dtype=np.float32) / 255.0
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None]
    if isinstance(image, np.ndarray):
        return _array_to_tensor(image)
    if isinstance(image, torch.Tensor):
        return _torch_to_tensor(image)
    raise OSDiffError(f"unsupported image type {type(image).__name__}")


def _array_to_tensor(arr: np.ndarray) -> torch.Tensor:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise OSDiffError(f"array of shape {arr.shape}: expected (H,W), (H,W,3) or (H,W,4)")
    if arr.shape[2] == 4:
        warnings.warn("alpha channel dropped", OSDiffWarning, stacklevel=3)
        arr = arr[:, :, :3]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        arr = arr.astype(np.float32) / 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    else:
        raise OSDiffError(f"array dtype {arr.dtype}: expected uint8, uint16 or float in [0,1]")
    return _check_tensor(torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None])


def _torch_to_tensor(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[0] != 1 or t.shape[1] not in (1, 3):
        raise OSDiffError(f"tensor of shape {tuple(t.shape)}: expected (3,H,W) or (1,3,H,W)")
    if t.shape[1] == 1:
        t = t.expand(1, 3, -1, -1)
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    return _check_tensor(t.contiguous())


def _check_tensor(t: torch.Tensor) -> torch.Tensor:
    if t.shape[-1] < 1 or t.shape[-2] < 1:
        raise OSDiffError("image has zero width or height")
    if not torch.isfinite(t).all():
        raise OSDiffError("image contains NaN or infinite values")
    return t.clamp(0.0, 1.0)


def tensor_to_pil(t: torch.Tensor) -> Image.Image:
    """(1,3,H,W) or (3,H,W) float in [0,1] -> 8-bit RGB PIL image."""
    if t.ndim == 4:
        t = t[0]
    arr = (t.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def pad_right_bottom(x: torch.Tensor, pad_w: int, pad_h: int) -> torch.Tensor:
    """Replicate-pad (B,C,H,W) by `pad_w` pixels on the right and `pad_h` at the bottom."""
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return x


def find_images(folder: str | os.PathLike, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """Files below `folder` (recursively) whose suffix is in `suffixes`, sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
