"""LFGCM latent compressor: ELIC-style transforms on the autoencoder latent, composed from
compressai latent codecs.

    latent z (B,C,h,w) --g_a--> y (B,M,h/2^a,w/2^a) --[gain hyperprior + channel groups
    + checkerboard]--> y_hat --g_s--> hint (B,C,h,w)

The hyperprior is compressai's `GainHyperpriorLatentCodec`: one learned gain vector per
quality level scales y and z before quantisation, so one set of weights covers several rates.
y is coded in uneven channel groups (`ChannelGroupsLatentCodec`), each with a two-pass
checkerboard spatial context (`CheckerboardLatentCodec`). Entropy coding is compressai's rANS.

The CDF tables that `update()` computes are saved next to the weights
(`entropy_tables.safetensors`) instead of being recomputed at load, so every machine codes
with exactly the same integer tables.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch
from compressai.entropy_models import EntropyBottleneck, EntropyModel, GaussianConditional
from compressai.latent_codecs import (
    ChannelGroupsLatentCodec,
    CheckerboardLatentCodec,
    GainHyperLatentCodec,
    GainHyperpriorLatentCodec,
    GaussianConditionalLatentCodec,
)
from compressai.layers import CheckerboardMaskedConv2d
from compressai.models.base import CompressionModel, get_scale_table
from compressai.models.utils import conv, deconv
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..entropy.exact import exact_modules

ENTROPY_TABLES_FILE = "entropy_tables.safetensors"
_TABLE_BUFFERS = ("_offset", "_quantized_cdf", "_cdf_length", "scale_table")
_SHARED_GAUSSIAN = "gaussian_conditional"


class ResidualUnit(nn.Module):
    """1x1 - 3x3 - 1x1 bottleneck residual block (ELIC); keeps shape."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        mid = max(channels // 2, 8)
        self.body = nn.Sequential(
            nn.Conv2d(channels, mid, 1), nn.ReLU(),
            nn.Conv2d(mid, mid, 3, padding=1), nn.ReLU(),
            nn.Conv2d(mid, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _analysis(c_in: int, n: int, m: int, downsamples: int) -> nn.Sequential:
    layers: list[nn.Module] = [conv(c_in, n, kernel_size=3, stride=1)]
    for _ in range(downsamples):
        layers += [ResidualUnit(n), conv(n, n, kernel_size=5, stride=2)]
    layers += [ResidualUnit(n), conv(n, m, kernel_size=3, stride=1)]
    return nn.Sequential(*layers)


def _synthesis(m: int, n: int, c_out: int, upsamples: int) -> nn.Sequential:
    layers: list[nn.Module] = [conv(m, n, kernel_size=3, stride=1), ResidualUnit(n)]
    for _ in range(upsamples):
        layers += [deconv(n, n, kernel_size=5, stride=2), ResidualUnit(n)]
    layers += [conv(n, c_out, kernel_size=3, stride=1)]
    return nn.Sequential(*layers)


def _hyper_analysis(m: int, n: int, downsamples: int) -> nn.Sequential:
    layers: list[nn.Module] = [conv(m, n, kernel_size=3, stride=1)]
    for _ in range(downsamples):
        layers += [nn.ReLU(), conv(n, n, kernel_size=5, stride=2)]
    return nn.Sequential(*layers)


def _hyper_synthesis(n: int, m: int, upsamples: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(upsamples):
        layers += [deconv(n, n, kernel_size=5, stride=2), nn.ReLU()]
    layers += [conv(n, m * 2, kernel_size=3, stride=1)]
    return nn.Sequential(*layers)


class LatentCompressor(CompressionModel, ModelMixin, ConfigMixin):
    """Variable-rate ELIC-style compressor of a (B, latent_channels, h, w) latent.

    `h` and `w` must be multiples of `2 ** (analysis_downsamples + hyper_downsamples)`.
    Quality levels are 0-based indices into the gain tables here; higher codes more bits.
    """

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 4,
        hidden_channels: int = 96,
        code_channels: int = 64,
        groups: tuple[int, ...] = (4, 4, 8, 16, 32),
        analysis_downsamples: int = 2,
        hyper_downsamples: int = 1,
        num_quality_levels: int = 4,
        exact_entropy_parameters: bool = True,
    ) -> None:
        super().__init__()
        n, m, groups = hidden_channels, code_channels, list(groups)
        if sum(groups) != m:
            raise ValueError(f"groups {groups} must sum to code_channels={m}")
        self.groups = groups
        self.g_a = _analysis(latent_channels, n, m, analysis_downsamples)
        self.g_s = _synthesis(m, n, latent_channels, analysis_downsamples)

        channel_context = {
            f"y{k}": nn.Sequential(
                conv(sum(groups[:k]), n, kernel_size=5, stride=1), nn.ReLU(),
                conv(n, groups[k] * 2, kernel_size=5, stride=1),
            )
            for k in range(1, len(groups))
        }
        groups_codec = {
            f"y{k}": CheckerboardLatentCodec(
                latent_codec={
                    "y": GaussianConditionalLatentCodec(
                        scale_table=get_scale_table().tolist(), quantizer="ste", chunks=("means", "scales")
                    )
                },
                context_prediction=CheckerboardMaskedConv2d(
                    groups[k], groups[k] * 2, kernel_size=5, stride=1, padding=2
                ),
                entropy_parameters=nn.Sequential(
                    nn.Conv2d(groups[k] * 2 + (k > 0) * groups[k] * 2 + m * 2, n, 1), nn.ReLU(),
                    nn.Conv2d(n, n, 1), nn.ReLU(),
                    nn.Conv2d(n, groups[k] * 2, 1),
                ),
            )
            for k in range(len(groups))
        }
        self.latent_codec = GainHyperpriorLatentCodec(
            latent_codec={
                "y": ChannelGroupsLatentCodec(
                    groups=groups, channel_context=channel_context, latent_codec=groups_codec
                ),
                "hyper": GainHyperLatentCodec(
                    entropy_bottleneck=EntropyBottleneck(n),
                    h_a=_hyper_analysis(m, n, hyper_downsamples),
                    h_s=_hyper_synthesis(n, m, hyper_downsamples),
                ),
            }
        )
        # Gains per quality level, spaced geometrically (x4 from lowest to highest) at init.
        init = torch.exp(torch.linspace(math.log(0.5), math.log(2.0), num_quality_levels))
        self.y_gain = nn.Parameter(init[:, None].repeat(1, m))
        self.y_gain_inv = nn.Parameter((1.0 / init)[:, None].repeat(1, m))
        self.z_gain = nn.Parameter(init[:, None].repeat(1, n))
        self.z_gain_inv = nn.Parameter((1.0 / init)[:, None].repeat(1, n))
        self.apply_context_masks()
        for module in self.modules():
            if isinstance(module, EntropyModel):
                # Tables vary in size with the weights: kept out of the state dict and stored
                # in ENTROPY_TABLES_FILE by save_pretrained.
                module._non_persistent_buffers_set.update(
                    b for b in _TABLE_BUFFERS if b in module._buffers
                )

    @torch.no_grad()
    def apply_context_masks(self) -> None:
        """Zero the masked taps of the checkerboard context convolutions. compressai does this
        in place on every forward; doing it at build and load keeps the weights (and the model
        hash) the same before and after the first use."""
        for module in self.modules():
            if isinstance(module, CheckerboardMaskedConv2d):
                module.weight.mul_(module.mask)

    def entropy_parameter_modules(self) -> list[nn.Module]:
        """The networks whose outputs choose the entropy models: hyper-synthesis, channel
        context, checkerboard context and parameter aggregation of every group."""
        groups = self.latent_codec["y"]
        mods: list[nn.Module] = [self.latent_codec["hyper"].h_s, *groups.channel_context.values()]
        for codec in groups.latent_codec.values():
            mods += [codec.context_prediction, codec.entropy_parameters]
        return mods

    def _coding_context(self):
        if self.config.exact_entropy_parameters:
            return exact_modules(self.entropy_parameter_modules())
        return contextlib.nullcontext()

    # ---- shapes ---------------------------------------------------------------------------
    @property
    def latent_multiple(self) -> int:
        """Latent height and width must be multiples of this."""
        return 2 ** (self.config.analysis_downsamples + self.config.hyper_downsamples)

    def code_shapes(self, latent_hw: tuple[int, int]) -> dict:
        """The `shape` argument compressai's decompress needs, from the latent (h, w)."""
        h, w = latent_hw
        ya = 2 ** self.config.analysis_downsamples
        yh, yw = h // ya, w // ya
        zh = yh // 2 ** self.config.hyper_downsamples
        zw = yw // 2 ** self.config.hyper_downsamples
        return {
            "y": [(g, yh, yw) for g in self.groups],
            "hyper": (zh, zw),
        }

    def max_symbols_per_string(self, latent_hw: tuple[int, int]) -> int:
        """An upper bound on the symbols any one string codes (a whole group, or all of z)."""
        shapes = self.code_shapes(latent_hw)
        _, yh, yw = shapes["y"][0]
        zh, zw = shapes["hyper"]
        return max(max(self.groups) * yh * yw, self.config.hidden_channels * zh * zw)

    def num_strings(self) -> int:
        """Entropy-coded byte strings per image: 2 checkerboard passes per group, plus z."""
        return 2 * len(self.groups) + 1

    def _gains(self, level: Tensor | int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Gain vectors (B or 1, ch, 1, 1) for quality index/indices `level`."""
        idx = torch.as_tensor(level, device=self.y_gain.device).long().reshape(-1)
        pick = lambda p: p[idx][:, :, None, None]  # noqa: E731
        return pick(self.y_gain), pick(self.z_gain), pick(self.y_gain_inv), pick(self.z_gain_inv)

    # ---- training -------------------------------------------------------------------------
    def forward(self, latent: Tensor, level: Tensor | int) -> dict:
        """Training pass with quantisation proxies.

        Returns {"hint": (B,C,h,w), "likelihoods": {"y": ..., "z": ...}}; the rate in bits is
        -sum(log2(likelihoods)).
        """
        y = self.g_a(latent)
        out = self.latent_codec(y, *self._gains(level))
        return {"hint": self.g_s(out["y_hat"]), "likelihoods": out["likelihoods"]}

    # ---- coding ---------------------------------------------------------------------------
    @torch.no_grad()
    def compress(self, latent: Tensor, level: int) -> dict:
        """Latent (1,C,h,w) -> {"strings": list of `num_strings()` bytes, "hint": (1,C,h,w)}."""
        if latent.shape[0] != 1:
            raise ValueError("compress codes one latent at a time")
        y = self.g_a(latent)
        with self._coding_context():
            out = self.latent_codec.compress(y, *self._gains(level))
        strings = [s[0] for s in out["strings"]]
        return {"strings": strings, "hint": self.g_s(out["y_hat"].to(y.dtype).contiguous())}

    @torch.no_grad()
    def decompress(self, strings: list[bytes], latent_hw: tuple[int, int], level: int) -> Tensor:
        """Strings from `compress` and the latent (h, w) -> hint (1,C,h,w)."""
        _, _, y_gain_inv, z_gain_inv = self._gains(level)
        symbols = self.max_symbols_per_string(latent_hw)
        with self._coding_context():
            out = self.latent_codec.decompress(
                [[_pad_for_rans(s, symbols)] for s in strings], self.code_shapes(latent_hw), y_gain_inv, z_gain_inv
            )
        return self.g_s(out["y_hat"].to(y_gain_inv.dtype).contiguous())

    # ---- persistence of the integer CDF tables -------------------------------------------
    def entropy_tables(self) -> dict[str, Tensor]:
        """Integer CDF tables of every entropy model, keyed by module path. All Gaussian
        conditionals share one scale table, so their identical tables are stored once."""
        tables: dict[str, Tensor] = {}
        gaussian: dict[str, Tensor] | None = None
        for name, module in self.named_modules():
            if not isinstance(module, EntropyModel):
                continue
            own = {
                b: module._buffers[b].detach().cpu().contiguous()
                for b in _TABLE_BUFFERS
                if module._buffers.get(b) is not None and module._buffers[b].numel() > 0
            }
            if isinstance(module, GaussianConditional):
                if gaussian is None:
                    gaussian = own
                    tables.update({f"{_SHARED_GAUSSIAN}.{b}": t for b, t in own.items()})
                elif own.keys() != gaussian.keys() or any(not torch.equal(own[b], gaussian[b]) for b in own):
                    raise RuntimeError(f"{name}: Gaussian conditional tables differ from the first one")
            else:
                tables.update({f"{name}.{b}": t for b, t in own.items()})
        return tables

    def load_entropy_tables(self, tables: dict[str, Tensor]) -> None:
        """Restore buffers saved by `entropy_tables()` (sizes may differ from the fresh ones)."""
        modules = dict(self.named_modules())
        for key, value in tables.items():
            name, buf = key.rsplit(".", 1)
            if name == _SHARED_GAUSSIAN:
                targets = [m for m in modules.values() if isinstance(m, GaussianConditional)]
            else:
                targets = [modules[name]]
            for module in targets:
                module._buffers[buf] = value.to(module._buffers[buf].device)

    def is_updated(self) -> bool:
        """True when every entropy model has CDF tables (compress/decompress can run)."""
        return all(
            m._quantized_cdf.numel() > 0 for m in self.modules() if isinstance(m, EntropyModel)
        )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Plain nn.Module loading: the CDF tables are not in the state dict (see
        `entropy_tables`), so compressai's table-resizing override does not apply."""
        return nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        if self.is_updated():
            save_file(self.entropy_tables(), str(Path(save_directory) / ENTROPY_TABLES_FILE))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        # compressai's EntropyBottleneck cannot be built on the meta device.
        kwargs["low_cpu_mem_usage"] = False
        kwargs.pop("device_map", None)
        model = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        model.apply_context_masks()
        folder = Path(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            folder = folder / kwargs["subfolder"]
        tables = folder / ENTROPY_TABLES_FILE
        if tables.is_file():
            model.load_entropy_tables(load_file(str(tables)))
        else:
            model.update(force=True)
        return model


__all__ = ["LatentCompressor", "ENTROPY_TABLES_FILE"]


def _pad_for_rans(string: bytes, symbols: int) -> bytes:
    """`string` followed by enough zero bytes that compressai's rANS decoder, which reads
    32-bit words without bounds checks, stays inside the buffer even on garbage input.

    Past the real data the decoder reads zeros: each symbol then reads at most one word (4 bytes)
    once the state's leftover bits are flushed (a few hundred bytes at most), and the bypass
    escape of a symbol can read at most 15 nibbles for every nibble of the string
    (`n_bypass` grows by at most 15 per nibble): 16 * len + 4 * symbols + 64 KiB covers it."""
    return string + bytes(16 * len(string) + 4 * symbols + 65536)
