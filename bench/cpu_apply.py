"""CPU benchmark: fvfunc's pure Wan `apply` against diffusers' WanTransformer3DModel forward.

Same weights, same inputs, one process; median of N timed calls after a warm-up, fp32.
    python bench/cpu_apply.py [--layers 4 --dim 256 --heads 4 --frames 5 --size 16 --repeats 10]
"""

import argparse
import statistics
import time

import torch
from diffusers import WanTransformer3DModel

from fvfunc.models import wan


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    torch.manual_seed(0)
    m = WanTransformer3DModel(num_attention_heads=a.heads, attention_head_dim=a.dim // a.heads, ffn_dim=4 * a.dim,
                              num_layers=a.layers, text_dim=512, freq_dim=256).eval()
    cfg = wan.config_from_dict(dict(m.config))
    params = {k: v.detach().clone() for k, v in m.state_dict().items()}
    x = torch.randn(1, 16, a.frames, a.size, a.size)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 512, 512)
    tokens = a.frames * (a.size // 2) ** 2
    with torch.no_grad():
        t_ref = median_time(lambda: m(x, t, ctx), a.repeats)
        t_ours = median_time(lambda: wan.apply(params, cfg, x, t, ctx), a.repeats)
        err = ((wan.apply(params, cfg, x, t, ctx) - m(x, t, ctx).sample).abs().max()).item()
    print(f"config: {a.layers} layers, dim {a.dim}, {a.heads} heads, {tokens} tokens, text 512; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| forward (fp32, CPU) | median s |\n|---|---|")
    print(f"| diffusers WanTransformer3DModel | {t_ref:.4f} |")
    print(f"| fvfunc wan.apply | {t_ours:.4f} |")
    print(f"ratio fvfunc/diffusers {t_ours / t_ref:.3f}; max abs diff {err:.2e}")


if __name__ == "__main__":
    main()
