"""Tiny random Wan pipeline folders, for the tests, the demo and the toy benchmark.

Nothing can be downloaded where fvfunc is built and tested, so fvfunc makes its own small models:
a transformer folder written by `wan.save` (the same layout diffusers writes) and, optionally, a
tiny diffusers `AutoencoderKLWan` in `vae/` so validation can decode real videos.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from fvfunc import random
from fvfunc.models import wan


def tiny_config(**overrides) -> wan.WanConfig:
    """A Wan config of a few thousand params: 2 layers, 2 heads of 16, text dim 32."""
    base = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2)
    base.update(overrides)
    return wan.WanConfig(**base)


def write_vae(folder: Path, z_dim: int = 16, seed: int = 0) -> Path:
    """A tiny random diffusers AutoencoderKLWan in folder/vae (latents_mean/std included)."""
    from diffusers import AutoencoderKLWan

    state = torch.get_rng_state()  # diffusers modules initialise from the global RNG: restore it after
    try:
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 1], num_res_blocks=1,
                               attn_scales=[], temperal_downsample=[False],
                               latents_mean=[0.1 * (i % 5) - 0.2 for i in range(z_dim)],
                               latents_std=[1.0 + 0.1 * (i % 3) for i in range(z_dim)])
    finally:
        torch.set_rng_state(state)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    return folder / "vae"


def write_pipeline(folder, cfg: wan.WanConfig | None = None, seed: int = 0, vae: bool = False,
                   params: dict | None = None) -> Path:
    """folder/transformer (random init from `seed`, or `params`) and optionally folder/vae."""
    folder = Path(folder)
    cfg = cfg or tiny_config()
    params = params if params is not None else wan.init(cfg, random.key(seed))
    wan.save(folder / "transformer", cfg, params)
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}, indent=2))
    if vae:
        write_vae(folder, z_dim=cfg.in_channels, seed=seed)
    return folder


def role(apply, channels: int = 16, name: str = "student", ema_decay: float = 0.0, trainable: bool = True):
    """A fvfunc.roles.Role around a bare apply (no folder, no params), for calling a method's `make`
    directly on plain functions."""
    from fvfunc.models import Latents
    from fvfunc.roles import Role

    return Role(name, wan.FAMILY, None, "", None, trainable, False, ema_decay, apply,
                Latents(channels, (1, 2, 2), 4, 8, None, None))


def run_of(spec, method=None, training=None, **sections):
    """spec.run(...) with the given method config, TrainingConfig and other sections."""
    run = spec.run()
    changes = {k: v for k, v in dict(method=method, training=training, **sections).items() if v is not None}
    return dataclasses.replace(run, **changes)
