"""Closed-form fit of a linear decoder head: a 3x3 convolution followed by a pixel shuffle.

The head maps trunk features f (B,C,h,w) to an image (B,3,s*h,s*w); it is linear in its
weights, so the weights that minimise the squared error to target images are the solution of
ridge-regularised normal equations over the features' 3x3 neighbourhoods:

    P (N, 9C+1): unfolded 3x3 patches (+1 for the bias)   Y (N, 3*s*s): pixel-unshuffled targets
    W = (P'P + ridge * mean(diag(P'P)) * I)^-1 P'Y

Accumulated in float64 over any number of (features, target) pairs, so whole photos of any
size can be used without holding them all.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvHeadLeastSquares:
    """Accumulates the normal equations for `conv` (a k x k convolution, 'same' padding) whose
    output goes through PixelShuffle(`shuffle`); `solve()` writes the fitted weights into it."""

    def __init__(self, conv: nn.Conv2d, shuffle: int, positions: int = 12000, seed: int = 0) -> None:
        k = conv.kernel_size[0]
        if conv.kernel_size != (k, k) or conv.padding != (k // 2, k // 2) or conv.stride != (1, 1) or conv.groups != 1:
            raise ValueError("ConvHeadLeastSquares: need a square, stride-1, 'same'-padded, ungrouped convolution")
        if conv.out_channels != 3 * shuffle * shuffle:
            raise ValueError(f"ConvHeadLeastSquares: {conv.out_channels} output channels, expected 3 * {shuffle}^2")
        self.conv, self.shuffle, self.positions = conv, shuffle, positions
        n = conv.in_channels * k * k + 1
        self.gram = torch.zeros(n, n, dtype=torch.float64)
        self.cross = torch.zeros(n, conv.out_channels, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)
        self.count = 0

    @torch.no_grad()
    def add(self, features: Tensor, target: Tensor) -> None:
        """features (1,C,h,w), target image (1,3,s*h,s*w); up to `positions` random positions used."""
        k = self.conv.kernel_size[0]
        patches = F.unfold(features.float().cpu(), k, padding=k // 2)[0].T  # (h*w, C*k*k)
        patches = torch.cat([patches, torch.ones(patches.shape[0], 1)], dim=1)
        y = F.pixel_unshuffle(target.float().cpu(), self.shuffle)[0].flatten(1).T  # (h*w, 3*s*s)
        if y.shape[0] != patches.shape[0]:
            raise ValueError(f"ConvHeadLeastSquares: target {tuple(target.shape)} does not match features {tuple(features.shape)}")
        if patches.shape[0] > self.positions:
            keep = torch.randperm(patches.shape[0], generator=self.generator)[: self.positions]
            patches, y = patches[keep], y[keep]
        patches, y = patches.double(), y.double()
        self.gram += patches.T @ patches
        self.cross += patches.T @ y
        self.count += patches.shape[0]

    @torch.no_grad()
    def solve(self, ridge: float = 1e-3) -> None:
        """Write the ridge least-squares weights and bias into the convolution."""
        if self.count == 0:
            raise ValueError("ConvHeadLeastSquares: no samples added")
        n = self.gram.shape[0]
        damping = ridge * self.gram.diagonal().mean()
        w = torch.linalg.solve(self.gram + damping * torch.eye(n, dtype=torch.float64), self.cross)  # (n, out)
        conv = self.conv
        conv.weight.copy_(w[:-1].T.reshape(conv.weight.shape).to(conv.weight.dtype))
        if conv.bias is not None:
            conv.bias.copy_(w[-1].to(conv.bias.dtype))
