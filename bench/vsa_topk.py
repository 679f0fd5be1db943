"""The VSA cube choice's top-k on the GPU (issue 20) at the Wan2.1-1.3B's shape: bf16 cube scores [1, 12, 624, 624],
k = topk(sparsity, 624) key cubes per query cube. Times fvfunc's choice (`vsa.chosen_cubes`: a torch.topk of exact
integer keys, the 16-bit score's bits and the index in one int32) against the ways it could be done, each
checked to choose the same cubes:

- `topk int64`: torch.topk of int64 keys (fvfunc's choice before 2026-12-07, and its fp32 path);
- `sort int32`: a full torch.sort of the int32 keys of each row, then the first k;
- `topk bf16`: torch.topk of the scores themselves (FastVideo's choice; ties broken its own way: not checked).

    python bench/vsa_topk.py --sparsity 0.9,0.8
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fvfunc.ops import vsa  # noqa: E402


def timed(fn, warmup=5, reps=50):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def int_keys(scores, wide):
    n = scores.shape[-1]
    index = torch.arange(n, device=scores.device)
    if wide:
        bits = (scores.float() + 0.0).view(torch.int32)
        return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64) * (1 << 16) + ((1 << 16) - 1 - index)
    bits = (scores + 0.0).view(torch.int16).to(torch.int32)
    return (bits ^ ((bits >> 15) & 0x7FFF)) * (1 << 16) + ((1 << 16) - 1 - index).to(torch.int32)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", default="0.9,0.8")
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.randn(1, 12, 624, 624, device="cuda", generator=g).to(torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| sparsity | k | way | ms | same cubes as fvfunc's |\n|---|---|---|---|---|")
    for sparsity in (float(s) for s in a.sparsity.split(",")):
        k = vsa.topk(sparsity, scores.shape[-1])
        ours = vsa.chosen_cubes(scores, k)
        for name, fn in WAYS.items():
            same = "-" if name == "topk bf16" else str(torch.equal(fn(scores, k), ours))
            print(f"| {sparsity:g} | {k} | {name} | {timed(lambda f=fn, k=k: f(scores, k)):.3f} | {same} |", flush=True)


def ascending(idx):
    return torch.sort(idx, -1).values


WAYS = {
    "fvfunc (vsa.chosen_cubes)": vsa.chosen_cubes,
    "topk int64": lambda s, k: ascending(torch.topk(int_keys(s, True), k, -1, sorted=False).indices),
    "sort int32": lambda s, k: ascending(torch.sort(int_keys(s, False), -1, descending=True).indices[..., :k]),
    "topk bf16": lambda s, k: torch.topk(s, k, -1, sorted=False).indices,
}


if __name__ == "__main__":
    main()
