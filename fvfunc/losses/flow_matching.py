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

import configs
from fvfunc import optim, random
from fvfunc.autodiff import accumulate
from fvfunc.losses.spec import LATENTS, TEXT, FastVideoKeys, Method, MethodSpec, condition, conditioned
from fvfunc.samplers import add_noise, shift
from fvfunc.state import TrainState


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
    for k in random.per_sample(key, sample_index):
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
    v = apply(params, x_t, sigma * 1000, context, *conditioned(condition(batch)))
    return flow_matching_loss(v, x0, noise, sigma, cfg.precondition_outputs), {}


def make(run, roles, reduce=None) -> Method:
    """The finetune (init, step) pair of a FinetuneRun over its roles ({"student": Role}); `reduce`
    averages gradients over data-parallel ranks (None: one process)."""
    cfg, training, student = run.method, run.training, roles["student"]
    opt, schedule = optim.for_role(training, training.lr, training.betas, training.weight_decay, training.max_steps)

    def init(params, key):
        ema = {"student": optim.ema_init(params["student"])} if student.ema_decay > 0 else {}
        return TrainState(0, key, dict(params), {"student": opt.init(params["student"])}, ema)

    def step(state: TrainState, batch: dict):
        key = random.fold_in(state.key, state.step)
        x0 = batch["latents"]
        noise, sigma, keep = draw(key, batch["sample_index"], x0.shape[1:], cfg, x0.device)
        batch = dict(batch, noise=noise.to(x0.dtype), sigma=sigma, keep_text=keep)
        params = state.params["student"]
        grads, value = accumulate(loss, training.grad_transform, params, batch, training.micro_batches,
                                  student.apply, cfg)
        params, opt_state, norm = optim.apply_gradients(opt, params, grads, state.opt["student"],
                                                        training.max_grad_norm, reduce)
        ema = {r: optim.ema_update(e, params, student.ema_decay) for r, e in state.ema.items()}
        metrics = {"loss": value, "grad_norm": norm, "lr": schedule(int(opt_state.step) - 1)}
        return TrainState(state.step + 1, state.key, dict(state.params, student=params), {"student": opt_state},
                          ema), metrics

    return Method(init, step)


# ------------------------------------------------------------------------------------ the spec


def check(run) -> None:
    m = run.method
    if not m.flow_shift > 0:
        raise ValueError(f"method.flow_shift must be > 0, got {m.flow_shift:g}")
    if not 0 <= m.cfg_rate <= 1:
        raise ValueError(f"method.cfg_rate must be in [0, 1], got {m.cfg_rate:g}")
    if not m.logit_std > 0:
        raise ValueError(f"method.logit_std must be > 0, got {m.logit_std:g}")


def read_fastvideo(sections: dict, put, facts) -> None:
    """FastVideo's finetune keys in training: (its TrainingArgs): training_cfg_rate -> method.cfg_rate,
    precondition_outputs / weighting_scheme / logit_mean / logit_std / mode_scale -> method.<same>,
    validation_guidance_scale: "5.0" -> validation.sampler.guidance_scale (one value). A FastVideo file
    without training_cfg_rate drops no text (FastVideo's default 0, fvfunc's own is 0.1)."""
    t = sections["training"]
    if "training_cfg_rate" in t:
        put("method.cfg_rate", "training.training_cfg_rate", t["training_cfg_rate"])
    for k in ("precondition_outputs", "weighting_scheme", "logit_mean", "logit_std", "mode_scale"):
        if k in t:
            put(f"method.{k}", f"training.{k}", t[k])
    if "validation_guidance_scale" in t:
        w = facts.number(t["validation_guidance_scale"], float, "training.validation_guidance_scale")
        put("validation.sampler.guidance_scale", "training.validation_guidance_scale", w)
    if facts.fastvideo:  # FastVideo drops no text unless told (training_cfg_rate defaults to 0)
        put("method.cfg_rate", "FastVideo's default for training_cfg_rate", 0.0, weak=True)


SPEC = MethodSpec(
    name="finetune", run=configs.FinetuneRun, roles=lambda run: ("student",), trainable=("student",),
    data=lambda run: (TEXT, LATENTS), check=check, sampler=lambda run: run.validation.sampler, make=make,
    fastvideo=FastVideoKeys(
        training={"training_cfg_rate": float, "precondition_outputs": bool, "weighting_scheme": str,
                  "logit_mean": float, "logit_std": float, "mode_scale": float,
                  "validation_guidance_scale": str | float},
        read=read_fastvideo, target="FineTuneMethod"))
