"""`train.py sample`: videos from a model folder or a training checkpoint (configs.SampleRun).

What WanPipeline does, step for step, so that the same folder, prompts and initial latents give the
same latents: prompts as text are encoded with the pipeline's own umT5 (fvfunc/text.py); the
uncond of guidance is the negative prompt's embedding ("" by default, as WanPipeline); the sampler
walks `samplers.schedule(cfg.sampler)` (UniPC at diffusers' integer timesteps by default). An
image-to-video model's condition comes from --image files, encoded once by the family with the
pipeline's VAE (and CLIP) as WanImageToVideoPipeline does, or from the rows of an i2v parquet folder. Each
sample is written three ways: an mp4 to watch, and losslessly its latents (safetensors) and its
decoded frames (PNG).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fvfunc import checkpoint, data, experts, export, lora, roles, runner, text
from fvfunc.losses.spec import CONDITIONS, condition
from fvfunc.models import ModelError, family
from fvfunc.roles import DTYPES
from fvfunc.trainer import resolve_device
from fvfunc.validation import generate, to_frames, write_mp4

log = logging.getLogger("fvfunc")

PARQUET_PROMPTS = 2
"""How many rows of a parquet folder `num_prompts = 0` samples."""


def read_prompts(cfg, encoder: text.Encoder | None) -> tuple[torch.Tensor, list[str]]:
    """(text [N, L, D] float32 on the CPU, captions) of the run's prompts."""
    n = cfg.num_prompts or None
    if cfg.prompt or Path(cfg.prompts).suffix == ".txt":
        if cfg.prompt:
            prompts = list(cfg.prompt)
        else:
            prompts = [line for line in Path(cfg.prompts).read_text().splitlines() if line.strip()]
        prompts = prompts[:n]
        if encoder is None:
            raise ValueError(f"prompts as text need the pipeline's text encoder: {cfg.model} has no "
                             "text_encoder/ and tokenizer/ (give embeddings with --prompts instead)")
        return text.encode(encoder, prompts, cfg.text_len).cpu(), prompts
    if Path(cfg.prompts).is_dir():
        ds = data.ParquetDataset(cfg.prompts, data.TEXT_ONLY, text_len=cfg.text_len)
        b = ds.batch(list(range(min(n or PARQUET_PROMPTS, len(ds)))))
        return b["text"].float(), list(b["captions"])
    emb = text.pad_embeddings(text.read_tensor(cfg.prompts, ("text", "prompt_embeds")), "prompts", cfg.text_len)[:n]
    return emb, [f"{Path(cfg.prompts).name}[{i}]" for i in range(emb.shape[0])]


def read_uncond(cfg, encoder: text.Encoder | None, n: int) -> torch.Tensor | None:
    """The negative prompt's embedding [1 or N, L, D], or None (zeros) without an encoder and file."""
    if cfg.negative_prompt_embedding:
        emb = text.pad_embeddings(text.read_tensor(cfg.negative_prompt_embedding, ("text", "negative_prompt_embeds")),
                          "negative_prompt_embedding", cfg.text_len)
        if emb.shape[0] not in (1, n):
            raise ValueError(f"negative_prompt_embedding: {emb.shape[0]} embeddings for {n} prompts (give 1 or {n})")
        return emb
    if encoder is not None:
        return text.encode(encoder, [cfg.negative_prompt], cfg.text_len).cpu()
    if cfg.negative_prompt:
        raise ValueError(f"negative_prompt is text, but {cfg.model} has no text_encoder/ and tokenizer/ "
                         "(give --negative-prompt-embedding FILE instead)")
    log.warning("no text encoder and no negative_prompt_embedding: guidance uses zeros as the uncond embedding")
    return None


def read_noise(cfg, n: int, channels: int) -> torch.Tensor | None:
    """The initial noise [N, C, T, H, W] float32 of cfg.noise, or None (drawn from the seed)."""
    if not cfg.noise:
        return None
    x = text.read_tensor(cfg.noise, ("noise", "latents")).float()
    x = x[None].expand(n, *x.shape).clone() if x.ndim == 4 else x
    if x.ndim != 5 or x.shape[0] != n or x.shape[1] != channels:
        raise ValueError(f"noise: {cfg.noise} has shape {list(x.shape)}; expected [{n}, {channels}, T, H, W] "
                         f"({n} prompts, {channels} latent channels) or [{channels}, T, H, W]")
    return x


def read_images(cfg, field: str = "image") -> list:
    """The conditioning images of cfg.image (or another field: last_image) as RGB PIL images."""
    from PIL import Image

    images = []
    for p in getattr(cfg, field):
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{field}: {p} is not a readable image ({e})") from None
    return images


def read_conditions(cfg, fam, model_cfg, folder, n: int, shape, device) -> dict:
    """The image condition ({name: [n, ...]}) of the n prompts for latents of shape (T, H, W): the --image
    files encoded once by the family (one for every prompt or one per prompt), or the condition columns
    of the first n rows of a parquet folder of prompts; {} for a model that takes none (or TI2V without)."""
    takes = fam.conditions(model_cfg)
    if not takes:
        return {}
    if cfg.image:
        images = read_images(cfg)
        if len(images) not in (1, n):
            raise ValueError(f"image: {len(images)} images for {n} prompts (give one for every prompt or one per "
                             "prompt)")
        last = read_images(cfg, "last_image") if fam.last_image(model_cfg) else None
        cond = fam.image_encoder(folder, model_cfg, device)(images, shape, last)
        return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}
    if Path(cfg.prompts).is_dir():
        present = data.columns_in(cfg.prompts)
        columns = tuple(CONDITIONS[k] for k, required in takes.items() if required or f"{k}_bytes" in present)
        if columns:
            ds = data.ParquetDataset(cfg.prompts, columns, text_len=cfg.text_len)
            return {k: v.to(device) for k, v in condition(ds.batch(list(range(n)))).items()}
    if any(takes.values()):
        raise ValueError(f"image: {cfg.model} is an image-to-video model: give --image FILE")
    return {}


def write_sample(out: Path, i: int, latents: torch.Tensor, frames: np.ndarray, caption: str, fps: int) -> Path:
    """sample-i.mp4, sample-i.safetensors (the latents, lossless) and sample-i/frame-k.png; the mp4's path."""
    import imageio.v2 as imageio
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.float().cpu().contiguous()}, out / f"sample-{i}.safetensors",
              metadata={"prompt": caption})
    (out / f"sample-{i}").mkdir(exist_ok=True)
    for k, frame in enumerate(frames):
        imageio.imwrite(out / f"sample-{i}" / f"frame-{k:04d}.png", frame)
    return write_mp4(out / f"sample-{i}.mp4", frames, fps)


def load_model(cfg, device):
    """(family, model config, expert pair or None, params, pipeline folder) of a model folder or a run's
    checkpoint (its student, or the student's EMA, on its folder's config; a LoRA student's adapters
    merged into its base, frozen LoRA files included, as the run had them; an expert pair's experts
    each), with the LoRA files of cfg.lora merged in."""
    fam, mcfg, pair, params, folder = _load_model(cfg, device)
    try:
        if cfg.lora and pair is None:
            params = roles.merge_files(fam, mcfg, params, cfg.lora, "lora")
        elif cfg.lora:
            parts = experts.split(params, pair.names)
            params = experts.join({n: roles.merge_files(fam, c, parts[n], cfg.lora, "lora", expert=n)
                                   for n, c in zip(pair.names, pair.configs, strict=True)})
    except roles.RoleError as e:  # (checked before the model loaded; a file changed since)
        raise ModelError(str(e)) from None
    return fam, mcfg, pair, params, folder


def _load_model(cfg, device):
    model = Path(cfg.model)
    if not (model / "meta.json").is_file():
        fam = family(cfg.family)
        mcfg, pair, params = roles.load_model(fam, model, device=device)
        return fam, mcfg, pair, params, model
    t = export.trained_student(model, device, cfg.use_ema, cfg.family)
    if t.adapters is None:
        return t.family, t.config, t.pair, t.params, t.folder
    if t.pair is None:
        return t.family, t.config, None, lora.merge(t.params, t.adapters, t.lora_scale), t.folder
    bases, adapters = experts.split(t.params, t.pair.names), experts.split(t.adapters, t.pair.names)
    merged = {n: lora.merge(bases[n], adapters[n], t.lora_scale) for n in t.pair.names}
    return t.family, t.config, t.pair, experts.join(merged), t.folder


def vsa_sparsity(cfg) -> float | None:
    """The VSA sparsity to sample at (None: dense): cfg.vsa_sparsity, or when negative the target of the
    checkpoint's run when it trained with training.attention 'vsa'."""
    if cfg.vsa_sparsity >= 0:
        return cfg.vsa_sparsity
    meta = Path(cfg.model) / "meta.json"
    if not meta.is_file():
        return None
    training = checkpoint.read_meta(Path(cfg.model)).get("config", {}).get("training", {})
    return training.get("vsa_sparsity", 0.0) if training.get("attention") == "vsa" else None


def sample_command(cfg) -> list[Path]:
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.precision]
    guided = cfg.sampler.guidance_scale != 1 or cfg.sampler.guidance_scale_2 not in (None, 1)
    as_text = bool(cfg.prompt) or Path(cfg.prompts).suffix == ".txt" or (guided and not cfg.negative_prompt_embedding)
    where = text.find_encoder(cfg.model) if as_text else None
    encoder = text.load_encoder(where, device, dtype) if where is not None else None
    prompts, captions = read_prompts(cfg, encoder)
    uncond = read_uncond(cfg, encoder, len(captions)) if guided else None
    del encoder  # the umT5 is done: free its memory before the transformer loads
    fam, mcfg, pair, params, folder = load_model(cfg, device)
    facts = fam.latents(mcfg, folder)
    noise = read_noise(cfg, len(captions), facts.channels)
    shape = tuple(noise.shape[1:]) if noise is not None else (facts.channels, *cfg.latent_shape)
    cond = read_conditions(cfg, fam, mcfg, folder, len(captions), shape[1:], device)
    sparsity = vsa_sparsity(cfg)
    options = runner.Options(dtype=dtype) if sparsity is None else runner.Options(
        dtype=dtype, attention="vsa", vsa_sparsity=sparsity)
    apply = roles.make_apply(fam, mcfg, pair, options)
    latents = generate(apply, params, prompts.to(device), shape, cfg.sampler,
                       uncond=None if uncond is None else uncond.to(device),
                       noise=None if noise is None else noise.to(device), cond=cond,
                       boundary=None if pair is None else pair.boundary)
    latents = fam.impose(mcfg, latents, cond)
    frames = to_frames(latents, fam, fam.load_vae(folder, device), facts)
    out = Path(cfg.output_dir)
    paths = [write_sample(out, i, latents[i], clip, captions[i], cfg.fps) for i, clip in enumerate(frames)]
    for p, caption in zip(paths, captions, strict=True):
        print(f"{p}  {caption}")
    return paths
