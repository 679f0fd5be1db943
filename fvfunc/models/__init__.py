"""Model families and the contract each one keeps.

A family module (`fvfunc/models/<family>.py`) holds one model's math and files and exports one
`FAMILY = Family(...)`. The contract is this NamedTuple: config, load / save / init, the pure forward
split into `embed` / `block` / `head`, and the family's latent facts (channels, VAE compression,
latents mean / std, VAE decode), and what an export needs of its pipeline folders (the pipeline
around a model folder, its other components, the stored dtypes). A family knows nothing of remat,
compile, attention backends or sharding: `fvfunc/runner.py` applies those to any family's blocks.
Adding a family is one module plus one line in FAMILIES.

The forward of every family is, for latents x [B, C, T, H, W], timesteps t [B] and text context:

    h, inputs = embed(params, cfg, x, t, context, dtype[, cond])   # params outside the blocks
    for i in range(num_blocks(cfg)):
        h = block(block_params(params, i), cfg, h, inputs, dtype, attend)
    v = head(params, cfg, h, inputs, dtype)                   # the flow v = noise - x0

`inputs` is whatever the family's blocks and head need besides h (a tuple of tensors: Wan's text
context, modulation and RoPE tables). `attend(q, k, v, cross)` is the attention the runner picked
(q, k, v [B, N, heads, head_dim]; `cross` tells cross- from self-attention). A block's params are its
leaves `blocks.{i}.<name>` under their short `<name>`, so every block is the same function of the same
structure (one compiled graph serves them all).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch


class ModelError(ValueError):
    """A model folder, config or params dict that fvfunc cannot use; the message names the file or key."""


class Latents(NamedTuple):
    """What a family's latents are, read from a model folder (its VAE config when there is one)."""

    channels: int
    """Latent channels the transformer takes and predicts."""
    patch: tuple[int, int, int]
    """The transformer's (t, h, w) patch size: latent sizes must be multiples of it."""
    temporal: int
    """Video frames a latent frame holds (after the first): T = (frames - 1) // temporal + 1."""
    spatial: int
    """Pixels a latent holds along height and width."""
    mean: torch.Tensor | None
    """Per-channel latents_mean of the VAE (None: latents are used as stored)."""
    std: torch.Tensor | None
    """Per-channel latents_std of the VAE."""


class Family(NamedTuple):
    """A model family: plain functions over (config, params dict). See the module docstring."""

    name: str
    load_config: Callable[[Any], Any]
    """load_config(folder) -> cfg, from a model or pipeline folder; ModelError when it is not one."""
    load: Callable[..., tuple[Any, dict]]
    """load(folder, dtype=None, device=None, rows=None, variant="") -> (cfg, params); rows: n -> (start,
    stop) reads only those rows of each tensor's dim 0 (one rank's piece of a sharded role); variant
    picks a weight variant of the folder (e.g. "fp16"), "" the plain weights."""
    save: Callable[[Any, Any, dict], Any]
    """save(folder, cfg, params): a folder the reference implementation (diffusers) loads."""
    init: Callable[..., dict]
    """init(cfg, key, dtype=float32, device=None) -> params."""
    param_shapes: Callable[[Any], dict[str, tuple[int, ...]]]
    """Every param name and shape of a config."""
    num_blocks: Callable[[Any], int]
    embed: Callable[..., tuple[torch.Tensor, Any]]
    """embed(params, cfg, x, t, context, dtype) -> (h, inputs)."""
    block: Callable[..., torch.Tensor]
    """block(block_params, cfg, h, inputs, dtype, attend) -> h."""
    head: Callable[..., torch.Tensor]
    """head(params, cfg, h, inputs, dtype) -> v [B, C, T, H, W]."""
    latents: Callable[[Any, Any], Latents]
    """latents(cfg, folder) -> Latents: the latent facts of a model folder (folder may be None)."""
    load_vae: Callable[[Any, Any], Any]
    """load_vae(folder, device) -> a VAE (or None when the folder has none)."""
    decode: Callable[[Any, torch.Tensor], torch.Tensor]
    """decode(vae, latents) -> video [B, 3, F, H, W] in [-1, 1], from raw (unnormalised) latents."""
    # what fvfunc/export.py needs to write a whole pipeline; the defaults suit a family of bare model folders
    pipeline: Callable[[Any], Path | None] = lambda folder: None
    """pipeline(folder) -> the diffusers pipeline folder (model_index.json) a model folder is or sits in,
    None for a bare transformer folder. An export carries that pipeline's other components over."""
    components: tuple[str, ...] = ()
    """The pipeline's folders besides the transformer (Wan: vae, text_encoder, tokenizer, scheduler)."""
    stored_dtypes: Callable[..., dict[str, torch.dtype]] | None = None
    """stored_dtypes(folder, variant="") -> each param's dtype in the folder's files (headers only), the
    export's 'source' dtype; None: the export keeps the trained params' dtypes."""
    text_width: Callable[[Any], int | None] = lambda cfg: None
    """text_width(cfg) -> the width of the text embeddings the model takes (checked against the data
    before any model loads); None: not known from the config."""
    weight_files: Callable[..., list[Path]] | None = None
    """weight_files(folder, variant="") -> the files holding the weights (a resumed run fingerprints
    them to tell the same model from another); None: not fingerprinted."""
    original_names: Callable[[Any], dict[str, str]] | None = None
    """original_names(cfg) -> {param name of a linear layer (no `.weight`): its name in the model's
    original (non-diffusers) checkpoints}, for LoRA files in ComfyUI / kohya layout (fvfunc/lora.py);
    None: only diffusers / PEFT names are read and written."""
    original_params: Callable[[Any], dict[str, str]] | None = None
    """original_params(cfg) -> {param name: its name in the original checkpoints} of every param that has
    one (weights and biases, norms, modulations), for the full-tensor diffs (.diff, .diff_b, .diff_m) of
    LoRA files in the original layout (fvfunc/lora.py); None: diffs are read by the family's own names."""
    conditions: Callable[[Any], dict[str, bool]] = lambda cfg: {}
    """conditions(cfg) -> {name: required}: the conditions (FastVideo's i2v column names, e.g.
    "clip_feature") the model takes besides the text, in `embed`'s `cond` dict; a family that takes none
    is never given `cond` (its embed keeps the six arguments)."""
    experts: Callable[[Any], tuple[tuple[str, ...], float] | None] = lambda folder: None
    """experts(folder) -> (names, boundary) when the folder is an expert pair (Wan2.2 A14B: ("transformer",
    "transformer_2"), model_index.json's boundary_ratio): its experts are the subfolders `names`, high
    noise first, and timesteps t >= boundary * 1000 go to the first (fvfunc/experts.py); None for one
    model. ModelError for a pair that cannot be routed (no boundary)."""
    impose: Callable[[Any, torch.Tensor, Any], torch.Tensor] = lambda cfg, x, cond: x
    """impose(cfg, latents, cond) -> the sampled latents with the part the condition gives set (Wan2.2
    TI2V's first frame), as a pipeline ends its sampling; a sampler's caller applies it."""
    image_encoder: Callable[..., Callable[..., dict]] | None = None
    """image_encoder(folder, cfg, device=None) -> encode(images, shape=None, last=None) -> cond: the
    pipeline folder's own encoders, loaded once, making the image condition ({name: [N, ...]}, the names
    of `conditions`) as the family's image-to-video pipeline does, of N RGB PIL images (and N `last`
    images for a first-and-last-frame model) for latents of shape (T, H, W), or of the first (and last)
    frames of clips [N, 3, F, h, w] in [-1, 1] (preprocessing). None: the family takes no images.
    ModelError for a model or folder that cannot (a text-to-video model, a missing encoder)."""
    last_image: Callable[[Any], bool] = lambda cfg: False
    """last_image(cfg) -> whether the image condition is of a first and a last image (Wan2.1 FLF2V), so
    `image_encoder`'s `encode` takes `last` images (clips: their last frames) besides the first."""
    # what sequence parallelism needs (fvfunc/runner.py runs the blocks on token shards)
    split: Callable[[Any, Any, int, int], Any] | None = None
    """split(cfg, inputs, start, stop) -> the blocks' `inputs` for the tokens [start, stop) of `embed`'s
    sequence alone (e.g. their rows of the RoPE tables), for blocks that see only those tokens between
    the all-to-alls around self-attention; None: the family cannot run sequence-parallel."""
    heads: Callable[[Any], int | None] = lambda cfg: None
    """heads(cfg) -> the self-attention heads of a block (sequence parallelism splits them over its
    ranks), checked before any model loads; None: not known from the config."""
    vsa_gated: Callable[[Any], Any] | None = None
    """vsa_gated(cfg) -> the config of the same model with the params VSA adds (FastVideo's gates of the
    coarse branch); the ones a loaded model lacks start at zeros (FastVideo's loader's rule for new
    params). None: the family has no VSA params (it runs VSA without a coarse branch)."""


BLOCKS = "blocks."
"""Every family keeps its repeated blocks' params under `blocks.{i}.`."""


def block_params(params: dict, num_blocks: int) -> tuple[dict, list[dict]]:
    """(the params outside the blocks, one {<name>: tensor} per block) of `blocks.{i}.<name>` params
    (views, no copies)."""
    outer, blocks = {}, [{} for _ in range(num_blocks)]
    for name, value in params.items():
        if name.startswith(BLOCKS):
            i, rest = name[len(BLOCKS):].split(".", 1)
            blocks[int(i)][rest] = value
        else:
            outer[name] = value
    return outer, blocks


# the families import the contract above, so they come after it
from fvfunc.models import wan  # noqa: E402

FAMILIES: dict[str, Family] = {"wan": wan.FAMILY}
"""Family name -> Family; `roles.<role>.family` picks one."""


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ModelError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]
