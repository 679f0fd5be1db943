"""The `dmd2` method: Distribution Matching Distillation 2 (Yin et al. 2024, "Improved Distribution
Matching Distillation for Fast Image Synthesis", arXiv:2405.14867), with FastVideo's conventions.

Generator (student) step, every `generator_update_interval` steps:
    x_k      the student's input at sigma_k of its step list: `simulate` runs the student's own
             few-step SDE from pure noise without grad and stops at a uniformly chosen step k;
             `data` noises a dataset latent to sigma_k
    x0_gen   = x_k - sigma_k v_student(x_k)                               (with grad)
    sigma    = clamp(shift(u; flow_shift), min_ratio, max_ratio), u ~ U(min_ratio, max_ratio)
    x_t      = (1 - sigma) x0_gen + sigma noise                           (no grad from here)
    fake     = x0 of the critic at x_t
    real     = uncond + w (cond - uncond), the teacher's x0 with / without text, standard CFG.
               FastVideo's older form cond + w' (cond - uncond) is this one with w = w' + 1, so its
               3.5 is 4.5 here.
    g        = (fake - real) / mean(|x0_gen - real|)   (per sample; non-finite entries zeroed)
    loss     = 0.5 * mse(x0_gen, stopgrad(x0_gen - g)),  so d loss / d x0_gen = g / numel.
Critic (fake score) step, every step: a fresh student rollout without grad gives x0', and the
critic takes the plain flow-matching loss on x0' at a score sigma.

The teacher is never updated; its cond and uncond passes are one batched call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fvfunc import random
from fvfunc.losses.state import Method, Model, TrainState, accumulate, make_optimizer, sample_keys, update
from fvfunc.optim import ema_update
from fvfunc.samplers import add_noise, sde_step, shift, timesteps_to_sigmas, x0_from_v

ROLES = ("student", "teacher", "critic")
TRAINABLE = ("student", "critic")


def needs_latents(cfg) -> bool:
    return cfg.rollout_mode == "data"


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


def score_sigmas(u: torch.Tensor, cfg) -> torch.Tensor:
    """Map u ~ U(min_ratio, max_ratio) to the teacher / critic noise level (shifted, clamped)."""
    return shift(u, cfg.flow_shift).clamp(cfg.min_timestep_ratio, cfg.max_timestep_ratio)


def x0_prediction(apply, params, x, sigma, context) -> torch.Tensor:
    return x0_from_v(x, apply(params, x, sigma * 1000, context).float(), sigma)


def real_score(teacher: Model, params, x_t, sigma, context, guidance: float) -> torch.Tensor:
    """Teacher x0 with standard CFG; cond and uncond (zero text) in one batched call."""
    both = teacher.apply(params, torch.cat([x_t, x_t]), torch.cat([sigma, sigma]) * 1000,
                         torch.cat([context, torch.zeros_like(context)])).float()
    v_cond, v_uncond = both.chunk(2)
    return x0_from_v(x_t, v_uncond + guidance * (v_cond - v_uncond), sigma)


def generator_loss(student_params, batch, models, params, cfg):
    """DMD loss of one (micro-)batch; `batch` carries the student's input x_k at sigma_k and the
    score noise / sigma drawn for it."""
    x0_gen = x0_prediction(models["student"].apply, student_params, batch["x_k"], batch["sigma_k"],
                           batch["text"])
    with torch.no_grad():
        x_t = add_noise(x0_gen.detach(), batch["score_noise"], batch["score_sigma"])
        fake = x0_prediction(models["critic"].apply, params["critic"], x_t, batch["score_sigma"], batch["text"])
        real = real_score(models["teacher"], params["teacher"], x_t, batch["score_sigma"], batch["text"],
                          cfg.real_score_guidance_scale)
    return distribution_matching_loss(x0_gen, real, fake), {}


def critic_loss(critic_params, batch, models):
    """Flow-matching loss of the critic on the student's samples x0' (no grad to the student)."""
    x0, noise, sigma = batch["x0_fake"], batch["score_noise"], batch["score_sigma"]
    x_t = add_noise(x0, noise, sigma)
    v = models["critic"].apply(critic_params, x_t, sigma * 1000, batch["text"]).float()
    return torch.mean((v - (noise.float() - x0.float())) ** 2), {}


# ------------------------------------------------------------------------------------ rollouts


def draw(key, sample_index, shape, num_steps, device):
    """Per-sample noises: rollout noise for each step [B, num_steps, *shape], score noise [B, *shape]
    and u for the score sigma [B]."""
    rollout, score, u = [], [], []
    for k in sample_keys(key, sample_index):
        k_roll, k_score, k_u = random.split(k, 3)
        rollout.append(torch.stack([random.normal(random.fold_in(k_roll, j), shape, device=device)
                                    for j in range(num_steps)]))
        score.append(random.normal(k_score, shape, device=device))
        u.append(random.uniform(k_u, (1,), device=device))
    return torch.stack(rollout), torch.stack(score), torch.cat(u)


@torch.no_grad()
def student_input(student: Model, params, batch, sigmas, k: int, mode: str) -> torch.Tensor:
    """x_k: the student's input at sigmas[k]. simulate: k SDE steps of the student from pure noise
    (rollout_noise[:, 0]), re-noising with rollout_noise[:, j + 1]; data: the latent noised to sigma_k."""
    noise = batch["rollout_noise"]
    if mode == "data":
        return add_noise(batch["latents"], noise[:, 0], sigmas[k].item())
    x = noise[:, 0]
    for j in range(k):
        v = student.apply(params, x, torch.full((x.shape[0],), sigmas[j].item() * 1000, device=x.device),
                          batch["text"])
        x = sde_step(x, v.float(), sigmas[j].item(), sigmas[j + 1].item(), noise[:, j + 1])
    return x


def make(cfg, training, models: dict[str, Model], reduce=None) -> Method:
    """The DMD2 (init, step) pair for a DMD2Config `cfg` and a TrainingConfig; `reduce` averages
    gradients over data-parallel ranks (None: one process)."""
    sigmas = timesteps_to_sigmas(cfg.dmd_denoising_steps)
    num_steps = len(cfg.dmd_denoising_steps)
    interval = cfg.generator_update_interval
    student_updates = -(-training.max_steps // interval)
    opt_s, sched_s = make_optimizer(training, training.lr, training.betas, training.weight_decay, student_updates)
    opt_c, sched_c = make_optimizer(training, cfg.critic_lr, cfg.critic_betas, cfg.critic_weight_decay,
                                    training.max_steps)
    channels = models["student"].latent_channels

    def init(params, key):
        ema = None
        if training.ema_decay > 0:
            ema = {k: v.detach().float().clone() for k, v in params["student"].items()}
        opt = {"student": opt_s.init(params["student"]), "critic": opt_c.init(params["critic"])}
        return TrainState(0, key, dict(params), opt, ema)

    def prepare(key, batch, student_params):
        """Draw this phase's noises and step k, and roll the student out to x_k (no grad)."""
        text = batch["text"]
        shape = batch["latents"].shape[1:] if cfg.rollout_mode == "data" else (channels, *cfg.latent_shape)
        rollout_noise, score_noise, u = draw(key, batch["sample_index"], shape, num_steps, text.device)
        k = int(random.randint(random.fold_in(key, -1), (), 0, num_steps))
        u = cfg.min_timestep_ratio + (cfg.max_timestep_ratio - cfg.min_timestep_ratio) * u
        batch = dict(batch, rollout_noise=rollout_noise, score_noise=score_noise, score_sigma=score_sigmas(u, cfg))
        x_k = student_input(models["student"], student_params, batch, sigmas, k, cfg.rollout_mode)
        sigma_k = torch.full((text.shape[0],), sigmas[k].item(), device=text.device)
        return dict(batch, x_k=x_k, sigma_k=sigma_k)

    def step(state: TrainState, batch: dict):
        key = random.fold_in(state.key, state.step)
        params, opt, ema = dict(state.params), dict(state.opt), state.ema
        metrics = {}
        if state.step % interval == 0:
            gen_batch = prepare(random.fold_in(key, 0), batch, params["student"])
            grads, value = accumulate(generator_loss, training.grad_transform, params["student"], gen_batch,
                                      training.micro_batches, models, params, cfg)
            params["student"], opt["student"], norm = update(opt_s, params["student"], grads, opt["student"],
                                                              training.max_grad_norm, reduce)
            if ema is not None:
                ema = ema_update(ema, params["student"], training.ema_decay)
            metrics.update(generator_loss=value, student_grad_norm=norm,
                           student_lr=sched_s(int(opt["student"].step) - 1))
        # the critic learns the current student's distribution: a fresh rollout, no grad to the student
        critic_batch = prepare(random.fold_in(key, 1), batch, params["student"])
        critic_batch["x0_fake"] = x0_prediction_no_grad(models["student"], params["student"], critic_batch)
        grads, value = accumulate(critic_loss, training.grad_transform, params["critic"], critic_batch,
                                  training.micro_batches, models)
        params["critic"], opt["critic"], norm = update(opt_c, params["critic"], grads, opt["critic"],
                                                        training.max_grad_norm, reduce)
        metrics.update(critic_loss=value, critic_grad_norm=norm, critic_lr=sched_c(int(opt["critic"].step) - 1),
                       student_updated=float(state.step % interval == 0))
        return TrainState(state.step + 1, state.key, params, opt, ema), metrics

    return Method(init, step)


@torch.no_grad()
def x0_prediction_no_grad(student: Model, params, batch) -> torch.Tensor:
    return x0_prediction(student.apply, params, batch["x_k"], batch["sigma_k"], batch["text"])
