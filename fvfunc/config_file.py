"""Schema-v2 run files: FastVideo's distillation YAML read into an fvfunc run config, and written back.

The layout is the one FastVideo's distillation framework uses (`recipe`, `roles`, `training`,
`pipeline_config`, `method_config`) plus fvfunc's own sections:

    recipe:          {family: wan, method: dmd2}   method must match the subcommand; family is the
                                                   default family of every role
    roles:           {student: {family, path, trainable, dtype}, teacher: ..., critic: ...}
    training:        configs.TrainingConfig        + FastVideo's TrainingArgs keys below
    pipeline_config: FastVideo's pipeline keys below
    method_config:   the method's config (configs.FinetuneConfig, DMD2Config, KDConfig, ...)
    data:            configs.DataConfig
    validation:      configs.ValidationConfig      (with a nested `sampler:`)
    tracking:        configs.TrackingConfig

Every section takes fvfunc's own field names (what `dump` writes; `method_config` holds the fields of
the run's `method`). The file is decoded with msgspec into typed structs that forbid unknown keys: a
key that is neither an fvfunc field nor a FastVideo key this module or the method knows is an error
naming its path (`training.learing_rate`), with a did-you-mean, or naming the methods that do know it.
A value given twice (an fvfunc name and a FastVideo key for the same field, with different values) is
an error too.

The FastVideo keys every method shares, and the fvfunc field each sets (same meaning unless noted):

    training.output_dir, seed, weight_decay,     the same names
      max_grad_norm, min_lr_ratio
    training.max_train_steps                     training.max_steps
    training.learning_rate                       training.lr
    training.betas: "0.9,0.999"                  training.betas (a "b1,b2" string or a list)
    training.train_batch_size,                   training.batch_size = train_batch_size
      gradient_accumulation_steps,                 * gradient_accumulation_steps * num_gpus / sp_size
      num_gpus, sp_size                            (FastVideo's batch is per data-parallel rank and
                                                   micro-batch, fvfunc's is the global batch);
                                                 training.micro_batches = gradient_accumulation_steps;
                                                 training.sp_size = sp_size
    training.lr_scheduler                        training.lr_schedule: constant -> constant,
                                                   constant_with_warmup -> linear_warmup, cosine ->
                                                   cosine, cosine_with_min_lr -> cosine with
                                                   min_lr_ratio 0.5 (FastVideo's default) unless given
    training.lr_warmup_steps                     training.warmup_steps
    training.mixed_precision: bf16 | fp32 | no   training.precision
    training.enable_gradient_checkpointing_type  training.remat (full -> full, null -> none)
    training.ema_decay                           roles.student.ema_decay
    training.use_ema: false                      roles.student.ema_decay = 0 (true needs ema_decay; a
                                                   non-zero ema_start_step is refused)
    training.training_state_checkpointing_steps  training.checkpoint_every
      (or checkpointing_steps)
    training.checkpoints_total_limit             training.keep_checkpoints (0 keeps all in both)
    training.resume_from_checkpoint              training.resume
    training.data_path: "A,B:2"                  data.path (comma-separated specs, or a list)
    training.dataloader_num_workers              data.num_workers
    training.tracker_project_name                tracking.project
    training.wandb_run_name                      tracking.run_name
    training.log_validation + validation_steps   validation.every (0 unless log_validation)
    training.validation_sampling_steps: "50"     validation.sampler.num_steps (one value)
    training.validation_preprocessed_path        validation.prompts
    pipeline_config.flow_shift                   method.flow_shift (when the method has one), and
                                                   validation.sampler.shift unless the file sets it
    pipeline_config.sampler_kind: ode | sde      validation.sampler.kind
    pipeline_config.boundary_ratio               checked: an expert-pair role's folder must switch there
                                                   (fvfunc routes by the folder's model_index.json)
    method_config.attn_kind: dense | vsa         training.attention 'vsa' for vsa (so does a
                                                   training.VSA_sparsity above 0, as FastVideo's
                                                   trainer picks its VSA backend then)
    training.VSA_sparsity                        training.vsa_sparsity (FastVideo's default 0.0)
    training.VSA_decay_rate                      training.vsa_decay_rate (default 0.01)
    training.VSA_decay_interval_steps            training.vsa_decay_interval_steps (default 1: none)
    training.lora_training + lora_rank,          roles.<role>.lora.rank / alpha / targets of every role the
      lora_alpha, lora_target_modules              method trains (FastVideo's trainable transformers: the
                                                   student, DMD2's critic); alpha defaults to the rank, the
                                                   targets to FastVideo's: the attention projections (and
                                                   VSA's gate); its module names (to_q, fc_in, ...) mapped
    roles.<role>.disable_custom_init_weights     unused: fvfunc loads weights as stored

A method's own FastVideo keys (finetune's weighting and CFG-dropout keys, DMD2's critic, rollout and
video-size keys, kd's trajectory-cache keys) are declared and read by its spec (`SPEC.fastvideo` in
fvfunc/losses/<method>.py, with the table of what each sets), last, so they may use what the shared
keys set; `FileFacts` is what they may ask (values so far, the student's VAE compression, FastVideo's
value formats). Read and not used by any method: training.validation_guidance_scale (except where a
method reads it), training_cfg_rate, num_latent_t, num_height, num_width, num_frames (likewise), and
the device layout and FastVideo-only outputs: tp_size, hsdp_replicate_dim, hsdp_shard_dim,
train_sp_batch_size, weight_only_checkpointing_steps, validation_dataset_file (raw prompts need a text
encoder), trackers, log_visualization, visualization_steps.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import re
import typing
from pathlib import Path
from typing import Any

import msgspec
import yaml

import configs
from fvfunc import fastvideo_layout

log = logging.getLogger(__name__)

ROLE_NAMES = tuple(f.name for f in dataclasses.fields(configs.RolesConfig))
SCHEDULES = {"constant": "constant", "constant_with_warmup": "linear_warmup", "cosine": "cosine",
             "cosine_with_min_lr": "cosine"}
PRECISIONS = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
              "no": "float32"}


class ConfigError(ValueError):
    """A run config (from flags or a file) that fvfunc refuses; the message names the field."""


FASTVIDEO_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards")
"""FastVideo's default negative prompt (fastvideo/api/sampling_param.py), which its trainers encode as
the teacher's and validation's unconditional input when a run file names none."""

# FastVideo keys fvfunc reads and deliberately does not use: a file that sets one gets one note.
IGNORED = ("training.tp_size", "training.hsdp_replicate_dim", "training.hsdp_shard_dim",
           "training.train_sp_batch_size", "training.weight_only_checkpointing_steps", "training.trackers",
           "training.log_visualization", "training.visualization_steps", "training.pin_cpu_memory",
           "training.lr_num_cycles", "training.lr_power", "training.entity", "training.dit_precision",
           "training.model_path", "training.preprocessed_data_type", "training.moba_config",
           "training.VSA_cache_tile_buf",
           "roles.*.disable_custom_init_weights")


# FastVideo keys each section accepts besides fvfunc's own field names, with their types.
_Betas = tuple[float, float] | str
_FASTVIDEO_TRAINING: dict[str, Any] = {
    "max_train_steps": int, "learning_rate": float, "betas": _Betas, "train_batch_size": int,
    "gradient_accumulation_steps": int, "num_gpus": int, "sp_size": int, "tp_size": int,
    "hsdp_replicate_dim": int, "hsdp_shard_dim": int, "train_sp_batch_size": int,
    "lr_scheduler": str, "lr_warmup_steps": int, "mixed_precision": str,
    "enable_gradient_checkpointing_type": str | None, "use_ema": bool, "ema_start_step": int,
    "checkpointing_steps": int, "training_state_checkpointing_steps": int,
    "weight_only_checkpointing_steps": int, "checkpoints_total_limit": int, "resume_from_checkpoint": str,
    "data_path": str | list[str], "dataloader_num_workers": int, "tracker_project_name": str,
    "wandb_run_name": str, "trackers": list[str], "log_validation": bool, "validation_steps": float,
    "validation_sampling_steps": str | int, "validation_guidance_scale": str | float,
    "validation_preprocessed_path": str, "validation_dataset_file": str, "log_visualization": bool,
    "visualization_steps": int, "num_latent_t": int, "num_height": int, "num_width": int,
    "num_frames": int, "training_cfg_rate": float, "ema_decay": float, "pin_cpu_memory": bool,
    "lr_num_cycles": int, "lr_power": float, "entity": str, "dit_precision": str, "model_path": str,
    "preprocessed_data_type": str, "moba_config": dict,
    "VSA_sparsity": float, "VSA_decay_rate": float, "VSA_decay_interval_steps": int, "VSA_cache_tile_buf": bool,
    "lora_training": bool, "lora_rank": int | None, "lora_alpha": int | None, "lora_target_modules": list[str] | None,
}
_FASTVIDEO_METHOD: dict[str, Any] = {"attn_kind": str}
_FASTVIDEO_PIPELINE: dict[str, Any] = {"flow_shift": float, "sampler_kind": str, "boundary_ratio": float}
_FASTVIDEO_ROLE: dict[str, Any] = {"disable_custom_init_weights": bool}


# ------------------------------------------------------------------------------ typed file schema


def _optional(t) -> Any:
    return t | msgspec.UnsetType


def _struct(name: str, dc: type | None, extra: dict[str, Any]) -> type[msgspec.Struct]:
    """A msgspec struct with the fields of dataclass `dc` (nested dataclasses become structs) plus
    `extra`, every one optional (UNSET when absent), refusing unknown keys."""
    fields = {}
    if dc is not None:
        hints = typing.get_type_hints(dc)
        for f in dataclasses.fields(dc):
            t = hints[f.name]
            if dataclasses.is_dataclass(t):
                t = _struct(f"{name}_{f.name}", t, {}) | None
            fields[f.name] = t
    fields.update(extra)
    return msgspec.defstruct(name, [(k, _optional(t), msgspec.UNSET) for k, t in fields.items()],
                             kw_only=True, forbid_unknown_fields=True)


def runs() -> dict[str, type]:
    """Method name -> its run config type (configs.RUNS, which the method specs agree with)."""
    return dict(configs.RUNS)


def _spec(method: str):
    from fvfunc.losses import METHODS

    return METHODS[method]


@functools.cache
def _file_struct(method: str) -> type[msgspec.Struct]:
    spec = _spec(method)
    hints = typing.get_type_hints(spec.run)
    keys = spec.fastvideo
    role = _struct("Role", configs.RoleConfig, _FASTVIDEO_ROLE)
    section = lambda name, dc, extra=None: _struct(name, dc, extra or {}) | None
    return _struct(f"RunFile_{method}", None, {
        "recipe": section("Recipe", None, {"family": str, "method": str}),
        "roles": section("Roles", None, dict.fromkeys(ROLE_NAMES, role | None)),
        "training": section("Training", configs.TrainingConfig, {**_FASTVIDEO_TRAINING, **keys.training}),
        "pipeline_config": section("PipelineConfig", None, {**_FASTVIDEO_PIPELINE, **keys.pipeline_config}),
        "method_config": section("MethodConfig", hints["method"], {**_FASTVIDEO_METHOD, **keys.method_config}),
        "data": section("Data", configs.DataConfig, {"path": str | list[str]}),
        "validation": section("Validation", configs.ValidationConfig),
        "tracking": section("Tracking", configs.TrackingConfig),
    })


def _struct_type(t) -> type[msgspec.Struct] | None:
    """The struct inside an (optional) field type, if any."""
    for a in typing.get_args(t) or (t,):
        if isinstance(a, type) and issubclass(a, msgspec.Struct):
            return a
    return None


def _field_types(root: type[msgspec.Struct], path: list[str]) -> dict[str, Any]:
    """{key: type} of the file section at `path` ([] is the top level); {} when there is none."""
    t = root
    for p in path:
        types = {f.name: f.type for f in msgspec.structs.fields(t)}
        t = _struct_type(types.get(p))
        if t is None:
            return {}
    return {f.name: f.type for f in msgspec.structs.fields(t)}


def _choices(t) -> str:
    """' (expected one of a, b)' for a Literal field type (also inside a Union), else ''."""
    literals = [a for a in (t, *typing.get_args(t)) if typing.get_origin(a) is typing.Literal]
    return f" (expected one of {', '.join(map(str, typing.get_args(literals[0])))})" if literals else ""


def _methods_knowing(parent: list[str], key: str) -> list[str]:
    """The methods whose run files accept `parent.key`."""
    from fvfunc.losses import METHODS

    return [m for m in METHODS if len(parent) == 1 and key in _field_types(_file_struct(m), parent)]


def _validation_message(e: msgspec.ValidationError, root: type[msgspec.Struct]) -> str:
    """msgspec's error rewritten with the key path as it reads in the file (`training.lr`)."""
    msg = str(e)
    m = re.fullmatch(r"(.*?)(?: - at `\$(.*)`)?", msg, re.S)
    text, where = m.group(1), (m.group(2) or "").lstrip(".")
    unknown = re.fullmatch(r"Object contains unknown field `(.+)`", text)
    if unknown:
        key = unknown.group(1)
        parent = [p for p in where.split(".") if p]
        path = ".".join([*parent, key])
        msg = f"unknown key {path}"
        known = list(_field_types(root, parent))
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        owners = _methods_knowing(parent, key)
        if not parent and not close:
            msg += (" (fvfunc reads schema-v2 files, with recipe:, roles:, training:, pipeline_config:, "
                    "method_config:, data:, validation:, tracking:, and FastVideo's fastvideo/train files, with "
                    "models: of _target_ classes, method:, training:, callbacks:, pipeline:)")
        elif owners:
            msg += f" (a key of {' and '.join(owners)}, not of this method)"
        elif close:
            msg += f" (did you mean {'.'.join([*parent, close[0]])}?)"
        elif 0 < len(known) <= 10:
            msg += f" (known: {', '.join(known)})"
        return msg
    text = text[0].lower() + text[1:]
    if text.startswith("invalid enum value"):
        *parent, key = where.split(".")
        text += _choices(_field_types(root, parent).get(key))
    return f"{where}: {text}" if where else text


# ------------------------------------------------------------------------------ file -> run config


_Assignments = dict[str, tuple[Any, str, bool]]
"""target field ("training.lr") -> (value, the file key that set it ("training.learning_rate"), weak)"""


def _put(out: _Assignments, target: str, value, source: str, weak: bool = False) -> None:
    """Set `target` from file key `source`. A weak value (a default derived from another key) never
    overrides; two strong values that differ are an error."""
    if value is msgspec.UNSET:
        return
    if isinstance(value, list):  # YAML lists and tuple fields compare equal
        value = tuple(value)
    if target in out:
        old, old_source, old_weak = out[target]
        if weak:
            return
        if not old_weak and old != value:
            raise ConfigError(f"{source} ({value!r}) and {old_source} ({old!r}) both set {target}; keep one")
    out[target] = (value, source, weak)


def _given(s) -> dict[str, Any]:
    """The keys a file section (a struct, None or UNSET) sets."""
    if s is None or s is msgspec.UNSET:
        return {}
    return {k: v for k, v in msgspec.structs.asdict(s).items() if v is not msgspec.UNSET}


def _betas(v, where: str) -> tuple[float, float]:
    if isinstance(v, str):
        try:
            b1, b2 = (float(x) for x in v.split(","))
        except ValueError:
            raise ConfigError(f"{where}: expected 'beta1,beta2', got {v!r}") from None
        return b1, b2
    return tuple(v)


def _one_number(v, cast, where: str):
    """FastVideo writes validation settings as comma-separated strings; fvfunc takes one value."""
    parts = [p for p in str(v).split(",") if p.strip()] if isinstance(v, str) else [v]
    if len(parts) != 1:
        raise ConfigError(f"{where}: fvfunc validates with one setting, got {v!r}")
    try:
        return cast(parts[0])
    except ValueError:
        raise ConfigError(f"{where}: expected a number, got {v!r}") from None


def _data_specs(v) -> tuple[str, ...]:
    parts = v.split(",") if isinstance(v, str) else v
    return tuple(p.strip() for p in parts if p.strip())


class FileFacts:
    """What a method's FastVideo `read` may ask of the file being read (fvfunc/losses/spec.py): the
    family's VAE compression, the values assigned so far, and FastVideo's value formats."""

    def __init__(self, out: _Assignments, run: type, layout: str):
        self._out, self.run = out, run
        self.layout = layout
        """'fvfunc' (fvfunc's own names only, as `dump` writes), 'fastvideo' (FastVideo's schema-v2
        distillation YAML: its TrainingArgs names, its older CFG form in DMD2) or 'fastvideo-train'
        (FastVideo's fastvideo/train YAML, translated by fvfunc/fastvideo_layout.py; standard CFG)."""
        self.fastvideo = layout != "fvfunc"
        """Whether the file is FastVideo's: keys it omits take FastVideo's defaults, not fvfunc's."""
        self.negative_prompt = FASTVIDEO_NEGATIVE_PROMPT
        """FastVideo's default negative prompt (its SamplingParam), for a FastVideo file's CFG."""

    @functools.cached_property
    def _compression(self) -> tuple[int, int]:
        return _compression(self.value("roles.student.family"), self.value("roles.student.path"))

    @property
    def temporal(self) -> int:
        """Video frames a latent frame holds (the student's VAE, or its family's default)."""
        return self._compression[0]

    @property
    def spatial(self) -> int:
        """Pixels a latent holds along height and width."""
        return self._compression[1]

    def value(self, target: str, default=msgspec.UNSET):
        """The value the file gave field `target` so far, else `default` (else the run type's default)."""
        if target in self._out:
            return self._out[target][0]
        return default if default is not msgspec.UNSET else self._default(target)

    def source(self, target: str) -> str:
        return self._out[target][1]

    def _default(self, target: str):
        obj = self.run()
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def latent_size(self, t: dict, key: str, default: int) -> int:
        """Pixels in training.`key` as latents, through the VAE's spatial compression."""
        if key not in t:
            return default
        if t[key] % self.spatial:
            raise ConfigError(f"training.{key} ({t[key]}) must be a multiple of {self.spatial} (the VAE's spatial "
                              "compression)")
        return t[key] // self.spatial

    betas = staticmethod(lambda v, where: _betas(v, where))
    number = staticmethod(lambda v, cast, where: _one_number(v, cast, where))
    schedule = staticmethod(lambda name, where: _schedule(name, where))


def _compression(family_name, student_path) -> tuple[int, int]:
    """(temporal, spatial) VAE compression of the student's folder, or the family's default."""
    from fvfunc.models import ModelError, family

    try:
        fam = family(family_name)
    except ModelError as e:
        raise ConfigError(f"recipe.family: {e}") from None
    cfg = None
    if student_path:
        try:
            cfg = fam.load_config(student_path)
        except (ModelError, OSError):
            cfg = None  # the check after parsing names a bad folder; the compression falls back
    facts = fam.latents(cfg, student_path if cfg is not None else None)
    return facts.temporal, facts.spatial


def _schedule(name: str, where: str) -> str:
    if name not in SCHEDULES:
        raise ConfigError(f"{where}: FastVideo schedule {name!r} has no fvfunc equivalent; use one of "
                          f"{sorted(SCHEDULES)} (or training.lr_schedule)")
    return SCHEDULES[name]


def _from_training(t: dict, out: _Assignments) -> None:
    """training: fvfunc's TrainingConfig fields, then FastVideo's shared TrainingArgs keys."""
    own = {f.name for f in dataclasses.fields(configs.TrainingConfig)}
    for k, v in t.items():
        if k in own:
            _put(out, f"training.{k}", _betas(v, "training.betas") if k == "betas" else v, f"training.{k}")

    def put(target: str, key: str, value=msgspec.UNSET, weak: bool = False) -> None:
        """Set `target` from training.`key` (its value, or `value` derived from it)."""
        _put(out, target, t.get(key, msgspec.UNSET) if value is msgspec.UNSET else value, f"training.{key}",
             weak)

    put("training.max_steps", "max_train_steps")
    put("training.lr", "learning_rate")
    put("training.warmup_steps", "lr_warmup_steps")
    put("training.keep_checkpoints", "checkpoints_total_limit")
    put("training.resume", "resume_from_checkpoint")
    put("training.checkpoint_every", "checkpointing_steps")
    put("training.checkpoint_every", "training_state_checkpointing_steps")
    put("tracking.project", "tracker_project_name")
    put("tracking.run_name", "wandb_run_name")
    put("data.num_workers", "dataloader_num_workers")
    put("validation.prompts", "validation_preprocessed_path")
    put("validation.dataset_file", "validation_dataset_file")
    put("data.num_latent_t", "num_latent_t")
    if "data_path" in t:
        put("data.path", "data_path", _data_specs(t["data_path"]))

    accum = t.get("gradient_accumulation_steps", 1)
    put("training.micro_batches", "gradient_accumulation_steps")
    put("training.sp_size", "sp_size")
    if "train_batch_size" in t:
        gpus, sp = t.get("num_gpus", 1), t.get("sp_size", 1)
        if gpus < 1 or sp < 1 or gpus % sp:
            raise ConfigError(f"training.num_gpus ({gpus}) must be a positive multiple of training.sp_size "
                              f"({sp})")
        put("training.batch_size", "train_batch_size", t["train_batch_size"] * accum * (gpus // sp))
    if "lr_scheduler" in t:
        put("training.lr_schedule", "lr_scheduler", _schedule(t["lr_scheduler"], "training.lr_scheduler"))
        if t["lr_scheduler"] == "cosine_with_min_lr":
            put("training.min_lr_ratio", "lr_scheduler", 0.5, weak=True)
    if "mixed_precision" in t:
        p = t["mixed_precision"]
        if p not in PRECISIONS:
            raise ConfigError(f"training.mixed_precision: {p!r} is not supported; use bf16 or fp32")
        put("training.precision", "mixed_precision", PRECISIONS[p])
    if "enable_gradient_checkpointing_type" in t:
        kind = t["enable_gradient_checkpointing_type"]
        if kind not in (None, "", "full"):
            raise ConfigError(f"training.enable_gradient_checkpointing_type: {kind!r} is not supported; "
                              "fvfunc recomputes whole blocks ('full') or nothing (null)")
        put("training.remat", "enable_gradient_checkpointing_type", "full" if kind == "full" else "none")
    put("roles.student.ema_decay", "ema_decay")
    if t.get("use_ema") is False:
        put("roles.student.ema_decay", "use_ema", 0.0)
    if t.get("use_ema") is True and "ema_decay" not in t:
        raise ConfigError("training.use_ema is true but training.ema_decay is not set (e.g. 0.98)")
    if t.get("ema_start_step", 0) != 0:
        raise ConfigError("training.ema_start_step: fvfunc keeps its EMA from step 0; set it to 0")
    if "log_validation" in t or "validation_steps" in t:
        every = int(t.get("validation_steps", 0)) if t.get("log_validation", False) else 0
        put("validation.every", "log_validation" if "log_validation" in t else "validation_steps", every)
    if "validation_sampling_steps" in t:
        n = _one_number(t["validation_sampling_steps"], int, "training.validation_sampling_steps")
        put("validation.sampler.num_steps", "validation_sampling_steps", n)


def _from_method(m: dict, method: str, out: _Assignments) -> None:
    """method_config: the method's fvfunc fields (its FastVideo keys are the spec's to read)."""
    own = {f.name for f in dataclasses.fields(typing.get_type_hints(_spec(method).run)["method"])}
    spec_reads = _spec(method).fastvideo.method_config  # the spec reads these itself (e.g. another form)
    for k, v in m.items():
        if k in own and k not in spec_reads:
            _put(out, f"method.{k}", v, f"method_config.{k}")
    if m.get("attn_kind", "dense") not in ("dense", "vsa"):
        raise ConfigError(f"method_config.attn_kind: {m['attn_kind']!r} is not supported; FastVideo's kinds are "
                          "dense and vsa")


def _vsa(t: dict, m: dict, out: _Assignments, fastvideo: bool) -> None:
    """FastVideo's VSA keys: method_config.attn_kind 'vsa' or a training.VSA_sparsity above 0 (FastVideo's
    trainer then picks its VIDEO_SPARSE_ATTN backend) make training.attention 'vsa'; VSA_sparsity,
    VSA_decay_rate and VSA_decay_interval_steps set training.vsa_*, with FastVideo's defaults (0.0, 0.01,
    1: no warm-up) for the ones a FastVideo file omits."""
    kind, sparsity = m.get("attn_kind"), t.get("VSA_sparsity", 0.0)
    if kind == "dense" and sparsity > 0:
        raise ConfigError(f"method_config.attn_kind 'dense' and training.VSA_sparsity {sparsity:g} disagree; keep "
                          "one (attn_kind vsa trains with VSA)")
    if kind == "vsa" or sparsity > 0:
        _put(out, "training.attention", "vsa", "method_config.attn_kind" if kind == "vsa" else "training.VSA_sparsity")
    for key, target in (("VSA_sparsity", "vsa_sparsity"), ("VSA_decay_rate", "vsa_decay_rate"),
                        ("VSA_decay_interval_steps", "vsa_decay_interval_steps")):
        if key in t:
            _put(out, f"training.{target}", t[key], f"training.{key}")
    attention = out.get("training.attention", (None,))[0]
    if fastvideo and attention == "vsa":
        for target, value in (("vsa_sparsity", 0.0), ("vsa_decay_rate", 0.01), ("vsa_decay_interval_steps", 1)):
            _put(out, f"training.{target}", value, f"FastVideo's default for training.{target}", weak=True)


# FastVideo's Wan linears by its module names (fastvideo/models/dits/wanvideo.py: self-attention's projections
# sit on the block, the FFN is fc_in / fc_out), as fvfunc's targets; FastVideo matches lora_target_modules as
# substrings of a module's name, and its default list's other names (q_proj, ..., to_qkv) name no Wan module.
_FASTVIDEO_LORA = {"to_q": ("attn1.to_q", "attn2.to_q"), "to_k": ("attn1.to_k", "attn2.to_k"),
                   "to_v": ("attn1.to_v", "attn2.to_v"), "to_out": ("attn1.to_out.0", "attn2.to_out.0"),
                   "to_gate_compress": ("to_gate_compress",), "add_k_proj": ("attn2.add_k_proj",),
                   "add_v_proj": ("attn2.add_v_proj",), "fc_in": ("ffn.net.0.proj",), "fc_out": ("ffn.net.2",)}
_FASTVIDEO_LORA_DEFAULT = ("q_proj", "k_proj", "v_proj", "o_proj", "to_q", "to_k", "to_v", "to_out", "to_qkv",
                           "to_gate_compress")
"""FastVideo's default lora_target_modules (fastvideo/pipelines/lora_pipeline.py)."""


def _lora(t: dict, method: str, out: _Assignments) -> None:
    """FastVideo's LoRA keys: training.lora_training makes every role it trains (its trainable transformers:
    the student, and DMD2's critic) a LoRA of lora_rank, alpha lora_alpha (FastVideo's default: the rank), on
    the linears lora_target_modules names (FastVideo's default: the attention projections, and VSA's gate
    when training with VSA)."""
    keys = [k for k in ("lora_rank", "lora_alpha", "lora_target_modules") if t.get(k) is not None]
    if not t.get("lora_training", False):
        if keys:
            log.warning("note: training.%s without training.lora_training: FastVideo trains full weights then, and "
                        "so does fvfunc", ", training.".join(keys))
        return
    rank = t.get("lora_rank")
    if not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"training.lora_training needs training.lora_rank, a positive int; got {rank!r}")
    vsa = out.get("training.attention", (None,))[0] == "vsa"
    targets = []
    for name in t.get("lora_target_modules") or _FASTVIDEO_LORA_DEFAULT:
        if name in _FASTVIDEO_LORA:
            if name != "to_gate_compress" or vsa:  # the gate exists only in a VSA model
                targets += [x for x in _FASTVIDEO_LORA[name] if x not in targets]
        elif name not in _FASTVIDEO_LORA_DEFAULT:
            raise ConfigError(f"training.lora_target_modules: {name!r} names no linear of FastVideo's Wan (its "
                              f"modules: {', '.join(_FASTVIDEO_LORA)})")
    if not targets:
        raise ConfigError("training.lora_target_modules names no linear of FastVideo's Wan (its modules: "
                          f"{', '.join(_FASTVIDEO_LORA)})")
    for role in _spec(method).trainable:
        _put(out, f"roles.{role}.lora.rank", rank, "training.lora_rank")
        _put(out, f"roles.{role}.lora.alpha", float(t.get("lora_alpha") or rank), "training.lora_alpha")
        _put(out, f"roles.{role}.lora.targets", tuple(targets), "training.lora_target_modules")


def _from_pipeline(p: dict, method: str, out: _Assignments) -> None:
    """pipeline_config: FastVideo's shared keys (fvfunc keeps these in method_config / validation)."""
    own = {f.name for f in dataclasses.fields(typing.get_type_hints(_spec(method).run)["method"])}
    if "flow_shift" in p:
        if "flow_shift" in own:
            _put(out, "method.flow_shift", p["flow_shift"], "pipeline_config.flow_shift")
        _put(out, "validation.sampler.shift", p["flow_shift"], "pipeline_config.flow_shift", weak=True)
    if "sampler_kind" in p:  # FastVideo's "ode" is its UniPC flow solver (FlowUniPCMultistepScheduler)
        kinds = {"ode": "unipc", "sde": "sde"}
        kind = p["sampler_kind"]
        if kind not in kinds:
            raise ConfigError(f"pipeline_config.sampler_kind: expected ode or sde, got {kind!r}")
        _put(out, "validation.sampler.kind", kinds[kind], "pipeline_config.sampler_kind")
    if "boundary_ratio" in p:  # Wan2.2 A14B: fvfunc routes each pair by its folder's model_index.json
        _check_boundary(p["boundary_ratio"], out)


def _check_boundary(b, out: _Assignments) -> None:
    """pipeline_config.boundary_ratio must be what the file's expert-pair roles switch at (their folders'
    model_index.json, which fvfunc routes by); ConfigError naming the role otherwise."""
    from fvfunc.models import FAMILIES  # (lazily, as from_dict imports it)

    for name in ROLE_NAMES:
        path = out.get(f"roles.{name}.path", ("",))[0]
        if not path:
            continue
        try:
            pair = FAMILIES[out.get(f"roles.{name}.family", ("wan",))[0]].experts(path)
        except (KeyError, ValueError):
            continue  # an unknown family or a broken folder: the config check names it
        if pair is not None and abs(pair[1] - float(b)) > 1e-9:
            raise ConfigError(f"pipeline_config.boundary_ratio {b}: roles.{name}.path {path} switches experts at "
                              f"{pair[1]} (its model_index.json's boundary_ratio, which fvfunc routes by)")


def _fastvideo_defaults(out: _Assignments) -> None:
    """What FastVideo takes for the shared keys a FastVideo file omits (its TrainingArgs and fastvideo/train
    defaults), where fvfunc's own defaults differ: no gradient clipping, no weight decay, AdamW betas
    (0.9, 0.999), and its default negative prompt in validation. A method's own (e.g. DMD2's critic
    learning rate = the student's) are set by its spec's `read`."""
    for target, value in (("training.max_grad_norm", 0.0), ("training.weight_decay", 0.0),
                          ("training.betas", (0.9, 0.999)), ("validation.negative_prompt", FASTVIDEO_NEGATIVE_PROMPT)):
        _put(out, target, value, f"FastVideo's default for {target}", weak=True)


def _from_sections(f, out: _Assignments) -> None:
    """fvfunc's own sections: data, validation (with its nested sampler), tracking."""
    for section in ("data", "validation", "tracking"):
        for k, v in _given(getattr(f, section)).items():
            if section == "data" and k == "path":
                v = _data_specs(v)
            if section == "validation" and k == "sampler":
                for sk, sv in _given(v).items():
                    _put(out, f"validation.sampler.{sk}", sv, f"validation.sampler.{sk}")
                continue
            _put(out, f"{section}.{k}", v, f"{section}.{k}")


def _fastvideo_vocabulary(f, method: str) -> bool:
    """Whether a decoded file uses any FastVideo-only key (a file `dump` wrote never does)."""
    own_training = {x.name for x in dataclasses.fields(configs.TrainingConfig)}
    own_method = {x.name for x in dataclasses.fields(typing.get_type_hints(_spec(method).run)["method"])}
    roles = _given(f.roles)
    return (bool(_given(f.pipeline_config))
            or any(k not in own_training for k in _given(f.training))
            or any(k not in own_method for k in _given(f.method_config))
            or any(_FASTVIDEO_ROLE.keys() & _given(roles.get(r)).keys() for r in ROLE_NAMES))


@functools.cache
def _hints(dc: type) -> dict[str, Any]:
    return typing.get_type_hints(dc)


def _replace(obj, changes: dict, out: _Assignments, prefix: str):
    """`obj` with nested `changes`, each value converted to its field's type (errors name the key
    of the file that set it)."""
    kwargs = {}
    for k, v in changes.items():
        target = f"{prefix}{k}"
        if isinstance(v, dict):
            kwargs[k] = _replace(getattr(obj, k), v, out, target + ".")
            continue
        t = _hints(type(obj))[k]
        try:
            kwargs[k] = msgspec.convert(v, t, strict=False)
        except msgspec.ValidationError as e:
            text = str(e)[0].lower() + str(e)[1:]
            raise ConfigError(f"{out[target][1]}: {text}{_choices(t)}") from None
    return dataclasses.replace(obj, **kwargs)


def from_dict(raw: Any, method: str | None = None, where: str = "run file") -> tuple[str, Any]:
    """(method, run config) from a decoded schema-v2 mapping: the run type's defaults overridden by
    the file. `method` is the subcommand; None takes recipe.method."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with recipe:, roles:, training:, ..., got "
                          f"{type(raw).__name__}")
    layout, ignored = "fvfunc", []
    if fastvideo_layout.is_train_layout(raw):
        from fvfunc.losses import METHODS
        from fvfunc.models import FAMILIES

        targets = {spec.fastvideo.target: name for name, spec in METHODS.items() if spec.fastvideo.target}
        try:
            raw, ignored = fastvideo_layout.translate(raw, targets, tuple(FAMILIES), ROLE_NAMES)
        except fastvideo_layout.LayoutError as e:
            raise ConfigError(str(e)) from None
        layout = "fastvideo-train"
    recipe = raw.get("recipe") or {}
    file_method = recipe.get("method") if isinstance(recipe, dict) else None
    if method is None:
        method = file_method
        if method is None:
            raise ConfigError(f"{where}: recipe.method is missing; name the method ({', '.join(runs())})")
    if method not in runs():
        raise ConfigError(f"unknown method {method!r}; known: {', '.join(runs())}")
    if file_method is not None and file_method != method:
        raise ConfigError(f"recipe.method is {file_method!r} but the subcommand is {method!r}")

    root = _file_struct(method)
    try:
        f = msgspec.convert(raw, root, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(_validation_message(e, root)) from None

    out: _Assignments = {}
    family = _given(f.recipe).get("family", msgspec.UNSET)
    roles = _given(f.roles)
    for name in ROLE_NAMES:
        _put(out, f"roles.{name}.family", family, "recipe.family", weak=True)
        for k, v in _given(roles.get(name)).items():
            if k == "lora":  # the nested LoRA section
                for lk, lv in _given(v).items():
                    _put(out, f"roles.{name}.lora.{lk}", lv, f"roles.{name}.lora.{lk}")
            elif k not in _FASTVIDEO_ROLE:
                _put(out, f"roles.{name}.{k}", v, f"roles.{name}.{k}")
    _from_training(_given(f.training), out)
    _from_pipeline(_given(f.pipeline_config), method, out)
    _from_method(_given(f.method_config), method, out)
    _from_sections(f, out)
    # the method's own FastVideo keys, last: it may read what the shared keys set
    spec = _spec(method)
    sections = {"training": _given(f.training), "method_config": _given(f.method_config),
                "pipeline_config": _given(f.pipeline_config)}
    if layout == "fvfunc" and _fastvideo_vocabulary(f, method):
        layout = "fastvideo"
    facts = FileFacts(out, spec.run, layout)
    _vsa(_given(f.training), _given(f.method_config), out, facts.fastvideo)
    _lora(_given(f.training), method, out)
    if facts.fastvideo:
        _fastvideo_defaults(out)
        ignored += [f"training.{k}" for k in _given(f.training) if f"training.{k}" in IGNORED]
        ignored += [f"roles.{r}.disable_custom_init_weights" for r in ROLE_NAMES
                    if "disable_custom_init_weights" in _given(roles.get(r))]
    if ignored:
        log.warning("note: fvfunc reads and does not use %s (FastVideo's device layout and outputs fvfunc has "
                    "no use for)", ", ".join(ignored))
    try:
        spec.fastvideo.read(sections, lambda target, key, value, weak=False: _put(out, target, value, key, weak),
                            facts)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    changes: dict = {}
    for target, (value, _, _) in out.items():
        *parents, leaf = target.split(".")
        d = changes
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = value
    return method, _replace(spec.run(), changes, out, "")


def read(path: str | Path) -> Any:
    """The decoded contents of a YAML (or, by suffix, JSON) file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"config {p}: cannot read it ({e.strerror or e})") from None
    try:
        return msgspec.json.decode(data) if p.suffix == ".json" else msgspec.yaml.decode(data)
    except msgspec.DecodeError as e:
        kind = "JSON" if p.suffix == ".json" else "YAML"
        raise ConfigError(f"config {p}: not valid {kind} ({e})") from None


def load(path: str | Path, method: str | None = None) -> tuple[str, Any]:
    """(method, run config) from a schema-v2 YAML/JSON file; `config` records the file."""
    method, cfg = from_dict(read(path), method, where=f"config {path}")
    return method, dataclasses.replace(cfg, config=str(path))


# ------------------------------------------------------------------------------ run config -> file


def _plain(x):
    if dataclasses.is_dataclass(x):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, (tuple, list)):
        return [_plain(v) for v in x]
    return x


def dump(method: str, cfg) -> dict:
    """The resolved run as a schema-v2 mapping with fvfunc's field names; `from_dict` reads it back
    to an equal config (less `config`, the file it came from). Roles equal to their defaults are left
    out."""
    family = cfg.roles.student.family
    defaults = configs.RolesConfig()
    roles = {}
    for name in ROLE_NAMES:
        role = getattr(cfg.roles, name)
        if name == "student" or role != dataclasses.replace(getattr(defaults, name), family=family):
            roles[name] = _plain(role)
    return {
        "recipe": {"family": family, "method": method},
        "roles": roles,
        "training": _plain(cfg.training),
        "method_config": _plain(cfg.method),
        "data": _plain(cfg.data),
        "validation": _plain(cfg.validation),
        "tracking": _plain(cfg.tracking),
    }


class _Dumper(yaml.SafeDumper):
    """Block mappings, lists on one line (timesteps, betas, data paths)."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def write(path: str | Path, method: str, cfg) -> Path:
    """Write `dump(method, cfg)` as YAML (JSON when the suffix is .json)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    d = dump(method, cfg)
    if p.suffix == ".json":
        p.write_text(json.dumps(d, indent=2) + "\n")
    else:
        header = (f"# The resolved fvfunc run (schema v2, fvfunc field names).\n"
                  f"# Rerun it with: python train.py {method} --config {p}\n")
        p.write_text(header + yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=100))
    return p
