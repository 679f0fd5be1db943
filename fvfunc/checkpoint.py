"""Crash-safe checkpoints of plain tensor trees: safetensors files plus one meta.json, never pickle.

A checkpoint is a folder `output_dir/checkpoint-<step>/` holding one `<name>.safetensors` per tree
("student", "student.opt", "critic", "ema", "state", ...) and a `meta.json`:

    {"format_version": 2, "step": 500, "meta": {...},
     "files": {"student.safetensors": {"bytes": 1234, "xxh3_128": "9f3c..."}, ...}}

where "meta" is the caller's dict as given. A folder is *complete* when meta.json parses and every
file it lists exists with the listed size, and *intact* when each file's content also hashes to the
listed xxh3-128 checksum (`verify`; `load` checks the files it reads, `resolve` every file). `save`
builds the folder under a hidden temporary name, fsyncs it, writes meta.json last and only then
renames it into place, so a killed run leaves either the old set of checkpoints or the old set plus a
complete new one -- never a half-written `checkpoint-<step>` that `latest` could pick. Pruning renames
a checkpoint to a hidden trash name before deleting it, so a kill mid-delete leaves no half-deleted
`checkpoint-<step>` either; `clean` removes such leftovers (the trainer calls it at start). Format 1
folders (sizes, no checksums) still load.

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
from typing import NamedTuple

import safetensors
import safetensors.torch
import torch
import xxhash

FORMAT_VERSION = 2
_NAME = re.compile(r"checkpoint-(\d+)")
_TEMP = re.compile(r"\.checkpoint-\d+\.(tmp|old|trash)")
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
        try:
            out.mkdir(parents=True, exist_ok=True)
            clean(out)
            tmp.mkdir()
        except OSError as e:
            raise CheckpointError(f"{tmp}: cannot write the checkpoint of step {step} ({_reason(e)})") from None
    if sync is not None:
        sync(None)  # the temporary folder exists

    records, failure = {}, None
    try:
        for name, tree in files.items():
            path = tmp / (name + _SUFFIX)
            safetensors.torch.save_file(_to_cpu(name, tree), str(path))
            fsync(path)
            records[path.name] = {"bytes": path.stat().st_size, HASH: file_hash(path)}
    except OSError as e:  # disk full, quota, I/O error: no checkpoint of this step, the older ones stay
        failure = f"{tmp}: cannot write the checkpoint of step {step} ({_reason(e)})"
    if sync is not None:
        every = sync((records, failure))
        failure = next((f for _, f in every if f), None)
        records = {k: v for r, _ in every for k, v in r.items()}
        if failure is None and sum(len(r) for r, _ in every) != len(records):
            raise ValueError("two ranks wrote a checkpoint file of the same name")

    if rank == 0 and failure is None:
        record = {"format_version": FORMAT_VERSION, "step": step, "files": records, "meta": meta}
        try:
            (tmp / "meta.json").write_text(json.dumps(record, indent=2) + "\n")
            fsync(tmp / "meta.json")
            fsync(tmp)
            if final.exists():
                swap_in(tmp, final)
            else:
                os.rename(tmp, final)
            fsync(out)
        except OSError as e:
            failure = f"{tmp}: cannot write the checkpoint of step {step} ({_reason(e)})"
    if rank == 0 and failure is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    if sync is not None:
        failure = next((f for f in sync(failure) if f), None)  # the checkpoint is in place for every rank
    if failure is not None:
        raise CheckpointError(failure)
    if rank == 0 and keep > 0:
        prune(out, final, keep)
    return final


def _reason(e: OSError) -> str:
    return e.strerror or str(e) if e.errno != errno.ENOSPC else "the disk is full"


def prune(out: Path, fresh: Path, keep: int) -> list[Path]:
    """Delete complete checkpoints older than `fresh` beyond the newest `keep` (`fresh` counted among
    them); checkpoints newer than `fresh` (a run resumed from an older one) are never touched. Each is
    renamed to a hidden trash name first, so a kill mid-delete leaves nothing that looks like a
    checkpoint. Returns the deleted folders."""
    step = int(_NAME.fullmatch(fresh.name).group(1))
    older = [p for p in list_checkpoints(out) if int(_NAME.fullmatch(p.name).group(1)) < step]
    doomed = older[: max(len(older) - (keep - 1), 0)]
    for old in doomed:
        trash = out / f".{old.name}.trash"
        os.rename(old, trash)
        fsync(out)
        shutil.rmtree(trash)
    return doomed


def file_hash(path: Path, chunk: int = 8 << 20) -> str:
    """The xxh3-128 checksum of a file's bytes, as hex."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


HASH = "xxh3_128"
"""The checksum meta.json records per file."""


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


def clean(out: str | os.PathLike) -> list[Path]:
    """Remove what a killed or failed save or prune left in `out` (`.checkpoint-<step>.tmp`, `.old`,
    `.trash` folders); only one process saves into an output_dir at a time. Returns what it removed."""
    out = Path(out)
    found = [p for p in out.iterdir() if _TEMP.fullmatch(p.name) and p.is_dir()] if out.is_dir() else []
    for p in found:
        shutil.rmtree(p)
    return found


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ read


def _entry(record_path: Path, fname: str, entry) -> tuple[int, str | None]:
    """(bytes, checksum or None) of one manifest entry (format 1 lists only the size)."""
    if isinstance(entry, int) and not isinstance(entry, bool):
        return entry, None
    if isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get(HASH), str):
        return entry["bytes"], entry[HASH]
    raise CheckpointError(f"{record_path}: bad manifest entry for {fname}: {entry!r}")


def _verify(path: Path, deep: bool = False) -> dict:
    """The parsed meta.json of a complete checkpoint folder (every file present with its size; with
    `deep`, its checksum too); CheckpointError naming what is wrong."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint (no such folder)")
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: incomplete or not a checkpoint (no meta.json)")
    try:
        record = json.loads(meta_path.read_text())
        files, version, step = record["files"], record["format_version"], int(record["step"])
        if not isinstance(files, dict) or not isinstance(record["meta"], dict):
            raise TypeError("'files' and 'meta' must be mappings")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable meta.json ({type(e).__name__}: {e})") from None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format version {version!r} is newer than this fvfunc's "
                              f"{FORMAT_VERSION}")
    m = _NAME.fullmatch(path.name)
    if m and int(m.group(1)) != step:
        raise CheckpointError(f"{meta_path}: says step {step} but the folder is {path.name}")
    for fname, entry in files.items():
        if not isinstance(fname, str) or not fname.endswith(_SUFFIX) or Path(fname).name != fname:
            raise CheckpointError(f"{meta_path}: bad file name {fname!r} in the manifest")
        size, _ = _entry(meta_path, fname, entry)
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"{path}: incomplete, missing file {fname}")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: size mismatch, {f.stat().st_size} bytes on disk, {size} in "
                                  f"meta.json (truncated?)")
    if deep:
        for fname in files:
            _check_hash(path, record, fname)
    return record


def _check_hash(path: Path, record: dict, fname: str) -> None:
    _, expected = _entry(path / "meta.json", fname, record["files"][fname])
    if expected is None:  # format 1: no checksums were written
        return
    try:
        actual = file_hash(path / fname)
    except OSError as e:
        raise CheckpointError(f"{path / fname}: unreadable ({_reason(e)})") from None
    if actual != expected:
        raise CheckpointError(f"{path / fname}: checksum mismatch (the file is corrupted: {HASH} {actual}, "
                              f"meta.json says {expected})")


def verify(path: str | os.PathLike) -> dict:
    """Check every file of a checkpoint folder against its size and checksum; returns its meta.json
    record, or raises CheckpointError naming the first bad file."""
    return _verify(Path(path), deep=True)


def read_meta(path: str | os.PathLike) -> dict:
    """The caller's meta saved with a complete checkpoint (its sizes checked, not its checksums)."""
    return _verify(Path(path))["meta"]


def steps_in(output_dir: str | os.PathLike) -> list[Path]:
    """Every `checkpoint-<step>` folder in `output_dir`, complete or not, sorted by step."""
    out = Path(output_dir)
    found = [(int(m.group(1)), p) for p in (out.iterdir() if out.is_dir() else [])
             if (m := _NAME.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints `output_dir/checkpoint-<step>`, sorted by step (oldest first)."""
    found = []
    for p in steps_in(output_dir):
        try:
            _verify(p)
        except CheckpointError:
            continue
        found.append(p)
    return found


def latest(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `output_dir`, or None when there is none."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


class Resolved(NamedTuple):
    path: Path | None
    """The intact checkpoint to resume from; None: a fresh start."""
    skipped: list[tuple[Path, str]]
    """Newer `checkpoint-<step>` folders `latest` passed over, with why (damaged or incomplete)."""


def resolve(output_dir: str | os.PathLike, resume: str) -> Resolved:
    """What `TrainingConfig.resume` points at, checked file by file against its checksums:
    '' -> a fresh start; 'latest' -> the newest intact checkpoint in `output_dir`, passing over damaged
    or incomplete newer ones (listed in `skipped`), or a fresh start when there is no checkpoint folder
    at all; CheckpointError when every one is damaged. Else a checkpoint folder, taken as given when
    it exists and otherwise relative to `output_dir` ('checkpoint-500'); it must be intact, there is
    no fall-back."""
    if not resume:
        return Resolved(None, [])
    if resume == "latest":
        skipped = []
        for p in reversed(steps_in(output_dir)):
            try:
                _verify(p, deep=True)
                return Resolved(p, skipped)
            except CheckpointError as e:
                skipped.append((p, str(e)))
        if skipped:
            why = "; ".join(reason for _, reason in skipped)
            raise CheckpointError(f"{output_dir}: no intact checkpoint to resume ({why})")
        return Resolved(None, [])
    path = Path(resume)
    if not path.exists() and not path.is_absolute() and (Path(output_dir) / path).exists():
        path = Path(output_dir) / path
    _verify(path, deep=True)
    return Resolved(path, [])


def _read(f: Path) -> dict[str, torch.Tensor]:
    try:
        with safetensors.safe_open(str(f), framework="pt", device="cpu") as sf:
            return {k: sf.get_tensor(k).clone() for k in sf.keys()}
    except (safetensors.SafetensorError, OSError) as e:
        raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None


def load(path: str | os.PathLike, shard: tuple[int, int] | None = None, verify: bool = True) -> tuple[Trees, dict]:
    """`(trees, meta)` of a complete checkpoint folder: fresh, aligned, contiguous CPU tensors (cloned
    out of the file mapping) and the caller's meta as it was saved. Each file read is first checked
    against its checksum (`verify=False` skips that, for a folder `resolve` has just checked).

    Sharded trees (written by several ranks) come back whole, their pieces joined along dim 0 in rank
    order. With `shard=(rank, world_size)` and a checkpoint sharded over that many ranks, only this
    rank's pieces are read (and returned as they are); over another number of ranks, whole as above."""
    path = Path(path)
    record = _verify(path)

    def read(fname):
        if verify:
            _check_hash(path, record, fname)
        return _read(path / fname)

    trees: Trees = {}
    pieces: dict[str, dict[int, str]] = {}
    worlds = set()
    for fname in record["files"]:
        stem = fname[: -len(_SUFFIX)]
        m = _SHARD.fullmatch(stem)
        if m is None:
            trees.setdefault(stem, {}).update(read(fname))
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
            parts = [read(files[shard[0]])]
        else:
            parts = [read(files[r]) for r in range(world)]
        joined = {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}
        trees.setdefault(name, {}).update(joined)
    return trees, record["meta"]
