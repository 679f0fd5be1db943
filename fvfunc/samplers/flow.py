"""Flow matching: the one parametrisation every fvfunc sampler (and loss) uses.

With sigma in [0, 1] and the model's timestep t = 1000 * sigma (Wan2.1, rectified flow: Liu et al.
2022, arXiv:2209.03003; Lipman et al. 2022, arXiv:2210.02747):

    x_t   = (1 - sigma) * x0 + sigma * noise        v     = noise - x0
    x0    = x_t - sigma * v                          noise = x_t + (1 - sigma) * v
    v     = (x_t - x0) / sigma                       (undefined at sigma = 0)

and the timestep shift (Esser et al. 2024, SD3, arXiv:2403.03206 sec. 5.3.2; diffusers' `flow_shift`,
Wan's `sample_shift`), which moves a uniform u in [0, 1] towards the noisy end for s > 1:

    shift(u; s) = s * u / (1 + (s - 1) * u)

`sigma` may be a Python float, a 0-d tensor or a [B] tensor (one sigma per sample, viewed as
[B, 1, ..., 1] against x). Nothing here modifies its inputs.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000
"""t = NUM_TRAIN_TIMESTEPS * sigma is the timestep the model sees."""

Sigma = float | torch.Tensor


def per_sample(sigma: Sigma, x: torch.Tensor) -> Sigma:
    """`sigma` ready to multiply `x` [B, ...]: floats pass through, tensors take x's dtype, and a [B]
    tensor becomes [B, 1, ..., 1] on x's device (a 0-d tensor may stay on the CPU: torch treats it as
    a scalar on any device, which spares a copy per step)."""
    if not isinstance(sigma, torch.Tensor):
        return sigma
    if sigma.ndim == 0:
        return sigma.to(x.dtype)
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must be a float, 0-d or [B] = [{x.shape[0]}], got shape {list(sigma.shape)}")
    return sigma.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))


def x0_from_v(x: torch.Tensor, v: torch.Tensor, sigma: Sigma) -> torch.Tensor:
    """x0 = x_t - sigma * v."""
    return x - per_sample(sigma, x) * v.to(x.dtype)


def noise_from_v(x: torch.Tensor, v: torch.Tensor, sigma: Sigma) -> torch.Tensor:
    """noise = x_t + (1 - sigma) * v."""
    return x + (1 - per_sample(sigma, x)) * v.to(x.dtype)


def v_from_x0(x: torch.Tensor, x0: torch.Tensor, sigma: Sigma) -> torch.Tensor:
    """v = (x_t - x0) / sigma (sigma > 0)."""
    return (x - x0.to(x.dtype)) / per_sample(sigma, x)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: Sigma) -> torch.Tensor:
    """x_t = (1 - sigma) * x0 + sigma * noise. At sigma = 0 this is x0, bitwise."""
    s = per_sample(sigma, x0)
    return (1 - s) * x0 + s * noise.to(x0.dtype)


def shift(u: Sigma, s: float) -> Sigma:
    """shift(u; s) = s * u / (1 + (s - 1) * u): identity at s = 1, fixes 0 and 1."""
    return s * u / (1 + (s - 1) * u)
