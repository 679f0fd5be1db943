"""The sampling loop and classifier-free guidance.

`sample(denoise, x, sigmas, kind, key)` walks a schedule with one call of `denoise(x, t) -> v` per
step and returns the clean sample. t is a [B] float tensor: the step's entry of `timesteps`, by
default the kind's rule (`schedules.model_timesteps`: the integers floor(1000 * sigma) for unipc, as
diffusers' UniPC calls the model; 1000 * sigma for ode and sde). The solver itself always steps
between the float sigmas. `denoise` is any pure function: a model's apply with its params bound, or
`guided(...)` of one.

Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598) in the flow form Wan and DMD2 use:

    v = v_uncond + w * (v_cond - v_uncond)

computed from ONE model call on the doubled batch [x; x], [t; t], [cond; uncond] (what diffusers' Wan
pipeline does with two calls); w = 1 is the conditional model alone and skips the uncond half.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .. import random
from .schedules import model_timesteps
from .steps import ode_step, sde_step
from .unipc import unipc_init, unipc_step

KINDS = ("ode", "sde", "unipc")

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float], kind: str = "ode",
           key: torch.Tensor | None = None, noise: Callable[[int], torch.Tensor] | None = None,
           states: bool = False, timesteps: torch.Tensor | Sequence[float] | None = None,
           ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the sampler `kind` ("ode", "sde" or "unipc") from x at sigmas[0] down the schedule.

    x: [B, ...] the starting sample (pure noise when sigmas[0] = 1), never modified; keep it in fp32
    (the model may compute in bf16: v is cast to x's dtype).
    sigmas: [n + 1] strictly descending, usually ending in 0 (see schedules.py). A schedule that stops
    above 0 returns the sample at its last sigma: sigmas[:k + 1] with "sde" is DMD2's simulated
    rollout to step k, with the same noise as the full run (step i always uses fold_in(key, i)).
    key: needed by "sde" only; the same key gives the same output bitwise (on one device type), and
    no global RNG is read or written.
    noise: instead of a key, `noise(i)` is the sde's fresh noise of step i (e.g. per-sample noise a
    method drew itself).
    states: also return the trajectory, [x at sigmas[i] as `denoise` saw it, for each step i]
    (an ODE trajectory for "ode" and "unipc": what knowledge distillation learns from).
    timesteps: [n], the model's timestep at each step; None takes `model_timesteps(sigmas, kind)`
    (pass `schedules.schedule(cfg).timesteps`, made from the float64 schedule, for diffusers' exact
    integers: a float32 sigma such as 0.937 floors to 936).
    Makes exactly n calls of `denoise` (see `nfe`).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown sampler kind {kind!r}; expected one of {KINDS}")
    if kind == "sde" and key is None and noise is None:
        raise ValueError("the sde sampler draws fresh noise every step: pass a key (or the noise)")
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or sigmas.numel() < 2 or not sigmas.is_floating_point():
        raise ValueError(f"sigmas must be a 1-d float schedule of n + 1 >= 2 values, got {sigmas!r}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"sigmas must be strictly descending, got {sigmas.tolist()}")
    timesteps = model_timesteps(sigmas, kind) if timesteps is None else torch.as_tensor(timesteps)
    timesteps = timesteps if timesteps.is_floating_point() else timesteps.float()
    if timesteps.shape != (sigmas.numel() - 1,):
        raise ValueError(f"timesteps must be one per step, [{sigmas.numel() - 1}], got shape {list(timesteps.shape)}")
    state = unipc_init(x) if kind == "unipc" else None
    trajectory = []
    for i in range(sigmas.numel() - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        t = timesteps[i].repeat(x.shape[0]).to(x.device)
        if states:
            trajectory.append(x)
        v = denoise(x, t)
        if kind == "ode":
            x = ode_step(x, v, sigma, sigma_next)
        elif kind == "sde":
            if sigma_next == 0:
                fresh = None
            elif noise is not None:
                fresh = noise(i)
            else:
                fresh = random.normal(random.fold_in(key, i), x.shape, dtype=x.dtype, device=x.device)
            x = sde_step(x, v, sigma, sigma_next, fresh)
        else:
            x, state = unipc_step(state, x, v, sigmas, i)
    return (x, trajectory) if states else x


def guided(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], context: torch.Tensor,
           uncond_context: torch.Tensor | None, scale: float | Callable[[torch.Tensor], torch.Tensor]) -> Denoise:
    """`denoise(x, t)` for `fn(x, t, context) -> v` with classifier-free guidance of weight `scale`
    (a number, or a function of the timesteps t [B] -> w [B]: an expert pair's per-expert weights).

    uncond_context: the negative prompt's embedding ([B, L, D] or one [1, L, D] for the batch), or
    None for zeros (Wan's "no text"). Each call of the result makes one call of fn on a batch of 2B.
    The guided combination is formed in at least fp32 (a bf16 model's v is upcast first).
    """
    if not callable(scale) and scale == 1:
        def conditional(x, t):
            return fn(x, t, context)
        return conditional

    if uncond_context is None:
        uncond_context = torch.zeros_like(context)
    contexts = torch.cat([context, uncond_context.expand_as(context)])

    def denoise(x, t):
        v = fn(torch.cat([x, x]), torch.cat([t, t]), contexts)
        v_cond, v_uncond = v.to(torch.promote_types(v.dtype, torch.float32)).chunk(2)
        w = scale(t).to(v_cond).view(-1, *[1] * (v_cond.ndim - 1)) if callable(scale) else scale
        return v_uncond + w * (v_cond - v_uncond)
    return denoise


def nfe(sigmas: torch.Tensor | Sequence[float], guidance_scale: float = 1.0) -> int:
    """Network function evaluations per sample of `sample` over this schedule, counting a guided step
    as two (its one call runs the network on twice the batch)."""
    return (len(sigmas) - 1) * (1 if guidance_scale == 1 else 2)
