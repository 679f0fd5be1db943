"""Wan transformers (Wan2.1 T2V / I2V / FLF2V, Wan2.2 TI2V) as a params dict plus a pure `apply`.

Params are keyed exactly by diffusers' `WanTransformer3DModel` state-dict names, so a diffusers
folder loads with safetensors alone and `save` writes a folder diffusers loads back. The forward
follows diffusers' module step by step (it is the numerical reference, see tests/test_wan.py),
including where it computes in fp32: the time embedder, the modulation tables and the LayerNorms.

A model folder is a transformer folder or a diffusers WanPipeline folder around one; its weights are
read in any of diffusers' variants (`diffusion_pytorch_model.fp16.safetensors`, sharded or not). A
Wan2.2 A14B pipeline folder is an expert pair (`experts`: transformer/ and transformer_2/ with
model_index.json's boundary_ratio; fvfunc/experts.py routes them); its transformer/ or transformer_2/
folder alone is one model. The image condition of the image-to-video models is the `cond` dict of
`embed`; `image_encoder` makes it from images with the pipeline's own VAE and CLIP, as
WanImageToVideoPipeline does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fvfunc import random
from fvfunc.models import Family, Latents, ModelError, block_params
from fvfunc.ops import (
    apply_rope,
    attention,
    layer_norm,
    linear,
    modulate,
    patchify,
    rms_norm,
    rope_3d,
    timestep_embedding,
    unpatchify,
)

CLASS_NAME = "WanTransformer3DModel"
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


@dataclass(frozen=True)
class WanConfig:
    """The fields of a diffusers `WanTransformer3DModel` config.json (same names, same defaults)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None
    expand_timesteps: bool = False
    """Wan2.2 TI2V: per-token timesteps, the first latent frame held at t = 0 as the image condition. Read
    from the pipeline's model_index.json (diffusers keeps it there, not in the transformer's config.json)."""
    vsa_gates: bool = False
    """FastVideo's VSA Wan: every block holds to_gate_compress (Linear(D, D) with bias, on the self-attention's
    input), the gate of VSA's coarse branch. Set by `load` when the weights hold it, or by `vsa_gated`;
    never in config.json (FastVideo's config.json of a VSA checkpoint is a plain Wan's)."""

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def config_from_dict(d: dict, source: str = "config") -> WanConfig:
    """A WanConfig from a diffusers config dict, refusing what fvfunc does not implement."""
    if d.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise ModelError(f"{source}: _class_name is {d['_class_name']!r}, not a Wan transformer ({CLASS_NAME})")
    names = {f.name for f in dataclasses.fields(WanConfig)}
    unknown = sorted(k for k in d if not k.startswith("_") and k not in names)
    if unknown:
        raise ModelError(f"{source}: unsupported Wan config keys {unknown}")
    missing = [k for k in SHAPE_KEYS if k not in d]
    if missing:
        raise ModelError(f"{source}: no {', '.join(missing)} (the model's shape is never guessed)")
    values = {k: _typed(k, v, source) for k, v in d.items() if k in names}
    if values.get("out_channels") is None:  # diffusers: out_channels or in_channels
        values["out_channels"] = values["in_channels"]
    cfg = WanConfig(**values)
    small = [k for k in POSITIVE if getattr(cfg, k) < 1]
    if small:
        raise ModelError(f"{source}: {small[0]} must be >= 1, got {getattr(cfg, small[0])}")
    if (cfg.image_dim is None) != (cfg.added_kv_proj_dim is None):
        raise ModelError(f"{source}: image_dim and added_kv_proj_dim must be set together (Wan2.1 I2V) or not at all")
    if cfg.added_kv_proj_dim is not None and cfg.added_kv_proj_dim != cfg.dim:
        raise ModelError(f"{source}: added_kv_proj_dim {cfg.added_kv_proj_dim} must equal the model width {cfg.dim} "
                         "(the image embedder's output)")
    if cfg.pos_embed_seq_len is not None and cfg.image_dim is None:
        raise ModelError(f"{source}: pos_embed_seq_len (FLF2V) needs image_dim")
    if cfg.image_dim is not None and cfg.in_channels != 2 * cfg.out_channels + 4:
        raise ModelError(f"{source}: an image-to-video Wan (image_dim set) takes in_channels = 2 x out_channels + 4 "
                         f"(noise, frame mask, image latent), got {cfg.in_channels} and {cfg.out_channels}")
    if cfg.qk_norm != "rms_norm_across_heads":
        raise ModelError(f"{source}: qk_norm {cfg.qk_norm!r} is unsupported (only 'rms_norm_across_heads')")
    if cfg.attention_head_dim % 2:
        raise ModelError(f"{source}: attention_head_dim {cfg.attention_head_dim} must be even for RoPE")
    return cfg


SHAPE_KEYS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "text_dim", "ffn_dim",
              "num_layers")
"""config.json keys that fix the params' shapes: a config without one is refused (diffusers writes them all)."""
POSITIVE = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim", "freq_dim",
            "ffn_dim", "num_layers", "rope_max_seq_len")
_TYPES = {"patch_size": "3 ints", "cross_attn_norm": "bool", "expand_timesteps": "bool", "eps": "float",
          "qk_norm": "str or null"}


def _typed(key: str, v, source: str):
    """A config.json value checked against its WanConfig field's type (ModelError naming the key)."""
    kind = _TYPES.get(key, "int or null" if key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len",
                                                    "out_channels") else "int")

    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    ok = {"3 ints": lambda: isinstance(v, list | tuple) and len(v) == 3 and all(is_int(x) and x >= 1 for x in v),
          "bool": lambda: isinstance(v, bool),
          "float": lambda: (is_int(v) or isinstance(v, float)) and v > 0,
          "str or null": lambda: v is None or isinstance(v, str),
          "int or null": lambda: v is None or is_int(v),
          "int": lambda: is_int(v)}[kind]()
    if not ok:
        raise ModelError(f"{source}: {key} must be {'3 positive ints' if kind == '3 ints' else kind}, got {v!r}")
    return tuple(v) if kind == "3 ints" else (float(v) if kind == "float" else v)


def config_to_dict(cfg: WanConfig) -> dict:
    d = {"_class_name": CLASS_NAME, "_diffusers_version": "0.35.0"}
    d.update({k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()
              if k not in ("expand_timesteps", "vsa_gates")})  # a pipeline fact; a weights fact
    return d


# ----------------------------------------------------------------------------------- param layout


def param_shapes(cfg: WanConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name and shape, in diffusers' order."""
    D, F_, T = cfg.dim, cfg.ffn_dim, cfg.text_dim
    pt, ph, pw = cfg.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (D, cfg.in_channels, pt, ph, pw),
        "patch_embedding.bias": (D,),
    }

    def add_linear(name, n_in, n_out):
        shapes[f"{name}.weight"] = (n_out, n_in)
        shapes[f"{name}.bias"] = (n_out,)

    add_linear("condition_embedder.time_embedder.linear_1", cfg.freq_dim, D)
    add_linear("condition_embedder.time_embedder.linear_2", D, D)
    add_linear("condition_embedder.time_proj", D, 6 * D)
    add_linear("condition_embedder.text_embedder.linear_1", T, D)
    add_linear("condition_embedder.text_embedder.linear_2", D, D)
    if cfg.image_dim is not None:  # Wan2.1 I2V: CLIP tokens -> LayerNorm, MLP (GELU), LayerNorm
        e, n = "condition_embedder.image_embedder", cfg.image_dim
        shapes[f"{e}.norm1.weight"], shapes[f"{e}.norm1.bias"] = (n,), (n,)
        add_linear(f"{e}.ff.net.0.proj", n, n)
        add_linear(f"{e}.ff.net.2", n, D)
        shapes[f"{e}.norm2.weight"], shapes[f"{e}.norm2.bias"] = (D,), (D,)
        if cfg.pos_embed_seq_len is not None:
            shapes[f"{e}.pos_embed"] = (1, cfg.pos_embed_seq_len, n)
    for i in range(cfg.num_layers):
        b = f"blocks.{i}"
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                add_linear(f"{b}.{attn}.{proj}", D, D)
            shapes[f"{b}.{attn}.norm_q.weight"] = (D,)
            shapes[f"{b}.{attn}.norm_k.weight"] = (D,)
        if cfg.added_kv_proj_dim is not None:  # cross-attention's keys and values of the image tokens
            add_linear(f"{b}.attn2.add_k_proj", cfg.added_kv_proj_dim, D)
            add_linear(f"{b}.attn2.add_v_proj", cfg.added_kv_proj_dim, D)
            shapes[f"{b}.attn2.norm_added_k.weight"] = (D,)
        if cfg.cross_attn_norm:
            shapes[f"{b}.norm2.weight"] = (D,)
            shapes[f"{b}.norm2.bias"] = (D,)
        if cfg.vsa_gates:  # FastVideo's name: on the block, as its WanTransformerBlock_VSA holds it
            add_linear(f"{b}.to_gate_compress", D, D)
        add_linear(f"{b}.ffn.net.0.proj", D, F_)
        add_linear(f"{b}.ffn.net.2", F_, D)
        shapes[f"{b}.scale_shift_table"] = (1, 6, D)
    add_linear("proj_out", D, cfg.out_channels * pt * ph * pw)
    shapes["scale_shift_table"] = (1, 2, D)
    return shapes


def init(cfg: WanConfig, key: torch.Tensor, dtype: torch.dtype = torch.float32, device=None) -> dict:
    """Random params with torch's default Linear/Conv init (U(+-1/sqrt(fan_in))), unit norms and
    N(0, 1/D) modulation tables, as diffusers initialises the module. Each leaf's numbers depend
    only on the key and its name."""
    shapes = param_shapes(cfg)
    params = {}
    for name, shape in shapes.items():
        k = random.fold_in(key, zlib.crc32(name.encode()))
        if name.endswith("pos_embed"):  # diffusers starts FLF2V's image position embedding at zeros
            p = torch.zeros(shape, device=device)
        elif name.endswith("scale_shift_table"):
            p = random.normal(k, shape, device=device) / math.sqrt(cfg.dim)
        elif ".norm" in name and name.endswith(".weight"):
            p = torch.ones(shape, device=device)
        elif ".norm" in name and name.endswith(".bias"):
            p = torch.zeros(shape, device=device)
        else:
            weight = name.removesuffix(".bias") + ".weight" if name.endswith(".bias") else name
            fan_in = math.prod(shapes[weight][1:])
            bound = 1.0 / math.sqrt(fan_in)
            p = random.uniform(k, shape, device=device, low=-bound, high=bound)
        params[name] = p.to(dtype)
    return params


def check_params(cfg: WanConfig, params: dict, source: str = "params") -> None:
    """Raise ModelError naming the first missing, extra or mis-shaped key."""
    check_shapes(cfg, {k: tuple(v.shape) for k, v in params.items()}, source)


def check_shapes(cfg: WanConfig, shapes: dict[str, tuple[int, ...]], source: str = "params") -> None:
    """check_params on the names and shapes alone."""
    expected = param_shapes(cfg)
    missing = [k for k in expected if k not in shapes]
    extra = [k for k in shapes if k not in expected]
    if missing:
        raise ModelError(f"{source}: missing {len(missing)} key(s), first {missing[:3]}")
    if extra:
        raise ModelError(f"{source}: {len(extra)} unexpected key(s), first {extra[:3]}")
    for k, shape in expected.items():
        if tuple(shapes[k]) != shape:
            raise ModelError(f"{source}: {k} has shape {list(shapes[k])}, config expects {list(shape)}")


# Wan's original (non-diffusers) names of its linears, as the Wan repo, ComfyUI and kohya / musubi
# LoRA files spell them (diffusers' loaders/lora_conversion_utils.py maps the same pairs).
_ORIGINAL_BLOCK = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
_ORIGINAL_OUTER = {"condition_embedder.time_embedder.linear_1": "time_embedding.0",
                   "condition_embedder.time_embedder.linear_2": "time_embedding.2",
                   "condition_embedder.time_proj": "time_projection.1",
                   "condition_embedder.text_embedder.linear_1": "text_embedding.0",
                   "condition_embedder.text_embedder.linear_2": "text_embedding.2",
                   "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
                   "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3", "proj_out": "head.head"}


def original_names(cfg: WanConfig) -> dict[str, str]:
    """{diffusers name: Wan's original name} of every linear layer of the model (names without `.weight`)."""
    out = {}
    for name, shape in param_shapes(cfg).items():
        if len(shape) != 2 or not name.endswith(".weight"):
            continue
        layer = name.removesuffix(".weight")
        if layer.startswith("blocks."):
            _, i, short = layer.split(".", 2)
            out[layer] = f"blocks.{i}.{_ORIGINAL_BLOCK[short]}"
        else:
            out[layer] = _ORIGINAL_OUTER[layer]
    return out


_ORIGINAL_BLOCK_PARAMS = {"attn1.norm_q.weight": "self_attn.norm_q.weight",
                          "attn1.norm_k.weight": "self_attn.norm_k.weight",
                          "attn2.norm_q.weight": "cross_attn.norm_q.weight",
                          "attn2.norm_k.weight": "cross_attn.norm_k.weight",
                          "attn2.norm_added_k.weight": "cross_attn.norm_k_img.weight",
                          "norm2.weight": "norm3.weight", "norm2.bias": "norm3.bias", "scale_shift_table": "modulation"}
_ORIGINAL_OUTER_PARAMS = {"scale_shift_table": "head.modulation",
                          "condition_embedder.image_embedder.norm1.weight": "img_emb.proj.0.weight",
                          "condition_embedder.image_embedder.norm1.bias": "img_emb.proj.0.bias",
                          "condition_embedder.image_embedder.norm2.weight": "img_emb.proj.4.weight",
                          "condition_embedder.image_embedder.norm2.bias": "img_emb.proj.4.bias",
                          "condition_embedder.image_embedder.pos_embed": "img_emb.emb_pos"}


def original_params(cfg: WanConfig) -> dict[str, str]:
    """{diffusers param name: its name in Wan's original checkpoints} of every param that has one (as
    diffusers' conversion maps them): the linears' weights and biases, the norms, the modulations
    (blocks.N.modulation, head.modulation: diffusers' scale_shift_table) and the patch embedding."""
    linear = original_names(cfg)
    out = {}
    for name in param_shapes(cfg):
        layer, _, leaf = name.rpartition(".")
        if layer in linear and leaf in ("weight", "bias"):
            out[name] = f"{linear[layer]}.{leaf}"
        elif name.startswith("blocks."):
            _, i, short = name.split(".", 2)
            if short in _ORIGINAL_BLOCK_PARAMS:
                out[name] = f"blocks.{i}.{_ORIGINAL_BLOCK_PARAMS[short]}"
        elif name in _ORIGINAL_OUTER_PARAMS:
            out[name] = _ORIGINAL_OUTER_PARAMS[name]
        elif name.startswith("patch_embedding."):
            out[name] = name
    return out


# ------------------------------------------------------------------------------------------ apply

def _attention(params, p, x, context, rope, cfg, dtype, attend, image=None, grid=None, gate=None):
    heads = cfg.num_attention_heads
    kv = x if context is None else context
    q = rms_norm(linear(x, params, f"{p}.to_q", dtype), params[f"{p}.norm_q.weight"], cfg.eps)
    k = rms_norm(linear(kv, params, f"{p}.to_k", dtype), params[f"{p}.norm_k.weight"], cfg.eps)
    v = linear(kv, params, f"{p}.to_v", dtype)
    q, k, v = (a.unflatten(-1, (heads, -1)) for a in (q, k, v))
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if context is None:  # self-attention: the token grid and VSA's gate (FastVideo's VSA Wan) go along
        out = attend(q, k, v, False, grid=grid, gate=None if gate is None else gate.unflatten(-1, (heads, -1)))
    else:
        out = attend(q, k, v, True)
    out = out.flatten(-2).to(dtype)
    if image is not None:  # Wan2.1 I2V: a second attention of the same queries to the image tokens, summed
        k_img = rms_norm(linear(image, params, f"{p}.add_k_proj", dtype), params[f"{p}.norm_added_k.weight"], cfg.eps)
        v_img = linear(image, params, f"{p}.add_v_proj", dtype)
        k_img, v_img = (a.unflatten(-1, (heads, -1)) for a in (k_img, v_img))
        out = out + attend(q, k_img, v_img, True).flatten(-2).to(dtype)
    return linear(out, params, f"{p}.to_out.0", dtype)


def _by_group(sizes: tuple[int, ...], fn, tokens: tuple, rows: tuple) -> torch.Tensor:
    """fn(*tokens, *rows) with each row [B, G, D] applied to its own group of tokens (dim 1 split into
    `sizes`): TI2V's given frame is modulated by t = 0, the rest by t. One group: one call, no copies."""
    if len(sizes) == 1:
        return fn(*tokens, *rows)
    parts = [t.split(sizes, dim=1) for t in tokens]
    return torch.cat([fn(*(p[g] for p in parts), *(r[:, g:g + 1] for r in rows)) for g in range(len(sizes))], dim=1)


def _modulated(x, shift, scale, eps, dtype):
    return modulate(layer_norm(x, eps=eps), shift, scale).to(dtype)


def _gated(x, y, gate, dtype):
    return (x.float() + y.float() * gate).to(dtype)


def block(params: dict, cfg: WanConfig, x: torch.Tensor, inputs: Inputs, dtype: torch.dtype, attend) -> torch.Tensor:
    """One transformer block; `params` holds this block's leaves without the "blocks.{i}." prefix."""
    rows = (params["scale_shift_table"][:, None] + inputs.mod).unbind(2)  # six [B, G, D]
    shift, scale, gate, c_shift, c_scale, c_gate = rows
    g = inputs.groups
    # 1. self-attention, modulated and gated
    h = _by_group(g, lambda a, s, c: _modulated(a, s, c, cfg.eps, dtype), (x,), (shift, scale))
    # FastVideo's VSA Wan adds blocks.{i}.to_gate_compress (D -> D, on the same input as to_q): the gate of
    # VSA's coarse branch; a plain Wan has none
    vsa_gate = linear(h, params, "to_gate_compress", dtype) if "to_gate_compress.weight" in params else None
    y = _attention(params, "attn1", h, None, inputs.rope, cfg, dtype, attend, grid=inputs.grid, gate=vsa_gate)
    x = _by_group(g, lambda a, b, c: _gated(a, b, c, dtype), (x, y), (gate,))
    # 2. cross-attention to the text (and the image tokens), ungated
    if cfg.cross_attn_norm:
        h = layer_norm(x, params["norm2.weight"], params["norm2.bias"], cfg.eps).to(dtype)
    else:
        h = x
    x = x + _attention(params, "attn2", h, inputs.context, None, cfg, dtype, attend, inputs.image)
    # 3. feed-forward (GELU-tanh), modulated and gated
    h = _by_group(g, lambda a, s, c: _modulated(a, s, c, cfg.eps, dtype), (x,), (c_shift, c_scale))
    h = F.gelu(linear(h, params, "ffn.net.0.proj", dtype), approximate="tanh")
    h = linear(h, params, "ffn.net.2", dtype)
    return _by_group(g, lambda a, b, c: _gated(a, b, c, dtype), (x, h), (c_gate,))


class Inputs(NamedTuple):
    """What `embed` hands the blocks and the head besides the hidden states."""

    context: torch.Tensor
    """The projected text [B, L, D]."""
    mod: torch.Tensor
    """The six modulation rows from the timestep, [B, G, 6, D] in fp32: one per group of tokens."""
    temb: torch.Tensor
    """The time embedding [B, G, D] (the head's modulation)."""
    rope: tuple[torch.Tensor, torch.Tensor]
    """RoPE cos / sin tables of the token grid."""
    grid: tuple[int, int, int]
    """Tokens along (T, H, W)."""
    groups: tuple[int, ...] = ()
    """Tokens of each modulation group, in token order: (N,) for one timestep a sample; (n0, N - n0) for
    TI2V's image mode (the given first frame at t = 0, then the rest at t)."""
    image: torch.Tensor | None = None
    """Wan2.1 I2V: the projected CLIP image tokens [B, L_img, D] (None: text only)."""
    given: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """TI2V's image mode: (x's first frame, the given latent frame, sigma [B]) for the head."""


CLIP = "clip_feature"
FIRST_FRAME = "first_frame_latent"
"""The condition names (FastVideo's i2v columns) Wan's image-to-video models take in `cond`."""


def conditions(cfg: WanConfig) -> dict[str, bool]:
    """The conditions a config takes, each with whether it is required: Wan2.1 I2V both the CLIP tokens
    and the first-frame latent; TI2V the first-frame latent when it is given (without: text-to-video)."""
    if cfg.image_dim is not None:
        return {CLIP: True, FIRST_FRAME: True}
    if cfg.expand_timesteps:
        return {FIRST_FRAME: False}
    if _frame_channels(cfg):  # Wan2.2 I2V-A14B: the frame mask and latent, no CLIP tokens
        return {FIRST_FRAME: True}
    return {}


def _frame_channels(cfg: WanConfig) -> bool:
    """Whether the model takes the frame mask and the first-frame latent as extra input channels
    (Wan2.1 I2V, and Wan2.2 I2V-A14B, whose experts take no CLIP tokens): in = 2 x out + 4."""
    return not cfg.expand_timesteps and cfg.in_channels == 2 * cfg.out_channels + 4


def frame_mask(B: int, T: int, H: int, W: int, temporal: int = 4, last: bool = False, device=None) -> torch.Tensor:
    """Wan2.1 I2V's 4-channel frame mask [B, temporal, T, H, W] (WanImageToVideoPipeline.prepare_latents):
    video frame f is 1 when given (the first; FLF2V also the last); the first latent frame stands for
    `temporal` copies of the first video frame, every later one for `temporal` video frames."""
    frames = torch.zeros(B, 1, temporal * (T - 1) + 1, H, W, device=device)
    frames[:, :, 0] = 1
    if last:
        frames[:, :, -1] = 1
    frames = torch.cat([frames[:, :, :1].repeat_interleave(temporal, dim=2), frames[:, :, 1:]], dim=2)
    return frames.view(B, T, temporal, H, W).transpose(1, 2)


def _image_tokens(params: dict, cfg: WanConfig, clip: torch.Tensor, dtype) -> torch.Tensor:
    """CLIP image tokens [B, L, image_dim] -> [B, L, D] (diffusers' WanImageEmbedding; FLF2V's two images'
    tokens come concatenated, [B, 2 x 257, image_dim], and get the learnt position embedding)."""
    e = "condition_embedder.image_embedder"
    x = clip.to(dtype)
    if cfg.pos_embed_seq_len is not None:
        x = x + params[f"{e}.pos_embed"].to(dtype)
    x = layer_norm(x, params[f"{e}.norm1.weight"], params[f"{e}.norm1.bias"], 1e-5).to(dtype)
    x = F.gelu(linear(x, params, f"{e}.ff.net.0.proj", dtype))
    x = linear(x, params, f"{e}.ff.net.2", dtype)
    return layer_norm(x, params[f"{e}.norm2.weight"], params[f"{e}.norm2.bias"], 1e-5).to(dtype)


def embed(params: dict, cfg: WanConfig, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
          dtype: torch.dtype, cond: dict | None = None) -> tuple[torch.Tensor, Inputs]:
    """Patchify the latents x [B, C, T, H, W], embed the timesteps t [B] (floats in [0, 1000]) and the
    text context [B, L, text_dim]: (tokens [B, N, D], Inputs).

    cond: the image condition ({} or None: text only). Wan2.1 I2V takes "clip_feature" [B, L, image_dim]
    and "first_frame_latent" [B, C, T', H, W] (T' >= T; normalised, the VAE latent of the first frame
    followed by zero frames), concatenated after the frame mask to x as diffusers' pipeline does (Wan2.2
    I2V-A14B's experts the same, without CLIP tokens). TI2V
    takes "first_frame_latent" (its first frame) and holds it as x's first frame at t = 0."""
    cond = cond or {}
    B, _, T, H, W = x.shape
    pt, ph, pw = cfg.patch_size
    grid = (T // pt, H // ph, W // pw)
    if t.shape != (B,):
        raise ValueError(f"t must have shape [B] = [{B}], got {list(t.shape)}")
    missing = [k for k, required in conditions(cfg).items() if required and k not in cond]
    if missing:
        raise ValueError(f"this image-to-video Wan needs the condition {missing[0]!r}, not given")
    x_in, given, times = x, None, t[:, None]
    if cfg.image_dim is not None or _frame_channels(cfg):
        y = cond[FIRST_FRAME]
        if tuple(y.shape[-2:]) != (H, W) or y.shape[-3] < T or y.shape[0] != B:
            raise ValueError(f"first_frame_latent {list(y.shape)} does not fit the latents {list(x.shape)}")
        mask = frame_mask(B, T, H, W, last=cfg.pos_embed_seq_len is not None, device=x.device)
        x_in = torch.cat([x, mask.to(x.dtype), y[:, :, :T].to(x.dtype)], dim=1)
    elif cfg.expand_timesteps and FIRST_FRAME in cond:
        y = cond[FIRST_FRAME][:, :, :1].to(x.dtype)
        if tuple(y.shape[-2:]) != (H, W) or y.shape[:2] != x.shape[:2]:
            raise ValueError(f"first_frame_latent {list(cond[FIRST_FRAME].shape)} does not fit the latents "
                             f"{list(x.shape)}")
        given = (x[:, :, :1], y, t / 1000)
        x_in = torch.cat([y, x[:, :, 1:]], dim=2)
        times = torch.stack([torch.zeros_like(t), t], dim=1)  # the given frame's tokens at t = 0, the rest at t
    w = params["patch_embedding.weight"]
    h = patchify(x_in.to(dtype), cfg.patch_size) @ w.reshape(w.shape[0], -1).to(dtype).T
    h = h + params["patch_embedding.bias"].to(dtype)
    n = h.shape[1]
    groups = (n,) if given is None else (n // grid[0], n - n // grid[0])

    # time: sinusoid -> MLP in fp32 -> temb (in the text's dtype, as diffusers) -> 6 modulation rows,
    # for each group's timestep: [B, G, ...]
    temb = timestep_embedding(times.flatten(), cfg.freq_dim)
    temb = linear(temb, params, "condition_embedder.time_embedder.linear_1", torch.float32)
    temb = linear(F.silu(temb), params, "condition_embedder.time_embedder.linear_2", torch.float32).to(dtype)
    mod = linear(F.silu(temb), params, "condition_embedder.time_proj", dtype).unflatten(1, (6, -1)).float()
    temb, mod = temb.unflatten(0, (B, -1)), mod.unflatten(0, (B, -1))

    ctx = linear(context.to(dtype), params, "condition_embedder.text_embedder.linear_1", dtype)
    ctx = linear(F.gelu(ctx, approximate="tanh"), params, "condition_embedder.text_embedder.linear_2", dtype)
    image = _image_tokens(params, cfg, cond[CLIP], dtype) if cfg.image_dim is not None else None
    rope = rope_3d(cfg.attention_head_dim, grid, device=x.device)
    return h, Inputs(ctx, mod, temb, rope, grid, groups, image, given)


def split(cfg: WanConfig, inputs: Inputs, start: int, stop: int) -> Inputs:
    """The blocks' inputs for the tokens [start, stop) alone (sequence parallelism): their rows of the
    RoPE tables, so each token keeps its own (t, h, w) position, and their share of each modulation group
    (TI2V's given frame: the first n0 tokens, maybe none of this shard's). The text, the modulation rows
    and the grid stay whole; the head gets the whole sequence and `embed`'s own inputs."""
    del cfg
    cos, sin = inputs.rope
    groups, offset = [], 0
    for size in inputs.groups:
        groups.append(max(0, min(offset + size, stop) - max(offset, start)))
        offset += size
    return inputs._replace(rope=(cos[start:stop], sin[start:stop]), groups=tuple(groups))


def impose(cfg: WanConfig, x: torch.Tensor, cond: dict | None) -> torch.Tensor:
    """Sampled latents with their given part set, as the pipeline ends (TI2V's image mode: the first frame
    is the given latent; exact already where the model was called at t = 1000 sigma, but UniPC calls it
    at integer timesteps). Identity otherwise."""
    if cfg.expand_timesteps and cond and FIRST_FRAME in cond:
        return torch.cat([cond[FIRST_FRAME][:, :, :1].to(x.dtype), x[:, :, 1:]], dim=2)
    return x


def head(params: dict, cfg: WanConfig, h: torch.Tensor, inputs: Inputs, dtype: torch.dtype) -> torch.Tensor:
    """The last norm, modulation and projection, unpatchified: v [B, C, T, H, W].

    TI2V's image mode: the given frame's v is the flow that carries x's first frame onto the given
    latent, (x - given) / sigma, so that x0 = x - sigma v is the given frame exactly; every sampler and
    method then keeps the condition without knowing of it (diffusers' model output there is never used:
    its pipeline overwrites the frame before each call and at the end), and that frame has no gradient."""
    shift, scale = (params["scale_shift_table"][:, None] + inputs.temb[:, :, None]).unbind(2)  # [B, G, D]
    h = _by_group(inputs.groups, lambda a, s, c: _modulated(a, s, c, cfg.eps, dtype), (h,), (shift, scale))
    h = linear(h, params, "proj_out", dtype)
    v = unpatchify(h, inputs.grid, cfg.patch_size)
    if inputs.given is not None:
        x0, y, sigma = inputs.given
        flow = (x0.float() - y.float()) / sigma.float().clamp_min(1e-6).view(-1, 1, 1, 1, 1)
        v = torch.cat([flow.to(v.dtype), v[:, :, 1:]], dim=2)
    return v


def _default_attend(q, k, v, cross, grid=None, gate=None):
    del cross, grid, gate
    return attention(q, k, v, "auto")


def apply(params: dict, cfg: WanConfig, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
          cond: dict | None = None, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The flow prediction v = noise - x0 for latents x [B, C, T, H, W] at timesteps t [B] (floats in
    [0, 1000]) given text embeddings context [B, L, text_dim], in the compute `dtype` (None: the
    params' dtype; params are cast on the fly, so fp32 masters stay untouched).

    The plain forward: embed, every block, head. `fvfunc.runner.apply` runs the same functions with
    a run's speed options."""
    dtype = dtype or params["proj_out.weight"].dtype
    outer, blocks = block_params(params, cfg.num_layers)
    h, inputs = embed(outer, cfg, x, t, context, dtype, cond)
    for bp in blocks:
        h = block(bp, cfg, h, inputs, dtype, _default_attend)
    return head(outer, cfg, h, inputs, dtype)


# ------------------------------------------------------------------------------------ load / save


_SHARD = r"-\d{5}-of-\d{5}"
_VARIANT_NAMES = (  # the weight file names diffusers writes (or wrote) for a variant, e.g. fp16
    rf"diffusion_pytorch_model\.(?P<v>[^.]+?)(?:{_SHARD})?\.safetensors",
    rf"diffusion_pytorch_model{_SHARD}\.(?P<v>[^.]+)\.safetensors",  # older shard names
    r"diffusion_pytorch_model\.safetensors\.index\.(?P<v>[^.]+)\.json",
    r"diffusion_pytorch_model\.safetensors\.(?P<v>[^.]+)\.index\.json",  # older index name
)
COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")
"""The folders of a diffusers WanPipeline besides its transformer (an export carries them over)."""


def variants(folder: Path) -> list[str]:
    """The weight variants a transformer folder holds: "" for the plain files, else each variant name
    in diffusers' file naming (`diffusion_pytorch_model.fp16.safetensors`, ...)."""
    found = set()
    for f in folder.iterdir():
        if f.name in (WEIGHTS, INDEX):
            found.add("")
        for pattern in _VARIANT_NAMES:
            if m := re.fullmatch(pattern, f.name):
                found.add(m["v"])
    return sorted(found)


def _index_names(variant: str) -> tuple[str, ...]:
    if not variant:
        return (INDEX,)
    return (f"diffusion_pytorch_model.safetensors.index.{variant}.json",
            f"diffusion_pytorch_model.safetensors.{variant}.index.json")


def weight_files(folder: Path, variant: str = "") -> list[Path]:
    """The safetensors files of one variant ("" the plain one) of a transformer folder, as diffusers
    names them: one `diffusion_pytorch_model[.<variant>].safetensors`, or the shards its index lists."""
    single = folder / (WEIGHTS if not variant else f"diffusion_pytorch_model.{variant}.safetensors")
    if single.is_file():
        return [single]
    for name in _index_names(variant):
        index = folder / name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise ModelError(f"{index}: not a safetensors index with a weight_map ({e})") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise ModelError(f"{folder / missing[0]}: shard listed in {name} is missing")
            return [folder / s for s in shards]
    held = ", ".join(repr(v) if v else "'' (plain)" for v in variants(folder)) or "none"
    raise ModelError(f"{folder}: no weights of variant {variant!r} ({single.name} or {_index_names(variant)[0]}); "
                     f"the variants here: {held} (set roles.<role>.variant)")


def resolve_folder(path: str | os.PathLike) -> Path:
    """The transformer folder of `path` (itself, or its transformer/ subfolder), holding weights of
    some variant."""
    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"{p}: model folder does not exist")
    for cand in (p, p / "transformer"):
        if (cand / "config.json").is_file() and variants(cand):
            return cand
    raise ModelError(f"{p}: not a Wan transformer folder (need config.json and {WEIGHTS} or {INDEX}, "
                     "or a variant of them, here or in transformer/)")


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ModelError(f"{path}: not a JSON object")
    return d


def pipeline(path) -> Path | None:
    """The diffusers pipeline folder (with model_index.json) that `path` is, or whose component `path`
    is (e.g. its transformer/); None for a bare transformer folder."""
    p = Path(path)
    if (p / "model_index.json").is_file():
        return p
    if (p.parent / "model_index.json").is_file() and p.name in _read_json(p.parent / "model_index.json"):
        return p.parent
    return None


EXPERTS = ("transformer", "transformer_2")
"""Wan2.2 A14B's experts, as its pipelines name their folders: high noise first."""


def experts(path) -> tuple[tuple[str, ...], float] | None:
    """(EXPERTS, boundary_ratio) when `path` is a pipeline folder of two experts (Wan2.2 A14B: a
    `transformer_2` in model_index.json or a transformer_2/ folder), None otherwise (a one-model
    pipeline, or one expert's own folder, which trains as a single model). A pair without a
    boundary_ratio in (0, 1) is refused: it could not be routed."""
    p = Path(path)
    if not (p / "model_index.json").is_file():
        return None
    index = _read_json(p / "model_index.json")
    second = index.get("transformer_2")
    if not ((isinstance(second, list) and any(second)) or (p / "transformer_2" / "config.json").is_file()):
        return None
    where = p / "model_index.json"
    boundary = index.get("boundary_ratio")
    if boundary is None:
        raise ModelError(f"{where}: a two-expert pipeline (transformer_2) needs boundary_ratio, the share of the "
                         "1000 timesteps above which transformer/ denoises (Wan2.2 A14B: 0.875 T2V, 0.9 I2V); "
                         "it has none")
    if isinstance(boundary, bool) or not isinstance(boundary, int | float) or not 0 < boundary < 1:
        raise ModelError(f"{where}: boundary_ratio must be a number in (0, 1), got {boundary!r}")
    for name in EXPERTS:
        if not (p / name / "config.json").is_file():
            raise ModelError(f"{p / name}: the two-expert pipeline's {name}/ folder (config.json) is missing")
    return EXPERTS, float(boundary)


def pair_weight_files(path, variant: str = "") -> list[Path]:
    """The weight files of a model folder; for a pair, both experts'."""
    pair = experts(path)
    if pair is None:
        return weight_files(resolve_folder(path), variant)
    return [f for name in pair[0] for f in weight_files(resolve_folder(Path(path) / name), variant)]


def load_config(path) -> WanConfig:
    """The WanConfig of a transformer or pipeline folder; ModelError for a folder fvfunc cannot train."""
    experts(path)  # a pair that cannot be routed is refused here, before any weight is read
    folder = resolve_folder(path)
    d = _read_json(folder / "config.json")
    root = pipeline(folder)
    expand = bool(d.pop("expand_timesteps", False))  # TI2V: model_index.json's, or (rarely) config.json's
    if root is not None:
        expand = expand or bool(_read_json(root / "model_index.json").get("expand_timesteps"))
    return dataclasses.replace(config_from_dict(d, str(folder / "config.json")), expand_timesteps=expand)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_dtypes(path, variant: str = "") -> dict[str, torch.dtype]:
    """Each param's dtype as the folder stores it, from the safetensors headers (no tensor is read)."""
    folder = resolve_folder(path)
    out = {}
    for f in weight_files(folder, variant):
        with _open(f) as sf:
            for k in sf.keys():
                name = sf.get_slice(k).get_dtype()
                if name not in _DTYPES:
                    raise ModelError(f"{f}: {k} is stored as {name}, not as a floating-point weight")
                out[k] = _DTYPES[name]
    return out


@contextlib.contextmanager
def _open(f: Path):
    """safe_open of a weight file, its failures (a garbage or truncated file) as ModelError naming it."""
    try:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            yield sf
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{f}: not a readable safetensors file ({e})") from None


def load(path, dtype: torch.dtype | None = None, device=None, rows=None, variant: str = "") -> tuple[WanConfig, dict]:
    """(cfg, params) from a diffusers folder (single or sharded safetensors, of the weight `variant`:
    "" the plain files, "fp16" `diffusion_pytorch_model.fp16.safetensors` or its shards). dtype None
    keeps the stored dtype. rows: `n -> (start, stop)`, to read only those rows of each tensor's dim 0
    (one rank's piece of a sharded role: fvfunc.distributed.rows_of), never the whole tensor; shapes
    are checked against the config all the same. A pair's pipeline folder loads its transformer/ (the
    roles load each expert, fvfunc/roles.py), once its routing is known to be sound."""
    experts(path)
    folder = resolve_folder(path)
    cfg = load_config(folder)
    params, shapes = {}, {}
    for f in weight_files(folder, variant):
        with _open(f) as sf:
            for k in sf.keys():
                if "norm_added_q" in k:  # diffusers ignores this legacy key too
                    continue
                part = sf.get_slice(k)
                shapes[k] = tuple(part.get_shape())
                if rows is None or not shapes[k]:
                    t = sf.get_tensor(k)
                else:
                    t = part[slice(*rows(shapes[k][0]))]
                if not t.dtype.is_floating_point:
                    raise ModelError(f"{f}: {k} is stored as {t.dtype}, not as a floating-point weight")
                # a fresh, aligned copy: tensors straight from safetensors can be unaligned
                params[k] = t.to(dtype=dtype or t.dtype, device=device, copy=True)
    if any(k.endswith(GATE + ".weight") for k in shapes):  # a FastVideo VSA checkpoint
        cfg = vsa_gated(cfg)
    check_shapes(cfg, shapes, str(folder))
    return cfg, params


GATE = "to_gate_compress"


def vsa_gated(cfg: WanConfig) -> WanConfig:
    """The config of the same model with FastVideo's VSA gates (blocks.{i}.to_gate_compress); the gates a
    loaded model lacks start at zeros (weight and bias), as FastVideo's loader makes them, so the coarse
    branch starts off and the model starts as it was."""
    return dataclasses.replace(cfg, vsa_gates=True)


def save(path, cfg: WanConfig, params: dict, max_shard_bytes: int = 10 * 2**30) -> Path:
    """Write a diffusers folder (config.json + safetensors, sharded with an index when large)."""
    check_params(cfg, params)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: params[k].detach().to("cpu").contiguous() for k in param_shapes(cfg)}
    shards, cur, size = [], {}, 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += n
    shards.append(cur)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / name), metadata=meta)
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=2))
    (folder / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    return folder


# ---------------------------------------------------------------------------------- latents / VAE


def find_vae(folder) -> Path | None:
    """The `vae/` folder of a pipeline, given the pipeline or its transformer/ folder, if any."""
    if folder is None:
        return None
    for cand in (Path(folder) / "vae", Path(folder).parent / "vae"):
        if (cand / "config.json").is_file():
            return cand
    return None


def latents(cfg: WanConfig, folder=None) -> Latents:
    """Wan's latent facts: the transformer's channels and patch, and from the pipeline's
    `vae/config.json` (diffusers' AutoencoderKLWan) its compression and latents_mean / std. Without a
    VAE, Wan2.1's VAE compression (4 frames, 8 pixels) and no normalisation. cfg None: the default
    config's facts."""
    cfg = cfg or WanConfig()
    temporal, spatial, mean, std = 4, 8, None, None
    vae = find_vae(folder)
    if vae is not None:
        path = vae / "config.json"
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"{path}: invalid JSON ({e})") from None
        temporal, spatial = int(d.get("scale_factor_temporal", 4)), int(d.get("scale_factor_spatial", 8))
        if d.get("latents_mean") is not None and d.get("latents_std") is not None:
            mean = torch.tensor(d["latents_mean"], dtype=torch.float32)
            std = torch.tensor(d["latents_std"], dtype=torch.float32)
            if mean.ndim != 1 or mean.shape != std.shape:
                raise ModelError(f"{path}: latents_mean and latents_std must be lists of the same length")
            if len(mean) != cfg.out_channels:
                raise ModelError(f"{path}: latents_mean has {len(mean)} channels, the transformer predicts "
                                 f"{cfg.out_channels}")
    return Latents(cfg.out_channels, tuple(cfg.patch_size), temporal, spatial, mean, std)


def load_vae(folder, device):
    """The pipeline's diffusers AutoencoderKLWan, or None when the folder has no vae/."""
    vae = find_vae(folder)
    if vae is None:
        return None
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(vae).to(device).eval()


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Video [B, 3, F, H, W] in [-1, 1] from raw latents [B, C, T, H, W]."""
    with torch.no_grad():
        return vae.decode(z.to(vae.dtype)).sample.float().clamp(-1, 1)


# ------------------------------------------------------------------------------ image condition

IMAGE_ENCODER, IMAGE_PROCESSOR = "image_encoder", "image_processor"
"""A Wan2.1 I2V pipeline's CLIP vision model (transformers CLIPVisionModel) and its CLIPImageProcessor."""


def _component(folder, name: str) -> Path | None:
    """The pipeline's subfolder `name`, given the pipeline or one of its component folders."""
    for cand in (Path(folder) / name, Path(folder).parent / name):
        if cand.is_dir():
            return cand
    return None


def _pixels(image, height: int, width: int) -> torch.Tensor:
    """[3, height, width] in [-1, 1] of an RGB PIL image, as diffusers' VaeImageProcessor prepares a PIL
    image: resized to (width, height) with Lanczos, /255, then 2x - 1."""
    import numpy as np
    from PIL import Image

    resized = image.convert("RGB").resize((width, height), resample=Image.LANCZOS)
    x = torch.from_numpy(np.array(resized).astype(np.float32) / 255.0).permute(2, 0, 1)
    return 2 * x - 1


def clip_tokens(folder, images: list, device=None, loaded: dict | None = None, check_only: bool = False):
    """The CLIP image tokens [N, L, image_dim] of RGB PIL images: the pipeline's image_processor/ and
    image_encoder/, the penultimate hidden state, as WanImageToVideoPipeline.encode_image; in fp32.
    `loaded` keeps the model and processor between calls; check_only: only check the folders are there."""
    where = {n: _component(folder, n) for n in (IMAGE_ENCODER, IMAGE_PROCESSOR)}
    missing = [n for n, p in where.items() if p is None]
    if missing:
        raise ModelError(f"{folder}: no {' and no '.join(f'{n}/' for n in missing)} (the CLIP vision model and its "
                         "processor a Wan2.1 I2V pipeline ships) to encode the images with")
    if check_only:
        return None
    loaded = {} if loaded is None else loaded
    if not loaded:
        from transformers import CLIPImageProcessor, CLIPVisionModel

        loaded["processor"] = CLIPImageProcessor.from_pretrained(where[IMAGE_PROCESSOR])
        loaded["model"] = CLIPVisionModel.from_pretrained(where[IMAGE_ENCODER]).to(device).eval()
    inputs = loaded["processor"](images=list(images), return_tensors="pt").to(device)
    with torch.no_grad():
        return loaded["model"](**inputs, output_hidden_states=True).hidden_states[-2].float()


def image_encoder(folder, cfg: WanConfig, device=None):
    """`encode(images, shape=None, last=None) -> cond`, the pipeline folder's encoders loaded once (fp32):
    the image condition as WanImageToVideoPipeline makes it from `image` (and FLF2V's `last_image`).
    images: RGB PIL images, resized to the video of latents (T, H, W) = shape as diffusers'
    VaeImageProcessor resizes, and for FLF2V `last`, as many last images; or clips [N, 3, F, h, w] in
    [-1, 1] whose first frame is the image and, for FLF2V, whose last frame the last image
    (preprocessing; CLIP sees them as 8-bit images, as FastVideo's i2v preprocessing gives them).
    A model with frame channels (Wan2.1 I2V, FLF2V, Wan2.2 I2V-A14B): `first_frame_latent`, the VAE mode
    of the image followed by zero frames (FLF2V: the last one the last image; F frames in all,
    F = temporal (T - 1) + 1 for images), normalised; with CLIP (image_dim) also `clip_feature`, the CLIP
    tokens of `clip_tokens` (FLF2V: the first image's then the last's, [N, 2 L, image_dim]). TI2V: the
    normalised latent of the image alone (its first frame)."""
    if not conditions(cfg):
        raise ModelError(f"{folder}: a text-to-video Wan (no image_dim, no expand_timesteps) takes no image")
    vae = load_vae(folder, device)
    if vae is None:
        raise ModelError(f"{folder}: no vae/ to encode the image with")
    vae, facts = vae.float(), latents(cfg, folder)
    if cfg.image_dim is not None:
        clip_tokens(folder, [], device, check_only=True)
    flf2v, frames_given = cfg.pos_embed_seq_len is not None, cfg.image_dim is not None or _frame_channels(cfg)

    def pictures_of(frames: torch.Tensor) -> list:  # [N, 3, h, w] in [-1, 1] -> 8-bit PIL images
        from PIL import Image

        return [Image.fromarray(((x + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy())
                for x in frames.float()]

    def encode(images, shape=None, last=None) -> dict:
        if isinstance(images, torch.Tensor):  # clips [N, 3, F, h, w] in [-1, 1]
            first, frames = images[:, :, :1].float(), images.shape[2]
            end = images[:, :, -1:].float() if flf2v else None
            pictures = pictures_of(first[:, :, 0])
            lasts = pictures_of(end[:, :, 0]) if flf2v else []
        else:
            T, H, W = shape
            pictures, lasts = list(images), list(last or [])
            if flf2v and len(lasts) != len(pictures):
                raise ValueError(f"FLF2V takes a last image for every first image: {len(pictures)} first, "
                                 f"{len(lasts)} last")
            if lasts and not flf2v:
                raise ValueError("last images are for FLF2V models (pos_embed_seq_len); this one takes the first")
            size = (H * facts.spatial, W * facts.spatial)
            first = torch.stack([_pixels(im, *size) for im in pictures])[:, :, None]
            end = torch.stack([_pixels(im, *size) for im in lasts])[:, :, None] if flf2v else None
            frames = facts.temporal * (T - 1) + 1
        if flf2v and frames < 2:
            raise ValueError("FLF2V needs a video of 2 frames or more (a first and a last), got 1")
        video = first.to(device)
        if frames_given:  # the first frame, then zeros for the rest of the video (FLF2V: the last frame last)
            zeros = video.new_zeros(video.shape[0], 3, frames - 1 - int(flf2v), *video.shape[-2:])
            video = torch.cat([video, zeros] + ([end.to(device)] if flf2v else []), dim=2)
        with torch.no_grad():
            z = vae.encode(video).latent_dist.mode().float()
        if facts.mean is not None:
            z = (z - facts.mean.view(1, -1, 1, 1, 1).to(z.device)) / facts.std.view(1, -1, 1, 1, 1).to(z.device)
        cond = {FIRST_FRAME: z}
        if cfg.image_dim is not None:
            tokens = clip_tokens(folder, pictures, device, loaded)
            if flf2v:  # diffusers encodes [image, last_image] and the embedder views them as one sequence
                tokens = torch.cat([tokens, clip_tokens(folder, lasts, device, loaded)], dim=1)
            cond[CLIP] = tokens
        return cond

    loaded = {}  # the CLIP model and processor, loaded at the first call
    return encode


FAMILY = Family(name="wan", load_config=load_config, load=load, save=save, init=init, param_shapes=param_shapes,
                num_blocks=lambda cfg: cfg.num_layers, embed=embed, block=block, head=head, latents=latents,
                load_vae=load_vae, decode=decode, pipeline=pipeline, components=COMPONENTS,
                stored_dtypes=stored_dtypes, text_width=lambda cfg: cfg.text_dim,
                weight_files=pair_weight_files, experts=experts, original_names=original_names,
                original_params=original_params,
                conditions=conditions, impose=impose, image_encoder=image_encoder, split=split,
                last_image=lambda cfg: cfg.pos_embed_seq_len is not None,
                heads=lambda cfg: cfg.num_attention_heads, vsa_gated=vsa_gated)
