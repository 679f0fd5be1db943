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


def split_batch(batch: dict, n: int) -> list[dict]:
    """n equal micro-batches of a batch dict (tensors and lists split along the first axis)."""
    size = len(batch["sample_index"])
    if size % n:
        raise ValueError(f"batch of {size} cannot be split into {n} equal micro-batches")
    m = size // n
    return [{k: v[i * m:(i + 1) * m] for k, v in batch.items()} for i in range(n)]


def accumulate(loss: Callable, transform: str, params: dict, batch: dict, n: int, *args):
    """(mean gradient, mean loss) of `loss(params, micro_batch, *args) -> (scalar, aux)` over n equal
    micro-batches: one batch's gradient, with 1/n of its activation memory."""
    grad_fn = value_and_grad(loss, transform)
    total, total_loss = None, 0.0
    for micro in split_batch(batch, n):
        grads, (value, _) = grad_fn(params, micro, *args)
        total = grads if total is None else {k: total[k] + grads[k] for k in total}
        total_loss = total_loss + value.detach()
    if n > 1:
        total = {k: g / n for k, g in total.items()}
    return total, total_loss / n
