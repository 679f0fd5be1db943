"""Clips per second of `train.py preprocess` against diffusers' own `vae.encode` loop, in one run.

    python bench/preprocess.py                 # one GPU: 81x480x832 clips, the 1.3B pipeline's encoder sizes
    python bench/preprocess.py --tiny          # a CPU smoke test of every path (seconds)

The encoders are random-init at the real sizes (nothing is downloaded): diffusers' `AutoencoderKLWan()`
default config (Wan2.1's VAE) and transformers' umT5-XXL (`UMT5EncoderModel`: d_model 4096, 24 layers,
64 heads, FFN 10240, vocab 256384), built on the device, with a word-level tokenizer (the captions'
token count is what matters: `--words` per caption). The clips are H.264 mp4s written first, a little
larger than the target so that every clip is resized and centre-cropped.

Rows, per precision (float32, bfloat16):
- diffusers: `vae.encode(pixels).latent_dist.mean` over the clips' pixels, already decoded and resized
  in memory (the VAE alone, one clip at a time): the baseline;
- fvfunc: `fvfunc.preprocess.run.run`, the whole command after model loading: decode the mp4s (in a
  thread, ahead), resample, resize + crop, the same VAE encode, umT5 of the caption, parquet written.
Also printed: the largest difference between the two paths' latents (0 when they compute the same).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False)
UMT5_TINY = dict(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu")
VAE_TINY = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_clips(folder: Path, n: int, frames: int, height: int, width: int, seed: int = 0) -> list[Path]:
    """n mp4s of `frames` frames at 16 fps: moving gradients plus noise, (height + 1/15) x (width + 1/15)."""
    import imageio.v2 as imageio

    rng = np.random.default_rng(seed)
    h, w = (height + height // 15) // 2 * 2, (width + width // 15) // 2 * 2
    y, x = np.mgrid[0:h, 0:w]
    paths = []
    for i in range(n):
        path = folder / f"clip{i:03d}.mp4"
        with imageio.get_writer(path, fps=16, codec="libx264", macro_block_size=1, quality=8) as out:
            for t in range(frames):
                f = np.stack([(x + 3 * t + 17 * i) % 256, (y + 2 * t) % 256, (x // 2 + y // 2 + 5 * t) % 256], -1)
                out.append_data(np.clip(f + rng.integers(0, 24, (h, w, 3)), 0, 255).astype(np.uint8))
        paths.append(path)
    return paths


def build_encoders(folder: Path, tiny: bool, device: torch.device):
    """A random-init AutoencoderKLWan and umT5 (+ a word-level tokenizer) on `device`, float32, eval."""
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from fvfunc import text
    from fvfunc.preprocess import run
    from fvfunc.testing import tiny as tiny_models

    tiny_models.write_text_encoder(folder)  # only its tokenizer is used
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: umT5-XXL is 5.7 B params
        vae = AutoencoderKLWan(**VAE_TINY) if tiny else AutoencoderKLWan()
        umt5 = UMT5EncoderModel(UMT5Config(**(UMT5_TINY if tiny else UMT5_XXL), dropout_rate=0.0))
    return run.Encoders(vae.eval(), text.Encoder(tokenizer, umt5.eval(), device, folder))


def captions(n: int, words: int) -> list[str]:
    from fvfunc.testing.tiny import WORDS

    rng = np.random.default_rng(1)
    return [" ".join(rng.choice(WORDS, words)) for _ in range(n)]


def bench(args) -> list[str]:
    import configs
    from fvfunc import data
    from fvfunc.preprocess import inputs, run
    from fvfunc.preprocess.media import read_clip, resize_crop

    device = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="fvfunc-bench-preprocess-"))
    t0 = time.perf_counter()
    (tmp / "videos").mkdir()
    clips = write_clips(tmp / "videos", args.clips + 1, args.frames, args.height, args.width)
    caps = captions(len(clips), args.words)
    (tmp / "captions.jsonl").write_text("".join(f'{{"video": "{p.name}", "caption": "{c}"}}\n'
                                                for p, c in zip(clips, caps, strict=True)))
    print(f"  {len(clips)} clips written in {time.perf_counter() - t0:.1f} s", flush=True)
    enc = build_encoders(tmp / "model", args.tiny, device)
    print(f"  encoders built in {time.perf_counter() - t0:.1f} s", flush=True)
    pixels = [resize_crop(read_clip(p, args.frames, 16).frames, args.height, args.width) for p in clips]
    items = inputs.read_captions(tmp / "captions.jsonl")
    cfg_base = dict(model=str(tmp / "model"), videos=str(tmp / "videos"), height=args.height, width=args.width,
                    num_frames=args.frames, fps=16.0, device=str(device), vae_tiling="off")
    rows, label = [], f"{args.frames}x{args.height}x{args.width}"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    for precision in args.precisions:
        dtype = run.DTYPES[precision]
        enc = run.Encoders(enc.vae.to(dtype), enc.text._replace(model=enc.text.model.to(dtype)))
        # diffusers' own loop over pixels already in memory (clip 0 warms up)
        base_latents = []
        for i, x in enumerate(pixels):
            if i == 1:
                sync(device)
                start = time.perf_counter()
            with torch.no_grad():
                z = enc.vae.encode(x[None].to(device, dtype)).latent_dist.mean[0].float().cpu()
            base_latents.append(z)
        sync(device)
        base = (time.perf_counter() - start) / args.clips
        # fvfunc's whole command, after the warm-up clip
        warm = tmp / f"captions-warm-{precision}.jsonl"
        warm.write_text((tmp / "captions.jsonl").read_text().splitlines()[0] + "\n")
        run.run(configs.PreprocessRun(**cfg_base, captions=str(warm), output=str(tmp / f"warm-{precision}"),
                                      precision=precision), encoders=enc)
        rest = tmp / "captions-rest.jsonl"
        rest.write_text("\n".join((tmp / "captions.jsonl").read_text().splitlines()[1:]) + "\n")
        cfg = configs.PreprocessRun(**cfg_base, captions=str(rest), output=str(tmp / f"out-{precision}"),
                                    precision=precision)
        sync(device)
        start = time.perf_counter()
        summary = run.run(cfg, encoders=enc)
        sync(device)
        ours = (time.perf_counter() - start) / args.clips
        assert summary.written == args.clips, summary
        ds = data.ParquetDataset(cfg.output, data.T2V, text_len=512)
        got = {ds[i]["id"]: ds[i]["latents"] for i in range(len(ds))}
        diff = max(float((got[it.id] - z).abs().max()) for it, z in zip(items[1:], base_latents[1:], strict=True))
        when = datetime.date.today().isoformat()
        rows.append(f"| {when} | {gpu} | {label} | {precision} | diffusers `vae.encode` loop (VAE only, pixels in "
                    f"memory) | {1 / base:.3f} | {base:.3f} | - |")
        rows.append(f"| {when} | {gpu} | {label} | {precision} | fvfunc preprocess (mp4 decode + resize + VAE + "
                    f"umT5 + parquet) | {1 / ours:.3f} | {ours:.3f} | {diff:.2e} |")
        print(rows[-2] + "\n" + rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny encoders and clips on the CPU: a smoke test")
    ap.add_argument("--device", default=None, help="default: cuda when available (cpu with --tiny)")
    ap.add_argument("--clips", type=int, default=None, help="timed clips per row (default 8; 3 with --tiny)")
    ap.add_argument("--frames", type=int, default=None, help="frames a clip (default 81; 9 with --tiny)")
    ap.add_argument("--height", type=int, default=None, help="default 480 (32 with --tiny)")
    ap.add_argument("--width", type=int, default=None, help="default 832 (48 with --tiny)")
    ap.add_argument("--words", type=int, default=60, help="words a caption (about its umT5 tokens)")
    ap.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    args = ap.parse_args()
    small = dict(clips=3, frames=9, height=32, width=48, device="cpu")
    full = dict(clips=8, frames=81, height=480, width=832, device="cuda" if torch.cuda.is_available() else "cpu")
    for k, v in (small if args.tiny else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    print(f"== preprocess: {args.clips} clips of {args.frames}x{args.height}x{args.width} on {args.device}"
          f"{' (tiny encoders)' if args.tiny else ''}", flush=True)
    rows = bench(args)
    print("\n| date | device | clip | precision | path | clips/s | s/clip | max abs latent diff vs diffusers |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
