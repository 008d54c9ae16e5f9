"""OSDiffPipeline: the whole codec as a diffusers pipeline.

    compress:   image -> pad -> autoencoder encode -> latent z -> LatentCompressor.compress
                -> entropy-coded strings -> `.osd` bytes (header + strings + CRC32)
    decompress: `.osd` bytes -> strings -> LatentCompressor.decompress -> hint
                -> noise hint to timestep t (fixed seed) -> one controlled-UNet step -> x0
                -> autoencoder decode -> crop -> image

Components (each saved in its own subfolder by `save_pretrained`):
  vae           AutoencoderKL (SD) | AutoencoderTiny | TinyAutoencoder
  compressor    LatentCompressor (LFGCM)
  unet          UNetControlNetXSModel: the denoising UNet fused with its ControlNet-XS adapter
  conditioning  ConditioningEmbedding: the cached empty-prompt / learned text embedding
  scheduler     DDIMScheduler: the noise schedule (alphas) and prediction type
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNetControlNetXSModel
from PIL import Image
from torch import Tensor

from .config import BitstreamLimits, ComputeConfig, TilingConfig
from .denoise import add_noise, ddim_timesteps, fixed_noise, predict_x0_eps
from .entropy.bitstream import HASH_BYTES, OSDHeader, pack, parse
from .errors import OSDiffError
from .imageio import ImageInput, pad_right_bottom, tensor_to_pil, to_tensor
from .models.autoencoder import LATENT_DOWNSCALE, decode_latent, encode_latent
from .models.compressor import LatentCompressor
from .models.conditioning import ConditioningEmbedding
from .tiling import run_tiled


@dataclass
class DecodeResult:
    """What `decompress_tensor` returns: the image (1,3,H,W) in [0,1] and its header."""

    image: Tensor
    header: OSDHeader


class OSDiffPipeline(DiffusionPipeline):
    """One-step diffusion image codec. See the module docstring for the data flow."""

    model_cpu_offload_seq = "vae->compressor->unet"

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
    ) -> None:
        super().__init__()
        self.register_modules(vae=vae, compressor=compressor, unet=unet, conditioning=conditioning, scheduler=scheduler)
        self.register_to_config(
            model_name=model_name, timestep=timestep, noise_seed=noise_seed,
            control_scale=control_scale, default_quality=default_quality,
        )
        self.limits = BitstreamLimits()
        self.tiling = TilingConfig()
        self.compute = ComputeConfig()
        self._model_hash: bytes | None = None

    # ---- properties ---------------------------------------------------------------------
    @property
    def pad_multiple(self) -> int:
        """Image height and width are padded to a multiple of this many pixels."""
        return LATENT_DOWNSCALE * self.compressor.latent_multiple

    @property
    def min_padded_side(self) -> int:
        """Smallest padded side in pixels: the UNet's lowest level must be at least 2x2."""
        unet_downsamples = len(self.unet.config.down_block_types) - 1
        side = LATENT_DOWNSCALE * 2 ** (unet_downsamples + 1)
        return -(-side // self.pad_multiple) * self.pad_multiple

    def padded_side(self, side: int) -> int:
        """Pixels a side of `side` pixels is padded to before coding."""
        return max(-(-side // self.pad_multiple) * self.pad_multiple, self.min_padded_side)

    @property
    def num_quality_levels(self) -> int:
        return int(self.compressor.config.num_quality_levels)

    @property
    def model_hash(self) -> bytes:
        """First 8 bytes of SHA-256 over every weight (as float32), entropy table and config
        that affects decoding. Written in each file; a file from another model is refused."""
        if self._model_hash is None:
            digest = hashlib.sha256()
            settings = {k: v for k, v in self.config.items() if not k.startswith("_") and not isinstance(v, (list, tuple))}
            digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
            schedule = {k: v for k, v in self.scheduler.config.items() if not k.startswith("_")}
            digest.update(json.dumps(schedule, sort_keys=True, default=str).encode())
            for name in ("vae", "compressor", "unet", "conditioning"):
                module = getattr(self, name)
                architecture = {k: v for k, v in module.config.items() if not k.startswith("_")}
                digest.update(json.dumps(architecture, sort_keys=True, default=str).encode())
                tensors = dict(module.state_dict())
                if name == "compressor":
                    tensors.update({f"tables.{k}": v for k, v in module.entropy_tables().items()})
                for key in sorted(tensors):
                    t = tensors[key].detach()
                    t = t.float() if t.is_floating_point() else t.long()
                    digest.update(f"{name}.{key}:{tuple(t.shape)}".encode())
                    digest.update(t.cpu().contiguous().numpy().tobytes())
            self._model_hash = digest.digest()[:HASH_BYTES]
        return self._model_hash

    def _check_quality(self, quality: int | None) -> int:
        q = self.config.default_quality if quality is None else quality
        if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not 1 <= q <= self.num_quality_levels:
            raise OSDiffError(f"quality must be an integer from 1 to {self.num_quality_levels}, got {quality!r}")
        return int(q)

    def _prepare(self) -> None:
        if not self.compressor.is_updated():
            self.compressor.update(force=True)
            self._model_hash = None

    # ---- encoding -----------------------------------------------------------------------
    @torch.inference_mode()
    def compress(self, image: ImageInput, quality: int | None = None) -> bytes:
        """Image (path, PIL, numpy or torch; see osdiff.imageio) -> `.osd` bytes."""
        level = self._check_quality(quality)
        self._prepare()
        x = to_tensor(image)
        _, _, height, width = x.shape
        if width > self.limits.max_side or height > self.limits.max_side or width * height > self.limits.max_pixels:
            raise OSDiffError(f"image of {width}x{height} pixels is larger than this codec accepts")
        pad_w, pad_h = self.padded_side(width) - width, self.padded_side(height) - height
        x = pad_right_bottom(x, pad_w, pad_h)
        with self.coding_context():
            latent = self.encode_image(self._to_model(x * 2.0 - 1.0))
            coded = self.compressor.compress(latent.to(self.compressor.dtype), level - 1)
        header = OSDHeader(self.config.model_name, self.model_hash, level, width, height, pad_w, pad_h)
        return pack(header, coded["strings"])

    # ---- decoding -----------------------------------------------------------------------
    def read_header(self, data: bytes) -> tuple[OSDHeader, list[bytes]]:
        """Parse `data` and check that this model can decode it."""
        header, strings = parse(data, self.limits)
        self._prepare()
        if header.model_hash != self.model_hash or header.model_name != self.config.model_name:
            raise OSDiffError(
                f"file was made by model {header.model_name!r} ({header.model_hash.hex()}), "
                f"not by the loaded model {self.config.model_name!r} ({self.model_hash.hex()})"
            )
        if header.quality > self.num_quality_levels:
            raise OSDiffError(f"quality level {header.quality} does not exist in this model")
        if (header.pad_w, header.pad_h) != (self.padded_side(header.width) - header.width, self.padded_side(header.height) - header.height):
            raise OSDiffError("corrupted header (padding does not match the model)")
        if len(strings) != self.compressor.num_strings():
            raise OSDiffError(f"corrupted file: {len(strings)} strings, the model codes {self.compressor.num_strings()}")
        return header, strings

    @torch.inference_mode()
    def decompress_tensor(self, data: bytes, steps: int = 1) -> DecodeResult:
        """`.osd` bytes -> image tensor (1,3,H,W) in [0,1]; `steps` > 1 uses DDIM."""
        header, strings = self.read_header(data)
        latent_hw = ((header.height + header.pad_h) // LATENT_DOWNSCALE, (header.width + header.pad_w) // LATENT_DOWNSCALE)
        with self.coding_context():  # also the synthesis transform inside decompress: float work
            try:
                hint = self.compressor.decompress(strings, latent_hw, header.quality - 1)
            except (RuntimeError, ValueError, IndexError) as exc:
                raise OSDiffError(f"corrupted entropy-coded data ({exc})") from None
            image = (self.decode_hint(hint.to(self.unet.dtype), steps=steps) + 1.0) / 2.0
        return DecodeResult(image[:, :, : header.height, : header.width].cpu(), header)

    @contextlib.contextmanager
    def coding_context(self):
        """Run the networks as `self.compute` says (see ComputeConfig); restores torch's settings."""
        if not self.compute.deterministic or self.device.type != "cpu":
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.compute.threads)
        try:
            with torch.backends.mkldnn.flags(enabled=False):
                yield
        finally:
            torch.set_num_threads(before)

    def encode_image(self, image: Tensor) -> Tensor:
        """Padded image (1,3,H,W) in [-1,1] -> latent (1,4,H/8,W/8); large images in tiles."""
        t = self.tiling
        return run_tiled(lambda x: encode_latent(self.vae, x), [image], Fraction(1, LATENT_DOWNSCALE),
                         t.tile * LATENT_DOWNSCALE, t.overlap * LATENT_DOWNSCALE, t.align * LATENT_DOWNSCALE)

    def decode_hint(self, hint: Tensor, steps: int = 1) -> Tensor:
        """Hint latent (1,4,h,w) -> image (1,3,8h,8w) in [-1,1] (float32): the UNet step(s) and the
        latent decoder, in overlapping tiles for large latents. The noise is drawn for the whole
        latent first, so a tile sees the same noise as it would untiled."""
        t = self.tiling

        def decode(x_t: Tensor, hint_tile: Tensor) -> Tensor:
            latent = self.denoise(hint_tile, steps=steps, x_t=x_t)
            return decode_latent(self.vae, latent.to(self.vae.dtype)).float()

        return run_tiled(decode, [self.noised_hint(hint), hint], LATENT_DOWNSCALE, t.tile, t.overlap, t.align)

    def decompress(self, data: bytes, steps: int = 1) -> Image.Image:
        """`.osd` bytes -> PIL RGB image of the original size."""
        return tensor_to_pil(self.decompress_tensor(data, steps=steps).image)

    def noised_hint(self, hint: Tensor) -> Tensor:
        """x_t: the hint noised to the decoding timestep with the fixed-seed noise."""
        noise = fixed_noise(tuple(hint.shape), self.config.noise_seed, hint.device, hint.dtype)
        return add_noise(hint, noise, float(self.scheduler.alphas_cumprod[int(self.config.timestep)]))

    def denoise(self, hint: Tensor, steps: int = 1, x_t: Tensor | None = None) -> Tensor:
        """Hint latent (B,C,h,w) -> clean latent, with `steps` controlled-UNet evaluations,
        starting from `x_t` (default: `noised_hint(hint)`)."""
        alphas = self.scheduler.alphas_cumprod
        prediction_type = self.scheduler.config.prediction_type
        timesteps = ddim_timesteps(int(self.config.timestep), steps)
        x = self.noised_hint(hint) if x_t is None else x_t
        context = self.conditioning(hint.shape[0]).to(hint.dtype)
        x0 = x
        for i, t in enumerate(timesteps):
            a_t = float(alphas[t])
            out = self.unet(
                x, t, encoder_hidden_states=context, controlnet_cond=hint,
                conditioning_scale=self.config.control_scale,
            ).sample
            x0, eps = predict_x0_eps(out, x, a_t, prediction_type)
            if i + 1 < len(timesteps):
                x = add_noise(x0, eps, float(alphas[timesteps[i + 1]]))
        return x0

    def __call__(self, image: ImageInput, quality: int | None = None, steps: int = 1) -> tuple[Image.Image, bytes]:
        """Round trip: compress `image`, then decode it with `steps` UNet evaluations."""
        data = self.compress(image, quality)
        return self.decompress(data, steps=steps), data

    def _to_model(self, x: Tensor) -> Tensor:
        return x.to(device=self.device, dtype=self.vae.dtype)
