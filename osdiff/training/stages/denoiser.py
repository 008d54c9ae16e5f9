"""Stage "denoiser": train the tiny UNet as an ordinary latent diffusion denoiser (noise
prediction) on the frozen autoencoder's latents."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...build import sd_noise_scheduler, tiny_unet
from ...denoise import add_noise
from ...models.autoencoder import encode_latent
from ...models.conditioning import ConditioningEmbedding
from ..config import DenoiserStage
from ..parts import trained_vae
from ..run import TrainingRun


def train(run: TrainingRun, index: int, stage: DenoiserStage) -> bool:
    """Run (or resume) the stage; True when it is finished (its unet/ and conditioning/ written)."""
    cfg = run.config
    vae = trained_vae(run).to(run.device).requires_grad_(False)
    torch.manual_seed(cfg.seed + 1)
    unet = tiny_unet(cfg.tiny)
    conditioning = ConditioningEmbedding(num_tokens=cfg.tiny.conditioning_tokens, dim=cfg.tiny.cross_attention_dim)
    scheduler = sd_noise_scheduler()
    alphas = scheduler.alphas_cumprod.to(run.device)
    params = list(unet.parameters()) + list(conditioning.parameters())
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    unet, conditioning, opt = run.prepare(unet, conditioning, opt)
    sampler = run.crop_sampler(index, stage)

    def step_fn(step: int) -> dict:
        x = sampler.batch(step).to(run.device)
        gen = run.generator(index, step)
        with torch.no_grad():
            z = encode_latent(vae, x * 2 - 1)
        noise = torch.randn(z.shape, generator=gen).to(run.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (z.shape[0],), generator=gen).to(run.device)
        a = alphas[t][:, None, None, None]
        z_t = add_noise(z, noise, a)
        with run.accumulate(unet):
            ctx = conditioning(z.shape[0])
            pred = unet(z_t, t, encoder_hidden_states=ctx).sample
            loss = F.mse_loss(pred, noise)
            run.update(loss, params, opt, stage.grad_clip)
        return {"loss": loss.detach()}

    def val_fn() -> dict:
        z = encode_latent(vae, run.val_batch(stage.crop) * 2 - 1)
        noise = torch.randn(z.shape, generator=torch.Generator("cpu").manual_seed(12345)).to(run.device)
        ctx = conditioning(z.shape[0])
        out = {}
        for t in (100, 500, 900):  # noise-prediction MSE at three fixed timesteps
            z_t = add_noise(z, noise, float(alphas[t]))
            pred = unet(z_t, torch.full((z.shape[0],), t, device=run.device), encoder_hidden_states=ctx).sample
            out[f"eps_mse_t{t}"] = F.mse_loss(pred, noise).item()
        return out

    modules = {"unet": unet, "conditioning": conditioning}
    if not run.loop(index, stage, modules, {"main": (opt, stage.lr)}, step_fn, val_fn):
        return False
    if run.is_main:
        out = run.stage_dir(index) / "out"
        run.unwrap(unet).save_pretrained(out / "unet")
        run.unwrap(conditioning).save_pretrained(out / "conditioning")
    return True
