"""Comparing a converted official model with the official code's outputs: used by
scripts/check_official.py (against the official modules) and tests/test_official.py (against
the committed fixture of their outputs)."""
from __future__ import annotations

import torch

# maximum absolute differences; x0 carries the 1/sqrt(alpha_bar_999) = 14.6 gain of epsilon's
TOL = {"y_hat": 1e-6, "y_hat_from_official_strings": 1e-6, "hint": 1e-6, "eps": 1e-5, "x0": 14.6 * 1e-5 * 2,
       "image": 1e-3, "pixels": 1, "embedding": 1e-5}


@torch.no_grad()
def compare(pipe, ref: dict) -> dict[str, float]:
    """Maximum absolute differences between osdiff (`pipe`, a converted model) and the
    official outputs `ref` (tensors from run_official)."""
    from osdiff.models.official.cddm import controlled_unet_forward

    lfgcm = pipe.levels.compressors[0]
    z_shape = tuple(int(v) for v in ref["z_shape"])
    strings = [bytes(ref["y_string"].numpy()), bytes(ref["z_string"].numpy())]
    diffs: dict[str, float] = {}
    ours = lfgcm.compress(ref["ref"], exact=False)
    diffs["strings_equal"] = float(ours["strings"] == strings)
    diffs["y_hat"] = (ours["y_hat"] - ref["y_hat"]).abs().max().item()
    y_hat = lfgcm.decompress_y(strings, z_shape, exact=False)
    diffs["y_hat_from_official_strings"] = (y_hat - ref["y_hat"]).abs().max().item()
    hint = lfgcm.decoder(y_hat)
    diffs["hint"] = (hint - ref["hint"]).abs().max().item()
    latent = pipe.encode_latent(ref["padded"].float() / 255)
    diffs["vae_latent"] = (latent - ref["ref"]).abs().max().item()
    diffs["embedding"] = (pipe.conditioning.embedding - ref["context"]).abs().max().item()
    t = torch.full((1,), 999, dtype=torch.long)
    eps = controlled_unet_forward(pipe.levels.controls[0], pipe.unet, ref["x_t"], t, ref["context"], ref["hint"])
    diffs["eps"] = (eps - ref["eps"]).abs().max().item()
    x0 = pipe.denoise(hint, 1, x_t=ref["x_t"])
    diffs["x0"] = (x0 - ref["x0"]).abs().max().item()
    decoded = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample
    diffs["image"] = (((decoded + 1) / 2).clamp(0, 1) - ref["image"]).abs().max().item()
    pixels = torch.round(pipe.decode_hint(hint, 1, x_t=ref["x_t"]) * 255).to(torch.int16)
    diffs["pixels"] = (pixels - ref["pixels"].to(torch.int16)).abs().max().item()
    return diffs


def failures(diffs: dict[str, float]) -> list[str]:
    """Names of the differences over their tolerance (and unequal strings)."""
    bad = [k for k, tol in TOL.items() if diffs[k] > tol]
    return bad + (["strings_equal"] if diffs["strings_equal"] != 1.0 else [])
