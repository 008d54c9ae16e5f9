"""OSDiffPipeline: the one-step diffusion codec as a diffusers pipeline.

    compress:   image -> pad (replicate, to `pad_multiple`) -> autoencoder encode -> latent z -> LatentCompressor.compress
                -> entropy-coded strings -> `.osd` bytes (header + strings + CRC32)
    decompress: `.osd` bytes -> strings -> LatentCompressor.decompress -> hint
                -> start latent at timestep t: the hint noised with fixed-seed noise
                   (decoding_start="hint"), or the fixed-seed noise alone ("noise", t = 999:
                   the official OSDiff procedure, hint only through the control module)
                -> one controlled-UNet step -> x0
                -> autoencoder decode -> crop -> image

The file format, padding, model hash and compute mode are shared with every codec
(osdiff.codec_pipeline.ImageCodecPipeline); this class holds the networks.

Components (each saved in its own subfolder by `save_pretrained`):
  vae           AutoencoderKL (SD) | AutoencoderTiny | TinyAutoencoder
  compressor    LatentCompressor (LFGCM)
  unet          UNetControlNetXSModel: the denoising UNet fused with its ControlNet-XS adapter
  conditioning  ConditioningEmbedding: the cached empty-prompt / learned text embedding
  scheduler     DDIMScheduler: the noise schedule (alphas) and prediction type
"""
from __future__ import annotations

from fractions import Fraction

import torch
from diffusers import DDIMScheduler, UNetControlNetXSModel
from torch import Tensor

from .codec_pipeline import DecodeResult, ImageCodecPipeline
from .config import DecodingConfig, Realism, check_realism, realism_as_config, realism_at
from .denoise import add_noise, ddim_timesteps, decoding_alpha_bar, decoding_x0_eps, fixed_noise
from .entropy.bitstream import OSDHeader
from .errors import OSDiffError
from .models.autoencoder import LATENT_DOWNSCALE, decode_latent, encode_latent
from .models.compressor import LatentCompressor
from .models.conditioning import ConditioningEmbedding
from .models.control import ControlledUNet  # noqa: F401  (model folders name it; diffusers needs it imported)
from .rate import level_index
from .tiling import run_tiled

__all__ = ["OSDiffPipeline", "DecodeResult"]


class OSDiffPipeline(ImageCodecPipeline):
    """One-step diffusion image codec. See the module docstring for the data flow."""

    model_cpu_offload_seq = "vae->compressor->unet"
    hashed_components = ("vae", "compressor", "unet", "conditioning")
    entropy_coder = "compressor"
    autocast_networks = True  # the latent autoencoder and the UNet step (encode_image, decode_hint)

    def __init__(
        self,
        vae,
        compressor: LatentCompressor,
        unet: UNetControlNetXSModel,
        conditioning: ConditioningEmbedding,
        scheduler: DDIMScheduler,
        model_name: str = "osdiff",
        timestep: int = 499,
        noise_seed: int = 0,
        control_scale: float = 1.0,
        default_quality: int = 2,
        decoding_start: str = "hint",
        pad_multiple: int | None = None,
        mean_colour: bool = False,
        unet_max_quality: float | None = None,
        realism: float | list[float] = 1.0,
    ) -> None:
        super().__init__()
        # channels-last convolutions (weights here, activations in encode_image/decode_hint): on 2
        # CPU cores the latent decoder ran 25 %, the encoder 22 % and the UNet 5-8 % faster
        vae.to(memory_format=torch.channels_last)
        unet.to(memory_format=torch.channels_last)
        self.register_modules(vae=vae, compressor=compressor, unet=unet, conditioning=conditioning, scheduler=scheduler)
        self.register_to_config(
            model_name=model_name, timestep=timestep, noise_seed=noise_seed,
            control_scale=control_scale, default_quality=default_quality, decoding_start=decoding_start,
            pad_multiple=pad_multiple, mean_colour=mean_colour, unet_max_quality=unet_max_quality,
            realism=realism_as_config(check_realism(realism, "model config: realism")),
        )
        # `osdiff decompress --realism`: overrides the config's `realism` for this pipeline's
        # decoding without changing the model (its hash)
        self.realism_override: float | list[float] | None = None

    # ---- properties ---------------------------------------------------------------------
    @property
    def pad_multiple(self) -> int:
        """Image height and width are padded to a multiple of this many pixels: the config's
        `pad_multiple` (at least what the compressor's analysis and the UNet's downsampling
        need), or by default as far as the compressor codes without internal padding (64 px
        for osdiff-tiny v1 and v2.0; v2.1 sets 32)."""
        chosen = self.config.get("pad_multiple")
        if chosen is None:
            return LATENT_DOWNSCALE * self.compressor.latent_multiple
        needed = LATENT_DOWNSCALE * max(self.compressor.min_latent_multiple, 2**self._unet_downsamples)
        if chosen % needed:
            raise OSDiffError(f"model config: pad_multiple {chosen} is not a multiple of {needed} pixels")
        return int(chosen)

    @property
    def min_padded_side(self) -> int:
        """Smallest padded side in pixels: the UNet's lowest level must be at least 2x2."""
        side = LATENT_DOWNSCALE * 2 ** (self._unet_downsamples + 1)
        return -(-side // self.pad_multiple) * self.pad_multiple

    @property
    def _unet_downsamples(self) -> int:
        """How many times the UNet halves the latent."""
        return len(self.unet.config.down_block_types) - 1

    @property
    def num_quality_levels(self) -> int:
        return int(self.compressor.config.num_quality_levels)

    def num_strings(self) -> int:
        return self.compressor.num_strings()

    @property
    def continuous_quality(self) -> bool:
        """The compressor's gain vectors interpolate between levels (any 1/256 step)."""
        return hasattr(self.compressor, "coding_gains")

    # ---- encoding -----------------------------------------------------------------------
    def encode_padded(self, image: Tensor, quality: int | float) -> list[bytes]:
        return self.encode_analysed(self.analyse_padded(image), quality)

    def analyse_padded(self, image: Tensor) -> Tensor:
        """Padded image (1,3,H,W) in [0,1] -> autoencoder latent (the same at every quality)."""
        return self.encode_image(self._to_model(image * 2.0 - 1.0))

    def encode_analysed(self, latent: Tensor, quality: int | float) -> list[bytes]:
        """Latent -> strings at the checked 1-based `quality`."""
        return self.compressor.compress(latent.to(self.compressor.dtype), level_index(quality), hint=False)["strings"]

    # ---- decoding -----------------------------------------------------------------------
    @property
    def realism(self) -> Realism:
        """How much of the UNet step's change to the hint a decoding keeps (DecodingConfig.realism,
        one value or one per level): `realism_override` if set, else the model config's."""
        if self.realism_override is not None:
            return check_realism(self.realism_override)
        return check_realism(self.config.get("realism", 1.0), "model config: realism")

    def realism_for(self, quality: int | float) -> float:
        """The realism a file of `quality` decodes with (per-level values interpolated)."""
        realism = self.realism
        try:
            return realism_at(realism, quality, self.num_quality_levels)
        except ValueError as exc:
            raise OSDiffError(f"model config: {exc}") from None

    def default_steps(self, quality: int | float) -> int:
        """UNet steps a file of `quality` decodes with unless told (DecodingConfig.default_steps:
        1, or 0 above the config's `unet_max_quality`)."""
        return DecodingConfig.from_pipeline_config(self.config).default_steps(quality)

    def decode_strings(self, strings: list[bytes], header: OSDHeader, steps: int) -> Tensor:
        latent_hw = ((header.height + header.pad_h) // LATENT_DOWNSCALE, (header.width + header.pad_w) // LATENT_DOWNSCALE)
        try:  # the synthesis transform inside decompress is float work too: within coding_context
            hint = self.compressor.decompress(strings, latent_hw, level_index(header.quality))
        except (RuntimeError, ValueError, IndexError) as exc:
            raise OSDiffError(f"corrupted entropy-coded data ({exc})") from None
        realism = self.realism_for(header.quality)
        return (self.decode_hint(hint.to(self.unet.dtype), steps=steps, realism=realism) + 1.0) / 2.0

    def encode_image(self, image: Tensor) -> Tensor:
        """Padded image (1,3,H,W) in [-1,1] -> latent (1,4,H/8,W/8); large images in tiles."""
        t = self.tiling

        def encode(x: Tensor) -> Tensor:
            with self.precision_context():
                return encode_latent(self.vae, to_channels_last(x)).float()

        return run_tiled(encode, [image], Fraction(1, LATENT_DOWNSCALE),
                         t.tile * LATENT_DOWNSCALE, t.overlap * LATENT_DOWNSCALE, t.align * LATENT_DOWNSCALE)

    def decode_hint(self, hint: Tensor, steps: int = 1, realism: float = 1.0) -> Tensor:
        """Hint latent (1,4,h,w) -> image (1,3,8h,8w) in [-1,1] (float32): the UNet step(s) and the
        latent decoder, in overlapping tiles for large latents. The noise is drawn for the whole
        latent first, so a tile sees the same noise as it would untiled. `steps` 0: no UNet, the
        hint itself decoded (the method's ablation: faster and closer to the photo pixel by pixel,
        without the texture the step adds). With the step, `realism` < 1 moves the step's output
        back toward the hint: hint + realism x (step - hint) (DecodingConfig.realism)."""
        t = self.tiling

        def to_image(latent: Tensor) -> Tensor:
            with self.precision_context():
                return decode_latent(self.vae, to_channels_last(latent.to(self.vae.dtype))).float()

        if steps == 0:  # no noise to draw
            return run_tiled(to_image, [hint], LATENT_DOWNSCALE, t.tile, t.overlap, t.align)

        def decode(x_t: Tensor, hint_tile: Tensor) -> Tensor:
            with self.precision_context():
                latent = self.denoise(to_channels_last(hint_tile), steps=steps, x_t=to_channels_last(x_t))
                if realism != 1.0:  # back toward the hint: less of the texture the step adds
                    latent = torch.lerp(hint_tile, latent.to(hint_tile.dtype), realism)
            return to_image(latent)

        return run_tiled(decode, [self.start_latent(hint), hint], LATENT_DOWNSCALE, t.tile, t.overlap, t.align)

    def start_latent(self, hint: Tensor) -> Tensor:
        """x_t at the decoding timestep: the hint noised with the fixed-seed noise, or (start
        "noise") that noise alone."""
        noise = fixed_noise(tuple(hint.shape), self.config.noise_seed, hint.device, hint.dtype)
        if self.config.decoding_start == "noise":
            return noise
        return add_noise(hint, noise, self.alpha_bar(int(self.config.timestep)))

    def alpha_bar(self, t: int) -> float:
        """Cumulative alpha at timestep t (see denoise.decoding_alpha_bar)."""
        return decoding_alpha_bar(self.scheduler, t, self.config.decoding_start)

    def denoise(self, hint: Tensor, steps: int = 1, x_t: Tensor | None = None) -> Tensor:
        """Hint latent (B,C,h,w) -> clean latent, with `steps` controlled-UNet evaluations,
        starting from `x_t` (default: `start_latent(hint)`)."""
        prediction_type = self.scheduler.config.prediction_type
        timesteps = ddim_timesteps(int(self.config.timestep), steps)
        x = self.start_latent(hint) if x_t is None else x_t
        context = self.conditioning(hint.shape[0]).to(hint.dtype)
        x0 = x
        for i, t in enumerate(timesteps):
            a_t = self.alpha_bar(t)
            out = self.unet(
                x, t, encoder_hidden_states=context, controlnet_cond=hint,
                conditioning_scale=self.config.control_scale,
            ).sample
            x0, eps = decoding_x0_eps(out, x, a_t, prediction_type, self.config.decoding_start)
            if i + 1 < len(timesteps):
                x = add_noise(x0, eps, self.alpha_bar(timesteps[i + 1]))
        return x0

    def _to_model(self, x: Tensor) -> Tensor:
        return x.to(device=self.device, dtype=self.vae.dtype)


def to_channels_last(x: Tensor) -> Tensor:
    """(B,C,H,W) in channels-last memory order, as the networks' weights are (same values)."""
    return x.contiguous(memory_format=torch.channels_last)
