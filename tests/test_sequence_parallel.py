"""Sequence parallelism (Ulysses) over 2 and 4 CPU processes (gloo): the numbers one process gets.

The model-level check (in the 4-process run) runs the block runner in float64 with and without `sp`
(remat, sharded params with overlapped gathers, compile, TI2V's modulation groups) and compares outputs
and gradients; the trainer-level check runs finetune and DMD2 with sp 2 (2 processes) and sp 2 x dp 2
(4 processes), replicated and ZeRO-3, against one process, validates on rank 0, and resumes a
sequence-parallel sharded run bitwise.
"""

import dataclasses

import pytest
import torch
import torch.distributed as dist
from test_distributed import assert_metrics_close, assert_trees_close, final, make_cfg, metrics, spawn
from torch.distributed.tensor import DTensor

from fvfunc import distributed, random, runner, trainer, tree
from fvfunc.models import wan
from fvfunc.testing import tiny

# ------------------------------------------------------------------------------ the block runner


def _grads(options, params, cfg, x, t, ctx, cond=None):
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    v = runner.forward(wan.FAMILY, leaves, cfg, x, t, ctx, options, cond)
    grads = torch.autograd.grad((v * v).sum(), list(leaves.values()))
    return v.detach(), dict(zip(leaves, grads, strict=True))


def _mean_over_ranks(process, grads):
    """What make_reduce makes of a rank's gradients: their sum over every rank / W."""
    out = {}
    for k, g in grads.items():
        if isinstance(g, DTensor):  # the gather's reduce-scatter summed them
            out[k] = g.full_tensor() / process.world_size
        else:
            g = g.clone()
            dist.all_reduce(g)
            out[k] = g / process.world_size
    return out


def _check_runner():
    process = distributed.init("cpu", 4)  # one sequence group of 4 ranks
    sp4 = process.sp
    sp2 = distributed.init("cpu", 2).sp  # and, in the same process group, two groups of 2 (sp 2 x dp 2)
    assert (sp4.size, sp4.rank, sp2.size, sp2.rank) == (4, process.rank, 2, process.rank % 2)
    overlap = dict(gather=lambda tree_, fetched=None: distributed.gather(tree_, fetched, overlap=True),
                   prefetch=distributed.prefetch)
    cases = [  # (name, config, options): plain Wan, and TI2V's two modulation groups (a frame at t = 0)
        ("sp 4", {}, runner.Options(sp=sp4)),
        ("sp 2", {}, runner.Options(sp=sp2)),
        ("sp 4 selective remat", {}, runner.Options(sp=sp4, remat="attention")),
        ("sp 2 sharded, overlapped, remat", {}, runner.Options(sp=sp2, remat="full", **overlap)),
        ("sp 4 sharded", {}, runner.Options(sp=sp4, gather=distributed.gather)),
        ("sp 2 compiled", {}, runner.Options(sp=sp2, compile="aot_eager")),
        ("sp 4 ti2v", {"expand_timesteps": True}, runner.Options(sp=sp4, remat="attention")),
    ]
    dt = torch.float64
    for name, overrides, options in cases:
        cfg = tiny.tiny_config(num_attention_heads=4, attention_head_dim=8, num_layers=3, **overrides)
        params = wan.init(cfg, random.key(0), dtype=dt)
        # the same inputs on every rank: 2 samples of 3 x 4 x 4 latents, 12 tokens each
        x = random.normal(random.key(1), (2, 16, 3, 4, 4), dtype=dt)
        t, ctx = torch.tensor([300.0, 700.0], dtype=dt), random.normal(random.key(2), (2, 5, 32), dtype=dt)
        cond = {wan.FIRST_FRAME: random.normal(random.key(3), (2, 16, 1, 4, 4), dtype=dt)} \
            if cfg.expand_timesteps else None
        v_one, g_one = _grads(runner.Options(), params, cfg, x, t, ctx, cond)
        held = distributed.shard(params, process.mesh) if options.gather is not None else params
        v, g = _grads(options, held, cfg, x, t, ctx, cond)
        assert torch.equal(v, v_one), name  # every token and head computes as in one process
        g = _mean_over_ranks(process, g)
        # float64 but for Wan's fp32 parts (time embedding, modulation, norms), whose gradients sum the
        # tokens in another order (seen: 1.4e-7 of the largest)
        for k in g_one:
            err = (g[k] - g_one[k]).abs().max() / g_one[k].abs().max()
            assert err < 1e-6, f"{name}: {k} relative error {err:.3g}"
    distributed.shutdown(process)


# ------------------------------------------------------------------------------------ the trainer


@pytest.fixture(scope="module")
def teacher(world):
    """A teacher unlike the student and critic (as test_distributed's)."""
    return tiny.write_pipeline(world["root"] / "teacher-sp", seed=1)


def _runs(runs):
    """trainer.run of each (method, cfg) in one process group, started once for all of them (and, with 4
    processes, the block runner's check first)."""
    dist.init_process_group("gloo")
    if dist.get_world_size() == 4:
        _check_runner()
    for method, cfg in runs:
        trainer.run(method, cfg)
    dist.barrier()
    dist.destroy_process_group()


def _cfg(world, method, out, teacher, sharding="replicated", **training):
    training = {"max_steps": 3, **training}
    return make_cfg(world, method, out, sharding, teacher if method == "dmd2" else None, **training)


# The forward is bitwise the one process's (test_runner_... above); gradients sum each rank's tokens and
# then the ranks, one process all tokens at once, so fp32 rounding differs (1e-7 of a gradient), and
# AdamW's first steps, g / sqrt(v), turn that into parameter differences for the smallest gradients.
# Seen on this machine (2 cores, torch 2.13, 3 steps): finetune 1.1e-6 (sp 2) and 6.8e-6 (sp 2 x dp 2);
# DMD2, whose (fake - real) / mean|x0 - real| magnifies it further, 1.6e-5 (sp 2, the critic) and 7.9e-5
# (sp 2 x dp 2 with ZeRO-3, the critic; there the student's rollouts also run at 2 samples a rank
# instead of 4, the 5e-4 of test_distributed's data-parallel DMD2). Metrics agree within 1e-6.
TOLERANCE = {("finetune", 2): 1e-5, ("finetune", 4): 1e-5, ("dmd2", 2): 1e-4, ("dmd2", 4): 5e-4}


@pytest.mark.parametrize("nproc", [2, 4])
def test_sequence_parallel_equals_one_process_and_resumes(world, teacher, tmp_path, nproc):
    dp = nproc // 2  # sp 2: one sequence group, or two of them side by side (sp 2 x dp 2)
    runs = []
    for method in ("finetune", "dmd2"):
        for sharding in ("replicated", "sharded"):
            cfg = _cfg(world, method, tmp_path / f"{method}-{sharding}", teacher, sp_size=2, sharding=sharding,
                       checkpoint_every=2)
            if method == "dmd2" and sharding == "replicated":  # rank 0 samples alone, every token, at the end
                cfg = dataclasses.replace(cfg, validation=dataclasses.replace(cfg.validation, every=3, num_prompts=1))
            runs.append((method, cfg))
    # a sharded dmd2 run stopped at step 2 and resumed
    half = tmp_path / "half"
    runs.append(("dmd2", _cfg(world, "dmd2", half, teacher, sp_size=2, sharding="sharded", max_steps=2)))
    runs.append(("dmd2", _cfg(world, "dmd2", half, teacher, sp_size=2, sharding="sharded", checkpoint_every=2,
                              resume="latest")))
    spawn(_runs, runs, world=nproc)
    for method in ("finetune", "dmd2"):
        # one process, each data-parallel rank's samples a micro-batch (as test_distributed)
        one = tmp_path / f"{method}-one"
        trainer.run(method, _cfg(world, method, one, teacher, micro_batches=dp))
        for sharding in ("replicated", "sharded"):
            out = tmp_path / f"{method}-{sharding}"
            rows = [r for r in metrics(out) if not any(k.startswith("video/") for k in r)]
            assert_metrics_close(rows, metrics(one), 1e-6)
            a, b = final(out), final(one)
            print(method, sharding, {n: tree.max_rel_error(a[n], b[n]) for n in a if "." not in n})
            assert_trees_close(a, b, TOLERANCE[method, nproc])
    assert [p.name for p in (tmp_path / "dmd2-replicated" / "videos").iterdir()] == ["step-000003-prompt-0.mp4"]
    a, b = final(tmp_path / "dmd2-sharded"), final(half)
    assert all(tree.equal(a[n], b[n]) for n in a)
    assert_metrics_close(metrics(half), metrics(tmp_path / "dmd2-sharded"), 0.0)


def test_sequence_parallel_refusals(world, tmp_path):
    from fvfunc import cli, roles
    from fvfunc.config_file import ConfigError
    from fvfunc.losses import METHODS

    def cfg(**training):
        return make_cfg(world, "finetune", tmp_path / "o", **training)

    with pytest.raises(ConfigError, match=r"training.sp_size 2 must divide the number of processes \(1"):
        trainer.run("finetune", cfg(sp_size=2))
    with pytest.raises(ConfigError, match="training.sp_size 2 needs training.grad_transform 'autograd'"):
        cli._check_training(cfg(sp_size=2, grad_transform="func").training)
    # the tiny model has 2 heads
    with pytest.raises(roles.RoleError, match=r"training.sp_size 4 must divide the attention heads of "
                                              r"roles.student's model \(2\)"):
        roles.check(cfg(sp_size=4), METHODS["finetune"], world_size=4)
    # 2 x 4 x 4 latents are 8 tokens (patch 1 x 2 x 2)
    run = cfg(sp_size=16)
    dataset = trainer.open_dataset(run, METHODS["finetune"].data(run))
    with pytest.raises(ConfigError, match=r"training.sp_size 16 must divide the tokens of a sample: .* 8 tokens"):
        trainer._check_fit(METHODS["finetune"], run, dataset)


def test_overlapped_gathers_prefetch_the_block_that_runs_next():
    """The runner's schedule of a sharded role's gathers, with stand-ins that log what they are asked:
    in the forward pass block i + 1's gather starts before block i runs; when remat recomputes block i
    in the backward pass, block i - 1's starts first; each block uses its own prefetched gather once."""
    # (stand-ins: the real prefetch / gather are tested on gloo above and in test_distributed.py)
    cfg = tiny.tiny_config(num_layers=3)
    params = wan.init(cfg, random.key(0))
    outer_key = "proj_out.weight"
    names = {params[outer_key].data_ptr(): "outer",
             **{params[f"blocks.{i}.ffn.net.2.weight"].data_ptr(): f"b{i}" for i in range(3)}}
    log = []

    def which(tree_):
        return names[(tree_.get(outer_key) if outer_key in tree_ else tree_["ffn.net.2.weight"]).data_ptr()]

    def prefetch(tree_):
        log.append(f"start {which(tree_)}")
        return which(tree_)

    def gather(tree_, fetched=None):
        assert fetched in (None, which(tree_)), "a block got another block's prefetched weights"
        log.append(f"use {which(tree_)}" + (" (prefetched)" if fetched else ""))
        return tree_

    x, t, ctx = torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 3, 32)
    options = runner.Options(remat="full", gather=gather, prefetch=prefetch)
    v_ref, g_ref = _grads(runner.Options(), params, cfg, x, t, ctx)
    v, g = _grads(options, params, cfg, x, t, ctx)
    assert torch.equal(v, v_ref) and tree.equal(g, g_ref)
    assert log == ["start b0", "use outer",  # forward: b0 arrives while the embeddings compute
                   "start b1", "use b0 (prefetched)", "start b2", "use b1 (prefetched)", "use b2 (prefetched)",
                   # backward: b2's recompute starts b1's gather, then gathers its own; b1's starts b0's
                   "start b1", "use b2", "start b0", "use b1 (prefetched)", "use b0 (prefetched)"]
    log.clear()
    with torch.no_grad():  # no backward: nothing is recomputed, nothing prefetched for it
        runner.forward(wan.FAMILY, params, cfg, x, t, ctx, options)
    assert log == ["start b0", "use outer", "start b1", "use b0 (prefetched)", "start b2", "use b1 (prefetched)",
                   "use b2 (prefetched)"]
