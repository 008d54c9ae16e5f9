"""Pretrained tiny latent autoencoder (TAESD family) as a frozen osdiff `vae` component.

    image x (B,3,H,W) in [-1,1] --encoder--> raw latent (B,32,H/8,W/8)
        --(z - mean) / std per channel--> normalised latent z (what compressor and UNet see)
    z --z * std + mean--> raw latent --decoder--> image (B,3,H,W) in [-1,1]

The encoder is TAEF2's (MIT licence, Ollin Boer Bohan: TAESD for the FLUX.2 VAE, 32 channels,
1/8 resolution, "flux_2" mid-block GroupNorm), or a slim student distilled from it
(`encoder_channels`: a 4x pixel unshuffle, then convolutions at 1/4 and 1/8 resolution only,
no GroupNorm; ~14x cheaper). The decoder is either TAEF2's own (the teacher:
sharp, ~4 s for 512x768 on 2 CPU cores) or a slimmer student distilled from it
(`decoder_channels`): same input latent space, widths shrinking towards full resolution, no
GroupNorm, so it is purely local (tiles decode like the whole) and ~8x cheaper.

The layers are written here from the published architecture (nn.Sequential indices kept so the
released state dicts load by name); `from_taesd_files` reads the `.pth` pair.
"""
from __future__ import annotations

import os

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from .fused_conv import conv_add_relu, conv_relu, fusable


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of raw latents to (-3, 3): tanh(x / 3) * 3."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """TAESD residual block: three 3x3 convs with ReLU, 1x1 skip when widths differ; with
    `midblock_gn`, a GroupNorm'd 1x1 bottleneck (4x wider) is added to the input first."""

    def __init__(self, n_in: int, n_out: int, midblock_gn: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(inplace=True), _conv(n_out, n_out), nn.ReLU(inplace=True), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU(inplace=True)
        self.pool = None
        if midblock_gn:
            wide = n_in * 4
            self.pool = nn.Sequential(
                nn.Conv2d(n_in, wide, 1, bias=False), nn.GroupNorm(4, wide), nn.ReLU(inplace=True), nn.Conv2d(wide, n_in, 1, bias=False)
            )

    def forward(self, x: Tensor) -> Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        if fusable(x):  # bfloat16 inference on the CPU: ReLUs and the sum inside the convolutions
            h = conv_relu(self.conv[2], conv_relu(self.conv[0], x))
            return conv_add_relu(self.conv[4], h, self.skip(x))
        return self.fuse(self.conv(x) + self.skip(x))


def taesd_encoder(latent_channels: int, midblock_gn: bool) -> nn.Sequential:
    """TAESD encoder: image (B,3,H,W) in [0,1] -> raw latent (B,C,H/8,W/8); width 64."""
    gn = dict(midblock_gn=midblock_gn)
    return nn.Sequential(
        _conv(3, 64), Block(64, 64),
        _conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),
        _conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),
        _conv(64, 64, stride=2, bias=False), Block(64, 64, **gn), Block(64, 64, **gn), Block(64, 64, **gn),
        _conv(64, latent_channels),
    )


def slim_encoder(latent_channels: int, channels: tuple[int, ...], blocks: tuple[int, ...]) -> nn.Sequential:
    """Student encoder: image (B,3,H,W) in [0,1] -> raw latent (B,C,H/8,W/8), H and W multiples
    of 8. A 4x pixel unshuffle (no convolution at full or half resolution, where TAEF2's encoder
    spends ~90 % of its time), `blocks[0]` TAESD blocks of width `channels[0]` at 1/4 resolution,
    a stride-2 conv, `blocks[1]` blocks of width `channels[1]` at 1/8, a 3x3 conv to the latent."""
    if len(channels) != 2 or len(blocks) != 2:
        raise ValueError("slim encoder: need 2 widths and 2 block counts (1/4 and 1/8 resolution)")
    (w4, w8), (b4, b8) = channels, blocks
    return nn.Sequential(
        nn.PixelUnshuffle(4), _conv(48, w4), nn.ReLU(inplace=True), *[Block(w4, w4) for _ in range(b4)],
        _conv(w4, w8, stride=2, bias=False), *[Block(w8, w8) for _ in range(b8)],
        _conv(w8, latent_channels),
    )


TAESD_ENCODER_LAYERS = 15
ENCODER_TAIL_FROM = 10  # taesd_encoder's layers from its last stride-2 conv (1/4 -> 1/8) on


def tail_encoder(latent_channels: int, midblock_gn: bool, channels: tuple[int, ...],
                 blocks: tuple[int, ...]) -> nn.Sequential:
    """Student encoder that keeps the teacher's cheap end: image (B,3,H,W) in [0,1] -> raw latent
    (B,C,H/8,W/8). A 4x pixel unshuffle, `blocks[0]` TAESD blocks of width `channels[0]` at 1/4
    resolution and a 3x3 conv + ReLU to the teacher's width (64) make the teacher's 1/4-resolution
    features, a purely local function of the pixels; then TAEF2's own layers from its last
    stride-2 conv on (its 1/8-resolution blocks, whose GroupNorm sees the whole image, and the
    conv to the latent; copied by `TAESDAutoencoder.with_encoder`). ~3 % of the teacher's cost is
    in that tail."""
    if len(channels) != 1 or len(blocks) != 1:
        raise ValueError("tail encoder: need 1 width and 1 block count (1/4 resolution)")
    (width,), (count,) = channels, blocks
    return nn.Sequential(
        nn.PixelUnshuffle(4), _conv(48, width), nn.ReLU(inplace=True), *[Block(width, width) for _ in range(count)],
        _conv(width, 64), nn.ReLU(inplace=True), *taesd_encoder(latent_channels, midblock_gn)[ENCODER_TAIL_FROM:],
    )


def taesd_decoder(latent_channels: int, midblock_gn: bool) -> nn.Sequential:
    """TAESD decoder: raw latent (B,C,h,w) -> image (B,3,8h,8w), roughly in [0,1]; width 64."""
    gn = dict(midblock_gn=midblock_gn)
    up = lambda: [nn.Upsample(scale_factor=2), _conv(64, 64, bias=False)]  # noqa: E731
    return nn.Sequential(
        Clamp(), _conv(latent_channels, 64), nn.ReLU(inplace=True),
        Block(64, 64, **gn), Block(64, 64, **gn), Block(64, 64, **gn), *up(),
        Block(64, 64), Block(64, 64), Block(64, 64), *up(),
        Block(64, 64), Block(64, 64), Block(64, 64), *up(),
        Block(64, 64), _conv(64, 3),
    )


def slim_decoder(latent_channels: int, channels: tuple[int, ...], blocks: tuple[int, ...]) -> nn.Sequential:
    """Student decoder: raw latent (B,C,h,w) -> image (B,3,8h,8w) in ~[0,1]. `channels[i]` and
    `blocks[i]` are the width and TAESD block count at 1/8, 1/4, 1/2 and full resolution."""
    if len(channels) != 4 or len(blocks) != 4:
        raise ValueError("slim decoder: need 4 widths and 4 block counts (1/8, 1/4, 1/2, 1/1 resolution)")
    layers: list[nn.Module] = [Clamp(), _conv(latent_channels, channels[0]), nn.ReLU(inplace=True)]
    for level, (width, count) in enumerate(zip(channels, blocks)):
        layers += [Block(width, width) for _ in range(count)]
        if level < 3:
            layers += [nn.Upsample(scale_factor=2), _conv(width, channels[level + 1], bias=False)]
    layers.append(_conv(channels[-1], 3))
    return nn.Sequential(*layers)


SLIM_ENCODER_BLOCKS = (2, 3)  # slim_encoder's default block counts at 1/4 and 1/8 resolution
TRUNK_LAYERS = 11  # taesd_decoder's layers up to the 1/4-resolution blocks (indices 0..10)
# trunk depths a trunk decoder may keep: the 1/8 and 1/4 levels (11), or further into the
# 1/2-resolution level: its upsampling conv (13) and then one, two or all three of its blocks
TRUNK_DEPTHS = (11, 13, 14, 15, 16)


def trunk_decoder(latent_channels: int, midblock_gn: bool, channels: tuple[int, ...], blocks: tuple[int, ...],
                  trunk_layers: int = TRUNK_LAYERS) -> nn.Sequential:
    """Student decoder that keeps the teacher's cheap part: TAESD's first `trunk_layers` layers
    (11: the 1/8 and 1/4 levels; 13-16: also the 1/2-resolution upsampling conv and 0-3 of its
    blocks; same names, so the teacher's weights load into them), then one level per
    `channels[i]` / `blocks[i]` at each further doubling, and a 3x3 conv to 3 * s * s channels
    with PixelShuffle(s) for the remaining factor s (no conv at full resolution, where the
    teacher spends ~2/3 of its time)."""
    if trunk_layers not in TRUNK_DEPTHS:
        raise ValueError(f"trunk decoder: trunk_layers must be one of {TRUNK_DEPTHS}, got {trunk_layers}")
    remaining = 4 if trunk_layers == TRUNK_LAYERS else 2  # upsampling factor left after the trunk
    if len(channels) != len(blocks) or 2 ** len(channels) > remaining:
        raise ValueError(f"trunk decoder: need as many widths as block counts, at most {remaining.bit_length() - 1} "
                         f"after a trunk of {trunk_layers} layers")
    layers = list(taesd_decoder(latent_channels, midblock_gn)[:trunk_layers])
    width = 64
    for w, count in zip(channels, blocks):
        layers += [nn.Upsample(scale_factor=2), _conv(width, w, bias=False)] + [Block(w, w) for _ in range(count)]
        width = w
    shuffle = remaining // 2 ** len(channels)
    layers += [_conv(width, 3 * shuffle * shuffle), nn.PixelShuffle(shuffle)] if shuffle > 1 else [_conv(width, 3)]
    return nn.Sequential(*layers)


def decoder_shape(channels, blocks, trunk, trunk_layers=TRUNK_LAYERS) -> tuple:
    """A TAEF2 student decoder's shape, comparable between a vae config and a recipe (widths
    None: the teacher's own decoder)."""
    trunk = bool(trunk) and channels is not None
    return (None if channels is None else tuple(channels), tuple(blocks), trunk, int(trunk_layers) if trunk else None)


class TAESDAutoencoder(ModelMixin, ConfigMixin):
    """Frozen pretrained TAESD-family autoencoder with per-channel latent normalisation.

    `decoder_channels=None`: the teacher's decoder (TAESD layout); else a student with those
    widths and `decoder_blocks`: slim (`slim_decoder`), or with `decoder_trunk` the teacher's
    first `decoder_trunk_layers` layers (11: its 1/8 and 1/4 levels) followed by those widths and
    a pixel shuffle (`trunk_decoder`).
    `encoder_channels=None`: TAEF2's encoder; else a `slim_encoder` of those widths and
    `encoder_blocks`, distilled from it (stage "encoder"), in the same latent space; with
    `encoder_tail` a `tail_encoder` (one width and block count at 1/4, then TAEF2's last layers).
    `latent_mean` / `latent_std` (one per channel, from training photos) map raw latents to
    roughly zero-mean, unit-variance ones.
    """

    # config keys added after models were shipped, with the value those models had: the model
    # hash leaves them out at that value, so older models keep their hash
    hash_neutral_defaults = {"decoder_trunk_layers": TRUNK_LAYERS, "encoder_channels": None,
                             "encoder_blocks": list(SLIM_ENCODER_BLOCKS), "encoder_tail": False}

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 32,
        midblock_gn: bool = True,
        decoder_channels: tuple[int, ...] | None = None,
        decoder_blocks: tuple[int, ...] = (2, 2, 1, 1),
        latent_mean: tuple[float, ...] | None = None,
        latent_std: tuple[float, ...] | None = None,
        decoder_trunk: bool = False,
        decoder_trunk_layers: int = TRUNK_LAYERS,
        encoder_channels: tuple[int, ...] | None = None,
        encoder_blocks: tuple[int, ...] = SLIM_ENCODER_BLOCKS,
        encoder_tail: bool = False,
    ) -> None:
        super().__init__()
        if encoder_channels is None:
            self.encoder = taesd_encoder(latent_channels, midblock_gn)
        elif encoder_tail:
            self.encoder = tail_encoder(latent_channels, midblock_gn, tuple(encoder_channels), tuple(encoder_blocks))
        else:
            self.encoder = slim_encoder(latent_channels, tuple(encoder_channels), tuple(encoder_blocks))
        if decoder_channels is None:
            self.decoder = taesd_decoder(latent_channels, midblock_gn)
        elif decoder_trunk:
            self.decoder = trunk_decoder(latent_channels, midblock_gn, tuple(decoder_channels), tuple(decoder_blocks),
                                         decoder_trunk_layers)
        else:
            self.decoder = slim_decoder(latent_channels, tuple(decoder_channels), tuple(decoder_blocks))
        mean = torch.tensor(latent_mean if latent_mean is not None else [0.0] * latent_channels)
        std = torch.tensor(latent_std if latent_std is not None else [1.0] * latent_channels)
        if mean.numel() != latent_channels or std.numel() != latent_channels:
            raise ValueError("latent_mean / latent_std need one value per latent channel")
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)

    def encode_raw(self, x: Tensor) -> Tensor:
        """(B,3,H,W) in [-1,1] -> raw latent (B,C,H/8,W/8)."""
        return self.encoder((x + 1) / 2)

    def decode_raw(self, raw: Tensor) -> Tensor:
        """Raw latent (B,C,h,w) -> image (B,3,8h,8w), roughly in [-1,1]."""
        return self.decoder(raw) * 2 - 1

    def encode(self, x: Tensor) -> Tensor:
        """(B,3,H,W) in [-1,1] -> normalised latent (B,C,H/8,W/8)."""
        return (self.encode_raw(x) - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latent (B,C,h,w) -> image (B,3,8h,8w), roughly in [-1,1]."""
        return self.decode_raw(z * self.std.to(z.dtype) + self.mean.to(z.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def same_latent_space(self, other: "TAESDAutoencoder") -> bool:
        """Whether `other` normalises latents with this one's per-channel statistics, so that a
        codec trained on one fits the other's encoder or decoder."""
        def stats(vae: "TAESDAutoencoder") -> tuple:
            return tuple(None if v is None else tuple(v) for v in (vae.config.latent_mean, vae.config.latent_std))

        return stats(self) == stats(other)

    def with_decoder(self, channels: tuple[int, ...] | None, blocks: tuple[int, ...] = (2, 2, 1, 1),
                     trunk: bool = False, trunk_layers: int = TRUNK_LAYERS) -> "TAESDAutoencoder":
        """A copy with this encoder and normalisation and a new (random) decoder of that shape
        (`trunk`: a `trunk_decoder` keeping `trunk_layers` teacher layers; its trunk is random
        too until `load_trunk`)."""
        cfg = dict(self.config)
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        cfg.update(decoder_channels=None if channels is None else tuple(channels), decoder_blocks=tuple(blocks),
                   decoder_trunk=bool(trunk and channels is not None), decoder_trunk_layers=int(trunk_layers))
        other = TAESDAutoencoder(**cfg)
        other.encoder.load_state_dict(self.encoder.state_dict())
        return other

    def with_encoder(self, channels: tuple[int, ...] | None, blocks: tuple[int, ...] = SLIM_ENCODER_BLOCKS,
                     tail: bool = False) -> "TAESDAutoencoder":
        """A copy with this decoder and normalisation and a new (random) slim encoder of that
        shape (`channels` None: TAEF2's encoder layout, random too); `tail`: a `tail_encoder`
        whose tail is this (teacher) encoder's last layers."""
        if tail and (channels is None or self.slim_encoder):
            raise ValueError("with_encoder: a tail encoder needs widths and a teacher (TAEF2) encoder to copy from")
        cfg = {k: v for k, v in dict(self.config).items() if not k.startswith("_")}
        cfg.update(encoder_channels=None if channels is None else tuple(channels), encoder_blocks=tuple(blocks),
                   encoder_tail=bool(tail))
        other = TAESDAutoencoder(**cfg)
        other.decoder.load_state_dict(self.decoder.state_dict())
        if tail:
            teacher_tail = list(self.encoder)[ENCODER_TAIL_FROM:]
            for mine, theirs in zip(list(other.encoder)[-len(teacher_tail):], teacher_tail):
                mine.load_state_dict(theirs.state_dict())
        return other

    @property
    def slim_encoder(self) -> bool:
        """Whether the encoder is a distilled student (not TAEF2's own)."""
        return self.config.get("encoder_channels") is not None

    @property
    def teacher_tail(self) -> nn.Module | None:
        """A tail encoder's layers copied from TAEF2's (None for other encoders)."""
        if not self.config.get("encoder_tail"):
            return None
        return self.encoder[len(self.encoder) - (TAESD_ENCODER_LAYERS - ENCODER_TAIL_FROM):]

    def load_trunk(self, teacher: "TAESDAutoencoder") -> None:
        """Copy the teacher decoder's first `decoder_trunk_layers` layers into this trunk decoder."""
        if not self.config.decoder_trunk:
            raise ValueError("load_trunk: this decoder has no teacher trunk")
        depth = self.config.decoder_trunk_layers
        self.decoder[:depth].load_state_dict(teacher.decoder[:depth].state_dict())

    @property
    def decoder_layout(self) -> tuple:
        """This decoder's `decoder_shape`."""
        c = self.config
        return decoder_shape(c.decoder_channels, c.decoder_blocks, c.get("decoder_trunk", False),
                             c.get("decoder_trunk_layers", TRUNK_LAYERS))

    @property
    def trunk(self) -> nn.Module | None:
        """The trunk decoder's teacher part (None for other decoders)."""
        return self.decoder[: self.config.decoder_trunk_layers] if self.config.decoder_trunk else None

    @classmethod
    def from_taesd_files(cls, encoder_path: str | os.PathLike, decoder_path: str | os.PathLike | None = None,
                         latent_channels: int = 32, midblock_gn: bool = True) -> "TAESDAutoencoder":
        """The released `.pth` pair (e.g. taef2_encoder.pth / taef2_decoder.pth), read with
        weights_only=True, as float32."""
        model = cls(latent_channels=latent_channels, midblock_gn=midblock_gn)
        model.encoder.load_state_dict(_load_state(encoder_path))
        if decoder_path is not None:
            model.decoder.load_state_dict(_load_state(decoder_path))
        return model.float()

    @torch.no_grad()
    def fit_latent_statistics(self, images: Tensor) -> None:
        """Set latent_mean / latent_std from a batch of images (B,3,H,W) in [0,1]."""
        raw = self.encode_raw(images * 2 - 1).double()
        mean = raw.mean(dim=(0, 2, 3))
        std = raw.std(dim=(0, 2, 3)).clamp_min(1e-3)
        self.register_to_config(latent_mean=[float(v) for v in mean], latent_std=[float(v) for v in std])
        self.mean = mean.float().view(1, -1, 1, 1).to(self.mean.device)
        self.std = std.float().view(1, -1, 1, 1).to(self.std.device)


def _load_state(path: str | os.PathLike) -> dict[str, Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in state.items()}


__all__ = ["TRUNK_DEPTHS", "TAESDAutoencoder", "slim_decoder", "slim_encoder", "tail_encoder", "taesd_decoder",
           "taesd_encoder", "trunk_decoder"]
