"""The training stages, one module each with `train(run, index, stage) -> bool` (True when the
stage is finished); `stage_trainer` picks one by name."""
from __future__ import annotations

import importlib
from collections.abc import Callable

from ..config import STAGE_CONFIGS

STAGES = tuple(STAGE_CONFIGS)  # autoencoder, decoder, encoder, denoiser, codec, baseline, official


def stage_trainer(name: str) -> Callable:
    """The `train` function of the stage called `name` (its module is imported on first use)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}")
    return importlib.import_module(f"{__name__}.{name}").train
