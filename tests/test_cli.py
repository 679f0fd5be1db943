"""train.py's command line (fvfunc/cli.py) and schema-v2 run files (fvfunc/config_file.py).

Every bad run must stop in `check` with one message naming the field, before the trainer is reached;
the trainer is replaced by a recorder here, so nothing trains.
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

import configs
from fvfunc import cli, config_file
from fvfunc.config_file import ConfigError
from fvfunc.testing import tiny

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "COLUMNS": "200"}  # wide help text, so phrases are not wrapped


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny Wan folders (one with 32 latent channels, one with another patch size) and a data folder."""
    root = tmp_path_factory.mktemp("cli")
    tiny.write_pipeline(root / "m")
    tiny.write_pipeline(root / "m32", cfg=tiny.tiny_config(in_channels=32, out_channels=32))
    tiny.write_pipeline(root / "p1", cfg=tiny.tiny_config(patch_size=(1, 1, 1)))
    (root / "data").mkdir()
    return {k: str(root / k) for k in ("m", "m32", "p1", "data")} | {"missing": str(root / "missing")}


@pytest.fixture
def trainer(monkeypatch):
    """A stand-in fvfunc.trainer that records what main hands it."""
    calls = []
    fake = types.ModuleType("fvfunc.trainer")
    fake.TrainingError = type("TrainingError", (RuntimeError,), {})
    fake.run = lambda method, cfg: calls.append((method, cfg))
    monkeypatch.setitem(sys.modules, "fvfunc.trainer", fake)
    return calls


def dmd2_args(f):
    roles = [a for r in ("student", "teacher", "critic") for a in (f"--roles.{r}.path", f["m"])]
    return ["dmd2", *roles, "--data.path", f["data"]]


def finetune_args(f):
    return ["finetune", "--roles.student.path", f["m"], "--data.path", f["data"]]


def run_main(argv, capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def train_py(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)


# --------------------------------------------------------------------------------------- help / tyro


def test_help_lists_the_methods():
    r = train_py("--help")
    assert r.returncode == 0, r.stderr
    assert "finetune" in r.stdout and "dmd2" in r.stdout
    assert "few-step student with DMD2" in r.stdout  # the run's docstring


def test_method_help_shows_every_field_with_its_doc():
    r = train_py("dmd2", "--help")
    assert r.returncode == 0, r.stderr
    for flag in ("--roles.teacher.path", "--training.max-steps", "--data.path", "--tracking.wandb-mode",
                 "--validation.sampler.timesteps", "--method.generator-update-interval", "--config"):
        assert flag in r.stdout, flag
    assert "Update the student every N steps" in r.stdout  # a field docstring
    assert "Global batch size per step" in r.stdout


def test_mistyped_flag_exits_2_with_a_suggestion():
    r = train_py("dmd2", "--training.max-step", "3")
    assert r.returncode == 2
    assert "--training.max-steps" in r.stderr + r.stdout


def test_mistyped_flag_in_main_returns_2(trainer):
    assert cli.main(["dmd2", "--trainig.lr", "3"]) == 2
    assert cli.main(["dmd3"]) == 2
    assert not trainer


def test_no_trainer_import_before_the_check_fails(folders):
    code = ("import sys, fvfunc.cli; rc = fvfunc.cli.main(sys.argv[1:]); "
            "assert 'fvfunc.trainer' not in sys.modules and 'fvfunc.models.wan' in sys.modules; sys.exit(rc)")
    argv = ["dmd2", "--roles.student.path", folders["m"], "--roles.teacher.path", folders["m"],
            "--data.path", folders["data"]]
    r = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == ("error: roles.critic.path is empty: dmd2 needs a critic model (a diffusers "
                                "model folder); pass --roles.critic.path DIR")


# ------------------------------------------------------------------------------------------- check


def test_a_good_run_reaches_the_trainer(folders, trainer, capsys):
    assert run_main(dmd2_args(folders) + ["--training.max-steps", "7"], capsys) == (0, "")
    (method, cfg), = trainer
    assert method == "dmd2" and isinstance(cfg, configs.DMD2Run)
    assert cfg.training.max_steps == 7 and cfg.roles.critic.path == folders["m"]
    assert cfg.data.path == (folders["data"],)
    assert run_main(finetune_args(folders), capsys) == (0, "")
    assert trainer[1][0] == "finetune"


BAD_DMD2 = [
    (["--roles.teacher.path", ""], "roles.teacher.path is empty"),
    (["--roles.teacher.trainable"], "roles.teacher.trainable is true"),
    (["--roles.critic.no-trainable"], "roles.critic.trainable is false"),
    (["--roles.critic.path", "{missing}"], "roles.critic.path: {missing}: model folder does not exist"),
    (["--roles.critic.path", "{data}"], "roles.critic.path: {data}: not a Wan transformer folder"),
    (["--roles.critic.path", "{m32}"], "roles.critic.path: 32 latent channels, but roles.student has 16"),
    (["--roles.teacher.path", "{p1}"], "roles.teacher.path: patch size (1, 1, 1), but roles.student has "
     "(1, 2, 2)"),
    (["--roles.teacher.family", "hunyuan"], "roles.teacher.family: unknown model family 'hunyuan'"),
    (["--method.dmd-denoising-steps", "1000", "250", "500"], "method.dmd_denoising_steps: timesteps must be "
     "strictly descending"),
    (["--method.dmd-denoising-steps", "1200", "500"], "method.dmd_denoising_steps: timestep 1200"),
    (["--method.dmd-denoising-steps"], "method.dmd_denoising_steps: timesteps is empty"),
    (["--validation.sampler.timesteps", "500", "0"], "validation.sampler.timesteps: timestep 0"),
    (["--training.max-steps", "0"], "training.max_steps must be >= 1"),
    (["--training.batch-size", "0"], "training.batch_size must be >= 1"),
    (["--training.batch-size", "6", "--training.micro-batches", "4"], "training.batch_size (6) must be "
     "divisible by training.micro_batches (4)"),
    (["--training.lr", "0"], "training.lr must be > 0"),
    (["--training.lr", "-1e-5"], "training.lr must be > 0"),
    (["--training.keep-checkpoints", "-1"], "training.keep_checkpoints must be >= 0"),
    (["--roles.student.ema-decay", "1.0"], "roles.student.ema_decay must be in [0, 1)"),
    (["--roles.critic.ema-decay", "-0.1"], "roles.critic.ema_decay must be in [0, 1)"),
    (["--roles.teacher.ema-decay", "0.9"], "roles.teacher.ema_decay is 0.9, but dmd2 never updates the teacher"),
    (["--training.remat", "full", "--training.grad-transform", "func"], "training.remat 'full' needs "
     "training.grad_transform 'autograd'"),
    (["--training.lr-schedule", "cosine", "--training.warmup-steps", "4000"], "training.warmup_steps (4000)"),
    (["--training.device", "gpu"], "training.device must be"),
    (["--training.remat-fraction", "1.5"], "training.remat_fraction must be in [0, 1], got 1.5"),
    (["--method.generator-update-interval", "0"], "method.generator_update_interval must be >= 1"),
    (["--method.min-timestep-ratio", "0.5", "--method.max-timestep-ratio", "0.5"],
     "method.min_timestep_ratio and max_timestep_ratio must satisfy 0 <= min < max <= 1"),
    (["--method.max-timestep-ratio", "1.5"], "max_timestep_ratio must satisfy"),
    (["--method.min-timestep-ratio", "-0.1"], "max_timestep_ratio must satisfy"),
    (["--method.critic-lr", "0"], "method.critic_lr must be > 0"),
    (["--data.path"], "data.path is empty: dmd2 reads the text embeddings of"),
    (["--data.path", "{missing}"], "data.path: folder {missing} does not exist"),
]


if importlib.util.find_spec("flash_attn") is None:
    BAD_DMD2.append((["--training.attention", "fa4"], "training.attention 'fa4' needs the flash-attn-4 package"))


@pytest.mark.parametrize("extra, message", BAD_DMD2, ids=[m.split(":")[0][:40] for _, m in BAD_DMD2])
def test_bad_dmd2_runs_stop_with_one_message(folders, trainer, capsys, extra, message):
    code, err = run_main(dmd2_args(folders) + [a.format(**folders) for a in extra], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message.format(**folders) in err
    assert not trainer


BAD_FINETUNE = [
    (["--roles.student.path", ""], "roles.student.path is empty: finetune needs a student model"),
    (["--roles.student.no-trainable"], "roles.student.trainable is false, but finetune trains the student"),
    (["--data.path"], "data.path is empty: finetune reads the text embeddings and the VAE latents"),
    (["--method.cfg-rate", "1.5"], "method.cfg_rate must be in [0, 1]"),
    (["--training.attention", "vsa", "--training.vsa-sparsity", "1"], "training.vsa_sparsity must be in [0, 1)"),
    (["--training.attention", "vsa", "--training.vsa-decay-interval-steps", "50", "--training.vsa-decay-rate",
      "0"], "training.vsa_decay_rate must be > 0 with a warm-up every 50 steps"),
    (["--validation.vsa-sparsity", "1.2"], "validation.vsa_sparsity must be < 1"),
]


@pytest.mark.parametrize("extra, message", BAD_FINETUNE, ids=[m.split(":")[0][:40] for _, m in BAD_FINETUNE])
def test_bad_finetune_runs_stop_with_one_message(folders, trainer, capsys, extra, message):
    code, err = run_main(finetune_args(folders) + extra, capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not trainer


def test_vsa_flags_reach_the_run(folders, trainer, capsys):
    code, _ = run_main(finetune_args(folders) + ["--training.attention", "vsa", "--training.vsa-sparsity", "0.8",
                                                 "--training.vsa-decay-rate", "0.03",
                                                 "--training.vsa-decay-interval-steps", "50",
                                                 "--training.vsa-roles", "all", "--training.vsa-dense", "cudnn"],
                       capsys)
    t = trainer[0][1].training
    assert code == 0 and (t.attention, t.vsa_sparsity, t.vsa_decay_rate, t.vsa_decay_interval_steps, t.vsa_roles,
                          t.vsa_dense) == ("vsa", 0.8, 0.03, 50, "all", "cudnn")


def test_data_mode_dmd2_names_the_latents(folders, trainer, capsys):
    code, err = run_main(dmd2_args(folders) + ["--method.rollout-mode", "data", "--data.path"], capsys)
    assert code == 2 and "text embeddings and the VAE latents" in err


def test_check_raises_config_error(folders):
    method, cfg = cli.parse(finetune_args(folders))
    cli.check(method, cfg)
    with pytest.raises(ConfigError, match=r"training\.max_steps"):
        cli.check(method, dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=0)))
    assert issubclass(ConfigError, ValueError)


# -------------------------------------------------------------------------------------- run files


def write(path: Path, d: dict) -> str:
    path.write_text(yaml.safe_dump(d))
    return str(path)


def test_yaml_loads_and_flags_override_it(folders, trainer, capsys, tmp_path):
    f = write(tmp_path / "run.yaml", {
        "recipe": {"family": "wan", "method": "finetune"},
        "roles": {"student": {"path": folders["m"]}},
        "training": {"lr": 1e-4, "max_steps": 9, "batch_size": 4, "micro_batches": 2},
        "method_config": {"weighting_scheme": "logit_normal", "flow_shift": 5},
        "data": {"path": folders["data"]},
        "tracking": {"wandb_mode": "disabled"}})
    assert run_main(["finetune", "--config", f, "--training.lr", "3e-4", "--training.micro-batches", "4"],
                    capsys) == (0, "")
    (method, cfg), = trainer
    assert method == "finetune" and cfg.config == f
    assert cfg.training.lr == 3e-4 and cfg.training.micro_batches == 4  # flags
    assert cfg.training.max_steps == 9 and cfg.training.batch_size == 4  # file
    assert cfg.method.weighting_scheme == "logit_normal" and cfg.method.flow_shift == 5.0
    assert cfg.roles.student.path == folders["m"] and cfg.tracking.wandb_mode == "disabled"
    assert cfg.training.seed == configs.FinetuneRun().training.seed  # untouched defaults stay


def test_config_without_subcommand_takes_recipe_method(folders, trainer, capsys, tmp_path):
    f = write(tmp_path / "run.yaml", {"recipe": {"method": "finetune"}, "data": {"path": [folders["data"]]},
                                      "roles": {"student": {"path": folders["m"]}}})
    assert run_main(["--config", f], capsys) == (0, "")
    assert run_main([f"--config={f}", "--training.max-steps", "3"], capsys) == (0, "")
    assert [m for m, _ in trainer] == ["finetune", "finetune"] and trainer[1][1].training.max_steps == 3


def test_config_file_values_show_as_help_defaults(tmp_path):
    f = write(tmp_path / "run.yaml", {"recipe": {"method": "dmd2"}, "training": {"max_steps": 1234}})
    r = train_py("dmd2", "--config", f, "--help")
    assert r.returncode == 0 and "1234" in r.stdout


def test_json_run_file(folders, trainer, capsys, tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"recipe": {"method": "finetune"}, "roles": {"student": {"path": folders["m"]}},
                             "training": {"max_steps": 5}, "data": {"path": folders["data"]}}))
    assert run_main(["finetune", "--config", str(f)], capsys) == (0, "")
    assert trainer[0][1].training.max_steps == 5


BAD_FILES = [
    ({"training": {"learing_rate": 1e-5}}, "unknown key training.learing_rate (did you mean "
     "training.learning_rate?)"),
    ({"trainig": {}}, "unknown key trainig (did you mean training?)"),
    ({"validation": {"sampler": {"knd": "ode"}}}, "unknown key validation.sampler.knd (did you mean "
     "validation.sampler.kind?)"),
    ({"roles": {"generator": {"path": "x"}}}, "unknown key roles.generator (known: student, teacher, "
     "critic)"),
    ({"recipe": {"method": "finetune"}}, "recipe.method is 'finetune' but the subcommand is 'dmd2'"),
    ({"training": {"max_steps": "many"}}, "training.max_steps: expected `int`, got `str`"),
    ({"training": {"precision": "fp16"}}, "training.precision: invalid enum value 'fp16' (expected one of"),
    ({"method_config": {"dmd_denoising_steps": [1000, "x"]}}, "method_config.dmd_denoising_steps[1]: "
     "expected `int`"),
    ({"training": {"lr": 1e-5, "learning_rate": 2e-5}}, "training.learning_rate (2e-05) and training.lr "
     "(1e-05) both set training.lr"),
    ({"training": {"mixed_precision": "fp16"}}, "training.mixed_precision: 'fp16' is not supported"),
    ({"training": {"lr_scheduler": "polynomial"}}, "training.lr_scheduler: FastVideo schedule 'polynomial'"),
    ({"method_config": {"attn_kind": "sla"}}, "method_config.attn_kind: 'sla' is not supported"),
    ({"training": {"training_cfg_rate": 0.1}}, "training.training_cfg_rate: fvfunc's dmd2 drops no text"),
    ({"training": {"fake_score_lr_scheduler": "cosine"}}, "the critic's schedule (cosine) must match"),
    ({"distill": {"model": "wan"}}, "unknown key distill (fvfunc reads schema-v2 files"),
    ([1, 2], "expected a mapping"),
]


@pytest.mark.parametrize("content, message", BAD_FILES, ids=[m[:40] for _, m in BAD_FILES])
def test_bad_run_files_exit_2_naming_the_key(folders, trainer, capsys, tmp_path, content, message):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(content))
    code, err = run_main(dmd2_args(folders) + ["--config", str(f)], capsys)
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert not trainer


def test_unreadable_run_files(trainer, capsys, tmp_path):
    code, err = run_main(["dmd2", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "cannot read it" in err
    (tmp_path / "broken.yaml").write_text("training: [\n")
    code, err = run_main(["dmd2", "--config", str(tmp_path / "broken.yaml")], capsys)
    assert code == 2 and "not valid YAML" in err


@pytest.mark.parametrize("method", ["dmd2", "finetune"])
def test_example_yamls_parse_and_pass_check(folders, trainer, capsys, method):
    roles = ("student", "teacher", "critic") if method == "dmd2" else ("student",)
    argv = [method, "--config", f"examples/{method}.yaml", "--data.path", folders["data"]]
    for r in roles:
        argv += [f"--roles.{r}.path", folders["m"]]
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        assert run_main(argv, capsys) == (0, "")
    finally:
        os.chdir(cwd)
    (got, cfg), = trainer
    assert got == method and cfg.training.batch_size == 8 and cfg.training.remat == "full"
    assert cfg.training.precision == "bfloat16" and cfg.tracking.wandb_mode == "offline"
    if method == "dmd2":  # FastVideo's DMD2 defaults (DESIGN.md section 3)
        t, m = cfg.training, cfg.method
        assert (t.lr, t.betas, t.weight_decay, t.max_grad_norm) == (2e-6, (0.0, 0.999), 0.01, 1.0)
        assert (m.critic_lr, m.critic_betas, m.generator_update_interval) == (8e-6, (0.0, 0.999), 5)
        assert (m.real_score_guidance_scale, m.flow_shift, m.rollout_mode) == (4.5, 8.0, "simulate")
        assert m.dmd_denoising_steps == (1000, 750, 500, 250) == cfg.validation.sampler.timesteps
        assert m.latent_shape == (20, 56, 104) and cfg.validation.sampler.kind == "sde"
    else:
        assert cfg.training.lr_schedule == "linear_warmup" and cfg.training.warmup_steps == 100
        assert cfg.method.cfg_rate == 0.1 and cfg.method.flow_shift == 3.0
        assert cfg.validation.sampler.guidance_scale == 5.0 and cfg.validation.sampler.num_steps == 50


# ------------------------------------------------------------------------- FastVideo keys / dump


FASTVIDEO_DMD2 = {  # the shape of FastVideo's phase-3 schema-v2 DMD2 files
    "recipe": {"family": "wan", "method": "dmd2"},
    "roles": {"student": {"family": "wan", "path": "S", "trainable": True},
              "teacher": {"family": "wan", "path": "T", "trainable": False,
                          "disable_custom_init_weights": True},
              "critic": {"family": "wan", "path": "C", "trainable": True,
                         "disable_custom_init_weights": True}},
    "training": {"num_gpus": 8, "sp_size": 2, "tp_size": 1, "data_path": "data/a,data/b:3",
                 "dataloader_num_workers": 4, "train_batch_size": 2, "train_sp_batch_size": 1,
                 "gradient_accumulation_steps": 2, "num_latent_t": 20, "num_height": 448, "num_width": 832,
                 "num_frames": 77, "output_dir": "outputs/x", "max_train_steps": 4000, "seed": 1000,
                 "checkpoints_total_limit": 3, "training_state_checkpointing_steps": 250,
                 "weight_only_checkpointing_steps": 1000, "learning_rate": 2.0e-6, "mixed_precision": "bf16",
                 "betas": "0.0,0.999", "weight_decay": 0.01, "lr_scheduler": "cosine_with_min_lr",
                 "lr_warmup_steps": 10, "max_grad_norm": 1.0, "fake_score_learning_rate": 0.0,
                 "fake_score_betas": "0.0,0.999", "fake_score_lr_scheduler": "cosine_with_min_lr",
                 "training_cfg_rate": 0.0, "min_timestep_ratio": 0.02, "max_timestep_ratio": 0.98,
                 "enable_gradient_checkpointing_type": "full", "tracker_project_name": "proj",
                 "wandb_run_name": "run", "log_validation": False, "validation_steps": 50,
                 "validation_dataset_file": "v.json", "validation_sampling_steps": "8",
                 "validation_guidance_scale": "6.0", "use_ema": False},
    "pipeline_config": {"flow_shift": 5, "sampler_kind": "sde"},
    "method_config": {"rollout_mode": "data", "generator_update_interval": 4,
                      "dmd_denoising_steps": [1000, 850, 700, 550, 350, 275, 200, 125]},
}


def test_fastvideo_keys_map_onto_fvfunc_fields():
    method, cfg = config_file.from_dict(FASTVIDEO_DMD2, "dmd2")
    t, m, v = cfg.training, cfg.method, cfg.validation
    assert method == "dmd2" and cfg.roles.teacher.path == "T" and not cfg.roles.teacher.trainable
    assert t.batch_size == 2 * 2 * 8 // 2 and t.micro_batches == 2  # FastVideo's per-rank batch -> global
    assert (t.max_steps, t.lr, t.betas, t.seed, t.output_dir) == (4000, 2e-6, (0.0, 0.999), 1000, "outputs/x")
    assert (t.lr_schedule, t.min_lr_ratio, t.warmup_steps) == ("cosine", 0.5, 10)
    assert (t.checkpoint_every, t.keep_checkpoints, t.precision, t.remat, cfg.roles.student.ema_decay) == (
        250, 3, "bfloat16", "full", 0.0)
    assert cfg.data.path == ("data/a", "data/b:3") and cfg.data.num_workers == 4
    assert (cfg.tracking.project, cfg.tracking.run_name) == ("proj", "run")
    assert v.every == 0  # log_validation: false
    assert (v.sampler.kind, v.sampler.num_steps, v.sampler.shift) == ("sde", 8, 5.0)
    assert v.sampler.guidance_scale == 1.0  # validation_guidance_scale is not for a DMD2 student
    assert m.dmd_denoising_steps == (1000, 850, 700, 550, 350, 275, 200, 125) == v.sampler.timesteps
    assert (m.rollout_mode, m.generator_update_interval, m.flow_shift) == ("data", 4, 5.0)
    assert (m.critic_lr, m.critic_betas, m.latent_shape) == (2e-6, (0.0, 0.999), (20, 56, 104))  # 0 -> lr
    assert m.real_score_guidance_scale == configs.DMD2Config().real_score_guidance_scale


def test_file_values_beat_derived_defaults():
    d = {"pipeline_config": {"flow_shift": 5}, "method_config": {"dmd_denoising_steps": [1000, 750, 500]},
         "validation": {"sampler": {"shift": 3, "timesteps": [1000, 500]}},
         "training": {"lr_scheduler": "cosine_with_min_lr", "min_lr_ratio": 0.1}}
    _, cfg = config_file.from_dict(d, "dmd2")
    assert cfg.method.flow_shift == 5.0 and cfg.validation.sampler.shift == 3.0
    assert cfg.validation.sampler.timesteps == (1000, 500) and cfg.training.min_lr_ratio == 0.1


def test_recipe_family_is_the_roles_default():
    d = {"recipe": {"family": "other"}, "roles": {"teacher": {"family": "wan"}}}
    roles = config_file.from_dict(d, "dmd2")[1].roles
    assert (roles.student.family, roles.teacher.family, roles.critic.family) == ("other", "wan", "other")


def test_fastvideo_guidance_scale_is_read_in_fastvideos_form(caplog):
    """FastVideo's schema-v2 DMD2 computes real = cond + w (cond - uncond): its 3.5 is fvfunc's standard
    4.5, converted once with a note; the resolved config.yaml (fvfunc's names) reads back as 4.5."""
    with caplog.at_level("WARNING", logger="fvfunc.config_file"):
        d = {**FASTVIDEO_DMD2, "method_config": {"real_score_guidance_scale": 3.5}}
        _, cfg = config_file.from_dict(d, "dmd2")
        assert cfg.method.real_score_guidance_scale == 4.5
        assert caplog.text.count("w = 4.5") == 1
        caplog.clear()
        _, again = config_file.from_dict(config_file.dump("dmd2", cfg), "dmd2")  # fvfunc's own names: no note
        assert again.method.real_score_guidance_scale == 4.5 and "w = " not in caplog.text
        own = {"method_config": {"real_score_guidance_scale": 3.5}}  # an fvfunc file stays standard
        assert config_file.from_dict(own, "dmd2")[1].method.real_score_guidance_scale == 3.5


def _varied(method: str):
    """A run with a non-default value in every section."""
    base = config_file.runs()[method]()
    r = dataclasses.replace
    return r(base,
             roles=r(base.roles, student=r(base.roles.student, path="S", dtype="bfloat16"),
                     teacher=r(base.roles.teacher, path="T") if method == "dmd2" else base.roles.teacher),
             training=r(base.training, lr=3e-5, betas=(0.5, 0.9), lr_schedule="cosine", remat="full", seed=7),
             data=r(base.data, path=("a", "b:2"), text_len=256),
             validation=r(base.validation, every=10, sampler=r(base.validation.sampler, timesteps=(900, 1))),
             tracking=r(base.tracking, wandb_mode="disabled"),
             method=r(base.method, flow_shift=2.5))


@pytest.mark.parametrize("method", ["dmd2", "finetune"])
def test_dump_round_trips(method, tmp_path):
    cfg = _varied(method)
    d = config_file.dump(method, cfg)
    assert d["recipe"] == {"family": "wan", "method": method} and "config" not in d
    assert config_file.from_dict(d, method) == (method, cfg)
    assert config_file.from_dict(json.loads(json.dumps(d))) == (method, cfg)  # method from recipe
    for name in ("config.yaml", "config.json"):
        path = config_file.write(tmp_path / name, method, cfg)
        assert config_file.load(path, method) == (method, dataclasses.replace(cfg, config=str(path)))
    # roles equal to their defaults are left out
    assert set(d["roles"]) == ({"student", "teacher"} if method == "dmd2" else {"student"})


def test_dump_of_a_loaded_example_round_trips():
    method, cfg = config_file.load(ROOT / "examples" / "dmd2.yaml")
    again = config_file.from_dict(config_file.dump(method, cfg), method)[1]
    assert again == dataclasses.replace(cfg, config="")


def test_configs_runs_agree_with_the_method_specs():
    from fvfunc.losses import METHODS

    assert {name: spec.run for name, spec in METHODS.items()} == configs.RUNS
    assert list(METHODS) == list(configs.RUNS)  # the order train.py --help lists them


def test_a_training_field_error_comes_before_torch_is_imported():
    code = ("import sys, fvfunc.cli; rc = fvfunc.cli.main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "finetune", "--training.lr", "-1"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == "error: training.lr must be > 0, got -1\n", r.stderr
