"""The training loop, on Hugging Face accelerate (same code on one CPU or many GPUs).

Layout of `output_dir`:
  progress.json              which stage is done / running
  log-<i>-<stage>.csv        one row per logged step of stage i
  val-<i>-<stage>.csv        validation on centre crops of data.val_folders, every val_every steps
  stages/<i>-<name>/ckpt.pt  latest checkpoint of a running stage (weights, optimizers, step)
  stages/<i>-<name>/out/     what a finished stage hands on (diffusers folders)
  model/                     the finished codec (OSDiffPipeline.save_pretrained)

Batches and noise depend only on (seed, stage, step), so resuming from a checkpoint gives
exactly the result of an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import piq
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from torch import nn

from ..baseline_pipeline import BaselinePipeline
from ..build import SD_COMPRESSOR, add_control, compressor_from, sd_noise_scheduler, tiny_autoencoder, tiny_unet
from ..codec_pipeline import CODING_SETTINGS_SINCE_V2_1
from ..denoise import add_noise, decoding_alpha_bar, decoding_x0_eps
from ..errors import OSDiffError
from ..quality.pixel import colour_shift, detail_retention
from ..models.autoencoder import TinyAutoencoder, decode_latent, encode_latent
from ..models.baselines import LearnedImageCodec
from ..models.taesd import TRUNK_LAYERS, TAESDAutoencoder
from ..models.conditioning import ConditioningEmbedding
from ..pipeline import OSDiffPipeline
from ..verbosity import progress
from .config import StageConfig, TrainConfig
from .data import CropSampler, center_crops, find_images, load_images, whole_photo
from .latents import LatentCropSampler, cached_latents
from .discriminator import ConditionalPatchDiscriminator, UNetFeatureDiscriminator, frozen_generator_loss
from .losses import PerceptualLoss, bits_per_pixel, decoder_channel_weights, discriminator_adversarial, local_detail_loss


def lr_at(step: int, stage: StageConfig, base: float) -> float:
    """Linear warm-up, then cosine decay to 10% of `base` at the last step."""
    if step < stage.warmup_steps:
        return base * (step + 1) / stage.warmup_steps
    progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Trainer:
    def __init__(self, config: TrainConfig, config_dir: Path | None = None) -> None:
        self.config = config
        self.base = config_dir or Path.cwd()
        self.out = Path(config.output_dir)
        if not self.out.is_absolute():
            self.out = self.base / self.out
        self.out.mkdir(parents=True, exist_ok=True)
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        if config.device not in ("auto", "cpu"):
            raise OSDiffError(f"device must be 'auto' or 'cpu', got {config.device!r}")
        self.accelerator = Accelerator(
            cpu=config.device == "cpu",
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
        )
        self.device = self.accelerator.device
        self._images: list | None = None
        self._val_images: list | None = None

    # ---- bookkeeping ------------------------------------------------------------------------
    def stage_dir(self, index: int) -> Path:
        return self.out / "stages" / f"{index}-{self.config.stages[index].name}"

    def _progress(self) -> dict:
        path = self.out / "progress.json"
        return json.loads(path.read_text()) if path.is_file() else {"done": []}

    def _mark_done(self, index: int) -> None:
        progress = self._progress()
        progress["done"] = sorted(set(progress["done"]) | {index})
        _atomic_write_text(self.out / "progress.json", json.dumps(progress))

    def _images_cached(self):
        if self._images is None:
            files = find_images(self.config.data.train_folders, self.base)
            self._images = load_images(files, self.config.data.max_side)
        return self._images

    def _val_batch(self, crop: int) -> torch.Tensor:
        """Fixed validation crops (at most data.max_val_images), on the training device."""
        if self._val_images is None:
            files = find_images(self.config.data.val_folders, self.base)[: self.config.data.max_val_images]
            self._val_images = load_images(files, self.config.data.max_side)
        return center_crops(self._val_images, crop).to(self.device)

    def _val_whole(self, multiple: int = 8) -> list[torch.Tensor]:
        """The validation photos whole, each (1,3,H,W) in [0,1] trimmed to multiples of `multiple`."""
        self._val_batch(8)  # loads them
        return [whole_photo(im, multiple).to(self.device) for im in self._val_images]

    def _latent_sampler(self, index: int, stage: StageConfig, encoder: nn.Module, align: int = 1):
        """Batches of (photos (B,3,crop,crop) in [0,1], raw latents) for a stage on a frozen
        encoder: cut from data.latent_cache when set, else the encoder runs on each batch.
        crop 0 (cache only): one whole photo per batch, trimmed to `align` latent pixels."""
        cfg = self.config
        if cfg.data.latent_cache:
            folder = Path(cfg.data.latent_cache)
            folder = folder if folder.is_absolute() else self.base / folder
            files = find_images(cfg.data.train_folders, self.base)
            latents = cached_latents(self._images_cached(), files, cfg.data.max_side, encoder, folder, self.device)
            return LatentCropSampler(self._images_cached(), latents, stage.crop, stage.batch_size, cfg.seed, index, align)
        return _EncodingSampler(CropSampler(self._images_cached(), stage.crop, stage.batch_size, cfg.seed, index), encoder, self.device)

    def _log(self, row: dict, kind: str = "log") -> None:
        path = self.out / f"{kind}-{row['stage']}.csv"  # row["stage"] is "<index>-<name>"
        header = []
        if path.is_file():
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
        if header and not set(row) <= set(header):  # a resumed run logs a new column: widen the file
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            header += [k for k in row if k not in header]
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=header, restval="")
                writer.writeheader()
                writer.writerows(rows)
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header or list(row), restval="")
            if not header:
                writer.writeheader()
            writer.writerow(row)

    def _step_seed(self, stage: int, step: int) -> int:
        return (self.config.seed * 1_000_003 + stage * 100_003 + step) & 0x7FFFFFFF

    def _generator(self, stage: int, step: int) -> torch.Generator:
        """Noise for step `step` of stage `stage`, the same whether or not the run resumed."""
        return torch.Generator("cpu").manual_seed(self._step_seed(stage, step) ^ 0x5EED)

    # ---- entry point ------------------------------------------------------------------------
    def run(self, max_steps: int | None = None, max_minutes: float | None = None) -> Path | None:
        """Run (or resume) every unfinished stage. `max_steps` / `max_minutes` stop early
        after a checkpoint (for chunked runs); returns the model folder once all are done."""
        deadline = time.monotonic() + 60 * max_minutes if max_minutes else None
        done = set(self._progress()["done"])
        for index, stage in enumerate(self.config.stages):
            if index in done:
                continue
            runner = {"autoencoder": self._autoencoder_stage, "decoder": self._decoder_stage, "denoiser": self._denoiser_stage,
                      "codec": self._codec_stage, "baseline": self._baseline_stage, "official": self._official_stage}[stage.name]
            finished = runner(index, stage, max_steps, deadline)
            if not finished:
                return None
            self._mark_done(index)
        return self.out / "model"

    def _loop(self, index, stage, modules, optimizers, step_fn, max_steps, deadline, val_fn=None) -> bool:
        """Generic resumable loop. `modules`: name -> trainable module (checkpointed);
        `optimizers`: name -> (optimizer, base lr); `step_fn(step) -> dict of floats`;
        `val_fn() -> dict of floats` runs every `val_every` steps and after the last step
        (no gradients, modules in eval mode; it draws no random numbers the training uses)."""
        ckpt = self.stage_dir(index) / "ckpt.pt"
        start = 0
        if ckpt.is_file():
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            for name, module in modules.items():
                module.load_state_dict(state["modules"][name])
            for name, (opt, _) in optimizers.items():
                opt.load_state_dict(state["optimizers"][name])
            start = state["step"]

        def save(step: int) -> None:
            state = {
                "step": step,
                "modules": {n: self.accelerator.unwrap_model(m).state_dict() for n, m in modules.items()},
                "optimizers": {n: o.state_dict() for n, (o, _) in optimizers.items()},
                "config": asdict(self.config),
            }
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, ckpt)

        last_save = stage_start = time.monotonic()
        bar = progress(range(start, stage.steps), initial=start, total=stage.steps, desc=f"{index}-{stage.name}",
                   disable=not self.accelerator.is_local_main_process, mininterval=5)

        def log_validation(step: int) -> None:
            self._log({"stage": f"{index}-{stage.name}", "step": step, "time": round(time.time(), 1),
                       **{k: round(_number(v), 6) for k, v in self._validate(modules, val_fn).items()}}, kind="val")

        ran = 0
        for step in bar:
            for opt, base in optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, stage, base)
            torch.manual_seed(self._step_seed(index, step))  # library-internal noise (entropy models)
            logs = step_fn(step)  # floats or 0-d tensors, read (one device sync) only when logged
            ran += 1
            if step % self.config.log_every == 0 or step == stage.steps - 1:
                logs = {k: _number(v) for k, v in logs.items()}
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()}, refresh=False)
                self._log({"stage": f"{index}-{stage.name}", "step": step, "time": round(time.time(), 1), **{k: round(v, 6) for k, v in logs.items()}})
            every = self.config.val_every
            validated = val_fn is not None and every > 0 and ((step + 1) % every == 0 or step == stage.steps - 1)
            if validated:
                log_validation(step + 1)
            stop = (max_steps is not None and ran >= max_steps) or (deadline is not None and time.monotonic() > deadline)
            if stage.max_minutes is not None and time.monotonic() - stage_start > 60 * stage.max_minutes:
                if val_fn is not None and not validated:  # end-of-stage validation
                    log_validation(step + 1)
                bar.close()
                save(step + 1)
                return True  # the stage's time budget counts as its end
            if stop or time.monotonic() - last_save > 60 * self.config.checkpoint_minutes:
                save(step + 1)
                last_save = time.monotonic()
            if stop and step + 1 < stage.steps:
                bar.close()
                return False
        bar.close()
        save(stage.steps)
        return True

    def _validate(self, modules: dict, val_fn) -> dict:
        modes = {name: m.training for name, m in modules.items()}
        for m in modules.values():
            m.eval()
        try:
            with torch.no_grad():
                return val_fn()
        finally:
            for name, m in modules.items():
                m.train(modes[name])

    def _prepare(self, *objects):
        return self.accelerator.prepare(*objects)

    def _update(self, loss: torch.Tensor, params, opt, clip: float) -> None:
        """Backward, gradient clipping on synchronised steps, optimizer step, gradients zeroed."""
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad()

    def _patch_discriminator(self, latent_channels: int, stage: StageConfig):
        """A freshly seeded ConditionalPatchDiscriminator (pixels given a latent of
        `latent_channels`) and its AdamW, both prepared."""
        torch.manual_seed(self.config.seed + 9)
        discriminator = ConditionalPatchDiscriminator(latent_channels).to(self.device)
        opt = torch.optim.AdamW(discriminator.parameters(), lr=stage.lr_discriminator, betas=(0.5, 0.999))
        return self._prepare(discriminator, opt)

    def _aux_step(self, model, opt_aux) -> torch.Tensor:
        """One step of compressai's auxiliary loss (the entropy bottlenecks' quantiles)."""
        aux = self.accelerator.unwrap_model(model).aux_loss()
        self.accelerator.backward(aux)
        opt_aux.step()
        opt_aux.zero_grad()
        return aux

    # ---- stage 1: autoencoder -----------------------------------------------------------------
    def _autoencoder_stage(self, index, stage, max_steps, deadline) -> bool:
        arch, losses = self.config.tiny, self.config.losses
        torch.manual_seed(self.config.seed)
        vae = tiny_autoencoder(arch)
        earlier = self._find_output("autoencoder", "vae", before=index)
        if earlier is not None:  # a second autoencoder stage fine-tunes the first one's result
            vae.load_state_dict(TinyAutoencoder.from_pretrained(earlier).state_dict())
        opt = torch.optim.AdamW(vae.parameters(), lr=stage.lr, weight_decay=stage.weight_decay)
        vae, opt = self._prepare(vae, opt)
        perceptual = PerceptualLoss(losses.perceptual_kind, losses.lpips_net).to(self.device)
        sampler = CropSampler(self._images_cached(), stage.crop, stage.batch_size, self.config.seed, index)

        def step_fn(step: int) -> dict:
            x = sampler.batch(step).to(self.device)
            with self.accelerator.accumulate(vae):
                z = vae.encode(x * 2 - 1)
                x_hat = (vae.decode(z) + 1) / 2
                l1 = (x_hat - x).abs().mean()
                perc = perceptual(x_hat, x).mean()
                reg = z.pow(2).mean()
                loss = losses.pixel_l1 * l1 + losses.perceptual * perc + losses.latent_l2 * reg
                self._update(loss, vae.parameters(), opt, stage.grad_clip)
            psnr = _psnr(x_hat, x)
            return {"loss": loss.item(), "l1": l1.item(), "perceptual": perc.item(), "latent_rms": reg.sqrt().item(), "psnr": psnr}

        def val_fn() -> dict:
            x = self._val_batch(stage.crop)
            model = self.accelerator.unwrap_model(vae)
            return {"psnr": _psnr((model.decode(model.encode(x * 2 - 1)) + 1) / 2, x)}

        if not self._loop(index, stage, {"vae": vae}, {"vae": (opt, stage.lr)}, step_fn, max_steps, deadline, val_fn):
            return False
        vae = self.accelerator.unwrap_model(vae)
        # scale latents to unit standard deviation, as SD does with its 0.18215
        with torch.no_grad():
            z = torch.cat([vae.encode(sampler.batch(10**6 + i).to(self.device) * 2 - 1) for i in range(4)])
        vae.register_to_config(scaling_factor=float(1.0 / z.std().clamp_min(1e-6)))
        vae.save_pretrained(self.stage_dir(index) / "out" / "vae")
        return True

    # ---- stage 1 (v2): TAEF2 latent statistics + slim decoder distilled from TAEF2's ----------
    def _decoder_stage(self, index, stage, max_steps, deadline) -> bool:
        cfg, arch, losses = self.config, self.config.tiny, self.config.losses
        if arch.autoencoder != "taef2":
            raise OSDiffError("stage 'decoder' needs tiny.autoencoder: taef2")
        init = self._init_model()
        photo = stage.decoder_target == "photo"
        shape = dict(channels=arch.student_decoder_channels, blocks=arch.student_decoder_blocks, trunk=arch.student_decoder_trunk,
                     trunk_layers=arch.student_decoder_trunk_layers)
        continues = False  # init_from's student goes on learning
        if init is not None:
            if not isinstance(init.vae, TAESDAutoencoder):
                raise OSDiffError(f"init_from {cfg.init_from}: its autoencoder is not a TAEF2 one")
            c = init.vae.config
            continues = _decoder_shape(c.decoder_channels, c.decoder_blocks, c.get("decoder_trunk", False),
                                       c.get("decoder_trunk_layers", TRUNK_LAYERS)) == _decoder_shape(**shape)
        needs_teacher = not (photo and continues)
        teacher = self._teacher_autoencoder().to(self.device).requires_grad_(False).eval() if needs_teacher else None
        if init is not None:
            # the model folder's latent statistics are kept; its student continues when it has
            # this recipe's shape, else a new student of that shape starts
            student = init.vae.to(self.device) if continues else init.vae.with_decoder(**shape).to(self.device)
            codec = init.to(self.device) if stage.decoder_inputs == "codec" else None
        else:
            sampler = CropSampler(self._images_cached(), stage.crop or 256, stage.batch_size, cfg.seed, index)
            with torch.no_grad():  # per-channel latent statistics from 64 fixed training crops
                crops = torch.cat([sampler.batch(10**6 + i) for i in range(-(-64 // stage.batch_size))])
                teacher.fit_latent_statistics(crops.to(self.device))
            torch.manual_seed(cfg.seed + 5)
            student = teacher.with_decoder(**shape).to(self.device)
            codec = None
        if not continues and student.config.decoder_trunk:
            student.load_trunk(teacher)  # the teacher's first layers, kept or fine-tuned
        del init
        if codec is not None:
            codec.compressor.eval().requires_grad_(False)  # eval: rounded latents, as in coding
            codec.unet.eval().requires_grad_(False)
            levels = codec.compressor.config.num_quality_levels
        student.encoder.requires_grad_(False).eval()
        if stage.decoder_freeze_trunk:
            if student.trunk is None:
                raise OSDiffError("decoder_freeze_trunk needs tiny.student_decoder_trunk: true")
            student.trunk.requires_grad_(False)
        params = [p for p in student.decoder.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
        student, opt = self._prepare(student, opt)
        model = self.accelerator.unwrap_model(student)
        modules, optimizers = {"vae": student}, {"vae": (opt, stage.lr)}
        discriminator = None
        if losses.decoder_adversarial:  # judges (image, normalised latent it was decoded from)
            discriminator, opt_d = self._patch_discriminator(model.config.latent_channels, stage)
            modules["discriminator"], optimizers["disc"] = discriminator, (opt_d, stage.lr_discriminator)
        features = PerceptualLoss("taesd-features", encoder=model.encoder).to(self.device) if losses.decoder_features else None
        pairs = self._latent_sampler(index, stage, model.encoder, codec.compressor.latent_multiple if codec is not None else 1)
        std = model.std
        extra_terms = {  # loss = L1 + the sum of weight * term
            "mse": (losses.decoder_mse, F.mse_loss),
            "colour": (losses.decoder_colour, _low_pass_mse),
            "features": (losses.decoder_features, lambda p, t: features(p, t).mean()),
            "gradient": (losses.decoder_gradient, _gradient_l1),
        }

        def step_fn(step: int) -> dict:
            x, raw, target = decoder_input(step)
            with self.accelerator.accumulate(student):
                pred = (model.decode_raw(raw) + 1) / 2
                l1 = (pred - target).abs().mean()
                loss = l1
                logs = {"l1": l1.detach()}
                for name, (weight, term) in extra_terms.items():
                    if weight:
                        value = term(pred, target)
                        loss = loss + weight * value
                        logs[name] = value.detach()
                if discriminator is not None:
                    condition = (raw - model.mean) / std
                    adv = frozen_generator_loss(discriminator, pred, condition)
                    loss = loss + losses.decoder_adversarial * adv
                    logs["adv_g"] = adv.detach()
                self._update(loss, params, opt, stage.grad_clip)
            if discriminator is not None:
                d_loss = discriminator_adversarial(discriminator(x, condition), discriminator(pred.detach(), condition))
                self.accelerator.backward(d_loss)
                opt_d.step()
                opt_d.zero_grad()
                logs["adv_d"] = d_loss.detach()
            return {"loss": loss.detach(), **logs, f"psnr_{stage.decoder_target}": _psnr_tensor(pred, target)}

        def one_step_raw(raw: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
            """Raw latents (B,C,h,w) -> the codec's one-step outputs at quality levels (B,), raw."""
            hint = codec.compressor((raw - model.mean) / std, level)["hint"]
            return codec.denoise(hint) * std + model.mean

        def decoder_input(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """(photos, raw latents the decoder decodes, target images) of training step `step`."""
            x, raw = pairs.batch(step)
            x, raw = x.to(self.device), raw.to(self.device)
            gen = self._generator(index, step)
            with torch.no_grad():
                if codec is not None:  # the one-step output of a random quality level
                    raw = one_step_raw(raw, torch.randint(0, levels, (raw.shape[0],), generator=gen).to(self.device))
                else:
                    # half the batch perturbed, so the decoder also learns latents off the data
                    # manifold (decoded latents carry coding errors)
                    sigma = torch.rand(raw.shape[0], 1, 1, 1, generator=gen).to(self.device) * 0.5
                    sigma[: raw.shape[0] // 2] = 0
                    raw = raw + sigma * std * torch.randn(raw.shape, generator=gen).to(self.device)
                target = x if photo else (teacher.decode_raw(raw).clamp(-1, 1) + 1) / 2
            return x, raw, target

        if stage.decoder_head_fit and not (self.stage_dir(index) / "ckpt.pt").is_file():
            self._fit_decoder_head(model, stage, decoder_input)

        fixed = None  # what the frozen networks give for the validation photos, computed once

        def val_fn() -> dict:
            # crops, or (crop 0) the whole photos one at a time: TAEF2's GroupNorm sees the
            # statistics it sees when coding
            nonlocal fixed
            decode = lambda net, raws: [((net.decode_raw(r) + 1) / 2).clamp(0, 1) for r in raws]  # noqa: E731
            if fixed is None:
                multiple = 8 * (codec.compressor.latent_multiple if codec is not None else 1)
                xs = list(self._val_batch(stage.crop).split(4)) if stage.crop else self._val_whole(multiple)
                raws = [model.encode_raw(x * 2 - 1) for x in xs]
                fixed = {"photos": xs, "raws": raws,
                         "teacher": decode(teacher, raws) if teacher is not None else None,
                         "one_step": [[one_step_raw(r, torch.full((r.shape[0],), level, device=r.device)) for r in raws]
                                      for level in range(levels)] if codec is not None else None}
                if codec is not None and teacher is not None:  # what TAEF2's own decoder makes of them
                    fixed["teacher_one_step"] = [decode(teacher, outputs) for outputs in fixed["one_step"]]
            xs = fixed["photos"]
            preds = decode(model, fixed["raws"])
            out = _image_metrics(preds, xs)
            if teacher is not None:
                reference = fixed["teacher"]
                out.update(psnr_teacher_decoder=_mean_psnr(reference, xs), psnr_vs_teacher=_mean_psnr(preds, reference))
            if codec is not None:  # what it learns: the one-step outputs, averaged over the levels
                decoded = [decode(model, outputs) for outputs in fixed["one_step"]]
                per_level = [_image_metrics(images, xs) for images in decoded]
                out.update({f"{k}_one_step": sum(m[k] for m in per_level) / levels for k in per_level[0]})
                if teacher is not None:
                    out["psnr_vs_teacher_one_step"] = sum(
                        _mean_psnr(images, reference) for images, reference in zip(decoded, fixed["teacher_one_step"])) / levels
            return out

        if not self._loop(index, stage, modules, optimizers, step_fn, max_steps, deadline, val_fn):
            return False
        model.save_pretrained(self.stage_dir(index) / "out" / "vae")
        if codec is not None:  # the codec it learned to decode, with this decoder
            codec.register_modules(vae=model)
            codec.to("cpu").save_pretrained(self.out / "model")
        return True

    def _fit_decoder_head(self, model: TAESDAutoencoder, stage: StageConfig, decoder_input) -> None:
        """Closed-form start for a trunk decoder whose head is one conv + pixel shuffle: ridge
        least squares from the trunk's features to the targets of `stage.decoder_head_fit`
        photos (decoder_input(step) -> (photos, raw latents, targets), drawn at steps past the
        stage's own)."""
        from .head_fit import ConvHeadLeastSquares

        c = model.config
        if not (c.decoder_trunk and len(c.decoder_channels) == 0 and isinstance(model.decoder[-1], nn.PixelShuffle)):
            raise OSDiffError("decoder_head_fit needs a trunk decoder with no new levels "
                              "(tiny.student_decoder_trunk: true, student_decoder_channels: [])")
        fit = ConvHeadLeastSquares(model.decoder[-2], model.decoder[-1].upscale_factor, seed=self.config.seed)
        for i in progress(range(stage.decoder_head_fit), desc="head fit", disable=not self.accelerator.is_local_main_process):
            _, raw, target = decoder_input(stage.steps + 10**6 + i)
            with torch.no_grad():
                for one_raw, one_target in zip(raw.split(1), target.split(1)):
                    fit.add(model.trunk(one_raw), one_target)
        fit.solve()

    def _teacher_autoencoder(self) -> TAESDAutoencoder:
        """TAEF2 (encoder and decoder): the packaged copy, or the released .pth pair."""
        if self.config.taesd_weights is None:
            from ..hub import WEIGHTS_DIR

            return TAESDAutoencoder.from_pretrained(WEIGHTS_DIR / "taef2" / "vae").float()
        folder = Path(self.config.taesd_weights)
        folder = folder if folder.is_absolute() else self.base / folder
        files = [folder / "taef2_encoder.pth", folder / "taef2_decoder.pth"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise OSDiffError(f"TAEF2 weights not found: {', '.join(missing)}")
        return TAESDAutoencoder.from_taesd_files(*files, latent_channels=self.config.tiny.compressor.latent_channels)

    def _load_vae(self):
        """The tiny model's frozen autoencoder from its stage's output (decoder or autoencoder)."""
        if self.config.tiny.autoencoder == "taef2":
            return TAESDAutoencoder.from_pretrained(self._find_output("decoder", "vae"))
        return TinyAutoencoder.from_pretrained(self._find_output("autoencoder", "vae"))

    # ---- stage 2: denoiser ------------------------------------------------------------------
    def _find_output(self, name: str, sub: str, before: int | None = None) -> Path | None:
        """The output folder of the latest finished stage called `name` (before `before`);
        with `before` unset, a missing output is an error."""
        limit = len(self.config.stages) if before is None else before
        for i in reversed(range(limit)):
            if self.config.stages[i].name == name and (self.stage_dir(i) / "out" / sub).is_dir():
                return self.stage_dir(i) / "out" / sub
        if before is None:
            raise OSDiffError(f"stage {name!r} has not produced {sub}/ yet")
        return None

    def _denoiser_stage(self, index, stage, max_steps, deadline) -> bool:
        vae = self._load_vae().to(self.device).requires_grad_(False)
        torch.manual_seed(self.config.seed + 1)
        unet = tiny_unet(self.config.tiny)
        conditioning = ConditioningEmbedding(num_tokens=self.config.tiny.conditioning_tokens, dim=self.config.tiny.cross_attention_dim)
        scheduler = sd_noise_scheduler()
        alphas = scheduler.alphas_cumprod.to(self.device)
        params = list(unet.parameters()) + list(conditioning.parameters())
        opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
        unet, conditioning, opt = self._prepare(unet, conditioning, opt)
        sampler = CropSampler(self._images_cached(), stage.crop, stage.batch_size, self.config.seed, index)

        def step_fn(step: int) -> dict:
            x = sampler.batch(step).to(self.device)
            gen = self._generator(index, step)
            with torch.no_grad():
                z = encode_latent(vae, x * 2 - 1)
            noise = torch.randn(z.shape, generator=gen).to(self.device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (z.shape[0],), generator=gen).to(self.device)
            a = alphas[t][:, None, None, None]
            z_t = add_noise(z, noise, a)
            with self.accelerator.accumulate(unet):
                ctx = conditioning(z.shape[0])
                pred = unet(z_t, t, encoder_hidden_states=ctx).sample
                loss = F.mse_loss(pred, noise)
                self._update(loss, params, opt, stage.grad_clip)
            return {"loss": loss.detach()}

        def val_fn() -> dict:
            z = encode_latent(vae, self._val_batch(stage.crop) * 2 - 1)
            noise = torch.randn(z.shape, generator=torch.Generator("cpu").manual_seed(12345)).to(self.device)
            ctx = conditioning(z.shape[0])
            out = {}
            for t in (100, 500, 900):  # noise-prediction MSE at three fixed timesteps
                z_t = add_noise(z, noise, float(alphas[t]))
                pred = unet(z_t, torch.full((z.shape[0],), t, device=self.device), encoder_hidden_states=ctx).sample
                out[f"eps_mse_t{t}"] = F.mse_loss(pred, noise).item()
            return out

        modules = {"unet": unet, "conditioning": conditioning}
        if not self._loop(index, stage, modules, {"main": (opt, stage.lr)}, step_fn, max_steps, deadline, val_fn):
            return False
        out = self.stage_dir(index) / "out"
        self.accelerator.unwrap_model(unet).save_pretrained(out / "unet")
        self.accelerator.unwrap_model(conditioning).save_pretrained(out / "conditioning")
        return True

    # ---- stage 3: codec ---------------------------------------------------------------------
    def _init_model(self) -> OSDiffPipeline | None:
        """The model folder named by init_from (codec stage), if it names one."""
        if not self.config.init_from:
            return None
        path = Path(self.config.init_from)
        path = path if path.is_absolute() else self.base / path
        if not (path / "model_index.json").is_file():
            return None
        return OSDiffPipeline.from_pretrained(path).to(torch.float32)

    def _codec_parts(self, init: OSDiffPipeline | None = None):
        """(vae, plain unet, conditioning, scheduler, compressor architecture); from `init`, the
        model folder named by init_from, when there is one."""
        cfg = self.config
        if init is not None:  # continue a finished model: its parts (the plain UNet only gives shapes)
            return init.vae, tiny_unet(cfg.tiny), init.conditioning, init.scheduler, cfg.compressor or cfg.tiny.compressor
        if cfg.model == "sd21":
            if not cfg.base_model:
                raise OSDiffError("model 'sd21' needs base_model: a local Stable Diffusion 2.1 diffusers folder")
            from diffusers import AutoencoderKL, DDIMScheduler

            folder = Path(cfg.base_model)
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
            unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
            conditioning = ConditioningEmbedding.from_text_encoder(folder)
            scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
            return vae, unet, conditioning, scheduler, cfg.compressor or SD_COMPRESSOR
        vae = self._load_vae()
        unet = UNet2DConditionModel.from_pretrained(self._find_output("denoiser", "unet"))
        conditioning = ConditioningEmbedding.from_pretrained(self._find_output("denoiser", "conditioning"))
        return vae, unet, conditioning, sd_noise_scheduler(), cfg.compressor or cfg.tiny.compressor

    def _earlier_codec_checkpoint(self, index: int) -> Path | None:
        """Final checkpoint of the latest finished codec stage before `index`, if any."""
        done = set(self._progress()["done"])
        for i in reversed(range(index)):
            if self.config.stages[i].name == "codec" and i in done:
                ckpt = self.stage_dir(i) / "ckpt.pt"
                if not ckpt.is_file():
                    raise OSDiffError(f"stage {i} (codec) is done but its checkpoint {ckpt} is gone")
                return ckpt
        return None

    def _codec_stage(self, index, stage, max_steps, deadline) -> bool:
        cfg, losses = self.config, self.config.losses
        init_model = self._init_model()
        vae, plain_unet, conditioning, scheduler, comp_arch = self._codec_parts(init_model)
        rate_lambdas = stage.rate_lambdas or losses.rate_lambdas
        if len(rate_lambdas) != comp_arch.num_quality_levels:
            raise OSDiffError(f"rate_lambdas has {len(rate_lambdas)} values for {comp_arch.num_quality_levels} quality levels")
        torch.manual_seed(cfg.seed + 2)
        compressor = compressor_from(comp_arch)
        unet = add_control(plain_unet, cfg.tiny.control_size_ratio if cfg.model == "tiny" else 0.2)
        if not stage.train_unet:
            unet.freeze_unet_params()
        discriminator = UNetFeatureDiscriminator(plain_unet)
        del plain_unet
        earlier = self._earlier_codec_checkpoint(index)
        # how init_from's files are coded (padding, mean colour): the exported model keeps it
        coding = {k: init_model.config.get(k) for k in CODING_SETTINGS_SINCE_V2_1} if init_model is not None else {}
        if earlier is None and init_model is not None:  # compressor and controlled UNet from a model folder
            if _same_architecture(init_model.compressor.config, compressor.config):
                compressor.load_state_dict(init_model.compressor.state_dict())
            elif _fewer_levels(init_model.compressor.config, compressor.config):
                extra = compressor.config.num_quality_levels - init_model.compressor.config.num_quality_levels
                self.accelerator.print(f"init_from {cfg.init_from}: {extra} new quality level(s) below its lowest")
                compressor.load_state_dict(init_model.compressor.with_lower_levels(extra).state_dict())
            else:  # another compressor shape in the config: a fresh compressor for that model's other parts
                self.accelerator.print(f"init_from {cfg.init_from}: its compressor has another shape; training a new one")
            unet.load_state_dict(init_model.unet.state_dict())
        elif earlier is None and cfg.init_from:
            earlier = Path(cfg.init_from) if Path(cfg.init_from).is_absolute() else self.base / cfg.init_from
            if not earlier.is_file():
                raise OSDiffError(f"init_from: {earlier} not found")
        if earlier is not None:  # a second codec stage (or init_from) fine-tunes earlier weights
            state = torch.load(earlier, map_location="cpu", weights_only=False)["modules"]
            for name, module in (("compressor", compressor), ("unet", unet), ("discriminator", discriminator)):
                module.load_state_dict(state[name])
        del init_model
        for frozen in (vae, conditioning):
            frozen.requires_grad_(False)
        vae.to(self.device)
        conditioning.to(self.device)

        if stage.train == "gains":  # only the gain tables; everything else codes as before
            unet.requires_grad_(False)
            compressor.requires_grad_(False)
            for p in compressor.gain_parameters():
                p.requires_grad_(True)
        frozen_compressor = stage.train == "denoiser"
        if frozen_compressor:  # the control module (and UNet) learn on the hints decoding gives
            compressor.requires_grad_(False).eval()
        control_params = [p for p in unet.parameters() if p.requires_grad]
        compressor_params, aux_params = _split_quantiles(compressor)
        compressor_params = [p for p in compressor_params if p.requires_grad]
        aux_params = [p for p in aux_params if p.requires_grad]
        main_params = compressor_params + control_params
        opt = torch.optim.AdamW(main_params, lr=stage.lr, weight_decay=stage.weight_decay)
        opt_aux = torch.optim.Adam(aux_params, lr=stage.lr_aux) if aux_params else None
        opt_d = torch.optim.AdamW(discriminator.parameters(), lr=stage.lr_discriminator, betas=(0.5, 0.999))
        compressor, unet, discriminator, opt, opt_d = self._prepare(compressor, unet, discriminator, opt, opt_d)
        if opt_aux is not None:
            opt_aux = self._prepare(opt_aux)
        pixel_discriminator = None
        if losses.pixel_adversarial > 0:  # judges decoded pixels given the hint they came from
            pixel_discriminator, opt_pd = self._patch_discriminator(comp_arch.latent_channels, stage)
        encoder = vae.encoder if isinstance(vae, TAESDAutoencoder) else None
        # no pixel terms: the official loss, all in latent space (no pixel decoding in training)
        pixel_loss = losses.perceptual > 0 or losses.detail > 0 or pixel_discriminator is not None
        perceptual = (PerceptualLoss(losses.perceptual_kind, losses.lpips_net, encoder).to(self.device)
                      if losses.perceptual > 0 else None)
        if encoder is not None:  # TAEF2: raw latents (cached or not), normalised here
            pairs = self._latent_sampler(index, stage, encoder)
            to_latent = lambda raw: (raw - vae.mean) / vae.std
        else:
            pairs = _EncodingSampler(CropSampler(self._images_cached(), stage.crop, stage.batch_size, cfg.seed, index),
                                     lambda x: encode_latent(vae, x * 2 - 1), self.device)
            to_latent = lambda z: z
        alphas = scheduler.alphas_cumprod.to(self.device)
        lambdas = torch.tensor(rate_lambdas, device=self.device)
        level_weights = lambdas ** -stage.level_balance
        trained_levels = [q - 1 for q in stage.levels] if stage.levels else list(range(len(lambdas)))
        if max(trained_levels) >= len(lambdas):
            raise OSDiffError(f"levels {stage.levels}: the compressor has {len(lambdas)} quality levels")
        trained_levels = torch.tensor(trained_levels)
        t0, start = cfg.decoding.timestep, cfg.decoding.start
        prediction_type = scheduler.config.prediction_type
        a0 = decoding_alpha_bar(scheduler, t0, start)

        needs_unet = losses.latent_mse > 0 or losses.adversarial > 0 or pixel_loss
        channel_weights = torch.ones(1, device=self.device)
        if losses.latent_weighting == "decoder":  # measured once per stage, read back on resume
            weights_file = self.stage_dir(index) / "channel-weights.json"
            if weights_file.is_file():
                channel_weights = torch.tensor(json.loads(weights_file.read_text()), device=self.device)
            else:
                _, z0 = pairs.batch(10**6)  # a fixed batch, outside the training steps' range
                channel_weights = decoder_channel_weights(lambda z: decode_latent(vae, z), to_latent(z0.to(self.device))[:4])
                weights_file.parent.mkdir(parents=True, exist_ok=True)
                _atomic_write_text(weights_file, json.dumps([float(w) for w in channel_weights]))
        channel_weights = channel_weights.view(1, -1, 1, 1)

        def one_step(hint: torch.Tensor, noise: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
            """Clean latent from the hint, as decoding does: start at t0 (the noised hint, or pure
            noise with the hint only through control), one controlled-UNet evaluation, x0."""
            x_t = noise if start == "noise" else add_noise(hint, noise, a0)
            pred = unet(x_t, t0, encoder_hidden_states=ctx, controlnet_cond=hint).sample
            return decoding_x0_eps(pred, x_t, a0, prediction_type, start)[0]

        def step_fn(step: int) -> dict:
            x, z = pairs.batch(step)
            x, z = x.to(self.device), to_latent(z.to(self.device))
            gen = self._generator(index, step)
            b = x.shape[0]
            level = trained_levels[torch.randint(0, len(trained_levels), (b,), generator=gen)].to(self.device)
            noise = torch.randn(z.shape, generator=gen).to(self.device)
            d_noise = torch.randn(z.shape, generator=gen).to(self.device)
            d_t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen).to(self.device)
            use_adv = losses.adversarial > 0 and step >= losses.adversarial_start
            ctx = conditioning(b)

            with self.accelerator.accumulate(compressor, unet):
                with torch.no_grad() if frozen_compressor else contextlib.nullcontext():
                    out = compressor(z, level)  # (frozen: in eval mode, rounded as in coding)
                hint = out["hint"]
                bpp = bits_per_pixel(out["likelihoods"], x.shape[-2] * x.shape[-1])
                # compressor-only training (latent MSE, adversarial and pixel losses off): no UNet
                z_hat = one_step(hint, noise, ctx) if needs_unet else hint
                latent_mse = ((z_hat - z).pow(2) * channel_weights).mean(dim=(1, 2, 3))
                hint_mse = ((hint - z).pow(2) * channel_weights).mean(dim=(1, 2, 3))
                distortion = losses.latent_mse * latent_mse + losses.hint_mse * hint_mse
                pixel_logs = {}
                if pixel_loss:
                    x_hat = (decode_latent(vae, z_hat) + 1) / 2
                    pixel_logs["psnr"] = _psnr_tensor(x_hat, x)
                    if perceptual is not None:
                        perc = perceptual(x_hat, x)
                        distortion = distortion + losses.perceptual * perc
                        pixel_logs["perceptual"] = perc.detach().mean()
                    if losses.detail > 0:
                        detail = local_detail_loss(x_hat, x, losses.detail_window)
                        distortion = distortion + losses.detail * detail
                        pixel_logs["detail"] = detail.detach().mean()
                loss = (level_weights[level] * (bpp + lambdas[level] * distortion)).mean()
                adv = torch.zeros((), device=self.device)
                if use_adv:
                    a = alphas[d_t][:, None, None, None]
                    fake = add_noise(z_hat, d_noise, a)
                    adv = frozen_generator_loss(discriminator, fake, d_t, ctx)
                    loss = loss + losses.adversarial * adv
                if pixel_discriminator is not None:
                    pixel_adv = frozen_generator_loss(pixel_discriminator, x_hat, hint.detach())
                    loss = loss + losses.pixel_adversarial * pixel_adv
                    pixel_logs["pixel_adv_g"] = pixel_adv.detach()
                self._update(loss, main_params, opt, stage.grad_clip)
                aux = self._aux_step(compressor, opt_aux) if opt_aux is not None else torch.zeros(())

            d_loss = torch.zeros(())
            if use_adv:
                a = alphas[d_t][:, None, None, None]
                real = add_noise(z, d_noise, a)
                fake = add_noise(z_hat.detach(), d_noise, a)
                d_loss = discriminator_adversarial(discriminator(real, d_t, ctx), discriminator(fake, d_t, ctx))
                self.accelerator.backward(d_loss)
                opt_d.step()
                opt_d.zero_grad()
            if pixel_discriminator is not None:
                condition = hint.detach()
                pd_loss = discriminator_adversarial(pixel_discriminator(x, condition), pixel_discriminator(x_hat.detach(), condition))
                self.accelerator.backward(pd_loss)
                opt_pd.step()
                opt_pd.zero_grad()
                pixel_logs["pixel_adv_d"] = pd_loss.detach()
            bpp = bpp.detach()  # per level: a mean over the samples at that level (nan when none)
            per_level = {f"bpp_q{q + 1}": (bpp * (level == q)).sum() / (level == q).sum() for q in range(len(lambdas))}
            return {"loss": loss.detach(), "bpp": bpp.mean(), **per_level, "latent_mse": latent_mse.detach().mean(),
                    "hint_mse": hint_mse.detach().mean(), "adv_g": adv.detach(), "adv_d": d_loss.detach(),
                    "aux": aux.detach(), **pixel_logs}

        def val_fn() -> dict:
            """Per quality level, on the fixed crops: bpp from the entropy models (rounded latents
            in eval mode) and PSNR of the one-step reconstruction."""
            x = self._val_batch(stage.crop)
            z = encode_latent(vae, x * 2 - 1)
            noise = torch.randn(z.shape, generator=torch.Generator("cpu").manual_seed(12345)).to(self.device)
            ctx = conditioning(z.shape[0])
            out = {}
            for q in range(len(lambdas)):
                coded = compressor(z, q)
                z_hat = one_step(coded["hint"], noise, ctx)
                out[f"bpp_q{q + 1}"] = bits_per_pixel(coded["likelihoods"], x.shape[-2] * x.shape[-1]).mean().item()
                x_hat = ((decode_latent(vae, z_hat) + 1) / 2).clamp(0, 1)
                out[f"psnr_q{q + 1}"] = _psnr(x_hat, x)
                out[f"haarpsi_q{q + 1}"] = piq.haarpsi(x_hat, x, data_range=1.0).item()
                out.update({f"{k}_q{q + 1}": net(x_hat, x).mean().item() for k, net in _held_out(x.device).items()})
                out[f"detail_q{q + 1}"] = detail_retention(x_hat, x)
                # ablation: the hint decoded directly by the latent decoder, no UNet step
                x_hint = ((decode_latent(vae, coded["hint"]) + 1) / 2).clamp(0, 1)
                out[f"psnr_hint_q{q + 1}"] = _psnr(x_hint, x)
                out[f"haarpsi_hint_q{q + 1}"] = piq.haarpsi(x_hint, x, data_range=1.0).item()
                out[f"detail_hint_q{q + 1}"] = detail_retention(x_hint, x)
            return out

        modules = {"compressor": compressor, "unet": unet, "discriminator": discriminator}
        optimizers = {"main": (opt, stage.lr), "disc": (opt_d, stage.lr_discriminator)}
        if opt_aux is not None:
            optimizers["aux"] = (opt_aux, stage.lr_aux)
        if pixel_discriminator is not None:
            modules["pixel_discriminator"] = pixel_discriminator
            optimizers["pixel_disc"] = (opt_pd, stage.lr_discriminator)
        if not self._loop(index, stage, modules, optimizers, step_fn, max_steps, deadline, val_fn):
            return False
        pipe = OSDiffPipeline(
            vae=vae, compressor=self.accelerator.unwrap_model(compressor), unet=self.accelerator.unwrap_model(unet),
            conditioning=conditioning, scheduler=scheduler, model_name=cfg.model_name,
            **cfg.decoding.pipeline_config(), **{k: v for k, v in coding.items() if v is not None},
        )
        pipe.to("cpu")
        pipe.compressor.update(force=True)
        pipe.save_pretrained(self.out / "model")
        return True

    def _official_stage(self, index, stage, max_steps, deadline) -> bool:
        """The paper's LFGCM + CDDM with the official losses (osdiff.training.official)."""
        from .official import official_stage

        return official_stage(self, index, stage, max_steps, deadline)

    # ---- baseline codecs (model: baseline) ---------------------------------------------------
    def _baseline_stage(self, index, stage, max_steps, deadline) -> bool:
        """A compressai codec family, one model per rate, each trained on every batch with
        bpp + lambda_r * (MSE + perceptual + adversarial); the HiFiC-style adversarial term comes
        from one conditional patch discriminator per rate (non-saturating losses)."""
        cfg, losses, arch = self.config, self.config.losses, self.config.baseline
        rate_lambdas = stage.rate_lambdas or losses.rate_lambdas
        if len(rate_lambdas) != arch.num_rates:
            raise OSDiffError(f"rate_lambdas has {len(rate_lambdas)} values for {arch.num_rates} rates")
        torch.manual_seed(cfg.seed + 3)
        codec = LearnedImageCodec(arch.architecture, arch.N, arch.M, tuple(arch.groups), arch.num_rates)
        main_params, aux_params = _split_quantiles(codec)
        opt = torch.optim.AdamW(main_params, lr=stage.lr, weight_decay=stage.weight_decay)
        opt_aux = torch.optim.Adam(aux_params, lr=stage.lr_aux)
        codec, opt, opt_aux = self._prepare(codec, opt, opt_aux)
        modules = {"codec": codec}
        optimizers = {"main": (opt, stage.lr), "aux": (opt_aux, stage.lr_aux)}
        use_gan = losses.adversarial > 0
        if use_gan:
            discriminators = nn.ModuleList(
                ConditionalPatchDiscriminator(arch.M, tuple(arch.discriminator_channels)) for _ in range(arch.num_rates)
            )
            opt_d = torch.optim.AdamW(discriminators.parameters(), lr=stage.lr_discriminator, betas=(0.5, 0.999))
            discriminators, opt_d = self._prepare(discriminators, opt_d)
            modules["discriminators"] = discriminators
            optimizers["disc"] = (opt_d, stage.lr_discriminator)
        perceptual = (PerceptualLoss(losses.perceptual_kind, losses.lpips_net).to(self.device)
                      if losses.perceptual > 0 else None)
        sampler = CropSampler(self._images_cached(), stage.crop, stage.batch_size, cfg.seed, index)
        rates = self.accelerator.unwrap_model(codec).rates

        def step_fn(step: int) -> dict:
            x = sampler.batch(step).to(self.device)
            use_adv = use_gan and step >= losses.adversarial_start
            logs: dict[str, float] = {}
            total = torch.zeros((), device=self.device)
            fakes = []
            for r, lam in enumerate(rate_lambdas):
                out = codec(x, r)
                x_hat = out["x_hat"]
                bpp = bits_per_pixel(out["likelihoods"], x.shape[-2] * x.shape[-1]).mean()
                mse = F.mse_loss(x_hat, x)
                distortion = losses.pixel_mse * mse
                if perceptual is not None:
                    distortion = distortion + losses.perceptual * perceptual(x_hat, x).mean()
                if use_adv:
                    adv = frozen_generator_loss(discriminators[r], x_hat, out["y_hat"].detach())
                    distortion = distortion + losses.adversarial * adv
                    fakes.append((x_hat.detach(), out["y_hat"].detach()))
                total = total + bpp + lam * distortion
                logs[f"bpp_r{r + 1}"] = bpp.item()
                logs[f"psnr_r{r + 1}"] = _psnr(x_hat, x)
            self.accelerator.backward(total)
            for model in rates:  # the rates are independent models: clip each on its own
                self.accelerator.clip_grad_norm_(_split_quantiles(model)[0], stage.grad_clip)
            opt.step()
            opt.zero_grad()
            aux = self._aux_step(codec, opt_aux)
            d_loss = torch.zeros(())
            if use_adv:
                d_loss = sum(discriminator_adversarial(discriminators[r](x, y_hat), discriminators[r](fake, y_hat))
                             for r, (fake, y_hat) in enumerate(fakes))
                self.accelerator.backward(d_loss)
                opt_d.step()
                opt_d.zero_grad()
            return {"loss": total.item(), **logs, "aux": aux.item(), "adv_d": d_loss.item()}

        def val_fn() -> dict:
            """Per rate, on the fixed crops: bpp from the entropy models (rounded latents in eval
            mode) and PSNR."""
            x = self._val_batch(stage.crop)
            out = {}
            for r in range(len(rate_lambdas)):
                coded = codec(x, r)
                out[f"bpp_r{r + 1}"] = bits_per_pixel(coded["likelihoods"], x.shape[-2] * x.shape[-1]).mean().item()
                out[f"psnr_r{r + 1}"] = _psnr(coded["x_hat"], x)
            return out

        if not self._loop(index, stage, modules, optimizers, step_fn, max_steps, deadline, val_fn):
            return False
        codec = self.accelerator.unwrap_model(codec).to("cpu")
        codec.update(force=True)
        BaselinePipeline(codec=codec, model_name=cfg.model_name).save_pretrained(self.out / "model")
        return True


class _EncodingSampler:
    """(photos, raw latents) batches by running a frozen encoder on each batch of crops."""

    def __init__(self, crops: CropSampler, encoder: nn.Module, device) -> None:
        self.crops, self.encoder, self.device = crops, encoder, device

    @torch.no_grad()
    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.crops.batch(step).to(self.device)
        return x, self.encoder(x)


def _gradient_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance of horizontal and vertical neighbour differences (edge sharpness)."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]
    return (dx(pred) - dx(target)).abs().mean() + (dy(pred) - dy(target)).abs().mean()


def _low_pass_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE of 16x16 block means (average colour and brightness; what a colour cast moves)."""
    return F.mse_loss(F.avg_pool2d(pred, 16, ceil_mode=True), F.avg_pool2d(target, 16, ceil_mode=True))


def _decoder_shape(channels, blocks, trunk, trunk_layers=TRUNK_LAYERS) -> tuple:
    """A TAEF2 student decoder's shape, comparable between a vae config and a recipe (widths
    None: the teacher's own decoder)."""
    trunk = bool(trunk) and channels is not None
    return (None if channels is None else tuple(channels), tuple(blocks), trunk, int(trunk_layers) if trunk else None)


def _same_architecture(a, b) -> bool:
    """Whether two diffusers configs describe the same shapes (bookkeeping keys ignored)."""
    strip = lambda c: {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    return strip(a) == strip(b)


def _fewer_levels(init, wanted) -> bool:
    """Whether compressor config `init` is `wanted` with fewer quality levels."""
    fewer = dict(wanted, num_quality_levels=init["num_quality_levels"])
    return init["num_quality_levels"] < wanted["num_quality_levels"] and _same_architecture(init, fewer)


def _split_quantiles(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(parameters the main loss trains, the entropy bottlenecks' quantiles the aux loss trains)."""
    named = list(module.named_parameters())
    return [p for n, p in named if not n.endswith(".quantiles")], [p for n, p in named if n.endswith(".quantiles")]


def _number(v) -> float:
    """A logged value as a float (0-d tensors are read here, not in the training step)."""
    return float(v.item()) if torch.is_tensor(v) else float(v)


def _psnr_tensor(x_hat, x) -> torch.Tensor:
    """Batch PSNR in dB of images in [0,1] as a 0-d tensor (no device sync)."""
    return -10 * torch.log10(F.mse_loss(x_hat.detach().clamp(0, 1), x).clamp_min(1e-10))


def _image_metrics(preds: list, targets: list) -> dict:
    """Mean LPIPS-Alex and DISTS (the held-out metrics runs are chosen by; absent when their
    backbones are not on the machine), PSNR (dB), HaarPSI, detail retention and colour shift
    (8-bit levels) over the images of lists of batches (any sizes, in [0,1])."""
    pairs = _image_pairs(preds, targets)
    out = {name: _mean_over(pairs, lambda p, t, net=net: net(p, t).item()) for name, net in _held_out(pairs[0][0].device).items()}
    return {**out, "psnr": _mean_over(pairs, _psnr),
            "haarpsi": _mean_over(pairs, lambda p, t: piq.haarpsi(p, t, data_range=1.0).item()),
            "detail": _mean_over(pairs, detail_retention),
            "colour_shift": _mean_over(pairs, colour_shift)}


_HELD_OUT: dict[str, nn.Module] = {}


def _held_out(device) -> dict[str, nn.Module]:
    """LPIPS-Alex and DISTS for validation logs, never in a loss; loaded once ({} when their
    backbones are missing)."""
    if "loaded" not in _HELD_OUT:
        from ..quality.backbones import BackboneMissing
        from ..quality.dists import pretrained_dists
        from ..quality.lpips import pretrained_lpips

        try:
            _HELD_OUT.update(lpips=pretrained_lpips("alex"), dists=pretrained_dists())
        except BackboneMissing:
            pass
        _HELD_OUT["loaded"] = nn.Identity()
    return {k: v.to(device) for k, v in _HELD_OUT.items() if k != "loaded"}


def _mean_psnr(preds: list, targets: list) -> float:
    """Mean over the images of each one's PSNR in dB (batches of any sizes, in [0,1])."""
    return _mean_over(_image_pairs(preds, targets), _psnr)


def _image_pairs(preds: list, targets: list) -> list:
    """Lists of batches -> [(pred (1,3,H,W), target (1,3,H,W))], one pair per image."""
    return [(p[None], t[None]) for pb, tb in zip(preds, targets) for p, t in zip(pb, tb)]


def _mean_over(pairs: list, metric) -> float:
    """Mean of metric(pred, target) over (pred, target) pairs."""
    return sum(metric(p, t) for p, t in pairs) / len(pairs)


def _psnr(x_hat, x) -> float:
    """Batch PSNR in dB of images in [0,1], for the logs."""
    return -10 * math.log10(max(F.mse_loss(x_hat.detach().clamp(0, 1), x).item(), 1e-10))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
