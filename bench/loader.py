"""Data loader throughput on the CPU for Wan2.1-1.3B-sized samples (81 frames at 480x832).

One sample is a latent 16x21x60x104 in float32 (8.39 MB; FastVideo stores float32 latents) and a
text embedding 512x4096 in float32 (8.39 MB: the worst case, a full-length prompt; FastVideo stores
the unpadded L tokens, also in float32). The files are written to a temp folder first, so they are
read from the page cache: this measures the CPU cost of the reader, not the disk.

Timed on the same rows, each after a warm-up, the median of 3 runs:
  pyarrow read_table     baseline: read every column of every file in order (no tensors, no shuffle)
  fvfunc Loader          fvfunc.data on files from write_parquet (1 row per group, uncompressed),
                         shuffled, latents normalised, text padded to 512, batches collated
  fvfunc Loader, FV      the same on FastVideo's own layout (one zstd row group per 16-row file),
                         every read a cache miss, as in a dataset much larger than the cache
  ..., shuffle groups    the same files in data.shuffle "groups" order (window 1, 2 groups cached):
                         a group's rows come together, so each group is read once an epoch
  FastVideo-style        baseline: per sample, read its row group with all columns, to_pydict,
                         np.frombuffer(...).copy(), pad the text, stack (FastVideo's map-style reader)
  wait per step          time the training loop spends in next(loader) when each step takes 50 ms
                         (a sleep, as a GPU-bound step leaves the CPU idle)

Each configuration runs in a fresh process. Usage: python bench/loader.py [--samples 64] [--batches 64]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from fvfunc.data import Loader, ParquetDataset, epoch_order, write_parquet

LATENT, TEXT = (16, 21, 60, 104), (512, 4096)
SAMPLE_MB = (np.prod(LATENT) + np.prod(TEXT)) * 4 / 1e6
ROWS_PER_FILE = 16
WAN_STATS = torch.linspace(-0.7, 0.7, 16), torch.linspace(1.5, 3.5, 16)  # any 16 channels: timing only


def write_datasets(root: Path, n: int) -> tuple[Path, Path]:
    """n samples in fvfunc's layout, and the same rows re-written in FastVideo's layout."""
    ours, theirs = root / "fvfunc", root / "fastvideo"
    theirs.mkdir()
    g = torch.Generator().manual_seed(0)
    for first in range(0, n, ROWS_PER_FILE):
        rows = ({"id": f"v{i:05d}", "caption": f"a video number {i}",
                 "latent": torch.randn(LATENT, generator=g), "text_embedding": torch.randn(TEXT, generator=g)}
                for i in range(first, min(first + ROWS_PER_FILE, n)))
        path = write_parquet(ours, rows, rows_per_group=1)
        # FastVideo's preprocessing writes a file with pq.write_table(..., compression="zstd"): one group.
        pq.write_table(pq.read_table(path), theirs / path.name, compression="zstd")
    return ours, theirs


def timed(step, batches: int, seconds: float, warmup: int = 4, repeats: int = 3) -> tuple[float, int]:
    """Seconds per step() call: the median of `repeats` runs of up to `batches` calls (a run stops
    after `seconds`), after a warm-up. The median, as timings on this small shared VM wander."""
    for _ in range(warmup):
        step()
    runs = []
    for _ in range(repeats):
        t0, done = time.perf_counter(), 0
        while done < batches and time.perf_counter() - t0 < seconds:
            step()
            done += 1
        runs.append(((time.perf_counter() - t0) / done, done))
    return sorted(runs)[len(runs) // 2]


def fastvideo_style(folder: Path, batch_size: int, seed: int = 0):
    """FastVideo's map-style read (read_row_from_parquet_file + collate), re-implemented as a baseline."""
    where = []
    for f in sorted(str(p) for p in folder.rglob("*.parquet")):
        meta = pq.read_metadata(f)
        where += [(f, g, r) for g in range(meta.num_row_groups) for r in range(meta.row_group(g).num_rows)]
    order, pos = epoch_order(len(where), seed, 0).tolist(), [0]

    def step():
        latents, texts = [], []
        for _ in range(batch_size):
            f, g, r = where[order[pos[0] % len(order)]]
            pos[0] += 1
            row = {k: v[r] for k, v in pq.ParquetFile(f).read_row_group(g).to_pydict().items()}
            lat = np.frombuffer(row["vae_latent_bytes"], np.float32).copy().reshape(row["vae_latent_shape"])
            text = np.frombuffer(row["text_embedding_bytes"], np.float32).copy()
            text = torch.from_numpy(text.reshape(row["text_embedding_shape"]))
            latents.append(torch.from_numpy(lat))
            texts.append(torch.cat([text, text.new_zeros(512 - len(text), text.shape[1])]))
        return torch.stack(latents), torch.stack(texts)
    return step


def report(name: str, batch: int, workers: int, sec: float, done: int):
    print(f"{name:<44}{batch:>6}{workers:>8}{batch / sec:>11.1f}{batch * SAMPLE_MB / sec:>8.0f}{done:>9}",
          flush=True)


# (reader, layout, batch, workers); each runs in a fresh process, so that one reader's memory churn
# (the allocator's state after gigabytes of buffers) does not slow the next one down.
CONFIGS = [("read_table", "fvfunc", 64, 0), ("loader", "fvfunc", 1, 0), ("loader", "fvfunc", 1, 2),
           ("loader", "fvfunc", 2, 2), ("loader", "fvfunc", 4, 2), ("loader", "fastvideo", 1, 2),
           ("loader_groups", "fastvideo", 1, 2),
           ("fastvideo_style", "fvfunc", 1, 0), ("fastvideo_style", "fastvideo", 1, 0),
           ("wait", "fvfunc", 1, 2)]


def run(reader: str, folder: Path, batch: int, workers: int, args):
    layout = "FV layout" if folder.name == "fastvideo" else "fvfunc layout"
    if reader == "read_table":
        files = sorted(folder.glob("*.parquet"))
        report("pyarrow read_table (all files)", batch, 0,
               *timed(lambda: [pq.read_table(f) for f in files], 3, args.seconds, warmup=1))
    elif reader == "fastvideo_style":
        report(f"FastVideo-style, {layout}", batch, 0,
               *timed(fastvideo_style(folder, batch), args.batches, args.seconds, warmup=2))
    else:
        # cache_groups=0 on FastVideo's layout: these 4 groups would fit the cache, a real dataset's not.
        # The group order needs 2 x window groups cached: window 1, cache 2, half the dataset's groups.
        cache = 0 if folder.name == "fastvideo" else 4
        shuffle = "groups" if reader == "loader_groups" else "rows"
        if shuffle == "groups":
            cache, reader = 2, "loader"
        ds = ParquetDataset(folder, need_latents=True, text_len=TEXT[0], latent_stats=WAN_STATS,
                            cache_groups=cache)
        with Loader(ds, batch, seed=0, num_workers=workers, shuffle=shuffle, window=1) as loader:
            if reader == "loader":
                name = "fvfunc Loader" + (", FV layout, no cache" if cache == 0 else "")
                if shuffle == "groups":
                    name = "fvfunc Loader, FV layout, shuffle groups"
                report(name, batch, workers, *timed(lambda: next(loader), args.batches, args.seconds))
                return
            next(loader)
            waits = []
            for _ in range(args.batches):
                time.sleep(0.05)
                t0 = time.perf_counter()
                next(loader)
                waits.append(time.perf_counter() - t0)
        print(f"wait per step in next(loader), batch {batch}, {workers} workers, 50 ms steps: median "
              f"{1e3 * float(np.median(waits)):.2f} ms, max {1e3 * max(waits):.1f} ms, {len(waits)} steps")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batches", type=int, default=64, help="batches per timed run")
    parser.add_argument("--seconds", type=float, default=10.0, help="time limit per timed run")
    parser.add_argument("--run", nargs=4, help=argparse.SUPPRESS)  # one config: reader folder batch workers
    args = parser.parse_args()
    if args.run:
        reader, folder, batch, workers = args.run
        return run(reader, Path(folder), int(batch), int(workers), args)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        _, theirs = write_datasets(Path(tmp), args.samples)
        groups = pq.read_metadata(next(theirs.glob("*.parquet"))).num_row_groups
        print(f"wrote {args.samples} samples of {SAMPLE_MB:.2f} MB, {ROWS_PER_FILE} a file (FV layout: "
              f"{groups} row group a file) in {time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}, torch threads {torch.get_num_threads()}", flush=True)
        print(f"{'reader':<44}{'batch':>6}{'workers':>8}{'samples/s':>11}{'MB/s':>8}{'batches':>9}",
              flush=True)
        for reader, layout, batch, workers in CONFIGS:
            subprocess.run([sys.executable, __file__, "--batches", str(args.batches), "--seconds",
                            str(args.seconds), "--run", reader, str(Path(tmp) / layout), str(batch),
                            str(workers)], check=True)


if __name__ == "__main__":
    main()
