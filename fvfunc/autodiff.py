"""Turning a pure loss into gradients.

`value_and_grad(loss, transform)` returns `f(params, *args) -> (grads, (loss, aux))` for a loss
`loss(params, *args) -> (scalar, aux)`. Two transforms give the same gradients (tests/test_losses.py):
- "func": `torch.func.grad_and_value`, the JAX-style transform. Eager, it peaks at about twice the
  memory of plain autograd and refuses saved-tensor hooks (so no activation checkpointing).
- "autograd": the same pure loss evaluated on leaves that require grad, differentiated with
  `torch.autograd.grad`; works with `torch.utils.checkpoint` (remat) and keeps memory low.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TRANSFORMS = ("autograd", "func")


def value_and_grad(loss: Callable, transform: str = "autograd") -> Callable:
    if transform == "func":
        def grad_func(params, *args):
            return torch.func.grad_and_value(loss, has_aux=True)(params, *args)
        return grad_func
    if transform != "autograd":
        raise ValueError(f"grad transform must be one of {TRANSFORMS}, got {transform!r}")

    def grad_autograd(params, *args):
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        with torch.enable_grad():
            value, aux = loss(leaves, *args)
            grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        grads = {k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(leaves, grads, strict=True)}
        return grads, (value.detach(), aux)

    return grad_autograd
