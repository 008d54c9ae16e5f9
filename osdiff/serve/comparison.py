"""Encode one image with several codecs, the classical ones matched to a target file size."""
from __future__ import annotations

import base64
import time
from dataclasses import dataclass

from PIL import Image
from torch import Tensor

from ..evaluation.codecs import Codec
from ..evaluation.metrics import MetricSuite, psnr
from ..imageio import to_tensor


# what the page's table shows, the field's perceptual metrics first
SERVED_METRICS = ("lpips", "dists", "psnr")
# AlexNet's and VGG's pooling leave nothing of a smaller image (measured: 31 px works, 24 fails)
LEARNED_MIN_SIDE = 32


def served_metrics() -> MetricSuite:
    """The metrics of the page's table; LPIPS and DISTS drop out (null) where their backbones are
    missing (`MetricSuite.unavailable` says why)."""
    return MetricSuite(only=frozenset(SERVED_METRICS))


@dataclass
class CodedImage:
    """One codec's result on one image: the file (`data`), its decoded RGB image, timings (s);
    `setting`: the codec's quality setting (osdiff: the quality stored in the file)."""

    codec: Codec
    setting: int | float
    data: bytes
    decoded: Image.Image
    encode_s: float
    decode_s: float

    def summary(self, original: Tensor, metrics: MetricSuite) -> dict:
        """JSON-ready: file size (bytes), bits per pixel, the field's metrics against `original`
        (LPIPS-Alex and DISTS, lower is better, null when their backbones are missing; PSNR in dB,
        null for an identical image), timings (s), file."""
        pixels = original.shape[-1] * original.shape[-2]
        decoded = to_tensor(self.decoded)
        small = min(original.shape[-2:]) < LEARNED_MIN_SIDE  # LPIPS and DISTS: null
        scores = {"psnr": psnr(decoded, original)} if small else metrics(decoded, original)
        return {
            "codec": self.codec.name,
            "setting": self.setting,
            "bytes": len(self.data),
            "bpp": len(self.data) * 8 / pixels,
            **{name: _finite(scores[name]) if name in scores else None for name in SERVED_METRICS},
            "encode_s": self.encode_s,
            "decode_s": self.decode_s,
            "mime": self.codec.mime,
            "suffix": self.codec.suffix,
            "file": base64.b64encode(self.data).decode(),
        }


def encode_timed(codec: Codec, image: Image.Image, setting: int | float) -> CodedImage:
    t0 = time.perf_counter()
    data = codec.encode_bytes(image, setting)
    t1 = time.perf_counter()
    decoded = codec.decode_bytes(data)
    t2 = time.perf_counter()
    return CodedImage(codec, setting, data, decoded, t1 - t0, t2 - t1)


def match_file_size(codec: Codec, image: Image.Image, target_bytes: int) -> CodedImage:
    """The codec's quality setting whose file is closest in size to `target_bytes`
    (bisection over `codec.quality_range`; sizes grow with the setting), encoded and timed."""
    sizes: dict[int, int] = {}

    def size(q: int) -> int:
        if q not in sizes:
            sizes[q] = len(codec.encode_bytes(image, q))
        return sizes[q]

    lo, hi = codec.quality_range
    while hi - lo > 1:  # invariant after the loop: the best is lo or hi
        mid = (lo + hi) // 2
        if size(mid) <= target_bytes:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda q: (abs(size(q) - target_bytes), q))
    return encode_timed(codec, image, best)


def _finite(value: float) -> float | None:
    """JSON has no inf/nan: identical images (PSNR inf) and failures become null."""
    return value if value == value and abs(value) != float("inf") else None
