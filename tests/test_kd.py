"""kd (knowledge distillation / ODE init): the loss against a plain reference, the teacher's
trajectories, training on FastVideo trajectory files and on generated ones, exact resume, and a
generation that continues after SIGKILL."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import configs
from fvfunc import checkpoint, cli, config_file, random, runner, trainer, tree
from fvfunc.autodiff import value_and_grad
from fvfunc.losses import kd
from fvfunc.models import wan
from fvfunc.samplers import guided, model_timesteps, sample
from fvfunc.testing import tiny

CFG = tiny.tiny_config()
SHAPE = (16, 2, 4, 4)


def apply(p, x, t, c):
    return runner.apply(wan.FAMILY, p, CFG, x, t, c, attention="math")


# ------------------------------------------------------------------------------------ the loss


def test_loss_and_gradient_equal_a_plain_reference():
    g = torch.Generator().manual_seed(0)
    params = wan.init(CFG, random.key(0))
    stamps = torch.tensor([[999.0, 937, 833, 624, 0]] * 3)
    batch = {"trajectory": torch.randn(3, 5, *SHAPE, generator=g), "trajectory_timesteps": stamps,
             "text": torch.randn(3, 6, CFG.text_dim, generator=g), "sample_index": torch.arange(3)}
    t = torch.tensor([1000.0, 833.0, 625.0])  # the student's timesteps of the three samples
    batch["t"], batch["state"] = t, kd.nearest_states(stamps, t)
    assert batch["state"].tolist() == [0, 2, 3]

    def reference(p):  # FastVideo's kd step, one sample at a time
        total = 0.0
        for b in range(3):
            s = min(range(5), key=lambda i: abs(float(stamps[b, i]) - float(t[b])))
            x = batch["trajectory"][b, s][None]
            v = apply(p, x, t[b:b + 1], batch["text"][b:b + 1])
            x0 = x - t[b] / 1000 * v
            total = total + 0.5 * torch.nn.functional.mse_loss(x0, batch["trajectory"][b, -1][None])
        return total / 3

    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    want = reference(leaves)
    want_grads = dict(zip(leaves, torch.autograd.grad(want, list(leaves.values())), strict=True))
    for transform in ("autograd", "func"):
        grads, (value, _) = value_and_grad(kd.kd_loss, transform)(params, batch, apply)
        assert torch.allclose(value, want.detach(), rtol=1e-5)
        assert tree.max_rel_error(grads, want_grads) <= 1e-5


def test_each_sample_draws_its_own_step():
    key = random.key(3)
    k = kd.draw_steps(key, torch.arange(64), 4)
    assert set(k.tolist()) == {0, 1, 2, 3}  # a batch covers several steps
    assert torch.equal(kd.draw_steps(key, torch.arange(32, 64), 4), k[32:])  # independent of the split


def test_t_list_takes_fastvideo_form():
    assert kd.student_timesteps(configs.KDConfig(t_list=(999, 937, 833, 624, 0))) == [999, 937, 833, 624]
    assert kd.student_timesteps(configs.KDConfig()) == [1000, 750, 500, 250]


# ------------------------------------------------------------------------ teacher trajectories


def test_teacher_schedule_passes_through_every_student_timestep():
    cfg = configs.KDConfig(t_list=(999, 850, 500, 120), teacher_steps=7, flow_shift=3.0)
    sigmas, at = kd.teacher_sigmas(cfg)
    assert bool((sigmas[1:] < sigmas[:-1]).all()) and sigmas[-1] == 0
    assert [round(float(sigmas[i]) * 1000, 3) for i in at] == [999.0, 850.0, 500.0, 120.0]
    assert len(sigmas) == 7 + 1 + 4  # the shifted schedule and 0, and the four student sigmas between


def test_trajectories_are_the_teachers_unipc_run():
    cfg = configs.KDConfig(t_list=(1000, 600, 300), teacher_steps=5, guidance_scale=3.0)
    params = wan.init(CFG, random.key(1))
    teacher = tiny.role(apply, trainable=False)
    text, noise = random.normal(random.key(2), (2, 6, CFG.text_dim)), random.normal(random.key(3), (2, *SHAPE))
    traj = kd.trajectories(teacher, params, text, noise, cfg)
    assert traj.shape == (2, 4, *SHAPE)
    sigmas, at = kd.teacher_sigmas(cfg)
    denoise = guided(lambda x, t, c: apply(params, x, t, c), text, None, 3.0)
    with torch.no_grad():
        end, states = sample(denoise, noise, sigmas.float(), "unipc", states=True,
                             timesteps=model_timesteps(sigmas, "unipc"))
    assert model_timesteps(sigmas, "unipc")[at].tolist() == [999, 600, 300]  # diffusers' UniPC integers
    assert torch.equal(traj[:, 0], noise)  # the first state is the starting noise at t = 1000
    assert all(torch.equal(traj[:, j], states[i]) for j, i in enumerate(at))
    assert torch.equal(traj[:, -1], end)


# ------------------------------------------------------------------------------- through train.py


def write_fastvideo_trajectories(folder, n=6, steps=(999, 937, 833, 624, 0), seed=0, leading_one=True):
    """A FastVideo ode_trajectory_text_only file built column by column (int64 timesteps, latents
    [1, S, C, T, H, W] as its preprocessing stores them)."""
    rng = np.random.default_rng(seed)
    traj = [rng.standard_normal((1,) * leading_one + (len(steps), *SHAPE)).astype(np.float32) for _ in range(n)]
    text = [rng.standard_normal((3 + i % 3, CFG.text_dim)).astype(np.float32) for i in range(n)]
    stamps = np.array(steps, np.int64)
    table = pa.table({
        "id": [f"t{i}" for i in range(n)],
        "text_embedding_bytes": [x.tobytes() for x in text], "text_embedding_shape": [list(x.shape) for x in text],
        "text_embedding_dtype": ["float32"] * n,
        "trajectory_latents_bytes": [x.tobytes() for x in traj],
        "trajectory_latents_shape": [list(x.shape) for x in traj], "trajectory_latents_dtype": ["float32"] * n,
        "trajectory_timesteps_bytes": [stamps.tobytes()] * n, "trajectory_timesteps_shape": [[len(steps)]] * n,
        "trajectory_timesteps_dtype": ["int64"] * n,
        "file_name": [f"t{i}.txt" for i in range(n)], "caption": [f"prompt {i}" for i in range(n)],
        "media_type": ["text"] * n})
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "data_chunk_0.parquet", row_group_size=1)
    return folder, traj


def kd_cfg(world, out, data, teacher=False, **method):
    model = str(world["model"])
    base = configs.KDRun()
    roles = configs.RolesConfig(student=configs.RoleConfig(path=model, trainable=True),
                                teacher=configs.RoleConfig(path=model if teacher else "", dtype="float32"))
    m = dict(t_list=(999, 937, 833, 624, 0), latent_shape=SHAPE[1:], teacher_steps=6, chunk=2, guidance_scale=2.0)
    m.update(method)
    return dataclasses.replace(
        base, roles=roles, method=dataclasses.replace(base.method, **m),
        training=dataclasses.replace(base.training, output_dir=str(out), max_steps=4, batch_size=2, checkpoint_every=2,
                                     precision="float32", device="cpu", lr=1e-3, keep_checkpoints=0),
        data=configs.DataConfig(path=(str(data),), text_len=8), tracking=configs.TrackingConfig(wandb_mode="disabled"))


def metrics(out):
    return [{k: v for k, v in json.loads(line).items() if k != "step_time"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_trains_on_a_fastvideo_trajectory_file_and_resumes_exactly(world, tmp_path):
    data, _ = write_fastvideo_trajectories(tmp_path / "traj")
    full = trainer.run("kd", kd_cfg(world, tmp_path / "full", data))
    half = tmp_path / "half"
    trainer.run("kd", dataclasses.replace(c := kd_cfg(world, half, data),
                                          training=dataclasses.replace(c.training, max_steps=2)))
    trainer.run("kd", dataclasses.replace(c, training=dataclasses.replace(c.training, resume="latest")))
    a, meta = checkpoint.load(full / "checkpoint-4")
    b, _ = checkpoint.load(half / "checkpoint-4")
    assert a.keys() == b.keys() == {"state", "student", "student.opt"} and meta["method"] == "kd"
    assert all(tree.equal(a[n], b[n]) for n in a)
    rows = metrics(full)
    assert rows == metrics(half) and all(r["timestep_gap"] <= 1.0 for r in rows)  # 1000 -> 999
    assert (full / "export" / "transformer" / "config.json").is_file()


def test_a_text_only_dataset_without_a_teacher_names_the_missing_column(world, tmp_path, capsys):
    code = cli.main(["kd", "--roles.student.path", str(world["model"]), "--data.path", str(world["text"]),
                     "--training.output-dir", str(tmp_path / "o"), "--training.device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1  # found before any model loads
    assert "error: data.path: " in err
    assert "part-0.parquet: no column trajectory_latents_bytes (the teacher's ODE trajectory)" in err


def _cache_rows(folder):
    tables = [pq.read_table(f) for f in sorted(folder.glob("*.parquet"))]
    return {r["id"]: r for t in tables for r in t.to_pylist()}


KILL = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from fvfunc import data, trainer
    from test_kd import kd_cfg
    real, calls = data.write_atomic, [0]
    def dying_write(*a, **k):
        calls[0] += 1
        if calls[0] == 3:  # the third chunk: two are on disk
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    data.write_atomic = dying_write
    trainer.run("kd", kd_cfg({world!r}, {out!r}, {text!r}, teacher=True))
""")


def test_generated_trajectories_resume_after_sigkill_without_redoing_finished_chunks(world, tmp_path):
    out = tmp_path / "killed"
    w = {k: str(v) for k, v in world.items()}
    script = KILL.format(tests=os.path.dirname(__file__), world=w, out=str(out), text=w["text"])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    cache = out / "trajectories"
    first = sorted(cache.glob("*.parquet"))
    assert [f.name for f in first] == ["part-00000000.parquet", "part-00000002.parquet"]
    stamps = {f: f.stat().st_mtime_ns for f in first}

    trainer.run("kd", kd_cfg(world, out, world["text"], teacher=True))
    assert all(f.stat().st_mtime_ns == m for f, m in stamps.items())  # finished chunks were not redone
    straight = tmp_path / "straight"
    trainer.run("kd", kd_cfg(world, straight, world["text"], teacher=True))
    resumed, fresh = _cache_rows(cache), _cache_rows(straight / "trajectories")
    assert sorted(resumed) == [f"{i:08d}" for i in range(8)] and resumed == fresh
    a, _ = checkpoint.load(checkpoint.latest(out))
    b, _ = checkpoint.load(checkpoint.latest(straight))
    assert tree.equal(a["student"], b["student"])  # and trained the same
    row = resumed["00000003"]
    assert row["trajectory_latents_shape"] == [5, *SHAPE] and row["trajectory_timesteps_dtype"] == "float32"
    assert np.frombuffer(row["trajectory_timesteps_bytes"], np.float32).tolist() == [999, 937, 833, 624, 0]
    assert not list(cache.glob(".*"))  # no temporary file left behind


def test_a_cache_made_for_other_settings_is_refused(world, tmp_path):
    out = tmp_path / "o"
    trainer.run("kd", dataclasses.replace(c := kd_cfg(world, out, world["text"], teacher=True),
                                          training=dataclasses.replace(c.training, max_steps=1)))
    other = kd_cfg(world, tmp_path / "p", world["text"], teacher=True, guidance_scale=4.0,
                   cache=str(out / "trajectories"))
    with pytest.raises(trainer.TrainingError, match=r"trajectories: a trajectory cache made with other settings "
                                                    r"\(guidance_scale: \[2.0\] there, \[4.0\] here\)"):
        trainer.run("kd", other)


def test_fastvideo_kd_keys():
    raw = {"recipe": {"method": "kd"}, "pipeline_config": {"flow_shift": 5},
           "method_config": {"t_list": [999, 937, 833, 624, 0], "student_sample_steps": 4,
                             "teacher_path_cache": "cache/wan", "teacher_guidance_scale": 1.0,
                             "teacher_inference_steps": 48}}
    method, cfg = config_file.from_dict(raw)
    m = cfg.method
    assert method == "kd" and m.t_list == (999, 937, 833, 624, 0) and m.cache == "cache/wan"
    assert (m.guidance_scale, m.teacher_steps, m.flow_shift) == (1.0, 48, 5.0)
    assert kd.SPEC.sampler(cfg).timesteps == (999, 937, 833, 624) and kd.SPEC.sampler(cfg).kind == "ode"
    with pytest.raises(config_file.ConfigError, match=r"student_sample_steps \(3\) must equal"):
        config_file.from_dict({**raw, "method_config": {**raw["method_config"], "student_sample_steps": 3}})


def test_train_py_kd_generates_trains_validates_and_exports(world, tmp_path):
    out, model = tmp_path / "run", str(world["model"])
    code = cli.main(["kd", "--roles.student.path", model, "--roles.teacher.path", model, "--roles.teacher.dtype",
                     "float32", "--data.path", str(world["text"]), "--data.text-len", "8",
                     "--method.latent-shape", "2", "4", "4", "--method.teacher-steps", "4", "--method.t-list", "1000",
                     "500", "--training.output-dir", str(out), "--training.max-steps", "2", "--training.batch-size",
                     "2", "--training.device", "cpu", "--training.precision", "float32", "--validation.every", "2",
                     "--validation.num-prompts", "1", "--tracking.wandb-mode", "disabled"])
    assert code == 0
    assert len(list((out / "trajectories").glob("*.parquet"))) == 2  # 8 prompts, 4 a chunk
    assert [v.name for v in (out / "videos").glob("*.mp4")] == ["step-000002-prompt-0.mp4"]
    assert (out / "export" / "transformer" / "config.json").is_file()
    assert config_file.load(out / "config.yaml", "kd")[1].method.t_list == (1000, 500)


def test_a_trajectory_whose_timesteps_do_not_match_its_states_is_one_error(world, tmp_path, capsys):
    data, _ = write_fastvideo_trajectories(tmp_path / "traj", steps=(999, 833, 624, 0))
    table = pq.read_table(data / "data_chunk_0.parquet")
    bad = np.array([999, 624, 0], np.int64)  # 3 timesteps for 4 states
    table = table.set_column(table.schema.get_field_index("trajectory_timesteps_bytes"), "trajectory_timesteps_bytes",
                             pa.array([bad.tobytes()] * table.num_rows, pa.binary()))
    table = table.set_column(table.schema.get_field_index("trajectory_timesteps_shape"), "trajectory_timesteps_shape",
                             pa.array([[3]] * table.num_rows, pa.list_(pa.int64())))
    pq.write_table(table, data / "data_chunk_0.parquet")
    code = cli.main(["kd", "--roles.student.path", str(world["model"]), "--data.path", str(data),
                     "--training.output-dir", str(tmp_path / "o"), "--training.device", "cpu", "--data.text-len", "8",
                     "--training.batch-size", "2"])
    err = capsys.readouterr().err
    assert code == 1 and "trajectory_latents holds 4 states and trajectory_timesteps 3" in err and "samples ['t" in err
