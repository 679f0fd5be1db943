"""`train.py preprocess`, the run: encode every unfinished item of this rank and write FastVideo parquet.

What a row holds is what FastVideo's preprocessing stores (its `pyarrow_schema_t2v` /
`pyarrow_schema_text_only`, fvfunc/data/parquet.py): the VAE's posterior mean of the [-1, 1] pixels,
raw (training normalises it with the VAE's latents_mean / latents_std, as for FastVideo's files), and
the umT5 embedding cut to the prompt's own tokens (fvfunc/text.py, as WanPipeline encodes). An
image-to-video pipeline's clips also get the i2v columns, as the family's image encoder makes them
(the condition WanImageToVideoPipeline gives the model): `first_frame_latent`, normalised, of the first
frame followed by zero frames (Wan2.1 I2V, Wan2.2 I2V-A14B; FLF2V: the last frame last) or of the first
frame alone (Wan2.2 TI2V, whose Wan2.2 VAE encodes the clip too), and with a CLIP image encoder
`clip_feature`, the first frame's tokens (FLF2V: then the last frame's; the penultimate hidden state, as
diffusers' pipeline; FastVideo's preprocessing keeps its own CLIP encoder's last state). The
metadata follows FastVideo's record: `num_frames` is the latent's frame count, `fps` and `duration_sec`
the source clip's, `width` / `height` the encoded size; `file_name` is the path inside --videos.

Files: `data-r<rank>-<n>.parquet`, each closed once it holds file_mb of tensors (or file_rows rows),
written under a temporary name and renamed when complete, so a killed run leaves only whole files and
a rerun skips every id they hold. Each rank takes every world-th item of the caption file
(`inputs.shard`) and skips the finished ones; the ranks never talk to each other. A clip that cannot
be decoded or is too short is listed in `skipped.jsonl` (`skipped-r<rank>.jsonl` under torchrun) and
the run goes on.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm import tqdm

from fvfunc import text
from fvfunc.data import ids_in, write_atomic
from fvfunc.preprocess import inputs
from fvfunc.preprocess.inputs import Item
from fvfunc.preprocess.media import ClipError, read_clip, resize_crop

log = logging.getLogger("fvfunc")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TEXT_BATCH = 16
"""Prompts encoded together in the text-only schema."""
TILE_ABOVE = 480 * 832
"""vae_tiling "auto" tiles frames of more pixels than Wan2.1's 480x832."""


class Encoders(NamedTuple):
    """The pipeline's VAE (None for text only) and umT5 + tokenizer, on one device in one dtype; and for an
    image-to-video model, its image condition encoder (the family's `image_encoder`, fp32)."""

    vae: Any
    text: text.Encoder
    image: Any = None


class Summary(NamedTuple):
    written: int
    skipped: int
    done_before: int
    files: list[Path]


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load_encoders(model, device, precision: str, vae: bool, tiling: bool = False,
                  image_condition: bool = True) -> Encoders:
    """The VAE (diffusers AutoencoderKLWan, eval; tiled encoding when `tiling`) and umT5 of `model`; with
    the VAE, for an image-to-video model (and `image_condition`) also its image condition encoder."""
    from fvfunc.models import wan

    dtype = DTYPES[precision]
    module, image = None, None
    if vae:
        from diffusers import AutoencoderKLWan

        module = AutoencoderKLWan.from_pretrained(Path(model) / "vae", torch_dtype=dtype).to(device).eval()
        if tiling:
            module.enable_tiling()
        model_cfg = wan.load_config(model) if (Path(model) / "transformer").is_dir() else None
        if image_condition and model_cfg is not None and wan.conditions(model_cfg):
            image = wan.FAMILY.image_encoder(model, model_cfg, device)
    return Encoders(module, text.load_encoder(model, device, dtype), image)


def encode_video(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's posterior mean [C, T, h, w] (float32) of [-1, 1] pixels [3, F, H, W], as FastVideo keeps."""
    p = next(vae.parameters())
    with torch.no_grad():
        return vae.encode(pixels[None].to(p.device, p.dtype)).latent_dist.mean[0].float()


def _prefetch(load: Callable[[Item], Any], items: Iterable[Item], depth: int = 2) -> Iterator[tuple[Item, Any]]:
    """(item, load(item) or its ClipError), loading the next `depth` items in a thread while the caller
    encodes (decoding runs in ffmpeg, resizing in torch: both release the GIL)."""
    def safe(item):
        try:
            return load(item)
        except ClipError as e:
            return e

    with ThreadPoolExecutor(1) as pool:
        it, queue = iter(items), deque()
        for item in itertools.islice(it, depth):
            queue.append((item, pool.submit(safe, item)))
        while queue:
            item, future = queue.popleft()
            nxt = next(it, None)
            if nxt is not None:
                queue.append((nxt, pool.submit(safe, nxt)))
            yield item, future.result()


def video_rows(items: Iterable[Item], enc: Encoders, cfg, skip: Callable[[Item, str], None]) -> Iterator[dict]:
    """One t2v row per decodable clip of `items` (the others go to `skip(item, reason)`)."""
    dtype = DTYPES[cfg.dtype]

    def load(item):
        clip = read_clip(Path(cfg.videos) / item.file, 1 if item.media_type == "image" else cfg.num_frames, cfg.fps)
        return clip, resize_crop(clip.frames, cfg.height, cfg.width)

    for item, got in _prefetch(load, items):
        if isinstance(got, ClipError):
            skip(item, str(got))
            continue
        clip, pixels = got
        latent = encode_video(enc.vae, pixels)
        emb = text.encode_trimmed(enc.text, [item.caption])[0]
        # an image-to-video model's condition of the clip's first frame (FastVideo's i2v columns)
        cond = {} if enc.image is None else {k: v[0].to(dtype) for k, v in enc.image(pixels[None]).items()}
        yield dict(id=item.id, latent=latent.to(dtype), text_embedding=emb.to(dtype), **cond, file_name=item.file,
                   caption=item.caption, media_type=item.media_type, width=cfg.width, height=cfg.height,
                   num_frames=latent.shape[1], duration_sec=clip.duration, fps=clip.fps)


def text_rows(items: Iterable[Item], enc: Encoders, cfg) -> Iterator[dict]:
    """One text-only row per prompt, encoded TEXT_BATCH at a time."""
    dtype, it = DTYPES[cfg.dtype], iter(items)
    while batch := list(itertools.islice(it, TEXT_BATCH)):
        for item, emb in zip(batch, text.encode_trimmed(enc.text, [i.caption for i in batch]), strict=True):
            yield dict(id=item.id, text_embedding=emb.to(dtype), caption=item.caption)


def _nbytes(row: dict) -> int:
    return sum(v.numel() * v.element_size() for v in row.values() if isinstance(v, torch.Tensor))


def _next_index(out: Path, prefix: str) -> int:
    taken = [p.stem.rsplit("-", 1)[1] for p in out.glob(f"{prefix}-*.parquet")]
    return max((int(n) for n in taken if n.isdigit()), default=-1) + 1


def write_files(rows: Iterable[dict], out: Path, prefix: str, file_bytes: int, file_rows: int = 0,
                rows_per_group: int = 1, on_row: Callable[[dict], None] | None = None) -> list[Path]:
    """Rows into `out/<prefix>-<n>.parquet` files of about file_bytes of tensors (or file_rows rows) each,
    each written atomically; rows are encoded lazily, one row group at a time, so memory stays one group."""
    it, files = iter(rows), []

    def one_file(first):
        row, n, size = first, 0, 0
        while row is not None:
            yield row
            if on_row is not None:
                on_row(row)
            n, size = n + 1, size + _nbytes(row)
            if size >= file_bytes or n == file_rows:
                return
            row = next(it, None)

    while (first := next(it, None)) is not None:
        path = out / f"{prefix}-{_next_index(out, prefix):05d}.parquet"
        files.append(write_atomic(path, one_file(first), rows_per_group=rows_per_group))
    return files


def write_negative(enc: Encoders, prompt: str, path: Path, dtype: str) -> Path:
    """The negative prompt's trimmed embedding [L, D] as `negative_prompt_embeds` of a safetensors file
    (the prompt in its metadata): what `--method.negative-prompt-embedding` and `sample` read."""
    from safetensors.torch import save_file

    emb = text.encode_trimmed(enc.text, [prompt])[0].to(DTYPES[dtype]).contiguous()
    tmp = path.with_name(f".{path.name}.partial")
    save_file({"negative_prompt_embeds": emb}, tmp, metadata={"prompt": prompt})
    tmp.replace(path)
    return path


def _write_settings(cfg, out: Path, rank: int) -> None:
    path = out / inputs.SETTINGS_FILE
    if not path.is_file():  # every rank writes the same content: no rank waits for another
        tmp = out / f".{inputs.SETTINGS_FILE}.r{rank}.partial"
        tmp.write_text(json.dumps(inputs.settings(cfg), indent=2) + "\n")
        tmp.replace(path)


def run(cfg, rank: int | None = None, world: int | None = None, encoders: Encoders | None = None) -> Summary:
    """Preprocess this rank's share of the unfinished items of a checked `cfg` (configs.PreprocessRun).
    rank / world default to torchrun's RANK / WORLD_SIZE; `encoders` to the model folder's, loaded here."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    items = inputs.read_prompts(cfg.prompts) if cfg.prompts else inputs.read_captions(cfg.captions) if cfg.videos \
        else []
    if items:
        _write_settings(cfg, out, rank)
    done = ids_in(out) if items else set()
    mine = [it for it in inputs.shard(items, rank, world) if it.id not in done]
    prefix = f"data-r{rank}"
    for stale in out.glob(f".{prefix}-*.parquet.partial"):  # this rank's file cut short by a killed run
        stale.unlink()
    device = resolve_device(cfg.device)
    tiling = cfg.vae_tiling == "on" or (cfg.vae_tiling == "auto" and cfg.height * cfg.width > TILE_ABOVE)
    if encoders is None and (mine or (cfg.negative_prompt is not None and rank == 0)):
        encoders = load_encoders(cfg.model, device, cfg.precision, vae=bool(cfg.videos), tiling=tiling,
                                 image_condition=cfg.image_condition)
    if cfg.negative_prompt is not None and rank == 0:
        log.info("negative prompt embedding: %s", write_negative(encoders, cfg.negative_prompt,
                                                                 out / inputs.NEGATIVE_FILE, cfg.dtype))
    if not items:
        return Summary(0, 0, 0, [])
    report = out / ("skipped.jsonl" if world == 1 else f"skipped-r{rank}.jsonl")
    if report.exists():
        report.unlink()  # this run's skips only: a rerun tries the skipped clips again
    unit = "prompt" if cfg.prompts else "clip"
    bar = tqdm(total=len(mine), desc=f"preprocess r{rank}" if world > 1 else "preprocess", unit=unit,
               disable=rank != 0, dynamic_ncols=True, file=sys.stderr)
    written, skipped = [], []

    def skip(item: Item, reason: str) -> None:  # rewritten whole each time: a killed run's report is complete
        skipped.append({"id": item.id, "file": item.file, "reason": reason})
        log.warning("skipped %s: %s", item.file, reason)
        report.write_text("".join(json.dumps(s) + "\n" for s in skipped))
        bar.update(1)

    rows = text_rows(mine, encoders, cfg) if cfg.prompts else video_rows(mine, encoders, cfg, skip)
    try:
        files = write_files(rows, out, prefix, int(cfg.file_mb * 2**20), cfg.file_rows, cfg.rows_per_group,
                            on_row=lambda row: (written.append(row["id"]), bar.update(1)))
    finally:
        bar.close()
    log.info("%s%d %ss written in %d files to %s; %d skipped%s; %d already there", f"rank {rank}: " if world > 1
             else "", len(written), unit, len(files), out, len(skipped), f" (listed in {report})" if skipped else "",
             len(done))
    return Summary(len(written), len(skipped), len(done), files)


def main(cfg) -> int:
    """The command: 0 done (clips skipped or not), 1 a model that does not load, 130 interrupted."""
    try:
        run(cfg)
    except KeyboardInterrupt:
        print(f"interrupted: the files in {cfg.output} are whole; the same command continues", file=sys.stderr)
        return 130
    except (OSError, ValueError) as e:  # a model folder that does not load, a disk that is full
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
