"""The roles of a run, built once from its config and its method's spec: plain typed data.

A `Role` is one named model of the run (student, teacher, critic, ...): its family, model config and
folder, its params (on this rank: whole, or this rank's rows when sharded), whether the method trains
it, its EMA decay, and its `apply(params, x, t, context) -> v`, which is the family's forward run by
the block runner with the run's speed options (fvfunc/runner.py). The methods read `role.apply`,
`role.latents` and `role.ema_decay`; nothing else of a role's making reaches them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fvfunc import distributed, runner
from fvfunc.models import Family, Latents, family

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Role(NamedTuple):
    name: str
    family: Family
    config: Any
    """The family's model config (e.g. a WanConfig)."""
    folder: str
    """The model folder it was loaded from (its pipeline may hold a VAE)."""
    params: dict
    """Its params on this rank, in roles.<role>.dtype."""
    trainable: bool
    sharded: bool
    """Whether `params` are this rank's rows (DTensors) of a ZeRO-3 sharded role."""
    ema_decay: float
    apply: runner.Apply
    latents: Latents


class RoleError(RuntimeError):
    """A role that cannot be built for this run; the message names the role."""


def options(training, gather=None) -> runner.Options:
    """The block runner's options of a run's TrainingConfig."""
    return runner.Options(DTYPES[training.precision], training.attention, training.remat, training.remat_fraction,
                          training.compile, gather)


def build(run, spec, process: distributed.Process) -> dict[str, Role]:
    """Every role `spec` needs for `run`, loaded through its family and placed on this process: whole
    on process.device, or, for a sharded role of a multi-rank run, only this rank's rows of each tensor
    read from the folder (never the whole model) and made DTensors, with an apply that gathers."""
    roles = {}
    for name in spec.roles(run):
        cfg = getattr(run.roles, name)
        fam = family(cfg.family)
        sharded = cfg.sharding == "sharded" and process.world_size > 1
        if sharded and name in spec.trainable and run.training.grad_transform != "autograd":
            raise RoleError(f"roles.{name} is sharded: that needs training.grad_transform 'autograd' "
                            "(torch.func.grad cannot differentiate through the sharded gather)")
        if sharded and run.training.compile:
            raise RoleError(f"roles.{name} is sharded: training.compile is not supported with sharded roles yet")
        mcfg, params = fam.load(cfg.path, dtype=DTYPES[cfg.dtype], device="cpu" if sharded else process.device,
                                rows=distributed.rows_of(process) if sharded else None, variant=cfg.variant)
        roles[name] = place(name, fam, mcfg, params, run.training, process, sharded, name in spec.trainable,
                            cfg.ema_decay, cfg.path)
    return roles


def place(name: str, fam: Family, mcfg, params: dict, training, process: distributed.Process, sharded: bool,
          trainable: bool, ema_decay: float = 0.0, folder=None) -> Role:
    """A Role of params already read: whole ones moved to process.device, or this rank's rows of each
    tensor (as `fam.load(rows=distributed.rows_of(process))` reads them) made Shard(0) DTensors."""
    if sharded:
        shapes = fam.param_shapes(mcfg)
        params = {k: distributed.from_rows(v, shapes[k], process.mesh, process.device) for k, v in params.items()}
    else:
        params = {k: v.to(process.device) for k, v in params.items()}
    apply = runner.make_apply(fam, mcfg, options(training, distributed.gather if sharded else None))
    return Role(name, fam, mcfg, str(folder or ""), params, trainable, sharded, ema_decay, apply,
                fam.latents(mcfg, folder))


def unsharded(role: Role, training) -> Role:
    """The role with an apply for whole params (for rank 0 alone to sample from whole weights)."""
    return role._replace(apply=runner.make_apply(role.family, role.config, options(training)))
