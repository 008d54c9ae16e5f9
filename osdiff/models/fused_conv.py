"""Convolution + ReLU (and + residual) in one oneDNN call, for bfloat16 inference on the CPU.

In bfloat16 under torch.autocast on 2 CPU cores, a TAESD block's separate ReLUs and residual add
cost about half as much as its convolutions (memory traffic: TAEF2's encoder at 512x768 spent 64 ms
in ReLU and 28 ms in adds against 165 ms in convolutions). oneDNN applies them inside the
convolution instead. torch exposes that as `torch.ops.mkldnn._convolution_pointwise`, the op its
compiler (inductor) emits for the same fusion; it is used here only where it applies: the CPU,
no gradient, autocast to bfloat16, and the op present with oneDNN's bfloat16 kernels. Elsewhere the callers run the plain modules.
The fused residual sum is rounded to bfloat16 once instead of twice, so it is, if anything, closer
to float32 (tests/test_precision.py compares the two).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn


@functools.cache
def onednn_bf16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions on this CPU (AVX512 or newer; not on AVX2-only
    CPUs, where plain autocast falls back to torch's own slower kernels)."""
    ops = torch.ops.mkldnn
    return hasattr(ops, "_convolution_pointwise") and hasattr(ops, "_is_mkldnn_bf16_supported") and ops._is_mkldnn_bf16_supported()


def fusable(x: Tensor) -> bool:
    """Whether the fused path applies to input `x` here and now (see the module docstring)."""
    return (x.device.type == "cpu" and not torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and onednn_bf16())


def _args(conv: nn.Conv2d) -> tuple:
    dtype = torch.bfloat16
    bias = None if conv.bias is None else conv.bias.to(dtype)
    return conv.weight.to(dtype), bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def conv_relu(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """relu(conv(x)) in bfloat16, one oneDNN primitive (`fusable(x)` must hold)."""
    weight, bias, padding, stride, dilation, groups = _args(conv)
    return torch.ops.mkldnn._convolution_pointwise(x.to(torch.bfloat16), weight, bias, padding, stride, dilation, groups,
                                                   "relu", [], "")


def conv_add_relu(conv: nn.Conv2d, x: Tensor, other: Tensor) -> Tensor:
    """relu(conv(x) + other) in bfloat16, one oneDNN primitive (`fusable(x)` must hold)."""
    weight, bias, padding, stride, dilation, groups = _args(conv)
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x.to(torch.bfloat16), other.to(torch.bfloat16), weight, bias, padding, stride, dilation, groups,
        "add", None, "relu", [], "")


__all__ = ["conv_add_relu", "conv_relu", "fusable", "onednn_bf16"]
