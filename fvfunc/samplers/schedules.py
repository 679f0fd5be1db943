"""Sigma schedules: the list of noise levels a sampler walks, from the noisiest down to 0, and the
timestep the model is called at in each step.

A schedule of n steps is a float32 tensor of n + 1 sigmas, strictly descending, ending in 0 (so the
last step lands on clean data); the model is called once per step, at the first n of them.

`shifted_sigmas(n, s)` is what diffusers' Wan pipelines sample with: the scheduler shipped with the
Wan2.1 diffusers checkpoints is `UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=s)`, whose
`set_timesteps(n)` takes u = linspace(1, 1/1000, n + 1)[:-1], maps it through shift(u; s) and
appends 0. (diffusers then nudges the first sigma 1 -> 1 - 1e-6 to keep UniPC's log-SNR finite; that
is UniPC's business and lives in `unipc.py`, so every other sampler sees sigma = 1 exactly.)
`flow_match_euler_sigmas(n, s)` is diffusers' `FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(n)`:
n sigmas spaced linearly between its largest and smallest training sigma (already shifted, the
smallest computed in float32 as there), endpoints included, shifted again, then 0. Wan's own
repository (FlowUniPCMultistepScheduler built with shift=1, then set_timesteps(n, shift=s)) shifts
u = linspace(0.999, 0, n + 1)[:-1], one notch lower; it is not followed.

`timesteps_to_sigmas` turns an explicit timestep list of a few-step student (DMD2's
`dmd_denoising_steps`, e.g. 1000 750 500 250) into sigmas t / 1000 followed by 0.

The model's timestep per step (`model_timesteps`) is a rule of the sampler kind, as each reference
scheduler stores its own:
    unipc      floor(1000 * min(sigma, 1 - 1e-6)): diffusers' UniPCMultistepScheduler keeps
               `timesteps` as int64(sigma * 1000) of its float64 (nudged) sigmas, and WanPipeline calls
               the transformer at those integers (so does FastVideo's FlowUniPC); 999 at sigma = 1.
    ode, sde   1000 * sigma (in float32 from a config): FlowMatchEulerDiscreteScheduler's float
               timesteps (and DMD2's step list, whose t / 1000 * 1000 gives t back).
The floor is taken on the float64 schedule: from its float32 copy a timestep float32 cannot hold
(0.937 is 0.93699998) would floor one lower. `schedule(cfg)` therefore builds every schedule in
float64 and returns the float32 sigmas with the timesteps made from the float64 ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from . import flow
from .flow import NUM_TRAIN_TIMESTEPS

if TYPE_CHECKING:
    from configs import SamplerConfig


class Schedule(NamedTuple):
    """A sampler's walk: the sigmas its solver steps between and the timestep the model sees per step."""

    sigmas: torch.Tensor
    """[n + 1] float32, strictly descending."""
    timesteps: torch.Tensor
    """[n] float32: step i calls the model at timesteps[i] (see `model_timesteps`)."""


def _check_steps(num_steps: int, shift: float) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")


def shifted_sigmas(num_steps: int, shift: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n + 1 sigmas: shift(linspace(1, 1/1000, n + 1)[:-1]; s) then 0, as diffusers' Wan scheduler
    (computed in float64, returned in `dtype`)."""
    _check_steps(num_steps, shift)
    # numpy's linspace, as diffusers: torch's differs in the last bit (1/3 of 1 - 1/1000 floors to 334, not 333)
    u = torch.from_numpy(np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, num_steps + 1)[:-1])
    return torch.cat([flow.shift(u, shift), u.new_zeros(1)]).to(dtype)


def flow_match_euler_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """n + 1 sigmas of diffusers' FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(n): its training
    sigmas are shift(k / 1000; s) in float32 for k = 1000..1, and n of them are spaced from the largest
    to the smallest (numpy linspace, float64), shifted again and stored as float32, then 0."""
    _check_steps(num_steps, shift)
    ends = flow.shift(torch.tensor([NUM_TRAIN_TIMESTEPS, 1], dtype=torch.float32) / NUM_TRAIN_TIMESTEPS, shift)
    u = np.linspace(float(ends[0]) * NUM_TRAIN_TIMESTEPS, float(ends[1]) * NUM_TRAIN_TIMESTEPS, num_steps)
    sigmas = flow.shift(torch.from_numpy(u / NUM_TRAIN_TIMESTEPS), shift).float()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def model_timesteps(sigmas: torch.Tensor | Sequence[float], kind: str) -> torch.Tensor:
    """[n]: the timestep the model is called at in each step of `kind` over sigmas [n + 1] (unipc:
    floor(1000 * min(sigma, 1 - 1e-6)) of the values given, as float32, as diffusers' UniPC; ode and
    sde: 1000 * sigma in the sigmas' dtype, as FlowMatchEulerDiscreteScheduler does in float32).
    See the module docstring."""
    sigmas = torch.as_tensor(sigmas)[:-1]
    if kind == "unipc":
        nudged = sigmas.to(torch.float64).clamp(max=1 - 1e-6)  # diffusers: sigmas[0] -= 1e-6 at sigma = 1
        return torch.floor(nudged * NUM_TRAIN_TIMESTEPS).float()
    return sigmas * NUM_TRAIN_TIMESTEPS


def timesteps_to_sigmas(timesteps: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[t_1, ..., t_n] (strictly descending, each in (0, 1000]) -> [t_1 / 1000, ..., t_n / 1000, 0]."""
    timesteps = [float(t) for t in timesteps]
    if not timesteps:
        raise ValueError("timesteps is empty: give at least one timestep in (0, 1000]")
    for i, t in enumerate(timesteps):
        if not 0 < t <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"timestep {t:g} (index {i}) is outside (0, {NUM_TRAIN_TIMESTEPS}]")
        if i > 0 and not t < timesteps[i - 1]:
            raise ValueError(f"timesteps must be strictly descending: {t:g} (index {i}) follows "
                             f"{timesteps[i - 1]:g}")
    sigmas = torch.tensor(timesteps, dtype=torch.float64) / NUM_TRAIN_TIMESTEPS
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


def with_timesteps(cfg: SamplerConfig, timesteps: Sequence[float], kinds: Sequence[str]) -> SamplerConfig:
    """`cfg` with a few-step student's own timesteps when its kind is one of `kinds` and it names none
    (a method's default validation sampler)."""
    if cfg.kind in kinds and not cfg.timesteps:
        return dataclasses.replace(cfg, timesteps=tuple(timesteps))
    return cfg


def schedule(cfg: SamplerConfig) -> Schedule:
    """The walk a SamplerConfig asks for: its explicit timesteps if any, else n sigmas of its `schedule`
    (unipc: `shifted_sigmas`; flow_match_euler: `flow_match_euler_sigmas`), with the model timesteps
    of its kind taken from the float64 schedule."""
    if cfg.timesteps:
        sigmas = timesteps_to_sigmas(cfg.timesteps, torch.float64)
    elif cfg.schedule == "flow_match_euler":
        sigmas = flow_match_euler_sigmas(cfg.num_steps, cfg.shift).double()
    elif cfg.schedule == "unipc":
        sigmas = shifted_sigmas(cfg.num_steps, cfg.shift, torch.float64)
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; expected unipc or flow_match_euler")
    # UniPC floors the float64 values; Euler's float timesteps are 1000 * the float32 sigmas
    return Schedule(sigmas.float(), model_timesteps(sigmas if cfg.kind == "unipc" else sigmas.float(), cfg.kind))


def sigmas_from_config(cfg: SamplerConfig) -> torch.Tensor:
    """The sigmas of `schedule(cfg)`."""
    return schedule(cfg).sigmas
