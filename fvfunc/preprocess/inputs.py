"""What `train.py preprocess` reads before any model loads: caption and prompt files, the output's settings.

Captions: FastVideo's `videos2caption.json` (a list of `{"path": ..., "cap": [...]}`; the first caption of
`cap` is used, where FastVideo draws one at random), a JSONL of `{"video": ..., "caption": ...}` objects,
or a CSV with a `video,caption` header (`path` / `cap` are accepted as the column names too). Paths are
relative to `--videos`. A sample's id is its path without the suffix (`sub/clip`), unique per file.
Prompts (the text-only schema): a .txt file of one prompt a line (blank lines skipped), or a JSON list of
strings or of objects with a `caption`, `cap` or `prompt`; a prompt's id is `text_` and a hash of it, so
an edited or reordered prompt file resumes by content.

Everything here is stdlib, so checking a command line costs no torch import.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import NamedTuple

from fvfunc.config_file import ConfigError

log = logging.getLogger("fvfunc")

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SETTINGS_FILE = "preprocess.json"
"""The output folder's record of the settings its rows were made with; a rerun must match it."""
NEGATIVE_FILE = "negative_prompt.safetensors"
"""Where `--negative-prompt` writes its embedding (read by `--method.negative-prompt-embedding`)."""


class Item(NamedTuple):
    """One sample to make: its id, its file (relative to --videos; "" for a prompt), caption, media."""

    id: str
    file: str
    caption: str
    media_type: str
    """"video", "image" (a one-frame clip) or "text" (a prompt of the text-only schema)."""


def _media(file: str) -> str:
    return "image" if Path(file).suffix.lower() in IMAGE_SUFFIXES else "video"


def _entry(obj, where: str, file_keys=("path", "video"), cap_keys=("cap", "caption")) -> tuple[str, str]:
    """(file, caption) of one JSON object, or a ValueError naming `where`."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object with {file_keys[0]!r} and {cap_keys[0]!r}, got "
                         f"{type(obj).__name__}")
    file = next((obj[k] for k in file_keys if k in obj), None)
    cap = next((obj[k] for k in cap_keys if k in obj), None)
    if not isinstance(file, str) or not file:
        raise ValueError(f"{where}: no video path ({' or '.join(map(repr, file_keys))}, a non-empty string)")
    if isinstance(cap, list):  # FastVideo's "cap" is a list of captions of the clip
        cap = cap[0] if cap else None
    if not isinstance(cap, str):
        raise ValueError(f"{where}: no caption ({' or '.join(map(repr, cap_keys))}, a string or a non-empty "
                         "list of strings)")
    return file, cap


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None


def _parse_json(raw: str, path: Path):
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def read_captions(path) -> list[Item]:
    """The items of a caption file, in its order. ValueError naming the file and the entry or line."""
    path = Path(path)
    raw = _read_text(path)
    suffix, pairs = path.suffix.lower(), []
    if suffix == ".json":
        entries = _parse_json(raw, path)
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a JSON list of {{\"path\": ..., \"cap\": [...]}} (FastVideo's "
                             f"videos2caption.json), got {type(entries).__name__}")
        pairs = [(_entry(e, f"{path}: entry {i}"), f"entry {i}") for i, e in enumerate(entries)]
    elif suffix == ".jsonl":
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n}: invalid JSON ({e})") from None
                pairs.append((_entry(obj, f"{path}: line {n}", ("video", "path"), ("caption", "cap")), f"line {n}"))
    elif suffix == ".csv":
        reader = csv.reader(raw.splitlines())
        header = [h.strip().lower() for h in next(reader, [])]
        col = {name: next((header.index(k) for k in keys if k in header), None)
               for name, keys in (("video", ("video", "path")), ("caption", ("caption", "cap")))}
        if None in col.values():
            raise ValueError(f"{path}: line 1: expected a header with the columns video,caption; got {header}")
        for n, row in enumerate(reader, 2):
            if not any(c.strip() for c in row):
                continue
            if len(row) < len(header):
                raise ValueError(f"{path}: line {n}: {len(row)} columns, the header has {len(header)} (a caption "
                                 "with commas needs quotes)")
            if not row[col["video"]].strip():
                raise ValueError(f"{path}: line {n}: empty video path")
            pairs.append(((row[col["video"]].strip(), row[col["caption"]]), f"line {n}"))
    else:
        raise ValueError(f"{path}: unknown caption file type {suffix or '(none)'}: expected .json (FastVideo's "
                         "videos2caption.json), .jsonl or .csv")
    items, seen = [], {}
    for (file, cap), where in pairs:
        file = Path(file).as_posix()
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise ValueError(f"{path}: {where}: {file!r} must be a path inside the videos folder")
        sid = str(Path(file).with_suffix("").as_posix())
        if sid in seen:
            raise ValueError(f"{path}: {where}: {file!r} has the id {sid!r} of {seen[sid]}; each clip once")
        seen[sid] = where
        items.append(Item(sid, file, cap, _media(file)))
    if not items:
        raise ValueError(f"{path}: no entries")
    return items


def prompt_id(prompt: str) -> str:
    return "text_" + hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


def read_prompts(path) -> list[Item]:
    """The prompts of a .txt or .json file as text-only items (a repeated prompt once)."""
    path = Path(path)
    raw = _read_text(path)
    if path.suffix.lower() == ".json":
        entries = _parse_json(raw, path)
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a JSON list of prompts, got {type(entries).__name__}")
        prompts = []
        for i, e in enumerate(entries):
            p = e if isinstance(e, str) else next((e[k] for k in ("caption", "cap", "prompt") if k in e), None) \
                if isinstance(e, dict) else None
            p = p[0] if isinstance(p, list) and p else p
            if not isinstance(p, str):
                raise ValueError(f"{path}: entry {i}: expected a string or an object with \"caption\", \"cap\" or "
                                 "\"prompt\"")
            prompts.append(p)
    else:
        prompts = [line for line in raw.splitlines() if line.strip()]
    items = list({prompt_id(p): Item(prompt_id(p), "", p, "text") for p in prompts}.values())
    if len(items) < len(prompts):
        log.warning("%s: %d repeated prompts written once", path, len(prompts) - len(items))
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items


def shard(items: list[Item], rank: int, world: int) -> list[Item]:
    """Rank `rank`'s items of `world`: every world-th from its rank on, so the ranks together hold each item
    exactly once and their shares differ by at most one. Split the whole list, then drop the finished ids:
    ranks that start at different moments see different finished files, but always the same split."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    return items[rank::world]


# ------------------------------------------------------------------------------- model folder facts


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"model: {path}: unreadable ({e})") from None


def vae_compression(model) -> tuple[int, int]:
    """(frames, pixels) one latent holds, from the layout in vae/config.json (diffusers' AutoencoderKLWan:
    a 2x spatial downsampling a stage, 2x in time where temperal_downsample says, and the Wan2.2 VAE's
    patchify of patch_size pixels before them)."""
    c = _json(Path(model) / "vae" / "config.json")
    down = c.get("temperal_downsample", [False, True, True])
    return 2 ** sum(bool(d) for d in down), 2 ** len(down) * int(c.get("patch_size") or 1)


def _check_model(cfg, need_vae: bool) -> None:
    model = Path(cfg.model)
    _need(bool(cfg.model), "model: give the pipeline folder whose vae/, text_encoder/ and tokenizer/ encode the "
          "data (--model DIR)")
    _need(model.is_dir(), f"model: {model} is not a folder")
    if (model / "model_index.json").is_file():
        _json(model / "model_index.json")  # readable
    transformer = _json(model / "transformer" / "config.json") if (model / "transformer" / "config.json").is_file() \
        else {}
    clip = transformer.get("image_dim") is not None and cfg.image_condition  # Wan2.1 I2V / FLF2V: CLIP tokens too
    parts = (("vae",) if need_vae else ()) + ("text_encoder", "tokenizer") + (
        ("image_encoder", "image_processor") if clip and need_vae else ())
    missing = [d for d in parts if not (model / d).is_dir()]
    _need(not missing, f"model: {model} has no {' and no '.join(f'{d}/' for d in missing)}")
    if need_vae:
        vae = _json(model / "vae" / "config.json")
        _need(vae.get("_class_name", "AutoencoderKLWan") == "AutoencoderKLWan", f"model: {model}/vae is a "
              f"{vae.get('_class_name')}; fvfunc encodes with diffusers' AutoencoderKLWan (Wan2.1's or Wan2.2's)")
        z_dim, out = vae.get("z_dim", 16), transformer.get("out_channels")
        _need(out is None or z_dim == out, f"model: {model}/vae makes latents of {z_dim} channels, its transformer "
              f"predicts {out}")


def _first_and_last(cfg) -> bool:
    """Whether the model's image condition is of a clip's first and last frames (Wan2.1 FLF2V: its
    transformer's pos_embed_seq_len), read from the config alone (no torch before the checks pass)."""
    t = Path(cfg.model) / "transformer" / "config.json"
    return cfg.image_condition and t.is_file() and _json(t).get("pos_embed_seq_len") is not None


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ------------------------------------------------------------------------------------- settings


def settings(cfg) -> dict:
    """What the output's rows depend on; a rerun into the same folder must give the same."""
    common = {"model": str(Path(cfg.model).resolve()), "dtype": cfg.dtype, "precision": cfg.precision}
    if cfg.prompts:
        return {"schema": "text_only", **common}
    return {"schema": "t2v", **common, "height": cfg.height, "width": cfg.width, "num_frames": cfg.num_frames,
            "fps": cfg.fps, "vae_tiling": cfg.vae_tiling, **({} if cfg.image_condition else {"image_condition": False})}


def check_output(cfg) -> None:
    """The output folder holds no rows made with other settings (its preprocess.json)."""
    out = Path(cfg.output)
    _need(not out.is_file(), f"output: {out} is a file; give a folder")
    recorded = out / SETTINGS_FILE
    if not recorded.is_file():
        _need(not any(out.rglob("*.parquet")) if out.is_dir() else True, f"output: {out} holds parquet files that "
              f"train.py preprocess did not write (no {SETTINGS_FILE}); give a new --output")
        return
    try:
        old = json.loads(recorded.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"output: {recorded}: unreadable ({e}); remove it or give a new --output") from None
    new = settings(cfg)
    diff = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)]
    _need(not diff, f"output: {out} holds rows made with other settings ({'; '.join(diff)}); give a new --output "
          "(or the same settings to continue it)")


def check(cfg) -> None:
    """Refuse a preprocess run that cannot work, before any model loads: one ConfigError naming the field
    (and for a caption file, the entry or line)."""
    _need(bool(cfg.videos) == bool(cfg.captions), "videos: give --videos DIR and --captions FILE together "
          "(the clips and their captions)")
    _need(not (cfg.videos and cfg.prompts), "prompts: give either clips (--videos, --captions: the t2v schema) or "
          "--prompts FILE (the text-only schema), not both; one output folder holds one schema")
    _need(bool(cfg.videos or cfg.prompts or cfg.negative_prompt is not None), "nothing to do: give --videos DIR "
          "--captions FILE, --prompts FILE or --negative-prompt TEXT")
    _need(bool(cfg.output), "output: give the folder to write (--output DIR)")
    _check_model(cfg, need_vae=bool(cfg.videos))
    _need(cfg.rows_per_group >= 1, f"rows_per_group must be >= 1, got {cfg.rows_per_group}")
    _need(cfg.file_mb > 0, f"file_mb must be > 0, got {cfg.file_mb:g}")
    _need(cfg.file_rows >= 0, f"file_rows must be >= 0 (0: no limit), got {cfg.file_rows}")
    _need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device) is not None,
          f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.videos:
        videos, captions = Path(cfg.videos), Path(cfg.captions)
        _need(videos.is_dir(), f"videos: {videos} is not a folder")
        _need(captions.is_file(), f"captions: {captions} is not a file")
        try:
            items = read_captions(captions)
        except ValueError as e:
            raise ConfigError(f"captions: {e}") from None
        _need(any((videos / it.file).is_file() for it in items), f"videos: none of the {len(items)} files named "
              f"in {captions} is in {videos} (the paths are relative to --videos)")
        temporal, spatial = vae_compression(cfg.model)
        patch = _json(Path(cfg.model) / "transformer" / "config.json").get("patch_size", [1, 1, 1]) \
            if (Path(cfg.model) / "transformer" / "config.json").is_file() else [1, 1, 1]
        unit = spatial * int(patch[-1])
        for name in ("height", "width"):
            value = getattr(cfg, name)
            _need(value >= unit and value % unit == 0, f"{name} must be a positive multiple of {unit} (the VAE's "
                  f"{spatial} pixels a latent times the transformer's patch {patch[-1]}), got {value}")
        _need(cfg.num_frames >= 1 and (cfg.num_frames - 1) % temporal == 0, f"num_frames must be 1 + a multiple "
              f"of {temporal} (the VAE's frames a latent), e.g. {1 + 20 * temporal}; got {cfg.num_frames}")
        _need(cfg.num_frames > 1 or not _first_and_last(cfg), f"num_frames: {cfg.model} is a first-and-last-frame "
              f"model (FLF2V): its clips need a first and a last frame, e.g. {1 + 20 * temporal}; got 1")
        _need(cfg.fps >= 0, f"fps must be > 0 (or 0: the clip's own rate), got {cfg.fps:g}")
    if cfg.prompts:
        _need(Path(cfg.prompts).is_file(), f"prompts: {cfg.prompts} is not a file")
        try:
            read_prompts(cfg.prompts)
        except ValueError as e:
            raise ConfigError(f"prompts: {e}") from None
    if cfg.videos or cfg.prompts:
        check_output(cfg)
