"""Where the one-step output's added texture and colour error come from: each photo coded at a
few levels, then the decoded hint (`--steps 0`), the one-step output, and the step's output with
its low frequencies replaced by the hint's (a k x k latent box blur, "mix k"), and blends
hint + b x (step - hint) ("blend b": a realism knob), each decoded by the model's decoder and
(unless --model-decoder-only) by TAEF2's own, measured with PSNR, delta_e, spurious_texture,
LPIPS-Alex and DISTS (means over the photos).

    python scripts/step_diagnosis.py ../shared/data/images/mcmaster ../shared/data/images/cbsd68 --limit 4
"""
import argparse

import numpy as np
import torch
import torch.nn.functional as F

import osdiff
from osdiff.imageio import find_images, open_image, to_tensor
from osdiff.models.taesd import TAESDAutoencoder
from osdiff.quality.artifacts import delta_e, spurious_texture
from osdiff.quality.dists import pretrained_dists
from osdiff.quality.lpips import pretrained_lpips
from osdiff.quality.pixel import psnr

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("folders", nargs="+")
parser.add_argument("--limit", type=int, default=4, help="photos per folder")
parser.add_argument("--model", default="osdiff-tiny")
parser.add_argument("--levels", default="2,3,5", help="1-based quality levels")
parser.add_argument("--mix", default="3,9", help="box sizes (latent pixels) of the low-pass mixes ('' for none)")
parser.add_argument("--blend", default="", help="weights b of the step in the blends, e.g. 0.5,0.75")
parser.add_argument("--model-decoder-only", action="store_true", help="not TAEF2's decoder too (a model that ships it)")
args = parser.parse_args()
codec = osdiff.load(args.model)
codec._prepare()
taef2 = TAESDAutoencoder.from_pretrained(osdiff.hub.WEIGHTS_DIR / "taef2" / "vae").float()
lpips, dists = pretrained_lpips("alex"), pretrained_dists()


def blur(z: torch.Tensor, k: int) -> torch.Tensor:
    pad = (k // 2, k - 1 - k // 2) * 2
    return F.avg_pool2d(F.pad(z, pad, mode="replicate"), k, stride=1)


def decoders(latent: torch.Tensor) -> dict:
    raw = latent * codec.vae.std + codec.vae.mean
    out = {"model": codec.vae.decode(latent)}
    if not args.model_decoder_only:
        out["taef2"] = taef2.decode_raw(raw)
    return out


rows: dict = {}
for path in [p for folder in args.folders for p in find_images(folder)[: args.limit]]:
    x = to_tensor(open_image(path))
    x = x[..., : x.shape[-2] // 64 * 64, : x.shape[-1] // 64 * 64]
    with torch.no_grad():
        z = codec.vae.encode(x * 2 - 1)
        for level in (int(v) for v in args.levels.split(",")):
            strings = codec.compressor.compress(z, level - 1)["strings"]
            hint = codec.compressor.decompress(strings, z.shape[-2:], level - 1)
            step = codec.denoise(hint)
            latents = {"hint": hint, "step": step}
            latents.update({f"mix {k}": step - blur(step, k) + blur(hint, k) for k in (int(v) for v in args.mix.split(",") if v)})
            latents.update({f"blend {b}": hint + float(b) * (step - hint) for b in args.blend.split(",") if b})
            for name, latent in latents.items():
                for decoder, image in decoders(latent).items():
                    x_hat = ((image + 1) / 2).clamp(0, 1)
                    rows.setdefault((level, name, decoder), []).append(
                        (psnr(x_hat, x), delta_e(x_hat, x), spurious_texture(x_hat, x), lpips(x_hat, x).item(),
                         dists(x_hat, x).item()))
print("level | latent | decoder | PSNR | delta_e | spurious_texture | LPIPS-Alex | DISTS")
for (level, name, decoder), values in rows.items():
    m = np.mean(values, axis=0)
    print(f"{level} | {name} | {decoder} | {m[0]:.2f} | {m[1]:.2f} | {m[2]:.3f} | {m[3]:.4f} | {m[4]:.4f}")
