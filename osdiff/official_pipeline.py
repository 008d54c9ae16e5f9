"""OfficialOSDiffPipeline: the paper's released models (converted by `osdiff convert-official`),
decoded exactly as the official code's `inference.py --sampler ddpm --steps 1` does.

    compress:   image -> zero-pad right/bottom to a multiple of 64 px (64 px minimum)
                -> VAE encode (mode) * 0.18215 -> LFGCM of the chosen level -> [mode, y, z]
    decompress: strings -> LFGCM decompress -> hint
                -> x_T: fixed-seed pure Gaussian noise (or the caller's), t = 999
                -> CDDM control (hint only here) + frozen SD UNet -> epsilon
                -> x0 with ldm's float64 schedule coefficients rounded to float32
                -> VAE decode (x0 / 0.18215) -> ((x + 1) / 2).clamp(0, 1) * 255, floor

Each quality level has its own compressor and control module (one official checkpoint per
lambda); the SD UNet, VAE and empty-prompt embedding are shared. No tiling: the official code
decodes the whole image at once.

The first string of a file is one byte naming the coding mode that wrote it (0 = exact,
1 = float; see osdiff.models.official.lfgcm); the decoder follows it.
"""
from __future__ import annotations

import struct

import numpy as np
import torch
import torch.nn.functional as F
from compressai.models.base import CompressionModel
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from .codec_pipeline import ImageCodecPipeline
from .denoise import alphas_cumprod_float64, fixed_noise, x0_from_eps_ldm
from .entropy.bitstream import OSDHeader
from .entropy.tables import EntropyTablesMixin
from .errors import OSDiffError
from .imageio import ImageInput
from .models.conditioning import ConditioningEmbedding
from .models.official.cddm import CDDMControl, controlled_unet_forward
from .models.official.lfgcm import OfficialLFGCM
from .rate import level_index

CODING_MODES = {"exact": b"\x00", "float": b"\x01"}
OFFICIAL_PAD = 64
OFFICIAL_TIMESTEP = 999


class OfficialLevels(EntropyTablesMixin, CompressionModel, ModelMixin, ConfigMixin):
    """Per quality level: one official LFGCM (`compressors[i]`) and one CDDM control
    (`controls[i]`); level i + 1 in files. `compressor` and `control` are their configs."""

    @register_to_config
    def __init__(self, num_levels: int = 1, compressor: dict | None = None, control: dict | None = None) -> None:
        super().__init__()
        self.compressors = nn.ModuleList(OfficialLFGCM(**(compressor or {})) for _ in range(num_levels))
        self.controls = nn.ModuleList(CDDMControl(**(control or {})) for _ in range(num_levels))
        self.keep_tables_out_of_state_dict()


def official_schedule_coefficients(t: int, num_train_timesteps: int, beta_start: float, beta_end: float) -> tuple[float, float]:
    """(alpha_bar, posterior coefficient of x0) of the official one-step spaced sampler at `t`:
    betas from torch.linspace in float64, the respaced single step's alpha_bar = 1 - (1 - a_t),
    and the posterior mean coefficient of x0 (1 up to rounding; the x_t one is exactly 0)."""
    a_t = alphas_cumprod_float64(num_train_timesteps, beta_start, beta_end)[t]
    beta = 1.0 - a_t / 1.0
    alpha_bar = float(np.cumprod(np.array([1.0 - beta]))[0])
    coef_x0 = float(beta * np.sqrt(1.0) / (1.0 - alpha_bar))
    return alpha_bar, coef_x0


class OfficialOSDiffPipeline(ImageCodecPipeline):
    """A converted official OSDiff model; see the module docstring."""

    hashed_components = ("vae", "unet", "levels", "conditioning")
    entropy_coder = "levels"
    model_cpu_offload_seq = "vae->levels->unet"

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        levels: OfficialLevels,
        conditioning: ConditioningEmbedding,
        scheduler: DDIMScheduler,
        model_name: str = "osdiff-official",
        noise_seed: int = 0,
        default_quality: int = 1,
    ) -> None:
        super().__init__()
        self.register_modules(vae=vae, unet=unet, levels=levels, conditioning=conditioning, scheduler=scheduler)
        self.register_to_config(model_name=model_name, noise_seed=noise_seed, default_quality=default_quality)
        self.coding_mode = "exact"  # what compress writes: "exact" (osdiff) or "float" (official arithmetic)

    @property
    def pad_multiple(self) -> int:
        return OFFICIAL_PAD

    @property
    def num_quality_levels(self) -> int:
        return int(self.levels.config.num_levels)

    def num_strings(self) -> int:
        return 3

    def pad_image(self, x: Tensor, pad_w: int, pad_h: int) -> Tensor:
        """Zero padding, as the official `pad(img, scale=64)`."""
        return F.pad(x, (0, pad_w, 0, pad_h))

    # ---- encoding -----------------------------------------------------------------------
    def encode_latent(self, image: Tensor) -> Tensor:
        """Padded image (1,3,H,W) in [0,1] -> scaled latent (1,4,H/8,W/8), as the official
        `encode_first_stage(2x - 1).mode() * scale_factor`."""
        x = (image * 2 - 1).to(device=self.device, dtype=self.vae.dtype)
        return self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor

    def encode_padded(self, image: Tensor, quality: int) -> list[bytes]:
        if self.coding_mode not in CODING_MODES:
            raise OSDiffError(f"coding mode must be 'exact' or 'float', got {self.coding_mode!r}")
        latent = self.encode_latent(image)
        out = self.levels.compressors[level_index(quality)].compress(latent.float(), exact=self.coding_mode == "exact")
        return [CODING_MODES[self.coding_mode], *out["strings"]]

    # ---- decoding -----------------------------------------------------------------------
    def decode_strings(self, strings: list[bytes], header: OSDHeader, steps: int) -> Tensor:
        if steps != 1:
            raise OSDiffError("a converted official model decodes in one step (steps must be 1)")
        modes = {v: k for k, v in CODING_MODES.items()}
        if strings[0] not in modes:
            raise OSDiffError("corrupted file (unknown coding mode)")
        z_shape = ((header.height + header.pad_h) // OFFICIAL_PAD, (header.width + header.pad_w) // OFFICIAL_PAD)
        try:
            hint = self.levels.compressors[level_index(header.quality)].decompress(strings[1:], z_shape, exact=modes[strings[0]] == "exact")
        except (RuntimeError, ValueError, IndexError) as exc:
            raise OSDiffError(f"corrupted entropy-coded data ({exc})") from None
        return self.decode_hint(hint, header.quality)

    def decode_official_stream(self, data: bytes, quality: int, x_t: Tensor | None = None) -> Tensor:
        """A stream file the official `compress` wrote (`write_body`: z shape, strings) ->
        padded image (1,3,H,W) in [0,1], floor-rounded, decoded at `quality` (1-based) from `x_t`
        (default: the fixed-seed noise)."""
        try:
            zh, zw, n = struct.unpack_from(">3I", data, 0)
            pos, strings = 12, []
            for _ in range(n):
                (length,) = struct.unpack_from(">I", data, pos)
                strings.append(data[pos + 4 : pos + 4 + length])
                pos += 4 + length
        except struct.error:
            raise OSDiffError("not an official OSDiff stream (truncated)") from None
        if n != 2 or pos != len(data) or not (0 < zh <= 4096 and 0 < zw <= 4096):
            raise OSDiffError("not an official OSDiff stream")
        quality = self.check_quality(quality)
        self._prepare()
        with torch.inference_mode(), self.coding_context():
            hint = self.levels.compressors[level_index(quality)].decompress(strings, (zh, zw), exact=False)
            return self.decode_hint(hint, quality, x_t)

    def official_x0(self, x_t: Tensor, eps: Tensor) -> Tensor:
        """x0 of the official one-step sampler at t = 999 from x_T and the predicted noise."""
        sc = self.scheduler.config
        alpha_bar, coef = official_schedule_coefficients(OFFICIAL_TIMESTEP, sc.num_train_timesteps, sc.beta_start, sc.beta_end)
        x0 = x0_from_eps_ldm(x_t, eps, alpha_bar)
        return torch.tensor(coef, dtype=x0.dtype, device=x0.device) * x0

    def denoise(self, hint: Tensor, quality: int, x_t: Tensor | None = None) -> Tensor:
        """Hint (1,4,h,w) -> clean latent: one evaluation of `quality`'s CDDM + the UNet at
        t = 999 from `x_t` (default: pure noise from `noise_seed`)."""
        hint = hint.to(self.unet.dtype)
        x = fixed_noise(tuple(hint.shape), self.config.noise_seed, hint.device, hint.dtype) if x_t is None else x_t.to(hint)
        context = self.conditioning(hint.shape[0]).to(hint.dtype)
        t = torch.full((hint.shape[0],), OFFICIAL_TIMESTEP, dtype=torch.long, device=hint.device)
        eps = controlled_unet_forward(self.levels.controls[level_index(quality)], self.unet, x, t, context, hint)
        return self.official_x0(x, eps)

    def decode_hint(self, hint: Tensor, quality: int, x_t: Tensor | None = None) -> Tensor:
        """Hint -> image (1,3,8h,8w) in [0,1], floor-rounded to 8 bits as the official code."""
        latent = self.denoise(hint, quality, x_t)
        x = self.vae.decode((latent / self.vae.config.scaling_factor).to(self.vae.dtype)).sample.float()
        return torch.floor(((x + 1) / 2).clamp(0, 1) * 255) / 255

    @torch.inference_mode()
    def reconstruct(self, image: ImageInput, quality: int | None = None, x_t: Tensor | None = None) -> tuple[Tensor, bytes]:
        """Round trip with a caller-supplied x_T (1,4,H/8,W/8) for the padded image: returns the
        decoded image (1,3,H,W) in [0,1] and the `.osd` bytes."""
        data = self.compress(image, quality)
        header, strings = self.read_header(data)
        z_shape = ((header.height + header.pad_h) // OFFICIAL_PAD, (header.width + header.pad_w) // OFFICIAL_PAD)
        with self.coding_context():
            hint = self.levels.compressors[level_index(header.quality)].decompress(strings[1:], z_shape, exact=self.coding_mode == "exact")
            out = self.decode_hint(hint, header.quality, x_t)
        return out[:, :, : header.height, : header.width].cpu(), data


__all__ = ["OfficialOSDiffPipeline", "OfficialLevels", "official_schedule_coefficients", "CODING_MODES"]
