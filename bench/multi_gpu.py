"""Multi-GPU step time and memory: data parallel, sharded roles and sequence parallelism, through the
trainer's own pieces.

    torchrun --nproc-per-node 2 bench/multi_gpu.py finetune --model 1.3b --sharding sharded
    torchrun --nproc-per-node 4 bench/multi_gpu.py dmd2 --teacher 14b --sharding sharded
    torchrun --nproc-per-node 4 bench/multi_gpu.py finetune --latent 21 90 160 --sp-size 4   # 720p, 75,600 tokens
    torchrun --nproc-per-node 4 bench/multi_gpu.py dmd2 --teacher 14b --sharding sharded --overlap off --comm-profile
    python bench/multi_gpu.py finetune --model tiny --latent 2 4 4 --device cpu     # a one-process baseline
    torchrun --nproc-per-node 4 bench/multi_gpu.py dmd2 --tiny --sp-size 2 --sharding sharded --comm-profile  # CPU

`--sp-size S` runs S ranks a sample (training.sp_size); `--overlap off` turns off the ZeRO-3 prefetch and
the asynchronous reduce-scatters (training.overlap_comm) to measure what they hide; `--comm-profile`
profiles one more step and reports the exposed communication: on GPUs the time NCCL kernels run while
no compute kernel does (the union of the communication kernels' intervals minus its overlap with the
union of every other kernel's), on the CPU (gloo) the time the main thread spends blocked in a
collective or a wait; as a share of that step's wall time. `--tiny` is the CPU smoke mode (gloo; tiny
models, 2 x 4 x 4 latents, fp32).

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
    "tiny4": tiny.tiny_config(num_attention_heads=4, attention_head_dim=8, num_layers=4),  # heads for sp 4
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
    p.add_argument("--sp-size", type=int, default=1, help="ranks a sample shares (sequence parallelism)")
    p.add_argument("--overlap", default="on", choices=["on", "off"], help="overlap ZeRO-3's communication")
    p.add_argument("--comm-profile", action="store_true", help="profile one more step: exposed communication")
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode: tiny models, 2 x 4 x 4 latents, fp32")
    p.add_argument("--out", default="", help="append the JSON line to this file")
    args = p.parse_args(argv)
    if args.tiny:
        args.model = args.teacher = "tiny4"
        args.latent, args.text_len, args.device, args.precision, args.steps = (2, 4, 4), 16, "cpu", "float32", 3
    return args


def run_config(args, world: int):
    run = METHODS[args.method].run()
    training = dataclasses.replace(run.training, precision=args.precision, remat=args.remat,
                                   attention=args.attention, batch_size=args.batch * (world // args.sp_size),
                                   max_steps=1000, device=args.device, grad_transform="autograd",
                                   sp_size=args.sp_size, overlap_comm=args.overlap == "on")
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
    """This rank's random batch of the step: text embeddings, latents (finetune) and global indices (the
    same for the ranks of a sequence group)."""
    key = random.fold_in(random.fold_in(random.key(1234), step), process.dp_rank)
    k_text, k_latent = random.split(key, 2)
    n, dev = args.batch, process.device
    out = {"text": random.normal(k_text, (n, args.text_len, MODELS[args.model].text_dim), device=dev),
           "sample_index": torch.arange(n) + process.dp_rank * n}
    if args.method == "finetune":
        out["latents"] = random.normal(k_latent, (n, MODELS[args.model].in_channels, *args.latent), device=dev)
    return out


def sync(process):
    if process.device.type == "cuda":
        torch.cuda.synchronize()


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _overlap(xs, ys) -> float:
    """The length of the intersection of two sorted disjoint interval lists."""
    i = j = 0
    total = 0.0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        total += max(0.0, b - a)
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


_BLOCKING = ("c10d::", "_c10d_functional::wait_tensor", "fvfunc::wait", "record_param_comms")


def exposed_comm(prof, cuda: bool) -> tuple[float, float]:
    """(communication seconds, exposed communication seconds) of a profiled step (see the docstring)."""
    events = prof.events()
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        comm = _union([(e.time_range.start, e.time_range.end) for e in kernels if "nccl" in e.name.lower()])
        compute = _union([(e.time_range.start, e.time_range.end) for e in kernels if "nccl" not in e.name.lower()])
        return _length(comm) / 1e6, (_length(comm) - _overlap(comm, compute)) / 1e6
    # gloo runs a collective on its own threads; the main thread waits in the ops below (a launch that
    # does not wait returns at once and adds next to nothing)
    blocked = _union([(e.time_range.start, e.time_range.end) for e in events
                      if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith(_BLOCKING)])
    return _length(blocked) / 1e6, _length(blocked) / 1e6


def main(argv=None) -> dict:
    args = parse(argv)
    process = distributed.init(args.device, args.sp_size)
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

    comm = {}
    if args.comm_profile:
        from torch.profiler import ProfilerActivity, profile

        b = batch(args, cfg, process, args.steps)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        sync(process)
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            state, _ = step_fn.step(state, b)
            sync(process)
            wall = time.perf_counter() - t
        comm_s, exposed_s = exposed_comm(prof, cuda)
        comm = {"profiled_step_s": round(wall, 4), "comm_s": round(comm_s, 4), "exposed_comm_s": round(exposed_s, 4),
                "exposed_comm_share": round(exposed_s / wall, 4)}
        if process.rank == 0:
            print(f"profiled step: {wall:.3f} s, communication {comm_s:.3f} s, exposed {exposed_s:.3f} s "
                  f"({100 * exposed_s / wall:.1f} %)", flush=True)

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
        "sp_size": args.sp_size, "overlap": args.overlap,
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
        **comm,
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
