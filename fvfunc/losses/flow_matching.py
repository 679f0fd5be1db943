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
from fvfunc import experts, optim, random
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


MAX_TRIES = 10_000
"""Draws of one sample's sigma before `within` gives up (an expert's range of almost no probability)."""


def sigma_of(key: torch.Tensor, cfg, device=None, within=None) -> torch.Tensor:
    """One sample's sigma [1]: shift(u) of the weighting scheme. within (expert index, experts.Experts):
    the scheme's sigma conditioned on being routed to that expert (drawn again from fold_in(key, j)
    until it is), so one chosen expert trains on its own noise range with the run's distribution."""
    sigma = shift(sample_u(key, 1, cfg, device), cfg.flow_shift)
    if within is None:
        return sigma
    index, pair = within
    for j in range(MAX_TRIES):
        if int(experts.route(sigma * 1000, pair.boundary)) == index:
            return sigma
        sigma = shift(sample_u(random.fold_in(key, j + 1), 1, cfg, device), cfg.flow_shift)
    raise ValueError(f"method.expert {pair.names[index]!r}: no sigma of the weighting scheme fell in its range "
                     f"in {MAX_TRIES} draws")


def draw(key: torch.Tensor, sample_index, shape, cfg, device=None, within=None):
    """Per-sample (noise [B, *shape], sigma [B], keep_text [B]) from the step key (`within`: see sigma_of)."""
    noises, sigmas, keeps = [], [], []
    for k in random.per_sample(key, sample_index):
        k_noise, k_sigma, k_drop = random.split(k, 3)
        noises.append(random.normal(k_noise, shape, device=device))
        sigmas.append(sigma_of(k_sigma, cfg, device, within))
        keeps.append(random.uniform(k_drop, (1,), device=device) >= cfg.cfg_rate)
    return torch.stack(noises), torch.cat(sigmas), torch.cat(keeps)


def sigmas_of(key: torch.Tensor, sample_index, cfg, device=None, within=None) -> torch.Tensor:
    """The sigma [B] that `draw` on `device` gives the samples `sample_index` (without their noise): the
    whole global batch's, for every rank to agree on which experts of a pair this step trains."""
    return torch.cat([sigma_of(random.split(k, 3)[1], cfg, device, within)
                      for k in random.per_sample(key, sample_index)])


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


def _with_frozen(trained, batch, frozen, apply, cfg):
    """`loss` of params made of trained and frozen parts (one chosen expert of a pair trains)."""
    return loss({**frozen, **trained}, batch, apply, cfg)


def make(run, roles, reduce=None) -> Method:
    """The finetune (init, step) pair of a FinetuneRun over its roles ({"student": Role}); `reduce`
    averages gradients over data-parallel ranks (None: one process)."""
    cfg, training, student = run.method, run.training, roles["student"]
    opt, schedule = optim.for_role(training, training.lr, training.betas, training.weight_decay, training.max_steps)
    within = None  # method.expert: every sample's noise level in that expert's range, so only it trains
    if cfg.expert:
        if student.experts is None or cfg.expert not in student.experts.names:
            have = "one model" if student.experts is None else f"the experts {list(student.experts.names)}"
            raise ValueError(f"method.expert {cfg.expert!r}: roles.student.path holds {have}")
        within = (student.experts.names.index(cfg.expert), student.experts)
    chosen = f"{cfg.expert}{experts.SEP}"

    def init(params, key):
        if cfg.expert:  # the other expert is frozen: held in the compute precision (bfloat16 halves it)
            low = getattr(torch, training.precision)
            params = dict(params, student={k: v if k.startswith(chosen) else v.to(low)
                                           for k, v in params["student"].items()})
        ema = {"student": optim.ema_init(params["student"])} if student.ema_decay > 0 else {}
        opt_state = experts.opt_init(opt, params["student"], student.experts, (cfg.expert,) if cfg.expert else None)
        return TrainState(0, key, dict(params), {"student": opt_state}, ema)

    def step(state: TrainState, batch: dict):
        key = random.fold_in(state.key, state.step)
        x0 = batch["latents"]
        noise, sigma, keep = draw(key, batch["sample_index"], x0.shape[1:], cfg, x0.device, within)
        batch = dict(batch, noise=noise.to(x0.dtype), sigma=sigma, keep_text=keep)
        params = state.params["student"]
        if cfg.expert:  # gradients of the chosen expert only (none made for the frozen one)
            frozen = {k: v for k, v in params.items() if not k.startswith(chosen)}
            grads, value = accumulate(_with_frozen, training.grad_transform,
                                      {k: v for k, v in params.items() if k.startswith(chosen)}, batch,
                                      training.micro_batches, frozen, student.apply, cfg)
        else:
            grads, value = accumulate(loss, training.grad_transform, params, batch, training.micro_batches,
                                      student.apply, cfg)
        # an expert pair steps the experts the global batch's noise levels were routed to
        t_all = None if student.experts is None else 1000 * sigmas_of(key, range(training.batch_size), cfg,
                                                                      x0.device, within)
        params, opt_state, norm = experts.apply_gradients(opt, params, grads, state.opt["student"],
                                                          training.max_grad_norm, reduce, student.experts, t_all)
        ema = {r: optim.ema_update(e, params, student.ema_decay) for r, e in state.ema.items()}
        metrics = {"loss": value, "grad_norm": norm, "lr": schedule(state.step)}
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
    if m.expert:
        from fvfunc.models import family

        student = run.roles.student
        pair = family(student.family).experts(student.path) if student.path else None
        if pair is None or m.expert not in pair[0]:
            have = "one model" if pair is None else f"the experts {list(pair[0])}"
            raise ValueError(f"method.expert {m.expert!r}: roles.student.path {student.path} holds {have}")


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
