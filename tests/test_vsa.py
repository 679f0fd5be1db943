"""fvfunc.ops.vsa, the plain-torch reference of Video Sparse Attention: dense at sparsity 0, a per-query
loop written out here on a small ragged grid, FastVideo's cube numbering and top-k rule, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from fvfunc.ops import attention
from fvfunc.ops import vsa as V

GRID = (5, 6, 7)  # no side divisible by 4: every edge cube is ragged


def _qkvg(grid, heads=2, dim=8, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    S = math.prod(grid)
    return [torch.randn(batch, S, heads, dim, generator=g, dtype=torch.float64) for _ in range(4)]


def test_cubes_follow_fastvideos_tile_partition():
    # FastVideo's get_tile_partition_indices, written out: cubes in (t, h, w) raster order, each cube's
    # tokens in raster order, edge cubes cut at the grid's end
    T, H, W = GRID
    idx = torch.arange(T * H * W).reshape(T, H, W)
    theirs = torch.cat([idx[t:t + 4, h:h + 4, w:w + 4].flatten()
                        for t in range(0, T, 4) for h in range(0, H, 4) for w in range(0, W, 4)])
    assert torch.equal(V.tile_order(GRID), theirs)
    sizes = V.cube_sizes(GRID)
    assert sizes.tolist() == [a * b * c for a in (4, 1) for b in (4, 2) for c in (4, 3)]
    assert V.num_cubes(GRID) == 8 and V.num_cubes((21, 30, 52)) == 6 * 8 * 13


def test_topk_is_fastvideos_compute_topk():
    # the same float arithmetic as FastVideo's: (1 - 0.99) * 100 is 1.0000000000000009, so 2 cubes
    assert [V.topk(s, 100) for s in (0.0, 0.5, 0.8, 0.9, 0.99, 0.999)] == [100, 50, 20, 10, 2, 1]
    assert V.topk(0.9, 2340) == 234 and V.topk(0.8, 7) == 2  # ceil((1 - s) n)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="sparsity must be in"):
            V.topk(bad, 10)


def test_sparsity_zero_without_gate_is_dense_attention():
    q, k, v, _ = _qkvg(GRID)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # dense attention in fp64
    dense = (torch.softmax(qt @ kt.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ vt).transpose(1, 2)
    assert torch.allclose(V.vsa(q, k, v, None, GRID, 0.0), dense, atol=1e-12, rtol=0)
    # a zero gate is no coarse branch; fp32 inputs agree within fp32 rounding
    zero = torch.zeros_like(q)
    assert torch.allclose(V.vsa(q, k, v, zero, GRID, 0.0), dense, atol=1e-12, rtol=0)
    f = [x.float() for x in (q, k, v)]
    assert torch.allclose(V.vsa(*f, None, GRID, 0.0), attention(*f, "math"), atol=1e-5, rtol=1e-5)


def _loop_reference(q, k, v, gate, grid, sparsity):
    """VSA one query token at a time, from the definitions (cube means, top-k cubes, gated sum)."""
    B, S, H, D = q.shape
    T, Hh, W = grid
    nh, nw = -(-Hh // 4), -(-W // 4)
    cube = [((t // 4) * nh + h // 4) * nw + w // 4 for t in range(T) for h in range(Hh) for w in range(W)]
    n = max(cube) + 1
    members = [[i for i in range(S) if cube[i] == c] for c in range(n)]
    kk = max(1, min(math.ceil((1 - sparsity) * n), n))
    out = torch.zeros_like(q)
    for b in range(B):
        for hd in range(H):
            qc, kc, vc = (torch.stack([x[b, members[c], hd].mean(0) for c in range(n)]) for x in (q, k, v))
            for i in range(S):
                row = qc[cube[i]] @ kc.T / math.sqrt(D)
                coarse = torch.softmax(row, 0) @ vc
                # top-k by score, ties to the lower cube index
                ranked = sorted(range(n), key=lambda c: (-row[c].item(), c))[:kk]
                keys = [j for c in sorted(ranked) for j in members[c]]
                w = torch.softmax(k[b, keys, hd] @ q[b, i, hd] / math.sqrt(D), 0)
                out[b, i, hd] = w @ v[b, keys, hd] + gate[b, i, hd] * coarse
    return out


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_equals_a_per_query_loop(sparsity):
    grid = (5, 4, 6)
    q, k, v, gate = _qkvg(grid, batch=1, seed=1)
    ours = V.vsa(q, k, v, gate, grid, sparsity)
    assert torch.allclose(ours, _loop_reference(q, k, v, gate, grid, sparsity), atol=1e-10, rtol=0)
    # and the sparsity matters: dense attention is something else
    assert not torch.allclose(ours, attention(q, k, v, "math") + 0 * gate, atol=1e-3)


def test_ties_keep_the_lower_cube():
    scores = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    assert V.select(scores, 2).tolist() == [[False, True, True, False, False]]


def test_gradients_reach_q_k_v_and_the_gate():
    q, k, v, gate = (x.float().requires_grad_() for x in _qkvg(GRID, seed=2))
    out = V.vsa(q, k, v, gate, GRID, 0.75)
    out.square().sum().backward()
    for name, x in zip("qkvg", (q, k, v, gate), strict=True):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, name
    # the gate's gradient is exactly the coarse branch times dL/dout
    with torch.no_grad():
        coarse = V.vsa(q, k, v, torch.ones_like(gate), GRID, 0.75) - V.vsa(q, k, v, None, GRID, 0.75)
    assert torch.allclose(gate.grad, 2 * out.detach() * coarse, atol=1e-4, rtol=1e-4)


def test_torch_func_grad_matches_autograd():
    q, k, v, gate = (x.float() for x in _qkvg(GRID, seed=3))
    f = lambda q, g: V.vsa(q, k, v, g, GRID, 0.5).sum()  # noqa: E731
    gq, gg = torch.func.grad(f, argnums=(0, 1))(q, gate)
    q2, g2 = q.clone().requires_grad_(), gate.clone().requires_grad_()
    f(q2, g2).backward()
    assert torch.allclose(gq, q2.grad, atol=1e-6) and torch.allclose(gg, g2.grad, atol=1e-6)


def test_refuses_a_grid_that_is_not_the_tokens():
    q, k, v, _ = _qkvg(GRID)
    with pytest.raises(ValueError, match=r"token grid \(5, 6, 6\)"):
        V.vsa(q, k, v, None, (5, 6, 6), 0.5)


def test_warm_up_is_fastvideos_phase3_schedule():
    def fastvideo(step, sparsity, rate, interval):  # its trainer's rule, steps counted from 1
        if interval > 1:
            return min(step // interval, int(sparsity // rate)) * rate
        return sparsity

    for s, rate, interval in ((0.9, 0.03, 50), (0.7, 0.03, 50), (0.8, 0.1, 3), (0.9, 0.0, 0), (0.9, 0.03, 1)):
        ours = [V.sparsity_at(i, s, rate, interval) for i in range(2000)]
        assert ours == [fastvideo(i + 1, s, rate, interval) for i in range(2000)]
    assert V.sparsity_at(0, 0.9, 0.03, 50) == 0.0 and V.sparsity_at(49, 0.9, 0.03, 50) == 0.03
    assert abs(V.sparsity_at(10_000, 0.9, 0.03, 50) - 0.9) < 1e-9
    with pytest.raises(ValueError, match="vsa_decay_rate must be > 0"):
        V.sparsity_at(0, 0.9, 0.0, 50)


# ------------------------------------------------------------------ the kernel against the reference (GPU)


def test_kernel_layout_is_fastvideos_tile_and_non_pad_index():
    # FastVideo's VSA backend, written out: tokens in tile-partition order, each cube in a 64-slot block at
    # block * 64 + its position (get_non_pad_index), undone by non_pad_index[reverse_tile_partition_indices]
    for grid in (GRID, (6, 10, 14), (4, 8, 8)):
        order = V.tile_order(grid)
        sizes = V.cube_sizes(grid)
        non_pad = torch.cat([c * 64 + torch.arange(int(n)) for c, n in enumerate(sizes)])
        slot, block_sizes = V.tiling(grid, "cpu")[:2]
        assert torch.equal(slot, non_pad[torch.argsort(order)])
        assert block_sizes.dtype == torch.int32 and torch.equal(block_sizes, sizes.int())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the VSA kernel needs a CUDA GPU")
@pytest.mark.parametrize("sparsity", [0.0, 0.8, 0.9])
def test_kernel_equals_the_reference_in_bf16(sparsity):
    pytest.importorskip("fastvideo_kernel")
    grid, heads, dim = (6, 10, 14), 2, 128  # ragged on every side
    g = torch.Generator(device="cuda").manual_seed(0)
    S = math.prod(grid)
    q, k, v, gate = (torch.randn(1, S, heads, dim, generator=g, device="cuda", dtype=torch.bfloat16)
                     .requires_grad_() for _ in range(4))
    assert V.uses_kernel(q)  # what the runner's 'vsa' backend runs here
    out = V.attend(q, k, v, gate, grid, sparsity)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v, gate))
    q32, k32, v32, g32 = (x.detach().float().requires_grad_() for x in (q, k, v, gate))
    # the reference chooses cubes as the kernel does (bf16 cube means and scores); in fp32 a near tie can
    # choose another cube (the kernel's own quickselect did, at 0.8 on an H200: 0.141 relative error)
    ref = V.vsa(q32, k32, v32, g32, grid, sparsity, select_dtype=torch.bfloat16)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q32, k32, v32, g32))

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    assert rel(out, ref) < 2e-2
    for name, a, b in zip("qkvg", grads, ref_grads, strict=True):
        assert rel(a, b) < 5e-2, name
    # no gate: no coarse branch (the kernel alone would add it ungated)
    with torch.no_grad():
        assert rel(V.attend(q, k, v, None, grid, sparsity),
                   V.vsa(q32, k32, v32, None, grid, sparsity, select_dtype=torch.bfloat16)) < 2e-2


# ------------------------------------------------------------------ the backend in the block runner


def _tiny_wan(gates: bool):
    from fvfunc import random
    from fvfunc.models import wan
    from fvfunc.testing import tiny

    cfg = tiny.tiny_config()
    params = wan.init(cfg, random.key(0))
    if gates:  # FastVideo's VSA Wan: blocks.{i}.to_gate_compress, Linear(D, D)
        g = torch.Generator().manual_seed(1)
        for i in range(cfg.num_layers):
            params[f"blocks.{i}.to_gate_compress.weight"] = 0.1 * torch.randn(cfg.dim, cfg.dim, generator=g)
            params[f"blocks.{i}.to_gate_compress.bias"] = 0.1 * torch.randn(cfg.dim, generator=g)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 5, 12, 12, generator=g)  # a (5, 6, 6) token grid: 8 ragged cubes
    return wan, cfg, params, x, torch.tensor([500.0]), torch.randn(1, 7, cfg.text_dim, generator=g)


def test_runner_vsa_at_sparsity_zero_without_gates_is_the_dense_forward():
    from fvfunc import runner

    wan, cfg, params, x, t, ctx = _tiny_wan(gates=False)
    dense = wan.apply(params, cfg, x, t, ctx)
    ours = runner.apply(wan.FAMILY, params, cfg, x, t, ctx, attention="vsa", vsa_sparsity=0.0)
    assert torch.allclose(ours, dense, atol=1e-5, rtol=1e-5)
    sparse = runner.apply(wan.FAMILY, params, cfg, x, t, ctx, attention="vsa", vsa_sparsity=0.75)
    assert not torch.allclose(sparse, dense, atol=1e-4)
    with pytest.raises(ValueError, match="vsa_sparsity must be in"):
        runner.apply(wan.FAMILY, params, cfg, x, t, ctx, attention="vsa", vsa_sparsity=1.0)


def test_runner_vsa_gate_remat_and_compile_agree():
    from fvfunc import runner

    wan, cfg, params, x, t, ctx = _tiny_wan(gates=True)
    plain = runner.apply(wan.FAMILY, params, cfg, x, t, ctx, attention="vsa", vsa_sparsity=0.75)
    gateless = {k: v for k, v in params.items() if "to_gate_compress" not in k}
    assert not torch.allclose(plain, runner.apply(wan.FAMILY, gateless, cfg, x, t, ctx, attention="vsa",
                                                  vsa_sparsity=0.75), atol=1e-4)

    def grads(**options):
        def loss(p):
            return runner.apply(wan.FAMILY, p, cfg, x, t, ctx, attention="vsa", vsa_sparsity=0.75,
                                **options).square().mean()
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        return dict(zip(leaves, torch.autograd.grad(loss(leaves), list(leaves.values())), strict=True))

    ref = grads()
    assert ref["blocks.0.to_gate_compress.weight"].abs().sum() > 0
    for options in ({"remat": "attention"}, {"remat": "full"}, {"compile": "aot_eager"}):
        got = grads(**options)
        for k in ref:
            assert torch.allclose(got[k], ref[k], atol=1e-5, rtol=1e-4), (options, k)


# ------------------------------------------------------------------ the tiled path (the kernel's, on the CPU)


@pytest.mark.parametrize("grid", [(5, 6, 6), (4, 8, 8), (6, 10, 14)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_tiled_path_equals_the_reference(grid, sparsity):
    # the kernel's pipeline (tiling, cube means, scores, top-k, coarse branch, gate, untiling) with the
    # block-sparse attention written out in its place: the reference's output and gradients, in fp64
    g = torch.Generator().manual_seed(3)
    S = math.prod(grid)
    q, k, v, gate = (torch.randn(1, S, 2, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(4))
    for gt in (gate, None):
        ours = V.tiled_vsa(q, k, v, gt, grid, sparsity, fine=V.reference_fine)
        ref = V.vsa(q, k, v, gt, grid, sparsity)
        assert torch.allclose(ours, ref, atol=1e-10, rtol=0)
    leaves = (q, k, v, gate)
    a = torch.autograd.grad(V.tiled_vsa(q, k, v, gate, grid, sparsity, fine=V.reference_fine).square().sum(), leaves)
    b = torch.autograd.grad(V.vsa(q, k, v, gate, grid, sparsity).square().sum(), leaves)
    for x, y in zip(a, b, strict=True):
        assert torch.allclose(x, y, atol=1e-10, rtol=0)


def test_tiling_round_trips_with_zero_padding():
    grid = (6, 10, 14)
    x = torch.randn(2, math.prod(grid), 3, 4)
    xt = V.tiled(x, grid)
    assert xt.shape == (2, 3, V.num_cubes(grid) * 64, 4) and xt.is_contiguous()
    assert torch.equal(V.untiled(xt, grid), x)
    assert xt.abs().sum() == pytest.approx(x.abs().sum().item(), rel=1e-6)  # the padding slots are zeros


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_chosen_cubes_ties_go_to_the_lower_cube_as_select(dtype):
    # bf16 scores tie often; the kernel path's exact-integer top-k (16-bit scores: int32 keys; fp32: int64)
    # chooses as the reference's stable sort
    g = torch.Generator().manual_seed(4)
    scores = (torch.randn(2, 3, 40, 40, generator=g) * 4).round().to(dtype)  # many exact ties
    scores[1, 2, 3] = torch.randn(40, generator=g).to(dtype) * 1e4  # large, of both signs
    scores[0, 0, 0, :5] = -0.0
    scores[0, 0, 0, 5:10] = 0.0
    for k in (1, 7, 20, 40):
        idx = V.chosen_cubes(scores, k)
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)
        assert torch.equal(mask, V.select(scores.float(), k)), k
        assert torch.equal(idx, torch.sort(idx, dim=-1).values)


def test_tiled_path_compiles_into_one_graph():
    # around the kernel everything is traceable: torch.compile fuses it into the block's graph (the
    # block-sparse op itself is a custom op, opaque to it); fullgraph fails on any graph break
    grid = (5, 6, 6)
    g = torch.Generator().manual_seed(5)
    q, k, v, gate = (torch.randn(1, math.prod(grid), 2, 8, generator=g) for _ in range(4))
    V.tiling(grid, "cpu")  # (made first, as the block runner does before its compiled blocks)
    compiled = torch.compile(V.tiled_vsa, backend="aot_eager", fullgraph=True)
    ours = compiled(q, k, v, gate, grid, 0.5, fine=V.reference_fine)
    assert torch.allclose(ours, V.vsa(q, k, v, gate, grid, 0.5), atol=1e-5, rtol=1e-5)


def test_tiling_and_untiling_are_adjoint_and_vmap():
    # the written-out backward of the tiling (the untiling) and of the untiling (the tiling) equal autograd's
    # own through the plain gathers (index_select's scatter-add backward)
    grid = (5, 6, 7)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, math.prod(grid), 2, 4, generator=g, dtype=torch.float64)
    y = torch.randn(1, 2, V.num_cubes(grid) * 64, 4, generator=g, dtype=torch.float64)
    for ours, plain, at, cotangent in ((V.tiled, V._tile, x, y), (V.untiled, V._untile, y, x)):
        got = torch.func.vjp(lambda a, f=ours: f(a, grid), at)[1](cotangent)[0]
        want = torch.func.vjp(lambda a, f=plain: f(a, grid), at)[1](cotangent)[0]
        assert torch.equal(got, want), ours.__name__
    batch = torch.randn(3, *x.shape, generator=g, dtype=torch.float64)
    assert torch.equal(torch.func.vmap(lambda a: V.tiled(a, grid))(batch),
                       torch.stack([V.tiled(a, grid) for a in batch]))


def _fastvideo_format_attention(q, k, v, q2k_idx, q2k_num, sizes):
    """fastvideo-kernel's block-sparse attention contract, written out: query slot block r attends to the real
    tokens of the key blocks q2k_idx[.., r, :q2k_num[.., r]] (the row padded with -1 after them)."""
    n, slot = sizes.numel(), 64
    listed = (torch.arange(q2k_idx.shape[-1]) < q2k_num[..., None]) & (q2k_idx >= 0)
    chosen = torch.zeros(*q2k_idx.shape[:-1], n + 1, dtype=torch.bool)
    chosen = chosen.scatter(-1, torch.where(listed, q2k_idx, n).long(), True)[..., :n]  # [B, H, n, n]
    real = torch.arange(slot)[None, :] < sizes[:, None]  # [n, 64]
    allowed = (chosen[..., None] & real).flatten(-2).repeat_interleave(slot, dim=-2)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ v


@torch.library.custom_op("fvfunc_test::block_sparse_attn", mutates_args=(), device_types="cpu")
def _stand_in_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q2k_idx: torch.Tensor, q2k_num: torch.Tensor,
                 sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _fastvideo_format_attention(q, k, v, q2k_idx, q2k_num, sizes), q.new_zeros(q.shape[:3])


@_stand_in_op.register_fake
def _(q, k, v, q2k_idx, q2k_num, sizes):
    return torch.empty_like(q), q.new_empty(q.shape[:3])


def _stand_in_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _stand_in_backward(ctx, grad_o, grad_m):
    q, k, v, idx, num, sizes = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        grads = torch.autograd.grad(_fastvideo_format_attention(*leaves, idx, num, sizes), leaves, grad_o)
    return *grads, None, None, None


_stand_in_op.register_autograd(_stand_in_backward, setup_context=_stand_in_setup)


def test_kernel_path_with_its_op_compiles_into_one_graph_and_equals_the_reference(monkeypatch):
    # kernel_vsa as it runs on a GPU (the index rows in fastvideo-kernel's format, the op looked up in
    # the resolved _KERNEL) with a CPU op of the kernel's contract in its place: one graph, the reference's
    # output and gradients. (An op lookup traced into the graph, such as an import that fails, would break it.)
    monkeypatch.setitem(V._KERNEL, "op", torch.ops.fvfunc_test.block_sparse_attn)
    grid = (5, 6, 7)
    g = torch.Generator().manual_seed(7)
    q, k, v, gate = (torch.randn(1, math.prod(grid), 2, 8, generator=g).requires_grad_() for _ in range(4))
    V.tiling(grid, "cpu")
    compiled = torch.compile(V.kernel_vsa, backend="aot_eager", fullgraph=True)
    for sparsity in (0.0, 0.7):
        ours = compiled(q, k, v, gate, grid, sparsity)
        ref = V.vsa(q, k, v, gate, grid, sparsity, select_dtype=torch.float32)
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
        a = torch.autograd.grad(ours.square().sum(), (q, k, v, gate))
        b = torch.autograd.grad(ref.square().sum(), (q, k, v, gate))
        for x, y in zip(a, b, strict=True):
            assert torch.allclose(x, y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("compile_", [False, True])
def test_remat_keeps_the_cube_choice(compile_):
    # remat="attention" keeps the top-k cube choice of the forward pass (a small int tensor) rather than redo
    # it in the backward pass; remat="full" redoes it. The gradients are those of no remat either way.
    from torch.profiler import profile

    from fvfunc import runner

    grid = (5, 6, 7)
    g = torch.Generator().manual_seed(8)
    h = torch.randn(1, math.prod(grid), 2, 8, generator=g)
    params = {n: torch.randn(8, generator=g).requires_grad_() for n in ("q", "k", "v")}
    V.tiling(grid, "cpu")

    def block(p, cfg, x, inputs, dtype, attend_fn):
        return V.tiled_vsa(x * p["q"], x * p["k"], x * p["v"], x, grid, 0.6, fine=V.reference_fine).sin()

    run = runner._compiled("aot_eager") if compile_ else runner.run_block
    ref = torch.autograd.grad(block(params, None, h, None, None, None).sum(), list(params.values()))
    for remat, calls in (("attention", 1), ("full", 2)):
        with profile() as prof:
            out = run(block, params, None, h, None, None, None, remat)
            got = torch.autograd.grad(out.sum(), list(params.values()))
        names = [e.name for e in prof.events()]
        assert names.count("aten::topk") == calls, remat  # (the choice's top-k, once per run of it)
        for a, b in zip(got, ref, strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), remat
