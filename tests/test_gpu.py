"""GPU-only paths against their references: FlashAttention-4 (fvfunc's "fa4" attention op) against the
plain softmax attention and cuDNN, alone and inside Wan's apply with remat and compiled blocks. CI has
no GPU, so these skip there; run them on a Hopper/Blackwell card with flash-attn-4 installed
(`pytest tests/test_gpu.py`). On the CPU only the clear refusal is checked."""

import json
import math

import pytest
import torch

from fvfunc import random, runner, tree
from fvfunc.models import wan
from fvfunc.ops.attention import attention, fa4_attention, fa4_attention_backward, fa4_problem

CUDA = torch.device("cuda")
needs_fa4 = pytest.mark.skipif(not torch.cuda.is_available() or fa4_problem(CUDA) is not None,
                               reason="needs a Hopper/Blackwell GPU and flash-attn-4")


def test_fa4_refuses_the_cpu_with_a_clear_error():
    q = torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="attention backend 'fa4' cannot run: it needs a CUDA GPU"):
        attention(q, q, q, "fa4")


def _qkv(tokens, keys, heads=4, dh=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(2, n, heads, dh, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            for n in (tokens, keys, keys)]


def _errors(backend, q, k, v, grad):
    """Max abs error of out and of each input gradient against the fp32 math reference."""
    ref_in = [a.detach().float().requires_grad_() for a in (q, k, v)]
    ref = attention(*ref_in, "math")
    ref_g = torch.autograd.grad(ref, ref_in, grad.float())
    out = attention(q, k, v, backend)
    got_g = torch.autograd.grad(out, (q, k, v), grad)
    return [(a.float() - b).abs().max().item() for a, b in zip((out, *got_g), (ref, *ref_g), strict=True)]


@needs_fa4
@pytest.mark.parametrize("tokens, keys", [(1000, 1000), (1000, 77), (4096, 512)])
def test_fa4_is_as_accurate_as_cudnn(tokens, keys):
    # bf16 kernels differ from each other by rounding; FA4 must be no less accurate than cuDNN
    q, k, v = _qkv(tokens, keys)
    grad = torch.randn_like(q)
    fa4, cudnn = _errors("fa4", q, k, v, grad), _errors("cudnn", q, k, v, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fa4, cudnn, strict=True):
        assert a <= 2 * b + 1e-3, f"{name}: fa4 error {a:.2e}, cudnn {b:.2e}"


@needs_fa4
def test_fa4_op_registration():
    # schema and fake (meta) outputs as torch.compile will use them; the ops themselves have no
    # autograd formula (an autograd.Function joins them), so they are checked on plain tensors
    q, k, v = (a.detach() for a in _qkv(256, 128, heads=2, dh=64))
    torch.library.opcheck(fa4_attention, (q, k, v))
    out, lse = fa4_attention(q, k, v)
    torch.library.opcheck(fa4_attention_backward, (q, k, v, out, lse, torch.randn_like(out)))


class _CountFa4(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.ops.fvfunc.fa4_attention.default
        return func(*args, **(kwargs or {}))


@needs_fa4
@pytest.mark.parametrize("compile", [False, True])
def test_wan_with_fa4_matches_cudnn(compile):
    cfg = wan.WanConfig(num_attention_heads=2, attention_head_dim=128, ffn_dim=512, num_layers=2, text_dim=64,
                        freq_dim=32)
    params = {k: v.requires_grad_() for k, v in wan.init(cfg, random.key(0), device="cuda").items()}
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 16, 3, 16, 16, device="cuda", generator=g)
    t = torch.tensor([700.0], device="cuda")
    ctx = torch.randn(1, 24, cfg.text_dim, device="cuda", generator=g)

    def run(backend):
        out = runner.apply(wan.FAMILY, params, cfg, x, t, ctx, dtype=torch.bfloat16, attention=backend,
                           remat="attention", compile=compile)
        loss = out.float().square().mean()
        if backend == "fa4" and not compile:  # (compiled graphs run the op outside dispatch modes)
            with _CountFa4() as count:  # remat="attention" keeps FA4's outputs: no rerun in the backward
                grads = torch.autograd.grad(loss, list(params.values()))
            assert count.calls == 0
        else:
            grads = torch.autograd.grad(loss, list(params.values()))
        return out.float(), dict(zip(params, grads, strict=True))

    out_fa4, g_fa4 = run("fa4")
    out_cudnn, g_cudnn = run("cudnn")
    assert (out_fa4 - out_cudnn).abs().max() <= 3e-2 * out_cudnn.abs().max()
    assert tree.max_rel_error(g_fa4, g_cudnn) <= 5e-2


@needs_fa4
@pytest.mark.parametrize("method", ["finetune", "dmd2", "kd"])
def test_train_py_on_gpu_with_every_speed_knob(tmp_path, method):
    """train.py end to end on the GPU with fa4, compiled blocks, selective remat and donated AdamW,
    on FastVideo-layout files (4-row groups, so data.shuffle auto reads them group by group)."""
    from fvfunc import checkpoint, cli, data
    from fvfunc.testing import tiny

    cfg = tiny.tiny_config(num_attention_heads=2, attention_head_dim=64, text_dim=64, ffn_dim=256)
    model = tiny.write_pipeline(tmp_path / "model", cfg, vae=True)
    g = torch.Generator().manual_seed(0)
    rows = [dict(id=f"s{i}", text_embedding=torch.randn(5 + i % 3, 64, generator=g),
                 latent=torch.randn(16, 2, 8, 8, generator=g), caption=f"clip {i}") for i in range(16)]
    data.write_parquet(tmp_path / "data" / "part-0.parquet", rows, rows_per_group=4)
    out = tmp_path / "run"
    args = [method, "--roles.student.path", str(model), "--data.path", str(tmp_path / "data"),
            "--training.output-dir", str(out), "--training.max-steps", "4", "--training.batch-size", "2",
            "--training.checkpoint-every", "2", "--training.device", "cuda", "--training.precision", "bfloat16",
            "--training.attention", "fa4", "--training.compile", "--training.remat", "attention",
            "--training.donate", "--tracking.wandb-mode", "disabled", "--data.text-len", "16"]
    if method == "dmd2":
        args += ["--roles.teacher.path", str(model), "--roles.critic.path", str(model),
                 "--method.latent-shape", "2", "8", "8", "--method.generator-update-interval", "1"]
    if method == "kd":  # the teacher generates its trajectories on the GPU first
        args += ["--roles.teacher.path", str(model), "--method.latent-shape", "2", "8", "8",
                 "--method.teacher-steps", "6"]
    assert cli.main(args) == 0
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    key = "generator_loss" if method == "dmd2" else "loss"
    assert len(rows) == 4 and all(math.isfinite(r[key]) for r in rows)


@needs_fa4
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_torchrun_dmd2_sharded_over_two_gpus(tmp_path):
    """torchrun train.py dmd2 on 2 GPUs (NCCL): the teacher and student sharded (each rank reads only its
    rows of the folder), fa4 attention, bf16. Its first generator loss equals the one-GPU run's (the
    same params and data; bf16 rounding apart)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from fvfunc import checkpoint, data
    from fvfunc.testing import tiny

    cfg = tiny.tiny_config(num_attention_heads=2, attention_head_dim=64, text_dim=64, ffn_dim=256, num_layers=3)
    model = tiny.write_pipeline(tmp_path / "model", cfg)
    g = torch.Generator().manual_seed(0)
    data.write_parquet(tmp_path / "text" / "part-0.parquet",
                       [dict(id=f"p{i}", text_embedding=torch.randn(5 + i % 3, 64, generator=g), caption=f"p {i}")
                        for i in range(8)])
    root = Path(__file__).resolve().parent.parent

    def run(out, gpus, sharding):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus), "--master-port",
               str(port), str(root / "train.py"), "dmd2", "--roles.student.path", str(model),
               "--roles.teacher.path", str(model), "--roles.critic.path", str(model),
               "--roles.teacher.sharding", sharding, "--roles.student.sharding", sharding,
               "--data.path", str(tmp_path / "text"), "--data.text-len", "16",
               "--method.latent-shape", "2", "8", "8", "--method.generator-update-interval", "1",
               "--training.device", "cuda", "--training.precision", "bfloat16", "--training.attention", "fa4",
               "--training.remat", "attention", "--training.batch-size", "2", "--training.max-steps", "2",
               "--training.output-dir", str(out), "--tracking.wandb-mode", "disabled"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root, env=dict(os.environ))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    sharded = run(tmp_path / "sharded", 2, "sharded")
    single = run(tmp_path / "single", 1, "replicated")
    assert [r["step"] for r in sharded] == [1, 2]
    assert math.isclose(sharded[0]["generator_loss"], single[0]["generator_loss"], rel_tol=2e-2)
    files = {p.name for p in checkpoint.latest(tmp_path / "sharded").iterdir()}
    assert "student.shard-00001-of-00002.safetensors" in files
