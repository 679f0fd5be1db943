"""The toy-video benchmark: pretrain a tiny Wan teacher, distil it with DMD2 and with kd, measure them all.

    python bench/toy.py --grid bench/toy_grid.png   # the full benchmark (~15 min on 2 CPU cores), seeded
    python bench/toy.py --fast                      # the ~4 min version the test suite runs

Everything goes through the real command line and real checkpoints:
1. the task (`fvfunc/testing/toy.py`): a T2V parquet dataset of moving-blob clips, a text-only parquet of the
   16 prompts, and a randomly initialised tiny Wan folder;
2. `python train.py finetune` pretrains the teacher from random init (flow matching, CFG dropout);
3. `python train.py dmd2` distils the teacher's exported folder into a few-step student (simulate
   mode: text only), saving checkpoints along the way;
4. `python train.py kd` has the teacher sample ODE trajectories of the prompts once and trains a
   student from the teacher's weights to jump along them (the ODE initialisation), and a second
   `train.py dmd2`, as in 3. but from that student, shows kd as DMD2's initialisation;
5. every sampler setting is measured on fresh samples of all 16 prompts: adherence, Frechet
   distance to held-out real clips, function evaluations and CPU time per sample; the students'
   checkpoints give learning curves (kd's also its loss on held-out trajectories); a PNG grid shows
   decoded frames.

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
from fvfunc import checkpoint, lora, random  # noqa: E402
from fvfunc.losses import kd  # noqa: E402
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
    """Checkpoints kept for the learning curves."""
    # DMD2 with LoRA student and critic (rank 16 on every attention and FFN linear; both share the
    # teacher's frozen weights): the same run as above but the adapters get 5x the lrs, since a LoRA
    # starts at B = 0 and its updates are rank-limited.
    lora_rank: int = 16
    lora_lr_scale: float = 5.0
    # kd (ODE init): the student starts from the teacher's weights, as DMD2's does, and learns to jump
    # from the states of the teacher's own sampler (UniPC, CFG 4, shift 3, as in the table and as DMD2's
    # real score) at the student's 4 timesteps to where the trajectory ends. 20 UniPC steps, not 50:
    # on this teacher 10, 20, 30 and 50 steps give the same distance (3.9 to 4.2) at 2.5x less cost.
    # 512 trajectories (32 fresh noises a prompt), 400 steps of 32 at lr 1e-3 (cosine to 1e-4): 600 or
    # 1000 steps, 1024 trajectories or lr 5e-4 gave no better student (Frechet distance 4.0 to 5.1,
    # within the spread of a 256-clip measure).
    kd_repeats: int = 32
    """The 16 prompts repeated this many times, each repeat with fresh noise: 16 x kd_repeats trajectories."""
    kd_teacher_steps: int = 20
    kd_steps: int = 400
    kd_batch: int = 32
    kd_lr: float = 1e-3
    kd_chunk: int = 128
    """Trajectories the teacher samples in one batch (a big batch is far cheaper a sample on a CPU)."""
    kd_checkpoint_every: int = 100
    kd_heldout: int = 128
    """Teacher trajectories from fresh noise that kd's learning curve measures kd's loss on."""
    # evaluation
    eval_clips: int = 256
    """Clips sampled per row of the table (16 per prompt); FD against 4x as many held-out real clips."""
    curve_clips: int = 128
    """Clips per point of the student's learning curve."""


FULL = Profile()
FAST = dataclasses.replace(FULL, train_clips=512, teacher_steps=700, teacher_batch=16, teacher_warmup=30,
                           teacher_ema=0.98, dmd_steps=160, dmd_batch=8, dmd_checkpoint_every=80, eval_clips=16,
                           curve_clips=128, kd_repeats=4, kd_steps=100, kd_batch=16, kd_checkpoint_every=50)


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


def heldout_kd_loss(params, apply, trajectory: torch.Tensor, text: torch.Tensor, timesteps) -> list[float]:
    """kd's loss of `params` on teacher trajectories [B, K + 1, ...] (states at `timesteps`, then the
    end), one value per student timestep."""
    b = trajectory.shape[0]
    with torch.no_grad():
        return [float(kd.kd_loss(params, {"trajectory": trajectory, "text": text, "t": torch.full((b,), float(t)),
                                          "state": torch.full((b,), k)}, apply)[0])
                for k, t in enumerate(timesteps)]


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
    ap.add_argument("--fast", action="store_true", help="the ~4 min version the test suite runs (weaker teacher)")
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

    def dmd2(student: Path, output_dir: Path, lora_rank: int = 0) -> float:
        """DMD2 from `student`; the critic starts from the teacher; text-only data (simulate mode);
        `lora_rank`: LoRA student and critic on the frozen weights, at `prof.lora_lr_scale` x the lrs."""
        scale = prof.lora_lr_scale if lora_rank else 1.0
        adapters = {f"roles.{r}.lora.rank": lora_rank for r in ("student", "critic")} if lora_rank else {}
        return train(["dmd2", *flags({
            "roles.student.path": student, "roles.teacher.path": teacher, "roles.critic.path": teacher,
            "roles.teacher.dtype": "float32", "data.path": f"{out / 'prompts'}:4", **common,
            "training.output-dir": output_dir, "training.max-steps": prof.dmd_steps,
            "training.batch-size": prof.dmd_batch, "training.lr": scale * prof.student_lr, **adapters,
            "training.checkpoint-every": prof.dmd_checkpoint_every, "training.keep-checkpoints": 0,
            "method.latent-shape": task.latent_shape[1:],
            "method.dmd-denoising-steps": prof.student_timesteps, "method.generator-update-interval": prof.interval,
            "method.real-score-guidance-scale": prof.dmd_guidance, "method.flow-shift": prof.dmd_shift,
            "method.critic-lr": scale * prof.critic_lr})], args.in_process, args.threads)

    # 3. DMD2: the student starts from the teacher
    student_dir = out / "dmd2"
    t_dmd = dmd2(teacher, student_dir)
    lora_dir = out / "dmd2-lora"
    t_lora = dmd2(teacher, lora_dir, prof.lora_rank)

    # 4. kd from the teacher's weights on the teacher's trajectories (generated into kd/trajectories),
    #    then DMD2 as in 3. from the kd student
    kd_dir, kd_dmd_dir = out / "kd", out / "kd-dmd2"
    t_kd = train(["kd", *flags({
        "roles.student.path": teacher, "roles.teacher.path": teacher, "roles.teacher.dtype": "float32",
        "data.path": f"{out / 'prompts'}:{prof.kd_repeats}", **common, "training.output-dir": kd_dir,
        "training.max-steps": prof.kd_steps, "training.batch-size": prof.kd_batch, "training.lr": prof.kd_lr,
        "training.lr-schedule": "cosine", "training.min-lr-ratio": 0.1,
        "training.checkpoint-every": prof.kd_checkpoint_every, "training.keep-checkpoints": 0,
        "method.latent-shape": task.latent_shape[1:], "method.t-list": prof.student_timesteps,
        "method.teacher-steps": prof.kd_teacher_steps, "method.flow-shift": prof.sample_shift,
        "method.guidance-scale": prof.guidance, "method.chunk": prof.kd_chunk,
        # sample i's noise key is fold_in(key(method.seed), i): a root key apart from this file's `key`
        # (whose fold_in(key, 1..5) streams make the data and the measures), another one a seed
        "method.seed": 1000 + args.seed})], args.in_process, args.threads)
    t_kd_dmd = dmd2(kd_dir / "export", kd_dmd_dir)

    # 5. measure
    print("measuring (samples of all 16 prompts, decoded; FD against held-out real clips)", flush=True)
    labels = toy.labels_for(prof.eval_clips)
    real_rgb = toy.render(random.fold_in(key, 2), toy.labels_for(4 * prof.eval_clips), task)
    reference = toy.features(real_rgb)
    second = toy.render(random.fold_in(key, 3), labels, task)
    rows = [Row("real clips (a second held-out set)", toy.adherence(second, labels),
                toy.frechet_distance(reference, toy.features(second)), 0, 0.0, 0.0)]
    t_cfg, t_params = wan.load(teacher)
    s_cfg, s_params = wan.load(student_dir / "export")
    kd_cfg, kd_params = wan.load(kd_dir / "export")
    kdd_cfg, kdd_params = wan.load(kd_dmd_dir / "export")
    lora_cfg, lora_params = wan.load(lora_dir / "export")  # the merged transformer
    sample_key = random.fold_in(key, 4)

    def unipc(n):
        return configs.SamplerConfig(kind="unipc", num_steps=n, shift=prof.sample_shift,
                                     guidance_scale=prof.guidance)

    def sde(timesteps):
        return configs.SamplerConfig(kind="sde", timesteps=timesteps)

    def ode(timesteps):  # Euler over the timesteps: kd's sampler (kd.SPEC.sampler)
        return configs.SamplerConfig(kind="ode", timesteps=timesteps)

    steps4 = prof.student_timesteps
    two, one = (steps4[0], steps4[len(steps4) // 2]), (steps4[0],)
    runs = [("teacher, UniPC 50 steps, CFG", t_params, t_cfg, unipc(50)),
            ("teacher, UniPC 4 steps, CFG", t_params, t_cfg, unipc(4)),
            ("teacher, UniPC 1 step, CFG", t_params, t_cfg, unipc(1)),
            ("teacher, SDE 4 steps, no CFG (DMD2 student at step 0)", t_params, t_cfg, sde(steps4)),
            ("teacher, ODE 4 steps, no CFG (kd student at step 0)", t_params, t_cfg, ode(steps4)),
            ("DMD2 student, 4 steps", s_params, s_cfg, sde(steps4)),
            ("DMD2 student, 2 steps", s_params, s_cfg, sde(two)),
            ("DMD2 student, 1 step", s_params, s_cfg, sde(one)),
            ("kd student, 4 steps (ODE)", kd_params, kd_cfg, ode(steps4)),
            ("kd -> DMD2 student, 4 steps", kdd_params, kdd_cfg, sde(steps4)),
            (f"DMD2 LoRA student (rank {prof.lora_rank}, LoRA critic), 4 steps", lora_params, lora_cfg, sde(steps4))]
    pictures = {}
    for name, params, cfg, sampler in runs:
        row, rgb = measure(name, params, cfg, task, sampler, labels, reference, sample_key)
        rows.append(row)
        pictures[name] = rgb

    # learning curves: a run's checkpoints (step 0: the weights it starts from), sampled with the
    # student's 4 steps on one set of clips
    curve_labels = toy.labels_for(prof.curve_clips)
    curve_text = toy.prompts(curve_labels, task)

    def learning_curve(run_dir: Path, start, sampler, extra=None, lora_rank=0) -> list[dict]:
        points = []
        for ck in [None, *checkpoint.list_checkpoints(run_dir)]:
            if ck is None:
                step, params = 0, start
            else:
                trees, meta = checkpoint.load(ck)
                step, params = meta["step"], trees["student"]
                if lora_rank:  # a LoRA run's checkpoints hold the adapters alone
                    params = lora.merge(start, params, lora.scale_of(lora_rank, 0.0))
            lat, _, _ = sample(params, s_cfg, curve_text, task.latent_shape, sampler, sample_key)
            rgb = toy.decode(lat, task)
            points.append({"step": step, "adherence": toy.adherence(rgb, curve_labels),
                           "fd": toy.frechet_distance(reference, toy.features(rgb)),
                           **(extra(params) if extra else {})})
        return points

    # kd's curve also measures kd's own loss on trajectories it never trained on: the teacher's, as kd
    # made them, from fresh noise (this file's key, not kd's)
    def apply(p, x, t, c):
        return wan.apply(p, t_cfg, x, t, c)
    kd_run = configs.KDConfig(t_list=steps4, teacher_steps=prof.kd_teacher_steps, flow_shift=prof.sample_shift,
                              guidance_scale=prof.guidance)
    heldout_text = toy.prompts(toy.labels_for(prof.kd_heldout), task)
    noise = random.normal(random.fold_in(key, 5), (prof.kd_heldout, *task.latent_shape))
    heldout = kd.trajectories(tiny.role(apply, trainable=False), t_params, heldout_text, noise, kd_run)

    def heldout_loss(params) -> dict:
        per_step = heldout_kd_loss(params, apply, heldout, heldout_text, steps4)
        return {"heldout_loss": sum(per_step) / len(per_step), "heldout_loss_per_step": per_step}

    learning = learning_curve(student_dir, t_params, sde(steps4))
    kd_learning = learning_curve(kd_dir, t_params, ode(steps4), heldout_loss)
    kd_dmd_learning = learning_curve(kd_dmd_dir, kd_params, sde(steps4))
    lora_learning = learning_curve(lora_dir, t_params, sde(steps4), lora_rank=prof.lora_rank)

    # 6. picture: one column a sampler, one row a prompt
    pick = torch.tensor([0, 5, 10, 15, 3, 6])  # red-left, green-right, blue-up, yellow-down, red-down, green-up
    names = ["teacher, UniPC 50 steps, CFG", "DMD2 student, 4 steps", "kd student, 4 steps (ODE)",
             "kd -> DMD2 student, 4 steps", "teacher, UniPC 4 steps, CFG"]
    headers = ["teacher: 50 steps (UniPC, CFG, 100 NFE)", "DMD2 student: 4 steps (4 NFE)",
               "kd student: 4 steps (ODE, 4 NFE)", "kd -> DMD2 student: 4 steps (4 NFE)",
               "teacher: 4 steps (UniPC, CFG, 8 NFE)"]
    import imageio.v2 as imageio
    image = toy.grid([pictures[n][pick] for n in names], headers=headers,
                     row_names=[" ".join(toy.CLASSES[int(i)]) for i in pick])
    imageio.imwrite(out / "toy_grid.png", image)
    if args.grid:
        imageio.imwrite(args.grid, image)

    total = time.perf_counter() - t_start
    kd_train = sum(json.loads(line)["step_time"] for line in (kd_dir / "metrics.jsonl").read_text().splitlines())
    result = {"rows": [dataclasses.asdict(r) for r in rows], "learning": learning, "kd_learning": kd_learning,
              "kd_dmd_learning": kd_dmd_learning, "lora_learning": lora_learning,
              "teacher_curve": curve(teacher_dir / "metrics.jsonl", ["loss"]),
              "dmd_curve": curve(student_dir / "metrics.jsonl", ["critic_loss", "generator_loss"]),
              "kd_curve": curve(kd_dir / "metrics.jsonl", ["loss"]),
              "kd_dmd_curve": curve(kd_dmd_dir / "metrics.jsonl", ["critic_loss", "generator_loss"]),
              "seconds": {"teacher": t_teacher, "dmd2": t_dmd, "dmd2_lora": t_lora, "kd": t_kd, "kd_steps": kd_train,
                          "kd_dmd2": t_kd_dmd, "total": total},
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
             f"Wall time: teacher {sec['teacher']:.0f} s, DMD2 {sec['dmd2']:.0f} s, "
             f"DMD2 LoRA {sec['dmd2_lora']:.0f} s, kd {sec['kd']:.0f} s "
             f"({sec['kd_steps']:.0f} s of them training steps, the rest mostly the teacher's trajectories), "
             f"kd -> DMD2 {sec['kd_dmd2']:.0f} s, total {sec['total']:.0f} s.", "",
             f"| sampler ({prof.eval_clips} clips, 16 prompts) | adherence % | Frechet distance | NFE "
             "| CPU ms / sample | wall ms / sample |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cpu, wall = (f"{r['cpu_ms']:.1f}", f"{r['wall_ms']:.1f}") if r["nfe"] else ("-", "-")
        lines.append(f"| {r['name']} | {r['adherence']:.1f} | {r['fd']:.2f} | {r['nfe'] or '-'} | {cpu} | {wall} |")
    lines += ["", "NFE counts a guided step as 2. CPU ms: `time.process_time` of one batched sampling call "
              f"({prof.eval_clips} clips, {args.threads} threads, both threads counted) over the clips; wall ms: "
              "`time.perf_counter` likewise. Adherence: colour and direction both right (chance 6.25%). "
              "Frechet distance: 11 blob features, in units of the real clips' spread (fvfunc/testing/toy.py).",
              "", f"DMD2 students (4 steps, SDE) over training, from their checkpoints ({prof.curve_clips} "
              "clips; step 0 is the weights they start from: the teacher's, or the kd student's; LoRA: "
              f"rank {prof.lora_rank} student and critic, {prof.lora_lr_scale:g}x the lrs):", "",
              "| DMD2 step | adherence % | Frechet distance | | kd -> DMD2: adherence % | Frechet distance "
              "| | LoRA: adherence % | Frechet distance |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {p['step']} | {p['adherence']:.1f} | {p['fd']:.2f} | | {q['adherence']:.1f} | {q['fd']:.2f} "
              f"| | {r['adherence']:.1f} | {r['fd']:.2f} |"
              for p, q, r in zip(result["learning"], result["kd_dmd_learning"], result["lora_learning"], strict=True)]
    steps = " / ".join(str(t) for t in prof.student_timesteps)
    lines += ["", f"kd student (4 steps, ODE) over training, from its checkpoints ({prof.curve_clips} clips; step 0 "
              f"is the teacher's weights it starts from); held-out loss: kd's loss on {prof.kd_heldout} teacher "
              "trajectories from fresh noise, the mean and the values at each student timestep:", "",
              f"| kd step | adherence % | Frechet distance | held-out kd loss | at t = {steps} |",
              "|---|---|---|---|---|"]
    lines += [f"| {p['step']} | {p['adherence']:.1f} | {p['fd']:.2f} | {p['heldout_loss']:.4f} | "
              + " / ".join(f"{x:.4f}" for x in p["heldout_loss_per_step"]) + " |" for p in result["kd_learning"]]
    lines += ["", "Losses (window means of metrics.jsonl):", "",
              "| teacher steps | loss | | DMD2 steps | critic loss | generator loss | | kd steps | loss |",
              "|---|---|---|---|---|---|---|---|---|"]
    for a, b, c in zip(result["teacher_curve"], result["dmd_curve"], result["kd_curve"], strict=True):
        lines.append(f"| {a['steps']} | {a['loss']:.4f} | | {b['steps']} | {b['critic_loss']:.4f} | "
                     f"{b['generator_loss']:.4g} | | {c['steps']} | {c['loss']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
