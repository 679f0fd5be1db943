"""Host memory of loading a sharded role: every rank reading the whole model vs only its rows.

    python bench/load_rows.py --layers 8 --world 4

Writes a random Wan model at the 1.3B widths (dim 1536, FFN 8960, text 4096; `--layers` of them) as a
bf16 diffusers folder, then, in a fresh process each, loads it as one rank of `--world` would:
`wan.load(folder)` (the whole model) and `wan.load(folder, rows=...)` (this rank's rows of dim 0, what
a sharded role reads). Reports each process's peak resident memory (VmHWM, reset after imports)
above its resident memory after imports (Linux).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def child(folder: str, world: int, rank: int) -> None:
    import torch

    from fvfunc.models import wan

    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    rows = None
    if world > 1:
        rows = lambda n: (min(rank * -(-n // world), n), min((rank + 1) * -(-n // world), n))  # noqa: E731
    _, params = wan.load(folder, dtype=torch.bfloat16, rows=rows)
    held = sum(v.numel() * v.element_size() for v in params.values())
    print(f"{(_status('VmHWM') - base) / 2**20:.3f} {held / 2**30:.3f}")


def _status(field: str) -> int:
    """A /proc/self/status memory field, in KiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    import torch

    from fvfunc import random
    from fvfunc.models import wan

    cfg = wan.WanConfig(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=args.layers,
                        text_dim=4096, freq_dim=256)
    with tempfile.TemporaryDirectory() as tmp:
        folder = wan.save(Path(tmp) / "model", cfg, wan.init(cfg, random.key(0), dtype=torch.bfloat16),
                          max_shard_bytes=2**29)
        on_disk = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30
        print(f"model: {args.layers} layers at the 1.3B widths, {on_disk:.2f} GiB bf16 on disk")
        for world, rank, what in [(1, 0, "whole model (every rank, before)"),
                                  (args.world, 0, f"rank 0 of {args.world}, rows only (now)"),
                                  (args.world, args.world - 1, f"rank {args.world - 1} of {args.world}, rows only")]:
            out = subprocess.run([sys.executable, __file__, "--child", str(folder), str(world), str(rank)],
                                 check=True, capture_output=True, text=True).stdout.split()
            print(f"  {what}: peak RSS +{float(out[0]):.2f} GiB, params held {float(out[1]):.2f} GiB")


if __name__ == "__main__":
    main()
