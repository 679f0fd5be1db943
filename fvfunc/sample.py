"""`train.py sample`: mp4 files from a model folder or a training checkpoint (configs.SampleRun)."""

from __future__ import annotations

from pathlib import Path

from fvfunc import checkpoint, data, runner
from fvfunc.models import family
from fvfunc.roles import DTYPES
from fvfunc.trainer import resolve_device
from fvfunc.validation import generate, to_frames, write_mp4


def sample_command(cfg) -> list[Path]:
    device = resolve_device(cfg.device)
    model = Path(cfg.model)
    if (model / "meta.json").is_file():  # a run's checkpoint: the student (or its EMA) on its folder's config
        trees, meta = checkpoint.load(model)
        folder = meta["roles"]["student"]
        fam = family(meta["config"]["roles"]["student"].get("family", cfg.family))
        mcfg = fam.load_config(folder)
        ema = trees.get("student.ema")
        params = ema if (cfg.use_ema and ema is not None) else trees["student"]
        params = {k: v.to(device) for k, v in params.items()}
    else:
        folder, fam = model, family(cfg.family)
        mcfg, params = fam.load(folder, device=device)
    apply = runner.make_apply(fam, mcfg, runner.Options(dtype=DTYPES[cfg.precision]))
    facts = fam.latents(mcfg, folder)
    ds = data.ParquetDataset(cfg.prompts, data.TEXT_ONLY, text_len=cfg.text_len)
    b = ds.batch(list(range(min(cfg.num_prompts, len(ds)))))
    latents = generate(apply, params, b["text"].to(device), (facts.channels, *cfg.latent_shape), cfg.sampler)
    frames = to_frames(latents, fam, fam.load_vae(folder, device), facts)
    out = Path(cfg.output_dir)
    paths = [write_mp4(out / f"sample-{i}.mp4", clip, cfg.fps) for i, clip in enumerate(frames)]
    for p, caption in zip(paths, b["captions"], strict=True):
        print(f"{p}  {caption}")
    return paths
