"""Normalisations and adaptive modulation (adaLN, Peebles & Xie 2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, weight=None, bias=None, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dim, computed in fp32 (as diffusers' FP32LayerNorm), returned in fp32."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim (Zhang & Sennrich 2019) with a learned scale, in x's dtype."""
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, the adaptive modulation of a normalised activation."""
    return x * (1 + scale) + shift
