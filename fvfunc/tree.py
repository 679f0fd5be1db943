"""The few pytree helpers fvfunc needs. A tree here is a flat `dict[str, Tensor]` (a params dict,
a gradient, an optimizer moment); functions never modify their inputs."""

from __future__ import annotations

from collections.abc import Callable

import torch

Params = dict[str, torch.Tensor]


def map(fn: Callable[..., torch.Tensor], tree: Params, *rest: Params) -> Params:  # noqa: A001
    """`{k: fn(tree[k], *(r[k] for r in rest))}`; every tree must have the same keys."""
    for r in rest:
        if r.keys() != tree.keys():
            missing, extra = sorted(tree.keys() - r.keys()), sorted(r.keys() - tree.keys())
            raise KeyError(f"trees differ: missing {missing[:5]}, extra {extra[:5]}")
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def cast(tree: Params, dtype: torch.dtype | None = None, device=None) -> Params:
    """The tree in another dtype and/or on another device (floating tensors only change dtype)."""
    def one(t):
        d = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        return t.to(device=device if device is not None else t.device, dtype=d)
    return {k: one(v) for k, v in tree.items()}


def zeros_like(tree: Params, dtype: torch.dtype | None = None) -> Params:
    return {k: torch.zeros_like(v, dtype=dtype) for k, v in tree.items()}


def clone(tree: Params) -> Params:
    return {k: v.detach().clone() for k, v in tree.items()}


def global_norm(tree: Params) -> torch.Tensor:
    """The L2 norm of all leaves together, in fp32 (a 0-d tensor)."""
    if not tree:
        return torch.zeros(())
    # sorted keys: the norm of the leaves, whatever order the dict holds them in (a resumed run loads its
    # checkpoint's order, a fresh run its model's), so a resume reproduces the logged norm bit for bit
    norms = torch._foreach_norm([tree[k].float() for k in sorted(tree)])
    return torch.linalg.vector_norm(torch.stack(norms))


def allclose(a: Params, b: Params, rtol: float = 1e-5, atol: float = 0.0) -> bool:
    """True when both trees have the same keys and shapes and every leaf is close."""
    if a.keys() != b.keys():
        return False
    return all(a[k].shape == b[k].shape and torch.allclose(a[k].float(), b[k].float(), rtol=rtol, atol=atol)
               for k in a)


def max_rel_error(a: Params, b: Params) -> float:
    """max over leaves of max|a - b| / max|b|: the figure tests report."""
    if a.keys() != b.keys():
        raise KeyError(f"trees differ: {sorted(a.keys() ^ b.keys())[:5]}")
    worst = 0.0
    for k in a:
        diff = (a[k].double() - b[k].double()).abs().max().item()
        scale = b[k].double().abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def equal(a: Params, b: Params) -> bool:
    """Bitwise equality of two trees."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
