"""The training loop: method-agnostic, family-agnostic.

`run(method, cfg)` loads each role through the family registry, builds the method's pure
(init, step) pair, restores the newest checkpoint when asked, and then steps, logs, checkpoints and
validates. It knows nothing about DMD2 or Wan: a method is `fvfunc.losses.METHODS[name]`, a model a
module of `fvfunc.models.FAMILIES`.

Under torchrun (`torchrun --nproc-per-node N train.py METHOD ...`) every rank runs this same loop
(fvfunc/distributed.py): it reads its slice of the global batch, gradients are averaged over ranks,
metrics are averaged, and rank 0 alone logs, validates and exports; a role with
`sharding: sharded` holds 1/N of its params and optimizer state on each rank, and every rank writes
its piece of a checkpoint.
"""

from __future__ import annotations

import functools
import logging
import math
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fvfunc import checkpoint, config_file, data, distributed, optim, random, tracking
from fvfunc.losses import METHODS
from fvfunc.losses.state import Model, TrainState
from fvfunc.models import family
from fvfunc.ops.attention import fa4_problem

log = logging.getLogger("fvfunc")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a checkpoint that does not fit the run)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------------ the roles


def role_model(fam, model_cfg, training, gather=None) -> Model:
    """A role's Model: the family's apply with the run's compute dtype, attention, remat and compile,
    and `gather` (fvfunc.distributed.gather) when its params are sharded."""
    apply = functools.partial(_apply, fam.apply, model_cfg, DTYPES[training.precision], training.attention,
                              training.remat, training.remat_fraction, training.compile, gather)
    return Model(apply, fam.latent_channels(model_cfg))


def place_role(fam, model_cfg, params, cfg, process, sharding: str) -> tuple[dict, Model]:
    """(params on this rank, Model) of one role: whole on `process.device`, or, for a sharded role in a
    run of several ranks, this rank's rows of each leaf as `fam.load(..., rows=distributed.rows_of(process))`
    read them, made DTensors, and an apply that gathers."""
    if sharding == "sharded" and process.world_size > 1:
        if cfg.training.compile:
            raise TrainingError("training.compile is not supported with sharded roles yet")
        shapes = fam.param_shapes(model_cfg)
        return ({k: distributed.from_rows(v, shapes[k], process.mesh, process.device) for k, v in params.items()},
                role_model(fam, model_cfg, cfg.training, distributed.gather))
    return {k: v.to(process.device) for k, v in params.items()}, role_model(fam, model_cfg, cfg.training)


def load_roles(method, cfg, process) -> tuple[dict, dict, dict]:
    """(params, model configs, Models) of the roles the method needs."""
    params, model_cfgs, models = {}, {}, {}
    for name in method.ROLES:
        role = getattr(cfg.roles, name)
        fam = family(role.family)
        sharded = role.sharding == "sharded" and process.world_size > 1
        if sharded and name in method.TRAINABLE and cfg.training.grad_transform != "autograd":
            raise TrainingError(f"roles.{name} is sharded: that needs training.grad_transform 'autograd' "
                                "(torch.func.grad cannot differentiate through the sharded gather)")
        # a sharded role: each rank reads only its rows of every tensor (on the CPU), never the whole model
        mcfg, p = fam.load(role.path, dtype=DTYPES[role.dtype], device="cpu" if sharded else process.device,
                           rows=distributed.rows_of(process) if sharded else None)
        params[name], models[name] = place_role(fam, mcfg, p, cfg, process, role.sharding)
        model_cfgs[name] = mcfg
    return params, model_cfgs, models


def _apply(fam_apply, mcfg, dtype, attention, remat, remat_fraction, compile, gather, params, x, t, context):
    # the family compiles per block (one graph serves every layer), which starts far faster than
    # compiling the whole apply
    extra = {} if gather is None else {"gather": gather}
    return fam_apply(params, mcfg, x, t, context, dtype=dtype, attention=attention, remat=remat,
                     remat_fraction=remat_fraction, compile=compile, **extra)


# ------------------------------------------------------------------------------ state <-> disk


def state_trees(state: TrainState, trainable) -> dict:
    trees = {"state": {"key": state.key}}
    for role in trainable:
        trees[role] = state.params[role]
        trees[f"{role}.opt"] = optim.state_to_tree(state.opt[role])
    if state.ema is not None:
        trees["ema"] = state.ema
    return trees


def _like(templates: dict, saved: dict, where: str) -> dict:
    """Saved tensors laid out as the run holds them: on its device, sharded where the run shards."""
    try:
        return {k: distributed.like(templates[k], v) for k, v in saved.items()}
    except ValueError as e:
        raise TrainingError(f"{where}: {e}") from None


def restore(state: TrainState, trees: dict, meta: dict, trainable, where) -> TrainState:
    """`state` with the trainable roles, optimizer states, EMA, key and step of a checkpoint."""
    params, opt = dict(state.params), dict(state.opt)
    for role in trainable:
        if role not in trees or f"{role}.opt" not in trees:
            raise TrainingError(f"{where}: checkpoint has no '{role}' params or optimizer state")
        saved = trees[role]
        if saved.keys() != params[role].keys():
            raise TrainingError(f"{where}: '{role}' params do not match the model "
                                f"(differences: {sorted(saved.keys() ^ params[role].keys())[:3]})")
        params[role] = _like(params[role], saved, f"{where}: {role}")
        o = optim.state_from_tree(trees[f"{role}.opt"])
        opt[role] = optim.AdamWState(o.step, _like(state.opt[role].mu, o.mu, f"{where}: {role}.opt"),
                                     _like(state.opt[role].nu, o.nu, f"{where}: {role}.opt"))
    ema = state.ema
    if ema is not None:
        if "ema" not in trees:
            raise TrainingError(f"{where}: the run keeps an EMA but the checkpoint has none")
        ema = _like(state.ema, trees["ema"], f"{where}: ema")
    return TrainState(int(meta["step"]), trees["state"]["key"], params, opt, ema)


# -------------------------------------------------------------------------------------- the loop


class _Stop:
    """SIGINT / SIGTERM ask the loop to save a checkpoint and stop after the current step."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def run(method_name: str, cfg) -> Path:
    """Train; returns the output folder. Raises TrainingError on a run that cannot go on.

    Under torchrun every rank calls this (it starts the process group from the environment and ends
    it), as it does inside a process group its caller started; alone, it is a one-process run."""
    process = distributed.init(cfg.training.device)
    clean = False
    try:
        out = _run(method_name, cfg, process)
        clean = True
        return out
    finally:
        distributed.shutdown(process, clean)


def whole_student(state: TrainState, use_ema: bool) -> TrainState:
    """`state` with the student's params (its EMA instead, when kept and `use_ema`) whole on every rank,
    for validation and export; every rank must call it when the student is sharded."""
    if use_ema and state.ema is not None:
        return state._replace(ema=distributed.whole(state.ema))
    return state._replace(params=dict(state.params, student=distributed.whole(state.params["student"])))


def _run(method_name: str, cfg, process: distributed.Process) -> Path:
    rank, world = process.rank, process.world_size
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    method = METHODS[method_name]
    tcfg = cfg.training
    out = Path(tcfg.output_dir)
    device = process.device
    torch.manual_seed(tcfg.seed)  # only for libraries that read the global RNG; fvfunc uses keys
    if tcfg.batch_size % world or (tcfg.batch_size // world) % tcfg.micro_batches:
        raise TrainingError(f"training.batch_size {tcfg.batch_size} must split evenly into {world} rank(s) x "
                            f"{tcfg.micro_batches} micro-batch(es)")

    if tcfg.attention == "fa4" and (problem := fa4_problem(device)):
        raise TrainingError(f"training.attention 'fa4' cannot run: {problem}")

    resume_from = checkpoint.resolve(out, tcfg.resume)
    if resume_from is None and checkpoint.list_checkpoints(out):
        raise TrainingError(f"{out} already holds checkpoints; pass --training.resume latest to continue, "
                            "or choose another --training.output-dir")
    distributed.barrier(process)  # every rank has looked before rank 0 writes anything

    # data first: it is cheap to open and its errors should come before minutes of model loading
    need_latents = method.needs_latents(cfg.method)
    stats = data.latents_stats(cfg.roles.student.path) if cfg.data.normalize_latents else None
    dataset = data.ParquetDataset(cfg.data.path, need_latents=need_latents, text_len=cfg.data.text_len,
                                  latent_stats=stats, cache_groups=max(4, 2 * cfg.data.shuffle_window))

    params, model_cfgs, models = load_roles(method, cfg, process)
    trainable = method.TRAINABLE
    step_fn = method.make(cfg.method, tcfg, models, distributed.make_reduce(process))
    state = step_fn.init(params, random.key(tcfg.seed))
    del params
    position, meta = (0, 0), None
    if resume_from is not None:
        trees, meta = checkpoint.load(resume_from, shard=(rank, world))
        state = restore(state, trees, meta, trainable, resume_from)
        del trees
        position = tuple(meta["data_position"])
        log.info("resumed from %s at step %d", resume_from, state.step)

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        config_file.write(out / "config.yaml", method_name, cfg)
    run_config = config_file.dump(method_name, cfg)
    per_rank = tcfg.batch_size // world
    loader = data.Loader(dataset, per_rank, tcfg.seed, position, rank, world, cfg.data.num_workers,
                         shuffle=cfg.data.shuffle, window=cfg.data.shuffle_window)
    if loader.shuffle == "groups":
        log.info("data: row groups of up to %d rows, read %d at a time (data.shuffle groups)",
                 dataset.max_group_rows(), cfg.data.shuffle_window)
    order = [loader.shuffle, loader.window]  # with the seed, what makes the data order
    if meta is not None and meta.get("data_order", order) != order:
        log.warning("resuming with data order %s, but %s was saved with %s: the batches from here on differ "
                    "from the uninterrupted run's", order, resume_from, meta["data_order"])
    index = torch.arange(per_rank) + rank * per_rank  # a sample's index in the global batch
    sync = distributed.exchange(process)

    def save(state):
        meta = {"step": state.step, "method": method_name, "data_position": list(loader.position), "data_order": order,
                "roles": {r: getattr(cfg.roles, r).path for r in method.ROLES}, "config": run_config,
                "world_size": world}
        whole, pieces = distributed.pieces(state_trees(state, trainable))
        path = checkpoint.save(out, state.step, whole, meta, tcfg.keep_checkpoints, shards=pieces, rank=rank,
                               world_size=world, sync=sync)
        log.info("saved %s", path)

    student_sharded = distributed.is_sharded(state.params["student"])
    validator = None
    if cfg.validation.every > 0 and rank == 0:
        from fvfunc import validation
        student = models["student"]
        if student_sharded:  # rank 0 samples alone, from the whole student
            student = role_model(family(cfg.roles.student.family), model_cfgs["student"], tcfg)
        validator = validation.Validator(method_name, cfg, dict(models, student=student), model_cfgs, dataset,
                                         out, device)

    def validate(state):
        if student_sharded:
            state = whole_student(state, cfg.validation.use_ema)
        if validator is not None:
            validator(state, tracker)
        distributed.barrier(process)

    tracker = tracking.Tracker(out, cfg.tracking, run_config, rank, None if meta is None else state.step)
    bar = tqdm(total=tcfg.max_steps, initial=state.step, disable=rank != 0, dynamic_ncols=True,
               file=sys.stderr, desc=method_name)
    last_saved = state.step if resume_from is not None else -1
    stopping = None  # the signal that stops the run, once every rank knows of it
    try:
        with tracker, loader, _Stop() as stop:
            while state.step < tcfg.max_steps and stopping is None:
                t0 = time.perf_counter()
                batch = dict(to_device(next(loader), device), sample_index=index)
                state, metrics = step_fn.step(state, batch)
                metrics = {k: distributed.scalar(v) for k, v in metrics.items()}
                # one all-reduce: the metrics' means over ranks, and whether any rank was asked to stop
                stop_asked = float(stop.signal is not None)
                metrics = distributed.mean_over_ranks(process, dict(metrics, _stop=stop_asked))
                if metrics.pop("_stop") > 0:
                    stopping = stop.signal or "a signal to another rank"
                bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
                if bad:
                    names = ", ".join(f"{k} = {v}" for k, v in bad.items())
                    raise TrainingError(f"step {state.step}: non-finite {names}; the last checkpoint is "
                                        "intact (resume with --training.resume latest)")
                metrics["step_time"] = time.perf_counter() - t0
                if state.step % tcfg.log_every == 0 or state.step == tcfg.max_steps:
                    tracker.log(state.step, metrics)
                shown = {k: f"{v:.4g}" for k, v in metrics.items() if "loss" in k or k == "step_time"}
                bar.set_postfix(shown, refresh=False)
                bar.update(1)
                if tcfg.checkpoint_every and state.step % tcfg.checkpoint_every == 0:
                    save(state)
                    last_saved = state.step
                if cfg.validation.every > 0 and state.step % cfg.validation.every == 0:
                    validate(state)
            if last_saved != state.step:
                save(state)
            if stopping is not None:
                log.info("%s: stopped at step %d; resume with --training.resume latest", stopping, state.step)
                return out
            if cfg.validation.every > 0 and state.step % cfg.validation.every != 0:
                validate(state)
    finally:
        bar.close()
    if tcfg.export:
        whole = whole_student(state, use_ema=True) if student_sharded else state
        if rank == 0:
            export(out / "export", cfg, model_cfgs["student"], whole)
        distributed.barrier(process)
    return out


def export(folder: Path, cfg, model_cfg, state: TrainState) -> Path:
    """The student (its EMA when kept) as a diffusers folder, in the role's dtype."""
    fam = family(cfg.roles.student.family)
    params = state.ema if state.ema is not None else state.params["student"]
    params = {k: v.to(DTYPES[cfg.roles.student.dtype]) for k, v in params.items()}
    fam.save(folder / "transformer", model_cfg, params)
    log.info("exported the student%s to %s", " (EMA)" if state.ema is not None else "", folder)
    return folder

