"""VSA as a run option: `--training.attention vsa` trains through fvfunc.ops.vsa (the reference on the CPU),
its sparsity warm-up is FastVideo's and a function of the step (so resume is exact), the gates
(blocks.{i}.to_gate_compress) start at zeros in a plain Wan and are trained, checkpointed and exported under
FastVideo's name, DMD2 runs a sparse student with a dense teacher and critic (or every role sparse),
validation samples at the target sparsity, and FastVideo's Phase-3 VSA finetune files run."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import pytest
import torch
from diffusers import WanTransformer3DModel

import configs
from fvfunc import (
    checkpoint,
    config_file,
    distributed,
    random,
    resume,
    roles,
    runner,
    sample,
    trainer,
    tree,
    validation,
)
from fvfunc.losses import METHODS
from fvfunc.models import wan
from fvfunc.ops import vsa
from fvfunc.testing import tiny

GATE = "blocks.0.to_gate_compress.weight"


@pytest.fixture(scope="module")
def vworld(tmp_path_factory):
    """A tiny Wan pipeline, T2V rows of latents [16, 5, 12, 12] (a (5, 6, 6) token grid: 8 ragged cubes, so
    sparsities 0, 0.25, 0.5, 0.75 keep 8, 6, 4, 2 of them) and their text-only rows."""
    from fvfunc import data

    root = tmp_path_factory.mktemp("vsa_world")
    tiny.write_pipeline(root / "model")
    g = torch.Generator().manual_seed(0)
    rows = [dict(id=f"s{i}", text_embedding=torch.randn(3 + i % 3, 32, generator=g),
                 latent=torch.randn(16, 5, 12, 12, generator=g), caption=f"clip {i}") for i in range(4)]
    data.write_parquet(root / "data" / "part-0.parquet", rows)
    data.write_parquet(root / "text" / "part-0.parquet", [{k: v for k, v in r.items() if k != "latent"}
                                                          for r in rows])
    return {"model": root / "model", "data": root / "data", "text": root / "text"}


def make_cfg(w, method, out, roles_=None, **training):
    run = METHODS[method].run()
    model = str(w["model"])
    rc = configs.RolesConfig(student=configs.RoleConfig(path=model, trainable=True),
                             teacher=configs.RoleConfig(path=model, dtype="float32"),
                             critic=configs.RoleConfig(path=model, trainable=True))
    t = dict(output_dir=str(out), max_steps=2, batch_size=2, checkpoint_every=0, precision="float32", device="cpu",
             lr=1e-3, keep_checkpoints=0, attention="vsa", vsa_sparsity=0.75)
    t.update(training)
    m = run.method
    if method == "dmd2":
        m = dataclasses.replace(m, latent_shape=(5, 12, 12), generator_update_interval=1, critic_lr=1e-3)
    return dataclasses.replace(run, roles=roles_ or rc, training=dataclasses.replace(run.training, **t),
                               data=configs.DataConfig(path=(str(w["text" if method == "dmd2" else "data"]),)),
                               method=m, tracking=configs.TrackingConfig(wandb_mode="disabled"))


def metrics(out):
    return [{k: v for k, v in json.loads(line).items() if k != "step_time"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ the gate, end to end


def test_a_vsa_finetune_creates_trains_checkpoints_and_exports_the_gates(vworld, tmp_path):
    out = trainer.run("finetune", make_cfg(vworld, "finetune", tmp_path / "o", max_steps=3))
    trees, _ = checkpoint.load(out / "checkpoint-3")
    student = trees["student"]
    cfg = tiny.tiny_config()
    for i in range(cfg.num_layers):  # FastVideo's name and layout: Linear(D, D) with bias, on the block
        assert student[f"blocks.{i}.to_gate_compress.weight"].shape == (cfg.dim, cfg.dim)
        assert student[f"blocks.{i}.to_gate_compress.bias"].shape == (cfg.dim,)
    assert student[GATE].abs().sum() > 0  # started at zeros (FastVideo's init), and trained
    # the export keeps them; fvfunc loads them back as a VSA Wan
    mcfg, exported = wan.load(out / "export" / "transformer")
    assert mcfg.vsa_gates and torch.equal(exported[GATE], student[GATE])
    assert "vsa_gates" not in json.loads((out / "export" / "transformer" / "config.json").read_text())
    # diffusers loads the folder too: it has no such module, and leaves the extra keys out (with a warning)
    model = WanTransformer3DModel.from_pretrained(out / "export" / "transformer")
    theirs = model.state_dict()
    assert not any("to_gate_compress" in k for k in theirs)
    assert torch.equal(theirs["blocks.0.attn1.to_q.weight"], exported["blocks.0.attn1.to_q.weight"])
    # train.py sample: a checkpoint of a VSA run samples at its target, a folder dense, unless told
    assert sample.vsa_sparsity(configs.SampleRun(model=str(out / "checkpoint-3"))) == 0.75
    assert sample.vsa_sparsity(configs.SampleRun(model=str(out / "export"))) is None
    assert sample.vsa_sparsity(configs.SampleRun(model=str(out / "export"), vsa_sparsity=0.5)) == 0.5


def test_a_fastvideo_vsa_checkpoint_keeps_its_gates(vworld, tmp_path):
    cfg = wan.vsa_gated(tiny.tiny_config())
    params = wan.init(cfg, random.key(5))  # trained-looking gates, not zeros
    wan.save(tmp_path / "fastwan", cfg, params)
    mcfg, loaded = wan.load(tmp_path / "fastwan")
    assert mcfg.vsa_gates and torch.equal(loaded[GATE], params[GATE])
    same_cfg, same = roles._gated(wan.FAMILY, mcfg, dict(loaded), "cpu")
    assert same_cfg == mcfg and torch.equal(same[GATE], params[GATE])
    plain_cfg, plain = wan.load(vworld["model"] / "transformer")
    gated_cfg, gated = roles._gated(wan.FAMILY, plain_cfg, dict(plain), "cpu")
    assert gated_cfg == mcfg and not gated[GATE].any() and not gated["blocks.1.to_gate_compress.bias"].any()
    wan.check_params(gated_cfg, gated)
    # sharded: only this rank's rows of each zero gate
    _, rows = roles._gated(wan.FAMILY, plain_cfg, dict(plain), "cpu", rows=lambda n: (n // 2, n))
    assert rows[GATE].shape == (cfg.dim - cfg.dim // 2, cfg.dim)


def test_vsa_at_sparsity_zero_with_fresh_gates_starts_as_the_dense_run(vworld, tmp_path):
    dense = trainer.run("finetune", make_cfg(vworld, "finetune", tmp_path / "d", max_steps=2, attention="math"))
    zero = trainer.run("finetune", make_cfg(vworld, "finetune", tmp_path / "z", max_steps=2, vsa_sparsity=0.0))
    sparse = trainer.run("finetune", make_cfg(vworld, "finetune", tmp_path / "s", max_steps=1))
    d, z, s = metrics(dense), metrics(zero), metrics(sparse)
    # step 1: zero gates and every cube kept is dense attention; then the gates have moved
    assert abs(d[0]["loss"] - z[0]["loss"]) < 1e-6 and z[0]["vsa_sparsity"] == 0.0
    assert abs(d[0]["loss"] - s[0]["loss"]) > 1e-5 and s[0]["vsa_sparsity"] == 0.75


# ------------------------------------------------------------------------------ warm-up and resume


def test_warm_up_follows_fastvideos_schedule_and_resumes_exactly(vworld, tmp_path):
    warm = dict(vsa_sparsity=0.75, vsa_decay_rate=0.25, vsa_decay_interval_steps=2)
    full = trainer.run("finetune", make_cfg(vworld, "finetune", tmp_path / "full", max_steps=6, **warm))
    half = tmp_path / "half"
    trainer.run("finetune", make_cfg(vworld, "finetune", half, max_steps=3, checkpoint_every=3, **warm))
    trainer.run("finetune", make_cfg(vworld, "finetune", half, max_steps=6, checkpoint_every=3, resume="latest",
                                     **warm))
    expected = [vsa.sparsity_at(i, 0.75, 0.25, 2) for i in range(6)]
    assert expected == [0.0, 0.25, 0.25, 0.5, 0.5, 0.75]
    assert [m["vsa_sparsity"] for m in metrics(full)] == expected
    assert metrics(full) == metrics(half)
    a, _ = checkpoint.load(full / "checkpoint-6")
    b, _ = checkpoint.load(half / "checkpoint-6")
    for name in a:
        assert tree.equal(a[name], b[name]), name


def _record(**training):
    cfg = dataclasses.replace(METHODS["finetune"].run(), training=configs.TrainingConfig(**training))
    return {"run": resume.flat(cfg), "fingerprint": {"roles": {}, "data": None}}


@pytest.mark.parametrize("was, now, refused", [
    ({"attention": "auto"}, {"attention": "math"}, []),  # dense backends: the same numbers
    ({"attention": "auto", "vsa_sparsity": 0.5}, {"attention": "cudnn", "vsa_sparsity": 0.8}, []),  # unused
    ({"attention": "auto"}, {"attention": "vsa"}, ["training.attention"]),
    ({"attention": "vsa"}, {"attention": "fa4"}, ["training.attention"]),
    ({"attention": "vsa", "vsa_sparsity": 0.9}, {"attention": "vsa", "vsa_sparsity": 0.8}, ["training.vsa_sparsity"]),
    ({"attention": "vsa"}, {"attention": "vsa", "vsa_decay_interval_steps": 50, "vsa_decay_rate": 0.03},
     ["training.vsa_decay_interval_steps", "training.vsa_decay_rate"]),
    ({"attention": "vsa"}, {"attention": "vsa", "vsa_roles": "all"}, ["training.vsa_roles"]),
    ({"attention": "vsa", "vsa_dense": "auto"}, {"attention": "vsa", "vsa_dense": "fa4"}, []),  # rounding only
])
def test_resume_treats_vsa_as_changing_results(was, now, refused):
    assert [f for f, _ in resume.differences(_record(**was), _record(**now), ())] == refused


# ------------------------------------------------------------------------------ DMD2 roles, validation


@pytest.mark.parametrize("which", ["student", "all"])
def test_dmd2_sparse_student_with_dense_teacher_and_critic_or_every_role(vworld, tmp_path, which):
    cfg = make_cfg(vworld, "dmd2", tmp_path / which, max_steps=1, vsa_roles=which)
    out = trainer.run("dmd2", cfg)
    trees, _ = checkpoint.load(out / "checkpoint-1")
    assert GATE in trees["student"] and trees["student"][GATE].abs().sum() > 0
    assert (GATE in trees["critic"]) == (which == "all")
    built = roles.build(cfg, METHODS["dmd2"], distributed.init("cpu"))
    assert {n for n, r in built.items() if r.vsa} == ({"student"} if which == "student" else set(built))
    assert (GATE in built["teacher"].params) == (which == "all")


def test_validation_samples_at_the_target_sparsity_whatever_the_warm_up(vworld, tmp_path, monkeypatch):
    seen = []

    class Capture:
        def __init__(self, run, sampler, student, *args):
            seen.append(student)

        def __call__(self, state, tracker):
            seen.append(state.params["student"])

    monkeypatch.setattr(validation, "Validator", Capture)
    cfg = make_cfg(vworld, "finetune", tmp_path / "v", max_steps=1, vsa_decay_rate=0.25, vsa_decay_interval_steps=4)
    cfg = dataclasses.replace(cfg, validation=dataclasses.replace(cfg.validation, every=1))
    trainer.run("finetune", cfg)
    student, params = seen
    mcfg = student.config
    g = torch.Generator().manual_seed(3)
    x, ctx, t = torch.randn(1, 16, 5, 12, 12, generator=g), torch.randn(1, 4, 32, generator=g), torch.tensor([700.0])
    ours = student.apply(params, x, t, ctx)
    at = lambda s: runner.apply(wan.FAMILY, params, mcfg, x, t, ctx, attention="vsa", vsa_sparsity=s)  # noqa: E731
    assert torch.allclose(ours, at(0.75), atol=1e-6)  # step 1 trained at 0.0, validation at the target
    assert not torch.allclose(ours, at(0.0), atol=1e-4)
    monkeypatch.undo()
    seen.clear()
    monkeypatch.setattr(validation, "Validator", Capture)
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, output_dir=str(tmp_path / "v2")),
                              validation=dataclasses.replace(cfg.validation, vsa_sparsity=0.5))
    trainer.run("finetune", cfg)
    assert torch.allclose(seen[0].apply(seen[1], x, t, ctx), runner.apply(
        wan.FAMILY, seen[1], mcfg, x, t, ctx, attention="vsa", vsa_sparsity=0.5), atol=1e-6)


# ------------------------------------------------------------------------------ FastVideo's VSA files


# fvfunc's copy of the keys of FastVideo's examples/distillation/phase3_4/
# finetune_wan2.1_t2v_1.3B_vsa_phase3.4_0.9sparsity.yaml (the Phase-3 distillation framework, schema v2)
PHASE_34_VSA = {
    "recipe": {"family": "wan", "method": "finetune"},
    "roles": {"student": {"family": "wan", "path": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "trainable": True}},
    "training": {"num_gpus": 8, "sp_size": 1, "tp_size": 1, "hsdp_replicate_dim": 8, "hsdp_shard_dim": 1,
                 "data_path": "data/Wan-Syn_77x448x832_600k", "dataloader_num_workers": 4, "train_batch_size": 1,
                 "train_sp_batch_size": 1, "gradient_accumulation_steps": 1, "num_latent_t": 20,
                 "num_height": 448, "num_width": 832, "num_frames": 77,
                 "output_dir": "outputs/phase3.4_wan2.1_finetune_vsa_0.7_0.03_1_wansyn", "max_train_steps": 4000,
                 "seed": 1000, "checkpoints_total_limit": 3, "learning_rate": 1.0e-6, "mixed_precision": "bf16",
                 "betas": "0.9,0.999", "weight_decay": 0.01, "lr_scheduler": "constant", "lr_warmup_steps": 0,
                 "max_grad_norm": 1.0, "training_state_checkpointing_steps": 1000,
                 "weight_only_checkpointing_steps": 1000, "training_cfg_rate": 0.1,
                 "enable_gradient_checkpointing_type": "full", "VSA_sparsity": 0.9, "VSA_decay_rate": 0.03,
                 "VSA_decay_interval_steps": 1, "tracker_project_name": "distillation_phase3",
                 "wandb_run_name": "phase3.4_wan_finetune_vsa_0.9_0.03_1", "log_validation": True,
                 "validation_dataset_file": "examples/training/finetune/Wan2.1-VSA/Wan-Syn-Data/validation_4.json",
                 "validation_steps": 50, "validation_sampling_steps": "50", "validation_guidance_scale": "5.0"},
    "pipeline_config": {"flow_shift": 3, "sampler_kind": "ode"},
    "method_config": {"attn_kind": "vsa"},
}
# phase3_3/finetune_wan2.1_t2v_1.3B_vsa_phase3.3.yaml: the same keys, the sparsity warmed up every 50 steps
PHASE_33_VSA = copy.deepcopy(PHASE_34_VSA)
PHASE_33_VSA["training"].update(VSA_decay_interval_steps=50, validation_steps=200)
PHASE_33_VSA["pipeline_config"]["flow_shift"] = 1


def test_phase3_vsa_finetune_files_mean_fastvideos_vsa():
    _, cfg = config_file.from_dict(PHASE_34_VSA, "finetune")
    t = cfg.training
    assert (t.attention, t.vsa_sparsity, t.vsa_decay_rate, t.vsa_decay_interval_steps) == ("vsa", 0.9, 0.03, 1)
    assert [vsa.sparsity_at(i, 0.9, 0.03, 1) for i in (0, 100)] == [0.9, 0.9]  # interval 1: no warm-up
    _, c33 = config_file.from_dict(PHASE_33_VSA, "finetune")
    assert c33.training.vsa_decay_interval_steps == 50
    assert vsa.sparsity_at(49, 0.9, 0.03, 50) == 0.03 and vsa.sparsity_at(0, 0.9, 0.03, 50) == 0.0
    # FastVideo's defaults for what a VSA file omits; VSA_sparsity alone turns VSA on (FastVideo's trainer
    # then picks its VIDEO_SPARSE_ATTN backend)
    only_kind = config_file.from_dict({"training": {"data_path": "d"}, "method_config": {"attn_kind": "vsa"}},
                                      "finetune")[1].training
    assert (only_kind.attention, only_kind.vsa_sparsity, only_kind.vsa_decay_rate,
            only_kind.vsa_decay_interval_steps) == ("vsa", 0.0, 0.01, 1)
    assert config_file.from_dict({"training": {"VSA_sparsity": 0.8}}, "finetune")[1].training.attention == "vsa"
    dense = config_file.from_dict({"training": {"learning_rate": 1e-5}}, "finetune")[1].training
    assert dense.attention == "auto"
    with pytest.raises(config_file.ConfigError, match="attn_kind 'dense' and training.VSA_sparsity 0.9 disagree"):
        config_file.from_dict({"training": {"VSA_sparsity": 0.9}, "method_config": {"attn_kind": "dense"}}, "finetune")
    with pytest.raises(config_file.ConfigError, match="method_config.attn_kind: 'sla' is not supported"):
        config_file.from_dict({"method_config": {"attn_kind": "sla"}}, "finetune")
    # the written config.yaml reads back to the same run
    assert config_file.from_dict(config_file.dump("finetune", cfg), "finetune")[1] == cfg


def test_fastvideo_train_layouts_of_vsa_are_read():
    base = {"models": {"student": {"_target_": "fastvideo.train.models.wan.WanModel", "init_from": "S",
                                   "trainable": True}},
            "method": {"_target_": "fastvideo.train.methods.fine_tuning.finetune.FineTuneMethod"},
            "training": {"data": {"data_path": "d"}}}
    # fastvideo/train today (examples/train/configs/fine_tuning/wan/t2v_vsa.yaml): training.vsa.sparsity
    head = copy.deepcopy(base)
    head["training"]["vsa"] = {"sparsity": 0.9, "cache_tile_buf": False}
    t = config_file.from_dict(head)[1].training
    assert (t.attention, t.vsa_sparsity, t.vsa_decay_interval_steps) == ("vsa", 0.9, 1)
    # its first form (examples/distillation/refactor/...vsa_phase3.4_0.9sparsity.yaml): method.attn_kind and
    # training.model.VSA_*
    early = copy.deepcopy(base)
    early["method"]["attn_kind"] = "vsa"
    early["training"]["model"] = {"enable_gradient_checkpointing_type": "full", "VSA_sparsity": 0.9,
                                  "VSA_decay_rate": 0.03, "VSA_decay_interval_steps": 1}
    t = config_file.from_dict(early)[1].training
    assert (t.attention, t.vsa_sparsity, t.vsa_decay_rate, t.remat) == ("vsa", 0.9, 0.03, "full")
    with pytest.raises(config_file.ConfigError, match="unknown key training.vsa.tile"):
        config_file.from_dict({**head, "training": {"vsa": {"tile": 64}}})


@pytest.mark.parametrize("name, file, interval, sparsities", [
    ("phase3_4", PHASE_34_VSA, 1, [0.9, 0.9]),  # its own schedule: 0.9 from the first step
    ("phase3_3", PHASE_33_VSA, 2, [0.0, 0.45]),  # its warm-up, every 2 steps (not 50) by 0.45 (not 0.03)
])
def test_phase3_vsa_finetune_file_runs_end_to_end(vworld, tmp_path, name, file, interval, sparsities, caplog):
    f = copy.deepcopy(file)  # the file, pointed at the tiny model and data, short, on one CPU process
    f["roles"]["student"]["path"] = str(vworld["model"])
    f["training"].update(data_path=str(vworld["data"]), output_dir=str(tmp_path / name), max_train_steps=2,
                         num_gpus=1, num_latent_t=5, num_height=96, num_width=96, log_validation=False,
                         dataloader_num_workers=0, train_batch_size=2)
    if interval > 1:
        f["training"].update(VSA_decay_rate=0.45, VSA_decay_interval_steps=interval)
    f["tracking"] = {"wandb_mode": "disabled"}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(f))
    method, cfg = config_file.load(path, "finetune")
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, device="cpu"))
    with caplog.at_level(logging.WARNING):
        out = trainer.run(method, cfg)
    m = metrics(out)
    assert [r["vsa_sparsity"] for r in m] == sparsities
    assert all(r["loss"] > 0 for r in m)
    assert wan.load(out / "export" / "transformer")[0].vsa_gates
