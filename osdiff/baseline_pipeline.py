"""BaselinePipeline: a compressai baseline codec family (elic-tiny, hific-tiny) behind the same
interface and `.osd` file format as OSDiffPipeline, so the CLI, `osdiff eval` and `osdiff serve`
treat both alike.

    compress:   image -> pad to a multiple of 64 -> LearnedImageCodec.compress(rate) -> strings
    decompress: strings -> LearnedImageCodec.decompress(rate) -> crop -> image

Quality level q (1-based) selects the codec trained for the q-th rate (1 = fewest bits).

Components:
  codec   LearnedImageCodec: one compressai model per rate (osdiff.models.baselines)
"""
from __future__ import annotations

from torch import Tensor

from .codec_pipeline import ImageCodecPipeline
from .entropy.bitstream import OSDHeader
from .errors import OSDiffError
from .models.baselines import LearnedImageCodec
from .rate import level_index


class BaselinePipeline(ImageCodecPipeline):
    """A learned image codec without diffusion; decoding is one pass of compressai's g_s."""

    hashed_components = ("codec",)
    entropy_coder = "codec"

    def __init__(self, codec: LearnedImageCodec, model_name: str = "baseline", default_quality: int = 2) -> None:
        super().__init__()
        self.register_modules(codec=codec)
        self.register_to_config(model_name=model_name, default_quality=default_quality)

    @property
    def pad_multiple(self) -> int:
        return self.codec.pad_multiple

    @property
    def num_quality_levels(self) -> int:
        return int(self.codec.config.num_rates)

    def num_strings(self) -> int:
        return self.codec.num_strings()

    def encode_padded(self, image: Tensor, quality: int) -> list[bytes]:
        return self.codec.compress(image.to(device=self.device, dtype=self.codec.dtype), level_index(quality))

    def decode_strings(self, strings: list[bytes], header: OSDHeader, steps: int) -> Tensor:
        if steps != 1:
            raise OSDiffError(f"model {self.config.model_name!r} is not a diffusion codec: it decodes in one pass (steps must be 1)")
        image_hw = (header.height + header.pad_h, header.width + header.pad_w)
        try:
            return self.codec.decompress(strings, image_hw, level_index(header.quality)).float()
        except (RuntimeError, ValueError, IndexError) as exc:
            raise OSDiffError(f"corrupted entropy-coded data ({exc})") from None
