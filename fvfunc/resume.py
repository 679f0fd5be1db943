"""May this run continue that checkpoint? The record a checkpoint keeps of its run, and the check.

A checkpoint's meta holds the run as flat fields (`run`: {"training.seed": 0, ...}) and a
fingerprint of what the run reads besides its config: each role's model config and a sampled content
hash of its weight files, and the data's files (names, sizes, parquet footers). Resuming compares
both with the new run's, before any model loads:

- fields in `configs.RESUME_FREE` (max_steps, logging, checkpointing, validation, tracking, the
  device and other speed knobs) may change freely; training.attention too, between dense backends,
  but not to or from 'vsa', whose settings (`configs.VSA_FIELDS`) matter when either run has it;
- `data.path` and `roles.<role>.path` / `.variant` may change as long as what they point at is the
  same (a moved folder resumes; other weights or other data do not);
- any other change (seed, batch size, lr, method settings, precision, ...) is refused, naming each
  differing field with both values, unless the field is listed in `training.allow_changes`
  (`all` allows every change).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import xxhash

import configs

SAMPLES = 64
"""Blocks of a weight file hashed for its fingerprint (besides its header and size)."""
BLOCK = 1 << 16


class Refused(ValueError):
    """The checkpoint belongs to another run; the message names every differing field."""


# ------------------------------------------------------------------------------------------ record


def flat(cfg) -> dict:
    """The run config as {"training.seed": 0, "roles.student.path": "...", ...} of JSON values."""
    out = {}

    def walk(prefix, obj):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(f"{prefix}{f.name}.", v)
            else:
                out[f"{prefix}{f.name}"] = json.loads(json.dumps(v))  # tuples -> lists, as meta.json keeps them

    walk("", cfg)
    out.pop("config", None)  # the run file it came from: its values are the fields themselves
    return out


def file_fingerprint(path: Path) -> str:
    """A sampled content hash of a file: its size, first 1 MiB (a safetensors header with every
    tensor's name, dtype, shape and offsets) and SAMPLES blocks spread over the rest. Other weights of
    the same architecture differ in every block; reading it costs a few MB, not the whole file."""
    h = xxhash.xxh3_128()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        for i in range(SAMPLES):
            f.seek((size - BLOCK) * i // SAMPLES if size > BLOCK else 0)
            h.update(f.read(BLOCK))
    return h.hexdigest()


def model_fingerprint(fam, path: str, variant: str) -> dict:
    """{"config": the model config's fields, "weights": a hash of its weight files' fingerprints}."""
    cfg = fam.load_config(path)
    config = json.loads(json.dumps(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {"repr": repr(cfg)}))
    files = fam.weight_files(path, variant) if fam.weight_files is not None else []
    h = xxhash.xxh3_128()
    for f in files:
        h.update(f"{Path(f).name}:{file_fingerprint(Path(f))};".encode())
    return {"config": config, "weights": h.hexdigest() if files else None}


def data_fingerprint(dataset) -> dict:
    """{"files", "rows", "hash"} of a dataset: its files by name relative to their folder, sizes and
    parquet footers (row groups, column sizes, statistics), and the sample order's repeats."""
    h = xxhash.xxh3_128()
    for name, path in zip(dataset.names, dataset.files, strict=True):
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            f.seek(max(size - 8, 0))
            footer_len = int.from_bytes(f.read(4), "little")
            f.seek(max(size - 8 - footer_len, 0))
            footer = f.read(footer_len)
        h.update(f"{name}:{size}:".encode())
        h.update(footer)
    h.update(str(dataset.repeats).encode())
    return {"files": len(dataset.files), "rows": len(dataset), "hash": h.hexdigest()}


def record(cfg, roles_needed, families, dataset) -> dict:
    """What a checkpoint's meta keeps of its run: {"run": flat(cfg), "fingerprint": ...}."""
    models = {}
    for name in roles_needed:
        role = getattr(cfg.roles, name)
        models[name] = model_fingerprint(families[name], role.path, role.variant)
    return {"run": flat(cfg), "fingerprint": {"roles": models, "data": data_fingerprint(dataset)}}


# ------------------------------------------------------------------------------------------- check


def _free(field: str) -> bool:
    return any(field == f or (f.endswith(".") and field.startswith(f)) for f in configs.RESUME_FREE)


def _show(v) -> str:
    return json.dumps(v) if not isinstance(v, str) else repr(v)


def differences(saved: dict, now: dict, roles_needed) -> list[tuple[str, str]]:
    """[(field, "was X, now Y")] of the changes that alter results, between a checkpoint's record
    (`saved`, from `record`) and the new run's (`now`)."""
    out = []
    was, run = saved.get("run", {}), now["run"]
    content = {"data.path"} | {f"roles.{r}.{k}" for r in roles_needed for k in ("path", "variant")}
    # dense backends compute the same (beyond rounding), VSA does not: attention and the VSA settings are
    # free between dense runs only
    vsa = "vsa" in (was.get("training.attention"), run.get("training.attention"))
    for field in sorted(set(was) | set(run)):
        if field.startswith("roles.") and field.split(".")[1] not in roles_needed:
            continue  # a role this method does not use
        free = not vsa if field in (*configs.VSA_FIELDS, "training.attention") else _free(field)
        if free or field in content or was.get(field) == run.get(field):
            continue
        out.append((field, f"was {_show(was.get(field))}, now {_show(run.get(field))}"))
    fp_was, fp_now = saved.get("fingerprint", {}), now["fingerprint"]
    for role in roles_needed:
        a, b = fp_was.get("roles", {}).get(role), fp_now["roles"][role]
        if a is None:
            continue
        where = f"roles.{role}.path"
        if a["config"] != b["config"]:
            keys = [k for k in sorted(set(a["config"]) | set(b["config"])) if a["config"].get(k) != b["config"].get(k)]
            what = ", ".join(f"{k} {_show(a['config'].get(k))} -> {_show(b['config'].get(k))}" for k in keys)
            out.append((where, f"another model: its config differs ({what}); was {was.get(where)!r}, now "
                               f"{run.get(where)!r}"))
        elif a["weights"] != b["weights"]:
            out.append((where, f"other weights than the checkpoint's run read (was {was.get(where)!r}, now "
                               f"{run.get(where)!r})"))
    d_was, d_now = fp_was.get("data"), fp_now["data"]
    if d_was is not None and d_was["hash"] != d_now["hash"]:
        out.append(("data.path", f"other data: was {d_was['files']} file(s), {d_was['rows']} samples "
                                 f"({_show(was.get('data.path'))}), now {d_now['files']} file(s), {d_now['rows']} "
                                 f"samples ({_show(run.get('data.path'))})"))
    return out


def check(meta: dict, now: dict, method: str, roles_needed, allow, where: str) -> list[str]:
    """Raise Refused when the checkpoint (its meta) is not one this run may continue; returns notes
    on what changed and was allowed. `allow`: training.allow_changes."""
    if meta.get("method", method) != method:
        raise Refused(f"{where} is a {meta['method']} checkpoint; this is a {method} run (continue it with "
                      f"`train.py {meta['method']}`, or start afresh in another --training.output-dir)")
    if "run" not in meta:
        return [f"{where} was written by an older fvfunc: its run settings cannot be compared with this run's"]
    diffs = differences(meta, now, roles_needed)
    allowed = [(f, d) for f, d in diffs if "all" in allow or f in allow]
    refused = [(f, d) for f, d in diffs if (f, d) not in allowed]
    if refused:
        listing = "; ".join(f"{f}: {d}" for f, d in refused)
        names = " ".join(f for f, _ in refused)
        raise Refused(f"{where} was trained with other settings, and resuming would not continue that run: "
                      f"{listing}. Start afresh in another --training.output-dir, or accept the change with "
                      f"--training.allow-changes {names}")
    return [f"{f} changed on resume ({d}): allowed by training.allow_changes" for f, d in allowed]
