"""Prompts to umT5 embeddings with a pipeline folder's own text encoder, as diffusers' WanPipeline does.

diffusers (`WanPipeline._get_t5_prompt_embeds`, what `__call__` runs with max_sequence_length 512):
each prompt is cleaned (ftfy.fix_text when ftfy is installed, HTML unescaped twice, runs of
whitespace made one space, stripped), tokenised with padding to max_length, truncation and the
attention mask, encoded to `last_hidden_state` with that mask, and each row is cut to its own token
count (eos included) and zero-padded back to max_length. The zeros matter: Wan's cross-attention
attends to all max_length positions without a mask, so the padding must be exactly zero, not the
encoder's output at padded positions.

A prompt longer than max_length tokens is cropped to its first max_length - 1 tokens and the eos
(the tokenizer's truncation, as diffusers and FastVideo do); `encode` logs which prompt and how long.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # torch and transformers load in the functions: the CLI checks a run with find_encoder alone
    import torch

log = logging.getLogger("fvfunc")

MAX_LENGTH = 512
"""Wan2.1's text length: every embedding is padded (or cropped) to 512 tokens."""


class Encoder(NamedTuple):
    """A pipeline folder's tokenizer and umT5 encoder, ready for `encode`."""

    tokenizer: Any
    """A transformers tokenizer (AutoTokenizer of folder/tokenizer)."""
    model: Any
    """transformers' UMT5EncoderModel of folder/text_encoder, in eval mode."""
    device: torch.device
    folder: Path


def has_encoder(folder) -> bool:
    """Whether `folder` holds a text encoder and its tokenizer (text_encoder/ and tokenizer/)."""
    return (Path(folder) / "text_encoder").is_dir() and (Path(folder) / "tokenizer").is_dir()


def find_encoder(model) -> Path | None:
    """The pipeline folder holding the text encoder, or None, given the pipeline or its transformer/
    folder (as `wan.find_vae` finds the VAE) or a run's checkpoint folder (its student's folder)."""
    meta = Path(model) / "meta.json"
    folder = Path(json.loads(meta.read_text())["meta"]["roles"]["student"]) if meta.is_file() else Path(model)
    return next((f for f in (folder, folder.parent) if has_encoder(f)), None)


def load_encoder(folder, device="cpu", dtype: torch.dtype | None = None) -> Encoder:
    """The tokenizer and umT5 of a diffusers pipeline folder, in `dtype` (None: float32). Raises
    ValueError naming the folder and the missing subfolder when it has no text_encoder/ or tokenizer/."""
    import torch
    from transformers import AutoTokenizer, UMT5EncoderModel

    folder = Path(folder)
    missing = [name for name in ("text_encoder", "tokenizer") if not (folder / name).is_dir()]
    if missing:
        raise ValueError(f"{folder} has no {' and no '.join(f'{m}/' for m in missing)}: prompts given as text "
                         "need a pipeline folder with its umT5 text encoder and tokenizer (or give embeddings)")
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    model = UMT5EncoderModel.from_pretrained(folder / "text_encoder").to(device=device, dtype=dtype or torch.float32)
    return Encoder(tokenizer, model.eval(), torch.device(device), folder)


def clean(prompt: str) -> str:
    """diffusers' Wan `prompt_clean`: ftfy.fix_text (only when ftfy is installed, as there), HTML
    unescaped twice, whitespace runs to one space, stripped."""
    try:
        import ftfy
    except ImportError:  # diffusers skips it too; only non-ASCII text (mojibake, curly quotes) could differ
        ftfy = None
    if ftfy is not None:
        prompt = ftfy.fix_text(prompt)
    import regex  # diffusers' `\s` (Unicode White_Space), a dependency of diffusers and transformers

    return regex.sub(r"\s+", " ", html.unescape(html.unescape(prompt)).strip()).strip()


def encode(encoder: Encoder, prompts: list[str], max_length: int = MAX_LENGTH) -> torch.Tensor:
    """[B, max_length, D] float32 embeddings of `prompts`, each row zero past its own token count."""
    import torch

    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got one str")
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    prompts = [clean(p) for p in prompts]
    for i, ids in enumerate(encoder.tokenizer(prompts, add_special_tokens=True)["input_ids"]):
        if len(ids) > max_length:
            log.warning("prompt %d has %d tokens: cropped to the first %d (max_length)", i, len(ids), max_length)
    tokens = _tokens(encoder, prompts, max_length)
    ids, mask = tokens["input_ids"].to(encoder.device), tokens["attention_mask"].to(encoder.device)
    with torch.no_grad():
        hidden = encoder.model(ids, mask).last_hidden_state
    keep = torch.arange(max_length, device=hidden.device)[None, :] < mask.gt(0).sum(dim=1)[:, None]
    return torch.where(keep[..., None], hidden, hidden.new_zeros(())).float()


def _tokens(encoder: Encoder, cleaned: list[str], max_length: int):
    return encoder.tokenizer(cleaned, padding="max_length", max_length=max_length, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")


def encode_trimmed(encoder: Encoder, prompts: list[str], max_length: int = MAX_LENGTH) -> list[torch.Tensor]:
    """Each prompt's float32 embedding [L_i, D] cut to its own L_i tokens (eos included), as FastVideo's
    preprocessing stores it: `encode`'s rows without their zero padding."""
    emb = encode(encoder, prompts, max_length)
    counts = _tokens(encoder, [clean(p) for p in prompts], max_length)["attention_mask"].gt(0).sum(1).tolist()
    return [e[:n].clone() for e, n in zip(emb, counts, strict=True)]


def encode_prompts(folder, prompts: list[str], max_length: int = MAX_LENGTH, device="cpu") -> torch.Tensor:
    """`encode` with the encoder of `folder`, loaded for this call (fp32)."""
    return encode(load_encoder(folder, device), prompts, max_length)


def read_tensor(path, keys: tuple[str, ...] = ()) -> torch.Tensor:
    """The tensor of a .safetensors file: its only tensor, or the first of `keys` it holds. (No .pt:
    fvfunc never unpickles; `safetensors.torch.save_file({"noise": x}, path)` writes one.)"""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: expected a .safetensors file (fvfunc reads no pickles; save the tensor with "
                         "safetensors.torch.save_file)")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    tensors = load_file(path)
    if len(tensors) == 1:
        return next(iter(tensors.values())).clone()
    key = next((k for k in keys if k in tensors), None)
    if key is None:
        raise ValueError(f"{path} holds {sorted(tensors)}; expected one tensor or one named {' or '.join(keys)}")
    return tensors[key].clone()


def pad_embeddings(t: torch.Tensor, where: str, text_len: int) -> torch.Tensor:
    """[N, text_len, D] float32 from a [L, D] or [N, L, D] embedding, zero-padded or cropped to text_len."""
    import torch

    t = t[None] if t.ndim == 2 else t
    if t.ndim != 3:
        raise ValueError(f"{where}: expected an embedding [L, D] or [N, L, D], got shape {list(t.shape)}")
    t = t[:, :text_len].float()
    return torch.cat([t, t.new_zeros(t.shape[0], text_len - t.shape[1], t.shape[2])], dim=1)


def negative_embedding(prompt: str, embedding_file: str, folder, max_length: int, field: str,
                       device="cpu") -> torch.Tensor | None:
    """The negative prompt's embedding [1, max_length, D] for classifier-free guidance's uncond: the
    tensor of `embedding_file` if given, else `prompt` encoded with the umT5 of `folder` (a pipeline, or
    its transformer/ folder; loaded for this call and freed), else None, which callers read as zero
    text (after one warning naming `field`). Errors name `field` ("method.negative_prompt")."""
    if embedding_file:
        emb = pad_embeddings(read_tensor(embedding_file, ("text", "negative_prompt_embeds")),
                             f"{field}_embedding", max_length)
        if emb.shape[0] != 1:
            raise ValueError(f"{field}_embedding: {embedding_file} holds {emb.shape[0]} embeddings; give one")
        return emb.to(device)
    if prompt:
        where = find_encoder(folder) if folder else None
        if where is None:
            raise ValueError(f"{field}: {folder or 'the model'} has no text_encoder/ and tokenizer/ to encode it "
                             f"with; give {field}_embedding (a .safetensors file) instead")
        return encode(load_encoder(where, device), [prompt], max_length)
    log.warning("%s: none given (nor %s_embedding): classifier-free guidance uses zero text as its uncond",
                field, field)
    return None
