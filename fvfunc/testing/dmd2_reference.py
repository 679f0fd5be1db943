"""A DMD2 step written the plain way on diffusers modules: the reference bench/gpu_step.py times
fvfunc's DMD2 step against.

What a PyTorch user writes from the DMD2 paper and FastVideo's distillation code: three
`WanTransformer3DModel`s (student and critic hold fp32 master weights, the teacher bf16), bf16 compute
under `torch.autocast`, gradient checkpointing, `.backward()`, `clip_grad_norm_` and
`torch.optim.AdamW(fused=True)`, one optimizer per trainable role. The math is DESIGN.md section 3's,
written out again here on purpose (simulate rollout, CFG teacher, normalised DMD gradient, critic
flow-matching loss), and the random draws are fvfunc's (same keys, same noise, same step k), so one
step of each computes the same numbers (tests/test_perf_paths.py) and timed steps do the same work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fvfunc import random
from fvfunc.losses import dmd2
from fvfunc.samplers import timesteps_to_sigmas


def make(modules: dict[str, torch.nn.Module], cfg, training, key: torch.Tensor,
         gradient_checkpointing: bool = True) -> Callable[[int, dict], dict]:
    """`step(i, batch) -> metrics` over the modules {"student", "teacher", "critic"}, updated in
    place. `cfg` is a configs.DMD2Config (simulate mode), `training` a configs.TrainingConfig
    (constant learning rate, no EMA); step i draws from fold_in(key, i) as fvfunc's step i does."""
    if cfg.rollout_mode != "simulate" or training.lr_schedule != "constant":
        raise ValueError("the reference implements simulate rollouts, a constant lr and no EMA")
    student, teacher, critic = modules["student"], modules["teacher"], modules["critic"]
    teacher.requires_grad_(False)
    if gradient_checkpointing:
        student.enable_gradient_checkpointing()
        critic.enable_gradient_checkpointing()
    fused = next(student.parameters()).is_cuda

    def trained(module):  # all weights, or the adapters alone of a module with peft LoRA layers
        return [p for p in module.parameters() if p.requires_grad]
    opt_student = torch.optim.AdamW(trained(student), lr=training.lr, betas=training.betas,
                                    eps=training.eps, weight_decay=training.weight_decay, fused=fused)
    opt_critic = torch.optim.AdamW(trained(critic), lr=cfg.critic_lr, betas=cfg.critic_betas,
                                   eps=training.eps, weight_decay=cfg.critic_weight_decay, fused=fused)
    sigmas = timesteps_to_sigmas(cfg.dmd_denoising_steps).tolist()
    num_steps = len(cfg.dmd_denoising_steps)
    channels = student.config.in_channels
    device = next(student.parameters()).device

    def autocast():
        if training.precision == "bfloat16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def x0_of(module, x, sigma, text):
        """x0 = x - sigma v, with sigma a [B] tensor."""
        with autocast():
            v = module(x, sigma * 1000, text, return_dict=False)[0]
        return x - sigma.view(-1, 1, 1, 1, 1) * v.float()

    grid = torch.arange(1, 1001, dtype=torch.float32) / 1000  # FastVideo's training sigmas, shifted
    grid = cfg.flow_shift * grid / (1 + (cfg.flow_shift - 1) * grid)

    def draws(phase_key, batch):
        """fvfunc's draws for one phase: rollout noise, score noise, score sigma, each sample's step k."""
        shape = (channels, *cfg.latent_shape)
        rollout_noise, score_noise, t0, k = dmd2.draw(phase_key, batch["sample_index"], shape, num_steps, device)
        u = t0.float().cpu() / 1000  # FastVideo: shift the integer timestep, clamp, snap to the grid
        t = (1000 * cfg.flow_shift * u / (1 + (cfg.flow_shift - 1) * u)).clamp(
            int(cfg.min_timestep_ratio * 1000), int(cfg.max_timestep_ratio * 1000))
        score_sigma = grid[(grid[None] * 1000 - t[:, None]).abs().argmin(dim=1)].to(device)
        return rollout_noise, score_noise, score_sigma, k

    @torch.no_grad()
    def rollout(noise, k, text):
        """The student's few-step SDE from pure noise, each sample stopped at its own step k."""
        x = noise[:, 0]
        states = [x]
        for j in range(int(k.max())):
            x0 = x0_of(student, x, torch.full((x.shape[0],), sigmas[j], device=device), text)
            x = (1 - sigmas[j + 1]) * x0 + sigmas[j + 1] * noise[:, j + 1]
            states.append(x)
        return torch.stack([states[int(kb)][b] for b, kb in enumerate(k)])

    def at(k):
        return torch.tensor([sigmas[int(kb)] for kb in k], device=device)

    def update(loss, module, opt):
        loss.backward()
        if training.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), training.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step(i: int, batch: dict) -> dict:
        step_key = random.fold_in(key, i)
        text = batch["text"]
        metrics = {}
        if i % cfg.generator_update_interval == 0:
            rollout_noise, score_noise, score_sigma, k = draws(random.fold_in(step_key, 0), batch)
            x_k = rollout(rollout_noise, k, text)
            x0_gen = x0_of(student, x_k, at(k), text)
            with torch.no_grad():
                s = score_sigma.view(-1, 1, 1, 1, 1)
                x_t = (1 - s) * x0_gen + s * score_noise
                fake = x0_of(critic, x_t, score_sigma, text)
                cond = x0_of(teacher, x_t, score_sigma, text)
                negative = batch.get("negative_text")
                uncond = x0_of(teacher, x_t, score_sigma, torch.zeros_like(text) if negative is None else negative)
                real = uncond + cfg.real_score_guidance_scale * (cond - uncond)
                grad = (fake - real) / (x0_gen - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
                grad = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))
            loss = 0.5 * F.mse_loss(x0_gen, (x0_gen - grad).detach())
            update(loss, student, opt_student)
            metrics.update(generator_loss=loss.detach(), generator_k=[int(x) for x in k])
        rollout_noise, score_noise, score_sigma, k = draws(random.fold_in(step_key, 1), batch)
        with torch.no_grad():
            x0 = x0_of(student, rollout(rollout_noise, k, text), at(k), text)
        s = score_sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * score_noise
        with autocast():
            v = critic(x_t, score_sigma * 1000, text, return_dict=False)[0]
        loss = torch.mean((v.float() - (score_noise - x0)) ** 2)
        update(loss, critic, opt_critic)
        metrics.update(critic_loss=loss.detach(), critic_k=[int(x) for x in k])
        return metrics

    return step
