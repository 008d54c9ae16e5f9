"""Rate control: continuous quality on the 1/256 grid, file-size targets and their search.

A quality q (1 .. the model's highest level; `check_quality`) is stored in 1/256 steps; a model with gain
vectors codes any step (osdiff.entropy.gains), a model without (one network per rate) only
whole levels. A target size is met by `search_quality`: the highest quality whose real file
fits, by bisection on the quality over real encodes, guided by the file sizes seen.

Names, everywhere in osdiff: `quality` is the 1-based number users give and files store
(checked once, by `check_quality`); `level` is the 0-based index the networks take
(`level_index(quality)`).
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Callable

from .config import RateControlConfig
from .entropy.bitstream import QUALITY_STEPS, quality_from_steps
from .errors import OSDiffError

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class EncodeResult:
    """What `ImageCodecPipeline.encode` returns.

    data: the `.osd` file; quality: the quality stored in its header (int for a whole level,
    float between levels); encodes: real encodes made (1 without a target); target_bytes: the
    size asked for, in bytes (None without a target); fits: whether `data` is within it (True
    without a target; False when even the lowest quality is larger, which then was written)."""

    data: bytes
    quality: int | float
    encodes: int = 1
    target_bytes: int | None = None
    fits: bool = True


def parse_size(text: str) -> int:
    """'20kB' -> 20000 bytes. Units (case-insensitive): B or none, kB/MB/GB (powers of 1000),
    KiB/MiB/GiB (powers of 1024); fractions are rounded down to whole bytes."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise OSDiffError(f"size must be a number of bytes with an optional unit (B, kB, MB, KiB, MiB), got {text!r}")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise OSDiffError(f"size must be at least 1 byte, got {text!r}")
    return size


def target_size(width: int, height: int, target_bpp: float | None = None, target_bytes: int | None = None) -> int:
    """The target in bytes for an image of width x height pixels, from bits per pixel or bytes."""
    if (target_bpp is None) == (target_bytes is None):
        raise OSDiffError("give one of target_bpp and target_bytes")
    if target_bytes is not None:
        if isinstance(target_bytes, bool) or not isinstance(target_bytes, numbers.Integral) or target_bytes < 1:
            raise OSDiffError(f"target size must be a positive whole number of bytes, got {target_bytes!r}")
        return int(target_bytes)
    if isinstance(target_bpp, bool) or not isinstance(target_bpp, numbers.Real) or not math.isfinite(target_bpp) or target_bpp <= 0:
        raise OSDiffError(f"target bpp must be a positive number, got {target_bpp!r}")
    return int(float(target_bpp) * width * height / 8)


def check_quality(quality, levels: int, continuous: bool, what: str = "quality") -> int | float:
    """The one check of a quality: the 1-based number users give (1 = fewest bits .. `levels`),
    returned as a file stores it (rounded to the nearest 1/256 step; an int for a whole level).
    OSDiffError (its message starting with `what`) when it is not a number from 1 to `levels`,
    or fractional for a model with whole levels only."""
    if isinstance(quality, bool) or not isinstance(quality, numbers.Real) or not math.isfinite(quality) or not 1 <= quality <= levels:
        kind = "a number" if continuous else "an integer"
        raise OSDiffError(f"{what} must be {kind} from 1 to {levels}, got {quality!r}")
    steps = round(float(quality) * QUALITY_STEPS)
    if not continuous and steps % QUALITY_STEPS:
        raise OSDiffError(f"{what} must be an integer from 1 to {levels} for this model (it has no gain vectors to interpolate), got {quality!r}")
    return quality_from_steps(steps)


def level_index(quality: int | float) -> int | float:
    """A (checked) 1-based quality -> the 0-based level index the networks take (the compressor's
    gain tables, one network per level): quality 1 is level 0; 2.5 is 1.5, between levels 1 and 2."""
    return quality - 1


def search_quality(encode: Callable[[int | float], bytes], levels: int, continuous: bool, target: int,
                   config: RateControlConfig = RateControlConfig()) -> EncodeResult:
    """The highest quality whose file from `encode(quality)` is at most `target` bytes.

    Encodes the highest quality (done if it fits), then the lowest (if that does not fit, it is
    the result with fits=False), then bisects the bracket [largest fitting, smallest too large]
    on the 1/256 grid (whole levels if not `continuous`), each probe placed where the log file
    size interpolates to the target but at least an eighth of the bracket from either end, until
    the bracket is one step wide, a file fits within `config.tolerance` of the target, or
    `config.max_encodes` encodes are spent. Assumes sizes grow with quality, as they do up to
    a few bytes of coding noise; whatever happens, the returned file is one of those encoded."""
    unit = 1 if continuous else QUALITY_STEPS
    low, high = QUALITY_STEPS // unit, levels * QUALITY_STEPS // unit
    files: dict[int, bytes] = {}

    def size(i: int) -> int:
        if i not in files:
            files[i] = encode(quality_from_steps(i * unit))
        return len(files[i])

    def result(i: int, fits: bool = True) -> EncodeResult:
        return EncodeResult(files[i], quality_from_steps(i * unit), len(files), target, fits)

    if size(high) <= target:
        return result(high)
    if low == high or size(low) > target:
        return result(low, fits=False)
    lo, hi = low, high  # size(lo) <= target < size(hi)
    while hi - lo > 1 and len(files) < config.max_encodes and size(lo) < target * (1 - config.tolerance):
        s_lo, s_hi = math.log(size(lo)), math.log(size(hi))  # size(lo) <= target < size(hi)
        guess = lo + (math.log(target) - s_lo) / (s_hi - s_lo) * (hi - lo)
        margin = (hi - lo) / 8
        probe = min(max(round(guess), math.ceil(lo + margin)), math.floor(hi - margin))
        probe = min(max(probe, lo + 1), hi - 1)
        if size(probe) <= target:
            lo = probe
        else:
            hi = probe
    return result(lo)
