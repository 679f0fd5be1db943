"""The toy benchmark, image-conditioned: the first frame given, the motion learnt (Wan2.1 I2V style).

    python bench/toy_i2v.py             # the reduced profile recorded in bench/RESULTS.md
    python bench/toy_i2v.py --tiny      # a smoke run of every stage (~1 min)

The task is bench/toy.py's (`fvfunc/testing/toy.py`: a coloured blob moving in one of 4 directions, 16
prompts), and so are the helpers and the measures; the model is a tiny Wan2.1 I2V (`image_dim` and
`added_kv_proj_dim` set, in_channels 16 + 4 + 16) and every clip comes with its image condition
(`toy.image_condition`: its first frame followed by black frames, encoded, and the first frame's patch
tokens in CLIP's place), in FastVideo's i2v columns:
1. `python train.py finetune` pretrains the I2V teacher from random init on the toy clips;
2. `python train.py dmd2` distils it into a 4-step student (simulate mode: each rollout starts from the
   row's image condition; the teacher, critic and student all see it);
3. every sampler setting is measured on fresh held-out clips' first frames with their prompts: adherence
   (colour and direction), the Frechet distance to held-out real clips (as bench/toy.py), the first-frame
   error (px between the sample's fitted start and the given clip's) and the entropy of the directions the
   samples move in (2 bits: the 4 directions equally often, as in the real clips), plus a learning curve.

`--free-motion`: the prompts name the colour only ("a red blob moving"), so given the first frame the
direction is a 4-way choice the model must sample (adherence then counts the colour and any motion); with
the direction in the prompt the image leaves almost nothing to sample.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from toy import FULL, Profile, curve, flags, train  # noqa: E402  (bench/toy.py)

import configs  # noqa: E402
from fvfunc import checkpoint, data, random  # noqa: E402
from fvfunc.models import wan  # noqa: E402
from fvfunc.samplers import nfe, sigmas_from_config  # noqa: E402
from fvfunc.testing import tiny, toy  # noqa: E402
from fvfunc.validation import generate  # noqa: E402

# bench/toy.py's model, task and hyperparameters on half its budget (1000 teacher steps of 32 clips, 400 DMD2
# steps of 16; 128 clips measured): the machine is shared
REDUCED = dataclasses.replace(FULL, train_clips=1024, teacher_steps=1000, teacher_warmup=50, teacher_ema=0.99,
                              dmd_steps=400, eval_clips=128, curve_clips=64)
TINY = dataclasses.replace(REDUCED, train_clips=64, teacher_steps=20, teacher_batch=8, teacher_warmup=2, dmd_steps=10,
                           dmd_batch=4, dmd_checkpoint_every=5, eval_clips=16, curve_clips=16)


@dataclass
class Row:
    name: str
    adherence: float
    fd: float
    first_frame_px: float
    direction_bits: float
    nfe: int
    wall_ms: float


def free_caption(label: int) -> str:
    """The prompt of --free-motion: the class's colour only."""
    return f"a {toy.CLASSES[label][0]} blob moving"


def free_prompts(labels: torch.Tensor, task: toy.Task, text_len: int = 8) -> torch.Tensor:
    """[N, text_len, text_dim] embeddings of `free_caption`, zero-padded as the loader pads them."""
    words = toy.word_embeddings(task)
    out = torch.zeros(len(labels), text_len, task.text_dim)
    for i, label in enumerate(labels.tolist()):
        e = torch.stack([words[w] for w in free_caption(label).split()])
        out[i, : len(e)] = e
    return out


def write_free_motion_dataset(folder, n: int, key: torch.Tensor, task: toy.Task, rows_per_file: int = 32) -> Path:
    """toy.write_i2v_dataset's clips with `free_caption` prompts."""
    labels = toy.labels_for(n)
    rgb = toy.render(key, labels, task)
    latents, cond, text = toy.encode(rgb, task), toy.image_condition(rgb, task), free_prompts(labels, task)
    rows = [{"id": f"toy-{i:06d}", "latent": latents[i].contiguous(), "caption": free_caption(label),
             "text_embedding": text[i, :4].contiguous(), **{k: v[i] for k, v in cond.items()}}
            for i, label in enumerate(labels.tolist())]
    for start in range(0, n, rows_per_file):
        data.write_parquet(folder, rows[start:start + rows_per_file], rows_per_group=rows_per_file)
    return Path(folder)


def sample(params, cfg, text, cond, shape, sampler, key):
    """(latents, wall seconds) of one batched, image-conditioned sampling call."""
    def apply(p, x, t, c, cond):
        return wan.apply(p, cfg, x, t, c, cond)
    w0 = time.perf_counter()
    latents = generate(apply, params, text, shape, sampler, key=key, cond=cond)
    return latents, time.perf_counter() - w0


def scores(rgb, given, labels, reference, free: bool = False) -> tuple[float, float, float, float]:
    """(adherence %, Frechet distance, first-frame error px, direction entropy bits) of decoded clips `rgb`
    made from the first frames of the clips `given`; free: adherence is the colour and any motion."""
    start = (toy.track(rgb)["start"] - toy.track(given)["start"]).norm(dim=1).mean()
    colour, direction = toy.classify(rgb)
    moving = direction[direction >= 0]
    p = torch.bincount(moving, minlength=len(toy.DIRECTIONS)).double() / max(len(moving), 1)
    bits = float(-(p[p > 0] * p[p > 0].log2()).sum())
    adherence = (100.0 * float(((colour == labels // len(toy.DIRECTIONS)) & (direction >= 0)).double().mean())
                 if free else toy.adherence(rgb, labels))
    return adherence, toy.frechet_distance(reference, toy.features(rgb)), float(start), bits


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "toy_i2v"), help="output folder (replaced)")
    ap.add_argument("--tiny", action="store_true", help="a smoke run of every stage")
    ap.add_argument("--free-motion", action="store_true", help="prompts without the direction (see the docstring)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS of train.py): on a "
                    "busy machine 2 OpenMP threads spin and run 20x slower than 1")
    ap.add_argument("--in-process", action="store_true", help="call train.py's main in this process")
    args = ap.parse_args(argv)
    prof = TINY if args.tiny else REDUCED
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    if out.exists():
        import shutil
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t_start = time.perf_counter()
    task = toy.Task()
    key = random.key(args.seed)

    # 1. data with image conditions, a random tiny Wan2.1 I2V
    dim = prof.heads * prof.head_dim
    model_cfg = tiny.tiny_config(num_attention_heads=prof.heads, attention_head_dim=prof.head_dim, ffn_dim=prof.ffn,
                                 num_layers=prof.layers, freq_dim=64, text_dim=task.text_dim,
                                 in_channels=2 * task.channels + 4, out_channels=task.channels,
                                 image_dim=toy.image_dim(task), added_kv_proj_dim=dim)
    tiny.write_pipeline(out / "init", model_cfg, seed=args.seed)
    write = write_free_motion_dataset if args.free_motion else toy.write_i2v_dataset
    write(out / "data", prof.train_clips, random.fold_in(key, 1), task)
    common = {"data.text-len": 8, "data.shuffle": "rows", "training.precision": "float32", "training.device": "cpu",
              "training.seed": args.seed, "tracking.wandb-mode": "disabled", "validation.every": 0}

    # 2. the I2V teacher: flow matching from random init
    teacher_dir = out / "teacher"
    t_teacher = train(["finetune", *flags({
        "roles.student.path": out / "init", "data.path": out / "data", "data.no-normalize-latents": (),
        **common, "training.output-dir": teacher_dir, "training.max-steps": prof.teacher_steps,
        "training.batch-size": prof.teacher_batch, "training.lr": prof.teacher_lr,
        "training.lr-schedule": "cosine", "training.warmup-steps": prof.teacher_warmup,
        "training.min-lr-ratio": 0.1, "roles.student.ema-decay": prof.teacher_ema,
        "training.checkpoint-every": 0, "method.flow-shift": prof.teacher_shift,
        "method.cfg-rate": prof.cfg_rate})], args.in_process, args.threads)
    teacher = teacher_dir / "export"

    # 3. DMD2: student and critic from the teacher; the rollouts start from the rows' image conditions
    student_dir = out / "dmd2"
    t_dmd = train(["dmd2", *flags({
        "roles.student.path": teacher, "roles.teacher.path": teacher, "roles.critic.path": teacher,
        "roles.teacher.dtype": "float32", "data.path": out / "data", "data.no-normalize-latents": (), **common,
        "training.output-dir": student_dir, "training.max-steps": prof.dmd_steps,
        "training.batch-size": prof.dmd_batch, "training.lr": prof.student_lr,
        "training.checkpoint-every": prof.dmd_checkpoint_every, "training.keep-checkpoints": 0,
        "method.latent-shape": task.latent_shape[1:],
        "method.dmd-denoising-steps": prof.student_timesteps, "method.generator-update-interval": prof.interval,
        "method.real-score-guidance-scale": prof.dmd_guidance, "method.flow-shift": prof.dmd_shift,
        "method.critic-lr": prof.critic_lr})], args.in_process, args.threads)

    # 4. measure on held-out clips' first frames
    print("measuring (held-out first frames and their prompts, decoded; FD against held-out real clips)", flush=True)
    labels = toy.labels_for(prof.eval_clips)
    reference = toy.features(toy.render(random.fold_in(key, 2), toy.labels_for(4 * prof.eval_clips), task))
    given = toy.render(random.fold_in(key, 3), labels, task)
    free = args.free_motion
    cond = toy.image_condition(given, task)
    text = free_prompts(labels, task) if free else toy.prompts(labels, task)
    rows = [Row("real clips (the conditioning clips themselves)", *scores(given, given, labels, reference, free), 0,
                0.0)]
    t_cfg, t_params = wan.load(teacher)
    s_cfg, s_params = wan.load(student_dir / "export")
    sample_key = random.fold_in(key, 4)

    def unipc(n):
        return configs.SamplerConfig(kind="unipc", num_steps=n, shift=prof.sample_shift, guidance_scale=prof.guidance)

    def sde(timesteps):
        return configs.SamplerConfig(kind="sde", timesteps=timesteps)

    steps4 = prof.student_timesteps
    runs = [("I2V teacher, UniPC 50 steps, CFG", t_params, t_cfg, unipc(50)),
            ("I2V teacher, UniPC 4 steps, CFG", t_params, t_cfg, unipc(4)),
            ("I2V teacher, SDE 4 steps, no CFG (DMD2 student at step 0)", t_params, t_cfg, sde(steps4)),
            ("I2V teacher, SDE 1 step, no CFG", t_params, t_cfg, sde(steps4[:1])),
            ("I2V DMD2 student, 4 steps", s_params, s_cfg, sde(steps4)),
            ("I2V DMD2 student, 2 steps", s_params, s_cfg, sde((steps4[0], steps4[len(steps4) // 2]))),
            ("I2V DMD2 student, 1 step", s_params, s_cfg, sde(steps4[:1]))]
    for name, params, cfg, sampler in runs:
        lat, wall = sample(params, cfg, text, cond, task.latent_shape, sampler, sample_key)
        row = Row(name, *scores(toy.decode(lat, task), given, labels, reference, free),
                  nfe(sigmas_from_config(sampler), sampler.guidance_scale), 1000 * wall / len(labels))
        rows.append(row)
        print(f"  {name:<58} adherence {row.adherence:5.1f}  FD {row.fd:7.3f}  first frame {row.first_frame_px:5.2f} "
              f"px  directions {row.direction_bits:4.2f} bits  NFE {row.nfe:3d}", flush=True)

    # the student's learning curve from its checkpoints (step 0: the teacher's weights)
    n = prof.curve_clips
    learning = []
    for ck in [None, *checkpoint.list_checkpoints(student_dir)]:
        if ck is None:
            step, params = 0, t_params
        else:
            trees, meta = checkpoint.load(ck)
            step, params = meta["step"], trees["student"]
        lat, _ = sample(params, s_cfg, text[:n], {k: v[:n] for k, v in cond.items()}, task.latent_shape, sde(steps4),
                        sample_key)
        a, fd, px, bits = scores(toy.decode(lat, task), given[:n], labels[:n], reference, free)
        learning.append({"step": step, "adherence": a, "fd": fd, "first_frame_px": px, "direction_bits": bits})

    total = time.perf_counter() - t_start
    result = {"rows": [dataclasses.asdict(r) for r in rows], "learning": learning,
              "teacher_curve": curve(teacher_dir / "metrics.jsonl", ["loss"]),
              "dmd_curve": curve(student_dir / "metrics.jsonl", ["critic_loss", "generator_loss"]),
              "seconds": {"teacher": t_teacher, "dmd2": t_dmd, "total": total}, "profile": dataclasses.asdict(prof)}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    report = markdown(result, args, prof)
    (out / "results.md").write_text(report)
    print("\n" + report)
    return result


def markdown(result: dict, args, prof: Profile) -> str:
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    sec = result["seconds"]
    opts = (" --tiny" if args.tiny else "") + (" --free-motion" if args.free_motion else "")
    lines = [f"Command: `python bench/toy_i2v.py{opts}` (seed {args.seed}, {args.threads} "
             f"torch threads); {time.strftime('%Y-%m-%d')}; {machine}.",
             f"Wall time: teacher {sec['teacher']:.0f} s, DMD2 {sec['dmd2']:.0f} s, total {sec['total']:.0f} s.", "",
             f"| sampler ({prof.eval_clips} held-out first frames, {4 if args.free_motion else 16} prompts) | "
             "adherence % | Frechet distance | first-frame error px | direction entropy bits | NFE | "
             "wall ms / sample |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        wall = f"{r['wall_ms']:.1f}" if r["nfe"] else "-"
        lines.append(f"| {r['name']} | {r['adherence']:.1f} | {r['fd']:.2f} | {r['first_frame_px']:.2f} | "
                     f"{r['direction_bits']:.2f} | {r['nfe'] or '-'} | {wall} |")
    lines += ["", f"DMD2 student (4 steps, SDE) over training, from its checkpoints ({prof.curve_clips} clips; "
              "step 0 is the teacher's weights):", "",
              "| DMD2 step | adherence % | Frechet distance | first-frame error px | direction entropy bits |",
              "|---|---|---|---|---|"]
    lines += [f"| {p['step']} | {p['adherence']:.1f} | {p['fd']:.2f} | {p['first_frame_px']:.2f} | "
              f"{p['direction_bits']:.2f} |" for p in result["learning"]]
    lines += ["", "Losses (window means of metrics.jsonl):", "",
              "| teacher steps | loss | | DMD2 steps | critic loss | generator loss |", "|---|---|---|---|---|---|"]
    for a, b in zip(result["teacher_curve"], result["dmd_curve"], strict=True):
        lines.append(f"| {a['steps']} | {a['loss']:.4f} | | {b['steps']} | {b['critic_loss']:.4f} | "
                     f"{b['generator_loss']:.4g} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
