"""ComputeConfig.precision: which CPUs 'auto' runs in bfloat16, that only the latent autoencoder
and the UNet step run in it, and that it still decodes what float32 decodes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from osdiff import kernels
from osdiff.config import ComputeConfig
from osdiff.errors import OSDiffError


@pytest.mark.parametrize("flags, cap, native", [
    ({"avx2", "amx_bf16", "avx512_bf16"}, None, True),
    ({"avx2", "avx512_bf16"}, None, True),
    ({"avx2", "avx512_bf16"}, "AVX512_CORE_BF16", True),
    ({"avx2", "amx_bf16"}, "AVX512_CORE_AMX", True),
    ({"avx2", "avx512_bf16"}, "AVX2", False),  # the AVX2 pin: oneDNN would emulate bfloat16
    ({"avx2", "avx512f"}, None, False),  # AVX512 without BF16 (e.g. Skylake-X)
    (set(), None, False),  # not x86, or not Linux
])
def test_native_bf16_reads_the_cpu_flags_and_the_onednn_cap(monkeypatch, flags, cap, native):
    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert kernels.native_bf16() is native


def test_a_bad_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        ComputeConfig(precision="fp16")


@pytest.fixture
def codec(tiny_codec):
    saved = tiny_codec.compute
    yield tiny_codec
    tiny_codec.compute = saved


def test_auto_follows_the_cpu_and_only_the_osdiff_networks_take_it(codec, monkeypatch):
    monkeypatch.setattr(kernels, "native_bf16", lambda: True)
    codec.compute = ComputeConfig(precision="auto")
    assert codec.network_precision == "bfloat16"
    codec.compute = ComputeConfig(precision="float32")
    assert codec.network_precision == "float32"
    monkeypatch.setattr(kernels, "native_bf16", lambda: False)
    codec.compute = ComputeConfig(precision="auto")
    assert codec.network_precision == "float32"
    codec.compute = ComputeConfig(precision="bfloat16")  # asked for: also where it is emulated
    assert codec.network_precision == "bfloat16"

    from osdiff.baseline_pipeline import BaselinePipeline

    assert not BaselinePipeline.autocast_networks  # a baseline's networks stay float32


def _dtypes_seen(codec, precision: str, photo) -> dict[str, set]:
    """Output dtypes of the convolutions of each component during a round trip."""
    codec.compute = ComputeConfig(precision=precision)
    seen: dict[str, set] = {"vae": set(), "unet": set(), "compressor": set()}
    handles = []
    for name in seen:
        for module in getattr(codec, name).modules():
            if isinstance(module, torch.nn.Conv2d):
                handles.append(module.register_forward_hook(lambda m, i, o, name=name: seen[name].add(o.dtype)))
    try:
        data = codec.compress(photo, quality=1)
        codec.decompress(data, steps=1)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_bfloat16_runs_the_autoencoder_and_unet_in_it_and_the_compressor_in_float32(codec, photo):
    seen = _dtypes_seen(codec, "bfloat16", photo)
    assert seen["vae"] == {torch.bfloat16} and seen["unet"] == {torch.bfloat16}
    assert torch.bfloat16 not in seen["compressor"]  # float32, and float64 for the exact entropy networks
    seen = _dtypes_seen(codec, "float32", photo)
    assert seen["vae"] == seen["unet"] == {torch.float32} and torch.bfloat16 not in seen["compressor"]


def test_a_bfloat16_file_decodes_in_float32_and_back(codec, photo):
    """The bitstream does not depend on the precision that decodes it: files written in either
    decode in the other (the entropy decoding is exact), to images close to each other."""
    images = {}
    for enc in ("float32", "bfloat16"):
        codec.compute = ComputeConfig(precision=enc)
        data = codec.compress(photo, quality=2)
        for dec in ("float32", "bfloat16"):
            codec.compute = ComputeConfig(precision=dec)
            images[enc, dec] = np.asarray(codec.decompress(data), dtype=np.float64)
    for enc in ("float32", "bfloat16"):
        a, b = images[enc, "float32"], images[enc, "bfloat16"]
        psnr = 10 * np.log10(255**2 / max(np.mean((a - b) ** 2), 1e-12))
        assert psnr > 30, psnr


def test_the_cli_and_eval_take_a_precision(tiny_codec_folder, tmp_path, photo):
    from PIL import Image

    from osdiff.cli import main
    from osdiff.evaluation.codecs import make_codec

    src = tmp_path / "a.png"
    Image.fromarray(photo).save(src)
    assert main(["compress", str(src), "-o", str(tmp_path / "a.osd"), "-m", str(tiny_codec_folder), "--precision", "bfloat16"]) == 0
    assert main(["decompress", str(tmp_path / "a.osd"), "-o", str(tmp_path / "b.png"), "-m", str(tiny_codec_folder),
                 "--precision", "float32"]) == 0
    with pytest.raises(SystemExit):
        main(["compress", str(src), "-o", str(tmp_path / "c.osd"), "--precision", "fp16"])
    assert not (tmp_path / "c.osd").exists()

    bf16 = make_codec("osdiff-tiny:precision=bfloat16", str(tiny_codec_folder))
    f32 = make_codec("osdiff-tiny:steps=0:precision=float32", str(tiny_codec_folder))
    assert bf16.name == "osdiff-tiny:precision=bfloat16" and bf16.identity.endswith(" bfloat16")
    assert f32.name == "osdiff-tiny:steps=0:precision=float32" and f32.identity.endswith(" steps=0")
    for bad in ("osdiff-tiny:precision=fp16", "avif:precision=float32", "osdiff-tiny:speed=1"):
        with pytest.raises(OSDiffError):
            make_codec(bad, str(tiny_codec_folder))


def test_auto_is_the_default():
    assert ComputeConfig().precision == "auto"


def _onednn_bf16() -> bool:
    from osdiff.models.fused_conv import onednn_bf16

    return onednn_bf16()


@pytest.mark.skipif(not _onednn_bf16(), reason="oneDNN has no bfloat16 convolutions on this CPU (AVX2 only)")
def test_fused_taesd_blocks_match_the_plain_modules_in_bfloat16(monkeypatch):
    """osdiff.models.fused_conv: the one-call convolution + ReLU (+ residual) that TAESD blocks use
    in bfloat16 inference gives the plain modules' result to bfloat16 rounding, and is closer to
    float32 than they are; with gradients on, or in float32, the plain modules run."""
    from osdiff.models import fused_conv, taesd

    torch.manual_seed(0)
    block = taesd.Block(16, 32).eval().to(memory_format=torch.channels_last)  # a 1x1 skip (widths differ)
    x = torch.randn(1, 16, 24, 20).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = block(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fused_conv.fusable(x)
            fused = block(x).float()
            monkeypatch.setattr(taesd, "fusable", lambda x: False)
            plain = block(x).float()
    assert (fused - plain).abs().max() <= 0.02 * exact.abs().max()
    assert (fused - exact).abs().mean() <= (plain - exact).abs().mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_conv.fusable(x.requires_grad_())  # training: autograd needs the plain ops
    assert not fused_conv.fusable(x.detach())  # no autocast: float32


def test_conformance_decodes_in_float32_whatever_the_pipeline_says(monkeypatch):
    """The vectors were recorded in float32, so a pipeline set to bfloat16 (or 'auto' on a CPU
    with it) is checked in float32, and keeps its own setting afterwards."""
    import osdiff
    from osdiff.conformance import check_vector, vector_files

    pipe = osdiff.load("osdiff-tiny")
    pipe.compute = ComputeConfig(precision="bfloat16")
    seen = set()
    for module in pipe.vae.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    result = check_vector(pipe, vector_files("osdiff-tiny")[0])
    assert result.passed, result.line()
    assert seen == {torch.float32} and pipe.compute.precision == "bfloat16"
