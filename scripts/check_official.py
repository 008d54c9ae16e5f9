"""Check osdiff's port of the official OSDiff code against the official modules themselves.

    python scripts/check_official.py --official /path/to/OSDiff-checkout [--fixture tests/fixtures/official_tiny]

Given a checkout of cheesejiang/OSDiff (commit 2d772c1), this builds its LFGCM, CDDM, ldm UNet
and ldm VAE at tiny widths with random weights (rounded to float16 values, so the fixture can
store them as float16 losslessly), plus a tiny OpenCLIP text tower; writes checkpoints in the
official layout; converts them with `osdiff convert-official`; and compares, printing the
maximum differences:

    hint / y_hat                      <= 1e-6   (official strings decoded by osdiff too)
    control + UNet epsilon            <= 1e-5
    one-step x0 from the same x_T     <= 14.6 * 1e-5 * 2   (the x0 gain at t = 999 is 14.6)
    decoded image (0..1 floats)       <= 1e-3, 8-bit pixels differ by <= 1 level
    empty-prompt embedding            <= 1e-5   (against OpenCLIP's own text tower)

It exits non-zero on any mismatch. With --fixture it also writes what CI needs to repeat the
comparison without the official code (tests/test_official.py): the tiny checkpoints, the config,
the official outputs, and the full-size official key layout (built on the meta device).

Modules the check does not exercise (Lightning, pyiqa, lpips, thop, cv2, tensorboard, the
LatentDiffusion base class) are replaced by stubs before the official code is imported.
Needs: `pip install -e .[check]` (omegaconf, open_clip_torch).
"""
from __future__ import annotations

import argparse
import importlib.machinery
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = {
    "unet": dict(image_size=32, in_channels=4, out_channels=4, model_channels=64, attention_resolutions=[2],
                 num_res_blocks=1, channel_mult=[1, 1], num_head_channels=32, use_spatial_transformer=True,
                 use_linear_in_transformer=True, transformer_depth=1, context_dim=8, legacy=False),
    "control": dict(image_size=32, in_channels=4, out_channels=4, hint_channels=4, model_channels=64,
                    attention_resolutions=[2], num_res_blocks=1, channel_mult=[1, 1], num_head_channels=16,
                    use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=1,
                    context_dim=8, legacy=False, control_scale=1.0, control_model_ratio=0.5),
    "lfgcm": dict(in_nc=4, enc_mid=[32, 32, 32, 32], out_nc=4, N=32, M=16, prior_nc=8, sft_ks=3, slice_num=2, slice_ch=[4, 12]),
    "vae": dict(embed_dim=4, ddconfig=dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32,
                                           ch_mult=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[], dropout=0.0)),
    "text": dict(width=8, heads=2, layers=3),
}
IMAGE_HW = (96, 160)  # padded to 128 x 192 (latent 16 x 24, y 8 x 12, z 2 x 3)


# ---- importing the official code ------------------------------------------------------------
def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def import_official(checkout: Path) -> dict:
    """Import the official modules the check uses, with stubs for what it does not exercise."""
    class _Anything(nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()

    identity = lambda f=None, *a, **k: f  # noqa: E731
    pl = _stub("pytorch_lightning", LightningModule=nn.Module, Callback=object, seed_everything=identity)
    pl.utilities = _stub("pytorch_lightning.utilities", rank_zero_only=identity)
    pl.utilities.types = _stub("pytorch_lightning.utilities.types", EPOCH_OUTPUT=list, STEP_OUTPUT=object)
    pl.utilities.distributed = _stub("pytorch_lightning.utilities.distributed", rank_zero_only=identity)
    pl.utilities.rank_zero = _stub("pytorch_lightning.utilities.rank_zero", rank_zero_only=identity)
    pl.callbacks = _stub("pytorch_lightning.callbacks", ModelCheckpoint=object, Callback=object)
    for name in ("lpips", "pyiqa", "cv2", "kornia"):
        _stub(name, LPIPS=_Anything, create_metric=identity)
    _stub("thop", profile=identity)
    _stub("torch.utils.tensorboard", SummaryWriter=_Anything)
    sys.path.insert(0, str(checkout))
    import ldm  # noqa: F401  (the checkout's package)
    _stub("ldm.models.diffusion.ddpm", LatentDiffusion=_Anything)

    from ldm.models.autoencoder import AutoencoderKL
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from model.lfgcm import LFGCM
    from model.osdiff import CDDM
    from model.spaced_sampler import SpacedSampler

    if not str(Path(sys.modules["model.lfgcm"].__file__).resolve()).startswith(str(checkout.resolve())):
        raise SystemExit(f"check_official: imported model.lfgcm from outside {checkout}")
    return dict(AutoencoderKL=AutoencoderKL, UNetModel=UNetModel, LFGCM=LFGCM, CDDM=CDDM, SpacedSampler=SpacedSampler)


# ---- building the official modules ----------------------------------------------------------
@torch.no_grad()
def randomize(module: nn.Module, generator: torch.Generator) -> None:
    """Replace zero/one-initialised tensors (zero convs, norms) by random values and round every
    float tensor to float16 precision (the fixture stores float16 losslessly)."""
    for name, p in list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers() if n.endswith("scale_list")]:
        if not p.is_floating_point() or "quantiles" in name:
            continue
        if p.numel() and (p.std() == 0 if p.numel() > 1 else True):
            base = p.flatten()[0].item()
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=generator))
        p.copy_(p.half().float())


def build_official(off: dict, text_cfg: dict) -> dict:
    import open_clip
    from open_clip.model import CLIPTextCfg, _build_text_tower

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mods = {
        "unet": off["UNetModel"](**TINY["unet"]),
        "control": off["CDDM"](**TINY["control"]),
        "lfgcm": off["LFGCM"](**TINY["lfgcm"]),
        "vae": off["AutoencoderKL"](ddconfig=TINY["vae"]["ddconfig"], lossconfig={"target": "torch.nn.Identity"}, embed_dim=4),
        "text": _build_text_tower(text_cfg["width"], CLIPTextCfg(width=text_cfg["width"], heads=text_cfg["heads"], layers=text_cfg["layers"])),
    }
    for m in mods.values():
        randomize(m, g)
        m.eval()
    mods["lfgcm"].update(force=True)
    del open_clip
    return mods


def official_config() -> dict:
    from osdiff.convert.official import OFFICIAL_SD21_CONFIG

    cfg = json.loads(json.dumps(OFFICIAL_SD21_CONFIG))
    p = cfg["params"]
    p["control_stage_config"]["params"] = {k: v for k, v in TINY["control"].items()}
    p["unet_config"]["params"] = {k: v for k, v in TINY["unet"].items()}
    p["first_stage_config"]["params"] = {"embed_dim": 4, "ddconfig": TINY["vae"]["ddconfig"]}
    p["preprocess_config"]["params"] = dict(TINY["lfgcm"])
    p["cond_stage_config"]["params"]["heads"] = TINY["text"]["heads"]  # osdiff-only key (not in ViT-H)
    return cfg


def write_checkpoints(mods: dict, folder: Path) -> tuple[Path, Path]:
    """sd.ckpt and lambda.ckpt in the official layout (float16, Lightning-style envelope)."""
    half = lambda t: t.half() if t.is_floating_point() else t  # noqa: E731
    sd = {f"model.diffusion_model.{k}": half(v) for k, v in mods["unet"].state_dict().items()}
    sd.update({f"first_stage_model.{k}": half(v) for k, v in mods["vae"].state_dict().items()})
    sd.update({f"cond_stage_model.model.{k}": half(v) for k, v in mods["text"].state_dict().items()})
    sd["cond_stage_model.model.logit_scale"] = torch.tensor(4.6, dtype=torch.float16)
    sd["betas"] = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    lam = {f"control_model.{k}": half(v) for k, v in mods["control"].state_dict().items()}
    from osdiff.convert.official import is_entropy_table_key, map_lfgcm_key

    for k, v in mods["lfgcm"].state_dict().items():
        if is_entropy_table_key(k):  # as saved by training: update() never ran
            v = v.new_empty((0,))
        elif map_lfgcm_key(f"preprocess_model.{k}") is None:  # never run (SFT, f_c): zeros keep the fixture small
            v = torch.zeros_like(v)
        lam[f"preprocess_model.{k}"] = half(v)
    lam["guidance_model.DMLP.6.weight"] = torch.zeros(1, 8, 1, 1, dtype=torch.float16)  # training-only: reported unused
    envelope = lambda state: {"state_dict": state, "epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.4.2",  # noqa: E731
                              "optimizer_states": [], "lr_schedulers": [], "callbacks": {}}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(envelope(sd), folder / "sd.ckpt")
    torch.save(envelope(lam), folder / "lambda.ckpt")
    return folder / "sd.ckpt", folder / "lambda.ckpt"


def test_image() -> torch.Tensor:
    """(1,3,96,160) uint8 image made by code: gradients, a block and noise."""
    g = torch.Generator().manual_seed(7)
    h, w = IMAGE_HW
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img = torch.stack([x * 255 / w, y * 255 / h, (x + y) % 64 * 4.0]).float()
    img[:, 30:60, 40:100] = torch.tensor([200.0, 40.0, 90.0])[:, None, None]
    img = img + 12 * torch.randn(img.shape, generator=g)
    return img.clamp(0, 255).to(torch.uint8)[None]


# ---- the official side ----------------------------------------------------------------------
@torch.no_grad()
def run_official(off: dict, mods: dict, image_u8: torch.Tensor, x_t_seed: int = 11) -> dict:
    h, w = image_u8.shape[-2:]
    ph, pw = -(-h // 64) * 64, -(-w // 64) * 64
    padded = torch.zeros(1, 3, ph, pw, dtype=torch.uint8)
    padded[:, :, :h, :w] = image_u8  # utils.image.pad: zeros bottom/right
    control = (padded.float() / 255.0).clamp(0, 1)
    scale = 0.18215
    ref = mods["vae"].encode(control * 2 - 1).mode() * scale
    lfgcm = mods["lfgcm"]
    out = lfgcm.compress(ref, None)
    captured = {}
    hook = lfgcm.decoder.register_forward_hook(lambda m, args, res: captured.update(y_hat=args[0].clone()))
    hint = lfgcm.decompress(out["strings"], out["shape"])
    hook.remove()
    text = mods["text"]
    tokens = __import__("open_clip").tokenize([""])
    x = text.token_embedding(tokens) + text.positional_embedding
    batch_first = getattr(text.transformer, "batch_first", False)
    x = x if batch_first else x.permute(1, 0, 2)
    for block in text.transformer.resblocks[:-1]:
        x = block(x, attn_mask=text.attn_mask)
    x = x if batch_first else x.permute(1, 0, 2)
    context = text.ln_final(x)
    x_t = torch.randn((1, 4, ph // 8, pw // 8), generator=torch.Generator().manual_seed(x_t_seed))
    t = torch.full((1,), 999, dtype=torch.long)
    eps = mods["control"](x=x_t, hint=hint, timesteps=t, context=context, base_model=mods["unet"])

    class Model:  # what SpacedSampler reads from the OSDiff LightningModule
        num_timesteps, linear_start, linear_end, parameterization = 1000, 0.00085, 0.0120, "eps"
        betas = torch.zeros(1000)

        @staticmethod
        def apply_model(x, t, cond):
            return mods["control"](x=x, timesteps=t, context=cond["c_crossattn"][0], hint=cond["c_latent"][0], base_model=mods["unet"])

    sampler = off["SpacedSampler"](Model(), var_type="fixed_small")
    x0 = sampler.sample(1, tuple(x_t.shape), {"c_latent": [hint], "c_crossattn": [context]}, x_T=x_t)
    decoded = mods["vae"].decode(x0 / scale)
    image = ((decoded + 1) / 2).clamp(0, 1)
    pixels = (image.permute(0, 2, 3, 1) * 255).numpy().clip(0, 255).astype(np.uint8)
    return {
        "padded": padded, "ref": ref, "y_hat": captured["y_hat"], "hint": hint, "context": context, "x_t": x_t,
        "eps": eps, "x0": x0, "image": image, "pixels": torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
        "y_string": torch.frombuffer(bytearray(out["strings"][0][0]), dtype=torch.uint8),
        "z_string": torch.frombuffer(bytearray(out["strings"][1][0]), dtype=torch.uint8),
        "z_shape": torch.tensor(list(out["shape"])),
    }


# ---- the osdiff side ------------------------------------------------------------------------
def convert(sd: Path, lam: Path, config: Path, out: Path) -> None:
    from osdiff.cli import main

    rc = main(["convert-official", "--sd", str(sd), "--ckpt", str(lam), "--config", str(config), "-o", str(out), "--force"])
    if rc != 0:
        raise SystemExit(f"check_official: osdiff convert-official failed ({rc})")


# ---- the full-size layout -------------------------------------------------------------------
def fullsize_layout(off: dict) -> dict[str, list[int]]:
    """Key -> shape of the official full-size control_model.*, preprocess_model.* and SD UNet /
    VAE state dicts (built on the meta device where possible)."""
    from osdiff.convert.official import OFFICIAL_SD21_CONFIG

    p = OFFICIAL_SD21_CONFIG["params"]
    layout = {}
    with torch.device("meta"):
        control = off["CDDM"](image_size=32, **p["control_stage_config"]["params"])
        unet = off["UNetModel"](**p["unet_config"]["params"])
        vae = off["AutoencoderKL"](lossconfig={"target": "torch.nn.Identity"}, **p["first_stage_config"]["params"])
    lfgcm = off["LFGCM"](out_nc=4, **{k: v for k, v in p["preprocess_config"]["params"].items() if k != "out_nc"})
    for prefix, module in (("control_model.", control), ("preprocess_model.", lfgcm), ("model.diffusion_model.", unet), ("first_stage_model.", vae)):
        layout.update({prefix + k: list(v.shape) for k, v in module.state_dict().items()})
    return layout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="checkout of cheesejiang/OSDiff")
    parser.add_argument("--fixture", default=None, help="also write the CI fixture to this folder")
    args = parser.parse_args()
    checkout = Path(args.official)
    if not (checkout / "model" / "lfgcm.py").is_file():
        print(f"check_official: {checkout} is not an OSDiff checkout (no model/lfgcm.py)", file=sys.stderr)
        return 2
    torch.set_num_threads(min(2, torch.get_num_threads()))
    off = import_official(checkout)
    mods = build_official(off, TINY["text"])
    ref = run_official(off, mods, test_image())
    import yaml

    import osdiff
    from osdiff.convert.verify import TOL, compare, failures

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.fixture) if args.fixture else Path(tmp) / "fixture"
        sd, lam = write_checkpoints(mods, folder)
        config = folder / "osdiff_tiny.yaml"
        config.write_text(yaml.safe_dump(official_config(), sort_keys=False))
        convert(sd, lam, config, Path(tmp) / "converted")
        pipe = osdiff.load(Path(tmp) / "converted")
        diffs = compare(pipe, ref)
        if args.fixture:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in ref.items()}, str(folder / "official_outputs.safetensors"))
            (folder / "fullsize_layout.json").write_text(json.dumps(fullsize_layout(off)))
    for key, value in diffs.items():
        tol = TOL.get(key)
        print(f"{key:>30}: {value:.3g}" + (f"  (tolerance {tol:g})" if tol is not None else ""))
    bad = failures(diffs)
    if bad:
        print(f"check_official: MISMATCH in {', '.join(bad)}", file=sys.stderr)
        return 1
    print("check_official: osdiff matches the official code")
    return 0


if __name__ == "__main__":
    sys.exit(main())
