"""FastVideo's current trainer YAML (`fastvideo/train`) read as the schema-v2 file it means.

That layout names each model and the method by a `_target_` class and nests the training keys:

    models.<role>: {_target_, init_from, trainable, disable_custom_init_weights}
                                        -> roles.<role>: {family, path, trainable}; the family is the
                                           class name less "Model", lower-cased (WanModel -> wan)
    method: {_target_, <method keys>}   -> recipe.method (the spec whose FastVideoKeys.target is the
                                           class name) and method_config
    training.distributed / data / optimizer / loop / checkpoint / model
                                        -> training.<key> (TrainingArgs' flat names)
    training.tracker.project_name, run_name -> training.tracker_project_name, wandb_run_name
    training.vsa.sparsity (or vsa_sparsity) -> training.VSA_sparsity (training.model.VSA_* of the early
                                           layout pass as they are; vsa.cache_tile_buf is unused)
    training.data.data_path: {path: n}  -> "path:n" entries
    callbacks.grad_clip.max_grad_norm   -> training.max_grad_norm (no grad_clip: no clipping)
    callbacks.ema.decay, start_iter     -> training.ema_decay, ema_start_step
    callbacks.validation.dataset_file, every_steps, sampling_steps, sampling_timesteps, guidance_scale
                                        -> training.validation_dataset_file, log_validation +
                                           validation_steps, validation_sampling_steps,
                                           validation.sampler.timesteps, validation_guidance_scale
    pipeline.flow_shift, sampler_kind   -> pipeline_config

Keys fvfunc has no use for (the device layout, callbacks' output options, pipeline targets) are
returned in a list for one note; a key this module does not know is an error naming its path.
This layout's DMD2 already writes CFG in the standard form (uncond + w (cond - uncond)).
"""

from __future__ import annotations

from typing import Any

# flat TrainingArgs names each nested training section may hold
_SECTIONS = {
    "distributed": ("num_gpus", "tp_size", "sp_size", "hsdp_replicate_dim", "hsdp_shard_dim", "pin_cpu_memory"),
    "data": ("data_path", "preprocessed_data_type", "train_batch_size", "dataloader_num_workers",
             "training_cfg_rate", "seed", "num_height", "num_width", "num_latent_t", "num_frames"),
    "optimizer": ("learning_rate", "betas", "weight_decay", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles",
                  "lr_power", "min_lr_ratio"),
    "loop": ("max_train_steps", "gradient_accumulation_steps"),
    "checkpoint": ("output_dir", "resume_from_checkpoint", "training_state_checkpointing_steps",
                   "checkpoints_total_limit"),
    "model": ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "precondition_outputs", "moba_config",
              "enable_gradient_checkpointing_type", "VSA_sparsity", "VSA_decay_rate", "VSA_decay_interval_steps"),
}
_TRACKER = {"project_name": "tracker_project_name", "run_name": "wandb_run_name", "trackers": "trackers",
            "entity": "entity"}
_TOP_TRAINING = ("model_path", "dit_precision")  # read and unused
_VALIDATION_UNUSED = ("_target_", "pipeline_target", "run_at_start", "num_videos_per_prompt", "output_dir",
                      "use_validation_media_conditioning", "overlay_actions", "keyboard_value_scale", "metrics_config",
                      "offload_training_state", "unload_pipeline_after_validation", "attn_qat_infer",
                      "pipeline_kwargs", "num_frames", "seed")


class LayoutError(ValueError):
    """A fastvideo/train file fvfunc cannot read; the message names the key."""


def is_train_layout(raw: dict) -> bool:
    """A fastvideo/train file: `models:` of `_target_` classes and a `method:` mapping."""
    models = raw.get("models")
    return isinstance(models, dict) and isinstance(raw.get("method"), dict) and any(
        isinstance(m, dict) and "_target_" in m for m in models.values())


def _class(target: Any, where: str) -> str:
    if not isinstance(target, str) or not target.strip():
        raise LayoutError(f"{where}: expected a class path such as fastvideo.train.models.wan.WanModel")
    return target.rsplit(".", 1)[-1]


def _mapping(v: Any, where: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise LayoutError(f"{where}: expected a mapping, got {type(v).__name__}")
    return v


def translate(raw: dict, methods: dict[str, str], families: tuple[str, ...],
              roles: tuple[str, ...]) -> tuple[dict, list[str]]:
    """(the schema-v2 mapping `raw` means, the key paths read and unused). methods: FastVideo method
    class name -> fvfunc method; families: fvfunc's family names; roles: fvfunc's role names."""
    unknown = sorted(set(raw) - {"models", "method", "training", "callbacks", "pipeline"})
    if unknown:
        raise LayoutError(f"unknown key {unknown[0]} (a fastvideo/train file has models:, method:, training:, "
                          "callbacks: and pipeline:)")
    ignored: list[str] = []
    out: dict[str, dict] = {"recipe": {}, "roles": {}, "training": {}, "method_config": {}, "pipeline_config": {}}
    t = out["training"]

    for role, m in _mapping(raw["models"], "models").items():
        where = f"models.{role}"
        m = _mapping(m, where)
        if role not in roles:
            raise LayoutError(f"{where}: fvfunc's roles are {', '.join(roles)}")
        family = _class(m.get("_target_"), f"{where}._target_").removesuffix("Model").lower()
        if family not in families:
            raise LayoutError(f"{where}._target_: {m['_target_']!r} is not a family fvfunc has "
                              f"({', '.join(families)})")
        r = out["roles"][role] = {"family": family}
        for k, v in m.items():
            if k == "init_from":
                r["path"] = v
            elif k in ("trainable", "disable_custom_init_weights"):
                r[k] = v
            elif k != "_target_":
                raise LayoutError(f"unknown key {where}.{k} (fvfunc reads _target_, init_from, trainable)")

    method = _mapping(raw["method"], "method")
    name = _class(method.get("_target_"), "method._target_")
    if name not in methods:
        raise LayoutError(f"method._target_: {method['_target_']!r} is not a method fvfunc has (it reads "
                          f"{', '.join(sorted(methods))})")
    out["recipe"] = {"method": methods[name], "family": out["roles"].get("student", {}).get("family", "wan")}
    out["method_config"] = {k: v for k, v in method.items() if k != "_target_"}

    for section, v in _mapping(raw.get("training"), "training").items():
        if section in _SECTIONS:
            for k, x in _mapping(v, f"training.{section}").items():
                if k not in _SECTIONS[section]:
                    raise LayoutError(f"unknown key training.{section}.{k} (known: {', '.join(_SECTIONS[section])})")
                if k == "data_path" and isinstance(x, dict):  # {path: repeats}
                    x = [f"{p}:{n}" for p, n in x.items()]
                t[k] = x
        elif section == "tracker":
            for k, x in _mapping(v, "training.tracker").items():
                if k not in _TRACKER:
                    raise LayoutError(f"unknown key training.tracker.{k} (known: {', '.join(_TRACKER)})")
                t[_TRACKER[k]] = x
        elif section == "vsa":
            for k, x in _mapping(v, "training.vsa").items():
                if k == "sparsity":
                    t["VSA_sparsity"] = x
                elif k == "cache_tile_buf":
                    ignored.append("training.vsa.cache_tile_buf")
                else:
                    raise LayoutError(f"unknown key training.vsa.{k} (known: sparsity, cache_tile_buf)")
        elif section == "vsa_sparsity":
            t["VSA_sparsity"] = v
        elif section in _TOP_TRAINING or section == "vsa_cache_tile_buf":
            ignored.append(f"training.{section}")
        else:
            raise LayoutError(f"unknown key training.{section} (known: {', '.join([*_SECTIONS, 'tracker'])})")

    for cb, v in _mapping(raw.get("callbacks"), "callbacks").items():
        v = _mapping(v, f"callbacks.{cb}")
        if cb == "grad_clip":
            if "max_grad_norm" in v:
                t["max_grad_norm"] = v["max_grad_norm"]
        elif cb == "ema":
            if "decay" in v:
                t["ema_decay"], t["use_ema"] = v["decay"], True
            if "start_iter" in v:
                t["ema_start_step"] = v["start_iter"]
        elif cb == "validation":
            _validation(v, out, ignored)
        else:
            ignored.append(f"callbacks.{cb}")

    for k, v in _mapping(raw.get("pipeline"), "pipeline").items():
        if k in ("flow_shift", "sampler_kind"):
            out["pipeline_config"][k] = v
        else:
            ignored.append(f"pipeline.{k}")
    return out, ignored


def _validation(v: dict, out: dict, ignored: list[str]) -> None:
    t = out["training"]
    for k, x in v.items():
        if k == "dataset_file":
            t["validation_dataset_file"] = x
        elif k == "every_steps":
            t["log_validation"], t["validation_steps"] = True, x
        elif k == "sampling_steps":
            t["validation_sampling_steps"] = ",".join(str(s) for s in x) if isinstance(x, list) else x
        elif k == "sampling_timesteps":
            out.setdefault("validation", {}).setdefault("sampler", {})["timesteps"] = x
        elif k == "guidance_scale":
            t["validation_guidance_scale"] = x
        elif k in _VALIDATION_UNUSED:
            if k != "_target_":
                ignored.append(f"callbacks.validation.{k}")
        else:
            raise LayoutError(f"unknown key callbacks.validation.{k}")
