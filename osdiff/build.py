"""Build codecs from parts: the tiny default architecture, or Stable Diffusion 2.1 from a
local diffusers folder (vae/, unet/, text_encoder/, tokenizer/, scheduler/)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetXSAdapter, DDIMScheduler, UNet2DConditionModel, UNetControlNetXSModel

from .config import CompressorArchitecture, DecodingConfig, TinyArchitecture, to_dict
from .errors import OSDiffError
from .models.autoencoder import TinyAutoencoder
from .models.control import ControlledUNet
from .models.taesd import TAESDAutoencoder
from .models.compressor import LatentCompressor
from .models.conditioning import ConditioningEmbedding
from .codec_pipeline import ImageCodecPipeline
from .pipeline import OSDiffPipeline

# ELIC's sizes (N=192, M=320, groups 16/16/32/64/192) for the SD latent.
SD_COMPRESSOR = CompressorArchitecture(
    hidden_channels=192, code_channels=320, groups=(16, 16, 32, 64, 192),
    analysis_downsamples=2, hyper_downsamples=2, num_quality_levels=4,
)


def sd_noise_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """SD's training schedule: 1000 steps, betas from 0.00085 to 0.012 (scaled linear)."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type,
    )


def add_control(unet: UNet2DConditionModel, size_ratio: float) -> UNetControlNetXSModel:
    """Fuse `unet` with a new ControlNet-XS adapter that takes a latent-resolution hint
    (the latent's channels, no downsampling in its conditioning embedding); connections start
    at zero. A `ControlledUNet`: diffusers' model for any latent channel count."""
    adapter = ControlNetXSAdapter.from_unet(
        unet, size_ratio=size_ratio, conditioning_channels=unet.config.in_channels,
        conditioning_embedding_out_channels=(16,),
    )
    return ControlledUNet.from_unet(unet, adapter)


def compressor_from(arch: CompressorArchitecture) -> LatentCompressor:
    kwargs = to_dict(arch)
    kwargs["groups"] = tuple(kwargs["groups"])
    return LatentCompressor(**kwargs)


def tiny_unet(arch: TinyArchitecture) -> UNet2DConditionModel:
    """The tiny denoiser: an SD-style UNet2DConditionModel at small widths (2 layers per
    block, as ControlNet-XS requires), attention only at the lowest resolution."""
    return UNet2DConditionModel(
        sample_size=64, in_channels=arch.compressor.latent_channels, out_channels=arch.compressor.latent_channels,
        block_out_channels=arch.unet_block_out_channels, layers_per_block=2,
        down_block_types=arch.unet_down_block_types, up_block_types=arch.unet_up_block_types,
        cross_attention_dim=arch.cross_attention_dim,
        attention_head_dim=max(1, arch.unet_block_out_channels[-1] // arch.unet_attention_head_dim),
        use_linear_projection=True, norm_num_groups=32,
    )


def tiny_autoencoder(arch: TinyArchitecture) -> TinyAutoencoder | TAESDAutoencoder:
    """The tiny model's autoencoder with fresh weights: ours ("own"), or the TAEF2 layout with the
    slim student decoder ("taef2"; the pretrained weights come from the decoder stage)."""
    if arch.autoencoder == "taef2":
        return TAESDAutoencoder(
            latent_channels=arch.compressor.latent_channels, midblock_gn=True,
            decoder_channels=arch.student_decoder_channels, decoder_blocks=arch.student_decoder_blocks,
            decoder_trunk=arch.student_decoder_trunk, decoder_trunk_layers=arch.student_decoder_trunk_layers,
            encoder_channels=tuple(arch.student_encoder_channels) or None, encoder_blocks=arch.student_encoder_blocks,
            encoder_tail=arch.student_encoder_tail,
        )
    return TinyAutoencoder(
        latent_channels=arch.compressor.latent_channels,
        encoder_channels=arch.autoencoder_encoder_channels,
        decoder_channels=arch.autoencoder_decoder_channels,
        num_blocks=arch.autoencoder_blocks,
    )


def build_tiny(
    arch: TinyArchitecture = TinyArchitecture(),
    decoding: DecodingConfig = DecodingConfig(),
    name: str = "osdiff-tiny",
    seed: int = 0,
) -> OSDiffPipeline:
    """The default architecture with freshly initialised weights (reproducible by `seed`)."""
    torch.manual_seed(seed)
    unet = tiny_unet(arch)
    vae = tiny_autoencoder(arch)
    return OSDiffPipeline(
        vae=vae,
        compressor=compressor_from(arch.compressor),
        unet=add_control(unet, arch.control_size_ratio),
        conditioning=ConditioningEmbedding(num_tokens=arch.conditioning_tokens, dim=arch.cross_attention_dim),
        scheduler=sd_noise_scheduler(),
        model_name=name,
        **decoding.pipeline_config(),
    )


def from_stable_diffusion(
    folder: str | os.PathLike,
    compressor: CompressorArchitecture = SD_COMPRESSOR,
    decoding: DecodingConfig = DecodingConfig(),
    control_size_ratio: float = 0.2,
    name: str = "osdiff-sd21",
    torch_dtype: torch.dtype | None = None,
) -> OSDiffPipeline:
    """A new codec around a local Stable Diffusion 2.x diffusers folder, fully offline.

    The VAE and UNet are loaded as they are; the empty-prompt text embedding is computed once
    here with the folder's text encoder and kept in the `conditioning` component; the
    compressor and the ControlNet-XS adapter are new (train them with `osdiff train`).
    """
    folder = Path(folder)
    missing = [sub for sub in ("vae", "unet", "text_encoder", "tokenizer", "scheduler") if not (folder / sub).is_dir()]
    if missing:
        raise OSDiffError(f"{folder}: not a Stable Diffusion diffusers folder (missing {', '.join(missing)}/)")
    load = dict(local_files_only=True, dtype=torch_dtype)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **load)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **load)
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    return OSDiffPipeline(
        vae=vae,
        compressor=compressor_from(compressor),
        unet=add_control(unet, control_size_ratio),
        conditioning=ConditioningEmbedding.from_text_encoder(folder),
        scheduler=scheduler,
        model_name=name,
        **decoding.pipeline_config(),
    )


def save_for_shipping(pipe: ImageCodecPipeline, folder: str | os.PathLike) -> None:
    """Save with weights stored as float16 (half the size). The entropy tables are rebuilt
    from the float16-rounded weights first, so what is saved is exactly what loads."""
    pipe.to(torch.float16).to(torch.float32)
    getattr(pipe, pipe.entropy_coder).update(force=True)
    pipe._model_hash = None
    pipe.to(torch.float16).save_pretrained(folder)
    pipe.to(torch.float32)


def build_sd21_architecture(compressor: CompressorArchitecture = SD_COMPRESSOR) -> OSDiffPipeline:
    """Stable Diffusion 2.1 base's real VAE and UNet architectures (from their configs) with
    random weights, plus the ELIC-sized compressor and a 0.2 ControlNet-XS adapter. For
    timing without the 5 GB of weights: speed does not depend on weight values."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, norm_num_groups=32, sample_size=768, scaling_factor=0.18215,
    )
    unet = UNet2DConditionModel(
        sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
    )
    conditioning = ConditioningEmbedding(num_tokens=77, dim=1024)
    conditioning.embedding.data.normal_()
    return OSDiffPipeline(
        vae=vae, compressor=compressor_from(compressor), unet=add_control(unet, 0.2),
        conditioning=conditioning, scheduler=sd_noise_scheduler(), model_name="sd21-arch",
    )
