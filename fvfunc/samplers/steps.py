"""One-step samplers on the flow: pure functions of (x, v, sigma, sigma_next[, noise]).

    ode (Euler on dx/dsigma = v):   x_next = x + (sigma_next - sigma) * v
        (diffusers' FlowMatchEulerDiscreteScheduler.step, the numerical reference)
    sde (DMD2's few-step sampler):  x0 = x - sigma * v;  x_next = (1 - sigma_next) * x0 + sigma_next * noise
        (Yin et al. 2024, "Improved Distribution Matching Distillation", arXiv:2405.14867: predict x0,
        then re-noise it with fresh noise to the next level; the last step, sigma_next = 0, returns x0)

sigma / sigma_next: a Python float, a 0-d tensor or a [B] tensor (see flow.py). The result has x's
dtype; v and noise are cast to it.
"""

from __future__ import annotations

import torch

from .flow import Sigma, add_noise, per_sample, x0_from_v


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma: Sigma, sigma_next: Sigma) -> torch.Tensor:
    """Euler: x + (sigma_next - sigma) * v."""
    return x + per_sample(sigma_next - sigma, x) * v.to(x.dtype)


def sde_step(x: torch.Tensor, v: torch.Tensor, sigma: Sigma, sigma_next: Sigma,
             noise: torch.Tensor | None) -> torch.Tensor:
    """x0 = x - sigma * v re-noised to sigma_next with `noise`. noise=None is the last step
    (sigma_next = 0): it returns x0, which is also what the formula gives at sigma_next = 0."""
    x0 = x0_from_v(x, v, sigma)
    if noise is None:
        return x0
    return add_noise(x0, noise, sigma_next)
