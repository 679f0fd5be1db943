"""The training loop: method-agnostic, family-agnostic.

`run(method, cfg)` reads the method's spec (fvfunc/losses/<method>.py), opens exactly the data columns
the spec asks for, builds the roles (fvfunc/roles.py), lets the method prepare its data if it does
(kd: the teacher's trajectories), builds the method's pure (init, step) pair, restores the newest
checkpoint when asked, and then steps, logs, checkpoints and validates. It knows no method or family
by name.

Under torchrun (`torchrun --nproc-per-node N train.py METHOD ...`) every rank runs this same loop
(fvfunc/distributed.py): it reads its slice of the global batch, gradients are averaged over ranks,
metrics are averaged, and rank 0 alone logs, validates and exports; a role with
`sharding: sharded` holds 1/N of its params and optimizer state on each rank, and every rank writes
its piece of a checkpoint. With training.sp_size S the ranks of each group of S read the same samples
(the data-parallel slice of their group) and share each sample's tokens (sequence parallelism).
"""

from __future__ import annotations

import functools
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm import tqdm

from fvfunc import checkpoint, config_file, data, distributed, export, random, resume, roles, tracking
from fvfunc.config_file import ConfigError
from fvfunc.losses import METHODS
from fvfunc.losses.spec import DataIO, MethodSpec
from fvfunc.models import family
from fvfunc.ops import vsa
from fvfunc.ops.attention import fa4_problem
from fvfunc.state import StateError, TrainState, from_trees, to_trees

log = logging.getLogger("fvfunc")


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a checkpoint that does not fit the run)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    process = distributed.init(cfg.training.device, cfg.training.sp_size)
    clean = False
    try:
        out = _run(METHODS[method_name], cfg, process)
        clean = True
        return out
    finally:
        distributed.shutdown(process, clean)


# ----------------------------------------------------------------------------------------- setup


class Setup(NamedTuple):
    """Everything a run is made of, once it is set up."""

    spec: MethodSpec
    cfg: Any
    process: distributed.Process
    out: Path
    roles: dict[str, roles.Role]
    step: Any
    """The method's step function."""
    dataset: data.ParquetDataset
    resume_from: Path | None
    meta: dict | None
    """The resumed checkpoint's meta, or None."""
    run_config: dict
    """The resolved run as config_file.dump writes it."""
    constants: dict
    """Tensors [1, ...] added to every batch, repeated per sample (Prepared.batch)."""
    record: dict
    """What every checkpoint's meta keeps of the run, for a resume to be checked against (resume.record)."""


def open_dataset(run, columns, paths=None) -> data.ParquetDataset:
    """The run's dataset of `columns` (normalised with the student's VAE statistics when asked)."""
    student = run.roles.student
    stats = None
    if run.data.normalize_latents and student.path:
        fam = family(student.family)
        facts = fam.latents(fam.load_config(student.path), student.path)
        stats = None if facts.mean is None else (facts.mean, facts.std)
    return data.ParquetDataset(run.data.path if paths is None else paths, columns, text_len=run.data.text_len,
                               latent_stats=stats, cache_groups=max(4, 2 * run.data.shuffle_window),
                               num_latent_t=run.data.num_latent_t)


def condition_columns(run) -> tuple:
    """The image-condition columns the student's family takes (fvfunc.models.Family.conditions): the
    required ones, and the optional ones (Wan2.2 TI2V's first frame) when the data's first file has them."""
    from fvfunc.losses.spec import CONDITIONS

    student = run.roles.student
    if not student.path:
        return ()
    fam = family(student.family)
    wanted = fam.conditions(fam.load_config(student.path))
    optional = [n for n, required in wanted.items() if not required]
    present = data.columns_in(run.data.path) if optional else set()
    return tuple(CONDITIONS[n] for n, required in wanted.items() if required or f"{n}_bytes" in present)


def data_io(run, process) -> DataIO:
    """The infra a method's `prepare` may use."""
    def progress(total, initial=0, desc=""):
        return tqdm(total=total, initial=initial, desc=desc, disable=process.rank != 0, file=sys.stderr,
                    dynamic_ncols=True)

    def negative(prompt, embedding_file, folder, field):
        from fvfunc import text

        return text.negative_embedding(prompt, embedding_file, folder, run.data.text_len, field, process.device)

    def write(*args, **kwargs):  # a sequence group makes one copy of its data: its first rank writes it
        if process.sp is None or process.sp.rank == 0:
            data.write_atomic(*args, **kwargs)

    # a sequence group is one data-parallel rank: its ranks make the same data together
    return DataIO(open=lambda path, columns: open_dataset(run, columns, path), write=write,
                  finished=data.ids_in, progress=progress, rank=process.dp_rank, world_size=process.dp_size,
                  barrier=lambda: distributed.barrier(process), device=process.device, negative=negative,
                  conditions=condition_columns(run))


def _resolve(out: Path, resume: str, process: distributed.Process) -> Path | None:
    """The checkpoint to resume from (fvfunc.checkpoint.resolve, on rank 0, told to every rank);
    damaged or incomplete newer checkpoints that `latest` passed over are reported and renamed aside
    (`checkpoint-<step>.damaged`), so this run's own save of that step cannot overwrite them."""
    found = None
    if process.rank == 0:
        try:
            r = checkpoint.resolve(out, resume)
            for path, _ in r.skipped:
                aside = path.with_name(f"{path.name}.damaged")
                n = 1
                while aside.exists():
                    n += 1
                    aside = path.with_name(f"{path.name}.damaged-{n}")
                path.rename(aside)
            found = (r.path, [(p, why, p.with_name(f"{p.name}.damaged")) for p, why in r.skipped], None)
        except (checkpoint.CheckpointError, OSError) as e:
            found = (None, [], str(e))
        removed = checkpoint.clean(out)  # what a killed save or prune left behind
        if removed:
            log.info("removed %s, left by an interrupted checkpoint save or prune",
                     ", ".join(p.name for p in removed))
    sync = distributed.exchange(process)
    if sync is not None:
        found = sync(found)[0]
    path, skipped, error = found
    if error is not None:
        raise ConfigError(f"training.resume {resume!r}: {error}")
    for p, why, aside in skipped:
        log.warning("training.resume latest: passed over %s (%s); it is kept as %s, delete it when done", p.name,
                    why, aside.name)
    return path


def last_checkpoint_note(out: Path) -> str:
    found = checkpoint.latest(out)
    if found is None:
        return "no checkpoint was written yet"
    return f"the last checkpoint, {found}, is intact (resume with --training.resume latest)"


def _check_fit(spec: MethodSpec, cfg, dataset: data.ParquetDataset) -> None:
    """The data against the models' config files, before any model loads: text width, latent channels,
    and one batch's worth of samples."""
    for name in spec.roles(cfg):
        role = getattr(cfg.roles, name)
        fam = family(role.family)
        model_cfg = fam.load_config(role.path)
        width, channels = fam.text_width(model_cfg), fam.latents(model_cfg, role.path).channels
        for column in dataset.spec:
            shape = dataset.first_shapes.get(column.key) or ()
            if column.kind == "text" and shape and width is not None and shape[-1] != width:
                raise ConfigError(f"data.path: {dataset.first_file} holds {column.what} {shape[-1]} wide, but the "
                                  f"model of roles.{name}.path takes text_dim {width}")
            if column.kind == "latents" and len(shape) >= 4 and shape[-4] != channels:
                raise ConfigError(f"data.path: {dataset.first_file} holds {column.what} of {shape[-4]} channels, "
                                  f"but the model of roles.{name}.path takes {channels}")
    sp = cfg.training.sp_size
    for column in dataset.spec if sp > 1 else ():
        shape = dataset.first_shapes.get(column.key) or ()
        if column.kind == "latents" and len(shape) >= 3:
            patch = fam_patch(cfg)
            tokens = math.prod(s // p for s, p in zip(shape[-3:], patch, strict=True))
            if tokens % sp:
                raise ConfigError(f"training.sp_size {sp} must divide the tokens of a sample: {dataset.first_file} "
                                  f"holds {column.what} of shape {list(shape)}, {tokens} tokens")
    if len(dataset) < cfg.training.batch_size:
        raise ConfigError(f"training.batch_size {cfg.training.batch_size} is more than the dataset's "
                          f"{len(dataset)} samples (data.path); lower it or add data (DIR:N repeats a folder)")


def fam_patch(run) -> tuple[int, ...]:
    """The student's patch size (latent cells a token covers), from its config file."""
    fam = family(run.roles.student.family)
    return fam.latents(fam.load_config(run.roles.student.path), run.roles.student.path).patch


def _setup(spec: MethodSpec, cfg, process: distributed.Process) -> tuple[Setup, TrainState, tuple[int, int]]:
    rank, world, t = process.rank, process.world_size, cfg.training
    out = Path(t.output_dir)
    if world % t.sp_size:
        raise ConfigError(f"training.sp_size {t.sp_size} must divide the number of processes ({world}; "
                          f"torchrun --nproc-per-node N with N a multiple of {t.sp_size})")
    dp = process.dp_size
    if t.batch_size % dp or (t.batch_size // dp) % t.micro_batches:
        raise ConfigError(f"training.batch_size {t.batch_size} must split evenly into {dp} data-parallel rank(s) x "
                          f"{t.micro_batches} micro-batch(es)")
    if t.attention == "fa4" and (problem := fa4_problem(process.device)):
        raise TrainingError(f"training.attention 'fa4' cannot run: {problem}")
    resume_from = _resolve(out, t.resume, process)
    if resume_from is None and checkpoint.steps_in(out):
        raise ConfigError(f"training.output_dir: {out} already holds checkpoints; pass --training.resume latest "
                          "to continue, or choose another --training.output-dir")
    distributed.barrier(process)  # every rank has looked before rank 0 writes anything

    # data first: it is cheap to open and its errors should come before minutes of model loading
    try:
        dataset = open_dataset(cfg, spec.data(cfg) + condition_columns(cfg))
    except data.DataError as e:
        raise ConfigError(f"data.path: {e}") from None
    _check_fit(spec, cfg, dataset)
    try:
        roles.check(cfg, spec, world)  # sharding and LoRA settings, from the config files alone
    except roles.RoleError as e:
        raise ConfigError(str(e)) from None
    needed = spec.roles(cfg)
    record = resume.record(cfg, needed, {r: family(getattr(cfg.roles, r).family) for r in needed}, dataset)
    meta = None
    if resume_from is not None:
        meta = checkpoint.read_meta(resume_from)
        try:
            notes = resume.check(meta, record, spec.name, needed, t.allow_changes, str(resume_from))
        except resume.Refused as e:
            raise ConfigError(f"training.resume: {e}") from None
        for note in notes:
            log.warning("%s", note)
    try:
        built = roles.build(cfg, spec, process)
    except roles.RoleError as e:
        raise TrainingError(str(e)) from None
    constants = {}  # entries of every batch the method asked for (prepare's Prepared.batch)
    if spec.prepare is not None:
        try:
            prepared = spec.prepare(cfg, built, data_io(cfg, process))
        except data.DataError:
            raise
        except ValueError as e:  # the method's own, already clear refusal (e.g. a cache of another run)
            raise TrainingError(str(e)) from None
        if prepared is not None and prepared.paths is not None:
            dataset = open_dataset(cfg, prepared.columns, prepared.paths)
        if prepared is not None:
            constants = dict(prepared.batch)
            for name in prepared.release:  # e.g. a teacher only needed to make the data
                del built[name]
    method = spec.make(cfg, built, distributed.make_reduce(process))
    data_key, step_key = random.split(random.key(t.seed), 2)  # one key per purpose
    state = method.init({name: r.params for name, r in built.items()}, step_key)
    built = {name: r._replace(params=None) for name, r in built.items()}  # the state holds the params now
    position = (0, 0)
    if resume_from is not None:
        trees, meta = checkpoint.load(resume_from, shard=(rank, world), verify=False)  # resolve checked it
        try:
            state = from_trees(state, trees, meta["step"], spec.trainable, distributed.like)
        except StateError as e:
            raise TrainingError(f"{resume_from}: {e}") from None
        del trees
        position = tuple(meta["data_position"])
        log.info("resumed from %s at step %d", resume_from, state.step)
    run_config = config_file.dump(spec.name, cfg)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        config_file.write(out / "config.yaml", spec.name, cfg)
    setup = Setup(spec, cfg, process, out, built, _steps(spec, cfg, built, method, process), dataset, resume_from,
                  meta, run_config, constants, record)
    return setup, state, (position, data_key)


def _steps(spec: MethodSpec, cfg, built: dict, method, process: distributed.Process):
    """step(state, batch): the method's step, its VSA roles at the sparsity of the state's step
    (fvfunc.ops.vsa.sparsity_at: FastVideo's warm-up, a function of the step alone, so a resumed run takes
    the sparsities of the uninterrupted one); one step function per sparsity, made when first needed."""
    t = cfg.training
    if not any(r.vsa for r in built.values()):
        return method.step
    made = {t.vsa_sparsity: method.step}  # the roles were built at the target

    def step(state, batch):
        s = vsa.sparsity_at(state.step, t.vsa_sparsity, t.vsa_decay_rate, t.vsa_decay_interval_steps)
        if s not in made:
            at = {name: roles.at_sparsity(r, t, s) for name, r in built.items()}
            made[s] = spec.make(cfg, at, distributed.make_reduce(process)).step
        state, metrics = made[s](state, batch)
        return state, dict(metrics, vsa_sparsity=s)  # the sparsity this step ran at (FastVideo logs it too)

    return step


def whole_student(state: TrainState, use_ema: bool) -> TrainState:
    """`state` with the student's params (its EMA instead, when kept and `use_ema`) whole on every rank,
    for validation and export; every rank must call it when the student is sharded."""
    if use_ema and "student" in state.ema:
        return state._replace(ema=dict(state.ema, student=distributed.whole(state.ema["student"])))
    return state._replace(params=dict(state.params, student=distributed.whole(state.params["student"])))


def _sampling_student(s: Setup, student: roles.Role, whole: bool) -> roles.Role:
    """The student as validation samples it on rank 0: at the validation sparsity (VSA: the target, as
    FastVideo validates, or validation.vsa_sparsity), and when `whole` (sharded params or base, or
    sequence parallel) with an apply of its own for whole params, every token on rank 0."""
    t = s.cfg.training
    sparsity = t.vsa_sparsity if s.cfg.validation.vsa_sparsity < 0 else s.cfg.validation.vsa_sparsity
    if whole or s.process.sp is not None:
        return roles.unsharded(student, t, sparsity)
    return roles.at_sparsity(student, t, sparsity)


def _validator(s: Setup, student_sharded: bool):
    if s.cfg.validation.every <= 0 or s.process.rank != 0:
        return None
    from fvfunc import validation

    student = _sampling_student(s, s.roles["student"], student_sharded)
    return validation.Validator(s.cfg, s.spec.sampler(s.cfg), student, s.dataset, s.out, s.process.device)


def _base_on_shards(role: roles.Role) -> bool:
    """A LoRA role whose frozen base is sharded (ZeRO-3) while its adapters are whole on every rank."""
    return role.base is not None and role.sharded


def _whole_base(s: Setup) -> roles.Role:
    """The LoRA student with its sharded base gathered whole (every rank must call it)."""
    student = s.roles["student"]
    return student._replace(base=distributed.whole(student.base))


# ------------------------------------------------------------------------------------------ loop


def _loader(s: Setup, position, data_key) -> data.Loader:
    cfg, process = s.cfg, s.process
    # the ranks of a sequence group read the same slice: their data-parallel group's
    loader = data.Loader(s.dataset, cfg.training.batch_size // process.dp_size, data_key, position, process.dp_rank,
                         process.dp_size, cfg.data.num_workers, shuffle=cfg.data.shuffle,
                         window=cfg.data.shuffle_window)
    if loader.shuffle == "groups":
        log.info("data: row groups of up to %d rows, read %d at a time (data.shuffle groups)",
                 s.dataset.max_group_rows(), cfg.data.shuffle_window)
    order = [loader.shuffle, loader.window]  # with the seed, what makes the data order
    if s.meta is not None and s.meta.get("data_order", order) != order:
        log.warning("resuming with data order %s, but %s was saved with %s: the batches from here on differ "
                    "from the uninterrupted run's", order, s.resume_from, s.meta["data_order"])
    return loader


def _save(s: Setup, state: TrainState, loader: data.Loader, sync) -> None:
    """One checkpoint of the state (every rank calls it; each writes its pieces of sharded trees)."""
    p, cfg = s.process, s.cfg
    meta = {"step": state.step, "method": s.spec.name, "data_position": list(loader.position),
            "data_order": [loader.shuffle, loader.window], "roles": {r: getattr(cfg.roles, r).path
                                                                     for r in s.spec.roles(cfg)},
            "config": s.run_config, "world_size": p.world_size, **s.record}
    whole, pieces = distributed.pieces(to_trees(state, s.spec.trainable))
    try:
        path = checkpoint.save(s.out, state.step, whole, meta, cfg.training.keep_checkpoints, shards=pieces,
                               rank=p.rank, world_size=p.world_size, sync=sync)
    except checkpoint.CheckpointError as e:
        raise TrainingError(f"{e}; {last_checkpoint_note(s.out)}") from None
    log.info("saved %s", path)


def _run(spec: MethodSpec, cfg, process: distributed.Process) -> Path:
    s, state, (position, data_key) = _setup(spec, cfg, process)
    t, rank = cfg.training, process.rank
    loader = _loader(s, position, data_key)
    per_rank = loader.batch_size
    index = torch.arange(per_rank) + process.dp_rank * per_rank  # a sample's index in the global batch
    constants = {k: v.expand(per_rank, *v.shape[1:]) for k, v in s.constants.items()}
    sync = distributed.exchange(process)
    save = functools.partial(_save, s, loader=loader, sync=sync)
    student_sharded = distributed.is_sharded(state.params["student"])
    base_sharded = _base_on_shards(s.roles["student"])
    validator = _validator(s, student_sharded or base_sharded)

    def validate(state):
        if student_sharded:
            state = whole_student(state, cfg.validation.use_ema)
        if base_sharded:  # every rank gathers the LoRA student's base; rank 0 samples on it, then lets it go
            whole = _whole_base(s)
            if validator is not None:
                on_shards, validator.student = validator.student, _sampling_student(s, whole, True)
        if validator is not None:
            validator(state, tracker)
            if base_sharded:
                validator.student = on_shards
        distributed.barrier(process)

    tracker = tracking.Tracker(s.out, cfg.tracking, s.run_config, rank, None if s.meta is None else state.step)
    bar = tqdm(total=t.max_steps, initial=state.step, disable=rank != 0, dynamic_ncols=True, file=sys.stderr,
               desc=spec.name)
    last_saved = state.step if s.resume_from is not None else -1
    stopping = None  # the signal that stops the run, once every rank knows of it
    try:
        with tracker, loader, _Stop() as stop:
            while state.step < t.max_steps and stopping is None:
                t0 = time.perf_counter()
                batch = dict(to_device(next(loader), process.device), sample_index=index, **constants)
                state, metrics = s.step(state, batch)
                metrics = {k: distributed.scalar(v) for k, v in metrics.items()}
                # one all-reduce: the metrics' means over ranks, and whether any rank was asked to stop
                metrics = distributed.mean_over_ranks(process, dict(metrics, _stop=float(stop.signal is not None)))
                if metrics.pop("_stop") > 0:
                    stopping = stop.signal or "a signal to another rank"
                _check_finite(state.step, metrics, s.out)
                metrics["step_time"] = time.perf_counter() - t0
                if state.step % t.log_every == 0 or state.step == t.max_steps:
                    tracker.log(state.step, metrics)
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if "loss" in k or k == "step_time"},
                                refresh=False)
                bar.update(1)
                if t.checkpoint_every and state.step % t.checkpoint_every == 0:
                    save(state)
                    last_saved = state.step
                if cfg.validation.every > 0 and state.step % cfg.validation.every == 0:
                    validate(state)
            if last_saved != state.step:
                save(state)
            if stopping is not None:
                log.info("%s: stopped at step %d; resume with --training.resume latest", stopping, state.step)
                return s.out
            if cfg.validation.every > 0 and state.step % cfg.validation.every != 0:
                validate(state)
    finally:
        bar.close()
    _finish(s, state, student_sharded)
    return s.out


def _check_finite(step: int, metrics: dict, out: Path) -> None:
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        names = ", ".join(f"{k} = {v}" for k, v in bad.items())
        raise TrainingError(f"step {step}: non-finite {names}; {last_checkpoint_note(out)}")


# ---------------------------------------------------------------------------------------- finish


def _finish(s: Setup, state: TrainState, student_sharded: bool) -> None:
    if s.cfg.training.export:
        whole = whole_student(state, use_ema=True) if student_sharded else state
        student = _whole_base(s) if _base_on_shards(s.roles["student"]) else s.roles["student"]
        if s.process.rank == 0:
            export_student(s.out / "export", student, whole, s.cfg)
        distributed.barrier(s.process)


def export_student(folder: Path, student: roles.Role, state: TrainState, run) -> Path:
    """The student (its EMA when kept) as a diffusers pipeline folder (fvfunc/export.py); a LoRA
    student's merged into its base, with its adapters in folder/lora."""
    params = state.ema.get("student", state.params["student"])
    adapters = None
    if student.base is not None:
        params, adapters = student.base, params
    export.export(folder, student.family, student.config, params, student.folder, run.training.export_dtype,
                  run.roles.student.variant, adapters=adapters, lora_scale=student.lora_scale, pair=student.experts)
    log.info("exported the student%s%s to %s", " (EMA)" if "student" in state.ema else "",
             " (merged, and its LoRA in lora/)" if adapters is not None else "", folder)
    return folder
