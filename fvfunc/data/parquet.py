"""FastVideo's parquet rows, cell by cell: decoding a tensor triplet, and writing rows in its schemas.

A tensor is three columns, `<name>_bytes` (the raw `tensor.tobytes()`), `<name>_shape` (list<int64>)
and `<name>_dtype` (`str(dtype)`, with or without "torch."); FastVideo's schemas (DESIGN.md section 5)
are sets of such triplets plus metadata columns. The dtype column is honoured (FastVideo's own reader
assumes float32).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fvfunc.losses.spec import (
    CLIP_FEATURE,
    FIRST_FRAME_LATENT,
    LATENTS,
    TEXT,
    TRAJECTORY,
    TRAJECTORY_TIMESTEPS,
    Column,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "int64": torch.int64, "int32": torch.int32}
METADATA = {"file_name": pa.string(), "caption": pa.string(), "media_type": pa.string(),
            "width": pa.int64(), "height": pa.int64(), "num_frames": pa.int64(),
            "duration_sec": pa.float64(), "fps": pa.float64()}

# FastVideo's schemas as column sets (fastvideo/dataset/dataloader/schema.py)
T2V = (TEXT, LATENTS)
TEXT_ONLY = (TEXT,)
ODE_TRAJECTORY_TEXT_ONLY = (TEXT, TRAJECTORY, TRAJECTORY_TIMESTEPS)
ROW_KEYS = {"text_embedding": TEXT, "latent": LATENTS, "trajectory_latents": TRAJECTORY,
            "trajectory_timesteps": TRAJECTORY_TIMESTEPS, "clip_feature": CLIP_FEATURE,
            "first_frame_latent": FIRST_FRAME_LATENT}
"""The key of each tensor in a row given to `write_parquet` -> its column."""


class DataError(ValueError):
    """Bad or missing data. The message names the file (and the row, id or column)."""


def triplet(column: Column) -> tuple[str, str, str]:
    return f"{column.name}_bytes", f"{column.name}_shape", f"{column.name}_dtype"


class Cell(NamedTuple):
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


def cell(table: pa.Table, r: int, column: Column, where: str) -> Cell:
    """Row r's tensor of `column`, checked against its shape and dtype columns."""
    names = triplet(column)
    buf = _bytes(table.column(names[0]), r)
    shape, dtype = (table.column(name)[r].as_py() for name in names[1:])
    dt = DTYPES.get((dtype or "").removeprefix("torch."))
    if not dtype and not shape and buf is not None and buf.size == 0:
        raise DataError(f"{where}: empty {names[0].removesuffix('_bytes')} (FastVideo writes an empty triplet where "
                        "its preprocessing had no such feature, e.g. no image encoder for clip_feature)")
    if dt is None:
        raise DataError(f"{where}: unknown {names[2]} {dtype!r} (expected one of {sorted(DTYPES)})")
    if buf is None or shape is None:
        raise DataError(f"{where}: null {names[0]} or {names[1]}")
    if len(shape) == column.rank + 1 and shape[0] == 1:
        shape = shape[1:]  # FastVideo sometimes keeps a batch dim of 1 (older text rows, trajectories)
    if len(shape) != column.rank:
        raise DataError(f"{where}: {names[1]} {shape} has rank {len(shape)}, expected {column.rank}")
    if math.prod(shape) * dt.itemsize != buf.size:
        raise DataError(f"{where}: {names[1]} {shape} in {dtype} is {math.prod(shape) * dt.itemsize} bytes, "
                        f"{names[0]} holds {buf.size}")
    return Cell(buf, tuple(shape), dt)


_NUMPY = {torch.float16: np.float16, torch.float32: np.float32, torch.int64: np.int64, torch.int32: np.int32}


def copy_into(out: torch.Tensor, c: Cell) -> None:
    """Decode a cell's bytes into the float32 tensor `out`: one copy, straight from arrow's memory.
    numpy reads the read-only buffer without complaint (torch.frombuffer would warn)."""
    if c.buf.size == 0:
        return
    dst = out.view(-1).numpy()  # view(-1): `out` must be a contiguous slot, never a silent copy
    if c.dtype is torch.bfloat16:  # a bf16 is the top half of a float32: widen by shifting 16 bits left
        np.left_shift(np.frombuffer(c.buf, np.uint16), 16, out=dst.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(dst, np.frombuffer(c.buf, _NUMPY[c.dtype]), casting="unsafe")


# ---------------------------------------------------------------------------------------- writing


def schema(columns: tuple[Column, ...]) -> pa.Schema:
    """FastVideo's schema for a column set, in its column order: id, the tensor triplets, metadata
    (t2v: every metadata column; text-only: caption; ode_trajectory_text_only: file_name, caption,
    media_type), as its pyarrow_schema_t2v, _text_only and _ode_trajectory_text_only; the i2v columns
    (clip_feature, first_frame_latent) after the others, as its pyarrow_schema_i2v orders them."""
    order = [LATENTS, TEXT, TRAJECTORY, TRAJECTORY_TIMESTEPS, CLIP_FEATURE, FIRST_FRAME_LATENT]
    fields = [pa.field("id", pa.string())]
    for c in sorted(columns, key=order.index):
        b, s, d = triplet(c)
        fields += [pa.field(b, pa.binary()), pa.field(s, pa.list_(pa.int64())), pa.field(d, pa.string())]
    meta = ("file_name", "caption", "media_type") if TRAJECTORY in columns else \
        ("caption",) if set(columns) == {TEXT} else METADATA
    return pa.schema(fields + [pa.field(k, METADATA[k]) for k in meta])


def _encode(t: torch.Tensor, what: str, where: str) -> tuple[bytes, list[int], str]:
    t = t.detach().cpu().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise DataError(f"{where}: {what} has dtype {t.dtype}; storable: {sorted(DTYPES)}")
    return t.reshape(-1).view(torch.uint8).numpy().tobytes(), list(t.shape), name


def write_parquet(path, rows: Iterable[dict], rows_per_group: int = 1, compression: str = "none") -> Path:
    """Write samples in FastVideo's schema and return the file written.

    rows: dicts with `id`, tensors under the keys of ROW_KEYS (`text_embedding` [L, D], `latent`
      [C, T, H, W], `trajectory_latents` [S, C, T, H, W], `trajectory_timesteps` [S], the i2v
      `clip_feature` [L, D] and `first_frame_latent` [C, T, H, W]), optionally
      `caption` and the other metadata columns (missing ones are null). The first row's tensors pick
      the schema (T2V, text-only, ode_trajectory_text_only); every row must have the same ones. Each
      tensor keeps its own dtype. Rows are consumed lazily, one row group at a time.
    path: a `.parquet` file, or a folder (created) that gets its next `part-NNNNN.parquet`.
    rows_per_group: a row group is the smallest unit parquet reads and a row is megabytes, so one row a
      group lets a shuffled read touch only its own row.
    compression: "none" by default, as float bytes barely compress and decompressing costs a copy.
    """
    path = Path(path)
    if path.suffix != ".parquet":
        path.mkdir(parents=True, exist_ok=True)
        path = path / f"part-{len(list(path.glob('part-*.parquet'))):05d}.parquet"
    return _write(path, rows, rows_per_group, compression)


def _write(path: Path, rows: Iterable[dict], rows_per_group: int, compression: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, writer, keys = iter(rows), None, None
    try:
        while chunk := list(itertools.islice(rows, rows_per_group)):
            if writer is None:
                keys = [k for k in ROW_KEYS if k in chunk[0]]
                writer = pq.ParquetWriter(path, schema(tuple(ROW_KEYS[k] for k in keys)), compression=compression)
            cols = {name: [] for name in writer.schema.names}
            for row in chunk:
                where = f"{path}: row id {row.get('id')!r}"
                if [k for k in ROW_KEYS if k in row] != keys:
                    raise DataError(f"{where}: has tensors {[k for k in ROW_KEYS if k in row]}, the first row "
                                    f"{keys}; every row must have the same ones")
                cols["id"].append(str(row["id"]))
                for k in keys:
                    b, s, d = triplet(ROW_KEYS[k])
                    data, shape, dtype = _encode(row[k], k, where)
                    cols[b].append(data)
                    cols[s].append(shape)
                    cols[d].append(dtype)
                for name in cols.keys() & METADATA.keys():
                    cols[name].append(row.get(name))
            writer.write_table(pa.table(cols, schema=writer.schema), row_group_size=rows_per_group)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise DataError(f"{path}: no rows to write")
    return path


def write_atomic(path, rows: Iterable[dict], rows_per_group: int = 1, compression: str = "none") -> Path:
    """`write_parquet` to the file `path` under a temporary name, fsynced and renamed into place: a
    killed writer leaves no partial `path` (readers glob `*.parquet`; the temporary name does not match)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    _write(tmp, rows, rows_per_group, compression)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def ids_in(folder) -> set[str]:
    """The ids of every row in the `*.parquet` files under folder (footers and the id column only)."""
    ids: set[str] = set()
    for f in sorted(Path(folder).rglob("*.parquet")) if Path(folder).is_dir() else ():
        ids.update(pq.read_table(f, columns=["id"]).column(0).to_pylist())
    return ids
