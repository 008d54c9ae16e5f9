"""The shipped conformance vectors decode as recorded; a damaged vector fails loudly."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from osdiff.conformance import check_vector, record_symbols, source_image, vector_files
from osdiff.entropy.bitstream import parse
from osdiff.hub import load


def test_every_shipped_model_has_vectors_for_every_level():
    from osdiff.hub import available_models

    for model in available_models():
        pipe, files = load(model), vector_files(model)
        qualities = {json.loads(f.with_suffix(".json").read_text())["quality"] for f in files}
        assert set(range(1, pipe.num_quality_levels + 1)) <= qualities, model
        assert any("tiled" in f.stem for f in files) and any("odd" in f.stem for f in files)
        fractional = {q for q in qualities if q != int(q)}
        assert bool(fractional) == pipe.continuous_quality, model  # format version 2 where it exists
        if fractional:
            assert any(f.parent.name == "format-2" for f in files)


def test_source_image_is_fixed_integer_arithmetic():
    a = source_image(37, 23)
    assert a.shape == (23, 37, 3) and a.dtype == np.uint8
    assert np.array_equal(a, source_image(37, 23)) and len(np.unique(a)) > 50


def test_conformance_command_passes_on_this_machine():
    """Symbols must match (always); pixels where CPU, torch and mode match the record; PSNR always."""
    proc = subprocess.run([sys.executable, "-m", "osdiff.cli", "conformance", "-m", "osdiff-tiny"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(vector_files("osdiff-tiny")) + 1 and lines[-1].endswith(" 0 fail")
    assert all(line.startswith("PASS") and "symbols ok" in line for line in lines[:-1])


def _flip_payload_bit(data: bytes, byte_from_end: int) -> bytes:
    """Flip one bit inside the last entropy-coded string and recompute the CRC32."""
    body = bytearray(data[:-4])
    body[len(body) - byte_from_end] ^= 0x10
    return bytes(body) + struct.pack(">I", zlib.crc32(bytes(body)) & 0xFFFFFFFF)


@pytest.mark.parametrize("model", ["osdiff-tiny", "hific-tiny"])
def test_a_flipped_payload_bit_with_a_valid_crc_fails_the_check(model):
    pipe = load(model)
    path = next(f for f in vector_files(model) if f.stem == "q3-96x64")
    data = path.read_bytes()
    _, strings = parse(data)
    assert len(strings[0]) >= 4
    # the first bytes of the first string (the strings end the body; a string's first bytes are
    # the rANS state its decoder reads first, while its last can be unread padding, and the last
    # string, the hyper-latent, can carry almost nothing); none may pass silently
    total = sum(len(s) for s in strings)
    for k in (total, total - 1, total - 2):
        damaged = _flip_payload_bit(data, k)
        parse(damaged)  # the header and CRC checks pass: only decoding can notice
        result = check_vector(pipe, path, damaged)
        assert not result.passed, result.line()
        assert result.symbols != "ok"


def test_record_symbols_restores_the_entropy_models():
    pipe = load("osdiff-tiny")
    path = vector_files("osdiff-tiny")[0]
    with record_symbols(pipe.compressor) as symbols:
        pipe.decompress(path.read_bytes())
    assert symbols and all(s.dtype.is_floating_point is False for s in symbols)
    assert all("dequantize" not in vars(m) for m in pipe.compressor.modules())


def test_a_missing_vector_folder_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "osdiff.cli", "conformance", "--vectors", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0 and "no conformance vectors" in proc.stderr
