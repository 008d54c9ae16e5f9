"""Model parts more than one stage builds or loads (on a TrainingRun)."""
from __future__ import annotations

import json
from collections.abc import Callable

import torch
from torch import nn

from ..errors import OSDiffError
from ..models.autoencoder import TinyAutoencoder
from ..models.taesd import TAESDAutoencoder
from ..pipeline import OSDiffPipeline
from .config import StageConfig
from .discriminator import ConditionalPatchDiscriminator
from .files import atomic_write_text
from .losses import decoder_channel_weights
from .run import TrainingRun


def split_quantiles(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(parameters the main loss trains, the entropy bottlenecks' quantiles the aux loss trains)."""
    named = list(module.named_parameters())
    return [p for n, p in named if not n.endswith(".quantiles")], [p for n, p in named if n.endswith(".quantiles")]


def init_model(run: TrainingRun) -> OSDiffPipeline | None:
    """The model folder named by init_from, if it names one."""
    if not run.config.init_from:
        return None
    path = run.path(run.config.init_from)
    if not (path / "model_index.json").is_file():
        return None
    return OSDiffPipeline.from_pretrained(path).to(torch.float32)


def trained_vae(run: TrainingRun) -> TinyAutoencoder | TAESDAutoencoder:
    """The tiny model's frozen autoencoder from its stage's output (decoder or autoencoder)."""
    if run.config.tiny.autoencoder == "taef2":
        return TAESDAutoencoder.from_pretrained(run.find_output("decoder", "vae"))
    return TinyAutoencoder.from_pretrained(run.find_output("autoencoder", "vae"))


def patch_discriminator(run: TrainingRun, latent_channels: int, stage: StageConfig):
    """A freshly seeded ConditionalPatchDiscriminator (pixels given a latent of
    `latent_channels`) and its AdamW, both prepared."""
    torch.manual_seed(run.config.seed + 9)
    discriminator = ConditionalPatchDiscriminator(latent_channels).to(run.device)
    opt = torch.optim.AdamW(discriminator.parameters(), lr=stage.lr_discriminator, betas=(0.5, 0.999))
    return run.prepare(discriminator, opt)


def teacher_autoencoder(run: TrainingRun) -> TAESDAutoencoder:
    """TAEF2 (encoder and decoder): the packaged copy, the released .pth pair, or a model
    folder's autoencoder whose decoder has TAEF2's layout (e.g. a shipped model's fine-tuned one)."""
    if run.config.taesd_weights is None:
        from ..hub import WEIGHTS_DIR

        return TAESDAutoencoder.from_pretrained(WEIGHTS_DIR / "taef2" / "vae").float()
    folder = run.path(run.config.taesd_weights)
    if (folder / "vae" / "config.json").is_file():
        vae = TAESDAutoencoder.from_pretrained(folder / "vae").float()
        if vae.config.decoder_channels is not None:  # only its decoder teaches (whatever its encoder)
            raise OSDiffError(f"{folder}: its decoder is not of TAEF2's layout, so it cannot be the teacher")
        return vae
    files = [folder / "taef2_encoder.pth", folder / "taef2_decoder.pth"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise OSDiffError(f"TAEF2 weights not found: {', '.join(missing)}")
    return TAESDAutoencoder.from_taesd_files(*files, latent_channels=run.config.tiny.compressor.latent_channels)


def stage_channel_weights(run: TrainingRun, index: int, decode: Callable, latents: Callable[[], torch.Tensor]) -> torch.Tensor:
    """(1,C,1,1): losses.latent_weighting "decoder" weights (`decoder_channel_weights` of `decode`
    on the normalised latents `latents()` gives), measured once per stage and kept in its folder
    as channel-weights.json (read back on resume)."""
    file = run.stage_dir(index) / "channel-weights.json"
    if file.is_file():
        weights = torch.tensor(json.loads(file.read_text()))
    else:
        with torch.no_grad():
            weights = decoder_channel_weights(decode, latents()).cpu()
        if run.is_main:
            file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(file, json.dumps([float(w) for w in weights]))
    return weights.view(1, -1, 1, 1).to(run.device)
