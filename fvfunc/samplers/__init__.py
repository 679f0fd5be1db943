"""Sigma schedules, one-step samplers on the flow and the sampling loop (DESIGN.md section 3).

Every function is pure: inputs are never modified, randomness comes from an explicit key.
"""

from .flow import (
    NUM_TRAIN_TIMESTEPS,
    add_noise,
    noise_from_v,
    per_sample,
    shift,
    v_from_x0,
    x0_from_v,
)
from .loop import KINDS, guided, nfe, sample
from .schedules import (
    Schedule,
    flow_match_euler_sigmas,
    model_timesteps,
    schedule,
    shifted_sigmas,
    sigmas_from_config,
    timesteps_to_sigmas,
    with_timesteps,
)
from .steps import ode_step, sde_step
from .unipc import UniPCState, unipc_init, unipc_order, unipc_step

__all__ = [
    "KINDS",
    "NUM_TRAIN_TIMESTEPS",
    "Schedule",
    "UniPCState",
    "add_noise",
    "flow_match_euler_sigmas",
    "guided",
    "model_timesteps",
    "nfe",
    "noise_from_v",
    "ode_step",
    "per_sample",
    "sample",
    "schedule",
    "sde_step",
    "shift",
    "shifted_sigmas",
    "sigmas_from_config",
    "timesteps_to_sigmas",
    "unipc_init",
    "unipc_order",
    "unipc_step",
    "v_from_x0",
    "with_timesteps",
    "x0_from_v",
]
