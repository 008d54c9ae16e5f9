"""Stage "autoencoder": train our TinyAutoencoder on reconstruction (tiny model, autoencoder "own")."""
from __future__ import annotations

import torch

from ...build import tiny_autoencoder
from ...models.autoencoder import TinyAutoencoder
from ...quality.pixel import psnr_tensor
from ..config import AutoencoderStage
from ..losses import PerceptualLoss
from ..run import TrainingRun


def train(run: TrainingRun, index: int, stage: AutoencoderStage) -> bool:
    """Run (or resume) the stage; True when it is finished (its vae/ written)."""
    arch, losses = run.config.tiny, run.config.losses
    torch.manual_seed(run.config.seed)
    vae = tiny_autoencoder(arch)
    earlier = run.find_output("autoencoder", "vae", before=index)
    if earlier is not None:  # a second autoencoder stage fine-tunes the first one's result
        vae.load_state_dict(TinyAutoencoder.from_pretrained(earlier).state_dict())
    opt = torch.optim.AdamW(vae.parameters(), lr=stage.lr, weight_decay=stage.weight_decay)
    vae, opt = run.prepare(vae, opt)
    perceptual = PerceptualLoss(losses.perceptual_kind, losses.lpips_net).to(run.device)
    sampler = run.crop_sampler(index, stage)

    def step_fn(step: int) -> dict:
        x = sampler.batch(step).to(run.device)
        with run.accumulate(vae):
            z = vae.encode(x * 2 - 1)
            x_hat = (vae.decode(z) + 1) / 2
            l1 = (x_hat - x).abs().mean()
            perc = perceptual(x_hat, x).mean()
            reg = z.pow(2).mean()
            loss = losses.pixel_l1 * l1 + losses.perceptual * perc + losses.latent_l2 * reg
            run.update(loss, vae.parameters(), opt, stage.grad_clip)
        return {"loss": loss.detach(), "l1": l1.detach(), "perceptual": perc.detach(), "latent_rms": reg.detach().sqrt(),
                "psnr": psnr_tensor(x_hat, x)}

    def val_fn() -> dict:
        x = run.val_batch(stage.crop)
        return {"psnr": psnr_tensor((vae.decode(vae.encode(x * 2 - 1)) + 1) / 2, x)}

    if not run.loop(index, stage, {"vae": vae}, {"vae": (opt, stage.lr)}, step_fn, val_fn):
        return False
    vae = run.unwrap(vae)
    # scale latents to unit standard deviation, as SD does with its 0.18215 (on the batches every
    # process shares)
    with torch.no_grad():
        z = torch.cat([vae.encode(sampler.batch(10**6 + i, rank=0).to(run.device) * 2 - 1) for i in range(4)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std().clamp_min(1e-6)))
    if run.is_main:
        vae.save_pretrained(run.stage_dir(index) / "out" / "vae")
    return True
