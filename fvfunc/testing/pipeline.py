"""The same latents two ways, for the tests and bench/pipeline_equal.py: diffusers' WanPipeline and
fvfunc's pieces (text.encode, wan.apply, guided, schedule, sample) on one pipeline folder, prompts,
negative prompt and initial latents."""

from __future__ import annotations

import torch

from fvfunc import samplers as S
from fvfunc import text
from fvfunc.models import wan


def wan_pipeline_latents(folder, scheduler: str, prompts, negative: str, latents: torch.Tensor, steps: int,
                         scale: float, shift: float = 3.0) -> torch.Tensor:
    """diffusers' latents: WanPipeline in fp32, output_type="latent", from `latents` [B, C, T, H, W];
    `scheduler` "unipc" (the folder's own) or "flow_match_euler" (FlowMatchEulerDiscreteScheduler(shift))."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline.from_pretrained(folder)
    if scheduler == "flow_match_euler":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    pipe.set_progress_bar_config(disable=True)
    _, _, t, h, w = latents.shape
    scale_s = pipe.vae_scale_factor_spatial
    return pipe(prompt=list(prompts), negative_prompt=negative, latents=latents.clone(), height=h * scale_s,
                width=w * scale_s, num_frames=(t - 1) * pipe.vae_scale_factor_temporal + 1,
                num_inference_steps=steps, guidance_scale=scale, output_type="latent").frames


def fvfunc_latents(folder, prompts, negative: str, noise: torch.Tensor, sampler_cfg, timesteps=None,
                   sigmas=None) -> torch.Tensor:
    """fvfunc's latents of the same inputs; `timesteps` / `sigmas` override the schedule's (to measure
    what an older rule gave)."""
    encoder = text.load_encoder(folder)
    cond, uncond = text.encode(encoder, list(prompts)), text.encode(encoder, [negative])
    cfg, params = wan.load(folder / "transformer")
    walk = S.schedule(sampler_cfg)
    denoise = S.guided(lambda x, t, c: wan.apply(params, cfg, x, t, c), cond, uncond, sampler_cfg.guidance_scale)
    with torch.no_grad():
        return S.sample(denoise, noise, walk.sigmas if sigmas is None else sigmas, sampler_cfg.kind,
                        timesteps=walk.timesteps if timesteps is None else timesteps)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 distance |a - b| / |b|."""
    return ((a - b).norm() / b.norm()).item()
