"""The shipped conformance vectors decode as recorded; a damaged vector fails loudly."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from osdiff import kernels
from osdiff.conformance import check_vector, kernel_differences, record_symbols, source_image, vector_files
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
    """Symbols must match (always); pixels where the kernels match the record's; PSNR always."""
    proc = subprocess.run([sys.executable, "-m", "osdiff.cli", "conformance", "-m", "osdiff-tiny"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(vector_files("osdiff-tiny")) + 1 and " 0 fail (CPU kernels " in lines[-1]
    assert all(line.startswith("PASS") and "symbols ok" in line for line in lines[:-1])
    if kernels.can_pin():  # an x86 CPU with AVX2: the pin makes the pixels the recorded ones
        assert "(pinned)" in lines[-1] and all(_recorded_pixels_or_other_blas(line) for line in lines[:-1]), lines


def _records_blas() -> str:
    return json.loads(vector_files("osdiff-tiny")[0].with_suffix(".json").read_text())["recorded_on"]["blas"]


def _recorded_pixels_or_other_blas(line: str) -> bool:
    """'pixels ok' where MKL takes the recording CPU's vendor path; on another vendor's CPU MKL
    takes its own path, which the pin does not cover (docs/bitstream.md), so the line may name
    only that difference and the PSNR judges (the ATen and oneDNN kernels are the recorded ones)."""
    if kernels.in_force()["blas"] == _records_blas():
        return "pixels ok" in line
    other = f"pixels other kernels (blas {kernels.in_force()['blas']} vs {_records_blas()}), within"
    return "pixels ok" in line or other in line


SMALL = ("q1-96x64", "q3-96x64", "tiny-8x8")  # osdiff-tiny vectors whose pixels differ between kernels


def _conformance(folder, *flags: str, **env: str) -> list[str]:
    for name in SMALL:
        for suffix in (".osd", ".json"):
            src = next(f for f in vector_files("osdiff-tiny") if f.stem == name).with_suffix(suffix)
            (folder / "osdiff-tiny" / "format-1").mkdir(parents=True, exist_ok=True)
            shutil.copy(src, folder / "osdiff-tiny" / "format-1" / src.name)
    proc = subprocess.run([sys.executable, "-m", "osdiff.cli", "conformance", "--vectors", str(folder), *flags],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().splitlines()


@pytest.mark.skipif(not kernels.can_pin(), reason="the pin needs an x86 CPU with AVX2")
def test_the_pin_over_other_kernels_gives_the_recorded_pixels(tmp_path):
    """Another machine's kernels, forced (ATen's scalar ones, oneDNN's SSE4.1): pinned over them,
    the pixels are the recorded ones."""
    lines = _conformance(tmp_path, ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41")
    assert all(line.startswith("PASS") and _recorded_pixels_or_other_blas(line) for line in lines[:-1]), lines
    assert lines[-1].endswith("(CPU kernels AVX2 (pinned))")


def test_other_kernels_are_judged_by_psnr_not_failed(tmp_path):
    lines = _conformance(tmp_path, "--native-kernels", ATEN_CPU_CAPABILITY="default", OSDIFF_KERNELS="avx2")
    assert all(line.startswith("PASS") and "pixels other kernels (cpu_capability DEFAULT vs AVX2" in line
               and "within 0.05 dB" in line for line in lines[:-1]), lines
    assert lines[-1].endswith("(CPU kernels DEFAULT (not pinned))")


TORCH_FIRST = """
import os, sys, torch
torch.ones(3).sum()  # torch's first op fixes its kernels
os.environ["OSDIFF_KERNELS"] = "avx2"
import osdiff
from osdiff import kernels
from osdiff.conformance import check_vector
print(torch.backends.cpu.get_cpu_capability())
print(kernels.state())
print(check_vector(osdiff.load("osdiff-tiny"), __import__("pathlib").Path(sys.argv[1])).line())
"""


def test_torch_before_osdiff_is_reported_not_failed():
    """A program that ran torch before `import osdiff` keeps torch's kernels: osdiff says the pin
    was not applied and judges the pixels by PSNR (unless torch's own choice is the pinned one)."""
    path = next(f for f in vector_files("osdiff-tiny") if f.stem == "q1-96x64")
    proc = subprocess.run([sys.executable, "-c", TORCH_FIRST, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    native, state, line = proc.stdout.strip().splitlines()[-3:]
    assert line.startswith("PASS  osdiff-tiny/q1-96x64: symbols ok"), line
    if native == "AVX2" and kernels.can_pin():
        assert state == "AVX2 (pinned)" and "pixels ok" in line
    else:
        assert "pin not applied" in state or "no pin" in state
        assert f"pixels other kernels (cpu_capability {native} vs AVX2" in line and "within 0.05 dB" in line


def test_kernel_differences_name_what_differs():
    here = {"device": "cpu", "processor": "Intel Xeon", "cpu_capability": "AVX512", "onednn_isa": "NATIVE",
            "mode": "deterministic"}
    recorded = {**here, "processor": "AMD EPYC", "cpu_capability": "AVX2", "onednn_isa": "AVX2"}
    assert kernel_differences(here, recorded) == ["cpu_capability AVX512 vs AVX2", "onednn_isa NATIVE vs AVX2"]
    assert kernel_differences(recorded | {"processor": "other"}, recorded) == []
    gpu = {"device": "cuda", "processor": "NVIDIA H200"}
    assert kernel_differences(gpu | {"processor": "NVIDIA A100"}, gpu) == ["processor NVIDIA A100 vs NVIDIA H200"]


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


def test_a_bad_kernel_choice_is_one_warning_line():
    path = vector_files("osdiff-tiny")[0]
    proc = subprocess.run([sys.executable, "-m", "osdiff.cli", "info", str(path)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OSDIFF_KERNELS": "avx3"})
    assert proc.returncode == 0 and proc.stderr.strip().count("\n") == 0
    assert "OSDIFF_KERNELS='avx3': expected avx2 or native" in proc.stderr
