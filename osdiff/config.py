"""All tunable numbers of osdiff in one typed place.

`TinyArchitecture` sizes the embedded default model (osdiff-tiny), `CompressorArchitecture`
sizes the latent compressor for any latent space, `DecodingConfig` fixes how one-step
decoding runs, and `BitstreamLimits` bounds what the `.osd` parser accepts.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class CompressorArchitecture:
    """LFGCM (latent compressor) sizes. Units: channels; downsamples are factors of 2."""

    latent_channels: int = 4
    hidden_channels: int = 96  # N in ELIC: width of analysis/synthesis and hyper transforms
    code_channels: int = 64  # M in ELIC: channels of the quantised code y
    groups: tuple[int, ...] = (4, 4, 8, 16, 32)  # uneven channel groups, sum == code_channels
    analysis_downsamples: int = 2  # latent -> y
    hyper_downsamples: int = 1  # y -> z
    num_quality_levels: int = 4  # gain vectors, one per quality level (variable rate)

    def __post_init__(self) -> None:
        if sum(self.groups) != self.code_channels:
            raise ValueError(f"groups {self.groups} must sum to code_channels={self.code_channels}")

    @property
    def latent_multiple(self) -> int:
        """Latent height/width must be a multiple of this (in latent pixels)."""
        return 2 ** (self.analysis_downsamples + self.hyper_downsamples)


Realism = float | tuple[float, ...]  # one value, or one per quality level


def check_realism(value: Any, what: str = "realism") -> Realism:
    """`value` (a number from 0 to 1, or a list of them: one per quality level) as a float or a
    tuple of floats; else ValueError naming `what`."""
    def number(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{what} must be a number from 0 to 1 or a list of them (one per quality level), got {value!r}")
        return float(v)

    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{what} must not be an empty list")
        return tuple(number(v) for v in value)
    return number(value)


def realism_as_config(realism: Realism) -> float | list[float]:
    """A realism as a model config stores it (JSON: a list, not a tuple)."""
    return list(realism) if isinstance(realism, tuple) else realism


def realism_at(realism: Realism, quality: int | float, levels: int) -> float:
    """The realism a file of `quality` (1 .. `levels`, fractional between levels) decodes with:
    the single value, or the per-level values interpolated linearly in quality."""
    if not isinstance(realism, tuple):
        return realism
    if len(realism) != levels:
        raise ValueError(f"realism has {len(realism)} values for {levels} quality levels")
    q = min(max(float(quality), 1.0), float(levels))
    i = min(int(q), levels - 1)  # 1-based level below q (the last pair at the top level)
    return realism[i - 1] + (q - i) * (realism[i] - realism[i - 1]) if levels > 1 else realism[0]


@dataclass(frozen=True)
class DecodingConfig:
    """One-step decoding. start="hint": the hint is noised to `timestep` with noise from
    `noise_seed` (osdiff v1). start="noise": x_T is pure noise from `noise_seed` and the hint
    reaches the UNet only through the control module (the official OSDiff procedure, used with
    timestep=999). Then one UNet evaluation predicts the clean latent."""

    timestep: int = 499
    noise_seed: int = 0
    control_scale: float = 1.0
    start: str = "hint"  # hint | noise
    # files of a higher quality decode the hint directly, without the UNet step (None: every quality
    # takes the step); `osdiff decompress --steps N` overrides it
    unet_max_quality: float | None = None
    # the decoded latent is hint + realism x (step output - hint): 1 = the step's output, 0 = the
    # hint; between, less of the texture the step adds. One value, or one per quality level
    # (interpolated between levels). A decoder-side knob, not in the bitstream; `osdiff
    # decompress --realism` overrides it. Training trains and validates the step's output (1); a
    # run's exported model takes the recipe's value: choose it again by `osdiff eval :realism=R`
    realism: Realism = 1.0

    def __post_init__(self) -> None:
        if self.start not in ("hint", "noise"):
            raise ValueError(f"decoding start must be 'hint' or 'noise', got {self.start!r}")
        object.__setattr__(self, "realism", check_realism(self.realism, "decoding realism"))  # a YAML list -> tuple
        if self.unet_max_quality is not None and not self.unet_max_quality >= 1:
            raise ValueError(f"decoding unet_max_quality must be at least 1 (or null), got {self.unet_max_quality!r}")

    def default_steps(self, quality: int | float) -> int:
        """UNet steps a file of `quality` decodes with unless told: 1, or 0 (the hint decoded
        directly) above `unet_max_quality`, where the step costs more than it adds."""
        return 0 if self.unet_max_quality is not None and quality > self.unet_max_quality else 1

    def steps_per_level(self, levels: int) -> list[bool]:
        """Whether each quality level 1..`levels` decodes with the UNet step (`default_steps`)."""
        return [self.default_steps(q) == 1 for q in range(1, levels + 1)]

    def pipeline_config(self) -> dict:
        """These settings as OSDiffPipeline's config keys (constructor or register_to_config)."""
        return dict(timestep=self.timestep, noise_seed=self.noise_seed, control_scale=self.control_scale,
                    decoding_start=self.start, unet_max_quality=self.unet_max_quality,
                    realism=realism_as_config(self.realism))

    @classmethod
    def from_pipeline_config(cls, config: Mapping[str, Any]) -> DecodingConfig:
        """The decoding settings of an OSDiffPipeline's config (inverse of `pipeline_config`)."""
        return cls(timestep=config["timestep"], noise_seed=config.get("noise_seed", 0),
                   control_scale=config.get("control_scale", 1.0), start=config.get("decoding_start", "hint"),
                   unet_max_quality=config.get("unet_max_quality"), realism=config.get("realism", 1.0))


@dataclass(frozen=True)
class ComputeConfig:
    """How the networks run on the CPU while coding.

    deterministic=True: exactly `threads` intra-op threads and oneDNN on (whatever the caller
    set), so the float work is split the same way whatever the caller's torch thread setting:
    bytes and decoded pixels are identical in processes with 1, 2 or 3 threads (tested; by hand
    on 18 CBSD68/McMaster photos, 10.6 M decoded values, 0 differences). An earlier version also
    turned oneDNN off, after a measurement that its convolutions differed between thread counts;
    that no longer reproduces with torch 2.14.1, and ATen's own convolutions were 3-4x slower.
    False: torch's defaults (its thread count), pixels may differ by one level between thread
    counts (the entropy decoding is exact either way).

    precision: what the latent autoencoder and the UNet step compute in (the entropy networks
    stay exact, so a file decodes on any machine in either). 'bfloat16': torch.autocast; where the
    CPU multiplies bfloat16 in hardware (x86 AMX or AVX512-BF16) TAEF2's encoder and decoder ran
    3.5x and 4.6x faster at 512x768 (docs/benchmarks.md); a file decodes to within ~51 dB PSNR of
    its float32 decoding, and on the 38 held-out photos no metric's BD-rate moved by more than
    1.1 %. 'float32': the reference arithmetic (conformance vectors are recorded and checked in
    it). 'auto' (default): bfloat16 on a CPU that has it natively and whose oneDNN is not capped
    below it (osdiff.kernels.native_bf16), else float32."""

    deterministic: bool = True
    threads: int = 2
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class TilingConfig:
    """Large images are encoded and decoded in overlapping tiles so memory stays bounded
    (latent pixels; 1 latent pixel = 8x8 image pixels). Tiles are a fixed function of the
    image size, so files stay deterministic; images whose latent fits in one tile are coded whole."""

    tile: int = 128  # 1024 image pixels
    overlap: int = 8  # at least; blended linearly (64 image pixels)
    align: int = 8  # tile starts are multiples of this (the UNet's downsampling)

    def __post_init__(self) -> None:
        if not (0 < self.overlap < self.tile and self.tile % self.align == 0 and self.overlap % self.align == 0):
            raise ValueError("tiling: need 0 < overlap < tile, both multiples of align")


@dataclass(frozen=True)
class TinyArchitecture:
    """The embedded default model's sizes (channels). Chosen for CPU decode speed."""

    autoencoder_encoder_channels: tuple[int, ...] = (16, 32, 64, 64)
    autoencoder_decoder_channels: tuple[int, ...] = (64, 48, 32, 16)
    autoencoder_blocks: int = 2  # residual blocks at 1/8 resolution in each direction
    # "own": our TinyAutoencoder trained from scratch (v1); "taef2": the frozen pretrained TAEF2
    # encoder (32 latent channels) with a slim decoder distilled from TAEF2's (v2)
    autoencoder: str = "own"
    student_decoder_channels: tuple[int, ...] = (64, 48, 32, 16)  # at 1/8, 1/4, 1/2, 1/1 resolution
    student_decoder_blocks: tuple[int, ...] = (2, 2, 1, 1)
    # True: the student keeps TAEF2's decoder layers at 1/8 and 1/4 resolution (copied from the
    # teacher) and student_decoder_channels / _blocks name the levels after them (1/2, full),
    # ending in a pixel shuffle (osdiff.models.taesd.trunk_decoder)
    student_decoder_trunk: bool = False
    # how many of TAEF2's decoder layers the trunk keeps (osdiff.models.taesd.TRUNK_DEPTHS): 11
    # ends after the 1/4 level; 13-16 go on into the 1/2 level (its conv and 0-3 of its blocks),
    # and student_decoder_channels then names at most the full-resolution level
    student_decoder_trunk_layers: int = 11
    # a slim student encoder distilled from TAEF2's (stage "encoder"; osdiff.models.taesd.slim_encoder):
    # widths and block counts at 1/4 and 1/8 resolution; empty: TAEF2's own encoder
    student_encoder_channels: tuple[int, ...] = ()
    student_encoder_blocks: tuple[int, ...] = (2, 3)
    # True: the student keeps TAEF2's encoder layers from its last stride-2 conv on (the 1/8-level
    # blocks with their image-wide GroupNorm) and the one width / block count above name its 1/4
    # level (osdiff.models.taesd.tail_encoder)
    student_encoder_tail: bool = False
    unet_block_out_channels: tuple[int, ...] = (64, 128)
    unet_down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    unet_up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")
    unet_attention_head_dim: int = 32
    cross_attention_dim: int = 64
    conditioning_tokens: int = 1
    control_size_ratio: float = 0.25
    compressor: CompressorArchitecture = field(default_factory=CompressorArchitecture)


@dataclass(frozen=True)
class BaselineArchitecture:
    """A compressai baseline codec family (osdiff.models.baselines): one model per rate."""

    architecture: str = "elic2022-chandelier"  # | mean-scale-hyperprior
    N: int = 32  # channels of the transforms
    M: int = 64  # channels of the quantised latent y
    groups: tuple[int, ...] = (4, 4, 8, 16, 32)  # ELIC's uneven channel groups, sum == M
    num_rates: int = 4
    discriminator_channels: tuple[int, ...] = (32, 64, 128, 256)  # training only (adversarial > 0)


@dataclass(frozen=True)
class BitstreamLimits:
    """What the `.osd` parser accepts before allocating anything (pixels)."""

    max_side: int = 1 << 16
    max_pixels: int = 1 << 28  # 268 megapixels
    max_name_bytes: int = 255


@dataclass(frozen=True)
class ServeLimits:
    """What `osdiff serve` accepts per request (bytes, pixels); larger inputs get HTTP 413."""

    max_upload_bytes: int = 25 * 2**20
    max_pixels: int = 4_000_000
    compare_codecs: tuple[str, ...] = ("avif", "webp", "jpeg")


def to_dict(obj) -> dict:
    """A dataclass as a JSON-friendly dict (tuples become lists)."""
    return asdict(obj)


@dataclass(frozen=True)
class RateControlConfig:
    """Target-size encoding (`target_bytes` / `target_bpp`): the highest quality whose real file
    fits, found by bisection over real encodes on the 1/256 quality grid (whole levels for a
    model without gain vectors)."""

    max_encodes: int = 8  # real encodes per image, the first two at the highest and lowest quality
    tolerance: float = 0.005  # stop early once a file fits within this fraction below the target

    def __post_init__(self) -> None:
        if self.max_encodes < 2 or not 0 <= self.tolerance < 1:
            raise ValueError("rate control: need max_encodes >= 2 and 0 <= tolerance < 1")
