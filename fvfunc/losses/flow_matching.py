"""The `finetune` method: flow-matching loss (Lipman et al. 2023; Esser et al. 2024 for the
sigma schemes), with Wan's / FastVideo's conventions.

    u ~ scheme;  sigma = shift(u; s) = s u / (1 + (s - 1) u)
    x_t = (1 - sigma) x0 + sigma * noise,    target v = noise - x0
    loss = mean((v_theta(x_t, 1000 sigma, c) - (noise - x0))^2)          in fp32
    precondition_outputs: loss = mean((x_t - sigma v_theta - x0)^2)     (FastVideo's x0 form)

Schemes for u (SD3, Esser et al. 2024, section 3.1): uniform; logit-normal sigmoid(N(m, s));
"mode" 1 - u - mode_scale (cos^2(pi u / 2) - 1 + u). Text CFG dropout: with probability cfg_rate a
sample's text embedding is replaced by zeros (Wan's unconditional input), decided per sample from
the step key and the sample's index, so it is reproducible and independent of micro-batching.
"""

from __future__ import annotations

import math

import torch

from fvfunc import random
from fvfunc.losses.state import Method, Model, TrainState, accumulate, make_optimizer, sample_keys, update
from fvfunc.optim import ema_update
from fvfunc.samplers import add_noise, shift

ROLES = ("student",)
TRAINABLE = ("student",)


def needs_latents(cfg) -> bool:
    del cfg
    return True


def sample_u(key: torch.Tensor, n: int, cfg, device=None) -> torch.Tensor:
    """n values of u in (0, 1) from the weighting scheme of `cfg` (a FinetuneConfig)."""
    if cfg.weighting_scheme == "uniform":
        return random.uniform(key, (n,), device=device)
    if cfg.weighting_scheme == "logit_normal":
        return torch.sigmoid(cfg.logit_mean + cfg.logit_std * random.normal(key, (n,), device=device))
    if cfg.weighting_scheme == "mode":
        u = random.uniform(key, (n,), device=device)
        return 1 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    raise ValueError(f"unknown weighting_scheme {cfg.weighting_scheme!r}")


def draw(key: torch.Tensor, sample_index, shape, cfg, device=None):
    """Per-sample (noise [B, *shape], sigma [B], keep_text [B]) from the step key."""
    noises, sigmas, keeps = [], [], []
    for k in sample_keys(key, sample_index):
        k_noise, k_sigma, k_drop = random.split(k, 3)
        noises.append(random.normal(k_noise, shape, device=device))
        sigmas.append(shift(sample_u(k_sigma, 1, cfg, device), cfg.flow_shift))
        keeps.append(random.uniform(k_drop, (1,), device=device) >= cfg.cfg_rate)
    return torch.stack(noises), torch.cat(sigmas), torch.cat(keeps)


def flow_matching_loss(v_pred, x0, noise, sigma, precondition: bool = False) -> torch.Tensor:
    """Mean squared flow-matching error in fp32 (see the module docstring)."""
    v_pred, x0, noise = v_pred.float(), x0.float(), noise.float()
    if precondition:
        s = sigma.float().view(-1, *([1] * (x0.ndim - 1)))
        x_t = add_noise(x0, noise, s.flatten())
        return torch.mean((x_t - s * v_pred - x0) ** 2)
    return torch.mean((v_pred - (noise - x0)) ** 2)


def loss(params, batch, apply, cfg):
    """The finetune loss of one (micro-)batch that carries its noise, sigma and dropout mask."""
    x0, noise, sigma = batch["latents"], batch["noise"], batch["sigma"]
    context = batch["text"] * batch["keep_text"].view(-1, 1, 1).to(batch["text"].dtype)
    x_t = add_noise(x0, noise, sigma)
    v = apply(params, x_t, sigma * 1000, context)
    return flow_matching_loss(v, x0, noise, sigma, cfg.precondition_outputs), {}


def make(cfg, training, models: dict[str, Model], reduce=None) -> Method:
    """The finetune (init, step) pair for a FinetuneConfig `cfg` and a TrainingConfig; `reduce`
    averages gradients over data-parallel ranks (None: one process)."""
    apply = models["student"].apply
    opt, schedule = make_optimizer(training, training.lr, training.betas, training.weight_decay,
                                   training.max_steps)

    def init(params, key):
        student = params["student"]
        ema = {k: v.detach().float().clone() for k, v in student.items()} if training.ema_decay > 0 else None
        return TrainState(0, key, dict(params), {"student": opt.init(student)}, ema)

    def step(state: TrainState, batch: dict):
        key = random.fold_in(state.key, state.step)
        x0 = batch["latents"]
        noise, sigma, keep = draw(key, batch["sample_index"], x0.shape[1:], cfg, x0.device)
        batch = dict(batch, noise=noise.to(x0.dtype), sigma=sigma, keep_text=keep)
        student = state.params["student"]
        grads, value = accumulate(loss, training.grad_transform, student, batch, training.micro_batches,
                                  apply, cfg)
        student, opt_state, norm = update(opt, student, grads, state.opt["student"], training.max_grad_norm, reduce)
        ema = ema_update(state.ema, student, training.ema_decay) if state.ema is not None else None
        metrics = {"loss": value, "grad_norm": norm, "lr": schedule(int(opt_state.step) - 1)}
        return TrainState(state.step + 1, state.key, dict(state.params, student=student),
                          {"student": opt_state}, ema), metrics

    return Method(init, step)

