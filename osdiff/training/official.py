"""Training the paper's model (stage "official", model "official"; the stage itself:
osdiff.training.stages.official): the ported LFGCM + CDDM on
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

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from ..errors import OSDiffError
from ..models.conditioning import ConditioningEmbedding
from ..models.official.cddm import CDDMControl

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
