"""Where a v2 model's error, blur and colour cast come from: PSNR (dB), HaarPSI, detail retention
and colour shift (8-bit levels; osdiff.evaluation.metrics) of whole photos decoded at each point of the chain,
averaged over the photos. No entropy coding: the compressor's rounded hint at each level.

    teacher(z)        TAEF2's own decoder on the clean latent (the autoencoder's ceiling)
    model(z)          the model's decoder on the clean latent
    L<n> teacher(hint), model(hint), teacher(one step), model(one step): level n's hint, and
                      the output of its UNet step, decoded by either decoder

    python scripts/decoder_diagnosis.py MODEL [--images DIR] [--limit 8] [--threads 2] [--no-teacher]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from osdiff.evaluation.metrics import colour_shift, detail_retention, piq_metric  # noqa: E402
from osdiff.hub import WEIGHTS_DIR  # noqa: E402
from osdiff.models.taesd import TAESDAutoencoder  # noqa: E402
from osdiff.pipeline import OSDiffPipeline  # noqa: E402
from osdiff.quality.pixel import psnr  # noqa: E402
from osdiff.training.data import find_images, load_images, whole_photo  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "images" / "cbsd68"))
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-teacher", action="store_true", help="skip the rows of TAEF2's own decoder (faster)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    diffusers_logging.disable_progress_bar()
    pipe = OSDiffPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    if not isinstance(pipe.vae, TAESDAutoencoder):
        sys.exit(f"{args.model}: not a TAEF2 (v2) model")
    teacher = TAESDAutoencoder.from_pretrained(WEIGHTS_DIR / "taef2" / "vae").float().eval()
    teacher.mean, teacher.std = pipe.vae.mean, pipe.vae.std  # the model's latent normalisation
    multiple = 8 * pipe.compressor.latent_multiple
    rows: dict[str, list[tuple[float, float]]] = {}

    def add(name: str, decoded: torch.Tensor, x: torch.Tensor) -> None:
        y = ((decoded + 1) / 2).clamp(0, 1)
        rows.setdefault(name, []).append(
            (psnr(y, x), piq_metric("haarpsi", y, x), detail_retention(y, x), colour_shift(y, x))
        )

    files = find_images([args.images])[: args.limit]
    with torch.no_grad():
        for im in load_images(files, 768):
            x = whole_photo(im, multiple)
            z = pipe.vae.encode(x * 2 - 1)
            if not args.no_teacher:
                add("teacher(z)", teacher.decode(z), x)
            add("model(z)", pipe.vae.decode(z), x)
            for level in range(pipe.num_quality_levels):
                hint = pipe.compressor(z, torch.full((1,), level))["hint"]
                if not args.no_teacher:
                    add(f"L{level + 1} teacher(hint)", teacher.decode(hint), x)
                add(f"L{level + 1} model(hint)", pipe.vae.decode(hint), x)
                one_step = pipe.denoise(hint)
                if not args.no_teacher:
                    add(f"L{level + 1} teacher(one step)", teacher.decode(one_step), x)
                add(f"L{level + 1} model(one step)", pipe.vae.decode(one_step), x)
    print(f"{len(files)} photos of {args.images}, model {args.model}")
    print(f"{'decoded':24s} {'PSNR dB':>8s} {'HaarPSI':>8s} {'detail':>7s} {'colour shift':>13s}")
    for name, values in rows.items():
        mean_psnr, haarpsi, detail, shift = np.mean(values, axis=0)
        print(f"{name:24s} {mean_psnr:8.2f} {haarpsi:8.3f} {detail:7.3f} {shift:13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
