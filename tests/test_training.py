"""Training on a tiny config: losses fall, both players get gradients, resume is exact."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from osdiff.config import CompressorArchitecture, TinyArchitecture
from osdiff.errors import OSDiffError
from osdiff.training.config import AutoencoderStage, CodecStage, DataConfig, DenoiserStage, LossConfig, StageConfig, TrainConfig, load_config
from osdiff.training.trainer import Trainer

SMALL = TinyArchitecture(
    autoencoder_encoder_channels=(8, 16, 16, 16), autoencoder_decoder_channels=(16, 16, 8, 8), autoencoder_blocks=1,
    unet_block_out_channels=(32, 32), cross_attention_dim=32, unet_attention_head_dim=16, control_size_ratio=0.25,
    compressor=CompressorArchitecture(hidden_channels=16, code_channels=16, groups=(4, 4, 8)),
)


def make_config(out: Path, folder: Path, stages: list[StageConfig], **losses) -> TrainConfig:
    return TrainConfig(
        output_dir=str(out), threads=2, checkpoint_minutes=1000, log_every=1, tiny=SMALL,
        data=DataConfig(train_folders=[str(folder)], val_folders=[str(folder)], max_side=128),
        losses=LossConfig(rate_lambdas=[0.5, 1.0, 2.0, 4.0], adversarial_start=0, **losses),
        stages=stages,
    )


def _log(out: Path, stage: str, kind: str = "log") -> list[dict]:
    import csv

    with open(out / f"{kind}-{stage}.csv") as f:
        return list(csv.DictReader(f))


def test_autoencoder_stage_reduces_loss(tmp_path, image_folder):
    cfg = make_config(tmp_path / "run", image_folder, [AutoencoderStage(steps=30, batch_size=4, crop=64, lr=3e-3, warmup_steps=1)])
    Trainer(cfg).run()
    rows = _log(tmp_path / "run", "0-autoencoder")
    first = np.mean([float(r["loss"]) for r in rows[:5]])
    last = np.mean([float(r["loss"]) for r in rows[-5:]])
    assert last < 0.8 * first
    assert (tmp_path / "run" / "stages" / "0-autoencoder" / "out" / "vae" / "config.json").is_file()
    val = _log(tmp_path / "run", "0-autoencoder", kind="val")
    assert [int(r["step"]) for r in val] == [30] and 5 < float(val[0]["psnr"]) < 60


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory, image_folder) -> Path:
    """A run whose autoencoder and denoiser stages are done (few steps)."""
    out = tmp_path_factory.mktemp("pre")
    stages = [
        AutoencoderStage(steps=3, batch_size=2, crop=64, warmup_steps=1),
        DenoiserStage(steps=3, batch_size=2, crop=64, warmup_steps=1),
    ]
    Trainer(make_config(out, image_folder, stages)).run()
    return out


def _codec_config(src: Path, dst: Path, folder: Path, steps: int) -> TrainConfig:
    import shutil

    shutil.copytree(src, dst)
    stages = [
        AutoencoderStage(steps=3, batch_size=2, crop=64, warmup_steps=1),
        DenoiserStage(steps=3, batch_size=2, crop=64, warmup_steps=1),
        CodecStage(steps=steps, batch_size=2, crop=64, lr=1e-3, warmup_steps=1),
    ]
    return make_config(dst, folder, stages, adversarial=0.1)


def test_codec_stage_gradients_reach_generator_and_discriminator(tmp_path, pretrained_run, image_folder, monkeypatch):
    cfg = _codec_config(pretrained_run, tmp_path / "run", image_folder, steps=1)
    seen = {}
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"]]
        key = "disc" if self.param_groups[0]["betas"][0] == 0.5 else "main"
        seen[key] = sum(float(g.abs().sum()) for g in grads if g is not None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    Trainer(cfg).run()
    assert seen["main"] > 0 and seen["disc"] > 0
    row = _log(tmp_path / "run", "2-codec")[0]
    assert float(row["adv_g"]) > 0 and float(row["adv_d"]) > 0 and float(row["bpp"]) > 0
    assert (tmp_path / "run" / "model" / "model_index.json").is_file()


def test_codec_stage_pixel_terms_train_the_step_and_resume(tmp_path, pretrained_run, image_folder, monkeypatch):
    """detail, colour and pixel_adversarial: the pixel discriminator learns, its state is
    checkpointed (a stopped run resumes), and validation logs the step's and the hint's detail
    retention and the step's local colour error."""
    cfg = _codec_config(pretrained_run, tmp_path / "run", image_folder, steps=2)
    cfg = replace(cfg, val_every=1, losses=replace(cfg.losses, adversarial=0.0, detail=0.5, detail_window=8, pixel_adversarial=0.1,
                                                  colour=10.0))
    before = {}
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        before.setdefault(len(before), sum(float(p.grad.abs().sum()) for g in self.param_groups for p in g["params"] if p.grad is not None))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    assert Trainer(cfg).run(max_steps=1) is None
    state = torch.load(tmp_path / "run" / "stages" / "2-codec" / "ckpt.pt", weights_only=False)
    assert "pixel_discriminator" in state["modules"] and "pixel_disc" in state["optimizers"]
    assert Trainer(cfg).run() is not None
    assert all(v > 0 for v in before.values()) and len(before) >= 3  # main, (latent disc), pixel disc
    rows = _log(tmp_path / "run", "2-codec")
    assert [int(r["step"]) for r in rows] == [0, 1]
    assert all(float(r["detail"]) > 0 and float(r["pixel_adv_g"]) > 0 and float(r["pixel_adv_d"]) > 0 for r in rows)
    assert all(float(r["colour"]) > 0 for r in rows)
    val = _log(tmp_path / "run", "2-codec", kind="val")[-1]
    assert all(float(val[f"detail_q{q}"]) > 0 and float(val[f"detail_hint_q{q}"]) > 0 for q in range(1, 5))
    assert all(float(val[f"delta_e_q{q}"]) > 0 for q in range(1, 5))


def test_local_detail_loss_is_zero_only_for_the_same_local_detail():
    from osdiff.training.losses import local_detail_loss

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=gen)
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    assert torch.allclose(local_detail_loss(x, x, 8), torch.zeros(2))
    assert (local_detail_loss(blurred, x, 8) > 0.5).all()  # smoothing costs
    assert (local_detail_loss(x, blurred, 8) > 0.5).all()  # and so does added texture
    # global detail can hide local loss: half the image sharper, half smoother
    mixed = torch.cat([x[..., :16] * 1.5, blurred[..., 16:]], dim=-1)
    assert (local_detail_loss(mixed, x, 8) > local_detail_loss(x * 1.01, x, 8)).all()


def test_codec_stage_reduces_loss(tmp_path, pretrained_run, image_folder):
    cfg = _codec_config(pretrained_run, tmp_path / "run", image_folder, steps=25)
    cfg = replace(cfg, losses=replace(cfg.losses, adversarial=0.0))
    Trainer(cfg).run()
    losses = [float(r["loss"]) for r in _log(tmp_path / "run", "2-codec")]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    val = _log(tmp_path / "run", "2-codec", kind="val")[-1]  # held-out crops, every level
    assert all(float(val[f"bpp_q{q}"]) > 0 and 3 < float(val[f"psnr_q{q}"]) < 60 for q in range(1, 5))
    denoiser = _log(tmp_path / "run", "1-denoiser", kind="val")[-1]
    assert all(0 < float(denoiser[f"eps_mse_t{t}"]) < 10 for t in (100, 500, 900))


def test_codec_stage_takes_no_step_above_unet_max_quality(tmp_path, pretrained_run, image_folder, monkeypatch):
    """Above decoding.unet_max_quality the model decodes the hint directly: training and
    validation take their losses and metrics on that decoding, and the model keeps the setting."""
    import osdiff
    from osdiff.models.control import ControlledUNet

    calls = []
    original = ControlledUNet.forward
    monkeypatch.setattr(ControlledUNet, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))

    def config(name: str, qualities: list[int] | None = None, val_every: int = 0):
        cfg = _codec_config(pretrained_run, tmp_path / name, image_folder, steps=1)
        stages = cfg.stages[:-1] + [replace(cfg.stages[-1], qualities=qualities)]
        return replace(cfg, val_every=val_every, stages=stages, decoding=replace(cfg.decoding, unet_max_quality=2))

    for qualities, steps in (([3, 4], 0), ([1, 2], 1)):  # training steps through the UNet only at levels 1-2
        calls.clear()
        Trainer(config(f"q{qualities[0]}", qualities)).run()
        assert len(calls) == steps, qualities
    Trainer(config("run", val_every=1)).run()
    val = _log(tmp_path / "run", "2-codec", kind="val")[-1]
    assert all(val[f"psnr_q{q}"] == val[f"psnr_hint_q{q}"] for q in (3, 4))
    assert all(val[f"psnr_q{q}"] != val[f"psnr_hint_q{q}"] for q in (1, 2))
    assert osdiff.load(tmp_path / "run" / "model").default_steps(3) == 0


def test_resume_is_exact(tmp_path, pretrained_run, image_folder, photo):
    import osdiff

    straight = _codec_config(pretrained_run, tmp_path / "a", image_folder, steps=4)
    Trainer(straight).run()
    chunked = _codec_config(pretrained_run, tmp_path / "b", image_folder, steps=4)
    assert Trainer(chunked).run(max_steps=2) is None  # stopped with a checkpoint
    assert Trainer(chunked).run() is not None  # a fresh trainer resumes
    a, b = osdiff.load(tmp_path / "a" / "model"), osdiff.load(tmp_path / "b" / "model")
    for name in ("compressor", "unet"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    data = a.compress(photo)
    assert data == b.compress(photo)
    assert np.array_equal(np.asarray(a.decompress(data)), np.asarray(b.decompress(data)))


def test_validation_does_not_change_training(tmp_path, pretrained_run, image_folder):
    import osdiff

    quiet = replace(_codec_config(pretrained_run, tmp_path / "a", image_folder, steps=3), val_every=0)
    Trainer(quiet).run()
    checked = replace(_codec_config(pretrained_run, tmp_path / "b", image_folder, steps=3), val_every=1)
    Trainer(checked).run()
    assert len(_log(tmp_path / "b", "2-codec", kind="val")) == 3 and not (tmp_path / "a" / "val-2-codec.csv").exists()
    a, b = osdiff.load(tmp_path / "a" / "model"), osdiff.load(tmp_path / "b" / "model")
    for name in ("compressor", "unet"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_second_codec_stage_fine_tunes_the_first(tmp_path, pretrained_run, image_folder):
    import osdiff

    cfg = _codec_config(pretrained_run, tmp_path / "run", image_folder, steps=2)
    Trainer(cfg).run()
    first = osdiff.load(tmp_path / "run" / "model").compressor.state_dict()
    wider = CodecStage(steps=1, batch_size=2, crop=64, lr=1e-9, lr_aux=1e-9, warmup_steps=1, rate_lambdas=[0.1, 1.0, 10.0, 100.0], level_balance=0.5)
    cfg = replace(cfg, stages=cfg.stages + [wider])
    Trainer(cfg).run()
    second = osdiff.load(tmp_path / "run" / "model").compressor.state_dict()
    # a tiny learning rate: the fine-tuned weights start from (and stay next to) the first stage's
    assert all(torch.allclose(first[k].float(), second[k].float(), atol=1e-4) for k in first if "_cdf" not in k and "_offset" not in k and "_length" not in k)
    assert len(_log(tmp_path / "run", "3-codec")) == 1


def test_config_files_load(tmp_path):
    root = Path(__file__).resolve().parents[1] / "configs"
    tiny = load_config(root / "tiny.yaml")
    assert [s.name for s in tiny.stages] == ["autoencoder", "autoencoder", "denoiser", "codec"]
    assert len(tiny.losses.rate_lambdas) == tiny.tiny.compressor.num_quality_levels
    sd = load_config(root / "sd21-controlnet-xs.yaml")
    assert sd.model == "sd21" and sd.compressor.code_channels == 320 and sd.compressor.groups == (16, 16, 32, 64, 192)
    for path in sorted(root.glob("*.yaml")):  # every shipped recipe is a valid config
        load_config(path)
    cpu = load_config(root / "tiny-v2-cpu.yaml")
    assert cpu.data.latent_cache and cpu.losses.latent_weighting == "decoder" and cpu.losses.perceptual == 0
    toml = tmp_path / "c.toml"
    toml.write_text('model = "tiny"\n[[stages]]\nname = "codec"\nsteps = 5\n')
    assert load_config(toml).stages[0].steps == 5
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [{name: codec, stepz: 3}]\n")
    with pytest.raises(OSDiffError, match="unknown keys"):
        load_config(bad)
    bad.write_text("losses: {latent_weighting: pixels}\nstages: [{name: codec}]\n")
    with pytest.raises(OSDiffError, match="latent_weighting"):
        load_config(bad)
    bad.write_text("stages: [{name: decoder, decoder_inputs: codec}]\n")
    with pytest.raises(OSDiffError, match="decoder_inputs 'codec' needs init_from"):
        load_config(bad)
    assert load_config(bad, init_from="model").stages[0].decoder_target == "teacher"  # sharp decoding of codec outputs
    bad.write_text("stages: [{name: decoder, decoder_inputs: codec, decoder_target: photo}]\n")
    assert load_config(bad, init_from="model").init_from == "model"  # as `osdiff train --init-from` gives it
    bad.write_text("data: {latent_cache: cache}\nstages: [{name: decoder, crop: 0, batch_size: 2}]\n")
    with pytest.raises(OSDiffError, match="crop 0"):
        load_config(bad)
    bad.write_text("stages: [{name: decoder, crop: 0, batch_size: 1}]\n")  # no latent cache
    with pytest.raises(OSDiffError, match="crop 0"):
        load_config(bad)


def test_conv_head_least_squares_recovers_a_linear_head_and_refuses_other_shapes():
    """The closed-form head fit (decoder_head_fit) finds the conv + pixel shuffle that made the
    targets, to float precision, from features of several sizes."""
    from torch import nn

    from osdiff.training.head_fit import ConvHeadLeastSquares

    torch.manual_seed(0)
    true, head = nn.Conv2d(8, 12, 3, padding=1), nn.Conv2d(8, 12, 3, padding=1)
    fit = ConvHeadLeastSquares(head, 2, positions=10**9)
    for h, w in ((10, 12), (7, 9), (12, 5)):
        features = torch.randn(1, 8, h, w)
        fit.add(features, nn.functional.pixel_shuffle(true(features), 2))
    fit.solve(ridge=1e-9)
    assert torch.allclose(head.weight, true.weight, atol=1e-5) and torch.allclose(head.bias, true.bias, atol=1e-5)
    with pytest.raises(ValueError, match="3 \\* 2"):
        ConvHeadLeastSquares(nn.Conv2d(8, 3, 3, padding=1), 2)
    with pytest.raises(ValueError, match="no samples"):
        ConvHeadLeastSquares(nn.Conv2d(8, 12, 3, padding=1), 2).solve()


def test_a_stop_signal_ends_the_run_after_the_step_with_a_checkpoint(tmp_path, pretrained_run, image_folder, monkeypatch):
    """SIGTERM (or SIGINT) during a step: the step finishes, a checkpoint is written, the loop
    returns and the caller's handler comes back; the run then resumes exactly."""
    import signal

    import osdiff
    from osdiff.training.run import TrainingRun

    straight = _codec_config(pretrained_run, tmp_path / "a", image_folder, steps=3)
    Trainer(straight).run()
    original_log, sent = TrainingRun.log, []

    def log_and_signal(self, row, kind="log"):
        original_log(self, row, kind)
        if kind == "log" and row.get("stage") == "2-codec" and not sent:
            sent.append(row["step"])
            signal.raise_signal(signal.SIGTERM)  # as `kill` does, mid-step (its log row is written)

    monkeypatch.setattr(TrainingRun, "log", log_and_signal)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a signal that escaped would end pytest: make it loud
    try:
        chunked = _codec_config(pretrained_run, tmp_path / "b", image_folder, steps=3)
        stopped = Trainer(chunked)
        assert stopped.run() is None and stopped.context.stopped_by == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the caller's handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sent == [0] and torch.load(tmp_path / "b" / "stages" / "2-codec" / "ckpt.pt", weights_only=False)["step"] == 1
    monkeypatch.setattr(TrainingRun, "log", original_log)
    assert Trainer(chunked).run() is not None
    a, b = osdiff.load(tmp_path / "a" / "model"), osdiff.load(tmp_path / "b" / "model")
    sa, sb = a.compressor.state_dict(), b.compressor.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_stop_signal_in_a_stages_last_step_holds_the_next_stage(tmp_path, pretrained_run, image_folder, monkeypatch):
    """A stage that finishes after a stop signal is recorded as done, and the run stops there
    (the next stage starts with the next run)."""
    import osdiff.training.trainer as trainer_module

    cfg = _codec_config(pretrained_run, tmp_path / "run", image_folder, steps=1)
    cfg = replace(cfg, stages=[*cfg.stages, cfg.stages[-1]])  # one more codec stage after it
    ran = []

    def finishes_after_a_signal(name):
        def train(run, index, stage):
            ran.append(index)
            run.stopped_by = "SIGTERM"  # as the loop records a signal in the stage's last step
            return True
        return train

    monkeypatch.setattr(trainer_module, "stage_trainer", finishes_after_a_signal)
    trainer = Trainer(cfg)
    assert trainer.run() is None and ran == [2]  # stages 0-1 came done with pretrained_run
    assert 2 in trainer.context.progress()["done"]


def test_a_resumed_run_that_logs_a_new_column_widens_its_csv(tmp_path):
    """Code updated between sessions may log a new column (e.g. a validation metric): the file
    keeps one header, old rows get an empty cell, no row is shifted."""
    from osdiff.training.files import append_row

    for row in ({"stage": "0-codec", "step": 100, "psnr": 20.0}, {"stage": "0-codec", "step": 200, "psnr": 21.0, "haarpsi": 0.6},
                {"stage": "0-codec", "step": 300, "psnr": 22.0}):
        append_row(tmp_path / "val-0-codec.csv", row)
    rows = _log(tmp_path, "0-codec", kind="val")
    assert [r["step"] for r in rows] == ["100", "200", "300"]
    assert [r["haarpsi"] for r in rows] == ["", "0.6", ""] and rows[2]["psnr"] == "22.0"


def test_export_a_running_and_a_finished_run(tmp_path, tiny_codec_folder, image_folder, capsys):
    """`osdiff export`: a running codec stage's checkpoint on its init_from model, then the
    finished model; an existing output or a folder that is not a run gets one line."""
    import osdiff
    from osdiff.cli import main
    from osdiff.config import CompressorArchitecture as Compressor

    arch = TinyArchitecture(unet_block_out_channels=(32, 32), cross_attention_dim=32, unet_attention_head_dim=16,
                            compressor=Compressor(hidden_channels=32, code_channels=32, groups=(4, 4, 8, 16)))
    run = tmp_path / "run"
    cfg = replace(make_config(run, image_folder, [CodecStage(steps=2, batch_size=1, crop=64, warmup_steps=1)]),
                  tiny=arch, init_from=str(tiny_codec_folder), val_every=0, threads=1)
    assert Trainer(cfg).run(max_steps=1) is None
    assert main(["export", str(run), "-o", str(tmp_path / "mid")]) == 0
    assert "(step 1)" in capsys.readouterr().out
    ckpt = torch.load(run / "stages" / "0-codec" / "ckpt.pt", map_location="cpu", weights_only=False)
    mid = osdiff.load(tmp_path / "mid")
    for name, value in ckpt["modules"]["compressor"].items():
        assert torch.equal(mid.compressor.state_dict()[name].float(), value.float())
    image, data = mid(np.zeros((64, 64, 3), np.uint8), quality=2)
    assert image.size == (64, 64) and len(data) > 0

    assert main(["export", str(run), "-o", str(tmp_path / "mid")]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["export", str(image_folder), "-o", str(tmp_path / "x")]) == 1
    assert "not a training run folder" in capsys.readouterr().err and not (tmp_path / "x").exists()

    assert Trainer(cfg).run() == run / "model"
    assert main(["export", str(run), "-o", str(tmp_path / "final")]) == 0
    assert "finished model" in capsys.readouterr().out
    assert (tmp_path / "final" / "model_index.json").read_text() == (run / "model" / "model_index.json").read_text()


def test_low_pass_mse_sees_colour_casts_not_texture():
    from osdiff.training.losses import low_pass_mse

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=gen)
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None]) % 2 * 0.2 - 0.1  # zero-mean per 16x16 block
    assert low_pass_mse(x + checker, x) < 1e-10 < low_pass_mse(x + torch.tensor([0.1, 0, 0]).view(1, 3, 1, 1), x)


def test_codec_stage_pixel_autocast_decodes_in_bfloat16_and_still_trains(tmp_path, pretrained_run, image_folder, monkeypatch):
    """pixel_autocast bf16: the training step's latent decoding (and perceptual loss) run under
    torch.autocast(bfloat16), with gradients; other values are refused with one line."""
    from osdiff.training.stages import codec as codec_stage

    cfg = _codec_config(pretrained_run, tmp_path / "run", image_folder, steps=1)
    cfg = replace(cfg, pixel_autocast="bf16", losses=replace(cfg.losses, colour=10.0))
    seen = []
    original = codec_stage.decode_latent

    def spy(vae, z):
        out = original(vae, z)
        seen.append((torch.is_autocast_enabled("cpu"), out.dtype, torch.is_grad_enabled()))
        return out

    monkeypatch.setattr(codec_stage, "decode_latent", spy)
    Trainer(cfg).run()
    assert (True, torch.bfloat16, True) in seen
    row = _log(tmp_path / "run", "2-codec")[0]
    assert float(row["colour"]) > 0 and float(row["loss"]) == float(row["loss"])  # finite, not NaN
    with pytest.raises(OSDiffError, match="pixel_autocast"):
        Trainer(replace(cfg, pixel_autocast="fp16")).run()
