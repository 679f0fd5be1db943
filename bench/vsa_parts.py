"""Where one VSA self-attention's time goes on the GPU (issue 20), at the Wan2.1-1.3B's shape (12 heads x 128,
a 21 x 30 x 52 token grid: 32,760 tokens in 624 cubes,
ragged at the edges), forward and forward + backward of one layer:

- `op`: fastvideo-kernel's block-sparse op alone (the op fvfunc calls: sm_90 where its extension loads, else
  Triton), on tiled q, k, v and a fixed cube choice;
- `fastvideo`: FastVideo's whole `video_sparse_attn` (its cube means, scores, top-k mask, coarse branch and
  gate) on tensors already tiled;
- `fvfunc eager` / `fvfunc compiled`: `fvfunc.ops.vsa.kernel_vsa` on the model's raster-order [B, S, H, Dh]
  (its tiling included), eagerly and under torch.compile (inductor), as a block runs it;
- `dense fa4`: fvfunc's dense FlashAttention-4 on the same tokens, for the ratio.

    python bench/vsa_parts.py --sparsity 0.9,0.8 [--profile] [--save FILE]

Median of --reps timed repeats (CUDA events) after --warmup; prints a markdown table (and, with --profile,
the top kernels of the compiled fvfunc path's forward + backward).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fvfunc.ops import vsa  # noqa: E402
from fvfunc.ops.attention import attention, fa4_problem  # noqa: E402


def timed(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        times.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", default="0.9,0.8")
    ap.add_argument("--grid", default="21,30,52")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--save", default="")
    a = ap.parse_args()
    dev = torch.device("cuda")
    grid = tuple(int(x) for x in a.grid.split(","))
    S, n = grid[0] * grid[1] * grid[2], vsa.num_cubes(grid)
    t = vsa.tiling(grid, dev)
    op = vsa.kernel_op()
    torch.manual_seed(0)
    q, k, v, g = (torch.randn(1, S, a.heads, a.head_dim, device=dev, dtype=torch.bfloat16).requires_grad_()
                  for _ in range(4))
    dy = torch.randn_like(q)
    qt, kt, vt, gt = (vsa.tiled(x, grid).detach().requires_grad_() for x in (q, k, v, g))
    dyt = vsa.tiled(dy, grid)
    compiled = torch.compile(vsa.kernel_vsa, fullgraph=True)
    rows = []

    def both(fn, inputs, grad):
        return lambda: torch.autograd.grad(fn(), inputs, grad)

    def row(name, fwd, inputs, grad):
        with torch.no_grad():
            f = timed(fwd, a.warmup, a.reps)
        fb = timed(both(fwd, inputs, grad), a.warmup, a.reps)
        rows.append((name, f, fb))
        print(f"{name:48s} forward {f:7.2f} ms   forward + backward {fb:7.2f} ms", flush=True)

    if not fa4_problem(dev):
        row("dense fa4", lambda: attention(q, k, v, "fa4"), (q, k, v), dy)
    from fastvideo_kernel import video_sparse_attn
    profiles = []
    for sp in (float(x) for x in a.sparsity.split(",")):
        kk = vsa.topk(sp, n)
        with torch.no_grad():
            idx = vsa.chosen_cubes(vsa.cube_scores(vsa.tiled_means(qt, grid), vsa.tiled_means(kt, grid)), kk)
        row(f"{sp:g} op ({op})",
            lambda i=idx: vsa.kernel_fine(qt, kt, vt, i, grid), (qt, kt, vt), dyt)
        row(f"{sp:g} fastvideo video_sparse_attn (tiled inputs)",
            lambda kk=kk: video_sparse_attn(qt, kt, vt, t.sizes, t.sizes, kk, vsa.TILE, gt), (qt, kt, vt, gt), dyt)
        row(f"{sp:g} fvfunc kernel_vsa eager", lambda sp=sp: vsa.kernel_vsa(q, k, v, g, grid, sp), (q, k, v, g), dy)
        row(f"{sp:g} fvfunc kernel_vsa compiled", lambda sp=sp: compiled(q, k, v, g, grid, sp), (q, k, v, g), dy)
        if a.profile:
            from torch.profiler import ProfilerActivity, profile
            fn = both(lambda sp=sp: compiled(q, k, v, g, grid, sp), (q, k, v, g), dy)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25,
                                              max_name_column_width=80)
            profiles.append(f"### profile: fvfunc kernel_vsa compiled, forward + backward x3, sparsity {sp:g}\n\n"
                            f"```\n{table}\n```\n")
            print(profiles[-1], flush=True)

    import fastvideo_kernel
    lines = [f"## VSA's parts, one layer ({a.heads} heads x {a.head_dim}, grid {grid}: {S} tokens, {n} cubes)", "",
             f"- Card: {torch.cuda.get_device_name(dev)}; date {datetime.date.today().isoformat()}; torch "
             f"{torch.__version__}, fastvideo-kernel {getattr(fastvideo_kernel, '__version__', '?')}, "
             f"block-sparse op: {op}.",
             f"- Command: `python bench/vsa_parts.py {' '.join(sys.argv[1:])}`; median of {a.reps} after "
             f"{a.warmup} warm-up, CUDA events.", "",
             "| path | forward (ms) | forward + backward (ms) |", "|---|---|---|",
             *[f"| {name} | {f:.2f} | {fb:.2f} |" for name, f, fb in rows], "", *profiles]
    text = "\n".join(lines)
    print("\n" + text)
    if a.save:
        Path(a.save).write_text(text)


if __name__ == "__main__":
    main()
