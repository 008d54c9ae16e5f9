"""The `.osd` file format (versions 1 and 2); byte layout in docs/bitstream.md.

Version 1 stores an integer quality level in one byte; version 2, written only for a
fractional quality, stores the quality in 1/256 steps in two bytes. Both are read.

All integers are big-endian. The parser checks magic, version, total length and CRC32 before
it reads any field, then bounds every field, so no input makes it allocate more than the file
itself. Every failure raises OSDiffError with a one-line reason.
"""
from __future__ import annotations

import math
import numbers
import struct
import zlib
from dataclasses import dataclass

from ..config import BitstreamLimits
from ..errors import OSDiffError

MAGIC = b"\x89OSD"
FORMAT_VERSION = 1  # integer quality levels (what older readers understand)
FRACTIONAL_VERSION = 2  # fractional quality, in 1/QUALITY_STEPS
READ_VERSIONS = (FORMAT_VERSION, FRACTIONAL_VERSION)
QUALITY_STEPS = 256  # version 2 stores round(quality * 256)
HASH_BYTES = 8
_FIXED = struct.Struct(">4sBBB")  # magic, version, quality, name length (version 1)
_FIXED_V2 = struct.Struct(">4sBHB")  # magic, version, quality * 256, name length (version 2)
_DIMS = struct.Struct(">IIHHB")  # width, height, pad_w, pad_h, number of strings
_CRC = struct.Struct(">I")
MIN_FILE_BYTES = _FIXED.size + 1 + HASH_BYTES + _DIMS.size + _CRC.size


@dataclass(frozen=True)
class OSDHeader:
    """Everything in an `.osd` file except the entropy-coded strings.

    width, height: original image size in pixels; pad_w, pad_h: pixels of replicate padding
    added on the right and bottom before coding; quality: 1-based quality, an int for a
    level, a float (a multiple of 1/256) between levels; the format version follows from it.
    """

    model_name: str
    model_hash: bytes
    quality: int | float
    width: int
    height: int
    pad_w: int
    pad_h: int

    @property
    def version(self) -> int:
        """The format version this header is written in: 1 for a whole level, else 2."""
        return FORMAT_VERSION if float(self.quality).is_integer() else FRACTIONAL_VERSION

    def as_dict(self) -> dict:
        return {
            "format_version": self.version,
            "model_name": self.model_name,
            "model_hash": self.model_hash.hex(),
            "quality": self.quality,
            "width": self.width,
            "height": self.height,
            "pad_w": self.pad_w,
            "pad_h": self.pad_h,
        }


def quality_steps(quality: float) -> int:
    """`quality` in 1/QUALITY_STEPS units; OSDiffError unless it is a multiple of 1/256 >= 1."""
    if isinstance(quality, bool) or not isinstance(quality, numbers.Real):
        raise OSDiffError(f"quality must be a number, got {quality!r}")
    steps = float(quality) * QUALITY_STEPS
    if not math.isfinite(steps) or not steps.is_integer() or steps < QUALITY_STEPS:
        raise OSDiffError(f"quality must be a multiple of 1/{QUALITY_STEPS} from 1, got {quality!r}")
    return int(steps)


def quality_from_steps(steps: int) -> int | float:
    """1/256 units -> the quality as stored: an int for a whole level, else a float (exact)."""
    return steps // QUALITY_STEPS if steps % QUALITY_STEPS == 0 else steps / QUALITY_STEPS


def header_bytes(model_name: str, n_strings: int) -> int:
    """Size in bytes of a file of this model whose strings are all empty (the least possible);
    a fractional quality adds one byte."""
    return MIN_FILE_BYTES - 1 + len(model_name.encode("utf-8")) + 4 * n_strings


def pack(header: OSDHeader, strings: list[bytes]) -> bytes:
    """Header + string lengths + strings + CRC32 of all preceding bytes. An integer quality
    is written as version 1 (byte-identical to earlier osdiff), a fractional one as version 2."""
    name = header.model_name.encode("utf-8")
    if not 1 <= len(name) <= 255:
        raise OSDiffError("model name must be 1..255 bytes of UTF-8")
    if len(header.model_hash) != HASH_BYTES:
        raise OSDiffError(f"model hash must be {HASH_BYTES} bytes")
    if len(strings) > 255:
        raise OSDiffError("at most 255 entropy-coded strings")
    steps = quality_steps(header.quality)
    if steps % QUALITY_STEPS == 0:
        if steps // QUALITY_STEPS > 255:
            raise OSDiffError(f"quality {header.quality} above 255")
        fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, steps // QUALITY_STEPS, len(name))
    else:
        if steps > 0xFFFF:
            raise OSDiffError(f"quality {header.quality} above 255")
        fixed = _FIXED_V2.pack(MAGIC, FRACTIONAL_VERSION, steps, len(name))
    body = b"".join(
        [
            fixed,
            name,
            header.model_hash,
            _DIMS.pack(header.width, header.height, header.pad_w, header.pad_h, len(strings)),
            b"".join(struct.pack(">I", len(s)) for s in strings),
            *strings,
        ]
    )
    return body + _CRC.pack(zlib.crc32(body))


def parse(data: bytes, limits: BitstreamLimits = BitstreamLimits()) -> tuple[OSDHeader, list[bytes]]:
    """Strictly parse an `.osd` file into (header, strings)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise OSDiffError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 4 or data[:4] != MAGIC:
        raise OSDiffError("not an osdiff file (wrong magic bytes)")
    if len(data) < MIN_FILE_BYTES:
        raise OSDiffError(f"truncated file: {len(data)} bytes is shorter than any valid header")
    version = data[4]
    if version not in READ_VERSIONS:
        raise OSDiffError(f"unsupported format version {version} (this osdiff reads versions {', '.join(map(str, READ_VERSIONS))})")
    fixed = _FIXED if version == FORMAT_VERSION else _FIXED_V2
    if len(data) < MIN_FILE_BYTES + fixed.size - _FIXED.size:
        raise OSDiffError(f"truncated file: {len(data)} bytes is shorter than any valid header")
    magic, version, quality, name_len = fixed.unpack_from(data, 0)
    steps = quality * QUALITY_STEPS if version == FORMAT_VERSION else quality
    body, (crc,) = data[:-_CRC.size], _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(body) != crc:
        raise OSDiffError("corrupted or truncated file (CRC32 mismatch)")
    pos = fixed.size
    if name_len == 0 or pos + name_len + HASH_BYTES + _DIMS.size > len(body):
        raise OSDiffError("corrupted header (bad model name length)")
    try:
        model_name = body[pos : pos + name_len].decode("utf-8")
    except UnicodeDecodeError:
        raise OSDiffError("corrupted header (model name is not UTF-8)") from None
    pos += name_len
    model_hash = body[pos : pos + HASH_BYTES]
    pos += HASH_BYTES
    width, height, pad_w, pad_h, n_strings = _DIMS.unpack_from(body, pos)
    pos += _DIMS.size
    if steps < QUALITY_STEPS:
        raise OSDiffError(f"corrupted header (quality {steps / QUALITY_STEPS:g} below 1)")
    if version == FRACTIONAL_VERSION and steps % QUALITY_STEPS == 0:
        raise OSDiffError("corrupted header (version 2 with a whole quality level)")
    if not (1 <= width <= limits.max_side and 1 <= height <= limits.max_side):
        raise OSDiffError(f"image size {width}x{height} outside 1..{limits.max_side} pixels per side")
    if (width + pad_w) * (height + pad_h) > limits.max_pixels:
        raise OSDiffError(f"image of {width + pad_w}x{height + pad_h} pixels exceeds the limit of {limits.max_pixels} pixels")
    if pos + 4 * n_strings > len(body):
        raise OSDiffError(f"truncated file: {n_strings} string lengths declared, not enough bytes")
    lengths = struct.unpack_from(f">{n_strings}I", body, pos)
    pos += 4 * n_strings
    if pos + sum(lengths) != len(body):
        raise OSDiffError(
            f"corrupted file: string lengths add up to {sum(lengths)} bytes, payload has {len(body) - pos}"
        )
    strings = []
    for n in lengths:
        strings.append(body[pos : pos + n])
        pos += n
    header = OSDHeader(model_name, model_hash, quality_from_steps(steps), width, height, pad_w, pad_h)
    return header, strings
