"""The `.osd` file format (version 1); byte layout in docs/bitstream.md.

All integers are big-endian. The parser checks magic, version, total length and CRC32 before
it reads any field, then bounds every field, so no input makes it allocate more than the file
itself. Every failure raises OSDiffError with a one-line reason.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from ..config import BitstreamLimits
from ..errors import OSDiffError

MAGIC = b"\x89OSD"
FORMAT_VERSION = 1
HASH_BYTES = 8
_FIXED = struct.Struct(">4sBBB")  # magic, version, quality, name length
_DIMS = struct.Struct(">IIHHB")  # width, height, pad_w, pad_h, number of strings
_CRC = struct.Struct(">I")
MIN_FILE_BYTES = _FIXED.size + 1 + HASH_BYTES + _DIMS.size + _CRC.size


@dataclass(frozen=True)
class OSDHeader:
    """Everything in an `.osd` file except the entropy-coded strings.

    width, height: original image size in pixels; pad_w, pad_h: pixels of replicate padding
    added on the right and bottom before coding; quality: 1-based quality level.
    """

    model_name: str
    model_hash: bytes
    quality: int
    width: int
    height: int
    pad_w: int
    pad_h: int
    version: int = FORMAT_VERSION

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


def pack(header: OSDHeader, strings: list[bytes]) -> bytes:
    """Header + string lengths + strings + CRC32 of all preceding bytes."""
    name = header.model_name.encode("utf-8")
    if not 1 <= len(name) <= 255:
        raise OSDiffError("model name must be 1..255 bytes of UTF-8")
    if len(header.model_hash) != HASH_BYTES:
        raise OSDiffError(f"model hash must be {HASH_BYTES} bytes")
    if len(strings) > 255:
        raise OSDiffError("at most 255 entropy-coded strings")
    body = b"".join(
        [
            _FIXED.pack(MAGIC, FORMAT_VERSION, header.quality, len(name)),
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
    magic, version, quality, name_len = _FIXED.unpack_from(data, 0)
    if version != FORMAT_VERSION:
        raise OSDiffError(f"unsupported format version {version} (this osdiff reads version {FORMAT_VERSION})")
    body, (crc,) = data[:-_CRC.size], _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(body) != crc:
        raise OSDiffError("corrupted or truncated file (CRC32 mismatch)")
    pos = _FIXED.size
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
    if quality < 1:
        raise OSDiffError("corrupted header (quality level 0)")
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
    header = OSDHeader(model_name, model_hash, quality, width, height, pad_w, pad_h, version)
    return header, strings
