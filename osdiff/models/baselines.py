"""Learned image codecs from compressai, used as baselines: one model per rate.

    image x (B,3,H,W) in [0,1] --g_a--> y (B,M,H/16,W/16) --[hyperprior (+ context)]--> y_hat
    --g_s--> x_hat

architectures (compressai's classes as they are):
  elic2022-chandelier    `Elic2022Chandelier`: uneven channel groups + checkerboard context (ELIC)
  mean-scale-hyperprior  `MeanScaleHyperprior` (Minnen et al. 2018), the HiFiC-style generator here

`LearnedImageCodec` holds `num_rates` of them (index 0 = fewest bits) so a family of rates saves
and loads as one diffusers model. While coding, the networks that choose the entropy models run in
exact fixed point (osdiff.entropy.exact), so files decode identically on every machine.
"""
from __future__ import annotations

import contextlib

import torch
from compressai.models import Elic2022Chandelier, MeanScaleHyperprior
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from ..entropy.exact import exact_modules
from ..entropy.rans import pad_for_rans
from ..entropy.tables import EntropyTablesMixin
from .compressor import channel_group_entropy_networks, zero_checkerboard_masks

ARCHITECTURES = ("elic2022-chandelier", "mean-scale-hyperprior")
IMAGE_DOWNSCALE = 16  # g_a: four stride-2 convolutions
HYPER_DOWNSCALE = 4  # h_a: two more


class LearnedImageCodec(EntropyTablesMixin, ModelMixin, ConfigMixin):
    """`num_rates` compressai codecs of one architecture; `rate` is a 0-based index."""

    @register_to_config
    def __init__(
        self,
        architecture: str = "elic2022-chandelier",
        N: int = 32,
        M: int = 64,
        groups: tuple[int, ...] = (4, 4, 8, 16, 32),
        num_rates: int = 4,
        exact_entropy_parameters: bool = True,
    ) -> None:
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r} (one of {', '.join(ARCHITECTURES)})")
        if architecture == "elic2022-chandelier":
            build = lambda: Elic2022Chandelier(N=N, M=M, groups=list(groups))  # noqa: E731
        else:
            build = lambda: MeanScaleHyperprior(N=N, M=M)  # noqa: E731
        self.rates = nn.ModuleList(build() for _ in range(num_rates))
        zero_checkerboard_masks(self)
        self.keep_tables_out_of_state_dict()

    def after_load(self) -> None:
        zero_checkerboard_masks(self)

    # ---- shapes -------------------------------------------------------------------------------
    @property
    def pad_multiple(self) -> int:
        """Image height and width must be multiples of this many pixels."""
        return IMAGE_DOWNSCALE * HYPER_DOWNSCALE

    def num_strings(self) -> int:
        """Entropy-coded strings per image: ELIC 2 checkerboard passes per group + z; else y, z."""
        if self.config.architecture == "elic2022-chandelier":
            return 2 * len(self.config.groups) + 1
        return 2

    def _decode_shape(self, image_hw: tuple[int, int]):
        """compressai's `shape` argument of decompress, from the padded image size."""
        yh, yw = image_hw[0] // IMAGE_DOWNSCALE, image_hw[1] // IMAGE_DOWNSCALE
        zhw = torch.Size((yh // HYPER_DOWNSCALE, yw // HYPER_DOWNSCALE))
        if self.config.architecture == "elic2022-chandelier":
            return {"y": [torch.Size((g, yh, yw)) for g in self.config.groups], "hyper": zhw}
        return zhw

    def _max_symbols_per_string(self, image_hw: tuple[int, int]) -> int:
        yh, yw = image_hw[0] // IMAGE_DOWNSCALE, image_hw[1] // IMAGE_DOWNSCALE
        return max(self.config.M, self.config.N) * yh * yw

    # ---- training -----------------------------------------------------------------------------
    def forward(self, x: Tensor, rate: int) -> dict:
        """Training pass with quantisation proxies: {"x_hat": (B,3,H,W), "likelihoods": {...},
        "y_hat": (B,M,H/16,W/16)} (y_hat: the quantised latent g_s decodes, for a conditional
        discriminator)."""
        model = self.rates[rate]
        captured: dict[str, Tensor] = {}
        hook = model.g_s.register_forward_pre_hook(lambda _, args: captured.setdefault("y_hat", args[0]))
        try:
            out = model(x)
        finally:
            hook.remove()
        return {**out, "y_hat": captured["y_hat"]}

    def aux_loss(self) -> Tensor:
        return sum(model.aux_loss() for model in self.rates)

    def update(self, force: bool = False) -> None:
        """Compute the CDF tables of every rate (compressai's `update()`)."""
        for model in self.rates:
            model.update(force=force)

    # ---- coding -------------------------------------------------------------------------------
    def entropy_parameter_modules(self, rate: int) -> list[nn.Module]:
        """The networks whose outputs choose the entropy models of rate `rate`."""
        model = self.rates[rate]
        if self.config.architecture == "mean-scale-hyperprior":
            return [model.h_s]
        return channel_group_entropy_networks(model.latent_codec)

    def _coding_context(self, rate: int):
        if self.config.exact_entropy_parameters:  # compressai's mean-scale decoder adds means to y in the model's dtype
            return exact_modules(self.entropy_parameter_modules(rate), output_dtype=self.dtype)
        return contextlib.nullcontext()

    @torch.no_grad()
    def compress(self, x: Tensor, rate: int) -> list[bytes]:
        """Image (1,3,H,W) in [0,1], H and W multiples of `pad_multiple` -> `num_strings()` strings."""
        if x.shape[0] != 1:
            raise ValueError("compress codes one image at a time")
        with self._coding_context(rate):
            out = self.rates[rate].compress(x)
        return [s[0] for s in out["strings"]]

    @torch.no_grad()
    def decompress(self, strings: list[bytes], image_hw: tuple[int, int], rate: int) -> Tensor:
        """Strings from `compress` and the padded image (H, W) -> image (1,3,H,W) in [0,1]."""
        symbols = self._max_symbols_per_string(image_hw)
        padded = [[pad_for_rans(s, symbols)] for s in strings]
        with self._coding_context(rate):
            out = self.rates[rate].decompress(padded, self._decode_shape(image_hw))
        return out["x_hat"]
