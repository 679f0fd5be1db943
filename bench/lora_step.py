"""GPU benchmark: a LoRA finetune step against the full finetune step (Wan2.1-1.3B config), and a DMD2
step of a Wan-14B-config teacher with LoRA student and critic on one shared bf16 base, in one run.

    python bench/lora_step.py           # one H200
    python bench/lora_step.py --tiny    # the same code paths on a tiny model (CPU smoke test)

Random-init weights; the roles are made as the trainer makes them (fvfunc.roles.place / adapt, the
methods' own make / init / step), bf16 compute, remat="attention", eager blocks (no compile), batch 1.
LoRA: rank 64 on the default targets (attention q/k/v/out and FFN of every block). Every figure is the
median of timed steps after warm-up (CUDA events); peak memory is the allocator's high-water mark over
the timed steps, base weights and optimizer state included. Prints a table and appends it to
bench/RESULTS.md (unless --tiny).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_step import WAN_1_3B, free, inputs, measure, sync  # noqa: E402

import configs  # noqa: E402
from fvfunc import distributed, random, roles  # noqa: E402
from fvfunc.losses import dmd2, flow_matching  # noqa: E402
from fvfunc.models import wan  # noqa: E402
from fvfunc.testing import tiny  # noqa: E402

WAN_14B = wan.WanConfig(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096,
                        freq_dim=256, in_channels=16, out_channels=16)


def training(args):
    return configs.TrainingConfig(lr=1e-5, max_steps=1000, precision="bfloat16", attention=args.attention,
                                  remat="attention" if not args.tiny else "none", donate=True, device=args.device)


def role(cfg, params, t, process, trainable, lora_rank=0):
    r = roles.place("student", wan.FAMILY, cfg, params, t, process, False, trainable)
    if lora_rank:
        r = roles.adapt(r, configs.LoraConfig(rank=lora_rank), "lora", random.key(5), process.device)
    return r


def step_time(method, params, batch, device, warmup, reps):
    holder = {"state": method.init(params, random.key(1))}

    def step():
        holder["state"], _ = method.step(holder["state"], batch)
    s, _, peak = measure(step, device, warmup, reps)
    return s, peak


def finetune(args, cfg, latent, rank, process):
    dev, t = process.device, training(args)
    dtype = torch.bfloat16 if rank else torch.float32  # a LoRA's frozen base in bf16; full finetune: fp32 masters
    params = wan.init(cfg, random.key(0), dtype=dtype, device=dev)
    student = role(cfg, params, t, process, True, rank)
    method = flow_matching.make(tiny.run_of(flow_matching.SPEC, configs.FinetuneConfig(), t), {"student": student})
    x0, text = inputs(cfg, latent, args.text_len, dev)
    batch = {"latents": x0, "text": text, "sample_index": torch.arange(1, device=dev)}
    s, peak = step_time(method, {"student": student.params}, batch, dev, args.warmup, args.reps)
    n = sum(v.numel() for v in student.params.values())
    return s, peak, n


def dmd2_lora(args, cfg, latent, rank, process):
    dev, t = process.device, training(args)
    base = wan.init(cfg, random.key(0), dtype=torch.bfloat16, device=dev)
    teacher = role(cfg, base, t, process, False)  # placed once; the LoRA roles adapt it (as roles.build does)
    student, critic = (roles.adapt(teacher._replace(name=n, trainable=True), configs.LoraConfig(rank=rank),
                                   n, random.key(i), dev) for i, n in enumerate(("student", "critic")))
    assert student.base is critic.base is teacher.params  # one base in memory
    method_cfg = dataclasses.replace(dmd2.SPEC.run().method, latent_shape=tuple(latent[1:]),
                                     generator_update_interval=1)
    run = tiny.run_of(dmd2.SPEC, method_cfg, t)
    method = dmd2.make(run, {"student": student, "teacher": teacher, "critic": critic})
    text = inputs(cfg, latent, args.text_len, dev)[1]
    batch = {"text": text, "negative_text": torch.zeros_like(text), "sample_index": torch.arange(1, device=dev)}
    params = {"student": student.params, "teacher": teacher.params, "critic": critic.params}
    return step_time(method, params, batch, dev, args.warmup, args.reps)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--attention", default="cudnn")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--text-len", type=int, default=512)
    args = p.parse_args()
    args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.tiny:
        small, big, latent, latent14, args.attention, args.text_len = (tiny.tiny_config(), tiny.tiny_config(),
                                                                       (16, 2, 4, 4), (16, 2, 4, 4), "auto", 8)
        args.rank = 4
    else:
        small, big, latent, latent14 = WAN_1_3B, WAN_14B, (16, 21, 60, 104), (16, 21, 30, 52)
    process = distributed.init(args.device)
    dev = process.device
    rows = []
    jobs = (("full finetune (fp32 masters)", 0), (f"LoRA rank {args.rank} finetune (bf16 base)", args.rank))
    for label, rank in jobs:
        s, peak, n = finetune(args, small, latent, rank, process)
        rows.append((f"1.3B {latent}: {label}", s, peak, f"{n / 1e6:.1f} M trained params"))
        print(rows[-1], flush=True)
        free(dev)
    s, peak = dmd2_lora(args, big, latent14, args.rank, process)
    job = f"14B-config {latent14}: DMD2 step, LoRA rank {args.rank} student + critic, one shared bf16 base"
    rows.append((job, s, peak, "generator_update_interval 1"))
    print(rows[-1], flush=True)
    sync(dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    lines = [f"\n## LoRA steps ({name}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)\n",
             f"- Command: `python bench/lora_step.py` (torch {torch.__version__}, attention {args.attention}, "
             "remat attention, eager blocks, batch 1, text 512; random weights). Baseline in the same run: the "
             "full finetune step.\n", "| job | step s | peak GiB | note |", "|---|---|---|---|"]
    lines += [f"| {job} | {s:.3f} | {peak:.1f} | {note} |" for job, s, peak, note in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.tiny:
        with open(Path(__file__).resolve().parent / "RESULTS.md", "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
