"""What the latent autoencoder alone costs, before any compression: each photo encoded by TAEF2's
encoder and decoded (uncompressed latents) by a model's decoder and by TAEF2's own, measured with
`osdiff eval`'s colour and texture diagnostics and PSNR.

    python scripts/autoencoder_floor.py ../shared/data/images/mcmaster ../shared/data/images/cbsd68 --limit 4
"""
import argparse

import numpy as np
import torch
from PIL import Image

import osdiff
from osdiff.imageio import find_images
from osdiff.models.autoencoder import decode_latent, encode_latent
from osdiff.models.taesd import TAESDAutoencoder
from osdiff.quality.artifacts import delta_e, delta_e_saturated, spurious_texture
from osdiff.quality.pixel import psnr

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("folders", nargs="+")
parser.add_argument("--limit", type=int, default=4, help="photos per folder")
parser.add_argument("--model", default="osdiff-tiny", help="whose decoder (a model name or folder)")
args = parser.parse_args()
decoders = {args.model: osdiff.load(args.model).vae.float(),
            "taef2": TAESDAutoencoder.from_pretrained(osdiff.hub.WEIGHTS_DIR / "taef2" / "vae").float()}
print("photo | decoder | PSNR | delta_e | delta_e_saturated | spurious_texture")
for path in [p for folder in args.folders for p in find_images(folder)[: args.limit]]:
    x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    x = x[..., : x.shape[-2] // 16 * 16, : x.shape[-1] // 16 * 16]
    for name, vae in decoders.items():
        with torch.no_grad():
            z = encode_latent(vae, x * 2 - 1)  # TAEF2's encoder in both, each with its own latent scaling
            x_hat = ((decode_latent(vae, z) + 1) / 2).clamp(0, 1)
        print(f"{path.parent.name}/{path.name} | {name} | {psnr(x_hat, x):.2f} | {delta_e(x_hat, x):.2f} | "
              f"{delta_e_saturated(x_hat, x):.2f} | {spurious_texture(x_hat, x):.3f}")
