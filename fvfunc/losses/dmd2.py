"""The `dmd2` method: Distribution Matching Distillation 2 (Yin et al. 2024, "Improved Distribution
Matching Distillation for Fast Image Synthesis", arXiv:2405.14867), with FastVideo's conventions.

Generator (student) step, every `generator_update_interval` steps:
    x_k      the student's input at sigma_k of its step list: `simulate` runs the student's own
             few-step SDE from pure noise without grad and stops at a uniformly chosen step k;
             `data` noises a dataset latent to sigma_k
    x0_gen   = x_k - sigma_k v_student(x_k)                               (with grad)
    sigma    the score noise level, as FastVideo draws it: an integer t0 ~ U{0, ..., 999}, shifted,
             t = 1000 shift(t0 / 1000), clamped to [int(min_ratio 1000), int(max_ratio 1000)] and
             snapped to the nearest sigma of the shifted 1000-step training grid (`score_sigmas`)
    x_t      = (1 - sigma) x0_gen + sigma noise                           (no grad from here)
    fake     = x0 of the critic at x_t
    real     = uncond + w (cond - uncond), the teacher's x0 with the prompt and with the negative
               prompt's embedding (batch["negative_text"]; zeros when the run has none), standard CFG.
               FastVideo's older form cond + w' (cond - uncond) is this one with w = w' + 1, so its
               3.5 is 4.5 here.
    g        = (fake - real) / mean(|x0_gen - real|)   (per sample; non-finite entries zeroed)
    loss     = 0.5 * mse(x0_gen, stopgrad(x0_gen - g)),  so d loss / d x0_gen = g / numel.
Critic (fake score) step, every step: a fresh student rollout without grad gives x0', and the
critic takes the plain flow-matching loss on x0' at a score sigma.

The teacher is never updated; its cond and uncond passes are one batched call.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

import configs
from fvfunc import experts, optim, random
from fvfunc.autodiff import accumulate
from fvfunc.losses.flow_matching import flow_matching_loss
from fvfunc.losses.spec import LATENTS, TEXT, FastVideoKeys, Method, MethodSpec, Prepared, condition, conditioned
from fvfunc.samplers import (
    NUM_TRAIN_TIMESTEPS,
    add_noise,
    sample,
    shift,
    timesteps_to_sigmas,
    with_timesteps,
    x0_from_v,
)
from fvfunc.state import TrainState

log = logging.getLogger("fvfunc.config_file")  # a note on reading a run file

# ------------------------------------------------------------------------------ the pure losses


def dmd_gradient(x0_gen: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """g = (fake - real) / mean(|x0_gen - real|) with the mean per sample; non-finite -> 0."""
    dims = tuple(range(1, x0_gen.ndim))
    normalizer = (x0_gen - x0_real).abs().mean(dim=dims, keepdim=True)
    g = (x0_fake - x0_real) / normalizer
    return torch.where(torch.isfinite(g), g, torch.zeros_like(g))


def distribution_matching_loss(x0_gen, x0_real, x0_fake) -> torch.Tensor:
    """0.5 * mse(x0_gen, stopgrad(x0_gen - g)), whose gradient in x0_gen is g / numel."""
    dtype = torch.promote_types(x0_gen.dtype, torch.float32)  # fp32 at least, fp64 stays fp64
    x0_gen = x0_gen.to(dtype)
    g = dmd_gradient(x0_gen.detach(), x0_real.to(dtype), x0_fake.to(dtype))
    return 0.5 * F.mse_loss(x0_gen, (x0_gen - g).detach())


def score_sigmas(t0: torch.Tensor, cfg) -> torch.Tensor:
    """The teacher / critic noise level of integer timesteps t0 in [0, 1000), FastVideo's way
    (fastvideo/distillation adapters' `shift_and_clamp_timestep`, then its scheduler's `add_noise`):
    t = 1000 shift(t0 / 1000; flow_shift), clamped to [int(1000 min_ratio), int(1000 max_ratio)], then
    the sigma of the nearest point of FlowMatchEulerDiscreteScheduler(shift)'s training grid
    sigma_j = shift(j / 1000), j = 1..1000 (float32, as FastVideo computes it). The model is called at
    t = 1000 sigma of that grid point, so its timestep and the noise it sees agree (FastVideo feeds the
    unsnapped t: at most half a grid step apart). At shift 8 and min_ratio 0.02 the smallest sigma is
    0.0236, where a clamp of a shifted continuous u would stop at shift(0.02) = 0.140."""
    s = cfg.flow_shift
    grid = shift(torch.arange(1, NUM_TRAIN_TIMESTEPS + 1, dtype=torch.float32) / NUM_TRAIN_TIMESTEPS, s)
    t = NUM_TRAIN_TIMESTEPS * shift(t0.float().cpu() / NUM_TRAIN_TIMESTEPS, s)
    t = t.clamp(int(cfg.min_timestep_ratio * NUM_TRAIN_TIMESTEPS), int(cfg.max_timestep_ratio * NUM_TRAIN_TIMESTEPS))
    nearest = (grid[None, :] * NUM_TRAIN_TIMESTEPS - t[:, None]).abs().argmin(dim=1)
    return grid[nearest].to(t0.device)


def x0_prediction(apply, params, x, sigma, context, cond=None) -> torch.Tensor:
    return x0_from_v(x, apply(params, x, sigma * 1000, context, *conditioned(cond)).float(), sigma)


def real_score(teacher, params, x_t, sigma, context, uncond, guidance, cond=None) -> torch.Tensor:
    """Teacher x0 with standard CFG; cond and uncond (the negative prompt's embedding, or zeros when
    None) in one batched call; the image condition `cond` goes with both. guidance: w, or a function
    of the timesteps [B] -> w [B] (an expert-pair teacher's per-expert weights, experts.guidance)."""
    uncond = torch.zeros_like(context) if uncond is None else uncond.to(context.dtype)
    both = teacher.apply(params, torch.cat([x_t, x_t]), torch.cat([sigma, sigma]) * 1000,
                         torch.cat([context, uncond]),
                         *conditioned({k: torch.cat([v, v]) for k, v in (cond or {}).items()})).float()
    v_cond, v_uncond = both.chunk(2)
    if callable(guidance):
        guidance = guidance(sigma * 1000).to(v_cond).view(-1, *[1] * (v_cond.ndim - 1))
    return x0_from_v(x_t, v_uncond + guidance * (v_cond - v_uncond), sigma)


def teacher_guidance(cfg, teacher):
    """The teacher's CFG weight: real_score_guidance_scale, and for an expert-pair teacher
    real_score_guidance_scale_2 at its low-noise expert's timesteps (when set)."""
    pair = teacher.experts
    return experts.guidance(cfg.real_score_guidance_scale, cfg.real_score_guidance_scale_2,
                            None if pair is None else pair.boundary)


def generator_loss(student_params, batch, models, params, cfg):
    """DMD loss of one (micro-)batch; `batch` carries the student's input x_k at sigma_k and the
    score noise / sigma drawn for it."""
    cond = condition(batch)  # the image condition: the same for the student, the critic and the teacher
    x0_gen = x0_prediction(models["student"].apply, student_params, batch["x_k"], batch["sigma_k"],
                           batch["text"], cond)
    with torch.no_grad():
        x_t = add_noise(x0_gen.detach(), batch["score_noise"], batch["score_sigma"])
        fake = x0_prediction(models["critic"].apply, params["critic"], x_t, batch["score_sigma"], batch["text"],
                             cond)
        real = real_score(models["teacher"], params["teacher"], x_t, batch["score_sigma"], batch["text"],
                          batch.get("negative_text"), teacher_guidance(cfg, models["teacher"]), cond)
    return distribution_matching_loss(x0_gen, real, fake), {}


def critic_loss(critic_params, batch, models):
    """Flow-matching loss of the critic on the student's samples x0' (no grad to the student)."""
    x0, noise, sigma = batch["x0_fake"], batch["score_noise"], batch["score_sigma"]
    x_t = add_noise(x0, noise, sigma)
    v = models["critic"].apply(critic_params, x_t, sigma * 1000, batch["text"], *conditioned(condition(batch)))
    return flow_matching_loss(v, x0, noise, sigma), {}


# ------------------------------------------------------------------------------------ rollouts


def draw(key, sample_index, shape, num_steps, device):
    """Per-sample draws: rollout noise for each step [B, num_steps, *shape], score noise [B, *shape],
    the score's integer timestep t0 in [0, 1000) [B] and the few-step index k in [0, num_steps) [B].
    Each sample draws its own k (FastVideo draws one per rank, i.e. per sample at its batch size of
    1), from its index in the global batch: a batch covers several k, the same however many ranks and
    micro-batches share it."""
    rollout, score, t0 = [], [], []
    for key_b in random.per_sample(key, sample_index):
        k_roll, k_score, k_t, _ = random.split(key_b, 4)
        rollout.append(torch.stack([random.normal(random.fold_in(k_roll, j), shape, device=device)
                                    for j in range(num_steps)]))
        score.append(random.normal(k_score, shape, device=device))
        t0.append(random.randint(k_t, (1,), 0, NUM_TRAIN_TIMESTEPS))
    return torch.stack(rollout), torch.stack(score), torch.cat(t0).to(device), step_indices(key, sample_index,
                                                                                             num_steps)


def step_indices(key, sample_index, num_steps: int) -> torch.Tensor:
    """Each sample's few-step index k [B] in [0, num_steps), from its own key (the 4th of `draw`'s)."""
    return torch.cat([random.randint(random.split(k, 4)[3], (1,), 0, num_steps)
                      for k in random.per_sample(key, sample_index)])


def score_timesteps(key, sample_index) -> torch.Tensor:
    """The score's integer t0 [B] that `draw` gives the samples `sample_index` (the 3rd of its keys),
    without their noise: the whole global batch's, for every rank to agree on a pair's experts."""
    return torch.cat([random.randint(random.split(k, 4)[2], (1,), 0, NUM_TRAIN_TIMESTEPS)
                      for k in random.per_sample(key, sample_index)])


def rollout_steps(key, batch_size: int, num_steps: int) -> int:
    """The largest k of the global batch (samples 0..batch_size - 1): every rank runs that many rollout
    steps, so a sharded student gathers its blocks the same number of times on every rank whatever k
    its own samples drew."""
    return int(step_indices(key, range(batch_size), num_steps).max())


@torch.no_grad()
def student_input(student, params, batch, sigmas, k: torch.Tensor, mode: str, last: int | None = None) -> torch.Tensor:
    """x_k: each sample's input at sigmas[k_b] (k [B] on the CPU). simulate: k_b steps of the student's own
    SDE sampler from pure noise (rollout_noise[:, 0]), re-noising step j with rollout_noise[:, j + 1]
    (the batch runs `last` >= max(k) steps together, default max(k), and each sample keeps its state at
    its own k_b); data: the latent noised to sigma_k."""
    noise = batch["rollout_noise"]
    sigma_k = sigmas[k].to(noise.device)
    if mode == "data":
        return add_noise(batch["latents"], noise[:, 0], sigma_k)
    last = int(k.max()) if last is None else last
    if last == 0:
        return noise[:, 0]
    cond = condition(batch)  # simulate: the rollout's image condition is the dataset row's
    denoise = lambda x, t: student.apply(params, x, t, batch["text"], *conditioned(cond)).float()  # noqa: E731
    end, states = sample(denoise, noise[:, 0], sigmas[:last + 1], "sde", noise=lambda j: noise[:, j + 1],
                         states=True)
    states = torch.stack([*states, end])  # [last + 1, B, ...]: the state at sigmas[0..last]
    return states[k.to(noise.device), torch.arange(noise.shape[0], device=noise.device)]


def make(run, roles, reduce=None) -> Method:
    """The DMD2 (init, step) pair of a DMD2Run over its roles (student, teacher, critic); `reduce`
    averages gradients over data-parallel ranks (None: one process)."""
    cfg, training = run.method, run.training
    sigmas = timesteps_to_sigmas(cfg.dmd_denoising_steps)
    num_steps = len(cfg.dmd_denoising_steps)
    interval = cfg.generator_update_interval
    student_updates = -(-training.max_steps // interval)
    opt_s, sched_s = optim.for_role(training, training.lr, training.betas, training.weight_decay, student_updates)
    opt_c, sched_c = optim.for_role(training, cfg.critic_lr, cfg.critic_betas, cfg.critic_weight_decay,
                                    training.max_steps)
    student, channels = roles["student"], roles["student"].latents.channels
    decays = {r: roles[r].ema_decay for r in SPEC.trainable if roles[r].ema_decay > 0}

    everyone = range(training.batch_size)  # the global batch: what every rank's expert steps are decided on

    def init(params, key):
        ema = {r: optim.ema_init(params[r]) for r in decays}
        opt = {"student": experts.opt_init(opt_s, params["student"], student.experts),
               "critic": experts.opt_init(opt_c, params["critic"], roles["critic"].experts)}
        return TrainState(0, key, dict(params), opt, ema)

    def prepare(key, batch, student_params):
        """Draw this phase's noises and step k, and roll the student out to x_k (no grad)."""
        text = batch["text"]
        shape = batch["latents"].shape[1:] if cfg.rollout_mode == "data" else (channels, *cfg.latent_shape)
        rollout_noise, score_noise, t0, k = draw(key, batch["sample_index"], shape, num_steps, text.device)
        batch = dict(batch, rollout_noise=rollout_noise, score_noise=score_noise, score_sigma=score_sigmas(t0, cfg))
        last = max(rollout_steps(key, training.batch_size, num_steps), int(k.max()))
        x_k = student_input(student, student_params, batch, sigmas, k, cfg.rollout_mode, last)
        sigma_k = sigmas[k].to(text.device)
        return dict(batch, x_k=x_k, sigma_k=sigma_k)

    def step(state: TrainState, batch: dict):
        key = random.fold_in(state.key, state.step)
        params, opt, ema = dict(state.params), dict(state.opt), dict(state.ema)
        metrics = {}
        if state.step % interval == 0:
            gen_key = random.fold_in(key, 0)
            gen_batch = prepare(gen_key, batch, params["student"])
            grads, value = accumulate(generator_loss, training.grad_transform, params["student"], gen_batch,
                                      training.micro_batches, roles, params, cfg)
            # a student pair steps the experts that the global batch's step sigmas were routed to
            t_gen = sigmas[step_indices(gen_key, everyone, num_steps)] * 1000
            params["student"], opt["student"], norm = experts.apply_gradients(
                opt_s, params["student"], grads, opt["student"], training.max_grad_norm, reduce, student.experts,
                t_gen)
            metrics.update(generator_loss=value, student_grad_norm=norm, student_lr=sched_s(state.step // interval))
        # the critic learns the current student's distribution: a fresh rollout, no grad to the student
        critic_key = random.fold_in(key, 1)
        critic_batch = prepare(critic_key, batch, params["student"])
        with torch.no_grad():
            critic_batch["x0_fake"] = x0_prediction(student.apply, params["student"], critic_batch["x_k"],
                                                    critic_batch["sigma_k"], critic_batch["text"],
                                                    condition(critic_batch))
        grads, value = accumulate(critic_loss, training.grad_transform, params["critic"], critic_batch,
                                  training.micro_batches, roles)
        t_critic = score_sigmas(score_timesteps(critic_key, everyone), cfg) * 1000
        params["critic"], opt["critic"], norm = experts.apply_gradients(
            opt_c, params["critic"], grads, opt["critic"], training.max_grad_norm, reduce, roles["critic"].experts,
            t_critic)
        for r, decay in decays.items():
            if r == "critic" or state.step % interval == 0:  # an EMA moves when its role does
                ema[r] = optim.ema_update(ema[r], params[r], decay)
        metrics.update(critic_loss=value, critic_grad_norm=norm, critic_lr=sched_c(state.step),
                       student_updated=float(state.step % interval == 0))
        return TrainState(state.step + 1, state.key, params, opt, ema), metrics

    return Method(init, step)


# ------------------------------------------------------------------------------------ the spec


def check(run) -> None:
    """The DMD2 fields that cannot work, named (the timestep list is checked by the samplers' rules)."""
    m = run.method
    try:
        timesteps_to_sigmas(list(m.dmd_denoising_steps))
    except ValueError as e:
        raise ValueError(f"method.dmd_denoising_steps: {e}") from None
    if not m.flow_shift > 0:
        raise ValueError(f"method.flow_shift must be > 0, got {m.flow_shift:g}")
    if m.generator_update_interval < 1:
        raise ValueError(f"method.generator_update_interval must be >= 1, got {m.generator_update_interval}")
    if not 0 <= m.min_timestep_ratio < m.max_timestep_ratio <= 1:
        raise ValueError("method.min_timestep_ratio and max_timestep_ratio must satisfy 0 <= min < max <= 1, "
                         f"got {m.min_timestep_ratio:g} and {m.max_timestep_ratio:g}")
    if m.real_score_guidance_scale_2 is not None:
        from fvfunc.models import family

        if not math.isfinite(m.real_score_guidance_scale_2):
            raise ValueError(f"method.real_score_guidance_scale_2 must be finite, got {m.real_score_guidance_scale_2}")
        teacher = run.roles.teacher
        if teacher.path and family(teacher.family).experts(teacher.path) is None:
            raise ValueError(f"method.real_score_guidance_scale_2 is the low-noise expert's CFG weight of an expert-"
                             f"pair teacher, but roles.teacher.path {teacher.path} is one model")
    if not (math.isfinite(m.critic_lr) and m.critic_lr > 0):
        raise ValueError(f"method.critic_lr must be > 0, got {m.critic_lr:g}")
    if not all(0 <= b < 1 for b in m.critic_betas):
        raise ValueError(f"method.critic_betas {tuple(m.critic_betas)} must each be in [0, 1)")
    if m.critic_weight_decay < 0:
        raise ValueError(f"method.critic_weight_decay must be >= 0, got {m.critic_weight_decay:g}")
    if not all(n >= 1 for n in m.latent_shape):
        raise ValueError(f"method.latent_shape {tuple(m.latent_shape)} must be positive (T, H, W)")


def prepare(run, roles, io) -> Prepared:
    """The teacher's uncond, once before training: the negative prompt's embedding (its file, or its text
    encoded with the teacher folder's umT5), added to every batch as "negative_text"; none: zeros."""
    m = run.method
    negative = io.negative(m.negative_prompt, m.negative_prompt_embedding, roles["teacher"].folder,
                           "method.negative_prompt")
    return Prepared(batch={} if negative is None else {"negative_text": negative})


def sampler(run):
    """The validation sampler: the student's own SDE over its step list unless timesteps are given."""
    return with_timesteps(run.validation.sampler, run.method.dmd_denoising_steps, ("sde",))


_TRAINING_KEYS = {"generator_update_interval": int, "min_timestep_ratio": float, "max_timestep_ratio": float,
                  "dmd_denoising_steps": list[int]}
_CRITIC_KEYS = {"fake_score_learning_rate": float, "fake_score_betas": tuple[float, float] | str,
                "fake_score_lr_scheduler": str, "simulate_generator_forward": bool, "warp_denoising_step": bool}
_READ_HERE = {"real_score_guidance_scale": float, "rollout_mode": str}  # FastVideo writes these its own way
_ROLLOUT_MODES = {"simulate": "simulate", "sim": "simulate", "data": "data", "data_latent": "data",
                  "vae_latent": "data"}
# What FastVideo takes for the DMD2 keys a file omits: (its schema-v2 TrainingArgs, fastvideo/train's DMD2Method)
_DEFAULTS = {"fastvideo": {"min_timestep_ratio": 0.2, "max_timestep_ratio": 0.98, "generator_update_interval": 5,
                           "real_score_guidance_scale": 3.5},
             "fastvideo-train": {"min_timestep_ratio": 0.0, "max_timestep_ratio": 1.0, "generator_update_interval": 1,
                                 "real_score_guidance_scale": 1.0}}


def read_fastvideo(sections: dict, put, facts) -> None:
    """FastVideo's DMD2 keys (its schema-v2 TrainingArgs in training:, method_config:, pipeline_config:;
    fastvideo/train's method: arrives as method_config) onto DMD2Config fields:

        training / method_config.generator_update_interval, method.<same name>
          min/max_timestep_ratio, dmd_denoising_steps
        pipeline_config.dmd_denoising_steps          method.dmd_denoising_steps
        real_score_guidance_scale                    method.real_score_guidance_scale: in a schema-v2
                                                       FastVideo file it is FastVideo's cond + w (cond -
                                                       uncond), so w + 1 here (3.5 -> 4.5, with a note);
                                                       fastvideo/train and fvfunc files use the standard
                                                       uncond + w (cond - uncond), read as is
        method_config.rollout_mode                   simulate | data (FastVideo's data_latent is data)
        training/method_config.fake_score_learning_rate  method.critic_lr (0 or absent: the student's lr)
        training/method_config.fake_score_betas      method.critic_betas (absent: 0.9, 0.999)
        (absent)                                     method.critic_weight_decay = training.weight_decay
        training/method_config.fake_score_lr_scheduler  must name the student's schedule (fvfunc
                                                       shapes every role's learning rate alike)
        training/method_config.simulate_generator_forward  method.rollout_mode (true -> simulate)
        training/method_config.warp_denoising_step   false only (warping is not implemented)
        training.training_cfg_rate                   must be 0 (DMD2 drops no text)
        training.num_latent_t, num_height, num_width method.latent_shape through the student's VAE
          (num_frames)                                 compression (T from (num_frames - 1) / 4 + 1
                                                       without num_latent_t, for Wan's VAE)
        training.validation_guidance_scale           unused: a DMD2 student samples without CFG

    Keys a FastVideo file omits take FastVideo's defaults (`_DEFAULTS`; the negative prompt is FastVideo's
    default one), and the step list becomes validation.sampler.timesteps unless the file sets them."""
    t, m, p = sections["training"], sections["method_config"], sections["pipeline_config"]
    if t.get("training_cfg_rate", 0.0) != 0.0:
        raise ValueError("training.training_cfg_rate: fvfunc's dmd2 drops no text; set it to 0")
    for k in _TRAINING_KEYS:
        if k in t:
            put(f"method.{k}", f"training.{k}", t[k])
    if "dmd_denoising_steps" in p:
        put("method.dmd_denoising_steps", "pipeline_config.dmd_denoising_steps", p["dmd_denoising_steps"])
    _guidance(t, m, put, facts)
    if "rollout_mode" in m:
        mode = str(m["rollout_mode"]).strip().lower()
        if mode not in _ROLLOUT_MODES:
            raise ValueError(f"method_config.rollout_mode: expected simulate or data (FastVideo's data_latent), "
                             f"got {m['rollout_mode']!r}")
        put("method.rollout_mode", "method_config.rollout_mode", _ROLLOUT_MODES[mode])
    for section, keys in (("training", t), ("method_config", m)):
        if "fake_score_learning_rate" in keys:
            lr = keys["fake_score_learning_rate"]
            if lr == 0.0:  # FastVideo: 0 means "the student's learning rate"
                lr = facts.value("training.lr")
            put("method.critic_lr", f"{section}.fake_score_learning_rate", lr)
        if "fake_score_betas" in keys:
            put("method.critic_betas", f"{section}.fake_score_betas",
                facts.betas(keys["fake_score_betas"], f"{section}.fake_score_betas"))
        if "fake_score_lr_scheduler" in keys:  # fvfunc shapes every role's lr alike: it must agree
            where = f"{section}.fake_score_lr_scheduler"
            critic = facts.schedule(keys["fake_score_lr_scheduler"], where)
            student = facts.value("training.lr_schedule")
            if critic != student:
                raise ValueError(f"{where}: the critic's schedule ({critic}) must match the student's ({student}); "
                                 "fvfunc shapes every role's learning rate alike")
        if "simulate_generator_forward" in keys:
            put("method.rollout_mode", f"{section}.simulate_generator_forward",
                "simulate" if keys["simulate_generator_forward"] else "data")
        if keys.get("warp_denoising_step", False):
            raise ValueError(f"{section}.warp_denoising_step: not implemented in fvfunc; set it to false")
    shape_keys = [k for k in ("num_latent_t", "num_frames", "num_height", "num_width") if k in t]
    if shape_keys:  # the size of the videos the student generates in simulate mode
        T, H, W = configs.DMD2Config().latent_shape
        if "num_frames" in t:
            T = (t["num_frames"] - 1) // facts.temporal + 1
        T = t.get("num_latent_t", T)
        H = facts.latent_size(t, "num_height", H)
        W = facts.latent_size(t, "num_width", W)
        put("method.latent_shape", f"training.{shape_keys[0]}", (T, H, W))
    if facts.fastvideo:
        default = f"FastVideo's default ({facts.layout})"
        for k, v in _DEFAULTS[facts.layout].items():
            if k != "real_score_guidance_scale":
                put(f"method.{k}", default, v, weak=True)
        put("method.critic_lr", default, facts.value("training.lr"), weak=True)
        put("method.critic_betas", default, (0.9, 0.999), weak=True)
        put("method.critic_weight_decay", "training.weight_decay", facts.value("training.weight_decay"), weak=True)
        put("method.negative_prompt", default, facts.negative_prompt, weak=True)
    steps = facts.value("method.dmd_denoising_steps", None)
    if steps is not None:  # FastVideo samples a DMD2 student over its own step list
        put("validation.sampler.timesteps", facts.source("method.dmd_denoising_steps"), steps, weak=True)


def _guidance(t: dict, m: dict, put, facts) -> None:
    """real_score_guidance_scale, from method_config (or a schema-v2 file's training:), in the file's form."""
    section = "method_config" if "real_score_guidance_scale" in m else "training"
    keys = m if section == "method_config" else t
    given = "real_score_guidance_scale" in keys
    if not given and not facts.fastvideo:
        return
    w = keys["real_score_guidance_scale"] if given else _DEFAULTS[facts.layout]["real_score_guidance_scale"]
    where = f"{section}.real_score_guidance_scale" if given else f"FastVideo's default ({facts.layout})"
    if facts.layout == "fastvideo":  # FastVideo's schema-v2 DMD2: real = cond + w (cond - uncond)
        log.warning("note: %s = %g is FastVideo's cond + w (cond - uncond), which is fvfunc's standard "
                    "uncond + w (cond - uncond) with w = %g; the run uses %g", where, w, w + 1, w + 1)
        w = w + 1
    put("method.real_score_guidance_scale", where, float(w), weak=not given)


SPEC = MethodSpec(
    name="dmd2", run=configs.DMD2Run, roles=lambda run: ("student", "teacher", "critic"),
    trainable=("student", "critic"),
    data=lambda run: (TEXT, LATENTS) if run.method.rollout_mode == "data" else (TEXT,),
    check=check, sampler=sampler, make=make, prepare=prepare,
    fastvideo=FastVideoKeys(training={**_TRAINING_KEYS, **_CRITIC_KEYS, "real_score_guidance_scale": float},
                            method_config={**_CRITIC_KEYS, **_READ_HERE},
                            pipeline_config={"dmd_denoising_steps": list[int]}, read=read_fastvideo,
                            target="DMD2Method"))
