"""A linear layer read from a params dict, with an optional low-rank adapter.

A family's linears go through `linear(x, params, name, dtype)`: `<name>.weight` [out, in] and
`<name>.bias` [out] (optional), and, when the dict also holds `<name>.lora_A.weight` [r, in] and
`<name>.lora_B.weight` [out, r] (PEFT's names), the adapter's term is added unmerged:

    y = x W^T + b + (x A^T) B^T

The adapter's scale (alpha / r) is already in B (fvfunc/lora.py puts it there), so this function
knows nothing of ranks or alphas. Unmerged, the backward pass computes the small gradients of A and
B and never the [out, in] gradient of W (Hu et al. 2021, section 4.2: the merged form costs a full
weight gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LORA_A, LORA_B = "lora_A.weight", "lora_B.weight"


def linear(x: torch.Tensor, params: dict, name: str, dtype: torch.dtype) -> torch.Tensor:
    """x @ W^T + b (+ the adapter's x A^T B^T) in `dtype`, params cast on the fly."""
    bias = params.get(f"{name}.bias")
    y = F.linear(x, params[f"{name}.weight"].to(dtype), None if bias is None else bias.to(dtype))
    a = params.get(f"{name}.{LORA_A}")
    if a is not None:
        y = y + F.linear(F.linear(x, a.to(dtype)), params[f"{name}.{LORA_B}"].to(dtype))
    return y
