"""Data parallel and sharded params over 2 CPU processes (gloo): the numbers one process gets.

The processes are spawned with torchrun's environment variables, so `trainer.run` starts the process
group itself, as it does under `torchrun train.py`.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import configs
from fvfunc import checkpoint, distributed, trainer, tree
from fvfunc.models import wan
from fvfunc.testing import tiny

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
ROLES = ("student", "teacher", "critic")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # as the test process, so that the arithmetic is the same
    fn(*args)
    # Leave without running C++ static destructors: gloo's threads can abort the process
    # ("terminate called without an active exception") when torn down at interpreter exit, after
    # the test itself has passed. A failing fn raises above and exits non-zero as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, *args, world=WORLD):
    """fn(*args) in `world` fresh processes that find their rank where torchrun puts it."""
    mp.spawn(_worker, args=(world, free_port(), fn, args), nprocs=world, join=True)


def train(method, cfg):
    trainer.run(method, cfg)


@pytest.fixture(scope="module")
def teacher(world):
    """A teacher unlike the student and critic, so the DMD gradient (fake - real) is no cancellation."""
    return tiny.write_pipeline(world["root"] / "teacher", seed=1)


def make_cfg(world, method, out, sharding="replicated", teacher=None, **training):
    from test_trainer import make_cfg as base

    t = dict(batch_size=4, max_steps=4, checkpoint_every=0, ema_decay=0.9)
    t.update(training)
    cfg = base(world, method, out, **t)
    roles = {name: dataclasses.replace(getattr(cfg.roles, name), sharding=sharding) for name in ROLES}
    if teacher is not None:
        roles["teacher"] = dataclasses.replace(roles["teacher"], path=str(teacher))
    # a short text: cross-attention over hundreds of zero pads has gradients that are rounding noise,
    # which AdamW (g / (|g| + eps)) turns into lr-sized steps of either sign
    return dataclasses.replace(cfg, roles=configs.RolesConfig(**roles), data=dataclasses.replace(cfg.data, text_len=8))


def final(out):
    return checkpoint.load(checkpoint.latest(out))[0]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_trees_close(a, b, rtol):
    assert a.keys() == b.keys()
    for name in a:
        floats = {k for k, v in a[name].items() if v.is_floating_point()}
        err = tree.max_rel_error({k: a[name][k] for k in floats}, {k: b[name][k] for k in floats})
        assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol:g}"
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name].keys() - floats), name


def assert_metrics_close(a, b, rtol):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for k in ra.keys() - {"step", "step_time"}:
            assert abs(ra[k] - rb[k]) <= rtol * abs(rb[k]), f"step {ra['step']} {k}: {ra[k]} vs {rb[k]}"


def test_finetune_data_parallel_and_sharded_equal_one_process(world, tmp_path):
    # one process takes the global batch of 4 as 2 micro-batches of 2: each rank's arithmetic exactly
    # (CPU matmuls round differently for 2 rows than for 4, which AdamW would magnify in a few params)
    trainer.run("finetune", make_cfg(world, "finetune", tmp_path / "one", micro_batches=WORLD))
    spawn(train, "finetune", make_cfg(world, "finetune", tmp_path / "dp"))
    spawn(train, "finetune", make_cfg(world, "finetune", tmp_path / "sharded", sharding="sharded"))
    one, dp, sharded = (final(tmp_path / n) for n in ("one", "dp", "sharded"))
    _, start = wan.load(world["model"])
    assert tree.max_rel_error(one["student"], start) > 1e-4, "the runs must move the params"
    assert_trees_close(dp, one, 1e-6)  # seen: bitwise equal
    assert all(tree.equal(sharded[n], dp[n]) for n in dp)
    assert_metrics_close(metrics(tmp_path / "dp"), metrics(tmp_path / "one"), 1e-6)
    assert_metrics_close(metrics(tmp_path / "sharded"), metrics(tmp_path / "one"), 1e-6)
    # one process over the 4 samples at once: the same gradients up to fp32 rounding
    trainer.run("finetune", make_cfg(world, "finetune", tmp_path / "whole"))
    assert_metrics_close(metrics(tmp_path / "dp"), metrics(tmp_path / "whole"), 1e-6)
    assert_trees_close(dp, final(tmp_path / "whole"), 1e-4)


def test_dmd2_data_parallel_and_sharded_equal_one_process(world, teacher, tmp_path):
    trainer.run("dmd2", make_cfg(world, "dmd2", tmp_path / "one", teacher=teacher))
    spawn(train, "dmd2", make_cfg(world, "dmd2", tmp_path / "dp", teacher=teacher))
    spawn(train, "dmd2", make_cfg(world, "dmd2", tmp_path / "sharded", sharding="sharded", teacher=teacher))
    one, dp, sharded = (final(tmp_path / n) for n in ("one", "dp", "sharded"))
    # sharded and replicated ranks do the same arithmetic
    assert all(tree.equal(sharded[n], dp[n]) for n in dp)
    assert_metrics_close(metrics(tmp_path / "sharded"), metrics(tmp_path / "dp"), 1e-6)
    # The student's rollouts run at 4 samples in one process and at 2 on a rank, and CPU matmuls
    # round differently for each; DMD2's (fake - real) / mean|x0 - real| and AdamW magnify that in a
    # few params (seen: 2e-5). Losses and gradient norms agree to 1e-6 (seen: 2e-7); a missing 1/W or
    # a rank reading another rank's samples would be off by far more. (1.3e-4 on the critic on another
    # machine of the same kind, 2026-12-02: the CPU's matmul kernels round differently; hence 5e-4.)
    assert_metrics_close(metrics(tmp_path / "dp"), metrics(tmp_path / "one"), 1e-6)
    assert_trees_close(dp, one, 5e-4)


def test_sharded_checkpoint_resumes_bitwise_and_exports_for_diffusers(world, teacher, tmp_path):
    from diffusers import WanTransformer3DModel

    def cfg(out, **t):
        return make_cfg(world, "dmd2", out, sharding="sharded", teacher=teacher, checkpoint_every=2, **t)

    spawn(train, "dmd2", cfg(tmp_path / "full"))
    spawn(train, "dmd2", cfg(tmp_path / "half", max_steps=2))
    spawn(train, "dmd2", cfg(tmp_path / "half", resume="latest"))
    a, b = final(tmp_path / "full"), final(tmp_path / "half")
    assert a.keys() == {"state", "student", "student.opt", "critic", "critic.opt", "student.ema"}
    assert all(tree.equal(a[n], b[n]) for n in a)
    assert_metrics_close(metrics(tmp_path / "half"), metrics(tmp_path / "full"), 0.0)

    # every rank wrote its rows of every sharded tree; one rank's read gets them back
    last = checkpoint.latest(tmp_path / "full")
    names = {p.name for p in last.iterdir()}
    for r in range(WORLD):
        assert {f"{t}.shard-{r:05d}-of-{WORLD:05d}.safetensors" for t in ("student", "critic", "student.ema")} <= names
    mine, _ = checkpoint.load(last, shard=(1, WORLD))
    w = a["student.ema"]["proj_out.weight"]
    assert torch.equal(mine["student.ema"]["proj_out.weight"], w[-(-w.shape[0] // WORLD):])
    assert mine["student.opt"]["step"] == a["student.opt"]["step"]

    # the export is the whole EMA, a folder diffusers loads
    module = WanTransformer3DModel.from_pretrained(tmp_path / "full" / "export" / "transformer").eval()
    cfg_, params = wan.load(tmp_path / "full" / "export")
    assert tree.equal(params, a["student.ema"])
    x, t, ctx = torch.randn(1, 16, 2, 4, 4), torch.tensor([400.0]), torch.randn(1, 7, 32)
    with torch.no_grad():
        assert torch.allclose(module(x, t, ctx).sample, wan.apply(params, cfg_, x, t, ctx), rtol=1e-5, atol=1e-6)

    # one process (another world size) resumes from the sharded checkpoint too: pieces joined
    trainer.run("dmd2", make_cfg(world, "dmd2", tmp_path / "half", teacher=teacher, checkpoint_every=2,
                                 max_steps=5, resume=str(last)))
    assert checkpoint.latest(tmp_path / "half").name == "checkpoint-5"


def test_lora_roles_on_a_sharded_base_equal_one_process(world, tmp_path):
    """LoRA student and critic whose frozen base is split over 2 gloo ranks (ZeRO-3; the adapters whole on every
    rank, their gradients all-reduced) and a sharded teacher with a frozen LoRA file merged into its rows give
    one process's numbers; validation samples on rank 0 from the gathered base and the export merges the
    adapters into it."""
    from fvfunc import lora, random

    cfg_, params = wan.load(world["model"])
    shapes = wan.param_shapes(cfg_)
    names = lora.select(shapes, ("attn1.to_q", "ffn.net.0.proj"), 4, "test")
    style = lora.init(shapes, names, 4, random.key(7))
    style = {k: torch.randn_like(v) * 0.3 if k.endswith(lora.LORA_B) else v for k, v in style.items()}
    lora.write_diffusers(tmp_path / "style.safetensors", style, 1.0)

    def cfg(out, sharding):
        run = make_cfg(world, "dmd2", out, sharding=sharding, max_steps=2, checkpoint_every=2)
        r = run.roles
        adapters = configs.LoraConfig(rank=4)
        roles = configs.RolesConfig(student=dataclasses.replace(r.student, lora=adapters, dtype="float32"),
                                    critic=dataclasses.replace(r.critic, lora=adapters, dtype="float32"),
                                    teacher=dataclasses.replace(r.teacher, lora=configs.LoraConfig(
                                        frozen=(f"{tmp_path / 'style.safetensors'}:0.8",))))
        validation = dataclasses.replace(run.validation, every=2, num_prompts=1)
        return dataclasses.replace(run, roles=roles, validation=validation)

    trainer.run("dmd2", cfg(tmp_path / "one", "replicated"))
    spawn(train, "dmd2", cfg(tmp_path / "dp", "replicated"))
    spawn(train, "dmd2", cfg(tmp_path / "two", "sharded"))
    one, dp, two = final(tmp_path / "one"), final(tmp_path / "dp"), final(tmp_path / "two")
    err = max(tree.max_rel_error(two[n], dp[n]) for n in dp if n != "state")
    assert err <= 1e-6, err  # the sharded base, gathered, does the replicated ranks' arithmetic (seen: 0)
    assert set(one["student"]) == set(two["student"]) and all("lora_" in k for k in two["student"])
    assert tree.max_rel_error(two["student"], lora.init(shapes, lora.select(shapes, configs.LoraConfig().targets, 4,
                                                                             "t"), 4, random.key(0))) > 1e-3
    numbers = [[{k: v for k, v in r.items() if not k.startswith("video/")} for r in metrics(tmp_path / n)]
               for n in ("two", "one")]
    assert_metrics_close(*numbers, 1e-5)
    # 4 samples in one process, 2 on a rank: CPU matmuls round differently, and AdamW's first steps on
    # adapters that start at B = 0 magnify that (seen: 7e-4 and 2.3e-3 in two runs); the metrics above (the
    # gradient norms: a missing 1/W or another rank's samples) and the exact 2-rank match are the tight checks
    assert_trees_close(two, one, 1e-2)
    assert [p.name for p in (tmp_path / "two" / "videos").iterdir()] == ["step-000002-prompt-0.mp4"]
    _, exported_one = wan.load(tmp_path / "one" / "export")
    _, exported_two = wan.load(tmp_path / "two" / "export")
    assert tree.max_rel_error(exported_two, exported_one) <= 5e-4
    assert tree.max_rel_error(exported_two, params) > 1e-4  # the adapters merged in


def test_torchrun_train_py_with_mixed_sharding_and_validation(world, teacher, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
           "--master-port", str(free_port()), str(ROOT / "train.py"), "dmd2",
           "--roles.student.path", str(world["model"]), "--roles.critic.path", str(world["model"]),
           "--roles.teacher.path", str(teacher), "--roles.teacher.dtype", "float32",
           "--roles.teacher.sharding", "sharded", "--roles.student.sharding", "sharded",
           "--validation.every", "2", "--validation.num-prompts", "1",
           "--data.path", str(world["text"]), "--method.latent-shape", "2", "4", "4",
           "--method.generator-update-interval", "2", "--training.device", "cpu",
           "--training.precision", "float32", "--training.batch-size", "2", "--training.max-steps", "2",
           "--training.output-dir", str(out), "--tracking.wandb-mode", "disabled"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in metrics(out) if "critic_loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and "generator_loss" in rows[0]
    assert (out / "export" / "transformer" / "config.json").is_file()
    files = {p.name for p in checkpoint.latest(out).iterdir()}
    assert "student.shard-00001-of-00002.safetensors" in files and "critic.safetensors" in files
    # rank 0 sampled the (gathered) student once
    assert [p.name for p in (out / "videos").iterdir()] == ["step-000002-prompt-0.mp4"]


def _check_gather():
    process = distributed.init("cpu")
    assert process.world_size == WORLD
    mesh = process.mesh
    torch.manual_seed(0)  # the same whole tensors on every rank
    whole = {"a": torch.randn(5, 3), "b": torch.randn(1, 6, 4), "c": torch.randn(7), "d": torch.randn(2, 2)}
    whole["d"] = whole["d"].double()
    sharded = distributed.shard(whole, mesh)
    from torch.distributed.tensor import Shard, distribute_tensor
    for k, v in whole.items():  # the rows DTensor's own Shard(0) gives
        assert torch.equal(sharded[k].to_local(), distribute_tensor(v, mesh, [Shard(0)]).to_local())
    assert tree.equal(distributed.whole(sharded), whole)

    # gradients through `gather`: the sum over ranks of each rank's gradient, in this rank's rows
    rank = process.rank
    weights = {k: torch.randn(v.shape, dtype=v.dtype, generator=torch.Generator().manual_seed(rank))
               for k, v in whole.items()}
    leaves = {k: v.detach().requires_grad_() for k, v in sharded.items()}
    gathered = distributed.gather(leaves)
    loss = sum((gathered[k] * weights[k]).sum() for k in ("a", "b", "c", "d"))
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
    every = [None] * WORLD
    dist.all_gather_object(every, weights)
    for k in whole:
        expected = sum(w[k] for w in every)
        assert torch.allclose(grads[k].full_tensor(), expected), k
    # the reduce: replicated leaves all-reduced, sharded ones (already summed) divided by W
    reduce = distributed.make_reduce(process, bucket_bytes=64)
    out = reduce({"p": torch.full((3,), float(rank)), **grads})
    assert torch.equal(out["p"], torch.full((3,), sum(range(WORLD)) / WORLD))
    assert torch.allclose(out["a"].full_tensor(), sum(w["a"] for w in every) / WORLD)
    assert distributed.mean_over_ranks(process, {"x": float(rank)}) == {"x": sum(range(WORLD)) / WORLD}
    # `like`: a whole tensor is sliced, a piece is wrapped
    assert torch.equal(distributed.like(sharded["a"], whole["a"]).full_tensor(), whole["a"])
    assert torch.equal(distributed.like(sharded["a"], sharded["a"].to_local()).full_tensor(), whole["a"])
    distributed.shutdown(process)


def test_gather_reduce_scatter_and_layout():
    spawn(_check_gather)
