"""Videos out: sampling the student during training.

Method-agnostic: the sampler is the method spec's (`spec.sampler(run)`: the run's validation sampler
with the method's own defaults, e.g. DMD2's step list); the latents are decoded with the student's
family (its VAE, after undoing the latents_mean / std normalisation) when its folder has one, else
shown as a latent preview (three channels, upsampled), and written as mp4 files. `train.py sample`
(fvfunc/sample.py) uses the same pieces.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from fvfunc import data, experts, random
from fvfunc.losses.spec import condition, conditioned
from fvfunc.samplers import guided, sample, schedule

log = logging.getLogger("fvfunc")


def generate(apply, params, text: torch.Tensor, shape, sampler_cfg, key=None, uncond: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, cond: dict | None = None, boundary: float | None = None
             ) -> torch.Tensor:
    """Latents [B, *shape] sampled from `apply(params, x, t, context)` for text [B, L, D].

    uncond: the negative prompt's embedding ([B or 1, L, D]; None: zeros), used when guiding.
    noise: the initial noise [B, *shape] (None: drawn from the key; the sde's noise comes from the key
    either way). cond: the image condition ({name: [B, ...]}), given with the cond and the uncond text.
    boundary: an expert pair's (fvfunc/experts.py), for sampler_cfg.guidance_scale_2 at its low-noise steps."""
    key = random.key(sampler_cfg.seed) if key is None else key
    k_init, k_steps = random.split(key, 2)
    x = random.normal(k_init, (text.shape[0], *shape), device=text.device) if noise is None else noise
    def fn(x, t, c):  # guidance batches [cond, uncond]: the image condition goes with both
        n = x.shape[0] // text.shape[0]
        return apply(params, x, t, c, *conditioned({k: v.repeat(n, *[1] * (v.ndim - 1))
                                                    for k, v in (cond or {}).items()})).float()

    denoise = guided(fn, text, uncond, experts.guidance(sampler_cfg.guidance_scale, sampler_cfg.guidance_scale_2,
                                                       boundary))
    with torch.no_grad():
        walk = schedule(sampler_cfg)
        return sample(denoise, x, walk.sigmas, sampler_cfg.kind, k_steps, timesteps=walk.timesteps)


def to_frames(latents: torch.Tensor, role_family=None, vae=None, facts=None) -> np.ndarray:
    """uint8 frames [B, F, H, W, 3] from normalised latents [B, C, T, H, W]: decoded by the family's
    `decode` with `vae` after undoing the normalisation of `facts` (models.Latents), or a preview."""
    if facts is not None and facts.mean is not None:
        mean, std = (s.view(1, -1, 1, 1, 1).to(latents.device) for s in (facts.mean, facts.std))
        latents = latents * std + mean
    if vae is not None:
        video = (role_family.decode(vae, latents) + 1) / 2  # [B, 3, F, H, W] in [0, 1]
    else:  # a latent preview: three channels scaled to [0, 1], 8x nearest upsampling
        video = latents[:, :3].float()
        lo = video.amin(dim=(1, 2, 3, 4), keepdim=True)
        hi = video.amax(dim=(1, 2, 3, 4), keepdim=True)
        video = (video - lo) / (hi - lo).clamp_min(1e-6)
        video = video.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)
    frames = (video * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    return frames.cpu().numpy()


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> Path:
    """An H.264 mp4 of frames [F, H, W, 3] (sizes padded to even numbers, as yuv420p needs)."""
    import imageio.v2 as imageio

    f, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1) as writer:  # yuv420p
        for frame in frames:
            writer.append_data(frame)
    return path


def captions_of(path) -> list[str]:
    """The prompts of a validation file: FastVideo's JSON ({"data": [{"caption": ...}, ...]}, or a plain
    list of such entries or of strings) or a .txt of one prompt a line. Errors name the file and entry."""
    path = Path(path)
    try:
        raw = path.read_text()
    except OSError as e:
        raise ValueError(f"validation.dataset_file: cannot read {path} ({e.strerror or e})") from None
    if path.suffix == ".txt":
        captions = [line.strip() for line in raw.splitlines() if line.strip()]
    else:
        try:
            entries = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"validation.dataset_file: {path} is not valid JSON ({e})") from None
        entries = entries.get("data") if isinstance(entries, dict) else entries
        if not isinstance(entries, list):
            raise ValueError(f'validation.dataset_file: {path} must hold {{"data": [{{"caption": ...}}, ...]}}')
        captions = []
        for i, e in enumerate(entries):
            caption = e.get("caption") if isinstance(e, dict) else e
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"validation.dataset_file: {path}, entry {i} has no caption")
            captions.append(caption)
    if not captions:
        raise ValueError(f"validation.dataset_file: {path} holds no prompts")
    return captions


def prompts_from(run, dataset, folder="") -> tuple[torch.Tensor, list[str], tuple | None, dict]:
    """(text [N, L, D], captions, the data's latent (T, H, W) or None) of the validation prompts: the
    captions of validation.dataset_file encoded with the umT5 of `folder` (the student's), or the
    embeddings of validation.prompts, or the first rows of the training data; and the image condition of
    those first rows of the training data ({} when it has none)."""
    n = run.validation.num_prompts
    has_cond = any(c.kind == "condition" for c in getattr(dataset, "spec", ()))
    cond = condition(dataset.batch(list(range(min(n, len(dataset)))))) if has_cond else {}
    shapes = [tuple(dataset[0][c.key].shape[-3:]) for c in dataset.spec if c.rank >= 4]  # latents, trajectories
    if run.validation.dataset_file:
        from fvfunc import text

        captions = captions_of(run.validation.dataset_file)[:n]
        where = text.find_encoder(folder) if folder else None
        if where is None:
            raise ValueError(f"validation.dataset_file: {folder or 'the student'} has no text_encoder/ and "
                             "tokenizer/ to encode its captions with; give validation.prompts (embeddings) instead")
        return text.encode(text.load_encoder(where), captions, run.data.text_len), captions, (
            shapes[0] if shapes else None), {k: v[:len(captions)] for k, v in cond.items()}
    if run.validation.prompts:
        ds = data.ParquetDataset(run.validation.prompts, data.TEXT_ONLY, text_len=run.data.text_len)
    else:
        ds = dataset
    b = ds.batch(list(range(min(n, len(ds)))))
    return b["text"], b["captions"], shapes[0] if shapes else None, {k: v[:len(b["captions"])] for k, v in cond.items()}


class Validator:
    """`validator(state, tracker)` samples the student and writes/logs one mp4 per prompt."""

    def __init__(self, run, sampler_cfg, student, dataset, out: Path, device):
        self.run, self.out, self.device, self.sampler, self.student = run, Path(out), device, sampler_cfg, student
        self.text, self.captions, data_shape, cond = prompts_from(run, dataset, student.folder)
        self.text = self.text.to(device)
        if cond and min(len(v) for v in cond.values()) < len(self.captions):
            raise ValueError(f"validation: {len(self.captions)} prompts, but the training data's first rows give "
                             f"only {min(len(v) for v in cond.values())} image conditions; lower "
                             "validation.num_prompts")
        self.cond = {k: v.to(device) for k, v in cond.items()}
        v = run.validation
        self.uncond = None
        if sampler_cfg.guidance_scale != 1 or sampler_cfg.guidance_scale_2 not in (None, 1):  # encoded once
            from fvfunc import text

            self.uncond = text.negative_embedding(v.negative_prompt, v.negative_prompt_embedding, student.folder,
                                                  run.data.text_len, "validation.negative_prompt", device)
        v = run.validation
        default = data_shape or tuple(getattr(run.method, "latent_shape", (1, 8, 8)))
        self.shape = (student.latents.channels, v.num_frames or default[0], v.height or default[1],
                      v.width or default[2])
        self.vae = student.family.load_vae(student.folder, device)
        self.facts = student.latents if run.data.normalize_latents else None

    def __call__(self, state, tracker) -> list[Path]:
        v = self.run.validation
        params = state.ema["student"] if (v.use_ema and "student" in state.ema) else state.params["student"]
        pair = self.student.experts
        latents = generate(self.student.apply, params, self.text, self.shape, self.sampler, uncond=self.uncond,
                           cond=self.cond, boundary=None if pair is None else pair.boundary)
        latents = self.student.family.impose(self.student.config, latents, self.cond)
        frames = to_frames(latents, self.student.family, self.vae, self.facts)
        paths = []
        for i, clip in enumerate(frames):
            path = write_mp4(self.out / "videos" / f"step-{state.step:06d}-prompt-{i}.mp4", clip, v.fps)
            tracker.log_video(state.step, f"prompt_{i}", path, v.fps)
            paths.append(path)
        log.info("validation at step %d: %s", state.step, ", ".join(str(p) for p in paths))
        return paths
