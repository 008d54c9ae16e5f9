"""The ablation the method rests on: the hint decoded directly by the latent decoder (no UNet)
against one controlled-UNet step, per quality level, on centre crops of held-out photos.

Rates are the entropy models' estimates (bits from the likelihoods of the rounded latents, as
in training validation), not file sizes; both decodings use the same hint, so the comparison
of the two decodings is exact. Detail is evaluation's detail retention (1 keeps the photo's
luma gradient energy, below 1 is smoother), per crop and averaged, as eval averages images.

    .venv/bin/python scripts/ablate_unet_step.py osdiff-tiny ../runs/x/model --images ../shared/data/images/cbsd68 --limit 8
    .venv/bin/python scripts/ablate_unet_step.py osdiff-tiny --skip 20  # 8 photos outside eval's first 20
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import piq
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from osdiff.evaluation.metrics import detail_retention  # noqa: E402
from osdiff.hub import load  # noqa: E402
from osdiff.imageio import find_images  # noqa: E402
from osdiff.models.autoencoder import decode_latent, encode_latent  # noqa: E402
from osdiff.quality.pixel import psnr  # noqa: E402
from osdiff.training.data import center_crops, load_images  # noqa: E402


@torch.no_grad()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="shipped model names or model folders")
    parser.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "images" / "cbsd68"))
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--skip", type=int, default=0, help="leave out the first SKIP photos (sorted by name)")
    parser.add_argument("--crop", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)
    files = find_images(Path(args.images))[args.skip: args.skip + args.limit]
    x = center_crops(load_images(files, 768), args.crop)
    print(f"{len(x)} centre crops of {args.crop} px from {args.images}")
    print("| model | level | bpp (estimate) | one UNet step: PSNR / HaarPSI / detail | hint only: PSNR / HaarPSI / detail |")
    print("|---|---|---|---|---|")

    def scores(y: torch.Tensor) -> str:
        return f"{psnr(y, x):.2f} / {piq.haarpsi(y, x).item():.3f} / {np.mean([detail_retention(y[i:i + 1], x[i:i + 1]) for i in range(len(x))]):.2f}"

    for name in args.models:
        pipe = load(name).to(torch.float32)
        pipe.compressor.eval()
        z = encode_latent(pipe.vae, x * 2 - 1)
        image = lambda latent: ((decode_latent(pipe.vae, latent) + 1) / 2).clamp(0, 1)  # noqa: E731
        print(f"| {name} | autoencoder alone | - | {scores(image(z))} | - |")
        for q in range(pipe.num_quality_levels):
            coded = pipe.compressor(z, q)
            bpp = sum(-torch.log2(lk).sum() for lk in coded["likelihoods"].values()).item() / (x.numel() / 3)
            one_step, hint_only = image(pipe.denoise(coded["hint"])), image(coded["hint"])
            print(f"| {name} | {q + 1} | {bpp:.3f} | {scores(one_step)} | {scores(hint_only)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
