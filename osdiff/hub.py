"""Find and load codecs by name (models shipped inside the package) or by folder path."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import OSDiffError
from .verbosity import library_output

if TYPE_CHECKING:
    from .codec_pipeline import ImageCodecPipeline

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = "osdiff-tiny"


def available_models() -> list[str]:
    """Names of the models shipped inside the package."""
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / "model_index.json").is_file())


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A shipped model's name or a model folder -> the folder holding model_index.json."""
    path = Path(name_or_path)
    if (path / "model_index.json").is_file():
        return path
    if str(name_or_path) in available_models():
        return WEIGHTS_DIR / str(name_or_path)
    known = ", ".join(available_models()) or "none"
    raise OSDiffError(f"no model {str(name_or_path)!r}: give a shipped model name ({known}) or a folder with model_index.json")


def load(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype = torch.float32,
    verbose: bool = False,
) -> ImageCodecPipeline:
    """Load a codec offline (an OSDiffPipeline, or a BaselinePipeline for the compressai
    baselines). `compress(image) -> bytes`, `decompress(bytes) -> PIL.Image`.

    Quiet unless `verbose`: diffusers' and transformers' progress bars, log messages and
    warnings are off while loading, and their settings are restored afterwards."""
    folder = resolve(name_or_path)
    with library_output(verbose):
        try:
            pipeline_class = _pipeline_class(folder)
            pipe = pipeline_class.from_pretrained(folder, local_files_only=True, dtype=torch_dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise OSDiffError(f"{folder}: cannot load model ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
        pipe.set_progress_bar_config(disable=not verbose)
        return pipe.to(device)


def _pipeline_class(folder: Path) -> type[ImageCodecPipeline]:
    """The pipeline class that model_index.json names (only osdiff's own classes)."""
    from .baseline_pipeline import BaselinePipeline
    from .official_pipeline import OfficialOSDiffPipeline
    from .pipeline import OSDiffPipeline

    classes = {cls.__name__: cls for cls in (OSDiffPipeline, BaselinePipeline, OfficialOSDiffPipeline)}
    name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    if name not in classes:
        raise ValueError(f"model_index.json names pipeline {name!r}, not one of {', '.join(classes)}")
    return classes[name]
