"""Which fvfunc settings make the Wan2.1-1.3B forward and finetune step fastest on this GPU: the
forward and finetune rows of bench/gpu_step.py, once per variant, in one process.

    python bench/gpu_variants.py [--tiny] [--variants cudnn,cudnn+cdt,flash] [--profile]

A variant is an attention backend, then flags: +cdt (inductor's coordinate-descent tuning
of its Triton kernels), +nosplit (no split reductions), +remat=POLICY, +budget=F (remat "none" and
the partitioner's activation memory budget F of the "save everything" memory). Prints one table; the
numbers are for choosing, bench/gpu_step.py's are the ones to report.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_step  # noqa: E402

from fvfunc import runner  # noqa: E402
from fvfunc.models import wan  # noqa: E402
from fvfunc.testing import tiny  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--variants", default="cudnn,cudnn+cdt,cudnn+nosplit,cudnn+budget=0.2")
    ap.add_argument("--remat", default="attention")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="profile the last variant's finetune step")
    ap.add_argument("--save", default="")
    args = ap.parse_args()
    args.budget = float("inf")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch._dynamo.config.cache_size_limit = 64
    if args.tiny:
        cfg, latent, args.text_len = tiny.tiny_config(), (16, 3, 8, 8), 16
    else:
        cfg, latent, args.text_len = gpu_step.WAN_1_3B, (16, 21, 60, 104), 512
    variants = args.variants.split(",")
    rows = []
    if device.type == "cuda":  # attention as the model runs it: 30 layers back to back
        tokens = latent[1] * latent[2] * latent[3] // 4
        q, k, v = (torch.randn(1, tokens, cfg.num_attention_heads, cfg.attention_head_dim, device=device,
                               dtype=torch.bfloat16) for _ in range(3))
        for _ in range(2):
            with torch.no_grad():
                seconds, _, _ = gpu_step.measure(lambda: [wan.attention(q, k, v, "cudnn") for _ in range(30)],
                                                 device, 1, 3)
            print(f"30 cudnn self-attention calls back to back: {seconds:.3f} s, SM clock "
                  f"{torch.cuda.clock_rate(device)} MHz", flush=True)
        del q, k, v
    for i, variant in enumerate(variants):
        opts = argparse.Namespace(**vars(args))
        opts.attention, *flags = variant.split("+")
        opts.compile = True if device.type == "cuda" else "aot_eager"
        opts.profile = args.profile and i == len(variants) - 1
        torch._dynamo.reset()
        runner._compiled.cache_clear()
        flags = dict(f.split("=") if "=" in f else (f, "1") for f in flags)
        torch._inductor.config.coordinate_descent_tuning = "cdt" in flags
        torch._inductor.config.split_reductions = "nosplit" not in flags
        opts.remat = flags.get("remat", args.remat)
        torch._functorch.config.activation_memory_budget = float(flags.get("budget", 1.0))
        if "budget" in flags:
            opts.remat = "none"
        b = gpu_step.Bench(opts, cfg, device)
        t0 = time.perf_counter()
        b.run(f"forward {variant}", b.fvfunc_forward_and_sampling, latent, variant, False)
        b.run(f"finetune {variant}", b.fvfunc_finetune, latent, variant)
        clock = torch.cuda.clock_rate(device) if device.type == "cuda" else 0
        print(f"   variant {variant}: {time.perf_counter() - t0:.0f} s wall, SM clock now {clock} MHz", flush=True)
        rows += b.rows
        if opts.profile:
            notes = b.notes
    text = gpu_step.table(rows)
    print("\n" + text)
    if args.save:
        Path(args.save).write_text(text + "\n\n" + ("\n".join(notes) if args.profile else ""))


if __name__ == "__main__":
    main()
