"""The fast paths against their plain references, on tiny shapes on the CPU: selective remat, compiled
blocks, the fused and donated AdamW, and the diffusers-module DMD2 step bench/gpu_step.py times."""

import importlib
import sys
import types

import pytest
import torch
from diffusers import WanTransformer3DModel
from torch.utils._python_dispatch import TorchDispatchMode

import configs
from fvfunc import optim, random, runner, tree
from fvfunc.losses import dmd2, flow_matching
from fvfunc.models import block_params, wan
from fvfunc.testing import dmd2_reference, tiny

attention_ops = importlib.import_module("fvfunc.ops.attention")  # (the package re-exports a function of that name)


CFG = tiny.tiny_config()
SHAPE = (16, 2, 4, 4)


def inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, *SHAPE, generator=g), torch.rand(batch, generator=g) * 1000,
            torch.randn(batch, 5, CFG.text_dim, generator=g))


def grads_of(params, **kw):
    x, t, ctx = inputs()
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss = (runner.apply(wan.FAMILY, leaves, CFG, x, t, ctx, **kw) ** 2).mean()
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))


class CountAttention(TorchDispatchMode):
    """Counts forward attention kernels run while active."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func in runner._ATTENTION_OPS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("remat, fraction", [("full", 1), ("attention", 1), ("attention", 0.5)])
def test_remat_gives_the_same_gradients(remat, fraction):
    params = wan.init(CFG, random.key(0))
    assert tree.max_rel_error(grads_of(params, remat=remat, remat_fraction=fraction), grads_of(params)) <= 1e-6


@pytest.mark.parametrize("remat, fraction, recomputed", [("none", 1, 0), ("full", 1, 4), ("full", 0.5, 2),
                                                         ("full", 0, 0), ("attention", 1, 0)])
def test_attention_remat_does_not_rerun_attention(remat, fraction, recomputed):
    # 2 layers x (self + cross attention): "full" reruns all 4 kernels in the backward pass (the 2 of
    # its first layer at remat_fraction 0.5), "attention" keeps their outputs like "none" does
    params = {k: v.requires_grad_() for k, v in wan.init(CFG, random.key(0)).items()}
    x, t, ctx = inputs()
    loss = runner.apply(wan.FAMILY, params, CFG, x, t, ctx, remat=remat, remat_fraction=fraction).square().mean()
    with CountAttention() as count:
        torch.autograd.grad(loss, list(params.values()))
    assert count.calls == recomputed


def test_compiled_blocks_equal_eager():
    # aot_eager runs dynamo, AOTAutograd and the remat partitioner without inductor's slow CPU codegen
    params = wan.init(CFG, random.key(1))
    x, t, ctx = inputs(1)
    with torch.no_grad():
        eager = wan.apply(params, CFG, x, t, ctx)
        compiled = runner.apply(wan.FAMILY, params, CFG, x, t, ctx, compile="aot_eager")
    assert (compiled - eager).abs().max() <= 1e-5 * eager.abs().max()
    g = grads_of(params, remat="attention", compile="aot_eager")
    assert tree.max_rel_error(g, grads_of(params)) <= 1e-5


def _standin_fwd(q, k, v, return_lse=False):
    """FlashAttention-4's _flash_attn_fwd contract in plain torch: out [B, S, H, Dh], lse [B, H, S]."""
    assert return_lse
    scores = torch.einsum("bshd,bthd->bhst", q, k) / q.shape[-1] ** 0.5
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhst,bthd->bshd", torch.exp(scores - lse[..., None]), v)
    return out.contiguous(), lse.contiguous(), None, None, None  # (the kernel writes fresh contiguous outputs)


def _standin_bwd(q, k, v, out, dout, lse):
    """_flash_attn_bwd's contract: (dq, dk, dv) from the saved out and lse, FlashAttention's formulas."""
    scale = q.shape[-1] ** -0.5
    p = torch.exp(torch.einsum("bshd,bthd->bhst", q, k) * scale - lse[..., None])
    dv = torch.einsum("bhst,bshd->bthd", p, dout)
    dp = torch.einsum("bshd,bthd->bhst", dout, v)
    ds = p * (dp - (dout * out).sum(-1).transpose(1, 2)[..., None])
    dq, dk = torch.einsum("bhst,bthd->bshd", ds, k) * scale, torch.einsum("bhst,bshd->bthd", ds, q) * scale
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@pytest.fixture
def fa4_standin(monkeypatch):
    """The "fa4" backend on the CPU, its two kernels replaced by the plain-torch stand-ins above: what
    runs is fvfunc's own part (the custom ops, their autograd, remat and compile), which CI has no GPU
    to run with the real kernels (tests/test_gpu.py does, on a GPU)."""
    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd, interface._flash_attn_bwd = _standin_fwd, _standin_bwd
    for name, module in [("flash_attn", types.ModuleType("flash_attn")),
                         ("flash_attn.cute", types.ModuleType("flash_attn.cute")),
                         ("flash_attn.cute.interface", interface)]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(attention_ops, "fa4_problem", lambda device: None)
    monkeypatch.setitem(runner.CROSS_ATTENTION, "fa4", "math")  # (cuDNN on a GPU)


@pytest.mark.parametrize("remat, compile", [("none", False), ("attention", False), ("attention", "aot_eager")])
def test_fa4_op_wiring_equals_math(fa4_standin, remat, compile):
    params = wan.init(CFG, random.key(2))
    x, t, ctx = inputs(2)
    with torch.no_grad():
        want = runner.apply(wan.FAMILY, params, CFG, x, t, ctx, attention="math")
        got = runner.apply(wan.FAMILY, params, CFG, x, t, ctx, attention="fa4", compile=compile)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    g = grads_of(params, attention="fa4", remat=remat, compile=compile)
    assert tree.max_rel_error(g, grads_of(params, attention="math")) <= 1e-5


def test_fa4_op_under_torch_func_grad(fa4_standin):
    q, k, v = (torch.randn(2, 6, 2, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    loss = lambda q, k, v, backend: attention_ops.attention(q, k, v, backend).sin().sum()
    got = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v, "fa4")
    want = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v, "math")
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("remat, recomputed", [("full", 2), ("attention", 0)])
def test_attention_remat_keeps_fa4_outputs(fa4_standin, remat, recomputed):
    # 2 layers' self-attention on the fa4 op (the cross-attention is not a fused kernel here)
    params = {k: v.requires_grad_() for k, v in wan.init(CFG, random.key(0)).items()}
    x, t, ctx = inputs()
    loss = runner.apply(wan.FAMILY, params, CFG, x, t, ctx, attention="fa4", remat=remat).square().mean()
    with CountAttention() as count:
        torch.autograd.grad(loss, list(params.values()))
    assert count.calls == recomputed


def test_block_params_are_views_of_the_params():
    params = wan.init(CFG, random.key(0))
    outer, blocks = block_params(params, CFG.num_layers)
    assert len(blocks) == CFG.num_layers
    assert blocks[1]["attn1.to_q.weight"] is params["blocks.1.attn1.to_q.weight"]
    assert sum(len(b) for b in blocks) + len(outer) == len(params)
    assert blocks[0].keys() == blocks[1].keys()


def _tree(gen):
    return {"a.weight": torch.randn(8, 16, generator=gen), "a.bias": torch.randn(16, generator=gen),
            "b": torch.randn(3, 5, 7, generator=gen)}


@pytest.mark.parametrize("donate", [False, True])
def test_fused_adamw_matches_torch_fused_and_foreach(donate):
    gen = torch.Generator().manual_seed(0)
    params = _tree(gen)
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    torch_opt = torch.optim.AdamW(ref.values(), lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, fused=True)
    fused = optim.adamw(1e-2, (0.8, 0.99), weight_decay=0.1, fused=True, donate=donate)
    foreach = optim.adamw(1e-2, (0.8, 0.99), weight_decay=0.1, fused=False)
    p_fused, s_fused = tree.clone(params), fused.init(params)
    p_each, s_each = tree.clone(params), foreach.init(params)
    for _ in range(10):
        grads = _tree(gen)
        for k, p in ref.items():
            p.grad = grads[k].clone()
        torch_opt.step()
        p_fused, s_fused = fused.update(grads, s_fused, p_fused)
        p_each, s_each = foreach.update(grads, s_each, p_each)
    assert tree.max_rel_error(p_fused, {k: p.detach() for k, p in ref.items()}) <= 1e-6
    assert tree.max_rel_error(p_fused, p_each) <= 1e-6
    assert tree.max_rel_error(s_fused.nu, s_each.nu) <= 1e-6 and int(s_fused.step) == 10


@pytest.mark.parametrize("fused", [False, True])
def test_donated_update_writes_into_the_given_buffers(fused):
    gen = torch.Generator().manual_seed(1)
    params, grads = _tree(gen), _tree(gen)
    plain, donating = optim.adamw(1e-2, fused=fused), optim.adamw(1e-2, fused=fused, donate=True)
    want, want_state = plain.update(grads, plain.init(params), params)
    state = donating.init(params)
    got, got_state = donating.update(grads, state, params)
    assert tree.equal(got, want) and tree.equal(got_state.mu, want_state.mu)
    assert all(got[k] is params[k] and got_state.nu[k] is state.nu[k] for k in params)


def _finetune(training, steps=2):
    model = tiny.role(lambda p, x, t, c: runner.apply(wan.FAMILY, p, CFG, x, t, c, remat=training.remat))
    method = flow_matching.make(tiny.run_of(flow_matching.SPEC, training=training), {"student": model})
    state = method.init({"student": wan.init(CFG, random.key(0))}, random.key(1))
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(2, *SHAPE, generator=g), "sample_index": torch.arange(2),
             "text": torch.randn(2, 5, CFG.text_dim, generator=g)}
    for _ in range(steps):
        state, _ = method.step(state, batch)
    return state.params["student"]


def test_finetune_fast_settings_equal_plain():
    plain = _finetune(configs.TrainingConfig(lr=1e-3))
    fast = _finetune(configs.TrainingConfig(lr=1e-3, remat="attention", donate=True))
    assert tree.max_rel_error(fast, plain) <= 1e-6


def test_dmd2_reference_step_equals_fvfunc_step():
    """bench/dmd2_reference.py (diffusers modules, .backward(), torch.optim.AdamW) computes what
    fvfunc's DMD2 step computes, so the benchmark compares equal work."""
    method_cfg = configs.DMD2Config(latent_shape=SHAPE[1:], generator_update_interval=1, critic_lr=1e-3,
                                    real_score_guidance_scale=3.0)
    training = configs.TrainingConfig(lr=1e-3, max_steps=10, precision="float32")
    roles = {r: wan.init(CFG, random.key(i)) for i, r in enumerate(dmd2.SPEC.roles(None))}
    kwargs = {k: v for k, v in wan.config_to_dict(CFG).items() if not k.startswith("_")}
    modules = {}
    for role, params in roles.items():
        modules[role] = WanTransformer3DModel(**kwargs)
        modules[role].load_state_dict(params)
    g = torch.Generator().manual_seed(3)
    batch = {"text": torch.randn(1, 5, CFG.text_dim, generator=g), "sample_index": torch.arange(1)}

    models = {r: tiny.role(lambda p, x, t, c: wan.apply(p, CFG, x, t, c)) for r in roles}
    method = dmd2.make(tiny.run_of(dmd2.SPEC, method_cfg, training), models)
    state = method.init(roles, random.key(5))
    step = dmd2_reference.make(modules, method_cfg, training, random.key(5))
    for i in range(2):
        state, metrics = method.step(state, batch)
        ref = step(i, batch)
        assert float(metrics["critic_loss"]) == pytest.approx(float(ref["critic_loss"]), rel=1e-4)
        assert float(metrics["generator_loss"]) == pytest.approx(float(ref["generator_loss"]), rel=1e-4)
    for role in ("student", "critic"):
        updated = {k: v.detach() for k, v in modules[role].state_dict().items()}
        # Adam's first steps are near lr * sign(g): fp32 reassociation shows at 1e-5
        assert tree.max_rel_error(state.params[role], updated) <= 1e-4, role
        assert not tree.equal(state.params[role], roles[role])
