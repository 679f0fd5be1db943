"""GPU benchmark: Wan2.2 A14B-config jobs on one GPU, each role an expert pair (two 14B-config experts,
boundary 0.875) built as the trainer builds it (fvfunc.roles.place / adapt per expert, roles.join).

    python bench/a14b_step.py           # one H200
    python bench/a14b_step.py --tiny    # the same code paths on tiny experts (CPU smoke test)

Jobs (each at 8,190 tokens, 21x30x52 latents, and at 32,760, 21x60x104 = 81x480x832 video):
- LoRA finetune of the pair: both experts' bf16 bases frozen, rank-64 adapters per expert, each sample
  routed to the expert its noise level picks (the method's own draws; batch 1).
- DMD2 with a LoRA student pair and a LoRA critic pair sharing the teacher pair's two frozen bf16 experts
  (one copy of each expert in memory for the three roles), generator_update_interval 1 (every step is a
  generator and a critic update), step list 1000 750 500 250 (across the boundary), simulate rollout.
Random-init weights, bf16 compute, remat="attention", eager blocks, text 512. Every figure is the median
of timed steps after warm-up (CUDA events); peak memory is the allocator's high-water mark over the
timed steps, bases and optimizer state included; a job that runs out of memory is reported as OOM.
Prints a table and the memory plan (bytes of params, gradients, AdamW states) and appends both to
bench/RESULTS.md (unless --tiny). Needs torch and safetensors (fvfunc imports it); no diffusers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_step import free, inputs, measure, sync  # noqa: E402

import configs  # noqa: E402
from fvfunc import distributed, random, roles  # noqa: E402
from fvfunc.losses import dmd2, flow_matching  # noqa: E402
from fvfunc.models import wan  # noqa: E402
from fvfunc.testing import tiny  # noqa: E402

WAN_A14B_EXPERT = wan.WanConfig(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40,
                                text_dim=4096, freq_dim=256, in_channels=16, out_channels=16)
"""One expert of Wan2.2-T2V-A14B (the Wan2.1-14B architecture)."""
BOUNDARY = 0.875
NAMES = wan.EXPERTS
GIB = 2**30


def training(args):
    return configs.TrainingConfig(lr=1e-5, max_steps=1000, precision="bfloat16", attention=args.attention,
                                  remat="attention" if not args.tiny else "none", donate=True, device=args.device)


def teacher_pair(cfg, t, process):
    """The frozen pair: each expert random-init in bf16 on the device, placed as roles.build places it."""
    parts = [roles.place("teacher", wan.FAMILY, cfg, wan.init(cfg, random.key(i), dtype=torch.bfloat16,
                                                              device=process.device), t, process, False, False)
             for i in range(len(NAMES))]
    return parts


def lora_pair(name, parts, rank, process, folder=""):
    """A trainable LoRA pair on the frozen experts `parts` (their bf16 weights shared, not copied)."""
    adapted = [roles.adapt(p._replace(name=name, trainable=True), configs.LoraConfig(rank=rank), f"{name}.lora",
                           random.key(10 + i), process.device) for i, p in enumerate(parts)]
    return roles.join(name, adapted, NAMES, BOUNDARY, folder or None)


def step_time(method, params, batch, device, warmup, reps):
    holder = {"state": method.init(params, random.key(1))}

    def step():
        holder["state"], _ = method.step(holder["state"], batch)
    s, _, peak = measure(step, device, warmup, reps)
    return s, peak


def finetune_lora(args, cfg, latent, process):
    dev, t = process.device, training(args)
    parts = teacher_pair(cfg, t, process)
    student = lora_pair("student", parts, args.rank, process)
    method = flow_matching.make(tiny.run_of(flow_matching.SPEC, configs.FinetuneConfig(), t), {"student": student})
    x0, text = inputs(cfg, latent, args.text_len, dev)
    batch = {"latents": x0, "text": text, "sample_index": torch.arange(1, device=dev)}
    return step_time(method, {"student": student.params}, batch, dev, args.warmup, args.reps)


def dmd2_lora(args, cfg, latent, process):
    dev, t = process.device, training(args)
    parts = teacher_pair(cfg, t, process)
    teacher = roles.join("teacher", parts, NAMES, BOUNDARY, None)
    student, critic = (lora_pair(n, parts, args.rank, process) for n in ("student", "critic"))
    assert all(student.base[k] is teacher.params[k] is critic.base[k] for k in teacher.params)  # held once
    method_cfg = dataclasses.replace(dmd2.SPEC.run().method, latent_shape=tuple(latent[1:]),
                                     generator_update_interval=1, dmd_denoising_steps=(1000, 750, 500, 250))
    run = tiny.run_of(dmd2.SPEC, method_cfg, t)
    method = dmd2.make(run, {"student": student, "teacher": teacher, "critic": critic})
    text = inputs(cfg, latent, args.text_len, dev)[1]
    batch = {"text": text, "negative_text": torch.zeros_like(text), "sample_index": torch.arange(1, device=dev)}
    params = {"student": student.params, "teacher": teacher.params, "critic": critic.params}
    return step_time(method, params, batch, dev, args.warmup, args.reps)


def plan(cfg, small_cfg) -> list[str]:
    """The memory plan in bytes: what each A14B job holds before activations, on 1, 4 and 8 GPUs (ZeRO-3:
    a sharded role's params, gradients and AdamW moments split evenly; bf16 frozen experts, fp32 masters,
    fp32 gradients and moments for trained ones, as fvfunc holds them)."""
    p = sum(math.prod(s) for s in wan.param_shapes(cfg).values())
    q = sum(math.prod(s) for s in wan.param_shapes(small_cfg).values())
    frozen, trained = 2 * p, 16 * p  # bf16 weights; fp32 master + fp32 grad + fp32 mu + fp32 nu
    jobs = [
        ("finetune both experts (routed), full", 2 * trained, True),
        ("finetune one chosen expert, other frozen bf16", trained + frozen, True),
        ("DMD2: teacher pair bf16 + student pair + critic pair, full", 2 * frozen + 4 * trained, True),
        ("DMD2: teacher pair bf16 + one 14B student + one 14B critic, full", 2 * frozen + 2 * trained, True),
        ("DMD2: teacher pair bf16 + 1.3B student + 1.3B critic, full", 2 * frozen + 2 * 16 * q, True),
        ("DMD2: LoRA student + critic pairs on the teacher pair's bf16 experts", 2 * frozen, False),
    ]
    lines = [f"One expert: {p / 1e9:.2f} B params = {2 * p / GIB:.1f} GiB bf16, {4 * p / GIB:.1f} GiB fp32; trained "
             f"full it holds fp32 master + gradient + 2 AdamW moments = 16 B/param = {trained / GIB:.0f} GiB. "
             f"1.3B: {q / 1e9:.2f} B params, {16 * q / GIB:.1f} GiB trained.\n",
             "| job (state before activations) | total GiB | 1 GPU | 4 GPUs, ZeRO-3 | 8 GPUs, ZeRO-3 |",
             "|---|---|---|---|---|"]
    for job, total, shardable in jobs:
        per = [(total / n if shardable else total) / GIB for n in (1, 4, 8)]
        lines.append(f"| {job} | {total / GIB:.0f} | {per[0]:.0f} | {per[1]:.0f} | {per[2]:.0f} |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--attention", default="cudnn")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--sizes", default="quarter,full", help="latent sizes to run: quarter (8,190 tokens), full")
    args = p.parse_args()
    args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    sizes = {"quarter": (16, 21, 30, 52), "full": (16, 21, 60, 104)}
    cfg = WAN_A14B_EXPERT
    if args.tiny:
        cfg, args.attention, args.text_len, args.rank = tiny.tiny_config(), "auto", 8, 4
        sizes = {"quarter": (16, 2, 4, 4), "full": (16, 2, 4, 8)}
    process = distributed.init(args.device)
    dev = process.device
    rows = []
    for size in args.sizes.split(","):
        latent = sizes[size]
        tokens = latent[1] * latent[2] * latent[3] // 4
        for label, job in ((f"LoRA rank {args.rank} finetune of the pair (bf16 bases)", finetune_lora),
                           (f"DMD2 step, LoRA rank {args.rank} student + critic pairs on the teacher pair's bf16 "
                            "experts", dmd2_lora)):
            try:
                s, peak = job(args, cfg, latent, process)
                rows.append((f"A14B-config {latent} ({tokens} tokens): {label}", f"{s:.3f}", f"{peak:.1f}"))
            except torch.cuda.OutOfMemoryError:
                rows.append((f"A14B-config {latent} ({tokens} tokens): {label}", "OOM", "-"))
            print(rows[-1], flush=True)
            free(dev)
    sync(dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    when = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    lines = [f"\n### A14B steps, measured ({name}, {when})\n",
             f"- Command: `python bench/a14b_step.py` (torch {torch.__version__}, attention {args.attention}, remat "
             f"attention, eager blocks, batch 1, text {args.text_len}; random weights; boundary {BOUNDARY}).\n",
             "| job | step s | peak GiB |", "|---|---|---|"]
    lines += [f"| {job} | {s} | {peak} |" for job, s, peak in rows]
    small = tiny.tiny_config() if args.tiny else wan.WanConfig(num_attention_heads=12, attention_head_dim=128,
                                                                ffn_dim=8960, num_layers=30, text_dim=4096)
    lines += ["", *plan(cfg, small)]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.tiny:
        with open(Path(__file__).resolve().parent / "RESULTS.md", "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
