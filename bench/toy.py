"""The toy-video benchmark: pretrain a tiny Wan teacher, distil it with DMD2, measure both.

    python bench/toy.py --grid bench/toy_grid.png   # the full benchmark (~7 min on 2 CPU cores), seeded
    python bench/toy.py --fast                      # the < 2 min version the test suite runs

Everything goes through the real command line and real checkpoints:
1. the task (`fvfunc/toy.py`): a T2V parquet dataset of moving-blob clips, a text-only parquet of the
   16 prompts, and a randomly initialised tiny Wan folder;
2. `python train.py finetune` pretrains the teacher from random init (flow matching, CFG dropout);
3. `python train.py dmd2` distils the teacher's exported folder into a few-step student (simulate
   mode: text only), saving checkpoints along the way;
4. every sampler setting is measured on fresh samples of all 16 prompts: adherence, Frechet
   distance to held-out real clips, function evaluations and CPU time per sample; the student's
   checkpoints give a learning curve; a PNG grid shows decoded frames.

The table goes to stdout and `OUT/results.md`, the grid to `OUT/toy_grid.png` (and `--grid PATH`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import configs  # noqa: E402
from fvfunc import checkpoint, random  # noqa: E402
from fvfunc.models import wan  # noqa: E402
from fvfunc.samplers import nfe, sigmas_from_config  # noqa: E402
from fvfunc.testing import tiny, toy  # noqa: E402
from fvfunc.validation import generate  # noqa: E402


@dataclass(frozen=True)
class Profile:
    """Everything the benchmark chooses; `FULL` and `FAST` below (the task is `toy.Task()`)."""

    # the model: a tiny Wan2.1 from random init. dim 128 as 2 heads of 64 (wider heads give RoPE more
    # frequencies per axis), 3 layers, FFN 384: 0.86 M params, ~0.12 s a step of 32 clips on 2 cores.
    heads: int = 2
    head_dim: int = 64
    layers: int = 3
    ffn: int = 384
    train_clips: int = 2048
    """Distinct real clips in the T2V dataset (128 per prompt)."""
    # teacher: flow matching, Wan's conventions; a high lr (2e-3, cosine to 2e-4) because the model is
    # tiny and the budget is 2000 steps; EMA 0.995 is what gets exported.
    teacher_steps: int = 2000
    teacher_batch: int = 32
    teacher_lr: float = 2e-3
    teacher_warmup: int = 100
    teacher_ema: float = 0.995
    teacher_shift: float = 3.0
    """Training sigma shift. 16 x 16 latents need far less than Wan's 480p shift of 5 to 8."""
    cfg_rate: float = 0.1
    """Text dropout, so the teacher also learns the unconditional flow that guidance needs."""
    # teacher sampling: UniPC with CFG at the training shift; guidance 4 gave the best FD and adherence
    # of 1, 2 and 4 on an earlier teacher (1200 steps)
    sample_shift: float = 3.0
    guidance: float = 4.0
    # DMD2 (defaults are for 1.3B models: lr 2e-6, critic 8e-6, interval 5, guidance 4.5, shift 8).
    # The toy needs about 100x those lrs to move in 800 steps; the critic gets 3x the student's lr (TTUR) and,
    # with interval 5, five updates per student update so it keeps up with the student; the teacher's
    # CFG in the real score is the guidance the 50-step teacher samples best with; the score sigmas use
    # the teacher's training shift (3), as 8 would put most score sigmas near 1 (median 0.89).
    dmd_steps: int = 800
    dmd_batch: int = 16
    student_lr: float = 2e-4
    critic_lr: float = 6e-4
    interval: int = 5
    dmd_guidance: float = 4.0
    dmd_shift: float = 3.0
    student_timesteps: tuple[int, ...] = (1000, 750, 500, 250)
    """The student's 4 steps (2 steps: 1000 500; 1 step: 1000)."""
    dmd_checkpoint_every: int = 100
    """Checkpoints kept for the learning curve."""
    # evaluation
    eval_clips: int = 256
    """Clips sampled per row of the table (16 per prompt); FD against 4x as many held-out real clips."""
    curve_clips: int = 128
    """Clips per point of the student's learning curve."""


FULL = Profile()
FAST = dataclasses.replace(FULL, train_clips=512, teacher_steps=700, teacher_batch=16, teacher_warmup=30,
                           teacher_ema=0.98, dmd_steps=160, dmd_batch=8, dmd_checkpoint_every=80, eval_clips=16,
                           curve_clips=128)


def flags(d: dict) -> list[str]:
    out = []
    for k, v in d.items():
        out.append(f"--{k}")
        out += [str(x) for x in v] if isinstance(v, (tuple, list)) else [str(v)]
    return out


def train(argv: list[str], in_process: bool, threads: int) -> float:
    """`python train.py ARGV` (or its main, in this process); returns its wall seconds. The command is
    echoed as a user would type it; its progress bar and log go to the terminal."""
    print("$ python train.py " + " ".join(argv), flush=True)
    t0 = time.perf_counter()
    if in_process:
        from fvfunc import cli
        code = cli.main(argv)
    else:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), WANDB_SILENT="true")
        code = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, env=env).returncode
    if code != 0:
        raise SystemExit(f"train.py {argv[0]} failed with exit code {code}")
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------- measuring


@dataclass
class Row:
    name: str
    adherence: float
    fd: float
    nfe: int
    cpu_ms: float
    wall_ms: float


def sample(params, cfg, text, shape, sampler, key):
    """(latents, process seconds, wall seconds) of one batched sampling call."""
    def apply(p, x, t, c):
        return wan.apply(p, cfg, x, t, c)
    c0, w0 = time.process_time(), time.perf_counter()
    latents = generate(apply, params, text, shape, sampler, key=key)
    return latents, time.process_time() - c0, time.perf_counter() - w0


def measure(name, params, cfg, task, sampler, labels, reference, key) -> tuple[Row, torch.Tensor]:
    text = toy.prompts(labels, task)
    latents, cpu, wall = sample(params, cfg, text, task.latent_shape, sampler, key)
    rgb = toy.decode(latents, task)
    n = len(labels)
    row = Row(name, toy.adherence(rgb, labels), toy.frechet_distance(reference, toy.features(rgb)),
              nfe(sigmas_from_config(sampler), sampler.guidance_scale), 1000 * cpu / n, 1000 * wall / n)
    print(f"  {name:<44} adherence {row.adherence:5.1f}  FD {row.fd:7.3f}  NFE {row.nfe:3d}  "
          f"{row.cpu_ms:6.2f} CPU ms/sample", flush=True)
    return row, rgb


def curve(metrics_path: Path, keys: list[str], points: int = 6) -> list[dict]:
    """Means of `keys` over `points` equal windows of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    out, n = [], len(rows)
    for i in range(points):
        window = rows[i * n // points:(i + 1) * n // points]
        entry = {"steps": f"{window[0]['step']}-{window[-1]['step']}"}
        for k in keys:
            vals = [r[k] for r in window if k in r]
            entry[k] = sum(vals) / len(vals) if vals else float("nan")
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "toy"), help="output folder (replaced)")
    ap.add_argument("--fast", action="store_true", help="the < 2 min version the test suite runs (weaker teacher)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (and OMP_NUM_THREADS of train.py)")
    ap.add_argument("--grid", default="", help="also write the PNG grid here (e.g. bench/toy_grid.png)")
    ap.add_argument("--in-process", action="store_true",
                    help="call train.py's main in this process instead of a subprocess (saves the start-up)")
    args = ap.parse_args(argv)
    prof = FAST if args.fast else FULL
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    if out.exists():
        import shutil
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t_start = time.perf_counter()
    task = toy.Task()
    key = random.key(args.seed)

    # 1. the task: data, prompts, a random tiny Wan
    model_cfg = tiny.tiny_config(num_attention_heads=prof.heads, attention_head_dim=prof.head_dim, ffn_dim=prof.ffn,
                                 num_layers=prof.layers, freq_dim=64, text_dim=task.text_dim, in_channels=task.channels,
                                 out_channels=task.channels)
    tiny.write_pipeline(out / "init", model_cfg, seed=args.seed)
    toy.write_dataset(out / "data", prof.train_clips, random.fold_in(key, 1), task)
    toy.write_prompts(out / "prompts", task)
    # data.shuffle rows: the uniform order the recorded results were made with (the files are small)
    common = {"data.text-len": 8, "data.shuffle": "rows", "training.precision": "float32", "training.device": "cpu",
              "training.seed": args.seed, "tracking.wandb-mode": "disabled", "validation.every": 0}

    # 2. teacher: flow matching from random init
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

    # 3. DMD2: student and critic start from the teacher; text-only data (simulate mode)
    student_dir = out / "dmd2"
    t_dmd = train(["dmd2", *flags({
        "roles.student.path": teacher, "roles.teacher.path": teacher, "roles.critic.path": teacher,
        "roles.teacher.dtype": "float32", "data.path": f"{out / 'prompts'}:4", **common,
        "training.output-dir": student_dir, "training.max-steps": prof.dmd_steps,
        "training.batch-size": prof.dmd_batch, "training.lr": prof.student_lr,
        "training.checkpoint-every": prof.dmd_checkpoint_every, "training.keep-checkpoints": 0,
        "method.latent-shape": task.latent_shape[1:],
        "method.dmd-denoising-steps": prof.student_timesteps, "method.generator-update-interval": prof.interval,
        "method.real-score-guidance-scale": prof.dmd_guidance, "method.flow-shift": prof.dmd_shift,
        "method.critic-lr": prof.critic_lr})], args.in_process, args.threads)

    # 4. measure
    print("measuring (samples of all 16 prompts, decoded; FD against held-out real clips)", flush=True)
    labels = toy.labels_for(prof.eval_clips)
    real_rgb = toy.render(random.fold_in(key, 2), toy.labels_for(4 * prof.eval_clips), task)
    reference = toy.features(real_rgb)
    second = toy.render(random.fold_in(key, 3), labels, task)
    rows = [Row("real clips (a second held-out set)", toy.adherence(second, labels),
                toy.frechet_distance(reference, toy.features(second)), 0, 0.0, 0.0)]
    t_cfg, t_params = wan.load(teacher)
    s_cfg, s_params = wan.load(student_dir / "export")
    sample_key = random.fold_in(key, 4)

    def unipc(n):
        return configs.SamplerConfig(kind="unipc", num_steps=n, shift=prof.sample_shift,
                                     guidance_scale=prof.guidance)

    def sde(timesteps):
        return configs.SamplerConfig(kind="sde", timesteps=timesteps)

    steps4 = prof.student_timesteps
    two, one = (steps4[0], steps4[len(steps4) // 2]), (steps4[0],)
    runs = [("teacher, UniPC 50 steps, CFG", t_params, t_cfg, unipc(50)),
            ("teacher, UniPC 4 steps, CFG", t_params, t_cfg, unipc(4)),
            ("teacher, UniPC 1 step, CFG", t_params, t_cfg, unipc(1)),
            ("teacher, SDE 4 steps, no CFG (student at step 0)", t_params, t_cfg, sde(steps4)),
            ("DMD2 student, 4 steps", s_params, s_cfg, sde(steps4)),
            ("DMD2 student, 2 steps", s_params, s_cfg, sde(two)),
            ("DMD2 student, 1 step", s_params, s_cfg, sde(one))]
    pictures = {}
    for name, params, cfg, sampler in runs:
        row, rgb = measure(name, params, cfg, task, sampler, labels, reference, sample_key)
        rows.append(row)
        pictures[name] = rgb

    # the student's learning curve: its checkpoints (step 0: the teacher's weights it starts from),
    # sampled with its 4 steps on one set of clips
    curve_labels = toy.labels_for(prof.curve_clips)
    curve_text = toy.prompts(curve_labels, task)
    learning = []
    for ck in [None, *checkpoint.list_checkpoints(student_dir)]:
        if ck is None:
            step, params = 0, t_params
        else:
            trees, meta = checkpoint.load(ck)
            step, params = meta["step"], trees["student"]
        lat, _, _ = sample(params, s_cfg, curve_text, task.latent_shape, sde(steps4), sample_key)
        rgb = toy.decode(lat, task)
        learning.append({"step": step, "adherence": toy.adherence(rgb, curve_labels),
                         "fd": toy.frechet_distance(reference, toy.features(rgb))})

    # 5. picture: teacher 50 steps | student 4 steps | teacher 4 steps, one row a prompt
    pick = torch.tensor([0, 5, 10, 15, 3, 6])  # red-left, green-right, blue-up, yellow-down, red-down, green-up
    names = ["teacher, UniPC 50 steps, CFG", "DMD2 student, 4 steps", "teacher, UniPC 4 steps, CFG"]
    headers = ["teacher: 50 steps (UniPC, CFG, 100 NFE)", "DMD2 student: 4 steps (4 NFE)",
               "teacher: 4 steps (UniPC, CFG, 8 NFE)"]
    import imageio.v2 as imageio
    image = toy.grid([pictures[n][pick] for n in names], headers=headers,
                     row_names=[" ".join(toy.CLASSES[int(i)]) for i in pick])
    imageio.imwrite(out / "toy_grid.png", image)
    if args.grid:
        imageio.imwrite(args.grid, image)

    total = time.perf_counter() - t_start
    result = {"rows": [dataclasses.asdict(r) for r in rows], "learning": learning,
              "teacher_curve": curve(teacher_dir / "metrics.jsonl", ["loss"]),
              "dmd_curve": curve(student_dir / "metrics.jsonl", ["critic_loss", "generator_loss"]),
              "seconds": {"teacher": t_teacher, "dmd2": t_dmd, "total": total},
              "captions": [toy.caption(int(i)) for i in pick], "profile": dataclasses.asdict(prof)}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    report = markdown(result, args, prof)
    (out / "results.md").write_text(report)
    print("\n" + report)
    return result


def markdown(result: dict, args, prof: Profile) -> str:
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    sec = result["seconds"]
    lines = [f"Command: `python bench/toy.py{' --fast' if args.fast else ''}` (seed {args.seed}, "
             f"{args.threads} torch threads); {time.strftime('%Y-%m-%d')}; {machine}.",
             f"Wall time: teacher {sec['teacher']:.0f} s, DMD2 {sec['dmd2']:.0f} s, total {sec['total']:.0f} s.", "",
             f"| sampler ({prof.eval_clips} clips, 16 prompts) | adherence % | Frechet distance | NFE "
             "| CPU ms / sample | wall ms / sample |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cpu, wall = (f"{r['cpu_ms']:.1f}", f"{r['wall_ms']:.1f}") if r["nfe"] else ("-", "-")
        lines.append(f"| {r['name']} | {r['adherence']:.1f} | {r['fd']:.2f} | {r['nfe'] or '-'} | {cpu} | {wall} |")
    lines += ["", "NFE counts a guided step as 2. CPU ms: `time.process_time` of one batched sampling call "
              f"({prof.eval_clips} clips, {args.threads} threads, both threads counted) over the clips; wall ms: "
              "`time.perf_counter` likewise. Adherence: colour and direction both right (chance 6.25%). "
              "Frechet distance: 11 blob features, in units of the real clips' spread (fvfunc/toy.py).",
              "", f"DMD2 student (4 steps) over training, from its checkpoints ({prof.curve_clips} clips; "
              "step 0 is the teacher's weights it starts from):", "",
              "| step | adherence % | Frechet distance |", "|---|---|---|"]
    lines += [f"| {p['step']} | {p['adherence']:.1f} | {p['fd']:.2f} |" for p in result["learning"]]
    lines += ["", "Losses (window means of metrics.jsonl):", "",
              "| teacher steps | loss | | DMD2 steps | critic loss | generator loss |", "|---|---|---|---|---|---|"]
    for a, b in zip(result["teacher_curve"], result["dmd_curve"], strict=True):
        lines.append(f"| {a['steps']} | {a['loss']:.4f} | | {b['steps']} | {b['critic_loss']:.4f} | "
                     f"{b['generator_loss']:.4g} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
