"""Multi-GPU step time and memory: data parallel and sharded roles, through the trainer's own pieces.

    torchrun --nproc-per-node 2 bench/multi_gpu.py finetune --model 1.3b --sharding sharded
    torchrun --nproc-per-node 4 bench/multi_gpu.py dmd2 --teacher 14b --sharding sharded
    python bench/multi_gpu.py finetune --model tiny --latent 2 4 4 --device cpu     # a one-process baseline

Each rank makes its roles in memory from random init (the same numbers on every rank: `wan.init` is a
pure function of the key), places them as the trainer does (`roles.place`: whole, or sharded
over the ranks) and steps the method's own `step` on random batches of `--batch` samples a rank: the
trainer's loop without its data loader, checkpoints and logging. Prints one JSON line (rank 0) with
the median step time after the warm-up steps, samples a second, and each rank's peak GPU memory; with
--out FILE it also appends the line to FILE.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fvfunc import distributed, random  # noqa: E402
from fvfunc.losses import METHODS  # noqa: E402
from fvfunc.models import wan  # noqa: E402
from fvfunc.roles import place  # noqa: E402
from fvfunc.testing import tiny  # noqa: E402

MODELS = {
    "tiny": tiny.tiny_config(),
    "1.3b": wan.WanConfig(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "14b": wan.WanConfig(),  # diffusers' defaults are the 14B config
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=sorted(METHODS))
    p.add_argument("--model", default="1.3b", choices=sorted(MODELS), help="student (and critic) config")
    p.add_argument("--teacher", default="14b", choices=sorted(MODELS), help="dmd2's teacher config")
    p.add_argument("--sharding", default="replicated", choices=distributed.SHARDINGS, help="every role's")
    p.add_argument("--latent", type=int, nargs=3, default=(21, 60, 104), help="latent T H W (32,760 tokens)")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="samples a rank")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the median")
    p.add_argument("--interval", type=int, default=2, help="dmd2's generator_update_interval")
    p.add_argument("--remat", default="full")
    p.add_argument("--attention", default="auto")
    p.add_argument("--precision", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="", help="append the JSON line to this file")
    return p.parse_args(argv)


def run_config(args, world: int):
    run = METHODS[args.method].run()
    training = dataclasses.replace(run.training, precision=args.precision, remat=args.remat,
                                   attention=args.attention, batch_size=args.batch * world, max_steps=1000,
                                   device=args.device, grad_transform="autograd")
    method = run.method
    if args.method == "dmd2":
        method = dataclasses.replace(method, latent_shape=tuple(args.latent), generator_update_interval=args.interval)
    return dataclasses.replace(run, training=training, method=method)


def roles(args, cfg, process):
    """(Roles, bytes held a role) of the method's roles, made in memory on this rank."""
    spec = METHODS[args.method]
    built, held = {}, {}
    for i, name in enumerate(spec.roles(cfg)):
        mcfg = MODELS[args.teacher if name == "teacher" else args.model]
        dtype = torch.bfloat16 if name == "teacher" else torch.float32
        # the same key on every rank: identical replicas, or consistent shards
        p = wan.init(mcfg, random.key(i), dtype=dtype, device=process.device)
        if args.sharding == "sharded" and process.world_size > 1:  # this rank's rows, as wan.load(rows=) reads
            rows = distributed.rows_of(process)
            p = {k: v[slice(*rows(v.shape[0]))] if v.ndim else v for k, v in p.items()}
        sharded = args.sharding == "sharded" and process.world_size > 1
        built[name] = place(name, wan.FAMILY, mcfg, p, cfg.training, process, sharded, name in spec.trainable)
        del p
        held[name] = distributed.num_bytes(built[name].params)
        if process.device.type == "cuda":
            torch.cuda.empty_cache()
    return built, held


def batch(args, cfg, process, step: int) -> dict:
    """This rank's random batch of the step: text embeddings, latents (finetune) and global indices."""
    key = random.fold_in(random.fold_in(random.key(1234), step), process.rank)
    k_text, k_latent = random.split(key, 2)
    n, dev = args.batch, process.device
    out = {"text": random.normal(k_text, (n, args.text_len, MODELS[args.model].text_dim), device=dev),
           "sample_index": torch.arange(n) + process.rank * n}
    if args.method == "finetune":
        out["latents"] = random.normal(k_latent, (n, MODELS[args.model].in_channels, *args.latent), device=dev)
    return out


def sync(process):
    if process.device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    args = parse(argv)
    process = distributed.init(args.device)
    result = bench(args, process)
    distributed.shutdown(process)
    return result


def bench(args, process) -> dict:
    cfg = run_config(args, process.world_size)
    cuda = process.device.type == "cuda"
    t0 = time.perf_counter()
    built, held = roles(args, cfg, process)
    step_fn = METHODS[args.method].make(cfg, built, distributed.make_reduce(process))
    state = step_fn.init({name: r.params for name, r in built.items()}, random.key(0))
    del built
    sync(process)
    setup_s = time.perf_counter() - t0
    state_gib = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    times, kinds = [], []
    for s in range(args.steps):
        b = batch(args, cfg, process, s)
        sync(process)
        t = time.perf_counter()
        state, metrics = step_fn.step(state, b)
        metrics = {k: distributed.scalar(v) for k, v in metrics.items()}
        sync(process)
        times.append(time.perf_counter() - t)
        kinds.append("generator+critic" if metrics.get("student_updated", 1.0) else "critic")
        if process.rank == 0:
            print(f"step {s}: {times[-1]:.3f} s {kinds[-1]} {json.dumps(metrics)}", flush=True)

    mine = {"peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0,
            "state_gib": state_gib}
    every = [mine]
    if process.world_size > 1:
        every = [None] * process.world_size
        dist.all_gather_object(every, mine)
    timed = list(zip(times, kinds, strict=True))[args.warmup:]
    by_kind = {k: statistics.median(t for t, kk in timed if kk == k) for k in sorted(set(kinds[args.warmup:]))}
    median = statistics.median(t for t, _ in timed)
    result = {
        "method": args.method, "world_size": process.world_size, "sharding": args.sharding,
        "model": args.model, "teacher": args.teacher if args.method == "dmd2" else None,
        "tokens": args.latent[0] * (args.latent[1] // 2) * (args.latent[2] // 2), "batch_per_rank": args.batch,
        "remat": args.remat, "attention": args.attention, "precision": args.precision,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "step_times_s": [round(t, 4) for t in times], "median_step_s": round(median, 4),
        "median_by_kind_s": {k: round(v, 4) for k, v in by_kind.items()},
        "samples_per_s": round(args.batch * process.world_size / median, 4),
        "setup_s": round(setup_s, 1),
        "role_gib_per_rank": {k: round(v / 2**30, 3) for k, v in held.items()},
        "peak_alloc_gib_per_rank": [round(m["peak_alloc_gib"], 2) for m in every],
        "peak_reserved_gib_per_rank": [round(m["peak_reserved_gib"], 2) for m in every],
        "state_gib_per_rank": [round(m["state_gib"], 2) for m in every],
    }
    if process.rank == 0:
        line = json.dumps(result)
        print("RESULT " + line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
