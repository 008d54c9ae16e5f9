"""Rate control: continuous quality (gain interpolation, format version 2) and target sizes."""
from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest
import torch

import osdiff
from osdiff import OSDiffError, OSDiffWarning
from osdiff.entropy.bitstream import FORMAT_VERSION, FRACTIONAL_VERSION, OSDHeader, pack, parse
from osdiff.entropy.gains import interpolate_gains
from osdiff.rate import parse_size, search_quality, target_size


# ---- the format ---------------------------------------------------------------------------
def test_integer_quality_writes_version_1_and_fractional_version_2():
    whole = pack(OSDHeader("m", b"\x01" * 8, 3, 56, 40, 8, 24), [b"abc"])
    assert whole[4] == FORMAT_VERSION and whole[5] == 3
    # the version-1 layout an older reader parses: magic, version, quality byte, name length
    assert struct.unpack_from(">4sBBB", whole) == (b"\x89OSD", 1, 3, 1)
    frac = pack(OSDHeader("m", b"\x01" * 8, 2.5, 56, 40, 8, 24), [b"abc"])
    assert frac[4] == FRACTIONAL_VERSION and struct.unpack_from(">H", frac, 5)[0] == 640
    assert len(frac) == len(whole) + 1
    for data, quality, version in ((whole, 3, 1), (frac, 2.5, 2)):
        header, strings = parse(data)
        assert header.quality == quality and type(header.quality) is type(quality)
        assert header.version == version and header.as_dict()["format_version"] == version and strings == [b"abc"]


@pytest.mark.parametrize("quality", [1 + 1 / 256, 2.5, 3.99609375, 200.25])
def test_fractional_quality_round_trips_exactly(quality):
    header = OSDHeader("osdiff-tiny", b"\x02" * 8, quality, 7, 9, 57, 55)
    assert parse(pack(header, [b"", b"x"]))[0] == header


def test_quality_not_on_the_grid_or_below_one_is_refused():
    for bad in (2.001, 0.5, float("nan"), "2"):
        with pytest.raises(OSDiffError, match="quality"):
            pack(OSDHeader("m", b"\x00" * 8, bad, 4, 4, 0, 0), [b"x"])


def _recrc(body: bytes) -> bytes:
    import zlib

    return body + struct.pack(">I", zlib.crc32(body))


def test_version_2_file_with_whole_or_sub_one_quality_is_corrupt():
    body = bytearray(pack(OSDHeader("m", b"\x00" * 8, 2.5, 4, 4, 0, 0), [b"x"])[:-4])
    body[5:7] = struct.pack(">H", 512)  # quality 2.0 in version 2: not what a writer makes
    with pytest.raises(OSDiffError, match="whole quality"):
        parse(_recrc(bytes(body)))
    body[5:7] = struct.pack(">H", 255)  # 0.996
    with pytest.raises(OSDiffError, match="below 1"):
        parse(_recrc(bytes(body)))


def test_every_bit_flip_of_a_version_2_file_is_caught():
    data = pack(OSDHeader("m", b"\x00" * 8, 1.25, 30, 20, 2, 12), [b"ab", b"\x00\xff" * 4])
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 1
        with pytest.raises(OSDiffError):
            parse(bytes(flipped))
