"""Training on two CPU processes (torchrun, gloo): every stage trains data-parallel with the
weights identical on both processes, each process sees other images, only process 0 writes, and
a run resumes on another number of processes."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from osdiff.config import BaselineArchitecture, CompressorArchitecture, TinyArchitecture
from osdiff.training.config import (AutoencoderStage, BaselineStage, CodecStage, DataConfig, DecoderStage, DenoiserStage,
                                    LossConfig, TrainConfig)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").is_file(),
                                reason="torchrun is not installed")


def _plain(value):
    """asdict output YAML can hold (tuples as lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _train(config: dict | TrainConfig, folder: Path, processes: int, *args: str) -> subprocess.CompletedProcess:
    """`osdiff train` on `processes` CPU processes (torchrun when more than one)."""
    data = _plain(dataclasses.asdict(config)) if isinstance(config, TrainConfig) else config
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    launcher = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(processes), "--standalone", "-m"]
    command = [*(launcher if processes > 1 else [sys.executable, "-m"]), "osdiff.cli", "train", "--config", str(path),
               "--device", "cpu", *args]
    # TMPDIR: torchrun's log folders stay in the test's folder, not in /tmp
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TMPDIR": str(folder)}
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _check_two_processes(out: Path, stage: str, steps: int) -> None:
    """Stage `stage` ("<i>-<name>") ran `steps` steps on 2 processes with equal weights and
    other images per process, and one process logged."""
    state = torch.load(out / "stages" / stage / "ckpt.pt", map_location="cpu", weights_only=False)
    assert state["world_size"] == 2 and state["step"] == steps
    weights, batches = state["ranks"]["weights"], state["ranks"]["last_batch"]
    assert len(weights) == 2 and weights[0] == weights[1] and weights[0] != 0
    assert len(batches) == 2 and batches[0] != batches[1]
    assert [int(r["step"]) for r in _rows(out / f"log-{stage}.csv")] == list(range(steps))


def _config(out: Path, folder: Path, **kwargs) -> TrainConfig:
    kwargs = {"val_every": 0, **kwargs}
    return TrainConfig(output_dir=str(out), threads=1, checkpoint_minutes=1000, log_every=1, device="cpu",
                       data=DataConfig(train_folders=[str(folder)], val_folders=[str(folder)], max_side=128), **kwargs)


def test_taef2_stages_on_two_processes_then_resumed_on_one(tmp_path, image_folder):
    """decoder, denoiser and codec on 2 processes (stopped inside the codec stage), then the
    same run finished by one process."""
    arch = TinyArchitecture(
        autoencoder="taef2", student_decoder_channels=(16, 8, 8, 8), student_decoder_blocks=(1, 1, 1, 1),
        unet_block_out_channels=(32, 32), cross_attention_dim=32, unet_attention_head_dim=16, control_size_ratio=0.25,
        compressor=CompressorArchitecture(latent_channels=32, hidden_channels=16, code_channels=16, groups=(4, 4, 8),
                                          analysis_downsamples=1, hyper_downsamples=1),
    )
    out = tmp_path / "run"
    cfg = _config(out, image_folder, tiny=arch,
                  losses=LossConfig(rate_lambdas=[0.5, 1.0, 2.0, 4.0], adversarial_start=0, perceptual=0.0,
                                    decoder_features=0.0, adversarial=0.1),
                  stages=[DecoderStage(decoder_target="photo", steps=2, batch_size=1, crop=64, warmup_steps=1),
                          DenoiserStage(steps=2, batch_size=1, crop=64, warmup_steps=1),
                          CodecStage(steps=3, batch_size=1, crop=64, warmup_steps=1)])
    two = _train(cfg, tmp_path, 2, "--max-steps", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "stopped early" in two.stdout and two.stdout.count("stopped early") == 1  # one process prints
    assert json.loads((out / "progress.json").read_text()) == {"done": [0, 1], "world_size": 2}
    for stage in ("0-decoder", "1-denoiser", "2-codec"):
        _check_two_processes(out, stage, 2)
    assert (out / "stages" / "1-denoiser" / "out" / "unet" / "config.json").is_file()

    one = _train(cfg, tmp_path, 1)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "trained on 2 process(es) so far, continuing on 1" in one.stdout
    state = torch.load(out / "stages" / "2-codec" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 3 and state["world_size"] == 1
    assert [int(r["step"]) for r in _rows(out / "log-2-codec.csv")] == [0, 1, 2]
    assert json.loads((out / "progress.json").read_text()) == {"done": [0, 1, 2], "world_size": 1}
    assert (out / "model" / "model_index.json").is_file()


def test_autoencoder_and_baseline_stages_on_two_processes(tmp_path, image_folder):
    """Our autoencoder (own weights, encode/decode methods) and a HiFiC-style baseline (rates,
    aux loss, discriminators) on 2 processes, validation written once."""
    small = TinyArchitecture(autoencoder_encoder_channels=(8, 16, 16, 16), autoencoder_decoder_channels=(16, 16, 8, 8),
                             autoencoder_blocks=1)
    auto = _config(tmp_path / "auto", image_folder, tiny=small, val_every=2,
                   stages=[AutoencoderStage(steps=2, batch_size=1, crop=64, warmup_steps=1)])
    result = _train(auto, tmp_path, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_two_processes(tmp_path / "auto", "0-autoencoder", 2)
    assert [int(r["step"]) for r in _rows(tmp_path / "auto" / "val-0-autoencoder.csv")] == [2]
    assert (tmp_path / "auto" / "stages" / "0-autoencoder" / "out" / "vae" / "config.json").is_file()

    arch = BaselineArchitecture("mean-scale-hyperprior", N=8, M=16, num_rates=2, discriminator_channels=(8, 16))
    hific = _config(tmp_path / "hific", image_folder, model="baseline", model_name="baseline-test", baseline=arch,
                    losses=LossConfig(rate_lambdas=[10.0, 100.0], adversarial_start=0, perceptual=0.0, adversarial=0.1),
                    stages=[BaselineStage(steps=2, batch_size=1, crop=64, warmup_steps=1)])
    result = _train(hific, tmp_path, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_two_processes(tmp_path / "hific", "0-baseline", 2)
    assert (tmp_path / "hific" / "model" / "model_index.json").is_file()


def test_official_stage_on_two_processes(tmp_path, sd_folder):
    """The paper's model (frozen tiny SD, LFGCM + CDDM + UNet-feature discriminator) on 2 processes."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        pixels = torch.rand(160, 144, 3, generator=torch.Generator().manual_seed(i))
        Image.fromarray((pixels * 255).to(torch.uint8).numpy()).save(folder / f"{i}.png")
    base = tmp_path / "sd"
    shutil.copytree(sd_folder, base)
    sched = base / "scheduler" / "scheduler_config.json"
    sched.write_text(sched.read_text().replace("v_prediction", "epsilon"))
    config = {
        "model": "official", "base_model": str(base), "official_config": str(ROOT / "tests" / "fixtures" / "official_tiny" / "osdiff_tiny.yaml"),
        "output_dir": str(tmp_path / "run"), "threads": 1, "val_every": 0, "log_every": 1, "checkpoint_minutes": 1000,
        "data": {"train_folders": [str(folder)], "val_folders": [str(folder)], "max_val_images": 1},
        "stages": [{"name": "official", "steps": 2, "batch_size": 1, "crop": 128, "rate_lambdas": [1.0], "warmup_steps": 1}],
    }
    result = _train(config, tmp_path, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_two_processes(tmp_path / "run", "0-official", 2)
    assert (tmp_path / "run" / "official_lambda.ckpt").is_file()
