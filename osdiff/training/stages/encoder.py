"""Stage "encoder" (tiny model, autoencoder "taef2"): distil a slim student encoder from TAEF2's.

The student (osdiff.models.taesd.slim_encoder, or tail_encoder: TAEF2's own last layers, copied
and frozen, after a learned head) learns the TAEF2 latents of the training photos,
cut from data.latent_cache: loss = MSE of normalised latents (per channel weighted by the
decoder's pixel sensitivity with losses.latent_weighting "decoder") + losses.encoder_pixel * L1
of the student's latent decoded by the model's decoder against the photo (+ for a tail student
losses.encoder_features x the normalised MSE of its head's output and TAEF2's 1/4-resolution
features, the tail's input, also cached). The cached targets saw
the whole photo, the student sees a crop: latent pixels within `encoder_margin` of a crop side
that is not the photo's own edge are left out of the loss. Decoder, compressor and UNet stay as
they are, so the compressor codes the student's latents as it coded TAEF2's."""
from __future__ import annotations

import torch

from ...errors import OSDiffError
from ...models.taesd import ENCODER_TAIL_FROM, TAESDAutoencoder
from ...quality.pixel import psnr_tensor
from ..config import EncoderStage
from ..parts import init_model, stage_channel_weights, teacher_autoencoder
from ..run import TrainingRun


def train(run: TrainingRun, index: int, stage: EncoderStage) -> bool:
    """Run (or resume) the stage; True when it is finished (its vae/ written; with init_from a
    model folder also model/: that codec with this encoder)."""
    cfg, arch, losses = run.config, run.config.tiny, run.config.losses
    init = init_model(run)
    if init is not None and not isinstance(init.vae, TAESDAutoencoder):
        raise OSDiffError(f"init_from {cfg.init_from}: its autoencoder is not a TAEF2 one")
    base = init.vae if init is not None else teacher_autoencoder(run)
    if base.slim_encoder:
        raise OSDiffError(f"init_from {cfg.init_from}: its encoder is already a student; the teacher must be TAEF2's")
    base = base.to(run.device).requires_grad_(False).eval()
    torch.manual_seed(cfg.seed + 11)
    student = base.with_encoder(tuple(arch.student_encoder_channels), tuple(arch.student_encoder_blocks),
                                arch.student_encoder_tail).to(run.device)
    student.decoder.requires_grad_(False).eval()
    if student.teacher_tail is not None:  # TAEF2's last layers stay TAEF2's: the head learns their input
        student.teacher_tail.requires_grad_(False)
    params = [p for p in student.encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    student, opt = run.prepare(student, opt)
    model = run.unwrap(student)
    pairs = run.latent_sampler(index, stage, base.encoder)  # the teacher's cached latents
    mean, std = base.mean, base.std
    weights = None
    if losses.latent_weighting == "decoder":  # on a fixed batch, outside the training steps' range
        weights = stage_channel_weights(run, index, base.decode,
                                        lambda: ((pairs.batch(10**6, rank=0)[1].to(run.device) - mean) / std)[:4])
    margin = stage.encoder_margin
    head, features, feature_var = model.encoder, None, 1.0
    if losses.encoder_features:  # the tail's input: TAEF2's 1/4-resolution features, cached per photo
        tail = model.teacher_tail
        head = model.encoder[: len(model.encoder) - len(tail)]
        features = run.cached_outputs(base.encoder[:ENCODER_TAIL_FROM])
        feature_var = pairs.cut(features, 10**6, 2, rank=0).var().item()  # a fixed batch outside the steps' range

    def step_fn(step: int) -> dict:
        x, raw = pairs.batch(step)
        x, target = x.to(run.device), ((raw.to(run.device) - mean) / std)
        edges = pairs.edges(step)
        mask = loss_mask(edges, target.shape[-2:], margin).to(run.device)
        with run.accumulate(student):
            f = head(x)
            z = ((f if features is None else tail(f)) - mean) / std
            err = (z - target).pow(2)
            if weights is not None:
                err = err * weights
            latent = masked_mean(err, mask)
            loss = latent
            logs = {"latent_mse": latent.detach()}
            if features is not None:  # margins of twice as many 1/4-resolution pixels
                wanted = pairs.cut(features, step, 2).to(run.device)
                fmask = loss_mask(edges, wanted.shape[-2:], 2 * margin).to(run.device)
                feature = masked_mean((f - wanted).pow(2), fmask) / feature_var
                loss = loss + losses.encoder_features * feature
                logs["feature_nmse"] = feature.detach()
            if losses.encoder_pixel:
                x_hat = (model.decode(z) + 1) / 2
                pixel = (x_hat - x).abs().mean()
                loss = loss + losses.encoder_pixel * pixel
                logs.update(pixel_l1=pixel.detach(), psnr=psnr_tensor(x_hat.detach(), x))
            run.update(loss, params, opt, stage.grad_clip)
        return {"loss": loss.detach(), **logs}

    fixed = None  # the teacher's latents of the whole validation photos and their decoding, once

    @torch.no_grad()
    def val_fn() -> dict:
        nonlocal fixed
        photos = run.val_whole(8)
        if fixed is None:
            raws = [base.encode_raw(x * 2 - 1) for x in photos]
            fixed = (raws, [((base.decode_raw(r) + 1) / 2).clamp(0, 1) for r in raws])
        out = {"latent_nmse": 0.0, "psnr_student": 0.0, "psnr_teacher": 0.0, "psnr_vs_teacher": 0.0}
        for x, raw, decoded in zip(photos, *fixed):
            z = model.encode_raw(x * 2 - 1)
            x_hat = ((model.decode_raw(z) + 1) / 2).clamp(0, 1)
            out["latent_nmse"] += (((z - raw) / std).pow(2).mean()).item()
            out["psnr_student"] += psnr_tensor(x_hat, x).item()
            out["psnr_teacher"] += psnr_tensor(decoded, x).item()
            out["psnr_vs_teacher"] += psnr_tensor(x_hat, decoded).item()
        return {k: v / len(photos) for k, v in out.items()}

    if not run.loop(index, stage, {"vae": student}, {"vae": (opt, stage.lr)}, step_fn, val_fn):
        return False
    if run.is_main:
        model.save_pretrained(run.stage_dir(index) / "out" / "vae")
        if init is not None:  # the codec it came from, encoding with this encoder
            init.register_modules(vae=model)
            init.to("cpu").save_pretrained(run.out / "model")
    return True


def loss_mask(edges: torch.Tensor, size: tuple[int, int], margin: int) -> torch.Tensor:
    """(B,1,h,w) float: 1 where a latent pixel counts, 0 within `margin` pixels of a crop side
    that is not its photo's edge (`edges` (B,4): top, bottom, left, right)."""
    h, w = size
    mask = torch.ones(edges.shape[0], 1, h, w)
    for i, (top, bottom, left, right) in enumerate(edges.tolist()):
        if not top:
            mask[i, :, :margin] = 0
        if not bottom:
            mask[i, :, h - margin:] = 0
        if not left:
            mask[i, :, :, :margin] = 0
        if not right:
            mask[i, :, :, w - margin:] = 0
    return mask


def masked_mean(err: torch.Tensor, mask: torch.Tensor, dim: tuple[int, ...] | None = None) -> torch.Tensor:
    """Mean of `err` (B,C,h,w) over the pixels where `mask` (B,1,h,w) is 1 and over channels:
    over the whole batch, or per sample with dim=(1, 2, 3)."""
    if dim is None:
        return (err * mask).sum() / (mask.sum() * err.shape[1])
    return (err * mask).sum(dim=dim) / (mask.sum(dim=dim) * err.shape[1])
