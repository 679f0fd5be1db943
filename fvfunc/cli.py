"""The command line of train.py: one tyro subcommand per method, a run file as defaults, `check`.

    python train.py dmd2 --roles.student.path DIR --roles.teacher.path DIR --roles.critic.path DIR \\
        --data.path DATA
    python train.py dmd2 --config examples/dmd2.yaml --training.lr 1e-6   # flags override the file
    python train.py --config examples/dmd2.yaml                            # method from recipe.method

`parse` turns argv into (method, run config): `--config FILE` is found before tyro runs, the file
(schema v2, `fvfunc/config_file.py`) becomes the chosen subcommand's defaults, and tyro applies the
flags on top. `check` then refuses a run that cannot work, before any model loads, with one
`ConfigError` naming the field. `main` prints that as `error: ...` and returns 2 (tyro's own usage
errors exit 2 too), else hands the run to `fvfunc.trainer.run`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, Union

import tyro

import configs
from fvfunc import config_file
from fvfunc.config_file import ConfigError

__all__ = ["ConfigError", "check", "main", "parse"]

DESCRIPTION = ("Distil or finetune a video diffusion model (Wan2.1). `train.py METHOD --help` lists every "
               "field; `--config FILE` loads a schema-v2 YAML/JSON run as defaults, flags override it.")


def _config_arg(argv: list[str]) -> str | None:
    """The value of the last --config in argv, if any (tyro would take the last one too)."""
    path = None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    return path


def parse(argv: list[str]) -> tuple[str, Any]:
    """(method, run config) from the command line. Raises ConfigError for a bad run file or an
    unknown command and SystemExit for --help and tyro's usage errors (code 2, with a did-you-mean)."""
    argv = list(argv)
    runs = config_file.runs()
    known = [*runs, "sample", "preprocess", "export"]
    if argv and not argv[0].startswith("-") and argv[0] not in known:
        close = difflib.get_close_matches(argv[0], known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown command {argv[0]!r}{hint}; the commands are {', '.join(known)} "
                          "(train.py --help)")
    method = argv[0] if argv and argv[0] in runs else None
    defaults: dict[str, Any] = {}
    path = _config_arg(argv)
    if path:
        method, defaults[method] = config_file.load(path, method)
        if argv[0] != method:  # `train.py --config FILE`: the file names the method
            argv.insert(0, method)
    commands = {**runs, "sample": configs.SampleRun, "preprocess": configs.PreprocessRun, "export": configs.ExportRun}
    choices = tuple(
        Annotated[run, tyro.conf.subcommand(name, default=defaults.get(name, run()),
                                            description=run.__doc__)]
        for name, run in commands.items())
    cfg = tyro.cli(Union[choices], args=argv, prog="train.py", description=DESCRIPTION)  # noqa: UP007
    return next(name for name, run in commands.items() if type(cfg) is run), cfg


# ------------------------------------------------------------------------------------------ check


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_timesteps(timesteps, where: str) -> None:
    from fvfunc.samplers import timesteps_to_sigmas

    try:
        timesteps_to_sigmas(list(timesteps))
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_betas(betas, where: str) -> None:
    _need(all(0 <= b < 1 for b in betas), f"{where} {tuple(betas)} must each be in [0, 1)")


def _check_writable(folder: str, where: str) -> None:
    """`folder` (made if absent) can be written: it, or its nearest existing parent, is a folder a file
    can be created in. Tested by creating one, which also catches read-only file systems."""
    p = Path(folder)
    _need(not p.exists() or p.is_dir(), f"{where}: {p} is a file, not a folder")
    base = p
    while not base.exists():
        base = base.parent
    _need(base.is_dir(), f"{where}: {p} cannot be made, {base} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fvfunc-write-test-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{where}: cannot write into {base} ({e.strerror or e})") from None


def _check_training(t: configs.TrainingConfig) -> None:
    _need(bool(t.output_dir), "training.output_dir is empty")
    _check_writable(t.output_dir, "training.output_dir")
    bad = [f for f in t.allow_changes if f != "all" and not re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+", f)]
    if bad:
        raise ConfigError(f"training.allow_changes: {bad[0]!r} is not a field name (such as training.lr), nor 'all'")
    _need(t.max_steps >= 1, f"training.max_steps must be >= 1, got {t.max_steps}")
    _need(t.batch_size >= 1, f"training.batch_size must be >= 1, got {t.batch_size}")
    _need(t.micro_batches >= 1, f"training.micro_batches must be >= 1, got {t.micro_batches}")
    _need(t.batch_size % t.micro_batches == 0, f"training.batch_size ({t.batch_size}) must be divisible by "
          f"training.micro_batches ({t.micro_batches})")
    _need(math.isfinite(t.lr) and t.lr > 0, f"training.lr must be > 0, got {t.lr:g}")
    _need(t.warmup_steps >= 0, f"training.warmup_steps must be >= 0, got {t.warmup_steps}")
    _need(t.lr_schedule != "cosine" or t.warmup_steps < t.max_steps, "training.warmup_steps "
          f"({t.warmup_steps}) must be < training.max_steps ({t.max_steps}) for the cosine schedule")
    _need(0 <= t.min_lr_ratio <= 1, f"training.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio:g}")
    _check_betas(t.betas, "training.betas")
    _need(t.eps > 0, f"training.eps must be > 0, got {t.eps:g}")
    _need(t.weight_decay >= 0, f"training.weight_decay must be >= 0, got {t.weight_decay:g}")
    _need(t.max_grad_norm >= 0, f"training.max_grad_norm must be >= 0 (0 disables clipping), got "
          f"{t.max_grad_norm:g}")
    _need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None,
          f"training.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    _need(t.remat == "none" or t.grad_transform == "autograd", f"training.remat {t.remat!r} needs "
          "training.grad_transform 'autograd' (torch.func.grad cannot run through activation checkpointing)")
    _need(t.attention != "fa4" or importlib.util.find_spec("flash_attn") is not None,
          "training.attention 'fa4' needs the flash-attn-4 package: pip install 'fvfunc[fa4]'")
    _need(0 <= t.remat_fraction <= 1, f"training.remat_fraction must be in [0, 1], got {t.remat_fraction:g}")
    _need(t.sp_size >= 1, f"training.sp_size must be >= 1, got {t.sp_size}")
    _need(t.sp_size == 1 or t.grad_transform == "autograd", f"training.sp_size {t.sp_size} needs "
          "training.grad_transform 'autograd' (torch.func.grad cannot differentiate through the all-to-alls)")
    if t.attention == "vsa":
        _need(0 <= t.vsa_sparsity < 1, f"training.vsa_sparsity must be in [0, 1), got {t.vsa_sparsity:g}")
        _need(t.vsa_decay_interval_steps <= 1 or t.vsa_decay_rate > 0, "training.vsa_decay_rate must be > 0 "
              f"with a warm-up every {t.vsa_decay_interval_steps} steps (training.vsa_decay_interval_steps), got "
              f"{t.vsa_decay_rate:g}")
        _need(t.vsa_decay_rate >= 0, f"training.vsa_decay_rate must be >= 0, got {t.vsa_decay_rate:g}")
        _need(t.vsa_dense != "fa4" or importlib.util.find_spec("flash_attn") is not None,
              "training.vsa_dense 'fa4' needs the flash-attn-4 package: pip install 'fvfunc[fa4]'")
    _need(t.checkpoint_every >= 0, f"training.checkpoint_every must be >= 0, got {t.checkpoint_every}")
    _need(t.keep_checkpoints >= 0, f"training.keep_checkpoints must be >= 0 (0 keeps all), got "
          f"{t.keep_checkpoints}")
    _need(t.log_every >= 1, f"training.log_every must be >= 1, got {t.log_every}")


def _check_validation(v: configs.ValidationConfig) -> None:
    _need(v.every >= 0, f"validation.every must be >= 0 (0 disables validation), got {v.every}")
    if v.sampler.timesteps:
        _check_timesteps(v.sampler.timesteps, "validation.sampler.timesteps")
    else:
        _need(v.sampler.num_steps >= 1,
              f"validation.sampler.num_steps must be >= 1, got {v.sampler.num_steps}")
        _need(v.sampler.shift > 0, f"validation.sampler.shift must be > 0, got {v.sampler.shift:g}")
    _need(v.num_prompts >= 1, f"validation.num_prompts must be >= 1, got {v.num_prompts}")
    _need(min(v.num_frames, v.height, v.width) >= 0, "validation.num_frames, height and width must be >= 0 "
          "(0 takes the training data's shape)")
    _need(v.fps >= 1, f"validation.fps must be >= 1, got {v.fps}")
    _need(v.vsa_sparsity < 1, f"validation.vsa_sparsity must be < 1 (negative: the training target), got "
          f"{v.vsa_sparsity:g}")
    if v.every and v.prompts:
        _need(Path(v.prompts).is_dir(), f"validation.prompts: folder {v.prompts} does not exist")


def _check_data(method: str, cfg, columns) -> None:
    from fvfunc.data import DataError, parse_specs

    what = " and ".join(c.what for c in columns)
    _need(bool(cfg.data.path), f"data.path is empty: {method} reads {what} of a FastVideo-preprocessed "
          "parquet dataset; pass --data.path DIR")
    try:
        specs = parse_specs(cfg.data.path)
    except DataError as e:
        raise ConfigError(f"data.path: {e}") from None
    for folder, _ in specs:
        _need(folder.is_dir(), f"data.path: folder {folder} does not exist")
    _need(cfg.data.text_len >= 1, f"data.text_len must be >= 1, got {cfg.data.text_len}")
    _need(cfg.data.num_workers >= 0, f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    _need(cfg.data.shuffle_window >= 1, f"data.shuffle_window must be >= 1, got {cfg.data.shuffle_window}")


def _check_roles(method: str, roles_needed, trainable, roles: configs.RolesConfig) -> None:
    """Each role the method needs: a known family, a model folder the family reads (with weights of
    the role's variant), the right trainable flag; and all of them on the same latents (channels,
    patch size)."""
    from fvfunc.models import family

    first = None
    for name in roles_needed:
        role, where = getattr(roles, name), f"roles.{name}"
        try:
            fam = family(role.family)
        except ValueError as e:
            raise ConfigError(f"{where}.family: {e}") from None
        _need(bool(role.path), f"{where}.path is empty: {method} needs a {name} model (a diffusers model "
              f"folder); pass --{where}.path DIR")
        if name in trainable:
            _need(role.trainable, f"{where}.trainable is false, but {method} trains the {name}")
        else:
            _need(not role.trainable, f"{where}.trainable is true, but {method} never updates the {name}: "
                  f"it stays frozen (set --{where}.no-trainable)")
            _need(role.ema_decay == 0, f"{where}.ema_decay is {role.ema_decay:g}, but {method} never updates the "
                  f"{name}: an EMA of it would never move")
        _need(0 <= role.ema_decay < 1, f"{where}.ema_decay must be in [0, 1) (0 keeps no EMA), got "
              f"{role.ema_decay:g}")
        try:
            model_cfg = fam.load_config(role.path)
            facts = fam.latents(model_cfg, role.path)
            if fam.stored_dtypes is not None:  # the weights of roles.<role>.variant exist (headers only)
                fam.stored_dtypes(role.path, role.variant)
        except (ValueError, OSError) as e:
            raise ConfigError(f"{where}.path: {e}") from None
        latents = (facts.channels, tuple(facts.patch))
        if first is None:
            first = (name, latents)
            continue
        ref, (channels, patch) = first[0], first[1]
        _need(latents[0] == channels, f"{where}.path: {latents[0]} latent channels, but roles.{ref} has "
              f"{channels}; every role must work on the same latents")
        _need(latents[1] == patch, f"{where}.path: patch size {latents[1]}, but roles.{ref} has {patch}; "
              "every role must use the same patch size")


def _check_sample(cfg: configs.SampleRun) -> None:
    from fvfunc.text import find_encoder

    _need(bool(cfg.model), "model: give a model folder or a checkpoint folder (--model DIR)")
    _need(Path(cfg.model).exists(), f"model: {cfg.model} does not exist")
    _need(bool(cfg.prompt) != bool(cfg.prompts), "prompts: give the prompts as text (--prompt TEXT ...) or as "
          "a file (--prompts PATH: a parquet folder, a .txt file, a .safetensors file), one of the two")
    if cfg.prompts:
        p = Path(cfg.prompts)
        _need(p.exists(), f"prompts: {p} does not exist")
        _need(p.is_dir() or p.suffix in (".txt", ".safetensors"), f"prompts: {p} is not a parquet folder, a .txt "
              "file of prompts or a .safetensors file of embeddings")
    encoder = find_encoder(cfg.model)
    as_text = bool(cfg.prompt) or Path(cfg.prompts).suffix == ".txt"
    _need(encoder is not None or not as_text, f"prompts: text prompts need the pipeline's umT5, but {cfg.model} "
          "has no text_encoder/ and tokenizer/ (give embeddings: --prompts FOLDER or FILE)")
    _need(encoder is not None or not cfg.negative_prompt or bool(cfg.negative_prompt_embedding),
          f"negative_prompt: text needs the pipeline's umT5, but {cfg.model} has no text_encoder/ and "
          "tokenizer/ (give --negative-prompt-embedding FILE)")
    for name in ("negative_prompt_embedding", "noise"):
        path = getattr(cfg, name)
        _need(not path or Path(path).is_file(), f"{name}: {path} is not a file")
        _need(not path or Path(path).suffix == ".safetensors", f"{name}: {path} is not a .safetensors file")
    _need(bool(cfg.output_dir), "output_dir is empty")
    _check_writable(cfg.output_dir, "output_dir")
    _need(cfg.num_prompts >= 0, f"num_prompts must be >= 0 (0: all), got {cfg.num_prompts}")
    _need(cfg.vsa_sparsity < 1, f"vsa_sparsity must be < 1 (negative: dense, or a VSA run's target), got "
          f"{cfg.vsa_sparsity:g}")
    _need(all(n >= 1 for n in cfg.latent_shape), f"latent_shape must be positive, got {cfg.latent_shape}")
    if cfg.sampler.timesteps:
        _check_timesteps(cfg.sampler.timesteps, "sampler.timesteps")
    else:
        _need(cfg.sampler.num_steps >= 1, f"sampler.num_steps must be >= 1, got {cfg.sampler.num_steps}")
        _need(cfg.sampler.shift > 0, f"sampler.shift must be > 0, got {cfg.sampler.shift:g}")
    _check_images(cfg)


def _check_images(cfg: configs.SampleRun) -> None:
    """The conditioning images against the model: readable files, one for all prompts or one per prompt,
    given to an image-to-video model only, and given (or in the parquet rows) where the model needs them."""
    from PIL import Image

    for field in ("image", "last_image"):
        for p in map(Path, getattr(cfg, field)):
            _need(p.is_file(), f"{field}: {p} is not a file")
            try:
                with Image.open(p) as im:
                    im.verify()
            except Exception as e:  # PIL raises many kinds for a file it cannot read
                raise ConfigError(f"{field}: {p} is not an image file PIL can read ({e})") from None
    n = len(cfg.prompt)
    _need(not n or len(cfg.image) in (0, 1, n), f"image: {len(cfg.image)} images for {n} prompts (give one for "
          "every prompt or one per prompt)")
    fam, model_cfg = _sample_model(cfg)
    takes = fam.conditions(model_cfg)
    _need(not cfg.image or (bool(takes) and fam.image_encoder is not None), f"image: {cfg.model} is a text-to-video "
          "model (it takes no image condition); --image is for image-to-video models (Wan2.1 I2V, Wan2.2 TI2V)")
    _need(not any(takes.values()) or bool(cfg.image) or Path(cfg.prompts).is_dir(), f"image: {cfg.model} is an "
          "image-to-video model: give --image FILE (one for every prompt or one per prompt), or --prompts an i2v "
          "parquet folder whose rows hold the image condition")
    two = bool(takes) and fam.last_image(model_cfg)
    _need(not cfg.last_image or two, f"last_image: {cfg.model} takes no last frame (--last-image is for "
          "first-and-last-frame models, Wan2.1 FLF2V)")
    _need(not two or not cfg.image or len(cfg.last_image) == len(cfg.image), f"last_image: {cfg.model} is a "
          f"first-and-last-frame model: give a --last-image for every --image ({len(cfg.image)} given, "
          f"{len(cfg.last_image)} last)")


def _sample_model(cfg: configs.SampleRun):
    """(family, model config) of the sample command's model: its folder's, or a checkpoint's student's."""
    from fvfunc import checkpoint
    from fvfunc.models import ModelError, family

    name, folder = cfg.family, Path(cfg.model)
    try:
        if (folder / "meta.json").is_file():  # a checkpoint: its student's folder and family
            m = checkpoint.read_meta(folder)
            folder, name = Path(m["roles"]["student"]), m["config"]["roles"]["student"].get("family", name)
        fam = family(name)
        mcfg = fam.load_config(folder)
    except (ModelError, KeyError, ValueError, checkpoint.CheckpointError) as e:
        raise ConfigError(f"model: {cfg.model}: {e}") from None
    from fvfunc import roles

    try:
        roles.check_files(fam, folder, cfg.lora, "lora")
    except roles.RoleError as e:
        raise ConfigError(str(e)) from None
    return fam, mcfg


def _check_export(cfg: configs.ExportRun) -> None:
    """A checkpoint whose student can be exported, and an output folder that is new or an old export."""
    from fvfunc import checkpoint

    _need(bool(cfg.checkpoint), "checkpoint: give a run's checkpoint folder (--checkpoint RUN/checkpoint-N)")
    ckpt = Path(cfg.checkpoint)
    _need((ckpt / "meta.json").is_file(), f"checkpoint: {ckpt} is not a checkpoint folder (no meta.json)")
    try:
        meta = checkpoint.read_meta(ckpt)
        folder = meta["roles"]["student"]
    except (checkpoint.CheckpointError, KeyError, TypeError) as e:
        raise ConfigError(f"checkpoint: {ckpt}: unreadable meta.json ({e})") from None
    _need(bool(folder) and Path(folder).is_dir(), f"checkpoint: {ckpt}'s student was trained from {folder!r}, which "
          "is not a folder here (the export carries that pipeline's other components)")
    _need(bool(cfg.output), "output: give the folder to write (--output DIR)")
    out = Path(cfg.output)
    _need(not out.exists() or out.is_dir(), f"output: {out} is a file")
    _need(not out.is_dir() or not any(out.iterdir()) or (out / "transformer").is_dir(), f"output: {out} holds files "
          "and is no export (no transformer/); give a new folder (an old export is replaced, nothing else)")
    _check_writable(cfg.output, "output")


def _check_pair_guidance(scale_2, family_name: str, folder, where: str) -> None:
    """A second CFG weight (guidance_scale_2) is an expert pair's: refuse it for one model."""
    if scale_2 is None or not folder:
        return
    from fvfunc import checkpoint
    from fvfunc.models import family

    folder = Path(folder)
    try:
        if (folder / "meta.json").is_file():  # a checkpoint: its student's folder
            folder = Path(checkpoint.read_meta(folder)["roles"]["student"])
        pair = family(family_name).experts(folder)
    except (ValueError, KeyError, checkpoint.CheckpointError) as e:
        raise ConfigError(f"{where}: {e}") from None
    _need(pair is not None, f"{where} {scale_2:g} is the low-noise expert's CFG weight of an expert pair (Wan2.2 "
          f"A14B), but {folder} is one model; drop it")


def check(method: str, cfg) -> None:
    """Refuse a run that cannot work, before any model loads: raises one ConfigError whose message
    names the field (`roles.teacher.path`, `training.batch_size`, ...). Reads only config files
    (config.json, model_index.json) and safetensors headers."""
    if method == "sample":
        _check_sample(cfg)
        _check_pair_guidance(cfg.sampler.guidance_scale_2, cfg.family, cfg.model, "sampler.guidance_scale_2")
        return
    if method == "preprocess":
        importlib.import_module("fvfunc.preprocess.inputs").check(cfg)
        return
    if method == "export":
        _check_export(cfg)
        return
    _need(method in configs.RUNS, f"unknown method {method!r}; known: {', '.join(configs.RUNS)}")
    _check_training(cfg.training)  # plain config checks first: their errors come before torch is imported
    _check_validation(cfg.validation)
    from fvfunc.losses import METHODS

    spec = METHODS[method]
    try:
        spec.check(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_data(method, cfg, spec.data(cfg))
    _check_roles(method, spec.roles(cfg), spec.trainable, cfg.roles)
    _check_pair_guidance(cfg.validation.sampler.guidance_scale_2, cfg.roles.student.family, cfg.roles.student.path,
                         "validation.sampler.guidance_scale_2")


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Parse, check, train. Returns the exit code: 0 done, 2 a bad command line or run config, 1 a run
    that stopped on bad data, a bad model or a training error."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        method, cfg = parse(argv)
        check(method, cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help (0) or a tyro usage error (2)
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    # imported here so that --help and config errors stay fast (no torch, no model code)
    import torch

    trainer = importlib.import_module("fvfunc.trainer")
    from fvfunc.data import DataError
    from fvfunc.losses.spec import BatchError
    from fvfunc.models import ModelError

    # the entry point's own business: log lines (rank 0 says what happens, the others only warn) and the
    # global RNG, which fvfunc never reads (it passes keys) but libraries such as diffusers do
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    if method == "preprocess":  # no training: encoders, files and its own errors (fvfunc/preprocess/run.py)
        return importlib.import_module("fvfunc.preprocess.run").main(cfg)
    if method == "export":
        from fvfunc.checkpoint import CheckpointError

        try:
            importlib.import_module("fvfunc.export").export_checkpoint(cfg.checkpoint, cfg.output, cfg.use_ema,
                                                                        cfg.dtype)
        except (CheckpointError, ModelError, OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    seed = cfg.sampler.seed if method == "sample" else cfg.training.seed
    torch.manual_seed(seed)

    from fvfunc.checkpoint import CheckpointError

    try:
        if method == "sample":
            importlib.import_module("fvfunc.sample").sample_command(cfg)
        else:
            trainer.run(method, cfg)
    except ConfigError as e:  # bad input the run found before any model loaded (a checkpoint of another run)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (trainer.TrainingError, DataError, ModelError, BatchError, CheckpointError) as e:  # already clear
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the machine's: a full disk, a folder that cannot be written
        what = f"{e.filename}: " if e.filename else ""
        print(f"error: {what}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C (the first one saves a checkpoint and stops)
        print("error: interrupted: stopped at once, without saving; resume with --training.resume latest from "
              "the last checkpoint", file=sys.stderr)
        return 130
    return 0
