"""Expert pairs: one role made of two models routed by the noise level (Wan2.2 A14B's MoE).

Wan2.2 A14B is two transformers of one architecture: `transformer/` denoises the high-noise steps and
`transformer_2/` the low-noise ones, switched at `boundary_ratio` of model_index.json. diffusers'
WanPipeline picks, at each step's timestep t,

    t >= boundary_ratio * num_train_timesteps  ->  transformer      (guidance_scale)
    otherwise                                  ->  transformer_2    (guidance_scale_2, default guidance_scale)

A pair is plain data here: `Experts(names, boundary, configs)` and ONE flat params dict whose keys are
`<expert>/<param>` ("transformer/blocks.0.attn1.to_q.weight", "transformer_2/..."), so everything that
walks a params dict (checkpoints, EMA, sharding pieces, resume) treats a pair as one tree. The routing
is `route(t, boundary)`, a pure function of the timestep, applied per sample: a batch whose samples sit
on both sides of the boundary (DMD2's per-sample steps, finetune's per-sample noise levels) runs each
expert on its own samples only.

Each expert keeps its own AdamW state (`opt_init`, `apply_gradients`): a step updates an expert only
when some sample of the global batch was routed to it, clips its gradient on its own and counts its
own steps for the bias correction, so each expert trains as if it were alone on its noise range.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from fvfunc import optim
from fvfunc.samplers import NUM_TRAIN_TIMESTEPS

SEP = "/"
"""Between an expert's name and its param's name in a pair's flat params dict."""


class Experts(NamedTuple):
    """An expert pair: which experts (high noise first), where it switches, each expert's model config."""

    names: tuple[str, ...]
    """The experts' names, the pipeline's folders: ("transformer", "transformer_2"), high noise first."""
    boundary: float
    """boundary_ratio: timesteps t >= boundary * 1000 go to names[0], the others to names[1]."""
    configs: tuple[Any, ...] = ()
    """Each expert's model config (the family's), in names' order."""


def route(t: torch.Tensor, boundary: float) -> torch.Tensor:
    """The expert index [B] (0: high noise, 1: low noise) of timesteps t [B], WanPipeline's rule, compared
    in float32 as torch compares its timestep tensor with the Python boundary (so every caller, whatever
    t's dtype, routes a timestep alike)."""
    return (t.to(torch.float32) < torch.tensor(boundary * NUM_TRAIN_TIMESTEPS, dtype=torch.float32)).long()


def hit(t: torch.Tensor, experts: Experts) -> tuple[str, ...]:
    """The experts that timesteps t (of a whole global batch) are routed to, in names' order."""
    which = set(route(torch.as_tensor(t, dtype=torch.float64).flatten(), experts.boundary).tolist())
    return tuple(n for i, n in enumerate(experts.names) if i in which)


def split(params: dict, names: Sequence[str]) -> dict[str, dict]:
    """{expert: its params under their own names} of a pair's flat dict (views, no copies)."""
    out = {n: {} for n in names}
    for k, v in params.items():
        name, _, rest = k.partition(SEP)
        if name not in out or not rest:
            raise KeyError(f"{k!r} is not an expert's param (<expert>{SEP}<name>, experts {list(names)})")
        out[name][rest] = v
    return out


def join(trees: dict[str, dict]) -> dict:
    """The flat dict of a pair from {expert: params} (the inverse of `split`)."""
    return {f"{n}{SEP}{k}": v for n, tree in trees.items() for k, v in tree.items()}


def guidance(scale: float, scale_2: float | None, boundary: float | None) -> float | Callable:
    """The CFG weight of a sampler: `scale`, or for a pair WanPipeline's per-step choice, a function
    t [B] -> w [B] giving `scale` at the high-noise expert's timesteps and `scale_2` (default `scale`)
    at the low-noise one's. As WanPipeline, a `scale` of 1 turns guidance off for both experts (its CFG
    runs only when guidance_scale > 1, whatever guidance_scale_2 is)."""
    if boundary is None or scale_2 is None or scale_2 == scale or scale == 1:
        return scale

    def weight(t):
        return torch.where(route(t, boundary) == 0, scale, scale_2).to(torch.float32)

    return weight


def make_apply(applies: Sequence[Callable], experts: Experts, together: bool = False) -> Callable:
    """apply(params, x, t, context[, cond]) -> v of a pair: each sample through the expert its timestep
    routes it to. applies: each expert's own apply (in names' order).

    Default: the batch is split by the route and each expert runs on its samples alone (a batch of one
    side calls one expert on the batch as it is), so a pair costs one model's compute. together: every
    expert runs on the whole batch and each sample takes its expert's output: twice the compute, but
    every expert runs on every call, which sharded experts need (each rank gathers the same blocks the
    same number of times whatever its own samples' timesteps)."""
    names = experts.names

    def apply(params, x, t, context, *cond):
        parts = split(params, names)
        which = route(t, experts.boundary)

        def one(i, idx=None):
            if idx is None:
                return applies[i](parts[names[i]], x, t, context, *cond)
            c = tuple({k: v[idx] for k, v in c.items()} for c in cond)
            return applies[i](parts[names[i]], x[idx], t[idx], context[idx], *c)

        if together:
            out = None
            for i in range(len(names)):
                v = one(i)
                mask = (which == i).view(-1, *[1] * (v.ndim - 1))
                out = v if out is None else torch.where(mask, v, out)
            return out
        present = sorted(set(which.tolist()))
        if len(present) == 1:
            return one(present[0])
        outs, order = [], []
        for i in present:
            idx = (which == i).nonzero().flatten()
            outs.append(one(i, idx))
            order.append(idx)
        inverse = torch.argsort(torch.cat(order))
        return torch.cat(outs)[inverse]

    return apply


# ------------------------------------------------------------------------------ per-expert AdamW


def opt_init(opt: optim.Optimizer, params: dict, experts: Experts | None, only: Sequence[str] | None = None):
    """The optimizer state of a role: one AdamWState, or {expert: AdamWState} for a pair (of the experts
    `only`, when only they train)."""
    if experts is None:
        return opt.init(params)
    return {n: opt.init(p) for n, p in split(params, experts.names).items() if only is None or n in only}


def apply_gradients(opt: optim.Optimizer, params: dict, grads: dict, state, max_grad_norm: float, reduce=None,
                    experts: Experts | None = None, t=None) -> tuple[dict, Any, torch.Tensor]:
    """optim.apply_gradients for a role. For a pair (experts given): only the experts that the global
    batch's timesteps `t` were routed to step (each with its own clipping and state); the others keep
    their params and state. The norm is the global norm over the experts that stepped."""
    if experts is None:
        return optim.apply_gradients(opt, params, grads, state, max_grad_norm, reduce)
    ps, gs = split(params, experts.names), split(grads, experts.names)  # (grads of trained experts only)
    new_p, new_s, norms = dict(ps), dict(state), []
    for n in hit(t, experts):  # every rank takes the same experts (t is the global batch's)
        new_p[n], new_s[n], norm = optim.apply_gradients(opt, ps[n], gs[n], state[n], max_grad_norm, reduce)
        norms.append(norm.float())
    norm = torch.stack(norms).square().sum().sqrt() if norms else torch.zeros(())
    return join(new_p), new_s, norm


def state_to_tree(state) -> dict:
    """A role's optimizer state as one flat tree (a pair's under `<expert>/`)."""
    if isinstance(state, optim.AdamWState):
        return optim.state_to_tree(state)
    return {f"{n}{SEP}{k}": v for n, s in state.items() for k, v in optim.state_to_tree(s).items()}


def state_from_tree(flat: dict, like) -> Any:
    """The inverse of `state_to_tree`, shaped as `like` (the run's own state of the role)."""
    if isinstance(like, optim.AdamWState):
        return optim.state_from_tree(flat)
    return {n: optim.state_from_tree(t) for n, t in split(flat, list(like)).items()}
