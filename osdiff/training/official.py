"""Training the paper's model (stage "official", model "official"): the ported LFGCM + CDDM on
a frozen Stable Diffusion 2.1, with what the official code computes (model/osdiff.py
`training_step` / `p_losses`, ldm `LatentDiffusion.forward`), one run per lambda:

    z      = VAE posterior sample * 0.18215                        (no gradient)
    hint, likelihoods = LFGCM(z);  bpp = -sum(log2 likelihoods) / pixels of the batch
    x_999  = q_sample(z, t = 999, noise)        sqrt(a_999) = 0.068 of z remains
    z0     = predict_start_from_noise(x_999, CDDM+UNet(x_999, 999, hint))
    loss   = 1 * MSE(z0, z) + lambda * bpp + 2 * MSE(hint, z)
             + 0.01 * softplus(-D(q_sample(z0, t1, n1), t1))        t1 ~ U{0..999}
    then compressai's aux loss (quantiles), then the discriminator on detached z0:
             softplus(D(q_sample(z0, t1, n1))) + softplus(-D(q_sample(z, t1, n1)))
    AdamW: lr 1e-4 (LFGCM + CDDM), 1e-3 (quantiles), 1e-4 (discriminator); gradients clipped at 1.

Where osdiff differs from the published code (it cannot run as published):
  - its generator turn reads t1 before assigning it (NameError); we draw t1 ~ U{0..999} there,
    and let the generator term's gradient flow through the frozen discriminator (the published
    code wraps that discriminator call in no_grad, which would make the term gradient-free);
  - the discriminator is osdiff's UNetFeatureDiscriminator (the SD UNet's encoder and middle
    block, initialised from it, with a small conv head) in place of the official GuidanceModel
    (the same UNet part with a fixed 8x8 -> 1x1 head that assumes 512-px crops);
  - the discriminator turn reuses this step's z0 (detached) instead of recomputing it;
  - torch AdamW instead of bitsandbytes' 8-bit AdamW.
The config's l_lpips_weights and l_d_weights are never used by the official code, and neither
are they here. The control module starts from the UNet's weights as the official
`sync_control_weights_from_base_checkpoint` does (tensors tiled, then cropped to the control widths).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from ..denoise import alphas_cumprod_float64
from ..errors import OSDiffError
from ..models.conditioning import ConditioningEmbedding
from ..models.official.cddm import CDDMControl, controlled_unet_forward
from .discriminator import UNetFeatureDiscriminator, frozen_generator_loss
from .losses import discriminator_adversarial

OFFICIAL_T = 999
WEIGHTS = {"latent_mse": 1.0, "hint_mse": 2.0, "adversarial": 0.01}


def control_kwargs_for(unet: UNet2DConditionModel, official: dict) -> dict:
    """CDDMControl arguments matching `unet`, with the official ratio / head size / scale."""
    cfg = unet.config
    base = cfg.block_out_channels[0]
    if any(c % base for c in cfg.block_out_channels):
        raise OSDiffError(f"UNet widths {cfg.block_out_channels} are not multiples of the first")
    return dict(
        in_channels=cfg.in_channels, hint_channels=cfg.in_channels, model_channels=base,
        channel_mult=tuple(c // base for c in cfg.block_out_channels), num_res_blocks=cfg.layers_per_block,
        attention_resolutions=tuple(2**i for i, t in enumerate(cfg.down_block_types) if "CrossAttn" in t),
        num_head_channels=official.get("num_head_channels", 16), transformer_depth=1,
        context_dim=cfg.cross_attention_dim, control_model_ratio=float(official.get("control_model_ratio", 0.2)),
        control_scale=float(official.get("control_scale", 1.0)),
    )


def _tile_crop(src: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The official copy rule: 1-D cat([w, w])[:n]; N-D cat([w, w], dim=1)[:n0, :n1]."""
    if src.shape == shape:
        return src
    if src.ndim == 1:
        return torch.cat([src, src])[: shape[0]]
    return torch.cat([src, src], dim=1)[: shape[0], : shape[1]]


@torch.no_grad()
def init_control_from_unet(control: CDDMControl, unet: UNet2DConditionModel) -> None:
    """Copy the base UNet's weights into the control module block by block (ldm order)."""
    base_layers: list[nn.Module] = [unet.conv_in]
    for block in unet.down_blocks:
        for i, resnet in enumerate(block.resnets):
            base_layers.append(nn.ModuleList([resnet, block.attentions[i]]) if getattr(block, "attentions", None) else nn.ModuleList([resnet]))
        if block.downsamplers is not None:
            base_layers.append(nn.ModuleList([block.downsamplers[0]]))
    pairs = [(control.time_embedding, unet.time_embedding), (control.input_blocks[0][0], base_layers[0])]
    for ours, base in zip(list(control.input_blocks)[1:], base_layers[1:]):
        pairs += list(zip(ours, base))
    mid = unet.mid_block
    pairs += list(zip(control.middle_block, [mid.resnets[0], mid.attentions[0], mid.resnets[1]]))
    for ours, base in pairs:
        if type(ours) is not type(base) and not isinstance(ours, (nn.Conv2d,)):
            raise OSDiffError(f"control/UNet structure mismatch: {type(ours).__name__} vs {type(base).__name__}")
        src = base.state_dict()
        for name, dst in ours.state_dict().items():
            if name in src and src[name].ndim == dst.ndim:
                dst.copy_(_tile_crop(src[name], dst.shape))


def official_parts(base_model: str | Path, official_config: str | Path | None):
    """(vae, unet, conditioning, OfficialModelConfig) for training from `base_model`: a local
    SD 2.1 diffusers folder or an ldm single-file checkpoint."""
    from ..convert.official import OFFICIAL_SD21_CONFIG, OfficialModelConfig, read_state_dict, sd_from_diffusers_folder, sd_from_ldm_checkpoint

    cfg = OfficialModelConfig.from_dict(OFFICIAL_SD21_CONFIG) if official_config is None else OfficialModelConfig.from_yaml(official_config)
    base = Path(base_model)
    if base.is_dir():
        import json

        sched = base / "scheduler" / "scheduler_config.json"
        if sched.is_file() and json.loads(sched.read_text()).get("prediction_type", "epsilon") != "epsilon":
            raise OSDiffError(f"{base}: a v-prediction model; the official OSDiff trains on SD 2.1 base (epsilon prediction)")
        # the control module is shaped after the folder's UNet (control_kwargs_for)
        vae, unet, embedding, _ = sd_from_diffusers_folder(base, _with_context(cfg, base))
    else:
        vae, unet, embedding, _ = sd_from_ldm_checkpoint(read_state_dict(base, "a Stable Diffusion 2.1 checkpoint"), cfg, base)
    conditioning = ConditioningEmbedding(num_tokens=embedding.shape[1], dim=embedding.shape[2])
    conditioning.embedding.data.copy_(embedding)
    vae.register_to_config(scaling_factor=cfg.scale_factor)
    return vae, unet, conditioning, cfg


def _with_context(cfg, folder: Path):
    """`cfg` with the UNet context width of the diffusers folder (checked there)."""
    import dataclasses
    import json

    unet_cfg = json.loads((folder / "unet" / "config.json").read_text()) if (folder / "unet" / "config.json").is_file() else {}
    return dataclasses.replace(cfg, unet={**cfg.unet, "context_dim": unet_cfg.get("cross_attention_dim", cfg.unet["context_dim"])})


def official_stage(trainer, index: int, stage, max_steps, deadline) -> bool:
    """Run (or resume) one official training stage on `trainer` (osdiff.training.trainer.Trainer)."""
    from ..convert.official import official_scheduler
    from ..models.official.lfgcm import OfficialLFGCM
    from ..official_pipeline import OfficialLevels, OfficialOSDiffPipeline
    from .trainer import _psnr, _split_quantiles

    cfg = trainer.config
    if not cfg.base_model:
        raise OSDiffError("model 'official' needs base_model: a local SD 2.1 diffusers folder or v2-1_512-ema-pruned.ckpt")
    lambdas = stage.rate_lambdas or [1.0]
    if len(lambdas) != 1:
        raise OSDiffError("stage 'official' trains one lambda per run (rate_lambdas: [one value], the weight of bpp)")
    rate_weight = float(lambdas[0])
    vae, unet, conditioning, ocfg = official_parts(cfg.base_model, cfg.official_config)
    torch.manual_seed(cfg.seed + 2)
    lfgcm = OfficialLFGCM(**ocfg.lfgcm_kwargs())
    control = CDDMControl(**control_kwargs_for(unet, ocfg.control))
    init_control_from_unet(control, unet)
    discriminator = UNetFeatureDiscriminator(unet)
    for frozen in (vae, unet, conditioning):
        frozen.requires_grad_(False)
        frozen.to(trainer.device)
    scheduler = official_scheduler(ocfg)
    alphas = torch.from_numpy(alphas_cumprod_float64(ocfg.timesteps, ocfg.linear_start, ocfg.linear_end))
    sqrt_a = alphas.sqrt().float().to(trainer.device)  # ldm's registered float32 buffers
    sqrt_1ma = (1 - alphas).sqrt().float().to(trainer.device)
    recip = (1 / alphas).sqrt().float().to(trainer.device)
    recipm1 = (1 / alphas - 1).sqrt().float().to(trainer.device)

    def q_sample(x0, t, noise):
        return sqrt_a[t][:, None, None, None] * x0 + sqrt_1ma[t][:, None, None, None] * noise

    main_params, aux_params = _split_quantiles(lfgcm)
    main_params = main_params + list(control.parameters())
    opt = torch.optim.AdamW(main_params, lr=stage.lr, weight_decay=stage.weight_decay)
    opt_aux = torch.optim.AdamW(aux_params, lr=stage.lr_aux)
    opt_d = torch.optim.AdamW(discriminator.parameters(), lr=stage.lr_discriminator)
    lfgcm, control, discriminator, opt, opt_aux, opt_d = trainer._prepare(lfgcm, control, discriminator, opt, opt_aux, opt_d)
    from .data import CropSampler

    sampler = CropSampler(trainer._images_cached(), stage.crop, stage.batch_size, cfg.seed, index)
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
        x = sampler.batch(step).to(trainer.device)
        gen = trainer._generator(index, step)
        b = x.shape[0]
        ctx = conditioning(b)
        with trainer.accelerator.accumulate(lfgcm, control):
            z, hint, bpp, z0 = forward(x, gen)
            latent_mse = F.mse_loss(z0, z)
            hint_mse = F.mse_loss(hint, z)
            t1 = torch.randint(0, ocfg.timesteps, (b,), generator=gen).to(trainer.device)
            n1 = torch.randn(z.shape, generator=gen).to(z)
            adv = frozen_generator_loss(discriminator, q_sample(z0, t1, n1), t1, ctx)
            loss = WEIGHTS["latent_mse"] * latent_mse + rate_weight * bpp + WEIGHTS["hint_mse"] * hint_mse + WEIGHTS["adversarial"] * adv
            trainer._update(loss, main_params, opt, stage.grad_clip)
            aux = trainer._aux_step(lfgcm, opt_aux)
        d_loss = discriminator_adversarial(discriminator(q_sample(z, t1, n1), t1, ctx), discriminator(q_sample(z0.detach(), t1, n1), t1, ctx))
        trainer.accelerator.backward(d_loss)
        if trainer.accelerator.sync_gradients:
            trainer.accelerator.clip_grad_norm_(discriminator.parameters(), stage.grad_clip)
        opt_d.step()
        opt_d.zero_grad()
        return {"loss": loss.item(), "bpp": bpp.item(), "latent_mse": latent_mse.item(), "hint_mse": hint_mse.item(),
                "adv_g": adv.item(), "adv_d": d_loss.item(), "aux": aux.item()}

    def val_fn() -> dict:
        """bpp (entropy models, eval mode) and PSNR of the official one-step decode from fixed noise."""
        x = trainer._val_batch(stage.crop)
        z = vae.encode(x * 2 - 1).latent_dist.mode() * sf
        out = lfgcm(z)
        b = x.shape[0]
        t = torch.full((b,), OFFICIAL_T, dtype=torch.long, device=x.device)
        x_t = torch.randn(z.shape, generator=torch.Generator().manual_seed(12345)).to(z)
        eps = controlled_unet_forward(control, unet, x_t, t, conditioning(b), out["hint"])
        z0 = recip[t][:, None, None, None] * x_t - recipm1[t][:, None, None, None] * eps
        bpp = sum(torch.log(v).sum() for v in out["likelihoods"].values()) / (-math.log(2) * b * x.shape[-2] * x.shape[-1])
        return {"bpp": bpp.item(), "psnr": _psnr((vae.decode(z0 / sf).sample.clamp(-1, 1) + 1) / 2, x)}

    modules = {"lfgcm": lfgcm, "control": control, "discriminator": discriminator}
    optimizers = {"main": (opt, stage.lr), "aux": (opt_aux, stage.lr_aux), "disc": (opt_d, stage.lr_discriminator)}
    if not trainer._loop(index, stage, modules, optimizers, step_fn, max_steps, deadline, val_fn):
        return False
    unwrap = trainer.accelerator.unwrap_model
    own = lambda m: {k: v for k, v in unwrap(m).config.items() if not k.startswith("_")}  # noqa: E731
    levels = OfficialLevels(num_levels=1, compressor=own(lfgcm), control=own(control))
    levels.compressors[0].load_state_dict(unwrap(lfgcm).state_dict())
    levels.controls[0].load_state_dict(unwrap(control).state_dict())
    levels.update(force=True)
    pipe = OfficialOSDiffPipeline(vae=vae, unet=unet, levels=levels, conditioning=conditioning, scheduler=scheduler,
                                  model_name=cfg.model_name, noise_seed=cfg.decoding.noise_seed)
    pipe.to("cpu")
    pipe.save_pretrained(trainer.out / "model")
    # the run in the official layout too: `osdiff convert-official --ckpt` joins runs (one per
    # lambda) into the quality levels of one model folder
    from ..convert.official import official_lambda_state

    torch.save({"state_dict": official_lambda_state(levels.controls[0], levels.compressors[0])}, trainer.out / "official_lambda.ckpt")
    return True
