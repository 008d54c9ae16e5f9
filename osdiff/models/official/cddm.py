"""The official OSDiff control module (CDDM, `cheesejiang/OSDiff` model/osdiff.py), written from
its architecture with diffusers blocks, driving a diffusers `UNet2DConditionModel`.

    control encoder: an ldm UNet encoder + middle block at `control_model_ratio` of the base
    width (GroupNorm with the largest group count <= 32 dividing the channels, attention heads
    of `num_head_channels`), its OWN time-embedding MLP, first conv on cat(x_t, hint)
    (8 channels); no connections from the base UNet into it.
    injection: after each of the base UNet's 12 input blocks (ldm granularity: conv_in, each
    resnet(+attention), each downsampler) and after its middle block, a zero 1x1 conv of the
    matching control feature is added (times `scale_list[i]`); before each of the 12 output
    blocks, a zero conv of the control encoder's features (last first) is added.

`controlled_unet_forward` runs the frozen base UNet with these additions and returns its
output (epsilon for SD 2.1 base). Parameter names follow diffusers; osdiff.convert.official
maps the official `control_model.*` keys onto them.
"""
from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import Downsample2D, ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import Tensor, nn


def find_denominator(number: int, start: int) -> int:
    """The largest divisor of `number` that is <= `start` (the official helper)."""
    if start >= number:
        return number
    while start != 0:
        if number % start == 0:
            return start
        start -= 1
    return 1


def _resnet(c_in: int, c_out: int, temb: int) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels=c_in, out_channels=c_out, temb_channels=temb, eps=1e-5,
        groups=find_denominator(c_in, 32), groups_out=find_denominator(c_out, 32), dropout=0.0,
    )


def _transformer(ch: int, heads: int, dim_head: int, depth: int, context_dim: int) -> Transformer2DModel:
    return Transformer2DModel(
        num_attention_heads=heads, attention_head_dim=dim_head, in_channels=ch, num_layers=depth,
        cross_attention_dim=context_dim, use_linear_projection=True,
        norm_num_groups=find_denominator(ch, 32),  # ldm: 32 (its widths are multiples of 32)
    )


def base_block_channels(model_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int) -> dict:
    """Output channels of the ldm base UNet's input blocks, middle block and output blocks."""
    enc = [model_channels]
    for level, mult in enumerate(channel_mult):
        enc += [mult * model_channels] * num_res_blocks
        if level != len(channel_mult) - 1:
            enc.append(mult * model_channels)
    dec = []
    for level, mult in list(enumerate(channel_mult))[::-1]:
        dec += [mult * model_channels] * (num_res_blocks + 1)
    return {"enc": enc, "mid": channel_mult[-1] * model_channels, "dec": dec}


class CDDMControl(ModelMixin, ConfigMixin):
    """The control branch of the official CDDM (see the module docstring)."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        hint_channels: int = 4,
        model_channels: int = 320,
        channel_mult: tuple[int, ...] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (4, 2, 1),
        num_head_channels: int = 16,
        transformer_depth: int = 1,
        context_dim: int = 1024,
        control_model_ratio: float = 0.2,
        control_scale: float = 1.0,
    ) -> None:
        super().__init__()
        temb = model_channels * 4
        self.time_embedding = TimestepEmbedding(model_channels, temb)
        ch = int(model_channels * control_model_ratio)
        self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(in_channels + hint_channels, ch, 3, padding=1)])])
        enc_out = [ch]
        head_channels, ds = num_head_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out = mult * int(model_channels * control_model_ratio)
                layers: list[nn.Module] = [_resnet(ch, out, temb)]
                ch = out
                if ds in attention_resolutions:
                    head_channels = find_denominator(ch, num_head_channels)
                    layers.append(_transformer(ch, ch // head_channels, head_channels, transformer_depth, context_dim))
                self.input_blocks.append(nn.ModuleList(layers))
                enc_out.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(nn.ModuleList([Downsample2D(ch, use_conv=True, out_channels=ch, padding=1, name="op")]))
                enc_out.append(ch)
                ds *= 2
        heads = ch // head_channels  # as the official code: the last head size of the loop
        self.middle_block = nn.ModuleList([
            _resnet(ch, ch, temb), _transformer(ch, heads, head_channels, transformer_depth, context_dim), _resnet(ch, ch, temb),
        ])
        base = base_block_channels(model_channels, tuple(channel_mult), num_res_blocks)
        zero = lambda c_in, c_out: nn.Conv2d(c_in, c_out, 1)  # noqa: E731  (zero-initialised below)
        self.enc_zero_convs = nn.ModuleList(zero(enc_out[i], base["enc"][i]) for i in range(len(enc_out)))
        self.middle_zero_conv = zero(ch, base["mid"])
        self.dec_zero_convs = nn.ModuleList(
            [zero(enc_out[-1], base["mid"])] + [zero(enc_out[-(i + 1)], base["dec"][i - 1]) for i in range(1, len(enc_out))]
        )
        for conv in [*self.enc_zero_convs, self.middle_zero_conv, *self.dec_zero_convs]:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        n = len(self.enc_zero_convs) + 1 + len(self.dec_zero_convs)
        self.register_buffer("scale_list", torch.ones(n) * control_scale)

    def encoder_features(self, x: Tensor, hint: Tensor, emb: Tensor, context: Tensor) -> tuple[list[Tensor], Tensor]:
        """Control features after each input block, and after the middle block."""
        h = torch.cat([x, hint], 1)
        feats = []
        for block in self.input_blocks:
            for layer in block:
                h = _run(layer, h, emb, context)
            feats.append(h)
        for layer in self.middle_block:
            h = _run(layer, h, emb, context)
        return feats, h


def _run(layer: nn.Module, h: Tensor, emb: Tensor, context: Tensor) -> Tensor:
    if isinstance(layer, ResnetBlock2D):
        return layer(h, emb)
    if isinstance(layer, Transformer2DModel):
        return layer(h, encoder_hidden_states=context, return_dict=False)[0]
    return layer(h)


def timestep_features(t: Tensor, dim: int) -> Tensor:
    """ldm's sinusoidal embedding (cos first, 10000 max period), float32 (B, dim)."""
    return get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)


def controlled_unet_forward(control: CDDMControl, unet: UNet2DConditionModel, x: Tensor, t: Tensor | int,
                            context: Tensor, hint: Tensor) -> Tensor:
    """The official CDDM forward: x_t (B,4,h,w), timestep(s), context (B,77,D), hint (B,4,h,w)
    -> the base UNet's output (B,4,h,w), with the control additions."""
    t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
    t_emb = timestep_features(t, unet.config.block_out_channels[0]).to(x.dtype)
    emb = control.time_embedding(t_emb)
    emb_base = unet.time_embedding(t_emb)
    feats, mid = control.encoder_features(x, hint.to(x.dtype), emb, context)
    scales = iter(control.scale_list)
    enc_convs = iter(control.enc_zero_convs)
    hs = []

    def inject(h: Tensor) -> Tensor:
        h = h + next(enc_convs)(feats[len(hs)]) * next(scales)
        hs.append(h)
        return h

    h = inject(unet.conv_in(x))
    for block in unet.down_blocks:
        attentions = getattr(block, "attentions", None)
        for i, resnet in enumerate(block.resnets):
            h = resnet(h, emb_base)
            if attentions is not None:
                h = attentions[i](h, encoder_hidden_states=context, return_dict=False)[0]
            h = inject(h)
        if block.downsamplers is not None:
            h = inject(block.downsamplers[0](h))
    h = unet.mid_block(h, emb_base, encoder_hidden_states=context)
    h = h + control.middle_zero_conv(mid) * next(scales)
    dec_convs = iter(control.dec_zero_convs)
    ctrl = list(feats)
    for block in unet.up_blocks:
        attentions = getattr(block, "attentions", None)
        for i, resnet in enumerate(block.resnets):
            h = h + next(dec_convs)(ctrl.pop()) * next(scales)
            h = resnet(torch.cat([h, hs.pop()], 1), emb_base)
            if attentions is not None:
                h = attentions[i](h, encoder_hidden_states=context, return_dict=False)[0]
        if block.upsamplers is not None:
            h = block.upsamplers[0](h)
    h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


__all__ = ["CDDMControl", "controlled_unet_forward", "base_block_channels", "find_denominator"]
