"""Distribution ("realism") metrics: the patches of every image a codec decoded at one setting,
compared as a set with the originals' patches (the HiFiC / PerCo protocol). Unlike the
per-image metrics they do not ask whether a reconstruction matches its photo, only whether its
patches look like photo patches, so blur and invented noise both cost and plausible texture
does not.

- `fid`, `kid`: the field's, from Inception-v3 pool features of 256-px patches on the plain
  grid and the grid shifted by 128 px (osdiff.quality.inception), with the patch count and
  KID's spread over subsets (`kid_spread`) beside them; FID on fewer than 1,000 patches is
  indicative only.
- `kid_taef2`: an in-house proxy, measured in the model's own feature space: KID of texture statistics in the frozen TAEF2 encoder that ships in the package
  (osdiff/weights/taef2, MIT licence; osdiff-tiny's encoder), so it runs everywhere: per 64-px
  patch, the mean and standard deviation of each of the 64 channels after the encoder's
  residual blocks at 1, 1/2 and 1/4 resolution (384 values, like a Gram-matrix texture
  descriptor), standardised by the originals' patches. A proxy, not FID: that network learned
  to reconstruct, not to recognise, and osdiff-tiny's decoder was distilled from the same
  autoencoder.

Features are kept per image in `features/<kind>/` of the results folder, so an interrupted
evaluation resumes, and rows evaluated before a metric existed get their features filled in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..quality.inception import kid

TEXTURE_PATCH = 64  # pixels
TEXTURE_TAPS = (1, 5, 9)  # TAEF2 encoder layers: residual blocks at 1, 1/2, 1/4 resolution


@dataclass
class PatchSetMetric:
    """One family of distribution metrics: `features` maps an image (1,3,H,W) in [0,1] to
    (patches, D) features; `scores(real, fake)` gives {name: value} for two feature sets (the
    metrics in `names`, and any side values such as kid_spread)."""

    kind: str  # folder under features/
    names: tuple[str, ...]
    features: Callable[[Tensor], np.ndarray]
    scores: Callable[[np.ndarray, np.ndarray], dict[str, float]]

    def folder(self, feat_dir: Path) -> Path:
        return feat_dir / self.kind

    def real_file(self, feat_dir: Path, image: str) -> Path:
        """`image`: the image's id (its file name without suffix, folder__name with several folders)."""
        return self.folder(feat_dir) / f"real__{image}.npy"

    def fake_file(self, feat_dir: Path, image: str, codec: str, setting) -> Path:
        return self.folder(feat_dir) / f"{codec}__{setting}__{image}.npy"

    def save(self, feat_dir: Path, image: str, codec: str, setting, ref: Tensor, decoded: Tensor) -> None:
        """Keep the features of `decoded` (and of the original `ref`, once per image)."""
        self.folder(feat_dir).mkdir(parents=True, exist_ok=True)
        if not self.real_file(feat_dir, image).is_file():
            np.save(self.real_file(feat_dir, image), self.features(ref))
        np.save(self.fake_file(feat_dir, image, codec, setting), self.features(decoded))


def texture_patches(image: Tensor, patch: int = TEXTURE_PATCH) -> Tensor:
    """(1,3,H,W) -> (N,3,patch,patch): the non-overlapping patches from the top-left corner."""
    _, c, h, w = image.shape
    rows, cols = h // patch, w // patch
    x = image[..., : rows * patch, : cols * patch].reshape(c, rows, patch, cols, patch)
    return x.permute(1, 3, 0, 2, 4).reshape(rows * cols, c, patch, patch)


class TAEF2TextureStatistics:
    """Per-patch channel means and standard deviations of a TAESD-family encoder's activations
    (`encoder`: the nn.Sequential taking images in [0,1]; default: the packaged TAEF2 encoder)."""

    def __init__(self, encoder: nn.Sequential | None = None, chunk: int = 32) -> None:
        if encoder is None:
            encoder = packaged_taef2_encoder()
        self.layers = encoder[: max(TEXTURE_TAPS) + 1].float().eval().requires_grad_(False)
        self.chunk = chunk

    @torch.no_grad()
    def __call__(self, image: Tensor) -> np.ndarray:
        """(1,3,H,W) in [0,1] -> (patches, 2 x 64 x 3) float64; images under 64 px give none."""
        patches = texture_patches(image.float().cpu())
        out = []
        for i in range(0, len(patches), self.chunk):
            h, stats = patches[i : i + self.chunk], []
            for index, layer in enumerate(self.layers):
                h = layer(h)
                if index in TEXTURE_TAPS:
                    stats += [h.mean(dim=(2, 3)), h.std(dim=(2, 3))]
            out.append(torch.cat(stats, 1).double())
        return torch.cat(out).numpy() if out else np.zeros((0, 1), np.float64)


def packaged_taef2_encoder() -> nn.Sequential:
    """The TAEF2 encoder of the package's own copy of TAEF2 (osdiff/weights/taef2, the one
    training distils from; osdiff-tiny's frozen encoder has the same weights), in float32."""
    from ..hub import WEIGHTS_DIR
    from ..models.taesd import TAESDAutoencoder

    return TAESDAutoencoder.from_pretrained(WEIGHTS_DIR / "taef2" / "vae", local_files_only=True).encoder.float()


def standardised_kid(real: np.ndarray, fake: np.ndarray) -> float:
    """KID after scaling every feature to zero mean, unit variance over the `real` set (so the
    polynomial kernel weighs all layers alike); a feature (nearly) constant over `real` is
    scaled by 1/1000 of the mean deviation instead, so it cannot dominate."""
    mean, std = real.mean(0), real.std(0)
    std = np.maximum(std, 1e-3 * std.mean() + 1e-12)
    return kid((real - mean) / std, (fake - mean) / std)


def patch_set_metrics(unavailable: dict[str, str], proxy: bool = True) -> list[PatchSetMetric]:
    """The distribution metrics that can run here (FID/KID, and kid_taef2 if `proxy`); those
    that cannot are entered in `unavailable`."""
    from ..quality.backbones import BackboneMissing
    from ..quality.inception import InceptionFeatures, fid, kid_spread

    found = []
    try:
        inception = InceptionFeatures()
    except BackboneMissing as exc:
        unavailable["fid"] = unavailable["kid"] = str(exc)
    else:
        # "inception_hific": the plain grid and the grid shifted by 128 px (earlier results
        # folders kept plain-grid features under "inception"; they are not mixed in)
        found.append(PatchSetMetric("inception_hific", ("fid", "kid"), inception,
                                    lambda r, f: {"fid": fid(r, f), "kid": kid(r, f), "kid_spread": kid_spread(r, f)}))
    if not proxy:
        return found
    try:
        texture = TAEF2TextureStatistics()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        unavailable["kid_taef2"] = f"cannot load the packaged TAEF2 encoder ({exc.__class__.__name__})"
    else:
        found.append(PatchSetMetric("taef2", ("kid_taef2",), texture, lambda r, f: {"kid_taef2": standardised_kid(r, f)}))
    return found


def score_sets(metrics: list[PatchSetMetric], feat_dir: Path, images: list[str],
               points: list[tuple[str, str]]) -> dict[tuple[str, str], dict[str, float]]:
    """{(codec, setting): {name: value, side values, "patches_<kind>": count}} over `images`;
    nan where either set has fewer than 3 patches."""
    scores: dict[tuple[str, str], dict[str, float]] = {p: {} for p in points}
    for m in metrics:
        real = _stack([m.real_file(feat_dir, img) for img in images])
        for codec, setting in points:
            fake = _stack([m.fake_file(feat_dir, img, codec, setting) for img in images])
            ok = len(real) > 2 and len(fake) > 2
            values = m.scores(real, fake) if ok else {}
            scores[(codec, setting)].update({n: values.get(n, math.nan) for n in m.names})
            scores[(codec, setting)].update({k: v for k, v in values.items() if k not in m.names})
            scores[(codec, setting)][f"patches_{m.kind}"] = len(fake)
    return scores


def _stack(files: list[Path]) -> np.ndarray:
    arrays = [np.load(f) for f in files if f.is_file()]
    arrays = [a for a in arrays if len(a)]
    return np.concatenate(arrays) if arrays else np.zeros((0, 1))


def patch_count(point: dict) -> int:
    """Inception patches behind a summary point's FID/KID (0 when not measured)."""
    n = point.get("patches_inception_hific", 0)
    return int(n) if isinstance(n, (int, float)) and math.isfinite(n) else 0
