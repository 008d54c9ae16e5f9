"""Where a model's lattice pattern comes from: each photo's latent, hint and one-step output at a
few levels, each decoded by the model's decoder, scored by `grid_texture` on the 16-px lattice's
"odd" frequencies (the code grid's own: the compressor's 1/16-resolution code) and "even" ones
(the 8-px latent grid: the latent decoder's upsampling), and on all of them (means over photos;
0: as periodic as the photo).

    python scripts/grid_origin.py ../shared/data/images/cbsd68 ../shared/data/images/mcmaster --limit 4
"""
import argparse

import numpy as np
import torch

import osdiff
from osdiff.imageio import find_images, open_image, to_tensor
from osdiff.quality.artifacts import LATTICE_FAMILIES, grid_texture

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("folders", nargs="+")
parser.add_argument("--limit", type=int, default=4, help="photos per folder")
parser.add_argument("--model", action="append", help="model name or folder (repeatable; default osdiff-tiny)")
parser.add_argument("--levels", default="1,5", help="1-based quality levels")
args = parser.parse_args()
paths = [p for folder in args.folders for p in find_images(folder)[: args.limit]]
print("model | latent | " + " | ".join(f"grid_texture {f}" for f in LATTICE_FAMILIES))
for name in args.model or ["osdiff-tiny"]:
    codec = osdiff.load(name)
    codec._prepare()
    rows: dict = {}
    for path in paths:
        x = to_tensor(open_image(path))
        x = x[..., : x.shape[-2] // 64 * 64, : x.shape[-1] // 64 * 64]
        with torch.no_grad():
            z = codec.vae.encode(x * 2 - 1)
            latents = {"photo's latent": z}
            for level in (int(v) for v in args.levels.split(",")):
                strings = codec.compressor.compress(z, level - 1)["strings"]
                hint = codec.compressor.decompress(strings, z.shape[-2:], level - 1)
                latents[f"level {level} hint"] = hint
                latents[f"level {level} step"] = codec.denoise(hint)
            for label, latent in latents.items():
                x_hat = ((codec.vae.decode(latent) + 1) / 2).clamp(0, 1)
                rows.setdefault(label, []).append([grid_texture(x_hat, x, family=f) for f in LATTICE_FAMILIES])
    for label, values in rows.items():
        print(f"{name} | {label} | " + " | ".join(f"{v:+.3f}" for v in np.mean(values, axis=0)))
