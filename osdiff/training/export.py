"""A model folder from a training run folder (`osdiff export RUN_DIR -o MODEL_DIR`): the finished
model, or a codec, decoder or encoder stage's checkpoint mid-training (to evaluate it before the end).

From a checkpoint: the parts it holds (compressor and controlled UNet of a codec stage, the vae
of a decoder or encoder stage: with its student decoder or encoder), every other part from a base model folder (the run's init_from unless
given), and the run's decoding settings (timestep, start, noise seed, control scale) when it
trained the UNet. A checkpoint with more quality levels than the base gets them as new lowest
levels, as the run did.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..config import DecodingConfig
from ..errors import OSDiffError
from ..models.taesd import TRUNK_LAYERS, decoder_shape

EXPORTABLE = ("codec", "decoder", "encoder")  # stages whose checkpoints complete a base model


def export_run(run_dir: str | Path, output: str | Path, base: str | Path | None = None,
               stage: int | None = None) -> tuple[Path, int | None]:
    """Write the model of `run_dir` to `output` (which must not exist): stage `stage`'s
    checkpoint, by default the latest running codec, decoder or encoder stage's, else the finished
    model. Returns (output, the checkpoint's step or None for a finished model)."""
    run_dir, output = Path(run_dir), Path(output)
    if not (run_dir / "progress.json").is_file() and not (run_dir / "stages").is_dir():
        raise OSDiffError(f"{run_dir}: not a training run folder (no progress.json, no stages/)")
    if output.exists():
        raise OSDiffError(f"{output} exists; not overwriting it")
    ckpt = _checkpoint(run_dir, stage)
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if ckpt is None:
        shutil.copytree(run_dir / "model", partial)
        step = None
    else:
        step = _export_checkpoint(ckpt, partial, base)
    os.replace(partial, output)
    return output, step


def _checkpoint(run_dir: Path, stage: int | None) -> Path | None:
    """The checkpoint to export (None: the finished model folder)."""
    folders = {int(p.name.split("-", 1)[0]): p for p in (run_dir / "stages").glob("*-*") if p.name.split("-", 1)[0].isdigit()}
    if stage is not None:
        if stage not in folders or not (folders[stage] / "ckpt.pt").is_file():
            raise OSDiffError(f"{run_dir}: stage {stage} has no checkpoint")
        return folders[stage] / "ckpt.pt"
    progress = run_dir / "progress.json"
    done = set(json.loads(progress.read_text())["done"]) if progress.is_file() else set()
    running = [i for i, p in folders.items() if i not in done and (p / "ckpt.pt").is_file()]
    if running:
        return folders[max(running)] / "ckpt.pt"
    if not (run_dir / "model" / "model_index.json").is_file():
        raise OSDiffError(f"{run_dir}: no finished model and no running stage to export")
    return None


def _export_checkpoint(ckpt: Path, output: Path, base: str | Path | None) -> int:
    from ..pipeline import OSDiffPipeline

    name = ckpt.parent.name.split("-", 1)[1]
    if name not in EXPORTABLE:
        raise OSDiffError(f"{ckpt}: a {name} stage's checkpoint; only {', '.join(EXPORTABLE)} stages export mid-run")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    base = base or state["config"].get("init_from")
    if not base or not (Path(base) / "model_index.json").is_file():
        raise OSDiffError(f"{ckpt}: the model its other parts come from is not a model folder ({base}); give one (--base)")
    pipe = OSDiffPipeline.from_pretrained(base).to(torch.float32)
    modules = state["modules"]
    if name == "encoder":  # the base's vae with the run's student encoder
        tiny = state["config"]["tiny"]
        pipe.register_modules(vae=pipe.vae.with_encoder(tuple(tiny["student_encoder_channels"]),
                                                        tuple(tiny["student_encoder_blocks"]),
                                                        bool(tiny.get("student_encoder_tail", False))))
    if name == "decoder":  # the base's vae with a decoder of the run's student shape
        tiny = state["config"]["tiny"]
        shape = dict(channels=tiny.get("student_decoder_channels"), blocks=tuple(tiny["student_decoder_blocks"]),
                     trunk=bool(tiny.get("student_decoder_trunk", False)),
                     trunk_layers=int(tiny.get("student_decoder_trunk_layers", TRUNK_LAYERS)))
        if decoder_shape(**shape) != pipe.vae.decoder_layout:
            pipe.register_modules(vae=pipe.vae.with_decoder(**shape))
    if "compressor" in modules:
        extra = modules["compressor"]["y_gain"].shape[0] - pipe.compressor.config.num_quality_levels
        if extra > 0:
            pipe.register_modules(compressor=pipe.compressor.with_lower_levels(extra))
        pipe.compressor.load_state_dict(modules["compressor"])
        pipe.compressor.update(force=True)
    for part in ("unet", "vae"):
        if part in modules:
            getattr(pipe, part).load_state_dict(modules[part])
    if "encoder" in modules:  # a codec stage that trained the base's student encoder too
        pipe.vae.encoder.load_state_dict(modules["encoder"])
    if "unet" in modules:  # the UNet learned for the run's decoding procedure (e.g. its timestep), not the base's
        pipe.register_to_config(**DecodingConfig(**state["config"]["decoding"]).pipeline_config())
    pipe.save_pretrained(output)
    return int(state["step"])
