"""Videos out: sampling the student during training, and `train.py sample`.

Method-agnostic: the sampler comes from `validation.sampler` (each method's run config sets its own
default: dmd2 samples with `sde` over its step list, finetune with `unipc` and guidance). Latents
are decoded with the diffusers `AutoencoderKLWan` of the model's `vae/` folder when there is one
(after undoing the latents_mean/std normalisation), else shown as a latent preview (three channels,
upsampled), and written as mp4 files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fvfunc import data, random
from fvfunc.samplers import guided, sample, sigmas_from_config

log = logging.getLogger("fvfunc")


def find_vae(model_path) -> Path | None:
    """The `vae/` folder beside a transformer (pipeline/vae or transformer/../vae), if any."""
    for cand in (Path(model_path) / "vae", Path(model_path).parent / "vae"):
        if (cand / "config.json").is_file():
            return cand
    return None


def load_vae(model_path, device):
    folder = find_vae(model_path)
    if folder is None:
        return None
    from diffusers import AutoencoderKLWan
    return AutoencoderKLWan.from_pretrained(folder).to(device).eval()


def sampler_for(method_name: str, cfg):
    """The validation sampler, with a dmd2 run's own step list when none is given."""
    s = cfg.validation.sampler
    if method_name == "dmd2" and s.kind == "sde" and not s.timesteps:
        s = type(s)(**{**s.__dict__, "timesteps": tuple(cfg.method.dmd_denoising_steps)})
    return s


def generate(apply, params, text: torch.Tensor, shape, sampler_cfg, key=None) -> torch.Tensor:
    """Latents [B, *shape] sampled from `apply(params, x, t, context)` for text [B, L, D]."""
    key = random.key(sampler_cfg.seed) if key is None else key
    k_init, k_steps = random.split(key, 2)
    x = random.normal(k_init, (text.shape[0], *shape), device=text.device)
    denoise = guided(lambda x, t, c: apply(params, x, t, c).float(), text, None, sampler_cfg.guidance_scale)
    with torch.no_grad():
        return sample(denoise, x, sigmas_from_config(sampler_cfg), sampler_cfg.kind, k_steps)


def to_frames(latents: torch.Tensor, vae=None, stats=None) -> np.ndarray:
    """uint8 frames [B, F, H, W, 3] from normalised latents [B, C, T, H, W]."""
    if stats is not None:
        mean, std = (s.view(1, -1, 1, 1, 1).to(latents.device) for s in stats)
        latents = latents * std + mean
    if vae is not None:
        with torch.no_grad():
            video = vae.decode(latents.to(vae.dtype)).sample.float()  # [B, 3, F, H, W] in [-1, 1]
        video = (video.clamp(-1, 1) + 1) / 2
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


def prompts_from(cfg, dataset) -> tuple[torch.Tensor, list[str], tuple | None]:
    """(text [N, L, D], captions, latent shape or None) of the validation prompts."""
    n = cfg.validation.num_prompts
    if cfg.validation.prompts:
        ds = data.ParquetDataset(cfg.validation.prompts, need_latents=False, text_len=cfg.data.text_len)
    else:
        ds = dataset
    b = ds.batch(list(range(min(n, len(ds)))))
    shape = tuple(b["latents"].shape[2:]) if "latents" in b else None
    return b["text"], b["captions"], shape


class Validator:
    """`validator(state, tracker)` samples the student and writes/logs one mp4 per prompt."""

    def __init__(self, method_name, cfg, models, model_cfgs, dataset, out: Path, device):
        del model_cfgs
        self.cfg, self.out, self.device = cfg, Path(out), device
        self.apply = models["student"].apply
        self.sampler = sampler_for(method_name, cfg)
        self.text, self.captions, data_shape = prompts_from(cfg, dataset)
        self.text = self.text.to(device)
        v = cfg.validation
        default = data_shape or tuple(getattr(cfg.method, "latent_shape", (1, 8, 8)))
        self.shape = (models["student"].latent_channels, v.num_frames or default[0], v.height or default[1],
                      v.width or default[2])
        self.vae = load_vae(cfg.roles.student.path, device)
        self.stats = data.latents_stats(cfg.roles.student.path) if cfg.data.normalize_latents else None

    def __call__(self, state, tracker) -> list[Path]:
        v = self.cfg.validation
        params = state.ema if (v.use_ema and state.ema is not None) else state.params["student"]
        latents = generate(self.apply, params, self.text, self.shape, self.sampler)
        frames = to_frames(latents, self.vae, self.stats)
        paths = []
        for i, clip in enumerate(frames):
            path = write_mp4(self.out / "videos" / f"step-{state.step:06d}-prompt-{i}.mp4", clip, v.fps)
            tracker.log_video(state.step, f"prompt_{i}", path, v.fps)
            paths.append(path)
        log.info("validation at step %d: %s", state.step, ", ".join(str(p) for p in paths))
        return paths


def sample_command(cfg) -> list[Path]:
    """`train.py sample`: mp4 files from a model folder or a checkpoint (configs.SampleRun)."""
    from fvfunc import checkpoint, trainer
    from fvfunc.models import family

    device = trainer.resolve_device(cfg.device)
    model = Path(cfg.model)
    if (model / "meta.json").is_file():  # a run's checkpoint: the student (or its EMA) on its folder's config
        trees, meta = checkpoint.load(model)
        folder = meta["roles"]["student"]
        fam = family(meta["config"]["roles"]["student"].get("family", cfg.family))
        mcfg = fam.load_config(folder)
        params = trees["ema"] if (cfg.use_ema and "ema" in trees) else trees["student"]
        params = {k: v.to(device) for k, v in params.items()}
    else:
        folder, fam = model, family(cfg.family)
        mcfg, params = fam.load(folder, device=device)
    dtype = trainer.DTYPES[cfg.precision]

    def apply(p, x, t, c):
        return fam.apply(p, mcfg, x, t, c, dtype=dtype)

    ds = data.ParquetDataset(cfg.prompts, need_latents=False, text_len=cfg.text_len)
    b = ds.batch(list(range(min(cfg.num_prompts, len(ds)))))
    latents = generate(apply, params, b["text"].to(device), (fam.latent_channels(mcfg), *cfg.latent_shape),
                       cfg.sampler)
    frames = to_frames(latents, load_vae(folder, device), data.latents_stats(folder))
    out = Path(cfg.output_dir)
    paths = [write_mp4(out / f"sample-{i}.mp4", clip, cfg.fps) for i, clip in enumerate(frames)]
    for p, caption in zip(paths, b["captions"], strict=True):
        print(f"{p}  {caption}")
    return paths
