"""Fixtures: tiny random-weight models of the real architectures, built by the tests.

`sd_folder` is a Stable-Diffusion-2.1-shaped diffusers folder at tiny widths (AutoencoderKL,
UNet2DConditionModel with SD 2.1's block types and linear projections, CLIP text encoder and
tokenizer, scheduler), saved with `save_pretrained`; `sd_codec` is built from it through
`osdiff.build.from_stable_diffusion` - the code path a user with real SD 2.1 weights takes -
then saved and loaded back with `osdiff.load`.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "images"


def make_sd_folder(root: Path) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=0.18215,
    ).save_pretrained(root / "vae")
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4, 4), cross_attention_dim=32, use_linear_projection=True,
        norm_num_groups=8, upcast_attention=True,
    ).save_pretrained(root / "unet")
    tok_dir = root / "tokenizer"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "!</w>": 3}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), pad_token="!", model_max_length=8).save_pretrained(tok_dir)
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=4, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=8, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        )
    ).save_pretrained(root / "text_encoder")
    DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction",
    ).save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory) -> Path:
    return make_sd_folder(tmp_path_factory.mktemp("sd21-tiny"))


@pytest.fixture(scope="session")
def sd_codec_folder(sd_folder, tmp_path_factory) -> Path:
    from osdiff.build import from_stable_diffusion
    from osdiff.config import CompressorArchitecture

    arch = CompressorArchitecture(hidden_channels=32, code_channels=32, groups=(4, 4, 8, 16), hyper_downsamples=1)
    pipe = from_stable_diffusion(sd_folder, compressor=arch, name="osdiff-sd21-test")
    pipe.compressor.update(force=True)
    out = tmp_path_factory.mktemp("osdiff-sd21-test")
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sd_codec(sd_codec_folder):
    import osdiff

    return osdiff.load(sd_codec_folder)


@pytest.fixture(scope="session")
def tiny_codec_folder(tmp_path_factory) -> Path:
    """Our own default architecture at reduced widths, saved as a model folder."""
    from osdiff.build import build_tiny, save_for_shipping
    from osdiff.config import CompressorArchitecture, TinyArchitecture

    arch = TinyArchitecture(
        unet_block_out_channels=(32, 32), cross_attention_dim=32, unet_attention_head_dim=16,
        compressor=CompressorArchitecture(hidden_channels=32, code_channels=32, groups=(4, 4, 8, 16)),
    )
    out = tmp_path_factory.mktemp("tiny-codec")
    save_for_shipping(build_tiny(arch, name="tiny-test"), out)
    return out


@pytest.fixture(scope="session")
def tiny_codec(tiny_codec_folder):
    import osdiff

    return osdiff.load(tiny_codec_folder)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """Three noisy synthetic 128x96 training images."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("train-images")
    rng = np.random.default_rng(0)
    for i in range(3):
        y, x = np.mgrid[0:96, 0:128]
        img = np.stack([(x * (i + 1)) % 256, (y * 3) % 256, ((x + y) * 2) % 256], -1).astype(np.float64)
        img += rng.normal(0, 8, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def photo() -> np.ndarray:
    """A smooth synthetic 'photo' (H=40, W=56, RGB uint8) with edges and gradients."""
    y, x = np.mgrid[0:40, 0:56]
    img = np.stack([x * 4, y * 6, (x + y) * 2], axis=-1) % 256
    img[10:25, 20:40] = [200, 30, 60]
    return img.astype(np.uint8)


def shared_photo() -> Path | None:
    if not SHARED_IMAGES.is_dir():
        return None
    files = sorted((SHARED_IMAGES / "cbsd68").glob("*.png"))
    return files[0] if files else None
