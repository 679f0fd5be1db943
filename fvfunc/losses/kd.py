"""The `kd` method: knowledge distillation of a many-step teacher's ODE trajectories into a few-step
student, the ODE initialisation of CausVid (Yin et al. 2024, arXiv:2412.07772, section 4.3) and
Self-Forcing, as FastVideo's `methods/knowledge_distillation/kd.py` trains it.

A trajectory is the teacher's ODE from pure noise: states x_s at timesteps t_s and its end x_end (the
last state, the clean sample). With the student's timesteps t_list = [t_1, ..., t_K]:

    k        ~ U{0, ..., K - 1}, per sample (from the step key and the sample's index)
    s        = argmin_s |t_s - t_k|                 the trajectory state nearest the student's timestep
    x0_pred  = x_s - sigma_k v_student(x_s, t_k)     sigma_k = t_k / 1000
    loss     = 0.5 * mean((x0_pred - x_end)^2)       in fp32 (FastVideo: 0.5 * mse_loss)

so the student learns to map a point of the teacher's trajectory to where the trajectory ends; sampled
with Euler ("ode") over t_list, each step re-noises its x0 along the predicted noise, which is the
deterministic step of such a student. FastVideo draws k once a batch; here each sample draws its own
(a batch covers several k, and the draws do not depend on micro-batching or ranks).

Trajectories come from a FastVideo `ode_trajectory_text_only` dataset (`trajectory_latents` [S, C, T,
H, W], maybe with a leading 1, `trajectory_timesteps` [S]), or, when the run names a teacher, from the
teacher itself: `prepare` samples each prompt of data.path once with UniPC (method.teacher_steps,
method.guidance_scale, a schedule through every t_list timestep) and writes the states at t_list and
the end as such a dataset, one parquet file a chunk, each written atomically: a killed generation
continues from the chunks already on disk, and the cache is refused if it was made for another run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import configs
from fvfunc import experts, optim, random
from fvfunc.autodiff import accumulate
from fvfunc.losses.spec import (
    TEXT,
    TRAJECTORY,
    TRAJECTORY_TIMESTEPS,
    BatchError,
    FastVideoKeys,
    Method,
    MethodSpec,
    Prepared,
)
from fvfunc.samplers import (
    NUM_TRAIN_TIMESTEPS,
    guided,
    model_timesteps,
    sample,
    shifted_sigmas,
    timesteps_to_sigmas,
    with_timesteps,
)
from fvfunc.state import TrainState

TRAJECTORIES = (TEXT, TRAJECTORY, TRAJECTORY_TIMESTEPS)
"""FastVideo's ode_trajectory_text_only schema, as columns."""


def student_timesteps(cfg) -> list[int]:
    """method.t_list without FastVideo's trailing 0 (its x0 target, not a step)."""
    t = [int(x) for x in cfg.t_list]
    return t[:-1] if len(t) > 1 and t[-1] == 0 else t


# ------------------------------------------------------------------------------ the pure loss


def draw_steps(key: torch.Tensor, sample_index, num_steps: int) -> torch.Tensor:
    """k per sample, uniform in [0, num_steps), from its key (its global index in the step's batch)."""
    return torch.stack([random.randint(k, (), 0, num_steps) for k in random.per_sample(key, sample_index)])


def nearest_states(trajectory_timesteps: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Per sample, the index of the trajectory state whose timestep is nearest `timesteps` [B]."""
    return (trajectory_timesteps - timesteps[:, None]).abs().argmin(dim=1)


def kd_loss(params, batch, apply):
    """0.5 * mean((x_s - sigma_k v(x_s, t_k) - x_end)^2) of one (micro-)batch carrying the student's
    timestep t [B] and the index s [B] of the state it starts from."""
    trajectory, t = batch["trajectory"], batch["t"]
    b = torch.arange(trajectory.shape[0], device=trajectory.device)
    x, target = trajectory[b, batch["state"]], trajectory[:, -1]
    sigma = (t / NUM_TRAIN_TIMESTEPS).view(-1, *([1] * (x.ndim - 1)))
    x0 = x - sigma * apply(params, x, t, batch["text"]).float()
    return 0.5 * torch.mean((x0 - target.float()) ** 2), {}


def make(run, roles, reduce=None) -> Method:
    """The kd (init, step) pair of a KDRun over its roles (the student; a teacher only makes data)."""
    cfg, training, student = run.method, run.training, roles["student"]
    timesteps = torch.tensor(student_timesteps(cfg), dtype=torch.float32)
    opt, schedule = optim.for_role(training, training.lr, training.betas, training.weight_decay, training.max_steps)

    def init(params, key):
        ema = {"student": optim.ema_init(params["student"])} if student.ema_decay > 0 else {}
        return TrainState(0, key, {"student": params["student"]},
                          {"student": experts.opt_init(opt, params["student"], student.experts)}, ema)

    def step(state: TrainState, batch: dict):
        states, stamps = batch["trajectory"].shape[1], batch["trajectory_timesteps"].shape[1]
        if states != stamps or states < 2:
            raise BatchError(f"samples {batch['ids']}: trajectory_latents holds {states} states and "
                             f"trajectory_timesteps {stamps}; kd needs one timestep a state and at least 2 states")
        key = random.fold_in(state.key, state.step)
        device = batch["trajectory"].device
        k = draw_steps(key, batch["sample_index"], len(timesteps))
        t = timesteps[k].to(device)
        s = nearest_states(batch["trajectory_timesteps"].to(device), t)
        gap = (batch["trajectory_timesteps"].to(device).gather(1, s[:, None])[:, 0] - t).abs().max()
        batch = dict(batch, t=t, state=s)
        params = state.params["student"]
        grads, value = accumulate(kd_loss, training.grad_transform, params, batch, training.micro_batches,
                                  student.apply)
        t_all = None if student.experts is None else timesteps[draw_steps(key, range(training.batch_size),
                                                                          len(timesteps))]
        params, opt_state, norm = experts.apply_gradients(opt, params, grads, state.opt["student"],
                                                          training.max_grad_norm, reduce, student.experts, t_all)
        ema = {r: optim.ema_update(e, params, student.ema_decay) for r, e in state.ema.items()}
        metrics = {"loss": value, "grad_norm": norm, "lr": schedule(state.step), "timestep_gap": gap}
        return TrainState(state.step + 1, state.key, dict(state.params, student=params), {"student": opt_state},
                          ema), metrics

    return Method(init, step)


# ------------------------------------------------------------------- the teacher's trajectories


def teacher_sigmas(cfg) -> tuple[torch.Tensor, list[int]]:
    """The teacher's schedule (float64, so UniPC's integer model timesteps come out exact: 937, not
    936), `teacher_steps` shifted sigmas with every t_list sigma merged in, and the positions of the
    t_list sigmas in it."""
    student = timesteps_to_sigmas(student_timesteps(cfg), torch.float64)[:-1]
    merged = torch.cat([shifted_sigmas(cfg.teacher_steps, cfg.flow_shift, torch.float64), student]).unique().flip(0)
    return merged, [int((merged == s).nonzero()[0]) for s in student]


def trajectories(teacher, params, text: torch.Tensor, noise: torch.Tensor, cfg,
                 uncond: torch.Tensor | None = None) -> torch.Tensor:
    """[B, K + 1, C, T, H, W]: the teacher's UniPC run from `noise`, its states at the t_list
    timesteps and its end; guided with `uncond` (the negative prompt's embedding [1, L, D]; None: zeros)."""
    sigmas, at = teacher_sigmas(cfg)
    denoise = guided(lambda x, t, c: teacher.apply(params, x, t, c).float(), text, uncond, cfg.guidance_scale)
    with torch.no_grad():
        end, states = sample(denoise, noise, sigmas.float(), "unipc", states=True,
                             timesteps=model_timesteps(sigmas, "unipc"))
    return torch.stack([states[i] for i in at] + [end], dim=1)


def _meta(run) -> dict:
    m = run.method
    return {"teacher": str(run.roles.teacher.path), "source": [str(p) for p in run.data.path],
            "t_list": student_timesteps(m), "teacher_steps": m.teacher_steps, "flow_shift": m.flow_shift,
            "guidance_scale": m.guidance_scale, "latent_shape": list(m.latent_shape), "seed": m.seed,
            "text_len": run.data.text_len, "precision": run.training.precision,
            "negative_prompt": m.negative_prompt, "negative_prompt_embedding": m.negative_prompt_embedding}


def prepare(run, roles, io):
    """With a teacher: generate (or finish generating) the trajectory cache and train on it."""
    if "teacher" not in roles:
        return None
    cfg, teacher = run.method, roles["teacher"]
    folder = Path(cfg.cache or Path(run.training.output_dir) / "trajectories")
    meta, meta_path = _meta(run), folder / "kd_cache.json"
    if io.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        if not meta_path.exists():
            meta_path.write_text(json.dumps(meta, indent=2))
    io.barrier()
    saved = json.loads(meta_path.read_text())
    if saved != meta:
        diff = sorted(k for k in meta.keys() | saved.keys() if meta.get(k) != saved.get(k))
        raise ValueError(f"{folder}: a trajectory cache made with other settings ({', '.join(diff)}: "
                         f"{[saved.get(k) for k in diff]} there, {[meta.get(k) for k in diff]} here); "
                         "set method.cache to another folder or delete this one")
    source = io.open(run.data.path, (TEXT,))
    n, chunk = len(source), cfg.chunk
    done = io.finished(folder)
    todo = [c for c in range(0, n, chunk) if not all(f"{i:08d}" in done for i in range(c, min(c + chunk, n)))]
    mine = todo if teacher.sharded else todo[io.rank::io.world_size]  # a sharded teacher needs every rank
    negative = None
    if mine and cfg.guidance_scale != 1:
        negative = io.negative(cfg.negative_prompt, cfg.negative_prompt_embedding, teacher.folder,
                               "method.negative_prompt")
    bar = io.progress(total=n, initial=n - sum(min(chunk, n - c) for c in todo), desc="kd: teacher trajectories")
    key, channels = random.key(cfg.seed), teacher.latents.channels
    for start in mine:
        index = list(range(start, min(start + chunk, n)))
        b = source.batch(index)
        noise = torch.stack([random.normal(random.fold_in(key, i), (channels, *cfg.latent_shape)) for i in index])
        traj = trajectories(teacher, teacher.params, b["text"].to(io.device), noise.to(io.device), cfg,
                            negative).cpu()
        stamps = torch.tensor([*student_timesteps(cfg), 0], dtype=torch.float32)
        rows = [{"id": f"{i:08d}", "caption": caption, "text_embedding": b["text"][j, : b["text_len"][j]],
                 "trajectory_latents": traj[j], "trajectory_timesteps": stamps, "media_type": "text",
                 "file_name": sid} for j, (i, sid, caption) in enumerate(zip(index, b["ids"], b["captions"],
                                                                              strict=True))]
        if io.rank == 0 or not teacher.sharded:
            io.write(folder / f"part-{start:08d}.parquet", rows, rows_per_group=1)
        bar.update(len(index))
    bar.close()
    io.barrier()
    return Prepared((str(folder),), TRAJECTORIES, release=("teacher",))


# ------------------------------------------------------------------------------------ the spec


def check(run) -> None:
    m = run.method
    try:
        timesteps_to_sigmas(student_timesteps(m))
    except ValueError as e:
        raise ValueError(f"method.t_list: {e}") from None
    if m.teacher_steps < 1:
        raise ValueError(f"method.teacher_steps must be >= 1, got {m.teacher_steps}")
    if not m.flow_shift > 0:
        raise ValueError(f"method.flow_shift must be > 0, got {m.flow_shift:g}")
    if m.chunk < 1:
        raise ValueError(f"method.chunk must be >= 1, got {m.chunk}")
    if not all(n >= 1 for n in m.latent_shape):
        raise ValueError(f"method.latent_shape {tuple(m.latent_shape)} must be positive (T, H, W)")


def sampler(run):
    """The validation sampler: Euler (or the sde) over t_list unless timesteps are given."""
    return with_timesteps(run.validation.sampler, student_timesteps(run.method), ("ode", "sde"))


def read_fastvideo(sections: dict, put, facts) -> None:
    """FastVideo's kd method_config keys onto KDConfig fields (teacher_path_cache -> cache,
    teacher_guidance_scale -> guidance_scale, standard CFG, teacher_inference_steps -> teacher_steps).
    A FastVideo file without teacher_guidance_scale samples the teacher unguided (FastVideo's default 1)
    and with FastVideo's default negative prompt."""
    m = sections["method_config"]
    if facts.fastvideo:
        put("method.guidance_scale", "FastVideo's default for teacher_guidance_scale", 1.0, weak=True)
        put("method.negative_prompt", "FastVideo's default negative prompt", facts.negative_prompt, weak=True)
    for key, field in (("teacher_path_cache", "cache"), ("teacher_guidance_scale", "guidance_scale"),
                       ("teacher_inference_steps", "teacher_steps")):
        if key in m:
            put(f"method.{field}", f"method_config.{key}", m[key])
    if "student_sample_steps" in m:
        steps = len(student_timesteps(configs.KDConfig(t_list=tuple(facts.value("method.t_list")))))
        if m["student_sample_steps"] != steps:
            raise ValueError(f"method_config.student_sample_steps ({m['student_sample_steps']}) must equal the "
                             f"number of t_list steps ({steps})")


SPEC = MethodSpec(
    name="kd", run=configs.KDRun,
    roles=lambda run: ("student", "teacher") if run.roles.teacher.path else ("student",), trainable=("student",),
    data=lambda run: (TEXT,) if run.roles.teacher.path else TRAJECTORIES,
    check=check, sampler=sampler, make=make, prepare=prepare,
    fastvideo=FastVideoKeys(method_config={"teacher_path_cache": str, "teacher_guidance_scale": float,
                                           "teacher_inference_steps": int, "student_sample_steps": int},
                            read=read_fastvideo, target="KDMethod"))
