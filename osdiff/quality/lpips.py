"""LPIPS v0.1 (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric"): AlexNet (the field's metric) or VGG16 (the usual training loss) features,
unit-normalised over channels, squared differences weighted by the learned 1x1 heads (shipped:
osdiff/quality/weights, BSD-2-Clause), averaged over space, summed over the five layers."""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import OSDiffError
from .backbones import ALEXNET, VGG16, backbone_state_dict

WEIGHTS = Path(__file__).resolve().parent / "weights"
# torchvision `features` indices of the ReLUs LPIPS taps
TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}


def lpips_heads(net: str) -> dict[str, Tensor]:
    """The v0.1 heads of `net` ('alex' or 'vgg'): lin0..lin4 weights (1,C,1,1)."""
    from safetensors.torch import load_file

    return load_file(str(WEIGHTS / f"lpips_{net}.safetensors"))


class LPIPS(nn.Module):
    """(B,) LPIPS distances of images (B,3,H,W) in [0,1]; lower is more similar. `backbone`
    (torchvision `features` state dict) and `heads` default to the pretrained ones: the
    backbone from osdiff.quality.backbones (no download), the heads from the package."""

    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)

    def __init__(self, net: str = "alex", backbone: dict[str, Tensor] | None = None,
                 heads: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        import torchvision

        if net not in TAPS:
            raise OSDiffError(f"LPIPS network {net!r}: choose alex or vgg")
        self.net_name = net
        features = (torchvision.models.alexnet if net == "alex" else torchvision.models.vgg16)(weights=None).features
        if backbone is None:
            backbone = backbone_state_dict(ALEXNET if net == "alex" else VGG16)
        features.load_state_dict(backbone)
        self.taps = TAPS[net]
        self.net = features[: self.taps[-1] + 1].eval()
        heads = lpips_heads(net) if heads is None else heads
        self.lins = nn.ModuleList(nn.Conv2d(w.shape[1], 1, 1, bias=False) for w in (heads[f"lin{i}.weight"] for i in range(5)))
        for i, conv in enumerate(self.lins):
            conv.weight.data.copy_(heads[f"lin{i}.weight"])
        self.register_buffer("shift", torch.tensor(self.SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(self.SCALE)[None, :, None, None])
        self.requires_grad_(False)

    def features(self, x: Tensor) -> list[Tensor]:
        """The five unit-normalised feature maps of images in [0,1]."""
        h, out = (x * 2 - 1 - self.shift) / self.scale, []
        for i, layer in enumerate(self.net):
            h = layer(h)
            if i in self.taps:
                out.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x_hat: Tensor, x: Tensor, x_features: list[Tensor] | None = None) -> Tensor:
        """`x_features`: `features(x)` if already computed (a reference scored many times)."""
        ref = self.features(x) if x_features is None else x_features
        return sum(lin((a - b) ** 2).mean(dim=(1, 2, 3)) for lin, a, b in zip(self.lins, self.features(x_hat), ref))


@functools.lru_cache(maxsize=2)
def pretrained_lpips(net: str = "alex") -> LPIPS:
    """The pretrained LPIPS on `net`, loaded once per process (frozen; shared by its callers)."""
    return LPIPS(net)
