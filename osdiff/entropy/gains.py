"""Gain vectors between quality levels, computed identically on every machine.

A variable-rate compressor holds one gain vector (and one inverse gain) per quality level. A
quality between levels l and l+1, at fraction t = k/256, uses the geometric interpolation of
asymmetric gained compression (Cui et al. 2021), per channel:

    g(t) = g_l^(1-t) * g_(l+1)^t = g_l * (g_(l+1) / g_l)^t

The inverse gains scale the hyper-latent that the entropy-parameter networks read, so the
decoder must get exactly the encoder's numbers. `pow`/`exp`/`log` are not correctly rounded and
differ between math libraries; here only IEEE-754 operations that are (division, square root,
multiplication, in a fixed order, float64) are used: r^(1/256) is eight square roots, r^k a
fixed square-and-multiply chain. The result is then rounded to a multiple of 2^-16 (the exact
fixed-point weight grid, osdiff.entropy.exact), which float32 holds exactly, so a last-ulp
difference could only matter for a value within 1e-16 of a grid midpoint. Where the two
levels' gains differ in sign or one is zero, the interpolation is linear, a + (b - a) t.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .bitstream import QUALITY_STEPS
from .exact import W_FRAC

_ROOTS = QUALITY_STEPS.bit_length() - 1  # r^(1/256) = eight square roots
assert 2**_ROOTS == QUALITY_STEPS


def interpolate_gains(low: Tensor, high: Tensor, k: int) -> Tensor:
    """Gains at fraction k/256 (0 < k < 256) of the way from `low` to `high` (same shape),
    geometrically, rounded to multiples of 2^-16; returned in `low`'s dtype and device."""
    if not 0 < k < QUALITY_STEPS:
        raise ValueError(f"k must be 1..{QUALITY_STEPS - 1}, got {k}")
    a = low.detach().cpu().double().numpy()
    b = high.detach().cpu().double().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = b / a
    geometric = (a != 0) & (ratio > 0) & np.isfinite(ratio)
    root = np.where(geometric, ratio, 1.0)
    for _ in range(_ROOTS):
        root = np.sqrt(root)
    power, base, e = np.ones_like(root), root, k
    while e:  # square-and-multiply, always the same chain for the same k
        if e & 1:
            power = power * base
        base = base * base
        e >>= 1
    linear = a + (b - a) * (k / QUALITY_STEPS)  # k/256 is exact
    out = np.where(geometric, a * power, linear)
    out = np.round(out * 2.0**W_FRAC) / 2.0**W_FRAC
    return torch.from_numpy(out).to(dtype=low.dtype, device=low.device)
