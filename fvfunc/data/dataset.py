"""A dataset over FastVideo's preprocessed parquet files, read as is.

A row is one sample: `id`, `caption`, and tensors stored as FastVideo stores them (fvfunc/data/parquet.py).
`ParquetDataset(paths, columns)` reads exactly the columns of a data spec (fvfunc/losses/spec.py: the
text embedding, VAE latents, a teacher trajectory, ...): a file without one of them is an error naming
the column and the file when the dataset opens; rows are checked when they are read. A path is a
folder (searched recursively) and `"DIR:N"` repeats it N times.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import pyarrow.parquet as pq
import torch

from fvfunc.data.parquet import Cell, DataError, cell, copy_into, triplet
from fvfunc.losses.spec import TEXT, Column

logger = logging.getLogger(__name__)


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


def columns_in(paths) -> set[str]:
    """The column names of the first parquet file of the first dataset folder (footer only; none: empty)."""
    folder = parse_specs(paths)[0][0]
    files = [folder] if folder.is_file() else sorted(folder.rglob("*.parquet")) if folder.exists() else []
    if not files:
        return set()
    try:
        return set(pq.read_schema(files[0]).names)
    except Exception:
        return set()  # the dataset's own opening names the unreadable file


CONDITIONS = ("clip_feature", "first_frame_latent", "pil_image")
"""FastVideo's image-to-video columns (its i2v schema); a run that reads none of them is told once."""


class ParquetDataset:
    """The samples of one or more folders of FastVideo parquet files; `ds[i]` reads sample i.

    columns: the data spec, the tensor columns to read (fvfunc.data.T2V, TEXT_ONLY, ...); no other
      tensor column is ever read.
    text_len: a 'text' column is zero-padded to [text_len, D]; a longer embedding is cropped to its first
      text_len tokens, as FastVideo does (with one warning).
    num_latent_t: keep the first N frames (dim -3) of a 'latents' column, as FastVideo's num_latent_t
      does; 0 keeps all, and a sample with fewer frames is an error naming it.
    latent_stats: the VAE's per-channel (mean, std) that 'latents' columns are normalised with; None
      keeps them as stored (with a warning).
    cache_groups: row groups kept in memory (LRU), so neighbouring rows cost one read.
    """

    def __init__(self, paths, columns: Sequence[Column], *, text_len: int = 512,
                 latent_stats: tuple[torch.Tensor, torch.Tensor] | None = None, cache_groups: int = 4,
                 num_latent_t: int = 0):
        self.spec, self.text_len, self.cache_groups = tuple(columns), text_len, cache_groups
        self.num_latent_t, self._cropped = num_latent_t, False
        has_latents = any(c.kind == "latents" for c in self.spec)
        self.latent_stats = latent_stats if has_latents else None
        self.columns = ["id", "caption", *(name for c in self.spec for name in triplet(c))]
        self.files: list[str] = []
        self.names: list[str] = []  # each file's path relative to its dataset folder
        self.repeats: list[int] = []  # each folder's repeat count (DIR:N)
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
            self.repeats.append(repeats)
            for path in files:
                where += self._index(path, len(self.files))
                self.files.append(str(path))
                self.names.append(path.name if folder.is_file() else str(path.relative_to(folder)))
            samples += list(range(first, len(where))) * repeats
            copies += [c for c in range(repeats) for _ in range(first, len(where))]
        if not samples:
            raise DataError(f"{', '.join(self.files)}: no rows")
        self._where, self._samples, self._copies = torch.tensor(where), torch.tensor(samples), torch.tensor(copies)
        self._cache: OrderedDict[tuple[int, int], Future] = OrderedDict()
        self._lock = threading.Lock()
        # Each column's shape in the first row (a tiny read): the text width every row must share, and
        # what the trainer checks against the models before they load.
        f, g = self._where[0, :2].tolist()
        with pq.ParquetFile(self.files[f], metadata=self._footers[f]) as file:
            shapes = file.read_row_group(g, columns=[f"{c.name}_shape" for c in self.spec])
        self.first_shapes = {c.key: tuple(shapes.column(i)[0].as_py() or ()) for i, c in enumerate(self.spec)}
        self.first_file = self.files[f]
        self.text_dim, self._text_dim_from = 0, self.files[0]
        if TEXT in self.spec:
            self.text_dim, self._text_dim_from = (self.first_shapes[TEXT.key] or (0,))[-1], self.files[f]
        if has_latents and latent_stats is None:
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
        for c in self.spec:
            missing = [n for n in triplet(c) if n not in names]
            if missing:
                raise DataError(f"{path}: no column {missing[0]} ({c.what}), which this run reads; the file has "
                                f"{', '.join(sorted(n for n in names if n.endswith('_bytes'))) or 'no tensor columns'}")
        missing = [n for n in ("id", "caption") if n not in names]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
        asked = {c.name for c in self.spec}
        unread = [c for c in CONDITIONS if f"{c}_bytes" in names and c not in asked]
        if unread and file_index == 0 and not asked & set(CONDITIONS):
            logger.warning("%s holds image-to-video columns (%s) that this run does not read: the model trains "
                           "text-to-video on its latents and captions (an image-to-video family reads them)",
                           path, ", ".join(unread))
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

    def _group(self, f: int, g: int):
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
        """Samples `indices` as one batch: {"ids", "captions", and per column its key: "text" [B, text_len,
        D] with "text_len" [B], "latents" [B, C, T, H, W], "trajectory" [B, S, C, T, H, W], ...}, tensors
        float32, each decoded once from the file's bytes straight into its slot of the batch."""
        rows = []  # (table, row in group, where); holding the tables keeps each group to one read
        for i in indices:
            f, g, r, row = self._where[self._samples[i]].tolist()
            table = self._group(f, g)
            sid = table.column("id")[r].as_py()
            rows.append((table, r, f"{self.files[f]}, row {row} (id {sid!r})"))
        batch = {"ids": [t.column("id")[r].as_py() for t, r, _ in rows],
                 "captions": [t.column("caption")[r].as_py() or "" for t, r, _ in rows]}
        for column in self.spec:
            cells = [cell(t, r, column, where) for t, r, where in rows]
            if column.kind == "text":
                batch[column.key], batch[f"{column.key}_len"] = self._text(cells, rows)
            else:
                batch[column.key] = self._stacked(cells, rows, column)
        return batch

    def _text(self, cells, rows) -> tuple[torch.Tensor, torch.Tensor]:
        for t, (_, _, where) in zip(cells, rows, strict=True):
            if t.shape[1] != self.text_dim:
                raise DataError(f"{where}: text embedding width {t.shape[1]}, but the first row of "
                                f"{self._text_dim_from} has {self.text_dim}")
        cells = [self._crop_text(t, where) for t, (_, _, where) in zip(cells, rows, strict=True)]
        text = torch.empty(len(rows), self.text_len, self.text_dim)
        for b, t in enumerate(cells):
            copy_into(text[b, : t.shape[0]], t)
            text[b, t.shape[0]:] = 0
        return text, torch.tensor([t.shape[0] for t in cells], dtype=torch.long)

    def _crop_text(self, t: Cell, where: str) -> Cell:
        """A text cell of more than text_len tokens as its first text_len (a prefix of its bytes)."""
        if t.shape[0] <= self.text_len:
            return t
        if not self._cropped:
            self._cropped = True
            logger.warning("%s: text embedding has %d tokens, cropped to data.text_len %d (as FastVideo crops; "
                           "this note is shown once)", where, t.shape[0], self.text_len)
        size = self.text_len * t.shape[1] * t.dtype.itemsize
        return Cell(t.buf.slice(0, size), (self.text_len, t.shape[1]), t.dtype)

    def _stacked(self, cells, rows, column: Column) -> torch.Tensor:
        crop = self.num_latent_t if column.kind == "latents" else 0
        for x, (_, _, where) in zip(cells, rows, strict=True):
            if crop and x.shape[-3] < crop:
                raise DataError(f"{where}: {column.name} has {x.shape[-3]} latent frames, fewer than "
                                f"data.num_latent_t {crop}")
        kept = [(*x.shape[:-3], crop, *x.shape[-2:]) if crop else x.shape for x in cells]
        if len(set(kept)) > 1:
            listing = "; ".join(f"{w}: {list(x.shape)}" for x, (_, _, w) in zip(cells, rows, strict=True))
            raise DataError(f"{column.name} of different shapes in one batch ({listing}); use batch_size 1 "
                            f"or one resolution per dataset")
        out = torch.empty(len(rows), *kept[0])
        for b, x in enumerate(cells):
            if crop and x.shape[-3] != crop:  # the first frames of a longer clip (FastVideo's num_latent_t)
                whole = torch.empty(x.shape)
                copy_into(whole, x)
                out[b] = whole[..., :crop, :, :]
            else:
                copy_into(out[b], x)
        if column.kind == "latents" and self.latent_stats is not None:
            mean, std = (s.view(-1, 1, 1, 1) for s in self.latent_stats)  # channels at dim -4
            if len(mean) != out.shape[-4]:
                raise DataError(f"{rows[0][2]}: {column.name} has {out.shape[-4]} channels, latents_mean "
                                f"{len(mean)}")
            out.sub_(mean).div_(std)  # in place: the batch is ours
        return out

    def __getitem__(self, i: int) -> dict:
        """Sample i: {"id", "caption", and each column's tensor without the batch dim ("text_len" an int)}."""
        b = self.batch([i])
        sample = {"id": b.pop("ids")[0], "caption": b.pop("captions")[0]}
        return sample | {k: (int(v[0]) if k.endswith("_len") else v[0]) for k, v in b.items()}
