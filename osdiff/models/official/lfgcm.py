"""The official OSDiff latent compressor (LFGCM, `cheesejiang/OSDiff` model/lfgcm.py), written
from its architecture. Module names follow the official state dict (`preprocess_model.*`), so
the converter maps its keys one to one; the SFT modules, `sft_feature*` and `f_c`, which the
official code builds but never runs, are not built here.

    latent (B,4,h,w) --encoder--> y (B,M,h/2,w/2) --hyper_enc--> z (B,N,h/8,w/8)
    z --EntropyBottleneck--> z_hat --hyper_dec--> hyper (B,2M,h/2,w/2)
    y in channel slices (slice_ch); each slice in two checkerboard passes: anchors (i+j odd)
    from entropy_parameters_anchor[k](channel_ctx, hyper), then non-anchors from
    entropy_parameters_nonanchor[k](local_ctx(anchors), channel_ctx, hyper); parameters are
    (scales, means) in that order; one rANS string for all of y, one for z
    y_hat --decoder--> hint (B,4,h,w)

Coding modes (`compress(..., exact=)`):
  float  the official arithmetic (float32 networks): decodes strings the official `compress`
         wrote, and writes strings the official `decompress` reads.
  exact  the networks that choose the entropy models (hyper_dec, channel/local context, the
         entropy parameters) run in osdiff's fixed point (osdiff.entropy.exact, GELU by table),
         so strings decode identically on every machine. Not interchangeable with float strings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from compressai.ans import BufferedRansEncoder, RansDecoder
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.models.base import CompressionModel, get_scale_table
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from ...entropy.exact import exact_forward
from ...entropy.rans import pad_for_rans
from ...entropy.tables import EntropyTablesMixin


def conv(c_in: int, c_out: int, kernel_size: int = 5, stride: int = 2) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2)


def deconv(c_in: int, c_out: int, kernel_size: int = 5, stride: int = 2) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(c_in, c_out, kernel_size, stride=stride, output_padding=stride - 1, padding=kernel_size // 2)


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)


def conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride)


class ResidualBlockWithStride(nn.Module):
    """conv3x3/2 - LeakyReLU(0.01) - conv3x3 - LeakyReLU(0.1), plus a 1x1/2 skip."""

    def __init__(self, c_in: int, c_out: int, stride: int = 2) -> None:
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.conv2 = conv3x3(c_out, c_out)
        self.downsample = conv1x1(c_in, c_out, stride) if stride != 1 else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.leaky_relu(self.conv2(F.leaky_relu(self.conv1(x))), 0.1)
        return out + (x if self.downsample is None else self.downsample(x))


class ResidualBlockUpsample(nn.Module):
    """Sub-pixel (1x1 conv + PixelShuffle) x2 upsampling with a sub-pixel skip."""

    def __init__(self, c_in: int, c_out: int, upsample: int = 2) -> None:
        super().__init__()
        self.subpel_conv = nn.Sequential(nn.Conv2d(c_in, c_out * upsample**2, 1), nn.PixelShuffle(upsample))
        self.conv = conv3x3(c_out, c_out)
        self.upsample = nn.Sequential(nn.Conv2d(c_in, c_out * upsample**2, 1), nn.PixelShuffle(upsample))

    def forward(self, x: Tensor) -> Tensor:
        out = F.leaky_relu(self.conv(F.leaky_relu(self.subpel_conv(x))), 0.1)
        return out + self.upsample(x)


class ResidualBottleneck(nn.Module):
    """x + (1x1 -> GELU -> 3x3 -> GELU -> 1x1)(x), half width inside."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(conv1x1(n, n // 2), nn.GELU(), conv3x3(n // 2, n // 2), nn.GELU(), conv1x1(n // 2, n))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


class Encoder(nn.Module):
    def __init__(self, in_nc: int, mid: int, m: int) -> None:
        super().__init__()
        self.g_a1 = nn.Sequential(ResidualBlockWithStride(in_nc, mid), *(ResidualBottleneck(mid) for _ in range(3)))
        self.g_a6 = conv3x3(mid, m)

    def forward(self, x: Tensor) -> Tensor:
        return self.g_a6(self.g_a1(x))


class Decoder(nn.Module):
    def __init__(self, n: int, m: int, out_nc: int) -> None:
        super().__init__()
        self.g_s2 = nn.Sequential(conv3x3(m, n), *(ResidualBottleneck(n) for _ in range(3)))
        self.g_s3 = nn.Sequential(ResidualBlockUpsample(n, n), *(ResidualBottleneck(n) for _ in range(3)))
        self.g_s4 = conv3x3(n, out_nc)

    def forward(self, x: Tensor) -> Tensor:
        return self.g_s4(self.g_s3(self.g_s2(x)))


class HyperEncoder(nn.Module):
    """What the official HyperEncoder runs: h_a0 -> GELU -> h_a3 (/2) -> GELU -> h_a6 (/2) -> h_a9."""

    def __init__(self, n: int, m: int) -> None:
        super().__init__()
        self.h_a0 = conv3x3(m, n)
        self.h_a3 = conv(n, n)
        self.h_a6 = conv(n, n)
        self.h_a9 = conv1x1(n, n)

    def forward(self, y: Tensor) -> Tensor:
        return self.h_a9(self.h_a6(F.gelu(self.h_a3(F.gelu(self.h_a0(y))))))


class HyperDecoder(nn.Module):
    def __init__(self, n: int, m: int) -> None:
        super().__init__()
        self.hyper_dec = nn.Sequential(
            deconv(n, m), nn.GELU(), deconv(m, m * 3 // 2), nn.GELU(), deconv(m * 3 // 2, m * 2, kernel_size=3, stride=1),
        )


class ChannelContextEX(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, widths: tuple[int, int]) -> None:
        super().__init__()
        self.fushion = nn.Sequential(  # (sic): the official name
            nn.Conv2d(in_dim, widths[0], 5, padding=2), nn.GELU(),
            nn.Conv2d(widths[0], widths[1], 5, padding=2), nn.GELU(),
            nn.Conv2d(widths[1], out_dim, 5, padding=2),
        )


class EntropyParametersEX(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fusion = nn.Sequential(
            nn.Conv2d(in_dim, out_dim * 5 // 3, 1), nn.GELU(),
            nn.Conv2d(out_dim * 5 // 3, out_dim * 4 // 3, 1), nn.GELU(),
            nn.Conv2d(out_dim * 4 // 3, out_dim, 1),
        )


# ---- checkerboard (anchors where i + j is odd) ---------------------------------------------
def ckbd_anchor(x: Tensor) -> Tensor:
    out = torch.zeros_like(x)
    out[:, :, 0::2, 1::2] = x[:, :, 0::2, 1::2]
    out[:, :, 1::2, 0::2] = x[:, :, 1::2, 0::2]
    return out


def ckbd_nonanchor(x: Tensor) -> Tensor:
    out = torch.zeros_like(x)
    out[:, :, 0::2, 0::2] = x[:, :, 0::2, 0::2]
    out[:, :, 1::2, 1::2] = x[:, :, 1::2, 1::2]
    return out


def _squeeze(x: Tensor, anchor: bool) -> Tensor:
    """(B,C,H,W) -> (B,C,H,W/2): the anchor (or non-anchor) positions of each row."""
    b, c, h, w = x.shape
    out = x.new_zeros((b, c, h, w // 2))
    even, odd = (1, 0) if anchor else (0, 1)
    out[:, :, 0::2] = x[:, :, 0::2, even::2]
    out[:, :, 1::2] = x[:, :, 1::2, odd::2]
    return out


def _unsqueeze(x: Tensor, anchor: bool) -> Tensor:
    b, c, h, w = x.shape
    out = x.new_zeros((b, c, h, w * 2))
    even, odd = (1, 0) if anchor else (0, 1)
    out[:, :, 0::2, even::2] = x[:, :, 0::2]
    out[:, :, 1::2, odd::2] = x[:, :, 1::2]
    return out


class OfficialLFGCM(EntropyTablesMixin, CompressionModel, ModelMixin, ConfigMixin):
    """The official LFGCM (see the module docstring). Latent h, w must be multiples of 8."""

    @register_to_config
    def __init__(
        self,
        in_nc: int = 4,
        out_nc: int = 4,
        enc_mid: tuple[int, ...] = (64, 128, 192, 192),
        N: int = 192,
        M: int = 320,
        slice_ch: tuple[int, ...] = (8, 8, 8, 8, 16, 16, 32, 32, 96, 96),
        channel_context_widths: tuple[int, int] = (224, 128),
    ) -> None:
        super().__init__()
        slice_ch = list(slice_ch)
        if sum(slice_ch) != M:
            raise ValueError(f"slice_ch {slice_ch} must sum to M={M}")
        self.slice_ch = slice_ch
        self.encoder = Encoder(in_nc, enc_mid[0], M)
        self.hyper_enc = HyperEncoder(N, M)
        self.hyper_dec = HyperDecoder(N, M)
        self.decoder = Decoder(N, M, out_nc)
        self.local_context = nn.ModuleList(nn.Conv2d(c, c * 2, 5, padding=2) for c in slice_ch)
        self.channel_context = nn.ModuleList(
            ChannelContextEX(sum(slice_ch[:i]), slice_ch[i] * 2, tuple(channel_context_widths)) if i else None
            for i in range(len(slice_ch))
        )
        self.entropy_parameters_anchor = nn.ModuleList(
            EntropyParametersEX(M * 2 + (slice_ch[i] * 2 if i else 0), slice_ch[i] * 2) for i in range(len(slice_ch))
        )
        self.entropy_parameters_nonanchor = nn.ModuleList(
            EntropyParametersEX(M * 2 + slice_ch[i] * (4 if i else 2), slice_ch[i] * 2) for i in range(len(slice_ch))
        )
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.gaussian_conditional = GaussianConditional(None)
        self.keep_tables_out_of_state_dict()

    latent_multiple = 8

    def update(self, scale_table=None, force: bool = False, update_quantiles: bool = False) -> bool:
        """Entropy tables, with the official scale table (64 scales, 0.11 .. 256)."""
        return super().update(get_scale_table() if scale_table is None else scale_table, force=force)

    # ---- helpers ---------------------------------------------------------------------------
    def _params(self, net: nn.Sequential, x: Tensor, exact: bool) -> tuple[Tensor, Tensor]:
        out = exact_forward(net, x) if exact else net(x)
        scales, means = out.chunk(2, 1)
        return scales, means

    def _net(self, net: nn.Module, x: Tensor, exact: bool) -> Tensor:
        return exact_forward(net, x) if exact else net(x)

    def _slice_contexts(self, k: int, y_hat_slices: list[Tensor], hyper: Tensor, exact: bool):
        if k == 0:
            return None, hyper
        ctx = self._net(self.channel_context[k].fushion, torch.cat(y_hat_slices, 1), exact)
        return ctx, torch.cat([ctx, hyper], 1)

    def _code_slices(self, hyper: Tensor, exact: bool, code_pass) -> Tensor:
        """Walk the slices and checkerboard passes; `code_pass(scales, means, anchor, k)`
        codes one pass (squeezed shapes) and returns its y_hat (squeezed)."""
        y_hat_slices: list[Tensor] = []
        for k in range(len(self.slice_ch)):
            ctx, anchor_in = self._slice_contexts(k, y_hat_slices, hyper, exact)
            scales, means = self._params(self.entropy_parameters_anchor[k].fusion, anchor_in, exact)
            anchor = _unsqueeze(code_pass(_squeeze(scales, True), _squeeze(means, True), True, k), True)
            local = self._net(self.local_context[k], anchor, exact)
            non_in = torch.cat([local, hyper] if ctx is None else [local, ctx, hyper], 1)
            scales, means = self._params(self.entropy_parameters_nonanchor[k].fusion, non_in, exact)
            nonanchor = _unsqueeze(code_pass(_squeeze(scales, False), _squeeze(means, False), False, k), False)
            y_hat_slices.append(anchor + nonanchor)
        return torch.cat(y_hat_slices, 1)

    def _tables(self):
        gc = self.gaussian_conditional
        return gc.quantized_cdf.tolist(), gc.cdf_length.reshape(-1).int().tolist(), gc.offset.reshape(-1).int().tolist()

    # ---- coding ----------------------------------------------------------------------------
    @torch.no_grad()
    def compress(self, latent: Tensor, exact: bool = True) -> dict:
        """Latent (1,4,h,w) -> {"strings": [y_string, z_string], "z_shape": (h/8, w/8), "y_hat"}."""
        y = self.encoder(latent)
        z = self.hyper_enc(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        hyper = self._net(self.hyper_dec.hyper_dec, z_hat, exact)
        if exact:
            hyper = hyper.to(torch.float64)
        starts = [sum(self.slice_ch[:k]) for k in range(len(self.slice_ch) + 1)]
        symbols: list[int] = []
        indexes: list[int] = []
        gc = self.gaussian_conditional

        def code_pass(scales: Tensor, means: Tensor, anchor: bool, k: int) -> Tensor:
            y_k = _squeeze(y[:, starts[k] : starts[k + 1]], anchor)
            q = torch.round(y_k.to(means.dtype) - means)
            symbols.extend(q.int().reshape(-1).tolist())
            indexes.extend(gc.build_indexes(scales).reshape(-1).tolist())
            return q.int() + means

        y_hat = self._code_slices(hyper, exact, code_pass)
        encoder = BufferedRansEncoder()
        encoder.encode_with_indexes(symbols, indexes, *self._tables())
        return {"strings": [encoder.flush(), z_strings[0]], "z_shape": tuple(z.shape[-2:]), "y_hat": y_hat.float()}

    @torch.no_grad()
    def decompress_y(self, strings: list[bytes], z_shape: tuple[int, int], exact: bool = True) -> Tensor:
        """[y_string, z_string] and the z (h, w) -> y_hat (1,M,4h,4w) (float32)."""
        y_string, z_string = strings
        y_symbols = sum(self.slice_ch) * 16 * z_shape[0] * z_shape[1]
        z_hat = self.entropy_bottleneck.decompress([pad_for_rans(z_string, self.config.N * z_shape[0] * z_shape[1])], z_shape)
        hyper = self._net(self.hyper_dec.hyper_dec, z_hat, exact)
        if exact:
            hyper = hyper.to(torch.float64)
        decoder = RansDecoder()
        decoder.set_stream(pad_for_rans(y_string, y_symbols))
        tables = self._tables()
        gc = self.gaussian_conditional

        def code_pass(scales: Tensor, means: Tensor, anchor: bool, k: int) -> Tensor:
            values = decoder.decode_stream(gc.build_indexes(scales).reshape(-1).tolist(), *tables)
            return torch.tensor(values, dtype=torch.float32, device=means.device).reshape(scales.shape) + means

        return self._code_slices(hyper, exact, code_pass).float()

    @torch.no_grad()
    def decompress(self, strings: list[bytes], z_shape: tuple[int, int], exact: bool = True) -> Tensor:
        """[y_string, z_string] -> hint (1,4,8h,8w) for a z of (h, w)."""
        return self.decoder(self.decompress_y(strings, z_shape, exact))

    # ---- training --------------------------------------------------------------------------
    def forward(self, latent: Tensor) -> dict:
        """Training pass as the official forward: straight-through rounding around the means.
        Returns {"hint", "y_hat", "likelihoods": {"y", "z"}}."""
        y = self.encoder(latent)
        z = self.hyper_enc(y)
        _, z_likelihoods = self.entropy_bottleneck(z)
        offset = self.entropy_bottleneck._get_medians()
        z_hat = torch.round(z - offset).detach() + (z - offset) - (z - offset).detach() + offset
        hyper = self.hyper_dec.hyper_dec(z_hat)
        starts = [sum(self.slice_ch[:k]) for k in range(len(self.slice_ch) + 1)]
        ste = lambda v, mu: (torch.round(v - mu) - (v - mu)).detach() + v  # noqa: E731
        y_hat_slices, likelihoods = [], []
        for k in range(len(self.slice_ch)):
            y_k = y[:, starts[k] : starts[k + 1]]
            ctx, anchor_in = self._slice_contexts(k, y_hat_slices, hyper, False)
            s_a, m_a = self.entropy_parameters_anchor[k].fusion(anchor_in).chunk(2, 1)
            s_a, m_a = ckbd_anchor(s_a), ckbd_anchor(m_a)
            anchor = ste(ckbd_anchor(y_k), m_a)
            local = self.local_context[k](anchor)
            non_in = torch.cat([local, hyper] if ctx is None else [local, ctx, hyper], 1)
            s_n, m_n = self.entropy_parameters_nonanchor[k].fusion(non_in).chunk(2, 1)
            s_n, m_n = ckbd_nonanchor(s_n), ckbd_nonanchor(m_n)
            _, lik = self.gaussian_conditional(y_k, s_a + s_n, m_a + m_n)
            likelihoods.append(lik)
            y_hat_slices.append(anchor + ste(ckbd_nonanchor(y_k), m_n))
        y_hat = torch.cat(y_hat_slices, 1)
        return {"hint": self.decoder(y_hat), "y_hat": y_hat,
                "likelihoods": {"y": torch.cat(likelihoods, 1), "z": z_likelihoods}}


__all__ = ["OfficialLFGCM", "ckbd_anchor", "ckbd_nonanchor"]
