"""fvfunc.optim against its references: torch.optim.AdamW (+ LambdaLR), clip_grad_norm_, plain formulas."""

import math

import pytest
import safetensors.torch
import torch

from fvfunc import optim, tree

SHAPES = {"blocks.0.attn.to_q.weight": (8, 16), "blocks.0.attn.to_q.bias": (16,), "head.weight": (4, 4, 3)}


def _tree(gen: torch.Generator, dtype=torch.float32, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {k: (torch.randn(s, generator=gen) * scale).to(dtype) for k, s in SHAPES.items()}


def _reference_adamw(params, lr, betas, weight_decay, schedule, foreach):
    """torch.optim.AdamW over copies of `params`, driven by LambdaLR when there is a schedule."""
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    base = lr if schedule is None else 1e-3
    opt = torch.optim.AdamW(list(ref.values()), lr=base, betas=betas, weight_decay=weight_decay,
                            foreach=foreach)
    sched = None if schedule is None else torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s) / base)
    return ref, opt, sched


CASES = {
    "default": dict(betas=(0.9, 0.999), weight_decay=0.01, schedule=None),
    "tiny_grads": dict(betas=(0.9, 0.999), weight_decay=0.01, schedule=None, grad_scale=1e-7),  # eps matters
    "beta1_zero": dict(betas=(0.0, 0.999), weight_decay=0.1, schedule=None),
    "no_decay_warmup": dict(betas=(0.9, 0.95), weight_decay=0.0, schedule=optim.linear_warmup(3e-3, 5)),
    "cosine_warmup": dict(betas=(0.8, 0.99), weight_decay=0.05,
                          schedule=optim.cosine(1e-2, warmup_steps=4, total_steps=15, min_ratio=0.1)),
}


@pytest.mark.parametrize("foreach", [False, True], ids=["torch_loop", "torch_foreach"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_adamw_matches_torch(case, foreach):
    gen = torch.Generator().manual_seed(0)
    params = _tree(gen)
    lr = 2e-2
    ref, opt, sched = _reference_adamw(params, lr, case["betas"], case["weight_decay"], case["schedule"],
                                       foreach)
    tx = optim.adamw(case["schedule"] or lr, betas=case["betas"], weight_decay=case["weight_decay"])
    state = tx.init(params)
    for _ in range(20):
        grads = _tree(gen, scale=case.get("grad_scale", 1.0))
        for k, p in ref.items():
            p.grad = grads[k].clone()
        opt.step()
        if sched is not None:
            sched.step()
        params, state = tx.update(grads, state, params)
    want = {k: p.detach() for k, p in ref.items()}
    assert tree.max_rel_error(params, want) <= 1e-6
    assert tree.max_rel_error(state.mu, {k: opt.state[p]["exp_avg"] for k, p in ref.items()}) <= 1e-6
    assert tree.max_rel_error(state.nu, {k: opt.state[p]["exp_avg_sq"] for k, p in ref.items()}) <= 1e-6
    assert state.step.dtype == torch.int64 and state.step.shape == () and int(state.step) == 20
    # the comparison is sharp enough to notice a wrong step count or schedule offset
    assert tree.max_rel_error(params, tree.map(lambda p: p * (1 - 1e-4), want)) > 1e-6


def test_bf16_grads_onto_fp32_params():
    gen = torch.Generator().manual_seed(1)
    params = _tree(gen)
    ref, opt, _ = _reference_adamw(params, 1e-2, (0.9, 0.999), 0.01, None, False)
    tx = optim.adamw(1e-2)
    state = tx.init(params)
    for _ in range(5):
        grads = _tree(gen, torch.bfloat16)
        for k, p in ref.items():
            p.grad = grads[k].float()
        opt.step()
        params, state = tx.update(grads, state, params)
    assert all(v.dtype == torch.float32 for v in [*params.values(), *state.mu.values(), *state.nu.values()])
    assert tree.max_rel_error(params, {k: p.detach() for k, p in ref.items()}) <= 1e-6


def test_bf16_params_keep_dtype_with_fp32_moments():
    gen = torch.Generator().manual_seed(7)
    params, grads = _tree(gen, torch.bfloat16), _tree(gen)
    tx = optim.adamw(1e-2)
    new, state = tx.update(grads, tx.init(params), params)
    want, _ = tx.update(grads, tx.init(tree.cast(params, torch.float32)), tree.cast(params, torch.float32))
    assert all(v.dtype == torch.bfloat16 for v in new.values())
    assert all(v.dtype == torch.float32 for v in [*state.mu.values(), *state.nu.values()])
    assert tree.equal(new, tree.cast(want, torch.bfloat16))  # fp32 math, one rounding at the end


def test_inputs_not_modified():
    gen = torch.Generator().manual_seed(2)
    params, grads, ema = _tree(gen), _tree(gen, scale=10.0), _tree(gen)
    tx = optim.adamw(optim.cosine(1e-2, 2, 10), weight_decay=0.1)
    state = tx.update(_tree(gen), tx.init(params), params)[1]  # nonzero moments
    before = [tree.clone(t) for t in (params, grads, ema, state.mu, state.nu)]
    step_before = state.step.clone()

    new_params, new_state = tx.update(grads, state, params)
    clipped, _ = optim.clip_by_global_norm(grads, max_norm=1.0)
    new_ema = optim.ema_update(ema, params, 0.9)

    for old, now in zip(before, (params, grads, ema, state.mu, state.nu), strict=True):
        assert tree.equal(old, now)
    assert torch.equal(state.step, step_before)
    # and the outputs did change, so the check above has teeth
    assert not tree.equal(new_params, params) and not tree.equal(new_state.mu, state.mu)
    assert not tree.equal(clipped, grads) and not tree.equal(new_ema, ema)


def test_key_mismatch_raises():
    gen = torch.Generator().manual_seed(3)
    params = _tree(gen)
    tx = optim.adamw(1e-3)
    grads = _tree(gen)
    grads["extra.weight"] = grads.pop("head.weight")
    with pytest.raises(KeyError, match=r"head\.weight.*extra\.weight"):
        tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize("max_norm", [1.0, 1e3], ids=["clips", "no_clip"])
def test_clip_by_global_norm_matches_torch(max_norm):
    gen = torch.Generator().manual_seed(4)
    grads = _tree(gen)
    ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads.values()]
    for p, g in zip(ref, grads.values(), strict=True):
        p.grad = g.clone()
    want_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)

    clipped, norm = optim.clip_by_global_norm(grads, max_norm)
    assert norm.dtype == torch.float32 and norm.shape == ()
    assert torch.allclose(norm, want_norm, rtol=1e-6, atol=0)
    assert tree.max_rel_error(clipped, {k: p.grad for k, p in zip(grads, ref, strict=True)}) <= 1e-6
    clipped_norm = tree.global_norm(clipped).item()
    if max_norm < norm:
        assert clipped_norm == pytest.approx(max_norm, rel=1e-5)
    else:
        assert tree.equal(clipped, grads)


def test_clip_disabled_returns_norm():
    grads = {"a": torch.full((4,), 3.0), "b": torch.full((9,), 4.0 / 3.0)}  # norm sqrt(36 + 16) = sqrt(52)
    clipped, norm = optim.clip_by_global_norm(grads, max_norm=0.0)
    assert tree.equal(clipped, grads)
    assert norm.item() == pytest.approx(math.sqrt(52.0), rel=1e-6)


def test_global_norm_ignores_the_key_order():
    """A resumed run holds its params in the checkpoint's (sorted) key order, a fresh one in the model's: the
    norm it logs and clips by must not depend on that. This tree's norms, summed in the given order and in
    reverse, differ in fp32 (checked below, so the case can tell), and global_norm gives one value."""
    gen = torch.Generator().manual_seed(1)
    grads = {f"w{i:02d}": torch.randn(17 * (i + 1), generator=gen) * 10.0 ** (i % 5 - 2) for i in range(30)}
    reverse = dict(reversed(list(grads.items())))

    def in_dict_order(t):
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in t.values()]))
    assert not torch.equal(in_dict_order(grads), in_dict_order(reverse))
    assert torch.equal(tree.global_norm(grads), tree.global_norm(reverse))
    assert torch.equal(optim.clip_by_global_norm(reverse, 1.0)[1], tree.global_norm(grads))


def test_ema_update():
    gen = torch.Generator().manual_seed(5)
    ema, params = _tree(gen), _tree(gen, torch.bfloat16)
    new = optim.ema_update(ema, params, 0.99)
    want = {k: ema[k] * 0.99 + params[k].float() * 0.01 for k in ema}
    assert all(v.dtype == torch.float32 for v in new.values())
    assert tree.allclose(new, want, rtol=1e-6, atol=1e-7)
    assert not tree.allclose(new, {k: ema[k] * 0.01 + params[k].float() * 0.99 for k in ema}, rtol=1e-3)
    assert tree.equal(optim.ema_update(ema, params, 1.0), ema)
    assert tree.equal(optim.ema_update(ema, params, 0.0), tree.cast(params, torch.float32))


def test_schedules_at_key_steps():
    assert [optim.constant(0.5)(s) for s in (0, 7, 10_000)] == [0.5, 0.5, 0.5]
    assert [optim.linear_warmup(1.0, 4)(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert optim.linear_warmup(2.0, 0)(0) == 2.0
    cos = optim.cosine(1.0, warmup_steps=2, total_steps=10, min_ratio=0.1)
    assert cos(0) == pytest.approx(0.5) and cos(1) == pytest.approx(1.0) and cos(2) == pytest.approx(1.0)
    assert cos(6) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert cos(10) == pytest.approx(0.1) and cos(1000) == pytest.approx(0.1)
    no_warm = optim.cosine(2.0, warmup_steps=0, total_steps=4)
    assert [no_warm(s) for s in range(6)] == pytest.approx([2.0, 1.0 + math.sqrt(0.5), 1.0,
                                                            1.0 - math.sqrt(0.5), 0.0, 0.0])
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        optim.cosine(1.0, warmup_steps=10, total_steps=10)


def test_make_schedule():
    for name, direct in [("constant", optim.constant(0.3)), ("linear_warmup", optim.linear_warmup(0.3, 5)),
                         ("cosine", optim.cosine(0.3, 5, 20, 0.2))]:
        made = optim.make_schedule(name, 0.3, warmup_steps=5, total_steps=20, min_ratio=0.2)
        assert [made(s) for s in range(25)] == [direct(s) for s in range(25)]
    with pytest.raises(ValueError, match="'cosin'"):
        optim.make_schedule("cosin", 0.3, 5, 20, 0.0)


def test_state_tree_round_trip():
    gen = torch.Generator().manual_seed(6)
    params = _tree(gen)
    tx = optim.adamw(optim.linear_warmup(1e-2, 3))
    state = tx.init(params)
    for _ in range(3):
        params, state = tx.update(_tree(gen), state, params)

    flat = optim.state_to_tree(state)
    assert set(flat) == {"step"} | {f"{m}/{k}" for m in ("mu", "nu") for k in SHAPES}
    restored = optim.state_from_tree(safetensors.torch.load(safetensors.torch.save(flat)))
    assert torch.equal(restored.step, state.step) and restored.step.dtype == torch.int64
    assert tree.equal(restored.mu, state.mu) and tree.equal(restored.nu, state.nu)
    grads = _tree(gen)  # resuming from the restored state continues bit for bit
    a, b = tx.update(grads, state, params), tx.update(grads, restored, params)
    assert tree.equal(a[0], b[0]) and tree.equal(a[1].mu, b[1].mu)
    with pytest.raises(KeyError):
        optim.state_from_tree({k: v for k, v in flat.items() if k != "step"})
