"""osdiff: one-step diffusion perceptual image compression.

    import osdiff
    codec = osdiff.load("osdiff-tiny")
    data = codec.compress("photo.png", quality=2)   # bytes of an .osd file
    data = codec.compress("photo.png", quality=2.5) # between levels (models with gain vectors)
    result = codec.encode("photo.png", target_bytes=20_000)  # EncodeResult: .data, .quality, .encodes
    image = codec.decompress(data)                  # PIL.Image

Heavy modules (torch, diffusers, compressai) are imported on first use of a name below, so
`osdiff info` and `--help` start fast. With OSDIFF_KERNELS=avx2, importing osdiff pins torch's
CPU kernels to AVX2 on x86 CPUs that have it, so decoded pixels do not depend on the CPU
(osdiff.kernels).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import warnings

from . import kernels as _kernels
from .errors import OSDiffError, OSDiffWarning, TargetUnreachable

try:
    _kernels.pin()  # $OSDIFF_KERNELS, before torch's first op fixes the kernels for the process
except OSDiffError as _exc:
    warnings.warn(f"{_exc}; torch's own kernels are used", OSDiffWarning, stacklevel=2)

__version__ = "0.1.0"

_LAZY = {
    "OSDiffPipeline": ".pipeline",
    "BaselinePipeline": ".baseline_pipeline",
    "OfficialOSDiffPipeline": ".official_pipeline",
    "ImageCodecPipeline": ".codec_pipeline",
    "LearnedImageCodec": ".models.baselines",
    "LatentCompressor": ".models.compressor",
    "TinyAutoencoder": ".models.autoencoder",
    "ConditioningEmbedding": ".models.conditioning",
    "EncodeResult": ".rate",
    "load": ".hub",
    "available_models": ".hub",
    "DEFAULT_MODEL": ".hub",
}

__all__ = ["OSDiffError", "OSDiffWarning", "TargetUnreachable", "__version__", *_LAZY]

if TYPE_CHECKING:
    from .baseline_pipeline import BaselinePipeline
    from .codec_pipeline import ImageCodecPipeline
    from .official_pipeline import OfficialOSDiffPipeline
    from .hub import DEFAULT_MODEL, available_models, load
    from .models.baselines import LearnedImageCodec
    from .models.autoencoder import TinyAutoencoder
    from .models.compressor import LatentCompressor
    from .models.conditioning import ConditioningEmbedding
    from .pipeline import OSDiffPipeline
    from .rate import EncodeResult


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'osdiff' has no attribute {name!r}")
