"""The roles of a run, built once from its config and its method's spec: plain typed data.

A `Role` is one named model of the run (student, teacher, critic, ...): its family, model config and
folder, its params (on this rank: whole, or this rank's rows when sharded), whether the method trains
it, its EMA decay, and its `apply(params, x, t, context) -> v`, which is the family's forward run by
the block runner with the run's speed options (fvfunc/runner.py). The methods read `role.apply`,
`role.latents` and `role.ema_decay`; nothing else of a role's making reaches them.

A role with `roles.<role>.lora.rank` > 0 is a frozen base plus low-rank adapters (fvfunc/lora.py):
its `params` are the adapters, `base` the frozen weights its `apply` closes over. Roles that read the
same folder, variant, dtype and frozen LoRA files without training its weights (a teacher, LoRA
students and critics) share one copy of the base: a DMD2 run of a frozen teacher with a LoRA student
and a LoRA critic holds the model once.
"""

from __future__ import annotations

import zlib
from typing import Any, NamedTuple

import torch

from fvfunc import distributed, lora, random, runner
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
    base: dict | None = None
    """A LoRA role's frozen base params (shared with the run's other roles of the same weights);
    None for a role whose params are the whole model."""
    lora_scale: float = 0.0
    """A LoRA role's alpha / rank (its adapters' B is scaled by it in the forward)."""


class RoleError(RuntimeError):
    """A role that cannot be built for this run; the message names the role."""


def options(training, gather=None) -> runner.Options:
    """The block runner's options of a run's TrainingConfig."""
    return runner.Options(DTYPES[training.precision], training.attention, training.remat, training.remat_fraction,
                          training.compile, gather)


def build(run, spec, process: distributed.Process) -> dict[str, Role]:
    """Every role `spec` needs for `run`, loaded through its family and placed on this process: whole
    on process.device, or, for a sharded role of a multi-rank run, only this rank's rows of each tensor
    read from the folder (never the whole model) and made DTensors, with an apply that gathers. Frozen
    weights read by several roles are loaded once (see the module docstring)."""
    roles, bases = {}, {}
    for name in spec.roles(run):
        cfg = getattr(run.roles, name)
        fam = family(cfg.family)
        trainable = name in spec.trainable
        adapted = cfg.lora.rank > 0
        sharded = cfg.sharding == "sharded" and process.world_size > 1
        if adapted and not trainable:
            raise RoleError(f"roles.{name}.lora.rank {cfg.lora.rank}: the {spec.name} method does not train "
                            f"roles.{name}; merge LoRA files into it with roles.{name}.lora.frozen instead")
        if sharded and trainable and run.training.grad_transform != "autograd":
            raise RoleError(f"roles.{name} is sharded: that needs training.grad_transform 'autograd' "
                            "(torch.func.grad cannot differentiate through the sharded gather)")
        if sharded and run.training.compile:
            raise RoleError(f"roles.{name} is sharded: training.compile is not supported with sharded roles yet")
        if adapted and sharded:
            raise RoleError(f"roles.{name}: a LoRA role's base cannot be sharded yet (set roles.{name}.sharding "
                            "replicated; its frozen base is held once for all roles that share it)")
        shared = not trainable or adapted  # weights nobody updates may be shared
        key = (cfg.family, cfg.path, cfg.variant, cfg.dtype, cfg.lora.frozen, sharded)
        if shared and key in bases:
            role = bases[key]._replace(name=name, trainable=trainable, ema_decay=cfg.ema_decay)
        else:
            mcfg, params = _load(name, cfg, fam, process, sharded)
            role = place(name, fam, mcfg, params, run.training, process, sharded, trainable, cfg.ema_decay,
                         cfg.path)
            if shared:
                bases[key] = role
        if adapted:
            key = random.fold_in(random.key(run.training.seed), zlib.crc32(f"lora:{name}".encode()))
            role = adapt(role, cfg.lora, f"roles.{name}.lora", key, process.device)
        roles[name] = role
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


def _load(name, cfg, fam: Family, process, sharded: bool) -> tuple[Any, dict]:
    """(model config, params) of a role's folder with its frozen LoRA files merged in (rows of this
    rank only when sharded)."""
    mcfg, params = fam.load(cfg.path, dtype=DTYPES[cfg.dtype], device="cpu" if sharded else process.device,
                            rows=distributed.rows_of(process) if sharded else None, variant=cfg.variant)
    if cfg.lora.frozen:
        if sharded:
            raise RoleError(f"roles.{name}.lora.frozen: LoRA files cannot be merged into a sharded role yet "
                            f"(set roles.{name}.sharding replicated)")
        shapes = fam.param_shapes(mcfg)
        names = fam.original_names(mcfg) if fam.original_names is not None else None
        for entry in cfg.lora.frozen:
            path, strength = lora.parse_frozen(entry, f"roles.{name}.lora.frozen")
            try:
                params = lora.merge_pairs(params, lora.read(path, shapes, names), strength)
            except lora.LoraError as e:
                raise RoleError(f"roles.{name}.lora.frozen: {e}") from None
    return mcfg, params


def adapt(role: Role, cfg, field: str, key, device) -> Role:
    """`role` (a placed, whole or sharded, base) made a LoRA role: fresh adapters of `cfg`
    (configs.LoraConfig) on `device`, or the ones of the file `cfg.init` names."""
    fam = role.family
    shapes = fam.param_shapes(role.config)
    scale = lora.scale_of(cfg.rank, cfg.alpha)
    try:
        names = lora.select(shapes, cfg.targets, cfg.rank, field)
        adapters = lora.init(shapes, names, cfg.rank, key, device)
        if cfg.init != "zeros":
            original = fam.original_names(role.config) if fam.original_names is not None else None
            adapters = lora.from_pairs(lora.read(cfg.init, shapes, original), adapters, scale, field, cfg.init)
    except lora.LoraError as e:
        raise RoleError(str(e)) from None
    return role._replace(params=adapters, base=role.params, lora_scale=scale,
                         apply=lora.make_apply(role.apply, role.params, scale))


def unsharded(role: Role, training) -> Role:
    """The role with an apply for whole params (for rank 0 alone to sample from whole weights)."""
    return role._replace(apply=runner.make_apply(role.family, role.config, options(training)))
