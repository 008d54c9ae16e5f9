"""`osdiff bench` smoke tests on tiny models (no timing is asserted)."""
from __future__ import annotations

import json

from osdiff.cli import main


def test_bench_cli_writes_every_field(tmp_path, tiny_codec_folder, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", str(tiny_codec_folder), "--size", "40x56", "--steps", "1,3",
                 "--repeat", "2", "--warmup", "0", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "decode.unet_step" in table and "measured x" in table
    data = json.loads(out.read_text())
    for key in ("model", "device", "dtype", "size", "encode", "decode", "decode_total", "ratio_measured",
                "ratio_ideal", "peak_memory_mb", "bits_per_pixel", "threads", "torch_version"):
        assert key in data, key
    assert set(data["encode"]) == {"autoencoder_encode", "analysis", "entropy_encode", "total"}
    assert set(data["decode"]) == {"entropy_decode", "synthesis", "unet_step", "autoencoder_decode"}
    assert set(data["decode_total"]) == {"1", "3"}
    for timing in data["decode"].values():
        assert {"median_s", "min_s", "max_s", "iqr_s", "repeats"} <= set(timing) and timing["repeats"] == 2
    assert data["ratio_measured"]["1"] == 1.0 and data["ratio_ideal"]["3"] > 1.0
    assert set(data["peak_memory_mb"]) == {"encode", "decode_1_steps", "decode_3_steps"}


def test_bench_counts_unet_calls(tiny_codec, monkeypatch):
    from osdiff.benchmark import benchmark

    calls = []
    original = tiny_codec.unet.forward
    monkeypatch.setattr(tiny_codec.unet, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    benchmark(tiny_codec, (40, 56), [1, 4], repeat=1, warmup=0)
    # compress: 0 calls; unet_step component: 1; each decode is timed once and run once more
    # for peak memory: 2 x (1 + 4)
    assert len(calls) == 1 + 2 * (1 + 4)


def test_bench_bad_arguments(capsys):
    assert main(["bench", "--size", "big", "--steps", "1"]) == 1
    assert "--size" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda:0", "--size", "8x8"]) == 1
        assert "no CUDA device" in capsys.readouterr().err


def test_sd21_architecture_shapes():
    from osdiff.build import build_sd21_architecture

    codec = build_sd21_architecture()
    assert list(codec.unet.config.block_out_channels) == [320, 640, 1280, 1280]
    assert codec.vae.config.scaling_factor == 0.18215
    assert codec.conditioning.embedding.shape == (1, 77, 1024)
    assert codec.compressor.config.code_channels == 320
