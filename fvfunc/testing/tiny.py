"""Tiny random Wan pipeline folders, for the tests, the demo and the toy benchmark.

Nothing can be downloaded where fvfunc is built and tested, so fvfunc makes its own small models:
a transformer folder written by `wan.save` (the same layout diffusers writes), the scheduler the
Wan2.1 diffusers checkpoints ship and, optionally, a tiny diffusers `AutoencoderKLWan` in `vae/` (so
validation can decode real videos) and a tiny umT5 text encoder with a word-level tokenizer in
`text_encoder/` and `tokenizer/` (so prompts can be given as text): a folder `WanPipeline` loads.
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


def write_vae(folder: Path, z_dim: int = 16, seed: int = 0, full: bool = False, wan22: bool = False) -> Path:
    """A tiny random diffusers AutoencoderKLWan in folder/vae (latents_mean/std included). Its config says
    8x spatial and 4x temporal compression (diffusers' defaults); `full` builds it so (three spatial, two
    temporal downsamplings, as Wan2.1's VAE: what an image-to-video pipeline's resizing needs), else it
    compresses 2x spatially and not in time (cheaper, for decoding previews). `wan22`: the Wan2.2 VAE's
    layout (TI2V-5B's): residual stages after a 2x2 patchify, 16x spatial and 4x temporal, as it says."""
    from diffusers import AutoencoderKLWan

    layout = dict(dim_mult=[1, 1, 1, 1], temperal_downsample=[False, True, True]) if full or wan22 else \
        dict(dim_mult=[1, 1], temperal_downsample=[False])
    if wan22:
        layout.update(is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16)
    state = torch.get_rng_state()  # diffusers modules initialise from the global RNG: restore it after
    try:
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(base_dim=8, z_dim=z_dim, num_res_blocks=1, attn_scales=[], **layout,
                               latents_mean=[0.1 * (i % 5) - 0.2 for i in range(z_dim)],
                               latents_std=[1.0 + 0.1 * (i % 3) for i in range(z_dim)])
    finally:
        torch.set_rng_state(state)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    return folder / "vae"


def write_image_encoder(folder: Path, hidden: int, seed: int = 0, image_size: int = 32, patch: int = 8) -> Path:
    """A tiny random transformers CLIPVisionModel in folder/image_encoder (width `hidden`, the I2V model's
    image_dim; (image_size / patch)^2 + 1 tokens) and a CLIPImageProcessor in folder/image_processor
    (shortest edge resized to image_size, centre crop, CLIP's mean / std), as Wan2.1 I2V pipelines ship
    them: both load with `from_pretrained`, so WanImageToVideoPipeline loads the folder."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch, projection_dim=hidden)
    state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = CLIPVisionModel(cfg).eval()
    finally:
        torch.set_rng_state(state)
    model.save_pretrained(folder / "image_encoder")
    crop = {"height": image_size, "width": image_size}
    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop)
    processor.save_pretrained(folder / "image_processor")
    return folder / "image_encoder"


WORDS = ("a an the of in on at with and under over near by cat cats dog dogs bird fish horse man woman child "
         "people car boat train city street forest beach river sea ocean mountain snow rain sky sun moon night "
         "day red blue green yellow black white small big old young running runs walking walks flying flies "
         "swimming jumping sitting playing dancing slowly quickly video of, blurry low quality static").split()
"""The tiny tokenizer's words (a word outside them is <unk>)."""

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json (diffusers' UniPC on flow sigmas, shift 3)
WAN21_SCHEDULER = {
    "_class_name": "UniPCMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
    "disable_corrector": [], "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0,
    "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True,
    "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
    "solver_order": 2, "solver_p": None, "solver_type": "bh2", "steps_offset": 0, "thresholding": False,
    "timestep_spacing": "linspace", "trained_betas": None, "use_beta_sigmas": False,
    "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False}


def write_text_encoder(folder: Path, d_model: int = 32, seed: int = 0, vocab: tuple[str, ...] = WORDS) -> Path:
    """A tiny random transformers UMT5EncoderModel in folder/text_encoder and a word-level tokenizer in
    folder/tokenizer (ids: <pad> 0, </s> 1, <unk> 2 as umT5's own; every encoding ends in </s>), both
    loadable by `from_pretrained` and so by diffusers' WanPipeline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    specials = ["<pad>", "</s>", "<unk>"]
    ids = {w: i for i, w in enumerate(dict.fromkeys([*specials, *vocab]))}
    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder / "tokenizer")
    config = folder / "tokenizer" / "tokenizer_config.json"  # the class name transformers 4 and 5 both know
    config.write_text(json.dumps({**json.loads(config.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"},
                                 indent=2))
    cfg = UMT5Config(vocab_size=len(ids), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                     num_heads=d_model // 8, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                     dropout_rate=0.0, feed_forward_proj="gated-gelu")
    state = torch.get_rng_state()  # transformers initialises from the global RNG: restore it after
    try:
        torch.manual_seed(seed)
        model = UMT5EncoderModel(cfg)
    finally:
        torch.set_rng_state(state)
    model.save_pretrained(folder / "text_encoder")
    return folder / "text_encoder"


def write_pipeline(folder, cfg: wan.WanConfig | None = None, seed: int = 0, vae: bool = False,
                   params: dict | None = None, text_encoder: bool = False, full_vae: bool = False,
                   image_encoder: bool = False, wan22_vae: bool = False) -> Path:
    """folder/transformer (random init from `seed`, or `params`), folder/scheduler (Wan2.1's), optionally
    folder/vae (`full_vae`: compressing as its config says; `wan22_vae`: the Wan2.2 VAE's layout; see
    `write_vae`), folder/text_encoder +
    folder/tokenizer (a umT5 of d_model = the model's text_dim) and, for a Wan2.1 I2V config,
    folder/image_encoder + folder/image_processor (a CLIP vision model of width image_dim). The
    model_index.json is a WanImageToVideoPipeline's for an I2V config, and holds expand_timesteps (TI2V)."""
    folder = Path(folder)
    cfg = cfg or tiny_config()
    params = params if params is not None else wan.init(cfg, random.key(seed))
    wan.save(folder / "transformer", cfg, params)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(WAN21_SCHEDULER, indent=2))
    index = {"_class_name": "WanPipeline" if cfg.image_dim is None else "WanImageToVideoPipeline",
             "transformer": ["diffusers", "WanTransformer3DModel"],
             "scheduler": ["diffusers", "UniPCMultistepScheduler"]}
    if cfg.expand_timesteps:
        index["expand_timesteps"] = True
    if vae or full_vae or wan22_vae:
        write_vae(folder, z_dim=cfg.out_channels, seed=seed, full=full_vae, wan22=wan22_vae)
        index["vae"] = ["diffusers", "AutoencoderKLWan"]
    if text_encoder:
        write_text_encoder(folder, d_model=cfg.text_dim, seed=seed)
        index.update(text_encoder=["transformers", "UMT5EncoderModel"],
                     tokenizer=["transformers", "PreTrainedTokenizerFast"])
    if image_encoder:
        if cfg.image_dim is None:
            raise ValueError("image_encoder: only a Wan2.1 I2V config (image_dim set) takes CLIP image tokens")
        write_image_encoder(folder, cfg.image_dim, seed=seed)
        index.update(image_encoder=["transformers", "CLIPVisionModel"],
                     image_processor=["transformers", "CLIPImageProcessor"])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_pair(folder, cfg: wan.WanConfig | None = None, seeds=(0, 1), boundary: float = 0.875, **pipeline) -> Path:
    """A tiny Wan2.2-A14B-like pipeline folder: write_pipeline's (transformer/ from seeds[0]) plus a second
    random expert in transformer_2/ and model_index.json's transformer_2 and boundary_ratio."""
    folder = write_pipeline(folder, cfg, seed=seeds[0], **pipeline)
    cfg = cfg or tiny_config()
    wan.save(folder / "transformer_2", cfg, wan.init(cfg, random.key(seeds[1])))
    index = json.loads((folder / "model_index.json").read_text())
    index.update(transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=boundary)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
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
