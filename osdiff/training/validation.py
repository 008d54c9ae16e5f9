"""What the stages' validation logs: image metrics over lists of batches. PSNR is
osdiff.quality.pixel's; LPIPS-Alex, DISTS and the artifact measures (held out: never in a loss)
come from osdiff.quality."""
from __future__ import annotations

import math

import piq
from torch import Tensor, nn

from ..quality.artifacts import grid_texture, spurious_texture
from ..quality.pixel import colour_shift, detail_retention, psnr

_HELD_OUT: dict[str, nn.Module] = {}


def held_out_metrics(device) -> dict[str, nn.Module]:
    """LPIPS-Alex and DISTS for validation logs, never in a loss; loaded once ({} when their
    backbones are missing)."""
    if "loaded" not in _HELD_OUT:
        from ..quality.backbones import BackboneMissing
        from ..quality.dists import pretrained_dists
        from ..quality.lpips import pretrained_lpips

        try:
            _HELD_OUT.update(lpips=pretrained_lpips("alex"), dists=pretrained_dists())
        except BackboneMissing:
            pass
        _HELD_OUT["loaded"] = nn.Identity()
    return {k: v.to(device) for k, v in _HELD_OUT.items() if k != "loaded"}


def image_metrics(preds: list[Tensor], targets: list[Tensor]) -> dict[str, float]:
    """Mean LPIPS-Alex and DISTS (the held-out metrics runs are chosen by; absent when their
    backbones are not on the machine), PSNR (dB), HaarPSI, detail retention, colour shift
    (8-bit levels), added texture (`spurious_texture`) and the lattice pattern (`grid_texture`,
    over the images of at least one 64-px tile; nan if none) over the images of lists of
    batches (any sizes, in [0,1])."""
    pairs = image_pairs(preds, targets)
    out = {name: mean_over(pairs, lambda p, t, net=net: net(p, t).item()) for name, net in held_out_metrics(pairs[0][0].device).items()}
    grids = [g for g in (grid_texture(p.float().cpu(), t.float().cpu()) for p, t in pairs) if not math.isnan(g)]
    return {**out, "psnr": mean_over(pairs, psnr),
            "haarpsi": mean_over(pairs, lambda p, t: piq.haarpsi(p, t, data_range=1.0).item()),
            "detail": mean_over(pairs, detail_retention),
            "colour_shift": mean_over(pairs, colour_shift),
            "texture": mean_over(pairs, lambda p, t: spurious_texture(p.float().cpu(), t.float().cpu())),
            "grid": sum(grids) / len(grids) if grids else math.nan}


def mean_psnr(preds: list[Tensor], targets: list[Tensor]) -> float:
    """Mean over the images of each one's PSNR in dB (batches of any sizes, in [0,1])."""
    return mean_over(image_pairs(preds, targets), psnr)


def image_pairs(preds: list[Tensor], targets: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Lists of batches -> [(pred (1,3,H,W), target (1,3,H,W))], one pair per image."""
    return [(p[None], t[None]) for pb, tb in zip(preds, targets) for p, t in zip(pb, tb)]


def mean_over(pairs: list, metric) -> float:
    """Mean of metric(pred, target) over (pred, target) pairs."""
    return sum(metric(p, t) for p, t in pairs) / len(pairs)
