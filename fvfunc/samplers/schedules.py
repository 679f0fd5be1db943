"""Sigma schedules: the list of noise levels a sampler walks, from the noisiest down to 0.

A schedule of n steps is a float32 tensor of n + 1 sigmas, strictly descending, ending in 0 (so the
last step lands on clean data); the model is called at the first n of them, t = 1000 * sigma.

`shifted_sigmas(n, s)` is what diffusers' Wan pipelines sample with: the scheduler shipped with the
Wan2.1 diffusers checkpoints is `UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=s)`, whose
`set_timesteps(n)` takes u = linspace(1, 1/1000, n + 1)[:-1], maps it through shift(u; s) and
appends 0. (diffusers then nudges the first sigma 1 -> 1 - 1e-6 to keep UniPC's log-SNR finite; that
is UniPC's business and lives in `unipc.py`, so every other sampler sees sigma = 1 exactly.
Two neighbours are not followed: Wan's own repository (FlowUniPCMultistepScheduler built with shift=1,
then set_timesteps(n, shift=s)) shifts u = linspace(0.999, 0, n + 1)[:-1], one notch lower; and
diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(n) spaces n sigmas linearly between its
largest and smallest (already shifted) training sigma, endpoints included, and shifts again.)

`timesteps_to_sigmas` turns an explicit timestep list of a few-step student (DMD2's
`dmd_denoising_steps`, e.g. 1000 750 500 250) into sigmas t / 1000 followed by 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from . import flow
from .flow import NUM_TRAIN_TIMESTEPS

if TYPE_CHECKING:
    from configs import SamplerConfig


def shifted_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """n + 1 sigmas: shift(linspace(1, 1/1000, n + 1)[:-1]; s) then 0, as diffusers' Wan scheduler."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    u = torch.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, num_steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([flow.shift(u, shift), u.new_zeros(1)]).float()


def timesteps_to_sigmas(timesteps: Sequence[float]) -> torch.Tensor:
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
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def with_timesteps(cfg: SamplerConfig, timesteps: Sequence[int], kinds: Sequence[str]) -> SamplerConfig:
    """`cfg` with a few-step student's own timesteps when its kind is one of `kinds` and it names none
    (a method's default validation sampler)."""
    if cfg.kind in kinds and not cfg.timesteps:
        return dataclasses.replace(cfg, timesteps=tuple(timesteps))
    return cfg


def sigmas_from_config(cfg: SamplerConfig) -> torch.Tensor:
    """The schedule a SamplerConfig asks for: its explicit timesteps if any, else n shifted sigmas."""
    if cfg.timesteps:
        return timesteps_to_sigmas(cfg.timesteps)
    return shifted_sigmas(cfg.num_steps, cfg.shift)
