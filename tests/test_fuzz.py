"""Property-based fuzzing of the parser and the decoder (short version; hypothesis).

Every input ends either in a decoded image or in OSDiffError: never another exception type.
Tampered files get a recomputed CRC so the fuzzing reaches past the checksum."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osdiff import OSDiffError
from osdiff.entropy.bitstream import parse


def _recrc(body: bytes) -> bytes:
    return body + struct.pack(">I", zlib.crc32(body))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parse_random_bytes(data):
    try:
        parse(data)
    except OSDiffError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_parse_random_bodies_with_valid_crc(body):
    try:
        parse(_recrc(b"\x89OSD\x01" + body))
    except OSDiffError:
        pass


@pytest.fixture(scope="module")
def coded(tiny_codec):
    img = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    return tiny_codec.compress(img)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_decoder_survives_tampered_payloads(tiny_codec, coded, data):
    body = bytearray(coded[:-4])
    kind = data.draw(st.sampled_from(["flip", "truncate", "replace_tail"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(body) - 1))
            body[i] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        body = body[: data.draw(st.integers(0, len(body) - 1))]
    else:
        start = data.draw(st.integers(40, len(body) - 1))
        body = body[:start] + data.draw(st.binary(min_size=len(body) - start, max_size=len(body) - start))
    try:
        image = tiny_codec.decompress(_recrc(bytes(body)))
        assert image.mode == "RGB"
    except OSDiffError:
        pass
