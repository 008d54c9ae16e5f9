"""Codecs under evaluation, each `encode(image, setting) -> (bytes, decoded RGB image)`.

Classical codecs run through Pillow (JPEG, WebP, AVIF built in; JPEG XL with the
pillow-jxl-plugin), swept over their quality settings; rate is the real file size."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable

from PIL import Image, features

from ..errors import OSDiffError


@dataclass
class Codec:
    name: str
    settings: list  # quality settings swept, low rate first
    encode: Callable[[Image.Image, object], tuple[bytes, Image.Image]] = field(repr=False)
    learned: bool = False


def _pillow(fmt: str, **extra) -> Callable[[Image.Image, int], tuple[bytes, Image.Image]]:
    def encode(image: Image.Image, quality: int) -> tuple[bytes, Image.Image]:
        buf = io.BytesIO()
        image.save(buf, format=fmt, quality=int(quality), **extra)
        data = buf.getvalue()
        with Image.open(io.BytesIO(data)) as decoded:
            return data, decoded.convert("RGB")

    return encode


def classical_codec(name: str) -> Codec:
    if name == "jpeg":
        return Codec("jpeg", [1, 3, 5, 10, 15, 20, 30, 40, 50, 65, 80, 90], _pillow("JPEG", optimize=True))
    if name == "webp":
        return Codec("webp", [0, 5, 10, 20, 30, 45, 60, 75, 90], _pillow("WEBP", method=6))
    if name == "avif":
        if not features.check("avif"):
            raise OSDiffError("avif: this Pillow has no AVIF support")
        return Codec("avif", [0, 5, 10, 20, 30, 40, 50, 60, 70, 80], _pillow("AVIF", speed=6))
    if name == "jxl":
        try:
            import pillow_jxl  # noqa: F401
        except ImportError:
            raise OSDiffError("jxl: install pillow-jxl-plugin for JPEG XL") from None
        return Codec("jxl", [5, 10, 20, 30, 40, 55, 70, 85], _pillow("JXL", effort=7))
    raise OSDiffError(f"unknown codec {name!r}")


def osdiff_codec(name: str, model: str | None = None) -> Codec:
    """A learned osdiff codec; `model` is a shipped name or folder (default: `name`)."""
    from ..hub import load
    from ..imageio import tensor_to_pil

    pipe = load(model or name)

    def encode(image: Image.Image, quality: int) -> tuple[bytes, Image.Image]:
        data = pipe.compress(image, quality=quality)
        return data, tensor_to_pil(pipe.decompress_tensor(data).image)

    return Codec(name, list(range(1, pipe.num_quality_levels + 1)), encode, learned=True)


def make_codec(name: str, model: str | None = None) -> Codec:
    if name.startswith("osdiff"):
        return osdiff_codec(name, model)
    return classical_codec(name)
