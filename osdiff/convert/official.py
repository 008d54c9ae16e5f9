"""`osdiff convert-official`: the official OSDiff checkpoints -> an osdiff model folder.

    SD   ldm single-file checkpoint (v2-1_512-ema-pruned.ckpt: model.diffusion_model.*,
         first_stage_model.*, cond_stage_model.model.*), converted with diffusers' ldm
         converters and configs built here from the official model config; or a local
         diffusers folder (vae/, unet/, text_encoder/, tokenizer/)
    λ    one official checkpoint per quality level (lambda_*.ckpt: control_model.*,
         preprocess_model.*, training-only guidance_model.*)
    ->   OfficialOSDiffPipeline: per-level OfficialLFGCM + CDDMControl, shared UNet/VAE and
         the empty-prompt embedding (computed once from the checkpoint's OpenCLIP weights)

Checkpoints are read with `torch.load(weights_only=True)`: tensors and plain containers only,
never code. Keys the conversion does not use are reported; missing ones are an error.
"""
from __future__ import annotations

import collections
import pickle
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import OSDiffError

# The official configs/model/osdiff.yaml, the numbers the conversion uses (full size).
OFFICIAL_SD21_CONFIG: dict = {
    "target": "model.osdiff.OSDiff",
    "params": {
        "linear_start": 0.00085, "linear_end": 0.0120, "timesteps": 1000, "scale_factor": 0.18215,
        "control_stage_config": {"target": "model.osdiff.CDDM", "params": {
            "in_channels": 4, "out_channels": 4, "hint_channels": 4, "model_channels": 320,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
            "num_head_channels": 16, "use_spatial_transformer": True, "use_linear_in_transformer": True,
            "transformer_depth": 1, "context_dim": 1024, "legacy": False, "control_scale": 1.0,
            "control_model_ratio": 0.2}},
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
            "num_head_channels": 64, "use_spatial_transformer": True, "use_linear_in_transformer": True,
            "transformer_depth": 1, "context_dim": 1024, "legacy": False}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "ddconfig": {
                "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                              "params": {"freeze": True, "layer": "penultimate"}},
        "preprocess_config": {"target": "model.lfgcm.LFGCM", "params": {
            "in_nc": 4, "enc_mid": [64, 128, 192, 192], "out_nc": 4, "N": 192, "M": 320, "prior_nc": 64,
            "sft_ks": 3, "slice_num": 10, "slice_ch": [8, 8, 8, 8, 16, 16, 32, 32, 96, 96]}},
    },
}

# ldm ResBlock / Downsample parameter names -> diffusers ResnetBlock2D / Downsample2D
_RESBLOCK_NAMES = [
    (".in_layers.0.", ".norm1."), (".in_layers.2.", ".conv1."), (".emb_layers.1.", ".time_emb_proj."),
    (".out_layers.0.", ".norm2."), (".out_layers.3.", ".conv2."), (".skip_connection.", ".conv_shortcut."),
    (".op.", ".conv."),
]
# Official LFGCM parameters that exist but are never run (SFT modules, f_c)
_UNUSED_LFGCM = re.compile(r"^(hyper_enc\.(sft_feature|h_a1\.|h_a4\.|h_a7\.|h_a8\.)|f_c\.)")
_TABLE_BUFFERS = re.compile(r"^(entropy_bottleneck|gaussian_conditional)\.(_quantized_cdf|_offset|_cdf_length|scale_table)$")


@dataclass(frozen=True)
class OfficialModelConfig:
    """The numbers of an official-format model config (configs/model/osdiff.yaml)."""

    unet: dict
    control: dict
    lfgcm: dict
    first_stage: dict
    scale_factor: float = 0.18215
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    text_heads: int | None = None  # osdiff-only key `cond_stage_config.params.heads`; default width // 64
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, cfg: dict) -> "OfficialModelConfig":
        try:
            p = cfg["params"]
            control = dict(p["control_stage_config"]["params"])
            unet = dict(p["unet_config"]["params"])
            lfgcm = dict(p["preprocess_config"]["params"])
            first_stage = dict(p["first_stage_config"]["params"])
            cond = dict((p.get("cond_stage_config") or {}).get("params") or {})
        except (KeyError, TypeError) as exc:
            raise OSDiffError(f"not an official OSDiff model config (missing {exc})") from None
        for key, want in (("use_spatial_transformer", True), ("use_linear_in_transformer", True), ("legacy", False),
                          ("resblock_updown", False), ("use_scale_shift_norm", False)):
            if control.get(key, want) != want or unet.get(key, want) != want:
                raise OSDiffError(f"model config: {key}={control.get(key)} is not supported (the official model uses {want})")
        if len(lfgcm.get("slice_ch", [])) != lfgcm.get("slice_num", len(lfgcm.get("slice_ch", []))):
            raise OSDiffError("model config: slice_num does not match slice_ch")
        return cls(unet=unet, control=control, lfgcm=lfgcm, first_stage=first_stage,
                   scale_factor=float(p.get("scale_factor", 0.18215)), linear_start=float(p.get("linear_start", 0.00085)),
                   linear_end=float(p.get("linear_end", 0.012)), timesteps=int(p.get("timesteps", 1000)),
                   text_heads=cond.get("heads"), raw=cfg)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "OfficialModelConfig":
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise OSDiffError(f"{path}: cannot read ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise OSDiffError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise OSDiffError(f"{path}: not an official OSDiff model config")
        return cls.from_dict(data.get("model", data))

    def control_kwargs(self) -> dict:
        c = self.control
        return dict(
            in_channels=c["in_channels"], hint_channels=c["hint_channels"], model_channels=c["model_channels"],
            channel_mult=tuple(c["channel_mult"]), num_res_blocks=c["num_res_blocks"],
            attention_resolutions=tuple(c["attention_resolutions"]), num_head_channels=c["num_head_channels"],
            transformer_depth=c.get("transformer_depth", 1), context_dim=c["context_dim"],
            control_model_ratio=float(c.get("control_model_ratio", 1.0)), control_scale=float(c.get("control_scale", 1.0)),
        )

    def lfgcm_kwargs(self) -> dict:
        p = self.lfgcm
        return dict(in_nc=p["in_nc"], out_nc=p["out_nc"], enc_mid=tuple(p["enc_mid"]), N=p["N"], M=p["M"], slice_ch=tuple(p["slice_ch"]))

    def ldm_config(self) -> dict:
        """The layout diffusers' ldm converters read (original_config["model"]["params"])."""
        return {"model": {"params": {"unet_config": {"params": self.unet},
                                     "first_stage_config": {"params": self.first_stage},
                                     "scale_factor": self.scale_factor}}}


# ---- safe checkpoint reading ----------------------------------------------------------------
_SAFE_GLOBALS = [collections.defaultdict, collections.OrderedDict, Path, type(Path()), np.dtype, np.ndarray]


def read_state_dict(path: str | Path, what: str) -> dict[str, Tensor]:
    """The `state_dict` of a Lightning / ldm checkpoint (or a bare state dict, or safetensors),
    read without running code. Any failure is one OSDiffError line naming `path`."""
    path = Path(path)
    if not path.is_file():
        raise OSDiffError(f"{path}: no such file ({what})")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise OSDiffError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        reason = str(exc).split("\n")[0] if "WeightsUnpickler" not in str(exc) else _unsafe_global(str(exc))
        raise OSDiffError(f"{path}: refused to load ({reason}); only tensors and plain containers are read") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, IndexError) as exc:
        raise OSDiffError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({exc.__class__.__name__})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise OSDiffError(f"{path}: holds no state dict of tensors ({what})")
    return state


def _unsafe_global(message: str) -> str:
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    return f"it needs the class {match.group(1)}" if match else "it contains objects other than tensors"


# ---- key maps -------------------------------------------------------------------------------
def map_control_key(key: str) -> str | None:
    """Official `control_model.*` key (CDDM) -> CDDMControl parameter name, None if unused."""
    if not key.startswith("control_model."):
        return None
    k = key[len("control_model."):]
    if k == "scale_list":
        return k
    m = re.match(r"enc_zero_convs_out\.(\d+)\.0\.(weight|bias)$", k)
    if m:
        return f"enc_zero_convs.{m[1]}.{m[2]}"
    m = re.match(r"dec_zero_convs_out\.(\d+)\.0\.(weight|bias)$", k)
    if m:
        return f"dec_zero_convs.{m[1]}.{m[2]}"
    m = re.match(r"middle_block_out\.0\.(weight|bias)$", k)
    if m:
        return f"middle_zero_conv.{m[1]}"
    if not k.startswith("control_model."):
        return None
    k = k[len("control_model."):]
    m = re.match(r"time_embed\.(0|2)\.(weight|bias)$", k)
    if m:
        return f"time_embedding.linear_{1 if m[1] == '0' else 2}.{m[2]}"
    if k.startswith(("input_blocks.", "middle_block.")):
        k = "." + k
        for old, new in _RESBLOCK_NAMES:
            k = k.replace(old, new)
        return k[1:]
    return None


def is_entropy_table_key(key: str) -> bool:
    """Whether an LFGCM state-dict key (without `preprocess_model.`) is one of compressai's
    entropy-coder tables (CDFs, offsets, scale table): rebuilt by `update()`, never converted."""
    return _TABLE_BUFFERS.match(key) is not None


def map_lfgcm_key(key: str) -> str | None:
    """Official `preprocess_model.*` key (LFGCM) -> OfficialLFGCM name; None if never run."""
    if not key.startswith("preprocess_model."):
        return None
    k = key[len("preprocess_model."):]
    if _UNUSED_LFGCM.match(k) or is_entropy_table_key(k):
        return None
    return re.sub(r"^entropy_bottleneck\._(matrix|bias|factor)(\d+)$", lambda m: f"entropy_bottleneck._{m[1]}{'ices' if m[1] == 'matrix' else 'es'}.{m[2]}", k)


def official_control_keys(control) -> dict[str, str]:
    """CDDMControl parameter name -> the official `control_model.*` key (inverse of
    `map_control_key`), for writing a trained control module in the official layout."""
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D

    reverse = {new: old for old, new in _RESBLOCK_NAMES}
    out = {"scale_list": "control_model.scale_list"}
    owners = [n for n, m in control.named_modules() if isinstance(m, (ResnetBlock2D, Downsample2D))]
    for key in control.state_dict():
        if key == "scale_list":
            continue
        m = re.match(r"(enc|dec)_zero_convs\.(\d+)\.(weight|bias)$", key)
        if m:
            out[key] = f"control_model.{m[1]}_zero_convs_out.{m[2]}.0.{m[3]}"
            continue
        m = re.match(r"middle_zero_conv\.(weight|bias)$", key)
        if m:
            out[key] = f"control_model.middle_block_out.0.{m[1]}"
            continue
        m = re.match(r"time_embedding\.linear_(1|2)\.(weight|bias)$", key)
        if m:
            out[key] = f"control_model.control_model.time_embed.{0 if m[1] == '1' else 2}.{m[2]}"
            continue
        owner = next((n for n in owners if key.startswith(n + ".")), None)
        rest = key
        if owner is not None:
            tail = "." + key[len(owner) + 1:]
            for new, old in reverse.items():
                if tail.startswith(new):
                    tail = old + tail[len(new):]
                    break
            rest = owner + tail
        out[key] = f"control_model.control_model.{rest}"
    return out


def official_lambda_state(control, lfgcm) -> dict[str, Tensor]:
    """A trained CDDMControl + OfficialLFGCM as an official λ checkpoint's state dict
    (`control_model.*`, `preprocess_model.*`), which `convert-official --ckpt` reads back."""
    names = official_control_keys(control)
    state = {names[k]: v.detach().cpu() for k, v in control.state_dict().items()}
    state.update({f"preprocess_model.{k}": v.detach().cpu() for k, v in lfgcm.state_dict().items()})
    return state


def convert_level(state: dict[str, Tensor], control, lfgcm, path: Path) -> list[str]:
    """Load one λ checkpoint's weights into `control` and `lfgcm`; returns the unused keys."""
    targets = {"control_model.": ("control", control, map_control_key), "preprocess_model.": ("lfgcm", lfgcm, map_lfgcm_key)}
    unused = []
    for prefix, (name, module, mapper) in targets.items():
        own = module.state_dict()
        mapped: dict[str, Tensor] = {}
        for key, value in state.items():
            if not key.startswith(prefix):
                continue
            new = mapper(key)
            if new is None or new not in own:
                unused.append(key)
                continue
            if tuple(own[new].shape) != tuple(value.shape):
                raise OSDiffError(f"{path}: {key} has shape {tuple(value.shape)}, the model config gives {tuple(own[new].shape)} (wrong --config?)")
            mapped[new] = value.to(own[new].dtype)
        missing = sorted(set(own) - set(mapped))
        if missing:
            raise OSDiffError(f"{path}: {len(missing)} {name} weights missing, e.g. {missing[0]} (not an OSDiff lambda checkpoint, or wrong --config?)")
        module.load_state_dict(mapped, strict=True)
    unused += [k for k in state if not k.startswith(tuple(targets))]
    return sorted(unused)


# ---- SD -------------------------------------------------------------------------------------
def sd_from_ldm_checkpoint(state: dict[str, Tensor], cfg: OfficialModelConfig, path: Path):
    """(AutoencoderKL, UNet2DConditionModel, (1,77,D) empty-prompt embedding, unused keys)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm, create_vae_diffusers_config_from_ldm,
    )

    from ..models.official.text import empty_prompt_embedding

    if any(k.startswith("cond_stage_model.transformer.") for k in state):
        raise OSDiffError(f"{path}: a Stable Diffusion 1.x checkpoint (CLIP ViT-L text encoder); OSDiff needs Stable Diffusion 2.1 base")
    for prefix in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."):
        if not any(k.startswith(prefix) for k in state):
            raise OSDiffError(f"{path}: not a Stable Diffusion 2.x ldm checkpoint (no {prefix}* weights)")
    context = cfg.unet["context_dim"]
    k_proj = [v for k, v in state.items() if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")]
    if k_proj and k_proj[0].shape[1] != context:
        raise OSDiffError(f"{path}: UNet cross-attention takes {k_proj[0].shape[1]}-d text, the model needs {context} (not SD 2.1?)")
    original = cfg.ldm_config()
    state32 = {k: v.float() for k, v in state.items() if k.startswith(("model.diffusion_model.", "first_stage_model."))}
    try:
        unet_config = create_unet_diffusers_config_from_ldm(original, state32)
        unet = UNet2DConditionModel(**unet_config)
        _load_exact(unet, convert_ldm_unet_checkpoint(state32, unet.config), path, "UNet")
        vae_config = create_vae_diffusers_config_from_ldm(original, state32)
        vae = AutoencoderKL(**vae_config)
        _load_exact(vae, convert_ldm_vae_checkpoint(state32, vae.config), path, "VAE")
    except (KeyError, IndexError, RuntimeError) as exc:
        raise OSDiffError(f"{path}: does not match the model config ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})") from None
    text = {k[len("cond_stage_model.model."):]: v for k, v in state.items() if k.startswith("cond_stage_model.model.")}
    width = text["token_embedding.weight"].shape[1]
    heads = int(cfg.text_heads or max(width // 64, 1))
    embedding = empty_prompt_embedding(text, heads)
    if embedding.shape[-1] != context:
        raise OSDiffError(f"{path}: text encoder width {embedding.shape[-1]} does not match the UNet's {context}")
    used = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model.")
    unused = [k for k in state if not k.startswith(used)]
    return vae, unet, embedding, unused


def _load_exact(module, weights: dict[str, Tensor], path: Path, what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(weights))
    if missing:
        raise OSDiffError(f"{path}: {len(missing)} {what} weights missing, e.g. {missing[0]}")
    module.load_state_dict({k: weights[k] for k in own}, strict=True)


def sd_from_diffusers_folder(folder: Path, cfg: OfficialModelConfig):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..models.conditioning import ConditioningEmbedding

    missing = [s for s in ("vae", "unet", "text_encoder", "tokenizer") if not (folder / s).is_dir()]
    if missing:
        raise OSDiffError(f"{folder}: not a Stable Diffusion diffusers folder (missing {', '.join(missing)}/)")
    try:
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
        embedding = ConditioningEmbedding.from_text_encoder(folder).embedding.data
    except (OSError, ValueError, RuntimeError) as exc:
        raise OSDiffError(f"{folder}: cannot load ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
    if unet.config.cross_attention_dim != cfg.unet["context_dim"]:
        raise OSDiffError(f"{folder}: UNet cross-attention takes {unet.config.cross_attention_dim}-d text, the model needs {cfg.unet['context_dim']} (not SD 2.1?)")
    return vae.float(), unet.float(), embedding.float(), []


# ---- the conversion -------------------------------------------------------------------------
def rate_probe_image(size: int = 128) -> Tensor:
    """A fixed test image (1,3,size,size) in [0,1], generated by code: gradients, edges, texture."""
    g = torch.Generator().manual_seed(1234)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([x, y, (x + y) / 2]) + 0.25 * ((x * 8).floor() % 2 == (y * 8).floor() % 2).float()
    img = img + 0.05 * torch.randn(3, size, size, generator=g)
    return img.clamp(0, 1)[None]


@dataclass
class ConversionReport:
    levels: list[str]  # λ checkpoint paths, level 1 first
    bpp: list[float]  # on rate_probe_image, same order
    unused: dict[str, list[str]]  # file -> keys not used


def convert_official(sd: str | Path, ckpts: list[str | Path], output: str | Path, config: str | Path | None = None,
                     name: str = "osdiff-official", force: bool = False) -> ConversionReport:
    """Convert and save; see the module docstring. Output is written to a temporary folder
    beside `output`, then moved into place."""
    from ..models.conditioning import ConditioningEmbedding
    from ..official_pipeline import OfficialLevels, OfficialOSDiffPipeline

    output = Path(output)
    if output.exists() and not force and (not output.is_dir() or any(output.iterdir())):
        raise OSDiffError(f"{output}: already exists (use --force to overwrite)")
    if not ckpts:
        raise OSDiffError("give at least one --ckpt")
    cfg = OfficialModelConfig.from_dict(OFFICIAL_SD21_CONFIG) if config is None else OfficialModelConfig.from_yaml(config)
    sd = Path(sd)
    unused: dict[str, list[str]] = {}
    # read every λ checkpoint first: a bad one fails before the (large) SD conversion
    levels = OfficialLevels(num_levels=len(ckpts), compressor=cfg.lfgcm_kwargs(), control=cfg.control_kwargs())
    for i, ckpt in enumerate(ckpts):
        state = read_state_dict(ckpt, "an OSDiff lambda checkpoint")
        if not any(k.startswith(("control_model.", "preprocess_model.")) for k in state):
            raise OSDiffError(f"{ckpt}: not an OSDiff lambda checkpoint (no control_model.* / preprocess_model.* weights)")
        unused[str(ckpt)] = convert_level(state, levels.controls[i], levels.compressors[i], Path(ckpt))
        del state
    if sd.is_dir():
        vae, unet, embedding, sd_unused = sd_from_diffusers_folder(sd, cfg)
    else:
        state = read_state_dict(sd, "a Stable Diffusion 2.1 checkpoint")
        if any(k.startswith("control_model.") for k in state) and not any(k.startswith("model.diffusion_model.") for k in state):
            raise OSDiffError(f"{sd}: an OSDiff lambda checkpoint, not Stable Diffusion (swap --sd and --ckpt?)")
        vae, unet, embedding, sd_unused = sd_from_ldm_checkpoint(state, cfg, sd)
        del state
    unused[str(sd)] = sd_unused
    conditioning = ConditioningEmbedding(num_tokens=embedding.shape[1], dim=embedding.shape[2])
    conditioning.embedding.data.copy_(embedding)
    scheduler = official_scheduler(cfg)
    vae.register_to_config(scaling_factor=cfg.scale_factor)
    levels.update(force=True)
    pipe = OfficialOSDiffPipeline(vae=vae.eval(), unet=unet.eval(), levels=levels.eval(), conditioning=conditioning,
                                  scheduler=scheduler, model_name=name)
    order, bpp = _order_by_rate(pipe)
    if order != list(range(len(ckpts))):
        _reorder(levels, order)
        pipe._model_hash = None
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    except OSError as exc:
        raise OSDiffError(f"{output}: cannot write ({exc.strerror or exc})") from None
    try:
        pipe.save_pretrained(tmp)
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except OSError as exc:
        raise OSDiffError(f"{output}: cannot write ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ConversionReport([str(ckpts[i]) for i in order], [bpp[i] for i in order], unused)


def official_scheduler(cfg: OfficialModelConfig):
    """The official noise schedule (ldm "linear" = diffusers "scaled_linear"), epsilon prediction."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=cfg.timesteps, beta_start=cfg.linear_start, beta_end=cfg.linear_end,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon")


def build_official_architecture(cfg: OfficialModelConfig | None = None, name: str = "official-arch"):
    """The full-size official model (SD 2.1 base UNet/VAE, LFGCM, CDDM; one level) with random
    weights: for `osdiff bench` without the checkpoints (speed does not depend on weight values)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm, create_vae_diffusers_config_from_ldm

    from ..models.conditioning import ConditioningEmbedding
    from ..official_pipeline import OfficialLevels, OfficialOSDiffPipeline

    cfg = cfg or OfficialModelConfig.from_dict(OFFICIAL_SD21_CONFIG)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(cfg.ldm_config(), {}))
    vae = AutoencoderKL(**create_vae_diffusers_config_from_ldm(cfg.ldm_config(), {}))
    levels = OfficialLevels(num_levels=1, compressor=cfg.lfgcm_kwargs(), control=cfg.control_kwargs())
    levels.update(force=True)
    conditioning = ConditioningEmbedding(num_tokens=77, dim=cfg.unet["context_dim"])
    conditioning.embedding.data.normal_()
    return OfficialOSDiffPipeline(vae=vae.eval(), unet=unet.eval(), levels=levels.eval(), conditioning=conditioning,
                                  scheduler=official_scheduler(cfg), model_name=name)


@torch.no_grad()
def _order_by_rate(pipe) -> tuple[list[int], list[float]]:
    """Level indices sorted by bits on `rate_probe_image` (fewest first), and each one's bpp."""
    image = rate_probe_image()
    latent = pipe.encode_latent(image).float()
    bpp = []
    for compressor in pipe.levels.compressors:
        strings = compressor.compress(latent, exact=True)["strings"]
        bpp.append(sum(len(s) for s in strings) * 8 / image[0, 0].numel())
    return sorted(range(len(bpp)), key=lambda i: (bpp[i], i)), bpp


def _reorder(levels, order: list[int]) -> None:
    levels.compressors = torch.nn.ModuleList(levels.compressors[i] for i in order)
    levels.controls = torch.nn.ModuleList(levels.controls[i] for i in order)


__all__ = ["OFFICIAL_SD21_CONFIG", "OfficialModelConfig", "convert_official", "read_state_dict", "map_control_key",
           "map_lfgcm_key", "rate_probe_image", "ConversionReport", "build_official_architecture"]
