"""Stage "baseline" (model: baseline): a compressai codec family on pixels, one model per rate."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...baseline_pipeline import BaselinePipeline
from ...errors import OSDiffError
from ...models.baselines import LearnedImageCodec
from ...quality.pixel import psnr_tensor
from ..config import BaselineStage
from ..discriminator import ConditionalPatchDiscriminator, frozen_generator_loss
from ..losses import PerceptualLoss, bits_per_pixel, discriminator_adversarial
from ..parts import split_quantiles
from ..run import TrainingRun


def train(run: TrainingRun, index: int, stage: BaselineStage) -> bool:
    """A compressai codec family, one model per rate, each trained on every batch with
    bpp + lambda_r * (MSE + perceptual + adversarial); the HiFiC-style adversarial term comes
    from one conditional patch discriminator per rate (non-saturating losses)."""
    cfg, losses, arch = run.config, run.config.losses, run.config.baseline
    rate_lambdas = stage.rate_lambdas or losses.rate_lambdas
    if len(rate_lambdas) != arch.num_rates:
        raise OSDiffError(f"rate_lambdas has {len(rate_lambdas)} values for {arch.num_rates} rates")
    torch.manual_seed(cfg.seed + 3)
    codec = LearnedImageCodec(arch.architecture, arch.N, arch.M, tuple(arch.groups), arch.num_rates)
    main_params, aux_params = split_quantiles(codec)
    opt = torch.optim.AdamW(main_params, lr=stage.lr, weight_decay=stage.weight_decay)
    opt_aux = torch.optim.Adam(aux_params, lr=stage.lr_aux)
    codec, opt, opt_aux = run.prepare(codec, opt, opt_aux)
    modules = {"codec": codec}
    optimizers = {"main": (opt, stage.lr), "aux": (opt_aux, stage.lr_aux)}
    use_gan = losses.adversarial > 0
    if use_gan:
        discriminators = nn.ModuleList(
            ConditionalPatchDiscriminator(arch.M, tuple(arch.discriminator_channels)) for _ in range(arch.num_rates)
        )
        opt_d = torch.optim.AdamW(discriminators.parameters(), lr=stage.lr_discriminator, betas=(0.5, 0.999))
        discriminators, opt_d = run.prepare(discriminators, opt_d)
        modules["discriminators"] = discriminators
        optimizers["disc"] = (opt_d, stage.lr_discriminator)
    perceptual = (PerceptualLoss(losses.perceptual_kind, losses.lpips_net).to(run.device)
                  if losses.perceptual > 0 else None)
    sampler = run.crop_sampler(index, stage)
    rates = run.unwrap(codec).rates

    def step_fn(step: int) -> dict:
        x = sampler.batch(step).to(run.device)
        use_adv = use_gan and step >= losses.adversarial_start
        logs: dict[str, float] = {}
        total = torch.zeros((), device=run.device)
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
            logs[f"psnr_r{r + 1}"] = psnr_tensor(x_hat, x)
        run.backward(total)
        run.average_gradients(opt)
        for model in rates:  # the rates are independent models: clip each on its own
            run.clip(split_quantiles(model)[0], stage.grad_clip)
        opt.step()
        opt.zero_grad()
        aux = run.aux_step(codec, opt_aux)
        d_loss = torch.zeros(())
        if use_adv:
            d_loss = sum(discriminator_adversarial(discriminators[r](x, y_hat), discriminators[r](fake, y_hat))
                         for r, (fake, y_hat) in enumerate(fakes))
            run.update(d_loss, None, opt_d)
        return {"loss": total.item(), **logs, "aux": aux.item(), "adv_d": d_loss.item()}

    def val_fn() -> dict:
        """Per rate, on the fixed crops: bpp from the entropy models (rounded latents in eval
        mode) and PSNR."""
        x = run.val_batch(stage.crop)
        out = {}
        for r in range(len(rate_lambdas)):
            coded = codec(x, r)
            out[f"bpp_r{r + 1}"] = bits_per_pixel(coded["likelihoods"], x.shape[-2] * x.shape[-1]).mean().item()
            out[f"psnr_r{r + 1}"] = psnr_tensor(coded["x_hat"], x).item()
        return out

    if not run.loop(index, stage, modules, optimizers, step_fn, val_fn):
        return False
    if run.is_main:
        codec = run.unwrap(codec).to("cpu")
        codec.update(force=True)
        BaselinePipeline(codec=codec, model_name=cfg.model_name).save_pretrained(run.out / "model")
    return True
