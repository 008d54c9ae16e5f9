"""The .osd parser is strict: every malformed file raises OSDiffError with a clear reason."""
from __future__ import annotations

import struct
import zlib

import pytest

from osdiff import OSDiffError
from osdiff.config import BitstreamLimits
from osdiff.entropy.bitstream import MAGIC, OSDHeader, pack, parse

HEADER = OSDHeader("osdiff-tiny", b"\x01" * 8, 2, 56, 40, 8, 24)
STRINGS = [b"abc", b"", b"\x00\xff" * 10]


def _recrc(body: bytes) -> bytes:
    """Give tampered bytes a valid CRC, as a hostile file would."""
    return body + struct.pack(">I", zlib.crc32(body))


def test_pack_parse_round_trip():
    data = pack(HEADER, STRINGS)
    header, strings = parse(data)
    assert header == HEADER and strings == STRINGS
    assert header.as_dict()["model_hash"] == "01" * 8


@pytest.mark.parametrize("data, message", [
    (b"", "magic"),
    (b"PNG\x00" + b"\x00" * 40, "magic"),
    (MAGIC, "truncated"),
    (MAGIC + b"\x01", "truncated"),
])
def test_bad_starts(data, message):
    with pytest.raises(OSDiffError, match=message):
        parse(data)


def test_unknown_version():
    body = bytearray(pack(HEADER, STRINGS)[:-4])
    body[4] = 99
    with pytest.raises(OSDiffError, match="version 99"):
        parse(_recrc(bytes(body)))


@pytest.mark.parametrize("cut", [1, 5, 20])
def test_truncated(cut):
    with pytest.raises(OSDiffError, match="CRC32|truncated"):
        parse(pack(HEADER, STRINGS)[:-cut])


def test_every_single_bit_flip_is_caught():
    data = pack(HEADER, STRINGS)
    for i in range(len(data)):
        for bit in (0, 7):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            with pytest.raises(OSDiffError):
                parse(bytes(flipped))


@pytest.mark.parametrize("w, h", [(0, 40), (56, 0), (10**6, 10**6), (65536, 65536), (2**32 - 1, 1)])
def test_absurd_dimensions_rejected_before_allocation(w, h):
    data = pack(OSDHeader("m", b"\x00" * 8, 1, w, h, 0, 0), [b"x"])
    with pytest.raises(OSDiffError, match="image size|exceeds"):
        parse(data)


def test_custom_limits():
    data = pack(OSDHeader("m", b"\x00" * 8, 1, 4000, 4000, 0, 0), [b"x"])
    with pytest.raises(OSDiffError, match="exceeds"):
        parse(data, BitstreamLimits(max_pixels=1000 * 1000))


def test_lying_string_lengths():
    body = bytearray(pack(HEADER, STRINGS)[:-4])
    offset = 7 + len(HEADER.model_name) + 8 + 13  # first length field
    body[offset : offset + 4] = struct.pack(">I", 2**31)
    with pytest.raises(OSDiffError, match="string lengths"):
        parse(_recrc(bytes(body)))


def test_too_many_declared_strings():
    body = bytearray(pack(HEADER, STRINGS)[:-4])
    body[7 + len(HEADER.model_name) + 8 + 12] = 255
    with pytest.raises(OSDiffError, match="truncated|string lengths"):
        parse(_recrc(bytes(body)))


def test_zero_quality_and_bad_name():
    with pytest.raises(OSDiffError, match="quality"):
        parse(pack(OSDHeader("m", b"\x00" * 8, 0, 4, 4, 0, 0), [b"x"]))
    body = bytearray(pack(HEADER, STRINGS)[:-4])
    body[7] = 0xFF  # invalid UTF-8 start
    with pytest.raises(OSDiffError, match="UTF-8"):
        parse(_recrc(bytes(body)))


def test_not_bytes():
    with pytest.raises(OSDiffError, match="expected bytes"):
        parse("not bytes")  # type: ignore[arg-type]


def test_codec_checks_padding_and_string_count(tiny_codec, photo):
    good = tiny_codec.compress(photo)
    header, strings = parse(good)
    wrong_pad = OSDHeader(header.model_name, header.model_hash, header.quality, header.width, header.height, header.pad_w + 1, header.pad_h)
    with pytest.raises(OSDiffError, match="padding"):
        tiny_codec.decompress(pack(wrong_pad, strings))
    with pytest.raises(OSDiffError, match="strings"):
        tiny_codec.decompress(pack(header, strings[:-1]))
    bad_level = OSDHeader(header.model_name, header.model_hash, 99, header.width, header.height, header.pad_w, header.pad_h)
    with pytest.raises(OSDiffError, match=r"the file.s quality must be .*, got 99"):
        tiny_codec.decompress(pack(bad_level, strings))
