"""The trained student as a diffusers pipeline folder (`output_dir/export`), written atomically.

`export` writes a folder that the source's pipeline class (`diffusers.WanPipeline.from_pretrained`,
`WanImageToVideoPipeline.from_pretrained` for an image-to-video source) loads as is: the source
pipeline's model_index.json with `_diffusers_version` set to the diffusers installed here, the trained
transformer in transformer/, and the source pipeline's other components (the family's `components`;
Wan: vae, text_encoder, tokenizer, scheduler; and every other one its model_index.json names, e.g.
Wan2.1 I2V's image_encoder and image_processor) carried over. Carrying
hard-links the large files when source and export share a filesystem and copies them otherwise; the
small ones (the configs a user may edit in place) are always copied, and nothing is a symlink, so
editing or deleting the source later never touches the export.

diffusers resolves each component from model_index.json's `name: [library, class]` entries and loads
it from the subfolder of the same name, so the carried folders keep their names and the index stays
the source's.

A student whose folder is a bare transformer (no model_index.json around it) has no pipeline to carry:
the export is transformer/ alone, which the model class's from_pretrained loads and a pipeline takes
as `transformer=`; the log says so.

A LoRA student (fvfunc/lora.py) exports its base with the adapters merged in as the transformer, and
its adapters beside it in `lora/`: `pytorch_lora_weights.safetensors` in diffusers' layout (what
`WanPipeline.load_lora_weights(export/lora)` reads) and `lora_comfyui.safetensors` with Wan's original
keys (ComfyUI, kohya-style `lora_down` / `lora_up` / `alpha`).

The folder is built under a hidden name beside its destination, fsynced, and only then renamed into
place (swapping out an older export), so a crash leaves the old export or the new one, never a half
folder under the final name.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch

import configs
from fvfunc import checkpoint, experts, lora, roles
from fvfunc.models import Family, family
from fvfunc.ops.linear import LORA_A
from fvfunc.roles import DTYPES

log = logging.getLogger("fvfunc")

TRANSFORMER = "transformer"
"""The subfolder of the trained model, as diffusers' pipelines name it."""
LINK_MIN_BYTES = 1 << 20
"""Files at least this big are hard-linked (weights); smaller ones (configs, vocabularies) are copied."""


def dtypes(fam: Family, params: dict, source, dtype: str, variant: str = "") -> dict[str, torch.dtype]:
    """Each exported tensor's dtype: `dtype` for all, or for 'source' the dtype the source folder stores
    it in (the params' own dtype when the family cannot tell)."""
    if dtype != "source":
        return {k: DTYPES[dtype] for k in params}
    stored = fam.stored_dtypes(source, variant) if fam.stored_dtypes is not None else {}
    return {k: stored.get(k, v.dtype) for k, v in params.items()}


def carry(src: Path, dst: Path, link_min_bytes: int = LINK_MIN_BYTES) -> None:
    """Recreate the folder tree `src` at `dst`: big files hard-linked (symlinks in src, as in a hub
    cache, followed to their target), else copied; never a link into src that a deletion breaks."""
    dst.mkdir(parents=True)
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if entry.is_dir():
            carry(entry, target, link_min_bytes)
            continue
        real = entry.resolve()
        if real.stat().st_size >= link_min_bytes:
            try:
                os.link(real, target)
                continue
            except OSError:  # another filesystem, or links not allowed: copy
                pass
        shutil.copyfile(real, target)


def _diffusers_version(fallback):
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return fallback


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for f in files:
            checkpoint.fsync(Path(root) / f)
        checkpoint.fsync(Path(root))


LORA = "lora"
"""The subfolder of a LoRA student's adapters."""


def components(fam: Family, index: dict) -> list[str]:
    """The folders an export carries over: the family's components and every other component the source's
    model_index.json names (a `name: [library, class]` entry; e.g. a Wan2.1 I2V pipeline's image_encoder
    and image_processor), the trained model's own folders excepted."""
    named = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
             and all(isinstance(x, str) for x in v) and k not in (TRANSFORMER, "transformer_2")]
    return list(dict.fromkeys([*fam.components, *named]))


def _write(tmp: Path, fam: Family, cfg, params: dict, pipeline: Path | None, link_min_bytes: int,
           pair: experts.Experts | None = None) -> None:
    if pair is None:
        fam.save(tmp / TRANSFORMER, cfg, params)
    else:  # each expert in its own folder, as the pipeline names them
        for (name, part), c in zip(experts.split(params, pair.names).items(), pair.configs, strict=True):
            fam.save(tmp / name, c, part)
    if pipeline is None:
        return
    index = json.loads((pipeline / "model_index.json").read_text())
    index["_diffusers_version"] = _diffusers_version(index.get("_diffusers_version"))
    if pair is None and isinstance(index.get("transformer_2"), list) and any(index["transformer_2"]):
        # one expert of a pair trained alone: the export is a one-model pipeline of it
        index.update(transformer_2=[None, None], boundary_ratio=None)
        log.warning("the student is one expert of the two-expert pipeline %s: the export is a one-model pipeline "
                    "(its model_index.json has no transformer_2)", pipeline)
    names = components(fam, index)
    for name in names:
        if (pipeline / name).is_dir():
            carry(pipeline / name, tmp / name, link_min_bytes)
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    absent = [n for n in names if not (pipeline / n).is_dir()]
    if absent:
        log.warning("the student's pipeline %s has no %s: the export lacks them too (pass them to the "
                    "pipeline's from_pretrained)", pipeline, ", ".join(absent))


def _write_lora(folder: Path, fam: Family, cfg, adapters: dict, scale: float, dtype: str) -> None:
    kind = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    lora.write_diffusers(folder / lora.DIFFUSERS_FILE, adapters, scale, kind)
    if fam.original_names is not None:
        lora.write_original(folder / lora.ORIGINAL_FILE, adapters, scale, fam.original_names(cfg), kind)


def export(dest, fam: Family, cfg, params: dict, source, dtype: str = "source", variant: str = "",
           link_min_bytes: int = LINK_MIN_BYTES, adapters: dict | None = None, lora_scale: float = 1.0,
           pair: experts.Experts | None = None) -> Path:
    """Write `params` (a model of `fam` with config `cfg`, trained from the folder `source`) as the
    pipeline folder `dest`, replacing any export there; tensors in `dtype` ('source', 'float32',
    'bfloat16'; `variant` is the source's weight variant, to read its dtypes). With `adapters` (a LoRA
    student's, of scale `lora_scale`), `params` is its base: the transformer is the merged model and
    the adapters are written to `dest/lora/` as well. With `pair` (fvfunc/experts.py), `params` are an
    expert pair's `<expert>/<param>` dict and `source` the pair's pipeline folder: each expert is written
    to its own folder (transformer/, transformer_2/), in its source folder's dtypes, a LoRA pair's
    adapters to `dest/lora/<expert>/`."""
    dest = Path(dest)
    pipeline = fam.pipeline(source)
    if pair is not None:
        if pipeline is None:
            raise ValueError(f"{source}: an expert pair is exported into its pipeline, and this folder has none")
        parts = experts.split(params, pair.names)
        ads = experts.split(adapters, pair.names) if adapters is not None else {}
        types = {}
        for n in pair.names:
            if adapters is not None:
                parts[n] = lora.merge(parts[n], ads[n], lora_scale)
            types.update({f"{n}{experts.SEP}{k}": v
                          for k, v in dtypes(fam, parts[n], Path(source) / n, dtype, variant).items()})
        params = experts.join(parts)
    else:
        if adapters is not None:
            params = lora.merge(params, adapters, lora_scale)
        types = dtypes(fam, params, source, dtype, variant)
    params = {k: v.to(types[k]) for k, v in params.items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    if tmp.exists():  # left behind by a killed export
        shutil.rmtree(tmp)
    _write(tmp, fam, cfg, params, pipeline, link_min_bytes, pair)
    if adapters is not None and pair is None:
        _write_lora(tmp / LORA, fam, cfg, adapters, lora_scale, dtype)
    elif adapters is not None:
        for (n, part), c in zip(experts.split(adapters, pair.names).items(), pair.configs, strict=True):
            _write_lora(tmp / LORA / n, fam, c, part, lora_scale, dtype)
    _fsync_tree(tmp)
    if dest.exists():
        checkpoint.swap_in(tmp, dest)
    else:
        os.rename(tmp, dest)
    checkpoint.fsync(dest.parent)
    if pipeline is None:
        log.info("the student's folder %s is a bare transformer (no model_index.json around it): %s holds "
                 "the transformer only (%s/); load it into a pipeline as its transformer", source, dest, TRANSFORMER)
    return dest


# ------------------------------------------------------------------------------- from a checkpoint


class Trained(NamedTuple):
    """A run checkpoint's student, as `export` takes it."""

    family: Family
    config: Any
    pair: experts.Experts | None
    params: dict
    """Its weights; a LoRA student's base (frozen LoRA files merged in, as the run had it)."""
    adapters: dict | None
    """A LoRA student's adapters (None: params are the whole student)."""
    lora_scale: float
    folder: Path
    """The folder the student was trained from (its pipeline's other components)."""
    meta: dict


def trained_student(ckpt, device="cpu", use_ema: bool = True, family_name: str = "wan") -> Trained:
    """The student of a run's checkpoint (its EMA when kept and `use_ema`), checked against the
    checkpoint's checksums, on its source folder's config; an expert pair's experts each."""
    trees, meta = checkpoint.load(ckpt)
    folder = Path(meta["roles"]["student"])
    fam = family(meta["config"]["roles"]["student"].get("family", family_name))
    ema = trees.get("student.ema")
    params = {k: v.to(device) for k, v in (ema if use_ema and ema is not None else trees["student"]).items()}
    found = fam.experts(folder)
    pair = None if found is None else experts.Experts(found[0], found[1],
                                                      tuple(fam.load_config(folder / n) for n in found[0]))
    mcfg = fam.load_config(folder)
    if not any(k.endswith(LORA_A) for k in params):
        return Trained(fam, mcfg, pair, params, None, 1.0, folder, meta)
    run, field = meta.get("run", {}), "roles.student."
    scale = lora.scale_of(run.get(field + "lora.rank", 1), run.get(field + "lora.alpha", 0.0))
    role = configs.RoleConfig(family=fam.name, path=str(folder), variant=run.get(field + "variant", ""),
                              lora=configs.LoraConfig(frozen=tuple(run.get(field + "lora.frozen", ()))))
    if pair is None:
        mcfg, base = roles.load_weights("student", role, fam, device)
    else:
        base = experts.join({n: roles.load_weights("student", role, fam, device, path=str(folder / n), expert=n)[1]
                             for n in pair.names})
    return Trained(fam, mcfg, pair, base, params, scale, folder, meta)


def export_checkpoint(ckpt, dest, use_ema: bool = True, dtype: str = "") -> Path:
    """`train.py export`: a run's checkpoint as the pipeline folder `dest`, as the run exports its last
    step (dtype '' is the run's training.export_dtype)."""
    t = trained_student(ckpt, "cpu", use_ema)
    student = t.meta["config"]["roles"]["student"]
    dtype = dtype or t.meta["config"].get("training", {}).get("export_dtype", "source")
    out = export(dest, t.family, t.config, t.params, t.folder, dtype, student.get("variant", ""), adapters=t.adapters,
                 lora_scale=t.lora_scale, pair=t.pair)
    log.info("exported the student of %s to %s", ckpt, out)
    return out
