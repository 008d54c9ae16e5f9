"""Stage "codec": freeze autoencoder and UNet; train compressor + control module (+ the UNet
with train_unet, + a student encoder with train_encoder, + discriminators) with rate + latent
MSE + hint MSE + perceptual + adversarial."""
from __future__ import annotations

import contextlib

import piq
import torch
from diffusers import UNet2DConditionModel

from ...build import SD_COMPRESSOR, add_control, compressor_from, sd_noise_scheduler, tiny_unet
from ...codec_pipeline import CODING_SETTINGS_SINCE_V2_1
from ...denoise import add_noise, decoding_alpha_bar, decoding_x0_eps
from ...errors import OSDiffError
from ...models.autoencoder import decode_latent, encode_latent
from ...models.conditioning import ConditioningEmbedding
from ...models.taesd import TAESDAutoencoder
from ...pipeline import OSDiffPipeline
from ...rate import level_index
from ...quality.artifacts import delta_e
from ...quality.pixel import detail_retention, psnr_tensor
from ..config import CodecStage
from ..discriminator import UNetFeatureDiscriminator, frozen_generator_loss
from ..losses import PerceptualLoss, bits_per_pixel, discriminator_adversarial, local_detail_loss, low_pass_mse
from ..parts import init_model, patch_discriminator, split_quantiles, stage_channel_weights, teacher_autoencoder, trained_vae
from ..run import TrainingRun
from .encoder import loss_mask, masked_mean
from ..validation import held_out_metrics


def train(run: TrainingRun, index: int, stage: CodecStage) -> bool:
    """Run (or resume) the stage; True when it is finished (model/ written)."""
    cfg, losses = run.config, run.config.losses
    init = init_model(run)
    vae, plain_unet, conditioning, scheduler, comp_arch = codec_parts(run, init)
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
    earlier = run.finished_checkpoint("codec", index)
    # how init_from's files are coded (padding, mean colour): the exported model keeps it
    coding = {k: init.config.get(k) for k in CODING_SETTINGS_SINCE_V2_1} if init is not None else {}
    if earlier is None and init is not None:  # compressor and controlled UNet from a model folder
        if same_architecture(init.compressor.config, compressor.config):
            compressor.load_state_dict(init.compressor.state_dict())
        elif fewer_levels(init.compressor.config, compressor.config):
            extra = compressor.config.num_quality_levels - init.compressor.config.num_quality_levels
            run.print(f"init_from {cfg.init_from}: {extra} new quality level(s) below its lowest")
            compressor.load_state_dict(init.compressor.with_lower_levels(extra).state_dict())
        else:  # another compressor shape in the config: a fresh compressor for that model's other parts
            run.print(f"init_from {cfg.init_from}: its compressor has another shape; training a new one")
        unet.load_state_dict(init.unet.state_dict())
    elif earlier is None and cfg.init_from:
        earlier = run.path(cfg.init_from)
        if not earlier.is_file():
            raise OSDiffError(f"init_from: {earlier} not found")
    state = {}
    if earlier is not None:  # a second codec stage (or init_from) fine-tunes earlier weights
        state = torch.load(earlier, map_location="cpu", weights_only=False)["modules"]
        for name, module in (("compressor", compressor), ("unet", unet), ("discriminator", discriminator)):
            module.load_state_dict(state[name])
    del init
    for frozen in (vae, conditioning):
        frozen.requires_grad_(False)
    vae.to(run.device)
    conditioning.to(run.device)
    student = None  # train_encoder: the student encoder learns, TAEF2's cached latents are the targets
    if stage.train_encoder:
        if not (isinstance(vae, TAESDAutoencoder) and vae.slim_encoder):
            raise OSDiffError(f"train_encoder: init_from {cfg.init_from} has no student encoder "
                              "(export an encoder stage's run with --base that model)")
        student = vae.encoder.requires_grad_(True)
        if vae.teacher_tail is not None:
            vae.teacher_tail.requires_grad_(False)
        if earlier is not None and "encoder" in state:
            student.load_state_dict(state["encoder"])

    if stage.train == "gains":  # only the gain tables; everything else codes as before
        unet.requires_grad_(False)
        compressor.requires_grad_(False)
        for p in compressor.gain_parameters():
            p.requires_grad_(True)
    frozen_compressor = stage.train == "denoiser"
    if frozen_compressor:  # the control module (and UNet) learn on the hints decoding gives
        compressor.requires_grad_(False).eval()
    control_params = [p for p in unet.parameters() if p.requires_grad]
    compressor_params, aux_params = split_quantiles(compressor)
    compressor_params = [p for p in compressor_params if p.requires_grad]
    aux_params = [p for p in aux_params if p.requires_grad]
    main_params = compressor_params + control_params
    if student is not None:
        main_params += [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(main_params, lr=stage.lr, weight_decay=stage.weight_decay)
    opt_aux = torch.optim.Adam(aux_params, lr=stage.lr_aux) if aux_params else None
    opt_d = torch.optim.AdamW(discriminator.parameters(), lr=stage.lr_discriminator, betas=(0.5, 0.999))
    compressor, unet, discriminator, opt, opt_d = run.prepare(compressor, unet, discriminator, opt, opt_d)
    if student is not None:
        student = run.prepare(student)
    if opt_aux is not None:
        opt_aux = run.prepare(opt_aux)
    pixel_discriminator = None
    if losses.pixel_adversarial > 0:  # judges decoded pixels given the hint they came from
        pixel_discriminator, opt_pd = patch_discriminator(run, comp_arch.latent_channels, stage)
    encoder = vae.encoder if isinstance(vae, TAESDAutoencoder) else None
    if student is not None:  # the cache and the perceptual loss's features: TAEF2's own encoder
        encoder = teacher_autoencoder(run).encoder.to(run.device).requires_grad_(False).eval()
    # no pixel terms: the official loss, all in latent space (no pixel decoding in training)
    pixel_loss = losses.perceptual > 0 or losses.detail > 0 or losses.colour > 0 or pixel_discriminator is not None
    perceptual = (PerceptualLoss(losses.perceptual_kind, losses.lpips_net, encoder).to(run.device)
                  if losses.perceptual > 0 else None)
    if encoder is not None:  # TAEF2: raw latents (cached or not), normalised here
        pairs = run.latent_sampler(index, stage, encoder)
        to_latent = lambda raw: (raw - vae.mean) / vae.std
    else:
        pairs = run.encoding_sampler(index, stage, lambda x: encode_latent(vae, x * 2 - 1))
        to_latent = lambda z: z
    alphas = scheduler.alphas_cumprod.to(run.device)
    lambdas = torch.tensor(rate_lambdas, device=run.device)
    level_weights = lambdas ** -stage.level_balance
    trained_levels = [level_index(q) for q in stage.qualities] if stage.qualities else list(range(len(lambdas)))
    if max(trained_levels) >= len(lambdas):
        raise OSDiffError(f"qualities {stage.qualities}: the compressor has {len(lambdas)} quality levels")
    trained_levels = torch.tensor(trained_levels)
    t0, start = cfg.decoding.timestep, cfg.decoding.start
    prediction_type = scheduler.config.prediction_type
    a0 = decoding_alpha_bar(scheduler, t0, start)
    # per level: whether decoding takes the UNet step (above decoding.unet_max_quality the model
    # decodes the hint directly, so the losses there are taken on the hint's decoding)
    takes_step = torch.tensor(cfg.decoding.steps_per_level(len(lambdas)), device=run.device)

    needs_unet = losses.latent_mse > 0 or losses.adversarial > 0 or pixel_loss
    channel_weights = torch.ones(1, 1, 1, 1, device=run.device)
    if losses.latent_weighting == "decoder":  # on a fixed batch, outside the training steps' range
        channel_weights = stage_channel_weights(run, index, lambda z: decode_latent(vae, z),
                                                lambda: to_latent(pairs.batch(10**6, rank=0)[1].to(run.device))[:4])

    def one_step(hint: torch.Tensor, noise: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Clean latent from the hint, as decoding does: start at t0 (the noised hint, or pure
        noise with the hint only through control), one controlled-UNet evaluation, x0."""
        x_t = noise if start == "noise" else add_noise(hint, noise, a0)
        pred = unet(x_t, t0, encoder_hidden_states=ctx, controlnet_cond=hint).sample
        return decoding_x0_eps(pred, x_t, a0, prediction_type, start)[0]

    def step_fn(step: int) -> dict:
        x, z = pairs.batch(step)
        x, z = x.to(run.device), to_latent(z.to(run.device))
        coded, anchor_logs = z, {}
        if student is not None:  # the student's latent is coded; TAEF2's stays the target
            coded = to_latent(student(x))
            mask = loss_mask(pairs.edges(step), z.shape[-2:], stage.encoder_margin).to(run.device)
            anchor = masked_mean((coded - z).pow(2) * channel_weights, mask, dim=(1, 2, 3))
            anchor_logs["encoder_anchor"] = anchor.detach().mean()
        gen = run.generator(index, step)
        b = x.shape[0]
        level = trained_levels[torch.randint(0, len(trained_levels), (b,), generator=gen)].to(run.device)
        noise = torch.randn(z.shape, generator=gen).to(run.device)
        d_noise = torch.randn(z.shape, generator=gen).to(run.device)
        d_t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen).to(run.device)
        use_adv = losses.adversarial > 0 and step >= losses.adversarial_start
        ctx = conditioning(b)

        with run.accumulate(compressor, unet):
            with torch.no_grad() if frozen_compressor else contextlib.nullcontext():
                out = compressor(coded, level)  # (frozen: in eval mode, rounded as in coding)
            hint = out["hint"]
            bpp = bits_per_pixel(out["likelihoods"], x.shape[-2] * x.shape[-1])
            # compressor-only training (latent MSE, adversarial and pixel losses off): no UNet
            z_hat = hint
            if needs_unet and bool(takes_step[level].any()):
                stepped = takes_step[level][:, None, None, None]
                z_hat = torch.where(stepped, one_step(hint, noise, ctx), hint)
            latent_mse = ((z_hat - z).pow(2) * channel_weights).mean(dim=(1, 2, 3))
            hint_mse = ((hint - z).pow(2) * channel_weights).mean(dim=(1, 2, 3))
            distortion = losses.latent_mse * latent_mse + losses.hint_mse * hint_mse
            if student is not None:
                distortion = distortion + losses.encoder_anchor * anchor
            pixel_logs = {}
            if pixel_loss:
                with run.pixel_autocast():
                    x_hat = ((decode_latent(vae, z_hat) + 1) / 2).float()
                    perc = perceptual(x_hat, x).float() if perceptual is not None else None
                pixel_logs["psnr"] = psnr_tensor(x_hat, x)
                if perc is not None:
                    distortion = distortion + losses.perceptual * perc
                    pixel_logs["perceptual"] = perc.detach().mean()
                if losses.detail > 0:
                    detail = local_detail_loss(x_hat, x, losses.detail_window)
                    distortion = distortion + losses.detail * detail
                    pixel_logs["detail"] = detail.detach().mean()
                if losses.colour > 0:
                    colour = torch.stack([low_pass_mse(a[None], b[None]) for a, b in zip(x_hat, x)])
                    distortion = distortion + losses.colour * colour
                    pixel_logs["colour"] = colour.detach().mean()
            loss = (level_weights[level] * (bpp + lambdas[level] * distortion)).mean()
            adv = torch.zeros((), device=run.device)
            if use_adv:
                a = alphas[d_t][:, None, None, None]
                fake = add_noise(z_hat, d_noise, a)
                adv = frozen_generator_loss(discriminator, fake, d_t, ctx)
                loss = loss + losses.adversarial * adv
            if pixel_discriminator is not None:
                pixel_adv = frozen_generator_loss(pixel_discriminator, x_hat, hint.detach())
                loss = loss + losses.pixel_adversarial * pixel_adv
                pixel_logs["pixel_adv_g"] = pixel_adv.detach()
            run.update(loss, main_params, opt, stage.grad_clip)
            aux = run.aux_step(compressor, opt_aux) if opt_aux is not None else torch.zeros(())

        d_loss = torch.zeros(())
        if use_adv:
            a = alphas[d_t][:, None, None, None]
            real = add_noise(z, d_noise, a)
            fake = add_noise(z_hat.detach(), d_noise, a)
            d_loss = discriminator_adversarial(discriminator(real, d_t, ctx), discriminator(fake, d_t, ctx))
            run.update(d_loss, None, opt_d)
        if pixel_discriminator is not None:
            condition = hint.detach()
            pd_loss = discriminator_adversarial(pixel_discriminator(x, condition), pixel_discriminator(x_hat.detach(), condition))
            run.update(pd_loss, None, opt_pd)
            pixel_logs["pixel_adv_d"] = pd_loss.detach()
        bpp = bpp.detach()  # per level: a mean over the samples at that level (nan when none)
        per_level = {f"bpp_q{q + 1}": (bpp * (level == q)).sum() / (level == q).sum() for q in range(len(lambdas))}
        return {"loss": loss.detach(), "bpp": bpp.mean(), **per_level, "latent_mse": latent_mse.detach().mean(),
                "hint_mse": hint_mse.detach().mean(), "adv_g": adv.detach(), "adv_d": d_loss.detach(),
                "aux": aux.detach(), **pixel_logs, **anchor_logs}

    def val_fn() -> dict:
        """Per quality level, on the fixed crops: bpp from the entropy models (rounded latents
        in eval mode) and PSNR of the reconstruction as the model decodes it (one step, or above
        unet_max_quality the hint directly)."""
        x = run.val_batch(stage.crop)
        z = encode_latent(vae, x * 2 - 1)
        noise = torch.randn(z.shape, generator=torch.Generator("cpu").manual_seed(12345)).to(run.device)
        ctx = conditioning(z.shape[0])
        out = {}
        for q in range(len(lambdas)):
            coded = compressor(z, q)
            z_hat = one_step(coded["hint"], noise, ctx) if takes_step[q] else coded["hint"]
            out[f"bpp_q{q + 1}"] = bits_per_pixel(coded["likelihoods"], x.shape[-2] * x.shape[-1]).mean().item()
            x_hat = ((decode_latent(vae, z_hat) + 1) / 2).clamp(0, 1)
            out[f"psnr_q{q + 1}"] = psnr_tensor(x_hat, x).item()
            out[f"haarpsi_q{q + 1}"] = piq.haarpsi(x_hat, x, data_range=1.0).item()
            out.update({f"{k}_q{q + 1}": net(x_hat, x).mean().item() for k, net in held_out_metrics(x.device).items()})
            out[f"detail_q{q + 1}"] = detail_retention(x_hat, x)
            out[f"delta_e_q{q + 1}"] = sum(delta_e(a[None], b[None]) for a, b in zip(x_hat, x)) / len(x)
            # ablation: the hint decoded directly by the latent decoder, no UNet step
            x_hint = ((decode_latent(vae, coded["hint"]) + 1) / 2).clamp(0, 1)
            out[f"psnr_hint_q{q + 1}"] = psnr_tensor(x_hint, x).item()
            out[f"haarpsi_hint_q{q + 1}"] = piq.haarpsi(x_hint, x, data_range=1.0).item()
            out[f"detail_hint_q{q + 1}"] = detail_retention(x_hint, x)
        return out

    modules = {"compressor": compressor, "unet": unet, "discriminator": discriminator}
    optimizers = {"main": (opt, stage.lr), "disc": (opt_d, stage.lr_discriminator)}
    if opt_aux is not None:
        optimizers["aux"] = (opt_aux, stage.lr_aux)
    if student is not None:
        modules["encoder"] = student
    if pixel_discriminator is not None:
        modules["pixel_discriminator"] = pixel_discriminator
        optimizers["pixel_disc"] = (opt_pd, stage.lr_discriminator)
    if not run.loop(index, stage, modules, optimizers, step_fn, val_fn):
        return False
    if student is not None:
        vae.encoder = run.unwrap(student)
    pipe = OSDiffPipeline(
        vae=vae, compressor=run.unwrap(compressor), unet=run.unwrap(unet),
        conditioning=conditioning, scheduler=scheduler, model_name=cfg.model_name,
        **cfg.decoding.pipeline_config(), **{k: v for k, v in coding.items() if v is not None},
    )
    if run.is_main:
        pipe.to("cpu")
        pipe.compressor.update(force=True)
        pipe.save_pretrained(run.out / "model")
    return True


def codec_parts(run: TrainingRun, init: OSDiffPipeline | None = None):
    """(vae, plain unet, conditioning, scheduler, compressor architecture); from `init`, the
    model folder named by init_from, when there is one."""
    cfg = run.config
    if init is not None:  # continue a finished model: its parts (the plain UNet only gives shapes)
        return init.vae, tiny_unet(cfg.tiny), init.conditioning, init.scheduler, cfg.compressor or cfg.tiny.compressor
    if cfg.model == "sd21":
        if not cfg.base_model:
            raise OSDiffError("model 'sd21' needs base_model: a local Stable Diffusion 2.1 diffusers folder")
        from diffusers import AutoencoderKL, DDIMScheduler

        folder = run.path(cfg.base_model)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
        conditioning = ConditioningEmbedding.from_text_encoder(folder)
        scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
        return vae, unet, conditioning, scheduler, cfg.compressor or SD_COMPRESSOR
    vae = trained_vae(run)
    unet = UNet2DConditionModel.from_pretrained(run.find_output("denoiser", "unet"))
    conditioning = ConditioningEmbedding.from_pretrained(run.find_output("denoiser", "conditioning"))
    return vae, unet, conditioning, sd_noise_scheduler(), cfg.compressor or cfg.tiny.compressor


def same_architecture(a, b) -> bool:
    """Whether two diffusers configs describe the same shapes (bookkeeping keys ignored)."""
    strip = lambda c: {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    return strip(a) == strip(b)


def fewer_levels(init, wanted) -> bool:
    """Whether compressor config `init` is `wanted` with fewer quality levels."""
    fewer = dict(wanted, num_quality_levels=init["num_quality_levels"])
    return init["num_quality_levels"] < wanted["num_quality_levels"] and same_architecture(init, fewer)
