"""Stage "decoder" (tiny model, autoencoder "taef2"): fit the TAEF2 latent statistics and distil
a slim student decoder from TAEF2's decoder (or fit it to the photos); the encoder stays frozen."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import DecodingConfig
from ...errors import OSDiffError
from ...models.taesd import TAESDAutoencoder, decoder_shape
from ...quality.pixel import psnr_tensor
from ...verbosity import progress
from ..config import DecoderStage
from ..discriminator import frozen_generator_loss
from ..losses import PerceptualLoss, discriminator_adversarial, local_detail_loss, low_pass_mse
from ..parts import init_model, patch_discriminator, teacher_autoencoder
from ..run import TrainingRun
from ..validation import image_metrics, mean_psnr


def train(run: TrainingRun, index: int, stage: DecoderStage) -> bool:
    """Run (or resume) the stage; True when it is finished (its vae/ written; with decoder_inputs
    "codec" also model/: init_from's codec with this decoder)."""
    cfg, arch, losses = run.config, run.config.tiny, run.config.losses
    if arch.autoencoder != "taef2":
        raise OSDiffError("stage 'decoder' needs tiny.autoencoder: taef2")
    init = init_model(run)
    photo = stage.decoder_target == "photo"
    shape = dict(channels=arch.student_decoder_channels, blocks=arch.student_decoder_blocks, trunk=arch.student_decoder_trunk,
                 trunk_layers=arch.student_decoder_trunk_layers)
    continues = False  # init_from's student goes on learning
    if init is not None:
        if not isinstance(init.vae, TAESDAutoencoder):
            raise OSDiffError(f"init_from {cfg.init_from}: its autoencoder is not a TAEF2 one")
        continues = init.vae.decoder_layout == decoder_shape(**shape)
    needs_teacher = not (photo and continues)
    teacher = teacher_autoencoder(run).to(run.device).requires_grad_(False).eval() if needs_teacher else None
    if init is not None:
        # the model folder's latent statistics are kept; its student continues when it has
        # this recipe's shape, else a new student of that shape starts
        student = init.vae.to(run.device) if continues else init.vae.with_decoder(**shape).to(run.device)
        codec = init.to(run.device) if stage.decoder_inputs == "codec" else None
    else:
        sampler = run.crop_sampler(index, stage, crop=stage.crop or 256)
        with torch.no_grad():  # per-channel latent statistics from 64 fixed training crops (the same on every process)
            crops = torch.cat([sampler.batch(10**6 + i, rank=0) for i in range(-(-64 // stage.batch_size))])
            teacher.fit_latent_statistics(crops.to(run.device))
        torch.manual_seed(cfg.seed + 5)
        student = teacher.with_decoder(**shape).to(run.device)
        codec = None
    if not continues and student.config.decoder_trunk:
        student.load_trunk(teacher)  # the teacher's first layers, kept or fine-tuned
    del init
    if codec is not None:
        codec.compressor.eval().requires_grad_(False)  # eval: rounded latents, as in coding
        codec.unet.eval().requires_grad_(False)
        levels = codec.compressor.config.num_quality_levels
        # per level: whether the model decodes with the UNet step (above its unet_max_quality it
        # decodes the hint directly, so the decoder learns the hint there)
        takes_step = torch.tensor(DecodingConfig.from_pipeline_config(codec.config).steps_per_level(levels), device=run.device)
    student.encoder.requires_grad_(False).eval()
    if stage.decoder_freeze_trunk:
        if student.trunk is None:
            raise OSDiffError("decoder_freeze_trunk needs tiny.student_decoder_trunk: true")
        student.trunk.requires_grad_(False)
    params = [p for p in student.decoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    student, opt = run.prepare(student, opt)
    model = run.unwrap(student)
    modules, optimizers = {"vae": student}, {"vae": (opt, stage.lr)}
    discriminator = None
    if losses.decoder_adversarial:  # judges (image, normalised latent it was decoded from)
        discriminator, opt_d = patch_discriminator(run, model.config.latent_channels, stage)
        modules["discriminator"], optimizers["disc"] = discriminator, (opt_d, stage.lr_discriminator)
    features = PerceptualLoss("taesd-features", encoder=model.encoder).to(run.device) if losses.decoder_features else None
    lpips = PerceptualLoss("lpips", lpips_net=losses.lpips_net).to(run.device) if losses.decoder_lpips else None
    pairs = run.latent_sampler(index, stage, model.encoder, codec.compressor.latent_multiple if codec is not None else 1)
    std = model.std
    extra_terms = {  # loss = decoder_l1 * L1 + the sum of weight * term
        "mse": (losses.decoder_mse, F.mse_loss),
        "colour": (losses.decoder_colour, low_pass_mse),
        "features": (losses.decoder_features, lambda p, t: features(p, t).mean()),
        "gradient": (losses.decoder_gradient, gradient_l1),
        "lpips": (losses.decoder_lpips, lambda p, t: lpips(p, t).mean()),
        "detail": (losses.decoder_detail, lambda p, t: local_detail_loss(p, t, losses.detail_window).mean()),
    }

    def step_fn(step: int) -> dict:
        x, raw, target = decoder_input(step)
        with run.accumulate(student):
            pred = (model.decode_raw(raw) + 1) / 2
            l1 = (pred - target).abs().mean()
            loss = losses.decoder_l1 * l1
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
            run.update(loss, params, opt, stage.grad_clip)
        if discriminator is not None:
            d_loss = discriminator_adversarial(discriminator(x, condition), discriminator(pred.detach(), condition))
            run.update(d_loss, None, opt_d)
            logs["adv_d"] = d_loss.detach()
        return {"loss": loss.detach(), **logs, f"psnr_{stage.decoder_target}": psnr_tensor(pred, target)}

    def one_step_raw(raw: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """Raw latents (B,C,h,w) -> what the codec decodes at quality levels (B,) (0-based), raw:
        the one-step output, or the hint above the model's unet_max_quality."""
        hint = codec.compressor((raw - model.mean) / std, level)["hint"]
        steps = takes_step[level.to(takes_step.device)].view(-1, 1, 1, 1)
        out = torch.where(steps, codec.denoise(hint), hint) if bool(steps.any()) else hint
        return out * std + model.mean

    def decoder_input(step: int, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(photos, raw latents the decoder decodes, target images) of training step `step` on
        this process (or process `rank`)."""
        x, raw = pairs.batch(step, rank)
        x, raw = x.to(run.device), raw.to(run.device)
        gen = run.generator(index, step, rank)
        with torch.no_grad():
            if codec is not None:  # the one-step output of a random quality level
                raw = one_step_raw(raw, torch.randint(0, levels, (raw.shape[0],), generator=gen).to(run.device))
            else:
                # half the batch perturbed, so the decoder also learns latents off the data
                # manifold (decoded latents carry coding errors)
                sigma = torch.rand(raw.shape[0], 1, 1, 1, generator=gen).to(run.device) * 0.5
                sigma[: raw.shape[0] // 2] = 0
                raw = raw + sigma * std * torch.randn(raw.shape, generator=gen).to(run.device)
            target = x if photo else (teacher.decode_raw(raw).clamp(-1, 1) + 1) / 2
        return x, raw, target

    if stage.decoder_head_fit and not (run.stage_dir(index) / "ckpt.pt").is_file():
        fit_decoder_head(run, model, stage, lambda step: decoder_input(step, rank=0))

    fixed = None  # what the frozen networks give for the validation photos, computed once

    def val_fn() -> dict:
        # crops, or (crop 0) the whole photos one at a time: TAEF2's GroupNorm sees the
        # statistics it sees when coding
        nonlocal fixed
        decode = lambda net, raws: [((net.decode_raw(r) + 1) / 2).clamp(0, 1) for r in raws]  # noqa: E731
        if fixed is None:
            multiple = 8 * (codec.compressor.latent_multiple if codec is not None else 1)
            xs = list(run.val_batch(stage.crop).split(4)) if stage.crop else run.val_whole(multiple)
            raws = [model.encode_raw(x * 2 - 1) for x in xs]
            fixed = {"photos": xs, "raws": raws,
                     "teacher": decode(teacher, raws) if teacher is not None else None,
                     "one_step": [[one_step_raw(r, torch.full((r.shape[0],), level, device=r.device)) for r in raws]
                                  for level in range(levels)] if codec is not None else None}
            if codec is not None and teacher is not None:  # what TAEF2's own decoder makes of them
                fixed["teacher_one_step"] = [decode(teacher, outputs) for outputs in fixed["one_step"]]
        xs = fixed["photos"]
        preds = decode(model, fixed["raws"])
        out = image_metrics(preds, xs)
        if teacher is not None:
            reference = fixed["teacher"]
            out.update(psnr_teacher_decoder=mean_psnr(reference, xs), psnr_vs_teacher=mean_psnr(preds, reference))
        if codec is not None:  # what it learns: the one-step outputs, averaged over the levels
            decoded = [decode(model, outputs) for outputs in fixed["one_step"]]
            per_level = [image_metrics(images, xs) for images in decoded]
            out.update({f"{k}_one_step": sum(m[k] for m in per_level) / levels for k in per_level[0]})
            if teacher is not None:
                out["psnr_vs_teacher_one_step"] = sum(
                    mean_psnr(images, reference) for images, reference in zip(decoded, fixed["teacher_one_step"])) / levels
        return out

    if not run.loop(index, stage, modules, optimizers, step_fn, val_fn):
        return False
    if run.is_main:
        model.save_pretrained(run.stage_dir(index) / "out" / "vae")
        if codec is not None:  # the codec it learned to decode, with this decoder
            codec.register_modules(vae=model)
            codec.to("cpu").save_pretrained(run.out / "model")
    return True


def fit_decoder_head(run: TrainingRun, model: TAESDAutoencoder, stage: DecoderStage, decoder_input) -> None:
    """Closed-form start for a trunk decoder whose head is one conv + pixel shuffle: ridge
    least squares from the trunk's features to the targets of `stage.decoder_head_fit`
    photos (decoder_input(step) -> (photos, raw latents, targets), drawn at steps past the
    stage's own, the same on every process)."""
    from ..head_fit import ConvHeadLeastSquares

    c = model.config
    if not (c.decoder_trunk and len(c.decoder_channels) == 0 and isinstance(model.decoder[-1], nn.PixelShuffle)):
        raise OSDiffError("decoder_head_fit needs a trunk decoder with no new levels "
                          "(tiny.student_decoder_trunk: true, student_decoder_channels: [])")
    fit = ConvHeadLeastSquares(model.decoder[-2], model.decoder[-1].upscale_factor, seed=run.config.seed)
    for i in progress(range(stage.decoder_head_fit), desc="head fit", disable=not run.accelerator.is_local_main_process):
        _, raw, target = decoder_input(stage.steps + 10**6 + i)
        with torch.no_grad():
            for one_raw, one_target in zip(raw.split(1), target.split(1)):
                fit.add(model.trunk(one_raw), one_target)
    fit.solve()


def gradient_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance of horizontal and vertical neighbour differences (edge sharpness)."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(pred) - dx(target)).abs().mean() + (dy(pred) - dy(target)).abs().mean()
