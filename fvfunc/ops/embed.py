"""Sinusoidal timestep embedding (Vaswani et al. 2017; DDPM's form as Wan/diffusers use it)."""

from __future__ import annotations

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t w_i), sin(t w_i)] with w_i = max_period^(-i / (dim/2)), i < dim/2; fp32 [B, dim].

    `t` may be fractional (continuous timesteps in [0, 1000])."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
