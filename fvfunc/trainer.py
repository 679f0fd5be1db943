"""The training loop: method-agnostic, family-agnostic.

`run(method, cfg)` loads each role through the family registry, builds the method's pure
(init, step) pair, restores the newest checkpoint when asked, and then steps, logs, checkpoints and
validates. It knows nothing about DMD2 or Wan: a method is `fvfunc.losses.METHODS[name]`, a model a
module of `fvfunc.models.FAMILIES`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fvfunc import checkpoint, config_file, data, optim, random, tracking
from fvfunc.losses import METHODS
from fvfunc.losses.state import Model, TrainState
from fvfunc.models import family

log = logging.getLogger("fvfunc")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a checkpoint that does not fit the run)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------------ the roles


def load_roles(method, cfg, device) -> tuple[dict, dict, dict]:
    """(params, model configs, Models) of the roles the method needs."""
    compute = DTYPES[cfg.training.precision]
    params, model_cfgs, models = {}, {}, {}
    for name in method.ROLES:
        role = getattr(cfg.roles, name)
        fam = family(role.family)
        mcfg, p = fam.load(role.path, dtype=DTYPES[role.dtype], device=device)
        apply = functools.partial(_apply, fam.apply, mcfg, compute, cfg.training.attention, cfg.training.remat)
        if cfg.training.compile:
            apply = torch.compile(apply)
        params[name], model_cfgs[name] = p, mcfg
        models[name] = Model(apply, fam.latent_channels(mcfg))
    return params, model_cfgs, models


def _apply(fam_apply, mcfg, dtype, attention, remat, params, x, t, context):
    return fam_apply(params, mcfg, x, t, context, dtype=dtype, attention=attention, remat=remat)


# ------------------------------------------------------------------------------ state <-> disk


def state_trees(state: TrainState, trainable) -> dict:
    trees = {"state": {"key": state.key}}
    for role in trainable:
        trees[role] = state.params[role]
        trees[f"{role}.opt"] = optim.state_to_tree(state.opt[role])
    if state.ema is not None:
        trees["ema"] = state.ema
    return trees


def restore(state: TrainState, trees: dict, meta: dict, trainable, device, where) -> TrainState:
    """`state` with the trainable roles, optimizer states, EMA, key and step of a checkpoint."""
    params, opt = dict(state.params), dict(state.opt)
    for role in trainable:
        if role not in trees or f"{role}.opt" not in trees:
            raise TrainingError(f"{where}: checkpoint has no '{role}' params or optimizer state")
        saved = trees[role]
        if saved.keys() != params[role].keys():
            raise TrainingError(f"{where}: '{role}' params do not match the model "
                                f"(differences: {sorted(saved.keys() ^ params[role].keys())[:3]})")
        params[role] = {k: v.to(device) for k, v in saved.items()}
        o = optim.state_from_tree(trees[f"{role}.opt"])
        opt[role] = optim.AdamWState(o.step, *({k: v.to(device) for k, v in m.items()} for m in (o.mu, o.nu)))
    ema = state.ema
    if ema is not None:
        if "ema" not in trees:
            raise TrainingError(f"{where}: the run keeps an EMA but the checkpoint has none")
        ema = {k: v.to(device) for k, v in trees["ema"].items()}
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
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run(method_name: str, cfg, rank: int = 0, world_size: int = 1, reduce=None) -> Path:
    """Train; returns the output folder. Raises TrainingError on a run that cannot go on."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    method = METHODS[method_name]
    tcfg = cfg.training
    out = Path(tcfg.output_dir)
    device = resolve_device(tcfg.device)
    torch.manual_seed(tcfg.seed)  # only for libraries that read the global RNG; fvfunc uses keys

    resume_from = checkpoint.resolve(out, tcfg.resume)
    if resume_from is None and checkpoint.list_checkpoints(out):
        raise TrainingError(f"{out} already holds checkpoints; pass --training.resume latest to continue, "
                            "or choose another --training.output-dir")

    # data first: it is cheap to open and its errors should come before minutes of model loading
    need_latents = method.needs_latents(cfg.method)
    stats = data.latents_stats(cfg.roles.student.path) if cfg.data.normalize_latents else None
    dataset = data.ParquetDataset(cfg.data.path, need_latents=need_latents, text_len=cfg.data.text_len,
                                  latent_stats=stats)

    params, model_cfgs, models = load_roles(method, cfg, device)
    trainable = method.TRAINABLE
    step_fn = method.make(cfg.method, tcfg, models, reduce)
    state = step_fn.init(params, random.key(tcfg.seed))
    position, meta = (0, 0), None
    if resume_from is not None:
        trees, meta = checkpoint.load(resume_from)
        state = restore(state, trees, meta, trainable, device, resume_from)
        position = tuple(meta["data_position"])
        log.info("resumed from %s at step %d", resume_from, state.step)

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        config_file.write(out / "config.yaml", method_name, cfg)
    run_config = config_file.dump(method_name, cfg)
    per_rank = tcfg.batch_size // world_size
    loader = data.Loader(dataset, per_rank, tcfg.seed, position, rank, world_size, cfg.data.num_workers)
    index = torch.arange(per_rank) + rank * per_rank  # a sample's index in the global batch

    def save(state):
        meta = {"step": state.step, "method": method_name, "data_position": list(loader.position),
                "roles": {r: getattr(cfg.roles, r).path for r in method.ROLES}, "config": run_config}
        if rank == 0:
            path = checkpoint.save(out, state.step, state_trees(state, trainable), meta, tcfg.keep_checkpoints)
            log.info("saved %s", path)

    validate = None
    if cfg.validation.every > 0:
        from fvfunc import validation
        validate = validation.Validator(method_name, cfg, models, model_cfgs, dataset, out, device)

    tracker = tracking.Tracker(out, cfg.tracking, run_config, rank, None if meta is None else state.step)
    bar = tqdm(total=tcfg.max_steps, initial=state.step, disable=rank != 0, dynamic_ncols=True,
               file=sys.stderr, desc=method_name)
    last_saved = state.step if resume_from is not None else -1
    try:
        with tracker, loader, _Stop() as stop:
            while state.step < tcfg.max_steps and stop.signal is None:
                t0 = time.perf_counter()
                batch = dict(to_device(next(loader), device), sample_index=index)
                state, metrics = step_fn.step(state, batch)
                metrics = {k: float(v) for k, v in metrics.items()}
                bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
                if bad:
                    raise TrainingError(f"step {state.step}: non-finite {', '.join(f'{k} = {v}' for k, v in bad.items())}; "
                                        f"the last checkpoint is intact (resume with --training.resume latest)")
                metrics["step_time"] = time.perf_counter() - t0
                if state.step % tcfg.log_every == 0 or state.step == tcfg.max_steps:
                    tracker.log(state.step, metrics)
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if "loss" in k or k == "step_time"},
                                refresh=False)
                bar.update(1)
                if tcfg.checkpoint_every and state.step % tcfg.checkpoint_every == 0:
                    save(state)
                    last_saved = state.step
                if validate and state.step % cfg.validation.every == 0:
                    validate(state, tracker)
            if last_saved != state.step:
                save(state)
            if stop.signal is not None:
                log.info("%s: stopped at step %d; resume with --training.resume latest", stop.signal, state.step)
                return out
            if validate and state.step % cfg.validation.every != 0:
                validate(state, tracker)
    finally:
        bar.close()
    if tcfg.export and rank == 0:
        export(out / "export", cfg, model_cfgs["student"], state)
    return out


def export(folder: Path, cfg, model_cfg, state: TrainState) -> Path:
    """The student (its EMA when kept) as a diffusers folder, in the role's dtype."""
    fam = family(cfg.roles.student.family)
    params = state.ema if state.ema is not None else state.params["student"]
    params = {k: v.to(DTYPES[cfg.roles.student.dtype]) for k, v in params.items()}
    fam.save(folder / "transformer", model_cfg, params)
    log.info("exported the student%s to %s", " (EMA)" if state.ema is not None else "", folder)
    return folder


def replace(cfg, **sections):
    """A run config with some sections replaced (tests and benchmarks)."""
    return dataclasses.replace(cfg, **sections)
