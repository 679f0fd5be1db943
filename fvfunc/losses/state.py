"""What every method shares: the train state, the (init, step) pair, and the pure update of a role.

A method is `Method(init, step)`, like an optax transformation: `init(params, key) -> TrainState`
and `step(state, batch) -> (state, metrics)`. Both are pure in the sense that matters for a trainer:
inputs are never modified, and the result depends only on the arguments (randomness comes from
`fold_in(state.key, state.step)`), so resuming from a saved state is exact by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from fvfunc import optim, random
from fvfunc.autodiff import value_and_grad

Params = dict[str, torch.Tensor]
Apply = Callable[[Params, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""apply(params, x, t, context) -> v: a family's apply with its config, dtype and backend bound."""


class Model(NamedTuple):
    apply: Apply
    latent_channels: int


class TrainState(NamedTuple):
    step: int
    """Steps taken (the next step's number)."""
    key: torch.Tensor
    """The run's root key; step s draws from fold_in(key, s)."""
    params: dict[str, Params]
    """Every role's params, frozen ones included."""
    opt: dict[str, optim.AdamWState]
    """Optimizer state of each trainable role."""
    ema: Params | None
    """EMA of the student's params, or None."""


class Method(NamedTuple):
    init: Callable[[dict[str, Params], torch.Tensor], TrainState]
    step: Callable[[TrainState, dict], tuple[TrainState, dict]]


def make_optimizer(training, lr: float, betas, weight_decay: float, total_updates: int):
    """(AdamW, its schedule) with the run's schedule shape scaled to peak `lr`; the schedule's step
    is the role's own update count."""
    schedule = optim.make_schedule(training.lr_schedule, lr, training.warmup_steps, total_updates,
                                   training.min_lr_ratio)
    return optim.adamw(schedule, tuple(betas), training.eps, weight_decay, donate=training.donate), schedule


def split_batch(batch: dict, n: int) -> list[dict]:
    """n equal micro-batches of a batch dict (tensors and lists split along the first axis)."""
    size = len(batch["sample_index"])
    if size % n:
        raise ValueError(f"batch of {size} cannot be split into {n} equal micro-batches")
    m = size // n
    return [{k: v[i * m:(i + 1) * m] for k, v in batch.items()} for i in range(n)]


def accumulate(loss: Callable, transform: str, params: Params, batch: dict, n: int, *args):
    """Mean gradient and mean loss of `loss(params, micro_batch, *args) -> (scalar, aux)` over n
    equal micro-batches: one batch's gradient, with 1/n of its activation memory."""
    grad_fn = value_and_grad(loss, transform)
    total, total_loss = None, 0.0
    for micro in split_batch(batch, n):
        grads, (value, _) = grad_fn(params, micro, *args)
        total = grads if total is None else {k: total[k] + grads[k] for k in total}
        total_loss = total_loss + value.detach()
    if n > 1:
        total = {k: g / n for k, g in total.items()}
    return total, total_loss / n


def update(opt: optim.Optimizer, params: Params, grads: Params, opt_state, max_grad_norm: float,
           reduce: Callable[[Params], Params] | None = None):
    """Average over data-parallel ranks (`reduce`, None for one process), clip to a global norm, then
    one optimizer step: (params, opt_state, grad_norm)."""
    if reduce is not None:
        grads = reduce(grads)
    grads, norm = optim.clip_by_global_norm(grads, max_grad_norm)
    params, opt_state = opt.update(grads, opt_state, params)
    return params, opt_state, norm


def sample_keys(key: torch.Tensor, sample_index) -> list[torch.Tensor]:
    """One key per sample from its global index in the step's batch, so a sample's noise does not
    depend on how the batch is split into micro-batches or ranks."""
    return [random.fold_in(key, int(i)) for i in sample_index]
