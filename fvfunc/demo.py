"""`make demo`: the whole pipeline on a laptop CPU in a couple of minutes.

Makes a tiny random Wan pipeline folder (transformer + tiny VAE), a synthetic FastVideo-schema text
dataset, then runs a short DMD2 distillation through the real command line (`train.py dmd2`), with
checkpoints, a validation video and an export, and prints where everything is. The models are
random, so the videos are noise: the point is the machinery. `python bench/toy.py` is the demo that
learns something.

    python -m fvfunc.demo [OUTPUT_DIR]
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from fvfunc import cli, data, random
from fvfunc.testing import tiny


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0] if argv else "demo_out").resolve()
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    cfg = tiny.tiny_config()
    tiny.write_pipeline(root / "wan-tiny", cfg, seed=0, vae=True)
    key = random.key(0)
    rows = [{"id": f"prompt-{i}", "caption": f"synthetic prompt {i}",
             "text_embedding": random.normal(random.fold_in(key, i), (4 + i % 5, cfg.text_dim))} for i in range(16)]
    data.write_parquet(root / "prompts" / "part-0.parquet", rows)
    model = str(root / "wan-tiny")
    out = root / "run"
    code = cli.main([
        "dmd2",
        "--roles.student.path", model, "--roles.teacher.path", model, "--roles.critic.path", model,
        "--roles.teacher.dtype", "float32",
        "--data.path", str(root / "prompts"),
        "--training.output-dir", str(out), "--training.max-steps", "20", "--training.batch-size", "2",
        "--training.checkpoint-every", "10", "--training.precision", "float32", "--training.device", "cpu",
        "--training.lr", "1e-4", "--roles.student.ema-decay", "0.9",
        "--method.latent-shape", "3", "8", "8", "--method.generator-update-interval", "2",
        "--method.critic-lr", "4e-4",
        "--validation.every", "10", "--validation.num-prompts", "2",
        "--tracking.wandb-mode", "offline",
    ])
    if code != 0:
        return code
    videos = sorted((out / "videos").glob("*.mp4"))
    print(f"\nfvfunc demo finished in {time.perf_counter() - t0:.0f} s")
    print(f"  models      {root / 'wan-tiny'}  (tiny random Wan2.1 transformer + VAE)")
    print(f"  data        {root / 'prompts'}  (FastVideo text-only parquet)")
    print(f"  config      {out / 'config.yaml'}")
    print(f"  metrics     {out / 'metrics.jsonl'}")
    print(f"  checkpoints {', '.join(p.name for p in sorted(out.glob('checkpoint-*')))} in {out}")
    print(f"  videos      {', '.join(str(v) for v in videos)}")
    print(f"  student     {out / 'export'}  (a diffusers folder)")
    print(f"  wandb       {out / 'wandb'}  (offline; `wandb sync` uploads it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
