"""Datasets over FastVideo's preprocessed parquet files, read as is, and a deterministic loader.

A row is one sample: `id`, the umT5 text embedding as raw bytes + shape ([L, D], unpadded) + dtype,
for T2V data the VAE latent the same way ([C, T, H, W]), and metadata (`caption`, ...); the
text-only schema (data-free distillation) has no latent columns (DESIGN.md section 5).

- `ParquetDataset(paths, need_latents=...)`: random access; a path is a folder (searched recursively)
  and `"DIR:N"` repeats it N times. Schemas are checked when it opens, rows when they are read.
- `epoch_order(n, seed, epoch, groups, window)`: the shuffle of one epoch, a pure function of its
  arguments: uniform over all samples, or row group by row group (`window` groups at a time).
- `Loader(dataset, batch_size, seed, position)`: batches forever, read by background threads in an
  order that depends only on (seed, position), so a resumed run sees exactly the same batches.
- `write_parquet(path, rows)`: the writer, for tests, the demo and converters.
- `latents_stats(model_path)`: the VAE's per-channel latent mean and std, for normalisation.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fvfunc import random

logger = logging.getLogger(__name__)

LATENT = ("vae_latent_bytes", "vae_latent_shape", "vae_latent_dtype")
TEXT = ("text_embedding_bytes", "text_embedding_shape", "text_embedding_dtype")
METADATA = {"file_name": pa.string(), "caption": pa.string(), "media_type": pa.string(),
            "width": pa.int64(), "height": pa.int64(), "num_frames": pa.int64(),
            "duration_sec": pa.float64(), "fps": pa.float64()}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class DataError(ValueError):
    """Bad or missing data. The message names the file (and the row, id or column)."""


def schema(latents: bool) -> pa.Schema:
    """FastVideo's T2V schema (`latents=True`) or its text-only schema, column for column."""
    def triplet(names):
        return [pa.field(names[0], pa.binary()), pa.field(names[1], pa.list_(pa.int64())),
                pa.field(names[2], pa.string())]
    return pa.schema([pa.field("id", pa.string()), *(triplet(LATENT) if latents else []), *triplet(TEXT),
                      *(pa.field(k, t) for k, t in METADATA.items())])


def latents_stats(model_path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel (latents_mean, latents_std) from a diffusers VAE config.json, or None if absent.

    `model_path` is a pipeline folder or its transformer/ subfolder, so both `<path>/vae` and
    `<path>/../vae` are looked at."""
    if model_path is None:
        return None
    for config in (Path(model_path) / "vae" / "config.json", Path(model_path) / ".." / "vae" / "config.json"):
        if not config.is_file():
            continue
        cfg = json.loads(config.read_text())
        if cfg.get("latents_mean") is None or cfg.get("latents_std") is None:
            continue
        mean = torch.tensor(cfg["latents_mean"], dtype=torch.float32)
        std = torch.tensor(cfg["latents_std"], dtype=torch.float32)
        if mean.ndim != 1 or mean.shape != std.shape:
            raise DataError(f"{config}: latents_mean and latents_std must be lists of the same length")
        return mean, std
    return None


SHUFFLES = ("auto", "rows", "groups")


def epoch_order(num_samples: int, seed: int, epoch: int, groups: torch.Tensor | None = None,
                window: int = 1) -> torch.Tensor:
    """The permutation of range(num_samples) used in `epoch`: a pure function of its arguments.

    Without `groups`, a uniform shuffle. With groups[i] = the row group (a dense id) of sample i, the
    row groups come in a shuffled order, `window` at a time, and the samples of each window are
    shuffled together: a group's rows are all read within one window, so each group is read once an
    epoch and a batch mixes the rows of up to `window` groups."""
    key = random.fold_in(random.key(seed), epoch)
    if groups is None:
        return random.permutation(key, num_samples)
    n_groups = int(groups.max()) + 1
    place = torch.empty(n_groups, dtype=torch.long)  # each group's place in this epoch's group order
    place[random.permutation(random.fold_in(key, 0), n_groups)] = torch.arange(n_groups)
    window_of = torch.div(place[groups], window, rounding_mode="floor")
    # sort by window, then by a random permutation within: distinct integer keys, no ties
    return torch.argsort(window_of * num_samples + random.permutation(random.fold_in(key, 1), num_samples))


def parse_specs(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[tuple[Path, int]]:
    """`"DIR"` or `"DIR:N"` specs (a list, or one comma-separated string) -> [(DIR, N repeats)]."""
    if isinstance(paths, (str, os.PathLike)):
        paths = str(paths).split(",")
    specs = []
    for spec in map(str, paths):
        folder, sep, n = spec.strip().rpartition(":")
        if not (sep and n.isdigit()):  # no count (or a colon that is part of the path)
            folder, n = spec.strip(), "1"
        if int(n) < 1:
            raise DataError(f"{folder}: repeat count in {spec!r} must be at least 1")
        specs.append((Path(folder), int(n)))
    if not specs:
        raise DataError("no dataset path given")
    return specs


class _Tensor(NamedTuple):
    """One tensor cell of a row, checked: its raw bytes (a view of arrow's memory), shape and dtype."""
    buf: pa.Buffer
    shape: tuple[int, ...]
    dtype: torch.dtype


def _bytes(column: pa.ChunkedArray, r: int) -> pa.Buffer | None:
    """Row r of a binary column as a zero-copy slice of arrow's data buffer (`column[r]`, a scalar,
    would copy the megabytes)."""
    for chunk in column.chunks:
        if r < len(chunk):
            break
        r -= len(chunk)
    if chunk.null_count and not chunk.is_valid()[r].as_py():
        return None
    if not (pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type)):
        return chunk[r].as_buffer()  # another binary layout: take the copy
    _, offsets, data = chunk.buffers()
    width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
    start, end = np.frombuffer(offsets, width)[chunk.offset + r: chunk.offset + r + 2].tolist()
    return data.slice(start, end - start)


def _tensor(table: pa.Table, r: int, names: tuple[str, str, str], rank: int, where: str) -> _Tensor:
    """Row r's tensor stored in the columns `names` (bytes, shape, dtype), checked against its shape
    and dtype columns (FastVideo's own reader assumes float32; the dtype column is honoured here)."""
    buf = _bytes(table.column(names[0]), r)
    shape, dtype = (table.column(name)[r].as_py() for name in names[1:])
    dt = DTYPES.get((dtype or "").removeprefix("torch."))
    if dt is None:
        raise DataError(f"{where}: unknown {names[2]} {dtype!r} (expected one of {sorted(DTYPES)})")
    if buf is None or shape is None:
        raise DataError(f"{where}: null {names[0]} or {names[1]}")
    if len(shape) == rank + 1 and shape[0] == 1:
        shape = shape[1:]  # older FastVideo text rows keep the encoder's batch dim of 1
    if len(shape) != rank:
        raise DataError(f"{where}: {names[1]} {shape} has rank {len(shape)}, expected {rank}")
    if math.prod(shape) * dt.itemsize != buf.size:
        raise DataError(f"{where}: {names[1]} {shape} in {dtype} is {math.prod(shape) * dt.itemsize} bytes, "
                        f"{names[0]} holds {buf.size}")
    return _Tensor(buf, tuple(shape), dt)


def _copy_into(out: torch.Tensor, t: _Tensor) -> None:
    """Decode t's bytes into the float32 tensor `out`: one copy, straight from arrow's memory.
    numpy reads the read-only buffer without complaint (torch.frombuffer would warn)."""
    if t.buf.size == 0:
        return
    dst = out.view(-1).numpy()  # view(-1): `out` must be a contiguous slot, never a silent copy
    if t.dtype is torch.bfloat16:  # a bf16 is the top half of a float32: widen by shifting 16 bits left
        np.left_shift(np.frombuffer(t.buf, np.uint16), 16, out=dst.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(dst, np.frombuffer(t.buf, np.float16 if t.dtype is torch.float16 else np.float32))


class ParquetDataset:
    """The samples of one or more folders of FastVideo parquet files; `ds[i]` reads sample i.

    need_latents: the method trains on data latents (finetune, DMD2 `data` mode), so a text-only
      file is an error; without it latent columns are never read.
    text_len: text is zero-padded to [text_len, D]; a longer embedding is an error.
    latent_stats: (mean, std) from `latents_stats`; None keeps latents as stored (with a warning).
    cache_groups: row groups kept in memory (LRU), so neighbouring rows cost one read.
    """

    def __init__(self, paths, *, need_latents: bool, text_len: int = 512,
                 latent_stats: tuple[torch.Tensor, torch.Tensor] | None = None, cache_groups: int = 4):
        self.need_latents, self.text_len, self.cache_groups = need_latents, text_len, cache_groups
        self.latent_stats = latent_stats if need_latents else None
        self.columns = ["id", "caption", *TEXT, *(LATENT if need_latents else ())]
        self.files: list[str] = []
        self._footers: list[pq.FileMetaData] = []  # parsed once: reopening a file re-parses its footer
        # (file, row group, row in group, row in file) of each row; sample -> row; sample -> which repeat
        where, samples, copies = [], [], []
        for folder, repeats in parse_specs(paths):
            if not folder.exists():
                raise DataError(f"{folder}: dataset folder does not exist")
            files = [folder] if folder.is_file() else sorted(folder.rglob("*.parquet"))
            if not files:
                raise DataError(f"{folder}: no *.parquet files in this folder (searched recursively)")
            first = len(where)
            for path in files:
                where += self._index(path, len(self.files))
                self.files.append(str(path))
            samples += list(range(first, len(where))) * repeats
            copies += [c for c in range(repeats) for _ in range(first, len(where))]
        if not samples:
            raise DataError(f"{', '.join(self.files)}: no rows")
        self._where, self._samples, self._copies = torch.tensor(where), torch.tensor(samples), torch.tensor(copies)
        self._cache: OrderedDict[tuple[int, int], Future] = OrderedDict()
        self._lock = threading.Lock()
        # The text width every row must share, from the first row's shape column (a tiny read).
        f, g = self._where[0, :2].tolist()
        with pq.ParquetFile(self.files[f], metadata=self._footers[f]) as file:
            shape = file.read_row_group(g, columns=["text_embedding_shape"]).column(0)[0].as_py() or [0]
        self.text_dim, self._text_dim_from = shape[-1], self.files[f]
        if need_latents and latent_stats is None:
            logger.warning("%s: no latents_mean/latents_std (VAE config) given; latents are used as stored",
                           paths)

    def _index(self, path: Path, file_index: int) -> list[tuple[int, int, int, int]]:
        """Check one file's columns (footer only) and list its rows."""
        try:
            meta = pq.read_metadata(path)
        except Exception as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from e
        self._footers.append(meta)
        names = set(meta.schema.to_arrow_schema().names)
        missing = [c for c in self.columns if c not in names]
        if missing and set(TEXT) <= names and set(missing) <= set(LATENT):
            raise DataError(f"{path}: text-only file (no column {missing[0]}) but this method needs latents "
                            f"(finetune, DMD2 data mode); use a T2V dataset or a data-free mode")
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
        rows, start = [], 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            rows += [(file_index, g, r, start + r) for r in range(n)]
            start += n
        return rows

    def __len__(self) -> int:
        return len(self._samples)

    def sample_groups(self) -> torch.Tensor:
        """The row group of each sample, as dense ids 0..G-1; each repeat of a "DIR:N" dataset counts as
        groups of its own, so that a window does not hold two copies of the same rows."""
        key = torch.cat([self._copies[:, None], self._where[self._samples][:, :2]], dim=1)
        return torch.unique(key, dim=0, return_inverse=True)[1]

    def max_group_rows(self) -> int:
        """The most rows any row group holds."""
        return int(torch.unique(self._where[:, :2], dim=0, return_counts=True)[1].max())

    def _group(self, f: int, g: int) -> pa.Table:
        """Row group g of file f (the needed columns only), through a small LRU cache. The cache holds
        futures so that threads asking for the same group wait for one read instead of reading twice."""
        with self._lock:
            slot, mine = self._cache.get((f, g)), False
            if slot is None:
                slot, mine = Future(), True
                self._cache[(f, g)] = slot
            self._cache.move_to_end((f, g))
            while len(self._cache) > self.cache_groups:
                self._cache.popitem(last=False)
        if mine:
            try:
                with pq.ParquetFile(self.files[f], metadata=self._footers[f]) as file:
                    slot.set_result(file.read_row_group(g, columns=self.columns))
            except Exception as e:
                with self._lock:
                    self._cache.pop((f, g), None)
                slot.set_exception(DataError(f"{self.files[f]}: cannot read row group {g} ({e})"))
        return slot.result()

    def batch(self, indices: Sequence[int]) -> dict:
        """Samples `indices` as one batch: {"ids", "captions", "text" [B, text_len, D], "text_len" [B],
        "latents" [B, C, T, H, W] (when need_latents)}, tensors float32, each decoded once from the
        file's bytes straight into its slot of the batch."""
        rows = []  # (table, row in group, where); holding the tables keeps each group to one read
        for i in indices:
            f, g, r, row = self._where[self._samples[i]].tolist()
            table = self._group(f, g)
            sid = table.column("id")[r].as_py()
            rows.append((table, r, f"{self.files[f]}, row {row} (id {sid!r})"))
        texts = [_tensor(t, r, TEXT, 2, where) for t, r, where in rows]
        for t, (_, _, where) in zip(texts, rows, strict=True):
            if t.shape[1] != self.text_dim:
                raise DataError(f"{where}: text embedding width {t.shape[1]}, but the first row of "
                                f"{self._text_dim_from} has {self.text_dim}")
            if t.shape[0] > self.text_len:
                raise DataError(f"{where}: text embedding has {t.shape[0]} tokens, more than text_len "
                                f"{self.text_len}")
        text = torch.empty(len(rows), self.text_len, self.text_dim)
        for b, t in enumerate(texts):
            _copy_into(text[b, : t.shape[0]], t)
            text[b, t.shape[0]:] = 0
        batch = {"ids": [t.column("id")[r].as_py() for t, r, _ in rows], "text": text,
                 "text_len": torch.tensor([t.shape[0] for t in texts], dtype=torch.long),
                 "captions": [t.column("caption")[r].as_py() or "" for t, r, _ in rows]}
        if self.need_latents:
            lats = [_tensor(t, r, LATENT, 4, where) for t, r, where in rows]
            if len({x.shape for x in lats}) > 1:
                listing = "; ".join(f"{w}: {list(x.shape)}" for x, (_, _, w) in zip(lats, rows, strict=True))
                raise DataError(f"latents of different shapes in one batch ({listing}); use batch_size 1 "
                                f"or one resolution per dataset")
            latents = torch.empty(len(rows), *lats[0].shape)
            for b, x in enumerate(lats):
                _copy_into(latents[b], x)
            if self.latent_stats is not None:
                mean, std = (s.view(-1, 1, 1, 1) for s in self.latent_stats)
                if len(mean) != latents.shape[1]:
                    raise DataError(f"{rows[0][2]}: latent has {latents.shape[1]} channels, latents_mean "
                                    f"{len(mean)}")
                latents.sub_(mean).div_(std)  # in place: the batch is ours
            batch["latents"] = latents
        return batch

    def __getitem__(self, i: int) -> dict:
        """Sample i: {"id", "caption", "text" [text_len, D], "text_len" (int), "latents" [C, T, H, W]?}."""
        b = self.batch([i])
        sample = {"id": b["ids"][0], "caption": b["captions"][0], "text": b["text"][0],
                  "text_len": int(b["text_len"][0])}
        return sample | ({"latents": b["latents"][0]} if self.need_latents else {})


class Loader:
    """Batches of `dataset` forever, in the order of `epoch_order`, read ahead by `num_workers` threads.

    A global batch is `batch_size * world_size` consecutive entries of the epoch's order; rank r takes
    slice r. `position` is (epoch, index) of the next batch, index being its offset in the epoch's
    order, so `Loader(..., position=saved)` continues the exact sequence (even with another batch size).
    With drop_last=False the epoch's last batch is filled up from the start of the same order, so every
    rank always gets a full batch. Batches come out in order whatever the threads do. A batch is
    `ParquetDataset.batch`'s dict: ids, captions, text [B, text_len, D], text_len [B], latents?

    shuffle: "rows" (uniform), "groups" (row group by row group, `window` groups shuffled together:
    each group read once an epoch; give the dataset cache_groups >= 2 * window) or "auto" ("rows"
    when every row group holds one row, else "groups"); see `epoch_order`.
    """

    def __init__(self, dataset: ParquetDataset, batch_size: int, seed: int,
                 position: tuple[int, int] = (0, 0), rank: int = 0, world_size: int = 1, num_workers: int = 2,
                 drop_last: bool = True, shuffle: str = "rows", window: int = 4):
        self._pool = None  # first, so that close() works even if a check below fails
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, "
                             f"{world_size}")
        if shuffle not in SHUFFLES or window < 1:
            raise ValueError(f"need shuffle in {SHUFFLES} and window >= 1, got {shuffle!r}, {window}")
        if shuffle == "auto":
            shuffle = "groups" if dataset.max_group_rows() > 1 else "rows"
        self.shuffle, self.window = shuffle, window
        self._groups = dataset.sample_groups() if shuffle == "groups" else None
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.drop_last = rank, drop_last
        self.global_batch = batch_size * world_size
        if drop_last and len(dataset) < self.global_batch:
            raise DataError(f"{', '.join(dataset.files)}: {len(dataset)} samples cannot fill one global "
                            f"batch of {self.global_batch} (batch_size x world_size); use drop_last=False")
        epoch, index = position
        if epoch < 0 or index < 0:
            raise ValueError(f"position must be non-negative, got {position}")
        self._next = self._roll(int(epoch), int(index))  # position of the next batch to yield
        self._submitted = self._next  # position of the next batch to hand to a worker
        self._pending: deque[Future] = deque()
        self._order = (-1, None)  # (epoch, order): one permutation per epoch, not per batch
        self._prefetch = 2 * num_workers  # batches in flight: bounded memory, the step never waits
        self._closed = False
        if num_workers > 0:
            self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="fvfunc-data")

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, index) of the next batch to be yielded: what a checkpoint stores."""
        return self._next

    @property
    def batches_per_epoch(self) -> int:
        n = len(self.dataset)
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)

    def _roll(self, epoch: int, index: int) -> tuple[int, int]:
        """The position itself, or the next epoch's start when no batch begins at `index`."""
        last = len(self.dataset) - (self.global_batch if self.drop_last else 1)
        return (epoch, index) if index <= last else (epoch + 1, 0)

    def _indices(self, position: tuple[int, int]) -> list[int]:
        """This rank's dataset indices for the batch at `position`."""
        epoch, index = position
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.dataset), self.seed, epoch, self._groups, self.window))
        order = self._order[1]
        if index + self.global_batch > len(order):  # drop_last=False: wrap to the epoch's start
            order = order.repeat((index + self.global_batch) // len(order) + 1)
        batch = order[index: index + self.global_batch]
        return batch[self.rank * self.batch_size: (self.rank + 1) * self.batch_size].tolist()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._closed:
            raise RuntimeError("this Loader is closed")
        if self._pool is None:
            batch = self.dataset.batch(self._indices(self._next))
        else:
            while len(self._pending) < self._prefetch:
                self._pending.append(self._pool.submit(self.dataset.batch, self._indices(self._submitted)))
                self._submitted = self._roll(self._submitted[0], self._submitted[1] + self.global_batch)
            try:
                batch = self._pending.popleft().result()
            except BaseException:
                # Drop the read-ahead so that a retry starts again at self.position.
                for f in self._pending:
                    f.cancel()
                self._pending.clear()
                self._submitted = self._next
                raise
        self._next = self._roll(self._next[0], self._next[1] + self.global_batch)
        return batch

    def close(self) -> None:
        """Stop the worker threads (waits for reads in progress, drops the rest)."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._pending.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


def _encode(t: torch.Tensor, what: str, where: str) -> tuple[bytes, list[int], str]:
    t = t.detach().cpu().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise DataError(f"{where}: {what} has dtype {t.dtype}; storable: {sorted(DTYPES)}")
    return t.reshape(-1).view(torch.uint8).numpy().tobytes(), list(t.shape), name


def write_parquet(path, rows: Iterable[dict], rows_per_group: int = 1, compression: str = "none") -> Path:
    """Write samples in FastVideo's schema and return the file written.

    rows: dicts with `id`, `text_embedding` ([L, D] tensor), optionally `latent` ([C, T, H, W]),
      `caption` and the other metadata columns (missing ones are null). Each tensor keeps its own dtype
      (float32, float16 or bfloat16). The file is T2V when the first row has a latent, text-only
      otherwise; every row must agree. Rows are consumed lazily, one row group at a time.
    path: a `.parquet` file, or a folder (created) that gets its next `part-NNNNN.parquet`.
    rows_per_group: a row group is the smallest unit parquet reads and a row is megabytes, so one row a
      group lets a shuffled read touch only its own row.
    compression: "none" by default, as float bytes barely compress and decompressing costs a copy.
    """
    path = Path(path)
    if path.suffix != ".parquet":
        path.mkdir(parents=True, exist_ok=True)
        path = path / f"part-{len(list(path.glob('part-*.parquet'))):05d}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, writer = iter(rows), None
    try:
        while chunk := list(itertools.islice(rows, rows_per_group)):
            if writer is None:
                writer = pq.ParquetWriter(path, schema("latent" in chunk[0]), compression=compression)
            cols = {name: [] for name in writer.schema.names}
            for row in chunk:
                where = f"{path}: row id {row.get('id')!r}"
                if ("latent" in row) != ("vae_latent_bytes" in cols):
                    raise DataError(f"{where}: either every row has a latent or none does")
                cols["id"].append(str(row["id"]))
                for prefix, key in (("vae_latent", "latent"), ("text_embedding", "text_embedding")):
                    if f"{prefix}_bytes" in cols:
                        data, shape, dtype = _encode(row[key], key, where)
                        cols[f"{prefix}_bytes"].append(data)
                        cols[f"{prefix}_shape"].append(shape)
                        cols[f"{prefix}_dtype"].append(dtype)
                for name in METADATA:
                    cols[name].append(row.get(name))
            writer.write_table(pa.table(cols, schema=writer.schema), row_group_size=rows_per_group)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise DataError(f"{path}: no rows to write")
    return path
