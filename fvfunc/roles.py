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

A role whose folder is an expert pair (the family's `experts`: Wan2.2 A14B's transformer/ and
transformer_2/) is built expert by expert as above (each expert shared, sharded or adapted on its own)
and joined into one Role (`join`): its params one `<expert>/<param>` dict, its apply routing each
sample by its timestep, `experts` naming the pair (fvfunc/experts.py).
"""

from __future__ import annotations

import functools
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fvfunc import distributed, experts, lora, random, runner
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
    experts: experts.Experts | None = None
    """An expert pair's names, boundary and configs (fvfunc/experts.py): `params` (and `base`) then hold
    `<expert>/<param>` keys and `apply` routes each sample; None for one model."""
    vsa: bool = False
    """Whether it runs VSA self-attention (training.attention 'vsa' and named by training.vsa_roles); its
    apply is then rebuilt for each sparsity of the warm-up (`at_sparsity`)."""


class RoleError(RuntimeError):
    """A role that cannot be built for this run; the message names the role."""


def options(training, sharded: bool = False, sp=None, sparsity: float | None = None) -> runner.Options:
    """The block runner's options of a run's TrainingConfig: `sharded` params gathered (overlapped with
    compute when training.overlap_comm), sequence-parallel over `sp` (fvfunc.distributed.Sequence), VSA
    self-attention at `sparsity` (None: a role that runs dense; under training.attention 'vsa' that is
    training.vsa_dense)."""
    overlap = sharded and training.overlap_comm
    gather = functools.partial(distributed.gather, overlap=overlap) if sharded else None
    backend = training.attention
    if backend == "vsa" and sparsity is None:
        backend = training.vsa_dense
    return runner.Options(DTYPES[training.precision], backend, training.remat, training.remat_fraction,
                          training.compile, gather, sparsity or 0.0, training.vsa_dense,
                          prefetch=distributed.prefetch if overlap else None, sp=sp)


def vsa_roles(run, names) -> tuple[str, ...]:
    """The roles among `names` that run VSA: none unless training.attention is 'vsa'; then the student, or
    every role under training.vsa_roles 'all'."""
    t = run.training
    if t.attention != "vsa":
        return ()
    return tuple(n for n in names if t.vsa_roles == "all" or n == "student")


def _gated(fam: Family, mcfg, params: dict, device, rows=None) -> tuple[Any, dict]:
    """(config, params) with the family's VSA params; the ones the folder lacks are zeros (FastVideo's
    loader's rule for them), only this rank's rows of each when `rows` is given (a sharded role)."""
    if fam.vsa_gated is None:
        return mcfg, params
    mcfg = fam.vsa_gated(mcfg)
    dtype = next(iter(params.values())).dtype
    out = {}  # in the family's order, as a folder that holds them loads (a gradient norm sums in this order)
    for k, shape in fam.param_shapes(mcfg).items():
        if k not in params:
            if rows is not None:
                start, stop = rows(shape[0])
                shape = (stop - start, *shape[1:])
            out[k] = torch.zeros(shape, dtype=dtype, device=device)
        else:
            out[k] = params[k]
    return mcfg, out


def build(run, spec, process: distributed.Process) -> dict[str, Role]:
    """Every role `spec` needs for `run`, loaded through its family and placed on this process: whole
    on process.device, or, for a sharded role of a multi-rank run, only this rank's rows of each tensor
    read from the folder (never the whole model) and made DTensors, with an apply that gathers. Frozen
    weights read by several roles are loaded once (see the module docstring); an expert pair's folder
    (the family's `experts`) is built expert by expert the same way and joined (fvfunc/experts.py)."""
    check(run, spec, process.world_size)
    roles, bases = {}, {}
    sparse = vsa_roles(run, spec.roles(run))
    for name in spec.roles(run):
        cfg = getattr(run.roles, name)
        fam = family(cfg.family)
        pair = fam.experts(cfg.path)
        vsa = name in sparse
        if pair is None:
            roles[name] = _build_one(name, cfg, cfg.path, f"lora:{name}", run, spec, process, bases, vsa)
            continue
        names, boundary = pair
        parts = [_build_one(name, cfg, str(Path(cfg.path) / n), f"lora:{name}/{n}", run, spec, process, bases, vsa,
                            expert=n) for n in names]
        roles[name] = join(name, parts, names, boundary, cfg.path)
    return roles


def _build_one(name, cfg, path: str, lora_name: str, run, spec, process, bases: dict, vsa: bool = False,
               expert: str | None = None) -> Role:
    """Role `name` of one model folder `path` (a whole role, or the expert `expert` of a pair); `vsa`: it runs
    VSA self-attention, with the family's VSA params (zeros where the folder lacks them)."""
    fam = family(cfg.family)
    trainable = name in spec.trainable
    adapted = cfg.lora.rank > 0
    sharded = cfg.sharding == "sharded" and process.world_size > 1
    shared = not trainable or adapted  # weights nobody updates may be shared
    key = (cfg.family, path, cfg.variant, cfg.dtype, cfg.lora.frozen, sharded, vsa)
    if shared and key in bases:
        role = bases[key]._replace(name=name, trainable=trainable, ema_decay=cfg.ema_decay)
    else:
        device, rows = ("cpu", distributed.rows_of(process)) if sharded else (process.device, None)
        mcfg, params = load_weights(name, cfg, fam, device, rows, path, expert)
        if vsa:
            mcfg, params = _gated(fam, mcfg, params, device, rows)
        role = place(name, fam, mcfg, params, run.training, process, sharded, trainable, cfg.ema_decay, path,
                     run.training.vsa_sparsity if vsa else None)
        if shared:
            bases[key] = role
    if adapted:
        key = random.fold_in(random.key(run.training.seed), zlib.crc32(lora_name.encode()))
        role = adapt(role, cfg.lora, f"roles.{name}.lora", key, process.device, expert)
    return role


def join(name: str, parts: list[Role], names, boundary: float, folder) -> Role:
    """One role of an expert pair from its experts' roles (in `names`' order, high noise first): its
    params (and a LoRA role's base) one flat dict of `<expert>/<param>`, its apply routing each sample
    by its timestep (fvfunc/experts.py; sharded experts all run on every call, so every rank gathers
    alike). Its config and latent facts are the first expert's."""
    first = parts[0]
    for n, p in zip(names, parts, strict=True):
        if p.latents.channels != first.latents.channels or p.family.text_width(p.config) != first.family.text_width(
                first.config):
            raise RoleError(f"roles.{name}.path: the experts {names[0]}/ and {n}/ of {folder} take different "
                            "latents or text widths")
    pair = experts.Experts(tuple(names), boundary, tuple(p.config for p in parts))
    base = None if first.base is None else experts.join({n: p.base for n, p in zip(names, parts, strict=True)})
    apply = experts.make_apply([p.apply for p in parts], pair, together=first.sharded)
    return first._replace(folder=str(folder or ""), params=experts.join({n: p.params for n, p in zip(names, parts,
                                                                                               strict=True)}),
                          apply=apply, latents=first.family.latents(first.config, folder), base=base,
                          experts=pair)


def place(name: str, fam: Family, mcfg, params: dict, training, process: distributed.Process, sharded: bool,
          trainable: bool, ema_decay: float = 0.0, folder=None, sparsity: float | None = None) -> Role:
    """A Role of params already read: whole ones moved to process.device, or this rank's rows of each
    tensor (as `fam.load(rows=distributed.rows_of(process))` reads them) made Shard(0) DTensors; it runs
    VSA at `sparsity` (None: dense)."""
    if sharded:
        shapes = fam.param_shapes(mcfg)
        params = {k: distributed.from_rows(v, shapes[k], process.mesh, process.device) for k, v in params.items()}
    else:
        params = {k: v.to(process.device) for k, v in params.items()}
    apply = runner.make_apply(fam, mcfg, options(training, sharded, process.sp, sparsity))
    return Role(name, fam, mcfg, str(folder or ""), params, trainable, sharded, ema_decay, apply,
                fam.latents(mcfg, folder), vsa=sparsity is not None)


def check(run, spec, world_size: int = 1) -> None:
    """RoleError for a role this run cannot build, found from the config files alone (no weights
    loaded): sharding a role that cannot be, LoRA settings that do not fit the model (targets that
    match no linear, a rank above a layer's size, LoRA files of another architecture)."""
    sp = run.training.sp_size
    for name in spec.roles(run):
        cfg = getattr(run.roles, name)
        trainable, adapted = name in spec.trainable, cfg.lora.rank > 0
        sharded = cfg.sharding == "sharded" and world_size > 1
        if sp > 1:
            fam = family(cfg.family)
            heads = fam.heads(fam.load_config(cfg.path))
            if fam.split is None:
                raise RoleError(f"training.sp_size {sp}: the {fam.name} family of roles.{name} cannot run "
                                "sequence-parallel")
            if heads is not None and heads % sp:
                raise RoleError(f"training.sp_size {sp} must divide the attention heads of roles.{name}'s model "
                                f"({heads}): each of the {sp} ranks of a sequence group attends with 1/{sp} of them")
        if adapted and not trainable:
            raise RoleError(f"roles.{name}.lora.rank {cfg.lora.rank}: the {spec.name} method does not train "
                            f"roles.{name}; merge LoRA files into it with roles.{name}.lora.frozen instead")
        if sharded and trainable and run.training.grad_transform != "autograd":
            raise RoleError(f"roles.{name} is sharded: that needs training.grad_transform 'autograd' "
                            "(torch.func.grad cannot differentiate through the sharded gather)")
        if sharded and run.training.compile:
            raise RoleError(f"roles.{name} is sharded: training.compile is not supported with sharded roles yet")
        if not (adapted or cfg.lora.frozen or cfg.lora.rank < 0):
            continue
        fam = family(cfg.family)
        check_files(fam, cfg.path, cfg.lora.frozen, f"roles.{name}.lora.frozen")
        pair = fam.experts(cfg.path) if cfg.path else None
        for expert in [None] if pair is None else pair[0]:  # an expert pair: each expert with its own files
            mcfg = fam.load_config(cfg.path if expert is None else str(Path(cfg.path) / expert))
            shapes = fam.param_shapes(mcfg)
            if cfg.lora.rank != 0:
                field = f"roles.{name}.lora"
                try:
                    names = lora.select(shapes, cfg.lora.targets, cfg.lora.rank, field)
                    if cfg.lora.init != "zeros":
                        source = lora_source(cfg.lora.init, expert, field + ".init", pair)
                        lora.check_pairs(_read(fam, mcfg, source, field + ".init"), names, cfg.lora.rank, field,
                                         source)
                except lora.LoraError as e:
                    raise RoleError(str(e)) from None


def check_files(fam: Family, path, entries, field: str) -> None:
    """RoleError naming `field` for a frozen LoRA entry (FILE or FILE:STRENGTH; for an expert pair a folder
    of one LoRA per expert, `lora_source`) that does not fit the model folder `path`; reads only the
    files and the model's config."""
    if not entries:
        return
    pair = fam.experts(path) if path else None
    for expert in [None] if pair is None else pair[0]:
        mcfg = fam.load_config(path if expert is None else str(Path(path) / expert))
        for entry in entries:
            _read(fam, mcfg, lora_source(lora.parse_frozen(entry)[0], expert, field, pair), field, diffs=True)


def merge_files(fam: Family, mcfg, params: dict, entries, field: str, expert: str | None = None, rows=None) -> dict:
    """`params` of one model (config `mcfg`; the pair's expert `expert`) with the frozen LoRA entries merged
    in at their strengths, pairs and full-tensor diffs; `rows`: the params are those rows of a sharded
    role's (fvfunc.distributed.rows_of)."""
    for entry in entries:
        file, strength = lora.parse_frozen(entry)
        pairs, diffs = _read(fam, mcfg, lora_source(file, expert, field), field, diffs=True)
        params = lora.merge_diffs(lora.merge_pairs(params, pairs, strength, rows), diffs, strength, rows)
    return params


def lora_source(path: str, expert: str | None, field: str, pair=None) -> str:
    """The LoRA file or folder of `path` (an entry of roles.<role>.lora) for one model: `path` itself, or
    for the expert `expert` of a pair (the family's `experts`: (names, boundary)) the file or folder
    `path/<expert>` or `path/<expert>.safetensors`, one LoRA per expert, as fvfunc exports a pair's
    adapters (export/lora/<expert>/). RoleError naming `field` when `path` holds none for `expert`."""
    if expert is None:
        return path
    for cand in (Path(path) / expert, Path(path) / f"{expert}.safetensors"):
        if cand.exists():
            return str(cand)
    names = pair[0] if pair else (expert,)
    raise RoleError(f"{field}: {path} has no LoRA for the expert {expert}: an expert pair takes a folder of one LoRA "
                    f"per expert, {' and '.join(f'{n}/ (or {n}.safetensors)' for n in names)}, as fvfunc exports "
                    "a pair's adapters (RUN/export/lora)")


def _read(fam: Family, mcfg, path, field: str, diffs: bool = False):
    """lora.read of a LoRA file for a model of `fam` with config `mcfg` (`diffs`: lora.read_all, its pairs
    and full-tensor diffs, for a merge); RoleError naming `field`."""
    original = fam.original_names(mcfg) if fam.original_names is not None else None
    params = fam.original_params(mcfg) if fam.original_params is not None else None
    try:
        return (lora.read_all if diffs else lora.read)(path, fam.param_shapes(mcfg), original, params)
    except lora.LoraError as e:
        raise RoleError(f"{field}: {e}") from None


def load_weights(name: str, cfg, fam: Family, device, rows=None, path=None, expert: str | None = None
                 ) -> tuple[Any, dict]:
    """(model config, params) of the folder of role `name` (its configs.RoleConfig `cfg`; `path`: the
    folder of the pair's expert `expert` instead of cfg.path) with its frozen LoRA files merged in (an
    expert its own, `lora_source`); rows: only this rank's rows of each tensor (a sharded role)."""
    mcfg, params = fam.load(path or cfg.path, dtype=DTYPES[cfg.dtype], device=device, rows=rows,
                            variant=cfg.variant)
    return mcfg, merge_files(fam, mcfg, params, cfg.lora.frozen, f"roles.{name}.lora.frozen", expert, rows)


def adapt(role: Role, cfg, field: str, key, device, expert: str | None = None) -> Role:
    """`role` (a placed base) made a LoRA role: fresh adapters of `cfg` (configs.LoraConfig) on `device`,
    or the ones of the file `cfg.init` names (for the pair's expert `expert`, its own: `lora_source`)."""
    shapes = role.family.param_shapes(role.config)
    scale = lora.scale_of(cfg.rank, cfg.alpha)
    try:
        adapters = lora.init(shapes, lora.select(shapes, cfg.targets, cfg.rank, field), cfg.rank, key, device)
        if cfg.init != "zeros":
            source = lora_source(cfg.init, expert, field + ".init")
            pairs = _read(role.family, role.config, source, field + ".init")
            adapters = lora.from_pairs(pairs, adapters, scale, field, source)
    except lora.LoraError as e:
        raise RoleError(str(e)) from None
    return role._replace(params=adapters, base=role.params, lora_scale=scale,
                         apply=lora.make_apply(role.apply, role.params, scale))


def make_apply(fam: Family, mcfg, pair: experts.Experts | None, opts: runner.Options) -> runner.Apply:
    """The apply of whole params of one model (mcfg) or of an expert pair (pair, routing its experts)."""
    if pair is None:
        return runner.make_apply(fam, mcfg, opts)
    return experts.make_apply([runner.make_apply(fam, c, opts) for c in pair.configs], pair)


def load_model(fam: Family, path, dtype=None, device=None, variant: str = "") -> tuple[Any, experts.Experts | None,
                                                                                      dict]:
    """(model config, expert pair or None, params) of a model folder, a pair's params joined."""
    pair = fam.experts(path)
    if pair is None:
        mcfg, params = fam.load(path, dtype=dtype, device=device, variant=variant)
        return mcfg, None, params
    names, boundary = pair
    loaded = [fam.load(Path(path) / n, dtype=dtype, device=device, variant=variant) for n in names]
    return (loaded[0][0], experts.Experts(tuple(names), boundary, tuple(c for c, _ in loaded)),
            experts.join({n: p for n, (_, p) in zip(names, loaded, strict=True)}))


def _rebuilt(role: Role, training, sharded: bool, sp, sparsity: float | None) -> Role:
    """`role` with its apply made anew for these runner options (a LoRA role's adapters on its base, an
    expert pair's experts each)."""
    opts = options(training, sharded, sp, sparsity)
    pair = role.experts
    configs_ = (role.config,) if pair is None else pair.configs
    bases = [role.base] if pair is None or role.base is None else list(experts.split(role.base, pair.names).values())
    applies = []
    for i, c in enumerate(configs_):
        apply = runner.make_apply(role.family, c, opts)
        if role.base is not None:
            apply = lora.make_apply(apply, bases[i], role.lora_scale)
        applies.append(apply)
    if pair is None:
        return role._replace(apply=applies[0])
    return role._replace(apply=experts.make_apply(applies, pair, together=sharded))


def at_sparsity(role: Role, training, sparsity: float, sp=None) -> Role:
    """A VSA role running at `sparsity` (a step of the warm-up, or validation's); any other role as it is."""
    if not role.vsa:
        return role
    return _rebuilt(role, training, role.sharded, sp, sparsity)


def unsharded(role: Role, training, sparsity: float | None = None) -> Role:
    """The role with an apply for whole params on this rank alone (for rank 0 to sample from whole weights,
    every token here: no sequence parallelism either); a VSA role at `sparsity` (None: the target
    training.vsa_sparsity)."""
    vsa = training.vsa_sparsity if sparsity is None else sparsity
    return _rebuilt(role, training, False, None, vsa if role.vsa else None)
