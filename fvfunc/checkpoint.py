"""Crash-safe checkpoints of plain tensor trees: safetensors files plus one meta.json, never pickle.

A checkpoint is a folder `output_dir/checkpoint-<step>/` holding one `<name>.safetensors` per tree
("student", "student.opt", "critic", "ema", "state", ...) and a `meta.json`:

    {"format_version": 1, "step": 500, "files": {"student.safetensors": 1234, ...}, "meta": {...}}

where "meta" is the caller's dict as given. A folder is *complete* when meta.json parses and every
file it lists exists with the listed size. `save` builds the folder under a hidden temporary name,
fsyncs it, writes meta.json last and only then renames it into place, so a killed run leaves either
the old set of checkpoints or the old set plus a complete new one -- never a half-written
`checkpoint-<step>` that `latest` could pick.

A sharded run (fvfunc.distributed) writes one checkpoint from all its ranks: the trees every rank
holds alike once, from rank 0, and each rank's pieces of the sharded trees as
`<name>.shard-<rank>-of-<world>.safetensors` (the rows of dim 0 that rank holds, as `torch.chunk`
splits them), all into the same temporary folder before rank 0 writes meta.json and renames it.
`load` joins the pieces back into whole tensors, or reads only one rank's pieces.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
from pathlib import Path

import safetensors
import safetensors.torch
import torch

FORMAT_VERSION = 1
_NAME = re.compile(r"checkpoint-(\d+)")
_TEMP = re.compile(r"\.checkpoint-\d+\.(tmp|old)")
_SUFFIX = ".safetensors"
_SHARD = re.compile(r"(?P<tree>.+)\.shard-(?P<rank>\d+)-of-(?P<world>\d+)")

Trees = dict[str, dict[str, torch.Tensor]]


class CheckpointError(ValueError):
    """A folder is not a complete, readable checkpoint; the message names the folder or file."""


# ------------------------------------------------------------------------------------------ save


def shard_name(tree: str, rank: int, world_size: int) -> str:
    """The file stem of one rank's piece of a sharded tree."""
    return f"{tree}.shard-{rank:05d}-of-{world_size:05d}"


def save(output_dir: str | os.PathLike, step: int, trees: Trees, meta: dict, keep: int = 0, *,
         shards: Trees | None = None, rank: int = 0, world_size: int = 1, sync=None) -> Path:
    """Write `trees` and `meta` as `output_dir/checkpoint-<step>/` and return that folder.

    A folder of the same step is replaced. Afterwards the newest `keep` complete checkpoints are kept
    (0 keeps all); the one just written always counts among them, even when newer steps exist (a run
    resumed from an older checkpoint must not delete its own fresh save).

    Several ranks (world_size > 1) all call `save` with the same step and meta: rank 0 writes `trees`,
    every rank writes its `shards` ({tree: this rank's piece}), and `sync(obj) -> [every rank's obj]`
    (fvfunc.distributed.exchange) orders the phases: folder made, files written, checkpoint renamed."""
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if "step" in meta and meta["step"] != step:
        raise ValueError(f"meta['step'] = {meta['step']!r} but saving step {step}")
    if (world_size > 1) != (sync is not None):
        raise ValueError("a checkpoint of several ranks needs `sync`, and only such a checkpoint")
    files = {name: tree for name, tree in (trees if rank == 0 else {}).items()}
    files.update({shard_name(name, rank, world_size): tree for name, tree in (shards or {}).items()})
    for name in files:
        if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or os.sep in name:
            raise ValueError(f"tree name {name!r} must be a non-empty file name (no '/', no leading '.')")
    json.dumps(meta)  # a meta that is not JSON fails here, before anything touches the disk

    out = Path(output_dir)
    final, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out)
        tmp.mkdir()
    if sync is not None:
        sync(None)  # the temporary folder exists

    sizes = {}
    for name, tree in files.items():
        path = tmp / (name + _SUFFIX)
        safetensors.torch.save_file(_to_cpu(name, tree), str(path))
        fsync(path)
        sizes[path.name] = path.stat().st_size
    if sync is not None:
        every = sync(sizes)
        sizes = {k: v for s in every for k, v in s.items()}
        if sum(map(len, every)) != len(sizes):
            raise ValueError("two ranks wrote a checkpoint file of the same name")

    if rank == 0:
        record = {"format_version": FORMAT_VERSION, "step": step, "files": sizes, "meta": meta}
        (tmp / "meta.json").write_text(json.dumps(record, indent=2) + "\n")
        fsync(tmp / "meta.json")
        fsync(tmp)
        if final.exists():
            swap_in(tmp, final)
        else:
            os.rename(tmp, final)
        fsync(out)
        if keep > 0:
            others = [p for p in list_checkpoints(out) if p != final]
            for old in others[: max(len(others) - (keep - 1), 0)]:
                shutil.rmtree(old)
    if sync is not None:
        sync(None)  # the checkpoint is in place for every rank
    return final


def _to_cpu(name: str, tree: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, with no two sharing storage (safetensors refuses aliased tensors, e.g.
    tied weights or views of one buffer: those get their own copy)."""
    seen, out = set(), {}
    for k, v in tree.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise TypeError(f"tree {name!r}: entries must be str -> Tensor, got {type(k).__name__} -> "
                            f"{type(v).__name__} for {k!r}")
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[k] = t
    return out


def swap_in(new: Path, final: Path) -> None:
    """Put the complete folder `new` at `final`, which already exists, then delete the old one.

    Linux's renameat2(RENAME_EXCHANGE) swaps the two names in one step, so `final` is always a
    complete folder. Elsewhere two renames leave a moment in which `final` is absent (for a checkpoint,
    its older steps still are present and complete). fvfunc/export.py replaces an export with it too."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if not _rename_exchange(new, final):
        os.rename(final, old)
        os.rename(new, final)
        new = old
    shutil.rmtree(new)  # after the swap `new` holds the replaced checkpoint


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False when that is unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # not supported here: fall back
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _remove_stale_temporaries(out: Path) -> None:
    # left behind by a killed save; only one process saves into an output_dir at a time
    for p in out.iterdir():
        if _TEMP.fullmatch(p.name) and p.is_dir():
            shutil.rmtree(p)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ read


def _verify(path: Path) -> dict:
    """The parsed meta.json of a complete checkpoint folder; CheckpointError naming what is wrong."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint (no such folder)")
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: incomplete or not a checkpoint (no meta.json)")
    try:
        record = json.loads(meta_path.read_text())
        files, version, step = record["files"], record["format_version"], int(record["step"])
        record["meta"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable meta.json ({type(e).__name__}: {e})") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format version {version} is newer than this fvfunc's "
                              f"{FORMAT_VERSION}")
    m = _NAME.fullmatch(path.name)
    if m and int(m.group(1)) != step:
        raise CheckpointError(f"{meta_path}: says step {step} but the folder is {path.name}")
    for fname, size in files.items():
        if not fname.endswith(_SUFFIX) or Path(fname).name != fname:
            raise CheckpointError(f"{meta_path}: bad file name {fname!r} in the manifest")
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"{path}: incomplete, missing file {fname}")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: size mismatch, {f.stat().st_size} bytes on disk, {size} in "
                                  f"meta.json (truncated?)")
    return record


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints `output_dir/checkpoint-<step>`, sorted by step (oldest first)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _NAME.fullmatch(p.name)
        if m and p.is_dir():
            try:
                _verify(p)
            except CheckpointError:
                continue
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `output_dir`, or None when there is none."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve(output_dir: str | os.PathLike, resume: str) -> Path | None:
    """What `TrainingConfig.resume` points at: '' -> None (fresh start); 'latest' -> the newest
    complete checkpoint in `output_dir` or None; else a checkpoint folder, taken as given when it
    exists and otherwise relative to `output_dir` ('checkpoint-500'). That folder must be complete."""
    if not resume:
        return None
    if resume == "latest":
        return latest(output_dir)
    path = Path(resume)
    if not path.exists() and not path.is_absolute() and (Path(output_dir) / path).exists():
        path = Path(output_dir) / path
    _verify(path)
    return path


def _read(f: Path) -> dict[str, torch.Tensor]:
    try:
        with safetensors.safe_open(str(f), framework="pt", device="cpu") as sf:
            return {k: sf.get_tensor(k).clone() for k in sf.keys()}
    except (safetensors.SafetensorError, OSError) as e:
        raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None


def load(path: str | os.PathLike, shard: tuple[int, int] | None = None) -> tuple[Trees, dict]:
    """`(trees, meta)` of a complete checkpoint folder: fresh, aligned, contiguous CPU tensors (cloned
    out of the file mapping) and the caller's meta as it was saved.

    Sharded trees (written by several ranks) come back whole, their pieces joined along dim 0 in rank
    order. With `shard=(rank, world_size)` and a checkpoint sharded over that many ranks, only this
    rank's pieces are read (and returned as they are); over another number of ranks, whole as above."""
    path = Path(path)
    record = _verify(path)
    trees: Trees = {}
    pieces: dict[str, dict[int, str]] = {}
    worlds = set()
    for fname in record["files"]:
        stem = fname[: -len(_SUFFIX)]
        m = _SHARD.fullmatch(stem)
        if m is None:
            trees.setdefault(stem, {}).update(_read(path / fname))
        else:
            pieces.setdefault(m["tree"], {})[int(m["rank"])] = fname
            worlds.add(int(m["world"]))
    if len(worlds) > 1:
        raise CheckpointError(f"{path}: shards of different world sizes {sorted(worlds)}")
    world = worlds.pop() if worlds else 0
    for name, files in pieces.items():
        if sorted(files) != list(range(world)):
            raise CheckpointError(f"{path}: tree {name!r} has shards {sorted(files)} of {world} ranks")
        if shard is not None and shard[1] == world:
            parts = [_read(path / files[shard[0]])]
        else:
            parts = [_read(path / files[r]) for r in range(world)]
        joined = {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}
        trees.setdefault(name, {}).update(joined)
    return trees, record["meta"]
