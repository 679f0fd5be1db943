"""Functional optimizer pieces over params dicts, optax style: AdamW as an `(init, update)` pair,
LR schedules as functions of the step, global-norm clipping and EMA as pure functions.

Nothing here modifies its inputs: every result lives in fresh buffers (the in-place ops below only
ever touch tensors this module just allocated), unless the caller donates them to `adamw`'s update.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from fvfunc import tree
from fvfunc.tree import Params

Schedule = Callable[[int], float]


class AdamWState(NamedTuple):
    step: torch.Tensor  # 0-d int64 on CPU: updates taken so far
    mu: Params  # first moment, fp32, on the params' device
    nu: Params  # second moment, fp32, on the params' device


class Optimizer(NamedTuple):
    init: Callable[[Params], AdamWState]
    update: Callable[[Params, AdamWState, Params], tuple[Params, AdamWState]]  # (grads, state, params)


def _check_keys(what: str, got: Params, params: Params) -> None:
    if got.keys() != params.keys():
        missing, extra = sorted(params.keys() - got.keys()), sorted(got.keys() - params.keys())
        raise KeyError(f"{what} keys differ from params: missing {missing[:5]}, extra {extra[:5]}")


def adamw(lr: float | Schedule, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.01, *, fused: bool | None = None, donate: bool = False) -> Optimizer:
    """torch.optim.AdamW as a pure `(init, update)` pair. `lr` is a float or a schedule called with
    the number of updates taken before this one (the first update uses `lr(0)`, like LambdaLR).
    Grads of any float dtype are cast to fp32 (the moments' dtype); new params keep their dtype.

    fused: one kernel per update (torch's fused AdamW, `torch.optim.AdamW(fused=True)`) instead of a
    chain of `_foreach` ops; None picks it for CUDA params.
    donate: the update may write the new params and moments into the buffers of the ones it is given,
    as `jax.jit(..., donate_argnums=...)` does: the caller must not use the params or state it passed
    in afterwards. This halves the optimizer's peak memory (no second copy of params and moments).
    """
    schedule = lr if callable(lr) else constant(lr)
    beta1, beta2 = betas

    def init(params: Params) -> AdamWState:
        return AdamWState(torch.zeros((), dtype=torch.int64),
                          tree.zeros_like(params, torch.float32), tree.zeros_like(params, torch.float32))

    @torch.no_grad()
    def update(grads: Params, state: AdamWState, params: Params) -> tuple[Params, AdamWState]:
        _check_keys("grads", grads, params)
        _check_keys("optimizer state", state.mu, params)
        keys = list(params)
        step = int(state.step)
        lr_t = float(schedule(step))
        g = [grads[k].float() for k in keys]  # may alias the inputs: read only
        # the buffers the update writes: fresh copies, or the inputs themselves when donated
        p = [params[k].to(torch.float32, copy=not donate) for k in keys]
        mu = [state.mu[k] if donate else state.mu[k].clone() for k in keys]
        nu = [state.nu[k] if donate else state.nu[k].clone() for k in keys]
        t = step + 1
        use_fused = fused if fused is not None else bool(p) and p[0].is_cuda
        if use_fused:
            steps = [torch.full((), float(t), device=p[0].device)] * len(p)
            torch._fused_adamw_(p, g, mu, nu, [], steps, lr=lr_t, beta1=beta1, beta2=beta2,
                                weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
        else:
            # Loshchilov & Hutter 2019 (decoupled weight decay), op for op as torch.optim.adam's
            # _multi_tensor_adam: p *= 1 - lr*wd; m = lerp(m, g, 1-b1); v = b2*v + (1-b2)*g^2;
            # p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps), with t = step + 1.
            torch._foreach_mul_(p, 1.0 - lr_t * weight_decay)
            torch._foreach_lerp_(mu, g, 1.0 - beta1)
            torch._foreach_mul_(nu, beta2)
            torch._foreach_addcmul_(nu, g, g, value=1.0 - beta2)
            step_size = -lr_t / (1.0 - beta1**t)
            denom = torch._foreach_sqrt(nu)
            torch._foreach_div_(denom, (1.0 - beta2**t) ** 0.5)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(p, mu, denom, value=step_size)
        new_params = {k: v.to(params[k].dtype) for k, v in zip(keys, p, strict=True)}
        new_state = AdamWState(state.step + 1, dict(zip(keys, mu, strict=True)),
                               dict(zip(keys, nu, strict=True)))
        return new_params, new_state

    return Optimizer(init, update)


def state_to_tree(state: AdamWState) -> dict[str, torch.Tensor]:
    """A flat tree for safetensors: "step", "mu/<param>", "nu/<param>"."""
    return {"step": state.step, **{f"mu/{k}": v for k, v in state.mu.items()},
            **{f"nu/{k}": v for k, v in state.nu.items()}}


def state_from_tree(flat: dict[str, torch.Tensor]) -> AdamWState:
    """Inverse of `state_to_tree`."""
    mu = {k[3:]: v for k, v in flat.items() if k.startswith("mu/")}
    nu = {k[3:]: v for k, v in flat.items() if k.startswith("nu/")}
    unknown = sorted(k for k in flat if k != "step" and not k.startswith(("mu/", "nu/")))
    if "step" not in flat or unknown or mu.keys() != nu.keys():
        raise KeyError(f"not an AdamW state tree: step present={'step' in flat}, unknown keys "
                       f"{unknown[:5]}, mu/nu differ on {sorted(mu.keys() ^ nu.keys())[:5]}")
    return AdamWState(flat["step"].to("cpu", torch.int64).reshape(()), mu, nu)


# ---- learning-rate schedules: step (updates taken so far, from 0) -> lr ----

def constant(lr: float) -> Schedule:
    """lr at every step."""
    return lambda step: lr


def linear_warmup(lr: float, warmup_steps: int) -> Schedule:
    """lr * (step + 1) / warmup_steps while step < warmup_steps, then lr (so step 0 is not 0)."""
    if warmup_steps <= 0:
        return constant(lr)
    return lambda step: lr * min(1.0, (step + 1) / warmup_steps)


def cosine(lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Schedule:
    """`linear_warmup`, then with progress = (step - warmup_steps) / (total_steps - warmup_steps)
    clamped to [0, 1]: lr * (min_ratio + (1 - min_ratio) * (1 + cos(pi * progress)) / 2), which is lr at
    warmup_steps and lr * min_ratio from total_steps on."""
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"cosine needs 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}")
    warm = linear_warmup(lr, warmup_steps)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return warm(step)
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))

    return schedule


def make_schedule(name: str, lr: float, warmup_steps: int = 0, total_steps: int = 0,
                  min_ratio: float = 0.0) -> Schedule:
    """The schedule called `name` ("constant" | "linear_warmup" | "cosine"); unused arguments ignored."""
    if name == "constant":
        return constant(lr)
    if name == "linear_warmup":
        return linear_warmup(lr, warmup_steps)
    if name == "cosine":
        return cosine(lr, warmup_steps, total_steps, min_ratio)
    raise ValueError(f"unknown schedule {name!r}; expected 'constant', 'linear_warmup' or 'cosine'")


# ---- gradient clipping and EMA ----

@torch.no_grad()
def clip_by_global_norm(grads: Params, max_norm: float) -> tuple[Params, torch.Tensor]:
    """(grads * min(1, max_norm / (norm + 1e-6)), norm) as torch.nn.utils.clip_grad_norm_ computes it;
    norm is the fp32 global L2 norm (0-d). max_norm <= 0 skips the clipping."""
    norm = tree.global_norm(grads)
    if max_norm <= 0:
        return dict(grads), norm
    # a tensor scale, not a Python float: no host sync when grads are on an accelerator
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    keys = list(grads)
    clipped = torch._foreach_mul([grads[k] for k in keys], scale)
    return dict(zip(keys, clipped, strict=True)), norm


@torch.no_grad()
def ema_init(params: Params) -> Params:
    """An EMA's starting point: a fp32 copy of the params."""
    return {k: v.detach().float().clone() for k, v in params.items()}


def ema_update(ema: Params, params: Params, decay: float) -> Params:
    """ema * decay + params * (1 - decay), in fp32 (a lerp from ema towards params)."""
    _check_keys("ema", ema, params)
    keys = list(params)
    new = torch._foreach_lerp([ema[k].float() for k in keys], [params[k].float() for k in keys], 1.0 - decay)
    return dict(zip(keys, new, strict=True))


def for_role(training, lr: float, betas, weight_decay: float, total_updates: int) -> tuple[Optimizer, Schedule]:
    """(AdamW, its schedule) of one role from the run's TrainingConfig: the run's schedule shape scaled
    to peak `lr`, over the role's own update count."""
    schedule = make_schedule(training.lr_schedule, lr, training.warmup_steps, total_updates, training.min_lr_ratio)
    return adamw(schedule, tuple(betas), training.eps, weight_decay, donate=training.donate), schedule


def apply_gradients(opt: Optimizer, params: Params, grads: Params, state: AdamWState, max_grad_norm: float,
                    reduce: Callable[[Params], Params] | None = None) -> tuple[Params, AdamWState, torch.Tensor]:
    """Average over data-parallel ranks (`reduce`, None for one process), clip to a global norm, then
    one optimizer step: (params, state, grad_norm)."""
    if reduce is not None:
        grads = reduce(grads)
    grads, norm = clip_by_global_norm(grads, max_grad_norm)
    params, state = opt.update(grads, state, params)
    return params, state, norm
