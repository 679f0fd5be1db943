"""The trainer loop: exact resume, crash safety, non-finite losses, export (driven in-process)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import WanTransformer3DModel

import configs
from fvfunc import checkpoint, trainer, tree
from fvfunc.config_file import ConfigError
from fvfunc.losses import METHODS
from fvfunc.models import wan


def make_cfg(world, method, out, ema_decay=0.0, **training):
    run = METHODS[method].run()
    model = str(world["model"])
    roles = configs.RolesConfig(
        student=configs.RoleConfig(path=model, trainable=True, ema_decay=ema_decay),
        teacher=configs.RoleConfig(path=model, dtype="float32"),
        critic=configs.RoleConfig(path=model, trainable=True))
    t = dict(output_dir=str(out), max_steps=4, batch_size=2, checkpoint_every=2, precision="float32",
             device="cpu", lr=1e-3, keep_checkpoints=0)
    t.update(training)
    method_cfg = run.method
    if method == "dmd2":
        method_cfg = dataclasses.replace(method_cfg, latent_shape=(2, 4, 4), generator_update_interval=2,
                                         critic_lr=1e-3)
    path = world["text"] if method == "dmd2" else world["data"]
    return dataclasses.replace(run, roles=roles, training=dataclasses.replace(run.training, **t),
                               data=configs.DataConfig(path=(str(path),)), method=method_cfg,
                               tracking=configs.TrackingConfig(wandb_mode="disabled"))


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "step_time"} for r in rows]


def final_trees(out, step):
    trees, meta = checkpoint.load(out / f"checkpoint-{step}")
    return trees, meta


@pytest.mark.parametrize("method", ["finetune", "dmd2"])
def test_resume_is_exact(world, tmp_path, method):
    full = trainer.run(method, make_cfg(world, method, tmp_path / "full", max_steps=6, ema_decay=0.9))
    half = tmp_path / "half"
    trainer.run(method, make_cfg(world, method, half, max_steps=3, ema_decay=0.9, checkpoint_every=3))
    trainer.run(method, make_cfg(world, method, half, max_steps=6, ema_decay=0.9, checkpoint_every=3,
                                 resume="latest"))
    a, meta_a = final_trees(full, 6)
    b, meta_b = final_trees(half, 6)
    assert a.keys() == b.keys() and "student.ema" in a and "student.opt" in a
    for name in a:
        assert tree.equal(a[name], b[name]), name
    assert meta_a["data_position"] == meta_b["data_position"]
    assert metrics(full) == metrics(half)


def test_resume_with_another_data_order_warns(world, tmp_path, caplog):
    out = tmp_path / "o"
    trainer.run("finetune", make_cfg(world, "finetune", out, max_steps=2))
    cfg = make_cfg(world, "finetune", out, max_steps=4, resume="latest", allow_changes=("data.shuffle",))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shuffle="groups"))
    with caplog.at_level("WARNING", logger="fvfunc"):
        trainer.run("finetune", cfg)
    assert "resuming with data order ['groups', 4], but" in caplog.text
    assert "was saved with ['rows', 4]" in caplog.text


def test_fresh_start_refuses_a_folder_with_checkpoints(world, tmp_path):
    trainer.run("finetune", make_cfg(world, "finetune", tmp_path / "o", max_steps=2))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        trainer.run("finetune", make_cfg(world, "finetune", tmp_path / "o", max_steps=2))


def test_fa4_attention_on_the_cpu_stops_before_writing(world, tmp_path):
    cfg = make_cfg(world, "finetune", tmp_path / "o", attention="fa4")
    with pytest.raises(trainer.TrainingError, match="training.attention 'fa4' cannot run: it needs a CUDA GPU"):
        trainer.run("finetune", cfg)
    assert not (tmp_path / "o").exists()


def test_non_finite_loss_stops_with_step_and_name(world, tmp_path):
    out = tmp_path / "nan"
    cfg = make_cfg(world, "finetune", out, max_steps=50, checkpoint_every=1, lr=1e30, max_grad_norm=0.0)
    with pytest.raises(trainer.TrainingError, match=r"step \d+: non-finite loss"):
        trainer.run("finetune", cfg)
    last = checkpoint.latest(out)
    assert last is not None
    trees, _ = checkpoint.load(last)  # intact and loadable
    bad = int(json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]) + 1
    assert int(last.name.split("-")[1]) < bad


def test_export_loads_in_diffusers_with_the_same_output(world, tmp_path):
    out = trainer.run("finetune", make_cfg(world, "finetune", tmp_path / "e", max_steps=2))
    trees, _ = final_trees(out, 2)
    module = WanTransformer3DModel.from_pretrained(out / "export" / "transformer").eval()
    cfg, params = wan.load(out / "export")
    assert tree.equal(params, trees["student"])
    x, t, ctx = torch.randn(1, 16, 2, 4, 4), torch.tensor([400.0]), torch.randn(1, 7, 32)
    with torch.no_grad():
        assert torch.allclose(module(x, t, ctx).sample, wan.apply(params, cfg, x, t, ctx), rtol=1e-5, atol=1e-6)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, dataclasses
    sys.path.insert(0, {tests!r})
    import safetensors.torch
    import torch
    torch.set_num_threads(1)  # as the test process, so the numbers match bitwise
    from fvfunc import trainer
    from test_trainer import make_cfg
    world = {world!r}
    real, calls = safetensors.torch.save_file, [0]
    def dying_save_file(*a, **k):
        calls[0] += 1
        if calls[0] == {kill_at}:  # inside the second checkpoint, between its files
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    safetensors.torch.save_file = dying_save_file
    trainer.run("dmd2", make_cfg(world, "dmd2", {out!r}, max_steps=4, checkpoint_every=1))
""")


def test_sigkill_between_checkpoint_files_resumes_from_the_last_complete(world, tmp_path):
    out = tmp_path / "killed"
    w = {k: str(v) for k, v in world.items()}
    script = KILL_SCRIPT.format(tests=os.path.dirname(__file__), world=w, out=str(out), kill_at=8)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-1"]
    assert checkpoint.resolve(out, "latest").path.name == "checkpoint-1"
    resumed = trainer.run("dmd2", make_cfg(world, "dmd2", out, max_steps=4, checkpoint_every=1, resume="latest"))
    straight = trainer.run("dmd2", make_cfg(world, "dmd2", tmp_path / "straight", max_steps=4, checkpoint_every=1))
    a, _ = final_trees(resumed, 4)
    b, _ = final_trees(straight, 4)
    assert all(tree.equal(a[n], b[n]) for n in a)


def test_keep_last_k_checkpoints(world, tmp_path):
    out = trainer.run("finetune", make_cfg(world, "finetune", tmp_path / "k", max_steps=5, checkpoint_every=1,
                                           keep_checkpoints=2))
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-5"]


@pytest.mark.parametrize("method,mode", [("finetune", None), ("dmd2", "simulate"), ("dmd2", "data")])
def test_cli_end_to_end(world, tmp_path, method, mode):
    from fvfunc import cli

    out = tmp_path / "run"
    model = str(world["model"])
    args = [method, "--roles.student.path", model, "--training.output-dir", str(out), "--training.max-steps", "2",
            "--training.batch-size", "2", "--training.checkpoint-every", "1", "--training.precision", "float32",
            "--training.device", "cpu", "--tracking.wandb-mode", "offline"]
    if method == "dmd2":
        data = world["data"] if mode == "data" else world["text"]
        args += ["--roles.teacher.path", model, "--roles.critic.path", model, "--data.path", str(data),
                 "--method.rollout-mode", mode, "--method.latent-shape", "2", "4", "4",
                 "--method.generator-update-interval", "1"]
    else:
        args += ["--data.path", str(world["data"])]
    assert cli.main(args) == 0
    assert (out / "config.yaml").is_file()
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert ("loss" if method == "finetune" else "generator_loss") in rows[0]
    assert list((out / "wandb").glob("offline-run-*"))
    assert (out / "export" / "transformer" / "config.json").is_file()
    # the written config is a valid run file: it parses back to the same run
    from fvfunc import config_file
    loaded = config_file.load(out / "config.yaml", method)[1]
    assert dataclasses.replace(loaded, config="") == cli.parse(args)[1]


def _flip(path, n=4):
    b = bytearray(path.read_bytes())
    i = len(b) // 2
    b[i:i + n] = bytes(x ^ 0xFF for x in b[i:i + n])
    path.write_bytes(bytes(b))


def test_latest_passes_over_a_corrupted_checkpoint_and_resumes_exactly(world, tmp_path, caplog):
    out = tmp_path / "o"
    trainer.run("finetune", make_cfg(world, "finetune", out, max_steps=4, checkpoint_every=1, keep_checkpoints=2))
    _flip(out / "checkpoint-4" / "student.safetensors")  # 4 bytes: a weight far off, the size unchanged
    with caplog.at_level("WARNING", logger="fvfunc"):
        trainer.run("finetune", make_cfg(world, "finetune", out, max_steps=5, checkpoint_every=1, keep_checkpoints=2,
                                         resume="latest"))
    assert "passed over checkpoint-4" in caplog.text and "checksum mismatch" in caplog.text
    assert (out / "checkpoint-4.damaged" / "student.safetensors").is_file()  # set aside, not overwritten
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-5"]
    straight = trainer.run("finetune", make_cfg(world, "finetune", tmp_path / "s", max_steps=5))
    a, _ = final_trees(out, 5)
    b, _ = final_trees(straight, 5)
    assert all(tree.equal(a[n], b[n]) for n in a)


def test_resume_refuses_another_run_and_allows_named_changes(world, tmp_path):
    import shutil

    out = tmp_path / "o"
    trainer.run("finetune", make_cfg(world, "finetune", out, max_steps=2))
    saved = {p.name: (p / "meta.json").read_text() for p in checkpoint.list_checkpoints(out)}
    with pytest.raises(ConfigError, match=r"training.seed: was 0, now 3.*--training.allow-changes training.seed"):
        trainer.run("finetune", make_cfg(world, "finetune", out, max_steps=3, resume="latest", seed=3))
    with pytest.raises(ConfigError, match="is a finetune checkpoint; this is a dmd2 run"):
        trainer.run("dmd2", make_cfg(world, "dmd2", out, max_steps=3, resume="latest"))
    assert {p.name: (p / "meta.json").read_text() for p in checkpoint.list_checkpoints(out)} == saved
    # a moved model folder with the same weights resumes; a named change is allowed
    moved = tmp_path / "moved"
    shutil.copytree(world["model"], moved)
    cfg = make_cfg(world | {"model": moved}, "finetune", out, max_steps=3, resume="latest", seed=3,
                   allow_changes=("training.seed",))
    trainer.run("finetune", cfg)
    assert checkpoint.latest(out).name == "checkpoint-3"
