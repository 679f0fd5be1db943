"""Low-rank adapters (LoRA, Hu et al. 2021) as a second, small params pytree.

A role trained as a LoRA holds two trees: its frozen **base** (the family's params, shared by every
role of the run that reads the same folder, variant, dtype and frozen LoRAs: fvfunc/roles.py) and its
**adapters**, `{"<linear>.lora_A.weight": A [r, in], "<linear>.lora_B.weight": B [out, r]}` in fp32.
The adapters are what the method sees as the role's params: the only leaves it differentiates,
optimizes, averages into an EMA and checkpoints. The forward is the family's own on
`combine(base, adapters, scale)`, whose linears (fvfunc/ops/linear.py) add `(x A^T) B^T` with the
scale alpha / r folded into B, so the gradients of A and B are the plain LoRA ones
(d/dA = scale B^T g x^T, d/dB = scale g (A x)^T) and no [out, in] weight gradient is ever made.

Files. `read` takes a LoRA in any of the layouts people exchange for Wan, telling them apart by key:
- diffusers / PEFT: `[transformer.]<linear>.lora_A.weight` / `.lora_B.weight` (diffusers' names; an
  optional `.alpha`; a PEFT folder's adapter_config.json gives lora_alpha, r, use_rslora);
- ComfyUI / the original Wan keys: `diffusion_model.<original name>.lora_down.weight` / `.lora_up.weight`
  / `.alpha` (original names from the family: `blocks.0.self_attn.q` for `blocks.0.attn1.to_q`);
- kohya / musubi-tuner: `lora_unet_<original name, dots as underscores>.lora_down.weight` / ... / `.alpha`.
Beside its pairs a file may hold full-tensor diffs (LightX2V's distillation LoRAs do): `.diff` of a
module's weight, `.diff_b` of its bias (diffusers' `lora_B.bias`), `.diff_m` of a block's modulation,
in original or diffusers names (`read_all`); a frozen merge adds them at the file's strength, as
ComfyUI's loader does, and `read` (adapters to continue training) refuses them.
A file without an alpha has scale 1 (diffusers' reading). `write_diffusers` writes the first layout
with the scale folded into B (no alpha needed; `WanPipeline.load_lora_weights` reads it), and
`write_original` the second with the alpha (ComfyUI's LoRA loader reads it).
"""

from __future__ import annotations

import fnmatch
import json
import math
import zlib
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fvfunc import random
from fvfunc.ops.linear import LORA_A, LORA_B

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
"""The file name `load_lora_weights(folder)` looks for."""
ORIGINAL_FILE = "lora_comfyui.safetensors"
"""The original-key (ComfyUI) file written beside it."""

Params = dict[str, torch.Tensor]


class LoraError(ValueError):
    """A LoRA setting or file that does not fit the model; the message names the field, file or key."""


class Pair(NamedTuple):
    """One linear's LoRA as a file holds it: delta W = scale * up @ down."""

    down: torch.Tensor
    """A [r, in]."""
    up: torch.Tensor
    """B [out, r]."""
    scale: float


def scale_of(rank: int, alpha: float) -> float:
    """alpha / rank; alpha 0 means alpha = rank (scale 1)."""
    return 1.0 if alpha == 0 else alpha / rank


# --------------------------------------------------------------------------------------- targets


def linears(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """{linear name (no `.weight`): (out, in)} of a model's param shapes: its 2-D weights."""
    return {k.removesuffix(".weight"): tuple(v) for k, v in shapes.items() if k.endswith(".weight") and len(v) == 2}


def matches(name: str, pattern: str) -> bool:
    """A target pattern names a linear by its whole name, by its trailing dotted part (`attn1.to_q`
    names it in every block) or by a glob (`blocks.1?.ffn.*`)."""
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def select(shapes: dict[str, tuple[int, ...]], targets, rank: int, field: str) -> list[str]:
    """The linears `targets` name, in the model's order; LoraError naming a pattern that matches no
    linear, or a layer narrower than the rank."""
    layers = linears(shapes)
    if rank < 1:
        raise LoraError(f"{field}.rank must be >= 1, got {rank}")
    if not targets:
        raise LoraError(f"{field}.targets is empty: name the linears to adapt (e.g. attn1.to_q ffn.net.2)")
    for pattern in targets:
        if not any(matches(n, pattern) for n in layers):
            example = ", ".join(list(layers)[:4])
            raise LoraError(f"{field}.targets: {pattern!r} matches no linear layer of the model (its linears are "
                            f"named like {example}, ...)")
    chosen = [n for n in layers if any(matches(n, p) for p in targets)]
    for n in chosen:
        out, inp = layers[n]
        if rank > min(out, inp):
            raise LoraError(f"{field}.rank {rank} is larger than the layer {n} ({out} x {inp}) it adapts")
    return chosen


def init(shapes: dict[str, tuple[int, ...]], names, rank: int, key: torch.Tensor, device=None) -> Params:
    """Fresh adapters, PEFT's default: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a = sqrt(5)),
    B = 0, so the adapted model starts as the base. Each A depends only on the key and its name."""
    layers = linears(shapes)
    out = {}
    for n in names:
        n_out, n_in = layers[n]
        bound = 1 / math.sqrt(n_in)
        k = random.fold_in(key, zlib.crc32(n.encode()))
        out[f"{n}.{LORA_A}"] = random.uniform(k, (rank, n_in), device=device, low=-bound, high=bound)
        out[f"{n}.{LORA_B}"] = torch.zeros(n_out, rank, device=device)
    return out


def layers_of(adapters: Params) -> list[str]:
    return [k.removesuffix(f".{LORA_A}") for k in adapters if k.endswith(f".{LORA_A}")]


# ---------------------------------------------------------------------------------- the forward


def combine(base: Params, adapters: Params, scale: float) -> Params:
    """The params dict the family's forward runs on: the base's leaves and the adapters, B scaled
    (views and one small product; nothing of the base is copied)."""
    out = dict(base)
    for k, v in adapters.items():
        out[k] = v * scale if k.endswith(LORA_B) and scale != 1 else v
    return out


def make_apply(inner, base: Params, scale: float):
    """apply(adapters, x, t, context) -> v: `inner` (a role's apply over whole params) on the base
    with the adapters added."""
    def apply(adapters, x, t, context):
        return inner(combine(base, adapters, scale), x, t, context)

    return apply


def merge(base: Params, adapters: Params, scale: float) -> Params:
    """The base with every adapter merged in (W + scale * B @ A, computed in fp32, kept in W's dtype)."""
    out = dict(base)
    for n in layers_of(adapters):
        w = base[f"{n}.weight"]
        delta = adapters[f"{n}.{LORA_B}"].float() @ adapters[f"{n}.{LORA_A}"].float()
        out[f"{n}.weight"] = (w.float() + scale * delta.to(w.device)).to(w.dtype)
    return out


def merge_pairs(base: Params, pairs: dict[str, Pair], strength: float = 1.0, rows=None) -> Params:
    """The base with a file's LoRA merged in at `strength` (frozen LoRAs of a role); `rows(n) -> (start,
    stop)`: the base holds only those rows of each weight (a sharded role's, fvfunc.distributed.rows_of)."""
    out = dict(base)
    for n, p in pairs.items():
        w = out[f"{n}.weight"]
        up = p.up if rows is None else p.up[slice(*rows(p.up.shape[0]))]
        delta = up.float() @ p.down.float()
        out[f"{n}.weight"] = (w.float() + strength * p.scale * delta.to(w.device)).to(w.dtype)
    return out


def merge_diffs(base: Params, diffs: Params, strength: float = 1.0, rows=None) -> Params:
    """The base with a file's full-tensor diffs added at `strength` (in fp32, kept in each param's dtype);
    `rows` as for `merge_pairs`."""
    out = dict(base)
    for n, d in diffs.items():
        w = out[n]
        if rows is not None and d.ndim > 0:
            d = d[slice(*rows(d.shape[0]))]
        out[n] = (w.float() + strength * d.to(w.device)).to(w.dtype)
    return out


def check_pairs(pairs: dict[str, Pair], names, rank: int, field: str, path) -> None:
    """LoraError when a file's LoRA cannot continue as adapters of `rank` on the linears `names`."""
    names = set(names)
    for n, p in pairs.items():
        if n not in names:
            raise LoraError(f"{field}.init: {path} adapts {n}, which {field}.targets does not name (add it to "
                            "the targets, or train from fresh adapters)")
        if p.down.shape[0] != rank:
            raise LoraError(f"{field}.init: {path} has rank {p.down.shape[0]} at {n}; {field}.rank is {rank}")


def from_pairs(pairs: dict[str, Pair], fresh: Params, scale: float, field: str, path) -> Params:
    """Adapters to continue training from a file: `fresh` (this run's init) with each layer the file
    holds replaced by its A and its B rescaled to this run's scale (so the model starts exactly at the
    file's); LoraError as `check_pairs`."""
    layers = layers_of(fresh)
    check_pairs(pairs, layers, fresh[f"{layers[0]}.{LORA_A}"].shape[0] if layers else 0, field, path)
    out = dict(fresh)
    for n, p in pairs.items():
        a_key = f"{n}.{LORA_A}"
        out[a_key] = p.down.float().to(fresh[a_key].device).clone()
        out[f"{n}.{LORA_B}"] = (p.up.float() * (p.scale / scale)).to(fresh[a_key].device)
    return out


# ----------------------------------------------------------------------------------------- files

_SUFFIXES = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up", "lora_up.weight": "up",
             "alpha": "alpha", "lora_B.bias": "bias"}  # (the bias: diffusers' form of a .diff_b, scaled as B)
_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.diffusion_model.", "lora_unet_")
DIFFS = {"diff": "weight", "diff_b": "bias", "diff_m": "modulation"}
"""Full-tensor deltas some files carry beside their pairs (LightX2V's, read by ComfyUI): `<module>.diff`
of the module's weight (norms, the patch embedding), `.diff_b` of its bias, `<block>.diff_m` of its
modulation (the original name of diffusers' scale_shift_table). Merged at the file's strength."""


def _tensors(path: Path) -> tuple[Params, dict, Path]:
    """(tensors, PEFT adapter config or {}, file) of a LoRA file or a folder holding one."""
    file, config = path, {}
    if path.is_dir():
        for name in (DIFFUSERS_FILE, "adapter_model.safetensors"):
            if (path / name).is_file():
                file = path / name
                break
        else:
            raise LoraError(f"{path}: a folder without {DIFFUSERS_FILE} or adapter_model.safetensors")
        if (path / "adapter_config.json").is_file():
            try:
                config = json.loads((path / "adapter_config.json").read_text())
            except json.JSONDecodeError as e:
                raise LoraError(f"{path / 'adapter_config.json'}: invalid JSON ({e})") from None
    elif not path.is_file():
        raise LoraError(f"{path}: LoRA file does not exist")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise LoraError(f"{file}: not a readable safetensors file ({e})") from None
    return tensors, config, file


def read(path, shapes: dict[str, tuple[int, ...]], original_names: dict[str, str] | None = None,
         original_params: dict[str, str] | None = None) -> dict[str, Pair]:
    """{linear name: Pair} of a LoRA file (or folder) in any layout of the module docstring, checked
    against the model's param shapes; LoraError naming the first key that fits no layer of it, or a
    file with full-tensor diffs (those merge, `read_all`, but cannot continue as adapters)."""
    pairs, diffs = read_all(path, shapes, original_names, original_params)
    if diffs:
        raise LoraError(f"{path}: holds full-tensor diffs ({next(iter(diffs))} and {len(diffs) - 1} more: .diff / "
                        ".diff_b / .diff_m keys, as LightX2V's LoRAs have) that adapters cannot hold; merge the file "
                        "into the role's weights instead (lora.frozen)")
    return pairs


def read_all(path, shapes: dict[str, tuple[int, ...]], original_names: dict[str, str] | None = None,
             original_params: dict[str, str] | None = None) -> tuple[dict[str, Pair], Params]:
    """({linear name: Pair}, {param name: delta}) of a LoRA file (or folder): its low-rank pairs and its
    full-tensor diffs (DIFFS: `<module>.diff` of a weight, `.diff_b` of a bias, `<block>.diff_m` of a
    modulation, in the original layout's names, `original_params` {param name: original name}, or the
    model's own), each checked against the model's param shapes; LoraError naming the first key that fits
    no part of the model."""
    tensors, config, file = _tensors(Path(path))
    layers = linears(shapes)
    known = {n: n for n in layers}
    for ours, theirs in (original_names or {}).items():
        known.setdefault(theirs, ours)
        known.setdefault(theirs.replace(".", "_"), ours)  # kohya / musubi
    params = {n: n for n in shapes}
    for ours, theirs in (original_params or {}).items():
        params.setdefault(theirs, ours)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    diffs: Params = {}
    for key, value in tensors.items():
        kind = next((s for s in DIFFS if key.endswith("." + s)), None)
        if kind is not None:
            leaf = DIFFS[kind]
            name = _unprefixed(key[:-len(kind) - 1], lambda n, leaf=leaf: f"{n}.{leaf}" in params)
            target = params.get(f"{name}.{leaf}")
            if target is None:
                raise LoraError(f"{file}: {key} names no parameter of this model (a LoRA for another "
                                "architecture or model size?)")
            if value.numel() != math.prod(shapes[target]):
                raise LoraError(f"{file}: {key} has shape {list(value.shape)}; the model's {target} is "
                                f"{list(shapes[target])}")
            diffs[target] = value.float().reshape(shapes[target])
            continue
        suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            raise LoraError(f"{file}: {key} is not a LoRA key (lora_A / lora_B / lora_down / lora_up / alpha, or "
                            "the diffs .diff / .diff_b / .diff_m); DoRA and LoHa files are not supported")
        name = _unprefixed(key[:-len(suffix) - 1], lambda n: n in known)
        if name not in known:
            raise LoraError(f"{file}: {key} names no linear layer of this model (a LoRA for another "
                            "architecture or model size?)")
        parts.setdefault(known[name], {})[_SUFFIXES[suffix]] = value
    if not parts and not diffs:
        raise LoraError(f"{file}: holds no LoRA weights")
    alpha, rank = config.get("lora_alpha"), config.get("r")
    rslora = bool(config.get("use_rslora"))
    out = {}
    for n, p in parts.items():
        if "down" not in p or "up" not in p:
            raise LoraError(f"{file}: {n} has {'no down (lora_A)' if 'down' not in p else 'no up (lora_B)'} weight")
        down, up = p["down"], p["up"]
        n_out, n_in = layers[n]
        r = down.shape[0]
        if down.shape != (r, n_in) or up.shape != (n_out, r):
            raise LoraError(f"{file}: {n} has down {list(down.shape)} and up {list(up.shape)}; the model's layer "
                            f"is {n_out} x {n_in}, so they must be [r, {n_in}] and [{n_out}, r]")
        if "alpha" in p:
            scale = float(p["alpha"]) / r
        elif alpha is not None:
            scale = alpha / (math.sqrt(rank or r) if rslora else (rank or r))
        else:
            scale = 1.0
        out[n] = Pair(down.float(), up.float(), scale)
        if "bias" in p:
            if p["bias"].shape != (n_out,):
                raise LoraError(f"{file}: {n} has a lora_B bias of shape {list(p['bias'].shape)}; the layer's is "
                                f"[{n_out}]")
            diffs[f"{n}.bias"] = scale * p["bias"].float()
    return out, diffs


def _unprefixed(name: str, known) -> str:
    """`name` without the layouts' prefixes (diffusion_model., transformer., ...) unless it is `known` as is."""
    for prefix in _PREFIXES:
        if name.startswith(prefix) and not known(name):
            name = name[len(prefix):]
    return name


def parse_frozen(entry: str) -> tuple[str, float]:
    """FILE or FILE:STRENGTH of roles.<role>.lora.frozen."""
    path, sep, strength = entry.rpartition(":")
    if sep and path:
        try:
            return path, float(strength)
        except ValueError:
            pass
    return entry, 1.0


def _save(path: Path, tensors: Params, metadata: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def write_diffusers(path, adapters: Params, scale: float, dtype: torch.dtype = torch.float32) -> Path:
    """diffusers' layout (`transformer.<linear>.lora_A.weight`, ...), the scale folded into B."""
    out = {}
    for n in layers_of(adapters):
        out[f"transformer.{n}.{LORA_A}"] = adapters[f"{n}.{LORA_A}"].to(dtype)
        out[f"transformer.{n}.{LORA_B}"] = (adapters[f"{n}.{LORA_B}"].float() * scale).to(dtype)
    return _save(Path(path), out, {"format": "pt"})


def write_original(path, adapters: Params, scale: float, original_names: dict[str, str],
                   dtype: torch.dtype = torch.float32) -> Path:
    """ComfyUI's layout (`diffusion_model.<original name>.lora_down.weight` / `.lora_up.weight` /
    `.alpha`), the scale as alpha = scale * rank."""
    out = {}
    for n in layers_of(adapters):
        a = adapters[f"{n}.{LORA_A}"]
        name = f"diffusion_model.{original_names[n]}"
        out[f"{name}.lora_down.weight"] = a.to(dtype)
        out[f"{name}.lora_up.weight"] = adapters[f"{n}.{LORA_B}"].to(dtype)
        out[f"{name}.alpha"] = torch.tensor(scale * a.shape[0], dtype=dtype)
    return _save(Path(path), out, {"format": "pt"})
