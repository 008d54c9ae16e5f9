"""One-step and N-step (DDIM) denoising of the hint latent with the controlled UNet.

Two ways to start (`DecodingConfig.start`):
  "hint"   x_t = sqrt(a_t) * hint + sqrt(1 - a_t) * eps_fixed at the fixed timestep t (osdiff v1);
  "noise"  x_T = eps_fixed, pure fixed-seed Gaussian noise at t = 999: the hint enters only
           through the control branch (the official OSDiff code's one-step decoding).
One UNet evaluation predicts the noise (or v), and x0 follows in closed form. N-step decoding
starts from the same x_t and runs deterministic DDIM (eta = 0) over N evenly spaced timesteps
down to 0 with the same network, so the two differ only in the number of UNet calls.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

def alphas_cumprod_float64(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                           beta_end: float = 0.012) -> np.ndarray:
    """SD/ldm's "scaled linear" schedule computed in float64 exactly as ldm's
    `make_beta_schedule` does: betas = torch.linspace(sqrt(start), sqrt(end), n) ** 2, then
    alpha_bar = cumprod(1 - betas)."""
    betas = (torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2).numpy()
    return np.cumprod(1.0 - betas)


def decoding_alpha_bar(scheduler, t: int, start: str) -> float:
    """Cumulative alpha at timestep t for decoding: start "noise" uses the float64 ldm schedule
    (as the official code does), "hint" the scheduler's float32 table (osdiff v1, unchanged)."""
    sc = scheduler.config
    if start == "noise" and sc.beta_schedule == "scaled_linear":
        return float(alphas_cumprod_float64(sc.num_train_timesteps, sc.beta_start, sc.beta_end)[t])
    return float(scheduler.alphas_cumprod[t])


def decoding_x0_eps(model_output: Tensor, x_t: Tensor, alpha_bar: float, prediction_type: str, start: str) -> tuple[Tensor, Tensor]:
    """(x0, eps) from one network evaluation while decoding; for start "noise" with epsilon
    prediction, x0 with ldm's float64 coefficients (x_t is pure noise there and errors are
    amplified by 1/sqrt(a))."""
    if start == "noise" and prediction_type == "epsilon":
        return x0_from_eps_ldm(x_t, model_output, alpha_bar), model_output
    return predict_x0_eps(model_output, x_t, alpha_bar, prediction_type)


def x0_from_eps_ldm(x_t: Tensor, eps: Tensor, alpha_bar: float) -> Tensor:
    """x0 = sqrt(1/a) * x_t - sqrt(1/a - 1) * eps with both coefficients computed in float64
    and rounded to the tensors' dtype first, as ldm's `predict_start_from_noise` does."""
    c1 = torch.tensor(np.sqrt(1.0 / alpha_bar), dtype=x_t.dtype, device=x_t.device)
    c2 = torch.tensor(np.sqrt(1.0 / alpha_bar - 1.0), dtype=x_t.dtype, device=x_t.device)
    return c1 * x_t - c2 * eps


def fixed_noise(shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Noise that depends only on (shape, seed): drawn on the CPU, then moved."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def add_noise(x0: Tensor, noise: Tensor, alpha_bar: float) -> Tensor:
    """Forward diffusion q(x_t | x0) for one cumulative alpha."""
    return alpha_bar**0.5 * x0 + (1.0 - alpha_bar) ** 0.5 * noise


def predict_x0_eps(model_output: Tensor, x_t: Tensor, alpha_bar: float, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x0, eps) from the network output for 'epsilon' or 'v_prediction' models."""
    a, s = alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5
    if prediction_type == "epsilon":
        eps = model_output
        return (x_t - s * eps) / a, eps
    if prediction_type == "v_prediction":
        return a * x_t - s * model_output, s * x_t + a * model_output
    if prediction_type == "sample":
        x0 = model_output
        return x0, (x_t - a * x0) / s
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def ddim_timesteps(start: int, steps: int) -> list[int]:
    """`steps` evenly spaced integer timesteps from `start` down towards 0 (start first)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    return [round(start - i * start / steps) for i in range(steps)]
