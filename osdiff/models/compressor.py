"""LFGCM latent compressor: ELIC-style transforms on the autoencoder latent, composed from
compressai latent codecs.

    latent z (B,C,h,w) --g_a--> y (B,M,h/2^a,w/2^a) --[gain hyperprior + channel groups
    + checkerboard]--> y_hat --g_s--> hint (B,C,h,w)

The hyperprior is compressai's `GainHyperpriorLatentCodec`: one learned gain vector per
quality level scales y and z before quantisation, so one set of weights covers several rates.
y is coded in uneven channel groups (`ChannelGroupsLatentCodec`), each with a two-pass
checkerboard spatial context (`CheckerboardLatentCodec`). Entropy coding is compressai's rANS.

The CDF tables that `update()` computes are saved next to the weights (osdiff.entropy.tables)
instead of being recomputed at load, so every machine codes with exactly the same integer tables.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck
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
from torch import Tensor, nn

from ..entropy.bitstream import QUALITY_STEPS
from ..entropy.exact import exact_modules
from ..entropy.gains import interpolate_gains
from ..entropy.rans import pad_for_rans
from ..entropy.tables import ENTROPY_TABLES_FILE, EntropyTablesMixin



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


@torch.no_grad()
def zero_checkerboard_masks(model: nn.Module) -> None:
    """Zero the masked taps of every checkerboard context convolution in `model`. compressai
    does this in place on every forward; doing it at build and load keeps the weights (and the
    model hash) the same before and after the first use."""
    for module in model.modules():
        if isinstance(module, CheckerboardMaskedConv2d):
            module.weight.mul_(module.mask)


def channel_group_entropy_networks(latent_codec) -> list[nn.Module]:
    """The networks whose outputs choose the entropy models in a compressai hyperprior latent
    codec (`latent_codec["hyper"]`, `latent_codec["y"]` = ChannelGroupsLatentCodec of
    CheckerboardLatentCodecs): hyper-synthesis, channel context, and each group's checkerboard
    context and parameter aggregation."""
    groups = latent_codec["y"]
    mods: list[nn.Module] = [latent_codec["hyper"].h_s, *groups.channel_context.values()]
    for codec in groups.latent_codec.values():
        mods += [codec.context_prediction, codec.entropy_parameters]
    return mods


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


class SymbolGaussianConditionalLatentCodec(GaussianConditionalLatentCodec):
    """compressai's `GaussianConditionalLatentCodec` whose `compress` dequantizes the symbols it
    codes instead of rANS-decoding its own strings: decoding them returns exactly those symbols
    (out-of-table values are coded losslessly too), so the strings and y_hat are the same, and
    encoding 512x768 skips ten decodes (~60 ms on 2 cores)."""

    def compress(self, y: Tensor, ctx_params: Tensor) -> dict:
        scales_hat, means_hat = self._chunk(self.entropy_parameters(ctx_params))
        indexes = self.gaussian_conditional.build_indexes(scales_hat)
        y_strings = self.gaussian_conditional.compress(y, indexes, means_hat)
        symbols = self.gaussian_conditional.quantize(y, "symbols", means_hat)  # what `compress` codes
        y_hat = self.gaussian_conditional.dequantize(symbols, means_hat)  # what decoding them returns
        return {"strings": [y_strings], "shape": y.shape[2:4], "y_hat": y_hat}


class CroppingGainHyperLatentCodec(GainHyperLatentCodec):
    """compressai's `GainHyperLatentCodec` for a y of any size: y is padded (replicate, right and
    bottom) to a multiple of `multiple` before `h_a`, and the parameters `h_s` returns are cropped
    back to y's size, so only y's own positions are entropy-coded. For y whose sides are already
    multiples it computes exactly what the parent does. `decompress` takes the shape
    (z_h, z_w, y_h, y_w) (see `LatentCompressor.code_shapes`)."""

    def __init__(self, entropy_bottleneck: EntropyBottleneck, h_a: nn.Module, h_s: nn.Module, multiple: int) -> None:
        super().__init__(entropy_bottleneck=entropy_bottleneck, h_a=h_a, h_s=h_s)
        self.multiple = multiple

    def _analyse(self, y: Tensor, gain: Tensor) -> Tensor:
        pad_h, pad_w = (-y.shape[-2]) % self.multiple, (-y.shape[-1]) % self.multiple
        if pad_h or pad_w:
            y = F.pad(y, (0, pad_w, 0, pad_h), mode="replicate")
        return self.h_a(y) * gain

    def _params(self, z_hat: Tensor, gain_inv: Tensor, y_hw: tuple[int, int]) -> Tensor:
        return self.h_s(z_hat * gain_inv)[..., : y_hw[0], : y_hw[1]]

    def forward(self, y: Tensor, gain: Tensor, gain_inv: Tensor) -> dict:
        z_hat, z_likelihoods = self.entropy_bottleneck(self._analyse(y, gain))
        return {"likelihoods": {"z": z_likelihoods}, "params": self._params(z_hat, gain_inv, y.shape[-2:])}

    def compress(self, y: Tensor, gain: Tensor, gain_inv: Tensor) -> dict:
        z = self._analyse(y, gain)
        shape = z.size()[-2:]
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, shape)
        return {"strings": [z_strings], "shape": shape, "params": self._params(z_hat, gain_inv, y.shape[-2:])}

    def decompress(self, strings: list[list[bytes]], shape: tuple[int, int, int, int], gain_inv: Tensor, **kwargs) -> dict:
        (z_strings,) = strings
        z_h, z_w, y_h, y_w = shape
        z_hat = self.entropy_bottleneck.decompress(z_strings, (z_h, z_w))
        return {"params": self._params(z_hat, gain_inv, (y_h, y_w))}


class LatentCompressor(EntropyTablesMixin, CompressionModel, ModelMixin, ConfigMixin):
    """Variable-rate ELIC-style compressor of a (B, latent_channels, h, w) latent.

    `h` and `w` must be multiples of `2 ** (analysis_downsamples + 1)` (`min_latent_multiple`); the
    hyperprior pads y internally (`CroppingGainHyperLatentCodec`), so padding the latent further,
    to `latent_multiple`, is not needed (it only adds coded positions).
    `level` is always the 0-based index into the gain tables (`osdiff.rate.level_index` of the
    1-based quality users give); higher codes more bits.
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
                    "y": SymbolGaussianConditionalLatentCodec(
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
                "hyper": CroppingGainHyperLatentCodec(
                    entropy_bottleneck=EntropyBottleneck(n),
                    h_a=_hyper_analysis(m, n, hyper_downsamples),
                    h_s=_hyper_synthesis(n, m, hyper_downsamples),
                    multiple=2**hyper_downsamples,
                ),
            }
        )
        # Gains per quality level, spaced geometrically (x4 from lowest to highest) at init.
        init = torch.exp(torch.linspace(math.log(0.5), math.log(2.0), num_quality_levels))
        self.y_gain = nn.Parameter(init[:, None].repeat(1, m))
        self.y_gain_inv = nn.Parameter((1.0 / init)[:, None].repeat(1, m))
        self.z_gain = nn.Parameter(init[:, None].repeat(1, n))
        self.z_gain_inv = nn.Parameter((1.0 / init)[:, None].repeat(1, n))
        zero_checkerboard_masks(self)
        self.keep_tables_out_of_state_dict()

    def entropy_parameter_modules(self) -> list[nn.Module]:
        """The networks whose outputs choose the entropy models: hyper-synthesis, channel
        context, checkerboard context and parameter aggregation of every group."""
        return channel_group_entropy_networks(self.latent_codec)

    def coding_context(self):
        """Within the block the entropy parameter networks run as `compress`/`decompress` run
        them: in exact fixed point if the config says `exact_entropy_parameters`."""
        if self.config.exact_entropy_parameters:
            return exact_modules(self.entropy_parameter_modules())
        return contextlib.nullcontext()

    GAIN_NAMES = ("y_gain", "y_gain_inv", "z_gain", "z_gain_inv")

    def gain_parameters(self) -> list[nn.Parameter]:
        """The per-level gain tables (what `StageConfig.train: gains` trains)."""
        return [getattr(self, name) for name in self.GAIN_NAMES]

    def with_lower_levels(self, count: int) -> "LatentCompressor":
        """A copy with `count` new quality levels below the lowest (the old level k becomes
        k + count): each new level's gains continue the lowest two levels' per-channel ratio
        geometrically (g_-1 = g_0 * g_0 / g_1), a start for training them (`train: gains`)."""
        if count < 1 or self.config.num_quality_levels < 2:
            raise ValueError("with_lower_levels needs count >= 1 and a compressor with at least two levels")
        config = {k: v for k, v in self.config.items() if not k.startswith("_")}
        config["num_quality_levels"] = self.config.num_quality_levels + count
        other = type(self)(**config)
        state = dict(self.state_dict())
        with torch.no_grad():
            for name in self.GAIN_NAMES:
                table = getattr(self, name)
                ratio = table[0] / table[1]
                new = [table[0] * ratio ** (count - i) for i in range(count)]
                state[name] = torch.cat([torch.stack(new), table])
        other.load_state_dict(state)
        return other.to(device=self.y_gain.device, dtype=self.y_gain.dtype)

    # ---- shapes ---------------------------------------------------------------------------
    @property
    def latent_multiple(self) -> int:
        """A latent whose sides are multiples of this is coded without any internal padding
        (every network sees whole positions); the training crops use it."""
        return 2 ** (self.config.analysis_downsamples + self.config.hyper_downsamples)

    @property
    def min_latent_multiple(self) -> int:
        """Latent height and width must be multiples of this: the analysis downsampling, and
        an even y for the checkerboard's 2x2 anchor pattern."""
        return 2 ** (self.config.analysis_downsamples + 1)

    def _check_latent(self, latent_hw: tuple[int, ...]) -> None:
        if any(side % self.min_latent_multiple for side in latent_hw):
            raise ValueError(f"latent sides {tuple(latent_hw)} must be multiples of {self.min_latent_multiple}")

    def code_shapes(self, latent_hw: tuple[int, int]) -> dict:
        """The `shape` argument compressai's decompress needs, from the latent (h, w): y's
        (channels, h, w) per group, and (z_h, z_w, y_h, y_w) for the hyperprior."""
        self._check_latent(latent_hw)
        h, w = latent_hw
        ya = 2 ** self.config.analysis_downsamples
        yh, yw = h // ya, w // ya
        zm = 2 ** self.config.hyper_downsamples
        return {
            "y": [(g, yh, yw) for g in self.groups],
            "hyper": (-(-yh // zm), -(-yw // zm), yh, yw),
        }

    def max_symbols_per_string(self, latent_hw: tuple[int, int]) -> int:
        """An upper bound on the symbols any one string codes (a whole group, or all of z)."""
        shapes = self.code_shapes(latent_hw)
        _, yh, yw = shapes["y"][0]
        zh, zw, _, _ = shapes["hyper"]
        return max(max(self.groups) * yh * yw, self.config.hidden_channels * zh * zw)

    def num_strings(self) -> int:
        """Entropy-coded byte strings per image: 2 checkerboard passes per group, plus z."""
        return 2 * len(self.groups) + 1

    def _gains(self, level: Tensor | int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Gain vectors (B or 1, ch, 1, 1) for quality index/indices `level`."""
        idx = torch.as_tensor(level, device=self.y_gain.device).long().reshape(-1)
        pick = lambda p: p[idx][:, :, None, None]  # noqa: E731
        return pick(self.y_gain), pick(self.z_gain), pick(self.y_gain_inv), pick(self.z_gain_inv)

    def coding_gains(self, level: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Gain vectors (1, ch, 1, 1) for a 0-based, possibly fractional quality `level` (a
        multiple of 1/256): a whole level uses exactly the stored vectors, a level between two
        the geometric interpolation of osdiff.entropy.gains (the same bits on every machine)."""
        level = float(level)
        if level.is_integer():
            return self._gains(int(level))
        low = int(level)
        k = round((level - low) * QUALITY_STEPS)
        if not 0 <= low < self.config.num_quality_levels - 1 or (level - low) * QUALITY_STEPS != k:
            raise ValueError(f"level {level} is not a multiple of 1/{QUALITY_STEPS} between two levels")
        pick = lambda p: interpolate_gains(p[low], p[low + 1], k)[None, :, None, None]  # noqa: E731
        return pick(self.y_gain), pick(self.z_gain), pick(self.y_gain_inv), pick(self.z_gain_inv)

    # ---- training -------------------------------------------------------------------------
    def forward(self, latent: Tensor, level: Tensor | int) -> dict:
        """Training pass with quantisation proxies.

        Returns {"hint": (B,C,h,w), "likelihoods": {"y": ..., "z": ...}}; the rate in bits is
        -sum(log2(likelihoods)).
        """
        self._check_latent(latent.shape[-2:])
        y = self.g_a(latent)
        out = self.latent_codec(y, *self._gains(level))
        return {"hint": self.g_s(out["y_hat"]), "likelihoods": out["likelihoods"]}

    # ---- coding ---------------------------------------------------------------------------
    @torch.no_grad()
    def compress(self, latent: Tensor, level: float, hint: bool = True) -> dict:
        """Latent (1,C,h,w) -> {"strings": list of `num_strings()` bytes, "hint": (1,C,h,w)};
        `level`: 0-based, fractional in 1/256 steps (see `coding_gains`); `hint` False: strings
        only (an encoder does not need the decoder's hint; 15 ms at 512x768)."""
        if latent.shape[0] != 1:
            raise ValueError("compress codes one latent at a time")
        self._check_latent(latent.shape[-2:])
        y = self.g_a(latent)
        with self.coding_context():
            out = self.latent_codec.compress(y, *self.coding_gains(level))
        strings = [s[0] for s in out["strings"]]
        if not hint:
            return {"strings": strings}
        return {"strings": strings, "hint": self.g_s(out["y_hat"].to(y.dtype).contiguous())}

    @torch.no_grad()
    def decompress(self, strings: list[bytes], latent_hw: tuple[int, int], level: float) -> Tensor:
        """Strings from `compress` and the latent (h, w) -> hint (1,C,h,w)."""
        _, _, y_gain_inv, z_gain_inv = self.coding_gains(level)
        symbols = self.max_symbols_per_string(latent_hw)
        with self.coding_context():
            out = self.latent_codec.decompress(
                [[pad_for_rans(s, symbols)] for s in strings], self.code_shapes(latent_hw), y_gain_inv, z_gain_inv
            )
        return self.g_s(out["y_hat"].to(y_gain_inv.dtype).contiguous())

    def after_load(self) -> None:
        zero_checkerboard_masks(self)


__all__ = ["LatentCompressor", "ENTROPY_TABLES_FILE", "channel_group_entropy_networks", "zero_checkerboard_masks"]
