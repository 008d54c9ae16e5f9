"""Stage "official" (model: official): the paper's LFGCM + CDDM on a frozen SD 2.1 with the
official losses; what it computes and where it differs from the published code:
osdiff.training.official."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...denoise import alphas_cumprod_float64
from ...errors import OSDiffError
from ...models.official.cddm import CDDMControl, controlled_unet_forward
from ...quality.pixel import psnr_tensor
from ..config import OfficialStage
from ..discriminator import UNetFeatureDiscriminator, frozen_generator_loss
from ..losses import discriminator_adversarial
from ..official import OFFICIAL_T, WEIGHTS, control_kwargs_for, init_control_from_unet, official_parts
from ..parts import split_quantiles
from ..run import TrainingRun


def train(run: TrainingRun, index: int, stage: OfficialStage) -> bool:
    """Run (or resume) one official training stage; True when it is finished (model/ and
    official_lambda.ckpt written)."""
    from ...convert.official import official_scheduler
    from ...models.official.lfgcm import OfficialLFGCM
    from ...official_pipeline import OfficialLevels, OfficialOSDiffPipeline

    cfg = run.config
    if not cfg.base_model:
        raise OSDiffError("model 'official' needs base_model: a local SD 2.1 diffusers folder or v2-1_512-ema-pruned.ckpt")
    lambdas = stage.rate_lambdas or [1.0]
    if len(lambdas) != 1:
        raise OSDiffError("stage 'official' trains one lambda per run (rate_lambdas: [one value], the weight of bpp)")
    rate_weight = float(lambdas[0])
    vae, unet, conditioning, ocfg = official_parts(run.path(cfg.base_model), cfg.official_config and run.path(cfg.official_config))
    torch.manual_seed(cfg.seed + 2)
    lfgcm = OfficialLFGCM(**ocfg.lfgcm_kwargs())
    control = CDDMControl(**control_kwargs_for(unet, ocfg.control))
    init_control_from_unet(control, unet)
    discriminator = UNetFeatureDiscriminator(unet)
    for frozen in (vae, unet, conditioning):
        frozen.requires_grad_(False)
        frozen.to(run.device)
    scheduler = official_scheduler(ocfg)
    alphas = torch.from_numpy(alphas_cumprod_float64(ocfg.timesteps, ocfg.linear_start, ocfg.linear_end))
    sqrt_a = alphas.sqrt().float().to(run.device)  # ldm's registered float32 buffers
    sqrt_1ma = (1 - alphas).sqrt().float().to(run.device)
    recip = (1 / alphas).sqrt().float().to(run.device)
    recipm1 = (1 / alphas - 1).sqrt().float().to(run.device)

    def q_sample(x0, t, noise):
        return sqrt_a[t][:, None, None, None] * x0 + sqrt_1ma[t][:, None, None, None] * noise

    main_params, aux_params = split_quantiles(lfgcm)
    main_params = main_params + list(control.parameters())
    opt = torch.optim.AdamW(main_params, lr=stage.lr, weight_decay=stage.weight_decay)
    opt_aux = torch.optim.AdamW(aux_params, lr=stage.lr_aux)
    opt_d = torch.optim.AdamW(discriminator.parameters(), lr=stage.lr_discriminator)
    lfgcm, control, discriminator, opt, opt_aux, opt_d = run.prepare(lfgcm, control, discriminator, opt, opt_aux, opt_d)
    sampler = run.crop_sampler(index, stage)
    sf = vae.config.scaling_factor

    def forward(x: torch.Tensor, gen: torch.Generator):
        b = x.shape[0]
        with torch.no_grad():
            posterior = vae.encode(x * 2 - 1).latent_dist
            z = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(x)) * sf
        out = lfgcm(z)
        bpp = sum(torch.log(v).sum() for v in out["likelihoods"].values()) / (-math.log(2) * b * x.shape[-2] * x.shape[-1])
        t = torch.full((b,), OFFICIAL_T, dtype=torch.long, device=x.device)
        x_t = q_sample(z, t, torch.randn(z.shape, generator=gen).to(z))
        eps = controlled_unet_forward(control, unet, x_t, t, conditioning(b), out["hint"])
        z0 = recip[t][:, None, None, None] * x_t - recipm1[t][:, None, None, None] * eps
        return z, out["hint"], bpp, z0

    def step_fn(step: int) -> dict:
        x = sampler.batch(step).to(run.device)
        gen = run.generator(index, step)
        b = x.shape[0]
        ctx = conditioning(b)
        with run.accumulate(lfgcm, control):
            z, hint, bpp, z0 = forward(x, gen)
            latent_mse = F.mse_loss(z0, z)
            hint_mse = F.mse_loss(hint, z)
            t1 = torch.randint(0, ocfg.timesteps, (b,), generator=gen).to(run.device)
            n1 = torch.randn(z.shape, generator=gen).to(z)
            adv = frozen_generator_loss(discriminator, q_sample(z0, t1, n1), t1, ctx)
            loss = WEIGHTS["latent_mse"] * latent_mse + rate_weight * bpp + WEIGHTS["hint_mse"] * hint_mse + WEIGHTS["adversarial"] * adv
            run.update(loss, main_params, opt, stage.grad_clip)
            aux = run.aux_step(lfgcm, opt_aux)
        d_loss = discriminator_adversarial(discriminator(q_sample(z, t1, n1), t1, ctx), discriminator(q_sample(z0.detach(), t1, n1), t1, ctx))
        run.update(d_loss, discriminator.parameters(), opt_d, stage.grad_clip)
        return {"loss": loss.item(), "bpp": bpp.item(), "latent_mse": latent_mse.item(), "hint_mse": hint_mse.item(),
                "adv_g": adv.item(), "adv_d": d_loss.item(), "aux": aux.item()}

    def val_fn() -> dict:
        """bpp (entropy models, eval mode) and PSNR of the official one-step decode from fixed noise."""
        x = run.val_batch(stage.crop)
        z = vae.encode(x * 2 - 1).latent_dist.mode() * sf
        out = lfgcm(z)
        b = x.shape[0]
        t = torch.full((b,), OFFICIAL_T, dtype=torch.long, device=x.device)
        x_t = torch.randn(z.shape, generator=torch.Generator().manual_seed(12345)).to(z)
        eps = controlled_unet_forward(control, unet, x_t, t, conditioning(b), out["hint"])
        z0 = recip[t][:, None, None, None] * x_t - recipm1[t][:, None, None, None] * eps
        bpp = sum(torch.log(v).sum() for v in out["likelihoods"].values()) / (-math.log(2) * b * x.shape[-2] * x.shape[-1])
        return {"bpp": bpp.item(), "psnr": psnr_tensor((vae.decode(z0 / sf).sample.clamp(-1, 1) + 1) / 2, x).item()}

    modules = {"lfgcm": lfgcm, "control": control, "discriminator": discriminator}
    optimizers = {"main": (opt, stage.lr), "aux": (opt_aux, stage.lr_aux), "disc": (opt_d, stage.lr_discriminator)}
    if not run.loop(index, stage, modules, optimizers, step_fn, val_fn):
        return False
    if not run.is_main:
        return True
    unwrap = run.unwrap
    own = lambda m: {k: v for k, v in unwrap(m).config.items() if not k.startswith("_")}  # noqa: E731
    levels = OfficialLevels(num_levels=1, compressor=own(lfgcm), control=own(control))
    levels.compressors[0].load_state_dict(unwrap(lfgcm).state_dict())
    levels.controls[0].load_state_dict(unwrap(control).state_dict())
    levels.update(force=True)
    pipe = OfficialOSDiffPipeline(vae=vae, unet=unet, levels=levels, conditioning=conditioning, scheduler=scheduler,
                                  model_name=cfg.model_name, noise_seed=cfg.decoding.noise_seed)
    pipe.to("cpu")
    pipe.save_pretrained(run.out / "model")
    # the run in the official layout too: `osdiff convert-official --ckpt` joins runs (one per
    # lambda) into the quality levels of one model folder
    from ...convert.official import official_lambda_state

    torch.save({"state_dict": official_lambda_state(levels.controls[0], levels.compressors[0])}, run.out / "official_lambda.ckpt")
    return True
