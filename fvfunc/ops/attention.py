"""Scaled-dot-product attention with an explicit backend choice.

Layout is [B, S, H, Dh] in and out (the layout Wan's projections produce). `backend`:
- "auto": torch picks (flash / cuDNN / efficient on GPU, its fused CPU kernel on CPU);
- "flash", "efficient", "cudnn": force that fused kernel (GPU only);
- "math": plain softmax(q k^T / sqrt(Dh)) v written out here. It is the one backend every torch.func
  transform differentiates (jvp has no rule for the fused kernels), at O(S^2) memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "math", "flash", "efficient", "cudnn")
_FUSED = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v over [B, S, H, Dh] tensors, no mask."""
    q, k, v = (a.transpose(1, 2) for a in (q, k, v))  # [B, H, S, Dh]
    if backend == "math":
        scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-1, -2)
        out = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
    elif backend == "auto":
        out = F.scaled_dot_product_attention(q, k, v)
    elif backend in _FUSED:
        with sdpa_kernel([_FUSED[backend]]):
            out = F.scaled_dot_product_attention(q, k, v)
    else:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    return out.transpose(1, 2)
