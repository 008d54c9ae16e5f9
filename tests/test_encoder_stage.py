"""The student encoders (osdiff.models.taesd.slim_encoder, tail_encoder) and the stage that distils it
from TAEF2's encoder (osdiff.training.stages.encoder)."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from osdiff.models.taesd import TAESDAutoencoder


def test_slim_encoder_keeps_the_latent_grid_and_saves_its_shape(tmp_path):
    teacher = TAESDAutoencoder(decoder_channels=(8, 8, 8, 8), decoder_blocks=(1, 1, 0, 0))
    student = teacher.with_encoder((8, 16), (1, 2))
    assert student.slim_encoder and not teacher.slim_encoder
    x = torch.rand(2, 3, 40, 56) * 2 - 1
    assert student.encode(x).shape == teacher.encode(x).shape == (2, 32, 5, 7)
    for a, b in zip(student.decoder.state_dict().values(), teacher.decoder.state_dict().values()):
        assert torch.equal(a, b)  # the decoder is kept, the encoder is new
    assert sum(p.numel() for p in student.encoder.parameters()) < sum(p.numel() for p in teacher.encoder.parameters()) / 10
    student.save_pretrained(tmp_path / "vae")
    again = TAESDAutoencoder.from_pretrained(tmp_path / "vae")
    assert again.slim_encoder and list(again.config.encoder_blocks) == [1, 2]
    assert torch.equal(again.encode(x), student.encode(x))
    with pytest.raises(ValueError, match="slim encoder"):
        teacher.with_encoder((8,), (1,))


def test_tail_encoder_keeps_the_teachers_last_layers(tmp_path):
    """Fed the teacher's own 1/4-resolution features, the tail student's copied tail gives the
    teacher's latent exactly; only its head is new and cheap."""
    torch.manual_seed(0)
    teacher = TAESDAutoencoder(decoder_channels=(8, 8, 8, 8), decoder_blocks=(1, 1, 0, 0))
    student = teacher.with_encoder((16,), (2,), tail=True)
    assert student.slim_encoder and teacher.teacher_tail is None
    x = torch.rand(2, 3, 48, 64) * 2 - 1
    with torch.no_grad():
        features = teacher.encoder[:10]((x + 1) / 2)
        assert torch.allclose(student.teacher_tail(features), teacher.encode_raw(x), atol=1e-6)
        assert student.encode(x).shape == (2, 32, 6, 8)
        assert not torch.allclose(student.encode_raw(x), teacher.encode_raw(x), atol=1e-3)  # the head is random
    student.save_pretrained(tmp_path / "vae")
    again = TAESDAutoencoder.from_pretrained(tmp_path / "vae")
    assert again.config.encoder_tail and torch.equal(again.encode(x), student.encode(x))
    with pytest.raises(ValueError, match="tail encoder"):
        teacher.with_encoder((16, 16), (1, 1), tail=True)
    with pytest.raises(ValueError, match="teacher"):
        student.with_encoder((16,), (1,), tail=True)


def test_models_without_a_slim_encoder_keep_their_hash(tmp_path):
    """The new config keys are hash-neutral at the values older models had (read back as lists)."""
    from osdiff.codec_pipeline import _hashed_config

    vae = TAESDAutoencoder(decoder_channels=(8, 8, 8, 8))
    vae.save_pretrained(tmp_path / "vae")
    for config in (vae.config, TAESDAutoencoder.from_pretrained(tmp_path / "vae").config):
        hashed = _hashed_config(config, TAESDAutoencoder.hash_neutral_defaults)
        assert not {"encoder_channels", "encoder_blocks", "encoder_tail"} & set(hashed)
    slim = vae.with_encoder((8, 8))
    assert _hashed_config(slim.config, TAESDAutoencoder.hash_neutral_defaults)["encoder_channels"] == (8, 8)


def test_loss_mask_drops_margins_except_at_the_photos_edges():
    from osdiff.training.stages.encoder import loss_mask

    edges = torch.tensor([[False, False, False, False], [True, False, False, True]])
    mask = loss_mask(edges, (8, 8), 2)
    assert mask[0, 0].sum() == 16 and mask[0, 0, 2:6, 2:6].all()
    assert mask[1, 0, :6, 2:].all() and mask[1, 0, 6:].sum() == 0 and mask[1, 0, :, :2].sum() == 0


def test_crop_edges_match_the_crops(image_folder):
    from osdiff.training.data import find_images, load_images
    from osdiff.training.latents import LatentCropSampler

    images = load_images(find_images([str(image_folder)]), 128)  # 96x128 photos: latents 12x16
    latents = [torch.zeros(4, 12, 16) for _ in images]
    sampler = LatentCropSampler(images, latents, 64, 8, seed=3, stage=0)
    for step in range(5):
        for (k, y, x), (top, bottom, left, right) in zip(sampler._positions(step, None), sampler.edges(step).tolist()):
            assert (top, bottom, left, right) == (y == 0, y + 8 == 12, x == 0, x + 8 == 16)
    # maps at 1/4 resolution, cut beside the latent crops; a photo too small for the crops is
    # skipped, and the maps still line up with the photos given
    small = torch.zeros(4, 4, 4)
    sampler = LatentCropSampler([images[0][:32, :32], *images], [small, *latents], 64, 8, seed=3, stage=0)
    maps = [torch.full((1, 8, 8), -1.0)] + [torch.arange(24 * 32.0).view(1, 24, 32) + 1000 * i for i in range(len(images))]
    for step in range(3):
        for (k, y, x), cut in zip(sampler._positions(step, None), sampler.cut(maps, step, 2)):
            assert cut.shape == (1, 16, 16) and torch.equal(cut, maps[k + 1][:, 2 * y : 2 * y + 16, 2 * x : 2 * x + 16])
    whole = LatentCropSampler(images, latents, 96, 2, seed=3, stage=0)
    assert whole.edges(0)[:, :2].all()  # 96-pixel crops span the photos' height


@pytest.mark.parametrize("tail", [False, True], ids=["slim", "tail"])
def test_encoder_stage_distils_and_ships_the_codec_with_the_student(tmp_path, image_folder, tail):
    import osdiff
    from osdiff.build import save_for_shipping
    from osdiff.config import TinyArchitecture
    from osdiff.training.config import DataConfig, EncoderStage, LossConfig, TrainConfig
    from osdiff.training.trainer import Trainer

    arch, codec = _tiny_taef2_codec()
    save_for_shipping(codec, tmp_path / "base")

    out = tmp_path / "run"
    widths = dict(student_encoder_channels=(16,), student_encoder_blocks=(2,), student_encoder_tail=True) if tail else \
        dict(student_encoder_channels=(16, 16), student_encoder_blocks=(1, 1))
    student_arch = TinyArchitecture(**{**arch.__dict__, **widths})
    cfg = TrainConfig(
        output_dir=str(out), threads=2, checkpoint_minutes=1000, log_every=1, val_every=30, device="cpu",
        tiny=student_arch, init_from=str(tmp_path / "base"),
        data=DataConfig(train_folders=[str(image_folder)], val_folders=[str(image_folder)], max_side=128, max_val_images=2,
                        latent_cache=str(tmp_path / "cache")),
        losses=LossConfig(latent_weighting="decoder", encoder_pixel=0.1, encoder_features=0.5 if tail else 0.0),
        stages=[EncoderStage(steps=30, batch_size=4, crop=64, lr=3e-3, warmup_steps=1, encoder_margin=2)],
    )
    assert Trainer(cfg).run() == out / "model"
    with open(out / "log-0-encoder.csv") as f:
        rows = list(csv.DictReader(f))
    first = np.mean([float(r["latent_mse"]) for r in rows[:3]])
    last = np.mean([float(r["latent_mse"]) for r in rows[-3:]])
    assert last < 0.85 * first and "pixel_l1" in rows[0]
    if tail:  # the head also learns TAEF2's 1/4-resolution features, cached beside the latents
        features = [float(r["feature_nmse"]) for r in rows]
        assert np.mean(features[-3:]) < np.mean(features[:3])
        assert len(list((tmp_path / "cache").glob("latents-*.pt"))) == 2
    with open(out / "val-0-encoder.csv") as f:
        val = list(csv.DictReader(f))[-1]
    assert 0 < float(val["latent_nmse"]) < 10 and {"psnr_student", "psnr_teacher", "psnr_vs_teacher"} <= set(val)

    base, shipped = osdiff.load(tmp_path / "base"), osdiff.load(out / "model")
    assert shipped.vae.slim_encoder and not base.vae.slim_encoder
    for name in ("compressor", "unet"):  # only the encoder changed
        for a, b in zip(getattr(shipped, name).state_dict().values(), getattr(base, name).state_dict().values()):
            assert torch.equal(a.float(), b.float())
    assert torch.equal(shipped.vae.decoder[1].weight.float(), base.vae.decoder[1].weight.float())
    if tail:  # TAEF2's last layers stay frozen
        assert torch.equal(shipped.vae.encoder[-1].weight.float(), base.vae.encoder[-1].weight.float())
        assert torch.equal(shipped.vae.encoder[-2].pool[0].weight.float(), base.vae.encoder[-2].pool[0].weight.float())
    image, data = shipped(np.full((64, 64, 3), 120, np.uint8), quality=2)
    assert image.size == (64, 64) and len(data) > 0

    from osdiff.training.export import export_run  # the stage's checkpoint, as mid-run

    assert export_run(out, tmp_path / "exported", stage=0) == (tmp_path / "exported", 30)
    exported = osdiff.load(tmp_path / "exported")
    assert exported.vae.slim_encoder
    for a, b in zip(exported.vae.state_dict().values(), shipped.vae.state_dict().values()):
        assert torch.equal(a.float(), b.float())


def test_encoder_stage_refuses_a_config_it_cannot_run():
    from osdiff.errors import OSDiffError
    from osdiff.training.config import DataConfig, EncoderStage, TrainConfig

    cfg = TrainConfig(data=DataConfig(latent_cache="cache"))
    with pytest.raises(OSDiffError, match="student_encoder_channels"):
        EncoderStage(crop=64).check(cfg, "x.yaml")
    from osdiff.config import TinyArchitecture

    cfg = TrainConfig(data=DataConfig(latent_cache="cache"), tiny=TinyArchitecture(
        autoencoder="taef2", student_encoder_channels=(16, 16), student_encoder_tail=True))
    with pytest.raises(OSDiffError, match="1 width"):
        EncoderStage(crop=64).check(cfg, "x.yaml")


def test_codec_stage_trains_a_student_encoder_through_the_codec(tmp_path, image_folder):
    """train_encoder: the compressor codes the student's latents, the student's head learns
    (TAEF2's tail stays), the anchor to TAEF2's cached latents is logged; the model and a
    mid-run export carry the new encoder."""
    import osdiff
    from osdiff.build import save_for_shipping
    from osdiff.errors import OSDiffError
    from osdiff.training.config import CodecStage, DataConfig, LossConfig, TrainConfig
    from osdiff.training.export import export_run
    from osdiff.training.trainer import Trainer

    arch, codec = _tiny_taef2_codec()
    torch.manual_seed(0)
    codec.register_modules(vae=codec.vae.with_encoder((16,), (1,), tail=True))
    save_for_shipping(codec, tmp_path / "base")

    def config(**stage):
        return TrainConfig(
            output_dir=str(tmp_path / "run"), threads=2, checkpoint_minutes=1000, log_every=1, val_every=0, device="cpu",
            tiny=arch, init_from=str(tmp_path / "base"),
            data=DataConfig(train_folders=[str(image_folder)], val_folders=[str(image_folder)], max_side=128,
                            max_val_images=2, latent_cache=str(tmp_path / "cache")),
            losses=LossConfig(latent_weighting="decoder", latent_mse=0.25, hint_mse=0.5, encoder_anchor=1.0),
            stages=[CodecStage(steps=6, batch_size=2, crop=64, lr=1e-3, warmup_steps=1, train_unet=True, encoder_margin=2,
                               **stage)],
        )

    with pytest.raises(OSDiffError, match="train_encoder"):
        CodecStage(crop=64, train="gains", train_encoder=True).check(config(), "x.yaml")
    out = Trainer(config(train_encoder=True)).run()
    with open(tmp_path / "run" / "log-0-codec.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(float(r["encoder_anchor"]) > 0 for r in rows)
    base, trained = osdiff.load(tmp_path / "base"), osdiff.load(out)
    assert trained.vae.slim_encoder
    assert not torch.equal(trained.vae.encoder[1].weight.float(), base.vae.encoder[1].weight.float())  # the head learned
    assert torch.equal(trained.vae.encoder[-1].weight.float(), base.vae.encoder[-1].weight.float())  # the tail did not
    image, data = trained(np.full((64, 64, 3), 120, np.uint8), quality=2)
    assert image.size == (64, 64) and len(data) > 0
    assert export_run(tmp_path / "run", tmp_path / "exported", stage=0)[1] == 6
    exported = osdiff.load(tmp_path / "exported")
    assert torch.equal(exported.vae.encoder[1].weight.float(), trained.vae.encoder[1].weight.float())


def _tiny_taef2_codec():
    """(architecture, codec): a tiny TAEF2-layout codec whose encoder is TAEF2's (the teacher)."""
    from osdiff.build import build_tiny
    from osdiff.config import CompressorArchitecture, TinyArchitecture
    from osdiff.hub import WEIGHTS_DIR

    arch = TinyArchitecture(
        autoencoder="taef2", student_decoder_channels=(16, 8, 8, 8), student_decoder_blocks=(1, 1, 1, 1),
        unet_block_out_channels=(32, 32), cross_attention_dim=32, unet_attention_head_dim=16,
        compressor=CompressorArchitecture(latent_channels=32, hidden_channels=16, code_channels=16, groups=(4, 4, 8),
                                          analysis_downsamples=1, hyper_downsamples=1),
    )
    codec = build_tiny(arch, name="tiny-test")
    codec.vae.encoder.load_state_dict(TAESDAutoencoder.from_pretrained(WEIGHTS_DIR / "taef2" / "vae").encoder.state_dict())
    return arch, codec
