"""Bit-exact entropy parameters, so a file decodes identically on every machine.

The bitstream depends on the entropy parameters (means and scales of the Gaussian
conditionals, chosen by the hyper-synthesis and the context networks): if the decoder's
float arithmetic differed from the encoder's by one ulp where a scale sits on a table
boundary, it would pick another CDF and the rANS stream would derail. Different thread
counts, CPUs and libraries do differ in float summation order.

So, while coding, those networks run in fixed point inside float64: activations are rounded
to multiples of 2^-10 and clamped to |a| <= 2^10, weights rounded to multiples of 2^-16 and
clamped to |w| <= 16, biases to multiples of 2^-26. Every product is then an integer multiple
of 2^-26 below 2^40 units, and a sum of fewer than 2^13 of them stays below 2^53, where float64
is exact: the result is the same whatever the summation order, thread count or BLAS, on any
IEEE-754 machine. Convolutions run on the CPU in float64 (im2col + GEMM, no Winograd/FFT).
Training uses the ordinary float32 networks; the rounding changes them by < 0.1 %.

GELU (the official LFGCM's entropy networks) runs as a lookup: its input is rounded to the
activation grid first, and GELU of each grid point in [-8, 8] is a fixed table of multiples of
2^-10 (`gelu_grid_table`; beyond, GELU(x) is x or 0 on this grid). The table is computed once
in float64 and no entry lies within 1e-9 of a rounding tie (tested), so any libm gives the
same integers.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACT_FRAC, ACT_LIMIT = 10, 2.0**10
W_FRAC, W_LIMIT = 16, 16.0
MAX_FAN_IN = 2**13 - 1


def to_grid(x: Tensor, frac: int, limit: float) -> Tensor:
    """Round to multiples of 2^-frac and clamp to [-limit, limit], in float64."""
    scale = float(2**frac)
    return torch.round(x.double() * scale).clamp_(-limit * scale, limit * scale) / scale


def fan_in(conv: nn.Conv2d | nn.ConvTranspose2d) -> int:
    """Most products summed into one output value."""
    kh, kw = conv.kernel_size
    if isinstance(conv, nn.ConvTranspose2d):
        sh, sw = conv.stride
        return conv.in_channels // conv.groups * -(-kh // sh) * -(-kw // sw)
    return conv.in_channels // conv.groups * kh * kw


GELU_RANGE = 8  # |x| > 8: GELU(x) on the 2^-10 grid is x (x > 0) or 0
_GELU_TABLE: Tensor | None = None


def gelu_grid_table() -> Tensor:
    """GELU at every multiple of 2^-10 in [-8, 8], rounded to the same grid (float64, 16385)."""
    global _GELU_TABLE
    if _GELU_TABLE is None:
        scale = float(2**ACT_FRAC)
        x = torch.arange(-GELU_RANGE * 2**ACT_FRAC, GELU_RANGE * 2**ACT_FRAC + 1, dtype=torch.float64) / scale
        _GELU_TABLE = torch.round(0.5 * x * (1.0 + torch.erf(x / 2.0**0.5)) * scale) / scale
    return _GELU_TABLE


def exact_gelu(x: Tensor) -> Tensor:
    """GELU on the activation grid, identical on every machine (float64 in, float64 out)."""
    a = torch.round(x.double() * 2**ACT_FRAC)
    inside = a.abs() <= GELU_RANGE * 2**ACT_FRAC
    idx = (a.clamp(-GELU_RANGE * 2**ACT_FRAC, GELU_RANGE * 2**ACT_FRAC) + GELU_RANGE * 2**ACT_FRAC).long()
    table = gelu_grid_table().to(x.device)[idx]
    return torch.where(inside, table, torch.relu(a) / 2**ACT_FRAC)


def exact_forward(module: nn.Module, x: Tensor) -> Tensor:
    """Run a Sequential of Conv2d / ConvTranspose2d / (Leaky)ReLU / GELU in exact fixed point (float64)."""
    if isinstance(module, nn.Sequential):
        for layer in module:
            x = exact_forward(layer, x)
        return x
    if isinstance(module, nn.ReLU):
        return torch.relu(x)
    if isinstance(module, nn.GELU):
        return exact_gelu(x)
    if isinstance(module, nn.LeakyReLU):  # one IEEE multiply per element: the same everywhere
        return F.leaky_relu(x, module.negative_slope)
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        if fan_in(module) > MAX_FAN_IN:
            raise ValueError(f"fan-in {fan_in(module)} too large for exact fixed point")
        device = x.device
        weight = module.weight * module.mask if hasattr(module, "mask") else module.weight
        w = to_grid(weight.detach().cpu(), W_FRAC, W_LIMIT)
        b = None if module.bias is None else to_grid(module.bias.detach().cpu(), W_FRAC + ACT_FRAC, W_LIMIT)
        a = to_grid(x.detach().cpu(), ACT_FRAC, ACT_LIMIT)
        if isinstance(module, nn.ConvTranspose2d):
            out = F.conv_transpose2d(a, w, b, module.stride, module.padding, module.output_padding, module.groups, module.dilation)
        else:
            out = F.conv2d(a, w, b, module.stride, module.padding, module.dilation, module.groups)
        return out.to(device)
    raise TypeError(f"exact fixed point does not support {type(module).__name__}")


@contextmanager
def exact_modules(modules: list[nn.Module], output_dtype: torch.dtype | None = None) -> Iterator[None]:
    """Within the block, calling any of `modules` runs `exact_forward` instead (its float64
    result cast to `output_dtype` if given, for callers that expect the model's dtype)."""
    saved = []
    try:
        for m in modules:
            saved.append((m, m.__dict__.get("forward")))
            m.forward = (lambda mod: (lambda x: _cast(exact_forward(mod, x), output_dtype)))(m)
        yield
    finally:
        for m, original in saved:
            if original is None:
                del m.forward
            else:
                m.forward = original


def _cast(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    return x if dtype is None else x.to(dtype)
