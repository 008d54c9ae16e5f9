"""The run context every training stage works in: one accelerate Accelerator (the same code on
one CPU, several CPU processes or many GPUs), the run folder, data, seeds, the resumable loop,
checkpoints, logs and validation plumbing. The stages (osdiff.training.stages) use its public
API; it knows none of them.

Layout of the run folder:
  progress.json              which stages are done, and the number of processes (world_size)
                             of the latest start
  log-<i>-<stage>.csv        one row per logged step of stage i (process 0's losses)
  val-<i>-<stage>.csv        validation on centre crops of data.val_folders, every val_every steps
  stages/<i>-<name>/ckpt.pt  latest checkpoint of a running stage (weights, optimizers, step,
                             world_size, each process's weight checksum and last batch's)
  stages/<i>-<name>/out/     what a finished stage hands on (diffusers folders)
  model/                     the finished codec (OSDiffPipeline.save_pretrained)

Several processes (`torchrun` on CPUs, `accelerate launch` on GPUs) train data-parallel: the
models are not wrapped in DistributedDataParallel (stages call their methods freely: encode,
decode_raw, aux_loss, ...); instead every update averages the gradients over the processes
(`update`, `average_gradients`), so the weights stay identical on every process (checked at
each checkpoint). Process r draws the batches and noise of (seed, stage, step, r); process 0
those of a single-process run. Only process 0 writes checkpoints, logs, validation rows and
stage outputs. A run resumes with any number of processes: the state does not depend on it
(each process then takes batch_size crops a step).

Batches and noise depend only on (seed, stage, step, process), so resuming from a checkpoint
gives exactly the result of an uninterrupted run on as many processes.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from ..errors import OSDiffError
from ..verbosity import progress
from .config import StageConfig, TrainConfig
from .data import CropSampler, center_crops, find_images, load_images, whole_photo
from .latents import EncodingSampler, LatentCropSampler, cached_latents
from .files import append_row, atomic_write_text
from .stop_signal import stop_after_step
from .processes import any_of_processes, average_gradients, broadcast_module, gather_floats, weights_checksum

def lr_at(step: int, stage: StageConfig, base: float) -> float:
    """Linear warm-up, then cosine decay to 10% of `base` at the last step."""
    if step < stage.warmup_steps:
        return base * (step + 1) / stage.warmup_steps
    progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def number(v) -> float:
    """A logged value as a float (0-d tensors are read here, not in the training step)."""
    return float(v.item()) if torch.is_tensor(v) else float(v)


class TrainingRun:
    """One run folder, its config and the processes training it."""

    def __init__(self, config: TrainConfig, config_dir: Path | None = None) -> None:
        self.config = config
        self.base = config_dir or Path.cwd()
        self.out = self.path(config.output_dir)
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        if config.device not in ("auto", "cpu"):
            raise OSDiffError(f"device must be 'auto' or 'cpu', got {config.device!r}")
        if config.pixel_autocast not in ("no", "bf16"):
            raise OSDiffError(f"pixel_autocast must be 'no' or 'bf16', got {config.pixel_autocast!r}")
        self.accelerator = Accelerator(
            cpu=config.device == "cpu",
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
        )
        self.device = self.accelerator.device
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.wait()
        self.max_steps: int | None = None
        self.deadline: float | None = None
        self._images: list | None = None
        self._val_images: list | None = None
        self._last_batch = 0.0
        self.stopped_by: str | None = None  # the signal that stopped the loop early, if one did

    # ---- processes ----------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def wait(self) -> None:
        """Every process waits here for the others (e.g. for process 0's files)."""
        self.accelerator.wait_for_everyone()

    def print(self, *args) -> None:
        """Print once (process 0)."""
        self.accelerator.print(*args)

    # ---- the run folder -----------------------------------------------------------------------
    def path(self, name: str | Path) -> Path:
        """`name` relative to the config's folder unless absolute."""
        p = Path(name)
        return p if p.is_absolute() else self.base / p

    def stage_dir(self, index: int) -> Path:
        return self.out / "stages" / f"{index}-{self.config.stages[index].name}"

    def progress(self) -> dict:
        path = self.out / "progress.json"
        return json.loads(path.read_text()) if path.is_file() else {"done": []}

    def _write_progress(self, progress: dict) -> None:
        if self.is_main:
            atomic_write_text(self.out / "progress.json", json.dumps(progress))
        self.wait()

    def start(self, max_steps: int | None = None, max_minutes: float | None = None) -> set[int]:
        """Begin a session of at most `max_steps` steps / `max_minutes` minutes; records the
        number of processes; returns the indices of the stages already done."""
        self.max_steps = max_steps
        self.deadline = time.monotonic() + 60 * max_minutes if max_minutes else None
        progress = self.progress()
        before = progress.get("world_size", 1)
        started = progress["done"] or any((self.out / "stages").glob("*/ckpt.pt"))
        if before != self.world_size and started:
            self.print(f"{self.out}: trained on {before} process(es) so far, continuing on {self.world_size}")
        self._write_progress({**progress, "world_size": self.world_size})
        return set(progress["done"])

    def mark_done(self, index: int) -> None:
        """Record stage `index` as finished (after every process got there)."""
        self.wait()
        progress = self.progress()
        self._write_progress({**progress, "done": sorted(set(progress["done"]) | {index})})

    def find_output(self, name: str, sub: str, before: int | None = None) -> Path | None:
        """The output folder of the latest finished stage called `name` (before `before`);
        with `before` unset, a missing output is an error."""
        limit = len(self.config.stages) if before is None else before
        for i in reversed(range(limit)):
            if self.config.stages[i].name == name and (self.stage_dir(i) / "out" / sub).is_dir():
                return self.stage_dir(i) / "out" / sub
        if before is None:
            raise OSDiffError(f"stage {name!r} has not produced {sub}/ yet")
        return None

    def finished_checkpoint(self, name: str, before: int) -> Path | None:
        """Final checkpoint of the latest finished stage called `name` before `before`, if any."""
        done = set(self.progress()["done"])
        for i in reversed(range(before)):
            if self.config.stages[i].name == name and i in done:
                ckpt = self.stage_dir(i) / "ckpt.pt"
                if not ckpt.is_file():
                    raise OSDiffError(f"stage {i} ({name}) is done but its checkpoint {ckpt} is gone")
                return ckpt
        return None

    def log(self, row: dict, kind: str = "log") -> None:
        """Append `row` to <kind>-<row['stage']>.csv (process 0; a new column widens the file)."""
        if not self.is_main:
            return
        append_row(self.out / f"{kind}-{row['stage']}.csv", row)  # row["stage"] is "<index>-<name>"

    # ---- data and seeds -----------------------------------------------------------------------
    def images(self) -> list:
        """The training photos (uint8 arrays), loaded once."""
        if self._images is None:
            files = find_images(self.config.data.train_folders, self.base)
            self._images = load_images(files, self.config.data.max_side)
        return self._images

    def val_batch(self, crop: int) -> torch.Tensor:
        """Fixed validation crops (at most data.max_val_images), on the training device."""
        if self._val_images is None:
            files = find_images(self.config.data.val_folders, self.base)[: self.config.data.max_val_images]
            self._val_images = load_images(files, self.config.data.max_side)
        return center_crops(self._val_images, crop).to(self.device)

    def val_whole(self, multiple: int = 8) -> list[torch.Tensor]:
        """The validation photos whole, each (1,3,H,W) in [0,1] trimmed to multiples of `multiple`."""
        self.val_batch(8)  # loads them
        return [whole_photo(im, multiple).to(self.device) for im in self._val_images]

    def crop_sampler(self, index: int, stage: StageConfig, crop: int | None = None) -> CropSampler:
        """This process's random crops of the training photos for stage `index`."""
        crops = CropSampler(self.images(), stage.crop if crop is None else crop, stage.batch_size, self.config.seed, index, self.rank)
        return _Fingerprinted(crops, self)

    def latent_sampler(self, index: int, stage: StageConfig, encoder: nn.Module, align: int = 1):
        """Batches of (photos (B,3,crop,crop) in [0,1], raw latents) for a stage on a frozen
        encoder: cut from data.latent_cache when set, else the encoder runs on each batch.
        crop 0 (cache only): one whole photo per batch, trimmed to `align` latent pixels."""
        cfg = self.config
        if cfg.data.latent_cache:
            latents = self.cached_outputs(encoder)
            return _Fingerprinted(LatentCropSampler(self.images(), latents, stage.crop, stage.batch_size, cfg.seed, index,
                                                    align, self.rank), self)
        return self.encoding_sampler(index, stage, encoder)

    def encoding_sampler(self, index: int, stage: StageConfig, encode: Callable) -> EncodingSampler:
        """Batches of (photos, encode(photos)) from this process's random crops."""
        crops = CropSampler(self.images(), stage.crop, stage.batch_size, self.config.seed, index, self.rank)
        return _Fingerprinted(EncodingSampler(crops, encode, self.device), self)

    def cached_outputs(self, encoder: nn.Module) -> list:
        """`encoder`'s output (float16) on each whole training photo, from data.latent_cache
        (computed and saved there on first use; see osdiff.training.latents.cached_latents)."""
        cfg = self.config
        files = find_images(cfg.data.train_folders, self.base)
        return self.main_first(lambda: cached_latents(self.images(), files, cfg.data.max_side, encoder,
                                                      self.path(cfg.data.latent_cache), self.device))

    def main_first(self, make: Callable):
        """make() on process 0, then on the others (files it writes are then there to read)."""
        with self.accelerator.main_process_first():
            return make()

    def step_seed(self, stage: int, step: int, rank: int | None = None) -> int:
        rank = self.rank if rank is None else rank
        return (self.config.seed * 1_000_003 + stage * 100_003 + step + rank * 7_919_993) & 0x7FFFFFFF

    def generator(self, stage: int, step: int, rank: int | None = None) -> torch.Generator:
        """Noise for step `step` of stage `stage` on this process (or process `rank`), the same
        whether or not the run resumed."""
        return torch.Generator("cpu").manual_seed(self.step_seed(stage, step, rank) ^ 0x5EED)

    # ---- models and updates -------------------------------------------------------------------
    def prepare(self, *objects):
        """Modules onto the device (mixed precision as configured; never wrapped for
        data-parallel: see the module docstring) with process 0's weights; optimizers for
        accelerate. One object in, one out."""
        out = []
        for obj in objects:
            if isinstance(obj, nn.Module):
                obj = self.accelerator.prepare_model(obj, evaluation_mode=True)
                if self.world_size > 1:
                    broadcast_module(obj)
            else:
                obj = self.accelerator.prepare(obj)
            out.append(obj)
        return out[0] if len(out) == 1 else tuple(out)

    def unwrap(self, module: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(module)

    def pixel_autocast(self):
        """Context for the latent decoder and the pixel losses: torch.autocast(bfloat16) if the
        config's `pixel_autocast` says bf16, else nothing."""
        if self.config.pixel_autocast == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def accumulate(self, *modules: nn.Module):
        """Context for one micro-batch of gradient accumulation."""
        return self.accelerator.accumulate(*modules)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def average_gradients(self, opt) -> None:
        """Average the gradients of `opt`'s parameters over the processes (on steps that
        update; a parameter without a gradient on every process keeps none)."""
        if self.world_size == 1 or not self.accelerator.sync_gradients:
            return
        average_gradients([p for group in opt.param_groups for p in group["params"] if p.requires_grad], self.device)

    def clip(self, params, max_norm: float) -> None:
        """Clip the gradient norm of `params` on steps that update."""
        if self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(params, max_norm)

    def update(self, loss: torch.Tensor, params, opt, max_norm: float | None = None) -> None:
        """Backward, gradients averaged over the processes, clipped (unless max_norm is None)
        on steps that update, optimizer step, gradients zeroed."""
        self.backward(loss)
        self.average_gradients(opt)
        if max_norm is not None:
            self.clip(params, max_norm)
        opt.step()
        opt.zero_grad()

    def aux_step(self, model: nn.Module, opt_aux) -> torch.Tensor:
        """One step of compressai's auxiliary loss (the entropy bottlenecks' quantiles)."""
        aux = self.unwrap(model).aux_loss()
        self.update(aux, None, opt_aux)
        return aux

    # ---- the loop -----------------------------------------------------------------------------
    def loop(self, index: int, stage: StageConfig, modules: dict, optimizers: dict, step_fn: Callable,
             val_fn: Callable | None = None) -> bool:
        """Generic resumable loop; True when the stage is finished. `modules`: name -> trainable
        module (checkpointed); `optimizers`: name -> (optimizer, base lr); `step_fn(step) ->
        dict of floats`; `val_fn() -> dict of floats` runs (on process 0) every `val_every`
        steps and after the last step (no gradients, modules in eval mode; it draws no random
        numbers the training uses)."""
        ckpt = self.stage_dir(index) / "ckpt.pt"
        name = f"{index}-{stage.name}"
        start = 0
        if ckpt.is_file():
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            for key, module in modules.items():
                self.unwrap(module).load_state_dict(state["modules"][key])
            for key, (opt, _) in optimizers.items():
                opt.load_state_dict(state["optimizers"][key])
            start = state["step"]

        def save(step: int) -> None:
            ranks = {"weights": self._gather(weights_checksum(modules.values())), "last_batch": self._gather(self._last_batch)}
            if len(set(ranks["weights"])) > 1:
                raise OSDiffError(f"stage {name}, step {step}: the {self.world_size} processes' weights differ")
            if not self.is_main:
                return
            state = {
                "step": step,
                "modules": {n: self.unwrap(m).state_dict() for n, m in modules.items()},
                "optimizers": {n: o.state_dict() for n, (o, _) in optimizers.items()},
                "config": asdict(self.config),
                "world_size": self.world_size,
                "ranks": ranks,
            }
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, ckpt)

        def log_validation(step: int) -> None:
            if self.is_main and val_fn is not None:
                self.log({"stage": name, "step": step, "time": round(time.time(), 1),
                          **{k: round(number(v), 6) for k, v in self._validate(modules, val_fn).items()}}, kind="val")

        last_save = stage_start = time.monotonic()
        bar = progress(range(start, stage.steps), initial=start, total=stage.steps, desc=name,
                       disable=not self.accelerator.is_local_main_process, mininterval=5)
        ran = 0
        with stop_after_step() as asked:  # SIGINT / SIGTERM: stop after this step, with a checkpoint
            for step in bar:
                for opt, base in optimizers.values():
                    for group in opt.param_groups:
                        group["lr"] = lr_at(step, stage, base)
                torch.manual_seed(self.step_seed(index, step))  # library-internal noise (entropy models)
                logs = step_fn(step)  # floats or 0-d tensors, read (one device sync) only when logged
                ran += 1
                if self.is_main and (step % self.config.log_every == 0 or step == stage.steps - 1):
                    logs = {k: number(v) for k, v in logs.items()}
                    bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()}, refresh=False)
                    self.log({"stage": name, "step": step, "time": round(time.time(), 1), **{k: round(v, 6) for k, v in logs.items()}})
                every = self.config.val_every
                validated = val_fn is not None and every > 0 and ((step + 1) % every == 0 or step == stage.steps - 1)
                if validated:
                    log_validation(step + 1)
                now = time.monotonic()
                past_deadline, over_budget, save_due, asked_to_stop = self.agree(
                    self.deadline is not None and now > self.deadline,
                    stage.max_minutes is not None and now - stage_start > 60 * stage.max_minutes,
                    now - last_save > 60 * self.config.checkpoint_minutes,
                    asked.is_set())
                if asked_to_stop:
                    self.stopped_by = asked.signal_name or "a stop signal on another process"
                stop = (self.max_steps is not None and ran >= self.max_steps) or past_deadline or asked_to_stop
                if over_budget:
                    if not validated:  # end-of-stage validation
                        log_validation(step + 1)
                    bar.close()
                    save(step + 1)
                    return True  # the stage's time budget counts as its end
                if stop or save_due:
                    save(step + 1)
                    last_save = time.monotonic()
                if stop and step + 1 < stage.steps:
                    bar.close()
                    return False
        bar.close()
        save(stage.steps)
        return True

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag true on any process, on every process (decisions that depend on clocks)."""
        return flags if self.world_size == 1 else any_of_processes(flags, self.device)

    def _gather(self, value: float) -> list[float]:
        """`value` of every process, by rank."""
        return [float(value)] if self.world_size == 1 else gather_floats(value, self.device)

    def _validate(self, modules: dict, val_fn: Callable) -> dict:
        modes = {name: m.training for name, m in modules.items()}
        for m in modules.values():
            m.eval()
        try:
            with torch.no_grad():
                return val_fn()
        finally:
            for name, m in modules.items():
                m.train(modes[name])


class _Fingerprinted:
    """A sampler that notes a position-weighted checksum of each batch it gives in its run
    (checkpoints record every process's last one: they differ when the processes see different
    crops)."""

    def __init__(self, sampler, run: TrainingRun) -> None:
        self.sampler, self.run = sampler, run

    def batch(self, step: int, rank: int | None = None):
        out = self.sampler.batch(step, rank)
        first = out[0] if isinstance(out, tuple) else out
        flat = first.detach().double().flatten()
        self.run._last_batch = float(flat @ torch.linspace(1, 2, flat.numel(), dtype=torch.float64, device=flat.device))
        return out

    def __getattr__(self, name: str):  # the sampler's other methods (e.g. LatentCropSampler.edges)
        return getattr(self.sampler, name)
