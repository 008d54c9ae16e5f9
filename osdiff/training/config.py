"""Every training hyper-parameter in one typed place, loaded from YAML or TOML.

A run is a list of stages executed in order, each resumable:
  autoencoder  train our TinyAutoencoder on reconstruction (tiny model, autoencoder "own")
  decoder      (tiny model, autoencoder "taef2") fit the TAEF2 latent statistics and distil a
               slim student decoder from TAEF2's decoder; the encoder stays frozen
  encoder      (tiny model, autoencoder "taef2") distil a slim student encoder from TAEF2's
               encoder (latent MSE on the cached latents); decoder, compressor and UNet unchanged
  denoiser     train the tiny UNet as an ordinary latent diffusion denoiser (noise prediction)
  codec        freeze autoencoder and UNet; train compressor + ControlNet-XS adapter
               (+ discriminator) with rate + latent MSE + hint MSE + perceptual + adversarial
  baseline     (model: baseline) a compressai codec family, one model per rate, on pixels:
               rate + lambda * (MSE + perceptual + adversarial from a conditional patch
               discriminator); ELIC-style with MSE only, HiFiC-style with all three
  official     (model: official) the paper's LFGCM + CDDM on a frozen SD 2.1 with the official
               losses (osdiff.training.official)
Each stage has its own config class (AutoencoderStage, ..., OfficialStage: the knobs every
stage has in StageConfig, its own beside them; STAGE_CONFIGS by name) and its own module in
osdiff.training.stages; a stage table in a file is built as the class its `name` gives.
"""
from __future__ import annotations

import dataclasses

import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from ..config import BaselineArchitecture, CompressorArchitecture, DecodingConfig, TinyArchitecture
from ..errors import OSDiffError


@dataclass
class DataConfig:
    train_folders: list[str] = field(default_factory=lambda: ["../shared/data/images/cbsd432"])
    val_folders: list[str] = field(default_factory=lambda: ["../shared/data/images/cbsd68"])
    max_side: int = 768  # images are downscaled (Lanczos) so the long side is at most this
    max_val_images: int = 16
    # a folder for the frozen TAEF2 encoder's latents of the training photos (computed once, then
    # reused by every run on the same photos): the decoder and codec stages then cut aligned
    # (photo, latent) crops from it instead of running the encoder at every step
    latent_cache: str | None = None


@dataclass
class StageConfig:
    """The knobs every stage has; each stage's own config (below) adds its own."""

    name: str = ""  # autoencoder | decoder | encoder | denoiser | codec | baseline | official (STAGE_CONFIGS)
    steps: int = 1000
    batch_size: int = 4  # per process: a run on N processes takes N * batch_size crops a step
    crop: int = 256  # pixels; 0 (decoder stage on data.latent_cache, batch_size 1): whole photos
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 50
    max_minutes: float | None = None  # stop this stage (as finished) after this many minutes

    def check(self, config: TrainConfig, where: str) -> None:
        """Raise OSDiffError (one line) when this stage cannot run with `config`."""
        if self.name != STAGE_NAMES.get(type(self)):
            raise OSDiffError(f"config {where}: a {type(self).__name__} is named {STAGE_NAMES.get(type(self))!r}, not {self.name!r}")
        if config.model in ("baseline", "official") and self.name != config.model:
            raise OSDiffError(f"config {where}: stage {config.model!r} goes with model {config.model!r} and only with it")
        if self.crop == 0 and (self.name != "decoder" or not config.data.latent_cache or self.batch_size != 1):
            raise OSDiffError(f"config {where}: crop 0 (whole photos) is for a decoder stage with data.latent_cache and batch_size 1")


@dataclass
class AutoencoderStage(StageConfig):
    """Train our TinyAutoencoder on reconstruction (tiny model, autoencoder "own")."""

    name: str = "autoencoder"


@dataclass
class DenoiserStage(StageConfig):
    """Train the tiny UNet as an ordinary latent diffusion denoiser (noise prediction)."""

    name: str = "denoiser"


@dataclass
class DecoderStage(StageConfig):
    """Fit the TAEF2 latent statistics and distil a slim student decoder (autoencoder "taef2")."""

    name: str = "decoder"
    lr_discriminator: float = 1e-4
    # what the slim decoder learns to reproduce from the TAEF2 latent: "teacher" (TAEF2's own
    # decoder output; distillation) or "photo" (the photo itself; no teacher runs)
    decoder_target: str = "teacher"
    # what it decodes: "latents" (the photos' latents, half of them perturbed) or "codec"
    # (init_from's one-step outputs at random quality levels, as decoding produces them; with
    # decoder_target "photo" the decoder learns to undo the codec's errors too, with "teacher" it
    # learns to decode them as TAEF2's own decoder does: sharp)
    decoder_inputs: str = "latents"
    # tiny.student_decoder_trunk: keep the teacher layers of the trunk frozen (only the new layers
    # learn; no backward pass through the trunk)
    decoder_freeze_trunk: bool = False
    # before the gradient steps, fit the head of a trunk decoder with no new levels (one 3x3 conv
    # + pixel shuffle, linear) in closed form: ridge least squares to the target on this many
    # training photos' inputs (osdiff.training.head_fit); 0: off. Not redone on resume
    decoder_head_fit: int = 0

    def check(self, config: TrainConfig, where: str) -> None:
        super().check(config, where)
        if self.decoder_inputs not in ("latents", "codec"):
            raise OSDiffError(f"config {where}: decoder_inputs must be 'latents' or 'codec', got {self.decoder_inputs!r}")
        if self.decoder_inputs == "codec" and not config.init_from:
            raise OSDiffError(f"config {where}: decoder_inputs 'codec' needs init_from (a model folder)")
        if self.decoder_target not in ("teacher", "photo"):
            raise OSDiffError(f"config {where}: decoder_target must be 'teacher' or 'photo', got {self.decoder_target!r}")


@dataclass
class EncoderStage(StageConfig):
    """Distil a slim student encoder (tiny.student_encoder_channels) from TAEF2's encoder on the
    cached latents of the training photos (autoencoder "taef2"); with init_from a model folder,
    its decoder and codec stay as they are and model/ is that codec with the new encoder."""

    name: str = "encoder"
    # latent pixels at each side of a crop left out of the loss unless the side is the photo's
    # own edge: the cached targets saw the whole photo, the student sees the crop only
    encoder_margin: int = 4

    def check(self, config: TrainConfig, where: str) -> None:
        super().check(config, where)
        if config.model != "tiny" or config.tiny.autoencoder != "taef2" or not config.tiny.student_encoder_channels:
            raise OSDiffError(f"config {where}: stage 'encoder' needs model tiny, tiny.autoencoder taef2 and "
                              "tiny.student_encoder_channels")
        widths = 1 if config.tiny.student_encoder_tail else 2
        if len(config.tiny.student_encoder_channels) != widths or len(config.tiny.student_encoder_blocks) != widths:
            raise OSDiffError(f"config {where}: the student encoder needs {widths} width(s) and block count(s) "
                              f"({'1/4' if widths == 1 else '1/4 and 1/8'} resolution)")
        if config.losses.encoder_features and not config.tiny.student_encoder_tail:
            raise OSDiffError(f"config {where}: losses.encoder_features is for a tail student (tiny.student_encoder_tail)")
        if not config.data.latent_cache:
            raise OSDiffError(f"config {where}: stage 'encoder' learns the cached TAEF2 latents: set data.latent_cache")
        if self.crop < 8 * (2 * self.encoder_margin + 1):
            raise OSDiffError(f"config {where}: crop {self.crop} leaves no latent pixel inside margins of {self.encoder_margin}")


@dataclass
class CodecStage(StageConfig):
    """Freeze autoencoder and UNet; train compressor + control module (+ discriminators) with
    rate + latent MSE + hint MSE + perceptual + adversarial."""

    name: str = "codec"
    lr_discriminator: float = 1e-4
    lr_aux: float = 1e-3
    rate_lambdas: list[float] | None = None  # overrides losses.rate_lambdas
    # each level's loss (bpp + lambda * D) is weighted by lambda ** -level_balance, so that with a wide
    # lambda range the highest level does not drown the others' gradients in the shared layers
    # (for one level this only rescales the loss; its optimum is unchanged)
    level_balance: float = 0.0
    train_unet: bool = False  # also fine-tune the denoising UNet (else it stays frozen)
    # what learns: "all" (compressor + control module, + UNet with train_unet), or "gains" (only
    # the compressor's per-level gain tables, e.g. new levels that init_from lacks: a compressor
    # with fewer levels gets the missing ones below its lowest, see
    # LatentCompressor.with_lower_levels; the other levels code exactly as before), or "denoiser"
    # (the control module, + UNet with train_unet, on the frozen compressor's hints as decoding
    # gives them: the files stay bit for bit the same, the one step learns to beat the hint)
    train: str = "all"
    qualities: list[int] | None = None  # the 1-based qualities trained on (default: all)
    # also train init_from's student encoder (a TAEF2 autoencoder whose encoder is a distilled
    # student: `osdiff export` of an encoder stage) through the whole codec: the compressor codes
    # the student's latent of each crop, latent and hint MSE aim at TAEF2's cached latents, and
    # losses.encoder_anchor x their MSE (margins left out, as in stage "encoder") keeps the
    # student's latent near TAEF2's
    train_encoder: bool = False
    encoder_margin: int = 4

    def check(self, config: TrainConfig, where: str) -> None:
        super().check(config, where)
        if self.train_encoder and (self.train != "all" or not config.init_from or not config.data.latent_cache):
            raise OSDiffError(f"config {where}: train_encoder needs train 'all', init_from (a model with a student "
                              "encoder) and data.latent_cache (TAEF2's latents)")
        if config.losses.latent_weighting not in ("none", "decoder"):
            raise OSDiffError(f"config {where}: latent_weighting must be 'none' or 'decoder'")
        if self.qualities is not None and (not self.qualities or min(self.qualities) < 1):
            raise OSDiffError(f"config {where}: qualities must list 1-based qualities")
        if self.train not in ("all", "gains", "denoiser"):
            raise OSDiffError(f"config {where}: train must be 'all', 'gains' or 'denoiser', got {self.train!r}")
        if self.train == "denoiser" and not (config.losses.latent_mse > 0 or config.losses.adversarial > 0):
            raise OSDiffError(f"config {where}: train 'denoiser' is for a codec stage with latent_mse or adversarial > 0")
        if self.train == "gains" and self.train_unet:
            raise OSDiffError(f"config {where}: train 'gains' is for a codec stage without train_unet")


@dataclass
class _ModelStage(StageConfig):
    """A stage that trains a whole model of its own (`model` in the config is its `name`), with
    its own rate weights, an auxiliary (entropy bottleneck) optimizer and a discriminator."""

    lr_discriminator: float = 1e-4
    lr_aux: float = 1e-3
    rate_lambdas: list[float] | None = None  # overrides losses.rate_lambdas

    def check(self, config: TrainConfig, where: str) -> None:
        super().check(config, where)
        if config.model != self.name:
            raise OSDiffError(f"config {where}: stage {self.name!r} goes with model {self.name!r} and only with it")


@dataclass
class BaselineStage(_ModelStage):
    """(model: baseline) a compressai codec family, one model per rate, on pixels."""

    name: str = "baseline"


@dataclass
class OfficialStage(_ModelStage):
    """(model: official) the paper's LFGCM + CDDM on a frozen SD 2.1 with the official losses
    (`rate_lambdas`: one value, the weight of bpp)."""

    name: str = "official"


STAGE_CONFIGS: dict[str, type[StageConfig]] = {
    "autoencoder": AutoencoderStage, "decoder": DecoderStage, "encoder": EncoderStage, "denoiser": DenoiserStage,
    "codec": CodecStage, "baseline": BaselineStage, "official": OfficialStage,
}
STAGE_NAMES = {cls: name for name, cls in STAGE_CONFIGS.items()}


def stage_config(name: str, **knobs) -> StageConfig:
    """The config of a stage called `name` (one of STAGE_CONFIGS) with `knobs`."""
    if name not in STAGE_CONFIGS:
        raise OSDiffError(f"unknown stage {name!r} (one of {', '.join(STAGE_CONFIGS)})")
    return STAGE_CONFIGS[name](**knobs)


@dataclass
class LossConfig:
    # rate-distortion trade-off per quality level (level 1 first): loss = bpp + lambda * D
    rate_lambdas: list[float] = field(default_factory=lambda: [0.5, 1.5, 4.0, 10.0])
    latent_mse: float = 1.0
    hint_mse: float = 1.0
    perceptual: float = 1.0
    # codec stage: weighting of the latent and hint squared errors over latent channels: "none",
    # or "decoder": each channel by the mean squared pixel change the latent decoder makes per
    # unit of error in that channel (measured once at the stage's start, mean 1). TAEF2's 32
    # channels differ ~300x in that respect, so unweighted MSE spends bits where they barely show.
    latent_weighting: str = "none"
    # ms-ssim | haarpsi | lpips (LPIPS v0.1 on lpips_net, weights found locally:
    # osdiff.quality.backbones) | taesd-features (distance of the frozen TAEF2 encoder's
    # activations, LatentLPIPS-style; autoencoder "taef2" only)
    perceptual_kind: str = "ms-ssim"
    lpips_net: str = "vgg"  # vgg (the usual training loss) or alex (the usual metric)
    pixel_l1: float = 1.0  # autoencoder stage
    adversarial: float = 0.01
    # codec stage, on the decoded one-step output: + detail * local_detail_loss (log ratio of
    # local gradient energy to the photo's, in detail_window-pixel windows), and
    # + pixel_adversarial * the non-saturating loss of a HiFiC-style conditional patch
    # discriminator judging decoded pixels given the hint (the latent-space one is `adversarial`)
    detail: float = 0.0
    detail_window: int = 16
    # codec stage: + colour * MSE of the 16x16 block means of the decoded one-step output and the
    # photo (images in [0,1]; inside lambda): the local colour a hue shift or colour cast moves
    colour: float = 0.0
    encoder_anchor: float = 1.0  # codec stage with train_encoder: x MSE of the student's and TAEF2's latents
    pixel_adversarial: float = 0.0
    adversarial_start: int = 200  # codec steps before the adversarial term switches on
    latent_l2: float = 1e-3  # autoencoder stage: keeps the latent near unit scale
    # decoder stage: loss = decoder_l1 * L1 + decoder_features * taesd-features + decoder_gradient * L1
    # of the horizontal and vertical pixel differences (edges; cheap where the feature distance is not)
    decoder_l1: float = 1.0
    decoder_features: float = 0.1
    decoder_gradient: float = 0.0
    decoder_mse: float = 0.0  # decoder stage: + decoder_mse * pixel MSE (images in [0,1])
    decoder_colour: float = 0.0  # decoder stage: + decoder_colour * MSE of 16x16 block means (colour casts)
    decoder_lpips: float = 0.0  # decoder stage: + decoder_lpips * LPIPS on lpips_net (the decoded image, its target)
    # decoder stage: + decoder_detail * local_detail_loss (as the codec stage's `detail`, in
    # detail_window-pixel windows): smoothing and added texture cost alike
    decoder_detail: float = 0.0
    # decoder stage: + decoder_adversarial * non-saturating GAN loss of a HiFiC-style conditional
    # patch discriminator (real: the photo, fake: the decoded image, both given the decoded latent)
    decoder_adversarial: float = 0.0
    # encoder stage: loss = MSE of normalised latents (weighted per channel by latent_weighting)
    # + encoder_pixel * L1 of the student's latent decoded by the model's decoder against the photo
    encoder_pixel: float = 0.0
    # encoder stage, tail student: + encoder_features * MSE of its head's output and TAEF2's own
    # 1/4-resolution features (the tail's input; cached per photo), over their variance
    encoder_features: float = 0.0
    pixel_mse: float = 1.0  # baseline stage: weight of the image MSE (images in [0,1])
    # baseline stage: loss = bpp + lambda * (pixel_mse * MSE + perceptual * P + adversarial * A),
    # the adversarial term inside lambda as in HiFiC (its weight is relative to the distortion)


@dataclass
class TrainConfig:
    model: str = "tiny"  # tiny | sd21 | baseline | official (the paper's LFGCM + CDDM; osdiff.training.official)
    output_dir: str = "runs/osdiff-tiny"
    base_model: str | None = None  # sd21: local diffusers folder of Stable Diffusion 2.1 (official: or its ldm .ckpt)
    official_config: str | None = None  # official: official-format model config (default: the full-size one)
    model_name: str = "osdiff-tiny"
    seed: int = 0
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    # codec stage: the latent decoder and the perceptual loss (forward and backward) under
    # torch.autocast(bfloat16): "bf16" | "no". On a CPU with bfloat16 in hardware (AMX) TAEF2's
    # decoder + LPIPS-VGG on 4 crops of 256 px took 2.5 s instead of 6.8 s (one thread)
    pixel_autocast: str = "no"
    gradient_accumulation_steps: int = 1
    checkpoint_minutes: float = 5.0
    log_every: int = 10
    val_every: int = 250  # steps between validations on data.val_folders (and at a stage's end); 0: never
    threads: int = 0  # torch CPU threads, 0 = torch's default
    device: str = "auto"  # auto (accelerate's choice: a GPU if there is one) | cpu
    # decoder stage: the TAEF2 teacher. None: the copy shipped in the package (osdiff/weights/taef2);
    # else a folder holding the released taef2_encoder.pth / taef2_decoder.pth, or a model folder
    # whose decoder has TAEF2's layout (it then teaches, e.g. v3.5's fine-tuned one)
    taesd_weights: str | None = None
    # codec stage: start from earlier weights instead of fresh ones: a model folder (e.g. the
    # shipped osdiff/weights/osdiff-tiny: its autoencoder, conditioning, UNet, control and
    # compressor; the discriminator starts fresh) or a stages/<i>-codec/ckpt.pt.
    # decoder stage: a model folder's autoencoder (a TAEF2 one) is the starting student, its
    # latent statistics kept
    init_from: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    tiny: TinyArchitecture = field(default_factory=TinyArchitecture)
    compressor: CompressorArchitecture | None = None  # sd21: defaults to ELIC sizes
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    baseline: BaselineArchitecture = field(default_factory=BaselineArchitecture)
    stages: list[StageConfig] = field(default_factory=lambda: [CodecStage()])


def _build(cls, data: Any, where: str):
    if not is_dataclass(cls):
        return data
    if not isinstance(data, dict):
        raise OSDiffError(f"config {where}: expected a table, got {data!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise OSDiffError(f"config {where}: unknown keys {sorted(unknown)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        origin = getattr(hint, "__origin__", None)
        args = getattr(hint, "__args__", ())
        if origin is list and args and args[0] is StageConfig:
            kwargs[key] = [_build(_stage_class(v, f"{where}.{key}[{i}]"), v, f"{where}.{key}[{i}]") for i, v in enumerate(value)]
        elif origin is list and args and is_dataclass(args[0]):
            kwargs[key] = [_build(args[0], v, f"{where}.{key}[{i}]") for i, v in enumerate(value)]
        elif is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{where}.{key}")
        elif any(is_dataclass(a) for a in args) and value is not None:
            kwargs[key] = _build(next(a for a in args if is_dataclass(a)), value, f"{where}.{key}")
        elif isinstance(value, list) and "tuple" in str(hint):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise OSDiffError(f"config {where}: {exc}") from None


def _stage_class(data: Any, where: str) -> type:
    """The config class of a stage table (by its name; a table without one is a codec stage)."""
    name = data.get("name", "codec") if isinstance(data, dict) else "codec"
    if name not in STAGE_CONFIGS:
        raise OSDiffError(f"config {where}: unknown stage {name!r}")
    return STAGE_CONFIGS[name]


def _merge(base: dict, top: dict) -> dict:
    """`top` over `base`: mappings merge key by key (recursively), anything else (lists too) is replaced."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_config_file(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The mapping a YAML/TOML config file holds, with `extends: other.yaml` (a path relative to
    this file) resolved recursively: this file's keys deep-merged over the other's."""
    if not path.is_file():
        raise OSDiffError(f"{path}: no such config file")
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(p.name for p in (*_seen, resolved))
        raise OSDiffError(f"{path}: config extends itself ({chain})")
    try:
        text = path.read_text()
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # parse errors of either format
        raise OSDiffError(f"{path}: cannot parse config ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise OSDiffError(f"{path}: a config must be a mapping of keys to values")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise OSDiffError(f"{path}: extends must be one config file name, got {parent!r}")
    return _merge(_read_config_file(path.parent / parent, (*_seen, resolved)), data)


def load_config(path: str | Path, **overrides) -> TrainConfig:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file (`extends: base.yaml` inherits another) into a
    TrainConfig; `overrides` (top-level fields, e.g. the CLI's init_from) replace the file's values
    before the checks."""
    path = Path(path)
    data = _read_config_file(path)
    config = dataclasses.replace(_build(TrainConfig, data, path.name), **overrides)
    for stage in config.stages:
        stage.check(config, path.name)
    return config
