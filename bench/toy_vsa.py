"""What VSA's sparsity costs on the toy-video task (fvfunc/testing/toy.py), against dense attention on the
same budget, on the CPU reference path (fvfunc.ops.vsa).

    python bench/toy_vsa.py                  # teacher 2000 steps, then 400 finetune steps a variant
    python bench/toy_vsa.py --reduced        # teacher 800 steps, 200 finetune steps, batch 16 (a busy machine)

FastVideo's use of VSA (its Phase-3 VSA finetunes) is a dense-to-sparse adaptation of a pretrained model, so:
1. a tiny Wan teacher is pretrained dense from random init with bench/toy.py's flags (`train.py finetune`);
2. from its export, `train.py finetune` continues for the same number of steps, batch and learning rate,
   once dense and once per sparsity with `--training.attention vsa --training.vsa-sparsity S` (the gates
   to_gate_compress start at zeros, as FastVideo makes them);
3. each model samples the 16 prompts (UniPC 50 steps, CFG, bench/toy.py's teacher sampler) with the
   attention it was trained with, and also the dense teacher with VSA switched on untrained (zero gates):
   adherence and Frechet distance against held-out real clips, as bench/toy.py measures them.

A clip's latent is [16, 1, 16, 16]: a (1, 8, 8) token grid, so 4 ragged cubes of 1 x 4 x 4 tokens. Sparsity
0.5 (to 0.7) keeps 2 of the 4 key cubes for each query cube, 0.75 and 0.8 keep 1; the rows name the share kept.
Prints a table and writes OUT/results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import toy as bench_toy  # noqa: E402  (bench/toy.py: its profile, flags and train.py driver)

import configs  # noqa: E402
from fvfunc import random, runner  # noqa: E402
from fvfunc.models import wan  # noqa: E402
from fvfunc.ops import vsa  # noqa: E402
from fvfunc.testing import tiny, toy  # noqa: E402
from fvfunc.validation import generate  # noqa: E402


def measure(name, params, cfg, task, sampler, labels, reference, key, sparsity=None):
    """bench/toy.py's measure, sampling with VSA at `sparsity` (None: dense)."""
    options = {} if sparsity is None else {"attention": "vsa", "vsa_sparsity": sparsity}

    def apply(p, x, t, c):
        return runner.apply(wan.FAMILY, p, cfg, x, t, c, **options)
    text = toy.prompts(labels, task)
    t0 = time.process_time()
    latents = generate(apply, params, text, task.latent_shape, sampler, key=key)
    cpu = time.process_time() - t0
    rgb = toy.decode(latents, task)
    row = (name, toy.adherence(rgb, labels), toy.frechet_distance(reference, toy.features(rgb)),
           1000 * cpu / len(labels))
    print(f"  {name:<58} adherence {row[1]:5.1f}  FD {row[2]:7.3f}  {row[3]:6.2f} CPU ms/sample", flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "toy_vsa"), help="output folder (replaced)")
    ap.add_argument("--reduced", action="store_true", help="teacher 800 steps, 200 finetune steps a variant, "
                    "batch 16, 128 clips measured (for a busy 2-core machine)")
    ap.add_argument("--sparsity", default="0.5,0.8", help="comma-separated VSA sparsities")
    ap.add_argument("--teacher-steps", type=int, default=0, help="override the teacher's steps")
    ap.add_argument("--tune-steps", type=int, default=0, help="override the finetune steps a variant")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--in-process", action="store_true")
    args = ap.parse_args(argv)
    prof = bench_toy.FULL
    tune_steps = args.tune_steps or (200 if args.reduced else 400)
    if args.reduced:
        prof = dataclasses.replace(prof, teacher_steps=800, teacher_batch=16, teacher_warmup=50, eval_clips=128)
    if args.teacher_steps:
        prof = dataclasses.replace(prof, teacher_steps=args.teacher_steps)
    sparsities = [float(s) for s in args.sparsity.split(",")]
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.perf_counter()
    task, key = toy.Task(), random.key(args.seed)
    model_cfg = tiny.tiny_config(num_attention_heads=prof.heads, attention_head_dim=prof.head_dim, ffn_dim=prof.ffn,
                                 num_layers=prof.layers, freq_dim=64, text_dim=task.text_dim, in_channels=task.channels,
                                 out_channels=task.channels)
    tiny.write_pipeline(out / "init", model_cfg, seed=args.seed)
    toy.write_dataset(out / "data", prof.train_clips, random.fold_in(key, 1), task)
    common = {"data.text-len": 8, "data.shuffle": "rows", "training.precision": "float32", "training.device": "cpu",
              "training.seed": args.seed, "tracking.wandb-mode": "disabled", "validation.every": 0,
              "data.path": out / "data", "data.no-normalize-latents": (), "training.checkpoint-every": 0,
              "method.flow-shift": prof.teacher_shift, "method.cfg-rate": prof.cfg_rate,
              "training.batch-size": prof.teacher_batch}

    # 1. the dense teacher, bench/toy.py's recipe
    bench_toy.train(["finetune", *bench_toy.flags({
        "roles.student.path": out / "init", **common, "training.output-dir": out / "teacher",
        "training.max-steps": prof.teacher_steps, "training.lr": prof.teacher_lr, "training.lr-schedule": "cosine",
        "training.warmup-steps": prof.teacher_warmup, "training.min-lr-ratio": 0.1,
        "roles.student.ema-decay": prof.teacher_ema})], args.in_process, args.threads)
    teacher = out / "teacher" / "export"

    # 2. the same finetune budget, dense and sparse: the teacher's final lr, constant; the raw weights are exported
    #    (an EMA would hold the fresh gates near their zero start)
    variants = [("dense", {})] + [(f"vsa-{s:g}", {"training.attention": "vsa", "training.vsa-sparsity": s})
                                  for s in sparsities]
    seconds = {}
    for name, extra in variants:
        seconds[name] = bench_toy.train(["finetune", *bench_toy.flags({
            "roles.student.path": teacher, **common, "training.output-dir": out / name,
            "training.max-steps": tune_steps, "training.lr": prof.teacher_lr * 0.1, **extra})],
            args.in_process, args.threads)

    # 3. measure: bench/toy.py's teacher sampler and measures
    labels = toy.labels_for(prof.eval_clips)
    reference = toy.features(toy.render(random.fold_in(key, 2), toy.labels_for(4 * prof.eval_clips), task))
    sampler = configs.SamplerConfig(kind="unipc", num_steps=50, shift=prof.sample_shift, guidance_scale=prof.guidance)
    sample_key = random.fold_in(key, 4)
    n_cubes = vsa.num_cubes((1, task.size // 2, task.size // 2))

    def kept(s):
        return f"{vsa.topk(s, n_cubes)}/{n_cubes} cubes kept"
    t_cfg, t_params = wan.load(teacher)
    rows = [measure(f"teacher ({prof.teacher_steps} steps, dense)", t_params, t_cfg, task, sampler, labels,
                    reference, sample_key)]
    for s in sparsities:
        rows.append(measure(f"teacher with VSA {s:g} untrained (zero gates, {kept(s)})",
                            t_params, t_cfg, task, sampler, labels, reference, sample_key, s))
    for name, _ in variants:
        cfg, params = wan.load(out / name / "export")
        s = None if name == "dense" else float(name.removeprefix("vsa-"))
        title = f"+ {tune_steps} finetune steps, " + ("dense" if s is None else f"VSA {s:g} ({kept(s)})")
        rows.append(measure(title, params, cfg, task, sampler, labels, reference, sample_key, s))

    wall = time.perf_counter() - started
    lines = [f"Command: `python bench/toy_vsa.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
             f"(seed {args.seed}, {args.threads} torch threads); {time.strftime('%Y-%m-%d')}; {platform.machine()}, "
             f"torch {torch.__version__}; {wall / 60:.0f} min wall. Teacher: bench/toy.py's recipe for "
             f"{prof.teacher_steps} steps; each finetune: {tune_steps} steps of {prof.teacher_batch} clips at lr "
             f"{prof.teacher_lr * 0.1:g} (constant), no EMA; wall s a finetune: "
             + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + ". Sampling: UniPC 50 steps, CFG "
             f"{prof.guidance:g}, {prof.eval_clips} clips (16 a prompt), one noise for every row.", "",
             "| model | adherence % | Frechet distance | CPU ms / sample |", "|---|---|---|---|"]
    lines += [f"| {n} | {a:.1f} | {fd:.3f} | {ms:.1f} |" for n, a, fd, ms in rows]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (out / "results.md").write_text(text)
    return rows


if __name__ == "__main__":
    main()
