"""Video Sparse Attention (VSA; Zhang et al. 2025) written out in plain torch: the reference of the math
FastVideo's `fastvideo-kernel` (`video_sparse_attn`) computes, readable, differentiable and CPU-friendly.

Tokens of a (T, H, W) grid are grouped into 4x4x4 cubes; cubes are numbered in (t-cube, h-cube, w-cube)
raster order and the cubes at ragged edges are smaller (a grid of 5 frames has cubes of 4 and 1 frames),
as FastVideo's tile partition does. For q, k, v [B, S, H, Dh] (S = T*H*W tokens in raster order):

    q_c, k_c, v_c   = the mean of each cube's tokens (over its real tokens only)          [B, n, H, Dh]
    scores          = q_c k_c^T / sqrt(Dh)                                                 [B, H, n, n]
    coarse          = softmax(scores) v_c, given to every token of the query's cube
    selected        = per query cube, the top-k key cubes by `scores`, k = ceil((1 - sparsity) n),
                      clamped to [1, n] (FastVideo's compute_topk; ties: the lower cube index first)
    fine            = softmax(q k^T / sqrt(Dh)) v over the keys in the selected cubes only
    out             = fine + gate * coarse     (gate: the model's to_gate_compress output, [B, S, H, Dh];
                      None drops the coarse branch, as a zero gate does)

At sparsity 0 every cube is selected and `fine` is dense attention. This reference builds the [S, S]
mask, so it is O(S^2) in memory, like the "math" backend: it is the oracle for the kernel, not a fast path.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch

TILE = (4, 4, 4)
"""VSA's cube (t, h, w) in tokens (FastVideo's VSA_TILE_SIZE)."""


def check_sparsity(sparsity: float, name: str = "sparsity") -> None:
    if not 0 <= sparsity < 1:
        raise ValueError(f"{name} must be in [0, 1), got {sparsity}")


def num_cubes(grid: tuple[int, int, int], tile: tuple[int, int, int] = TILE) -> int:
    return math.prod([-(-g // t) for g, t in zip(grid, tile, strict=True)])


def topk(sparsity: float, n: int) -> int:
    """Key cubes each query cube attends to finely: ceil((1 - sparsity) n), clamped to [1, n]."""
    check_sparsity(sparsity)
    return max(1, min(math.ceil((1 - sparsity) * n), n))


@functools.cache
def _cube_of_token(grid: tuple[int, int, int], tile: tuple[int, int, int], device: str) -> torch.Tensor:
    T, H, W = grid
    nh, nw = -(-H // tile[1]), -(-W // tile[2])
    t = torch.arange(T, device=device) // tile[0]
    h = torch.arange(H, device=device) // tile[1]
    w = torch.arange(W, device=device) // tile[2]
    return ((t[:, None, None] * nh + h[None, :, None]) * nw + w[None, None, :]).flatten()


def cube_of_token(grid: tuple[int, int, int], tile: tuple[int, int, int] = TILE, device=None) -> torch.Tensor:
    """The cube index [S] of each token of a raster-order (T, H, W) grid, cubes numbered as FastVideo's."""
    return _cube_of_token(tuple(grid), tuple(tile), str(torch.device(device or "cpu")))


def tile_order(grid: tuple[int, int, int], tile: tuple[int, int, int] = TILE, device=None) -> torch.Tensor:
    """The token permutation [S] that lists the tokens cube by cube (each cube's tokens in raster order):
    FastVideo's tile partition indices, the layout its kernels take."""
    return torch.sort(cube_of_token(grid, tile, device), stable=True).indices


def cube_sizes(grid: tuple[int, int, int], tile: tuple[int, int, int] = TILE, device=None) -> torch.Tensor:
    """The number of real tokens of each cube [n] (FastVideo's variable block sizes)."""
    return torch.bincount(cube_of_token(grid, tile, device), minlength=num_cubes(grid, tile))


def _cube_means(x: torch.Tensor, cube: torch.Tensor, n: int) -> torch.Tensor:
    """[B, S, H, D] -> the mean over each cube's tokens [B, n, H, D]."""
    sums = x.new_zeros(x.shape[0], n, *x.shape[2:]).index_add(1, cube, x)
    return sums / torch.bincount(cube, minlength=n).to(x.dtype).view(1, n, 1, 1)


def select(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [.., n] mask of the k largest scores of each row (ties: the lower index first)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order[..., :k], True)


def vsa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None, grid: tuple[int, int, int],
        sparsity: float, tile: tuple[int, int, int] = TILE, select_dtype: torch.dtype | None = None) -> torch.Tensor:
    """VSA of q, k, v [B, S, H, Dh] over the raster-order token `grid` (see the module docstring), in fp32 (at
    least), returned in q's dtype. `select_dtype`: the dtype the top-k cube choice is made in, cube means and
    their scores rounded to it as fastvideo-kernel does in bf16 (None: the compute dtype); a near tie may
    then choose another cube, so the kernel is compared with the reference choosing as it does."""
    check_sparsity(sparsity)
    B, S, H, D = q.shape
    if math.prod(grid) != S or k.shape[1] != S:
        raise ValueError(f"vsa is self-attention over the token grid {tuple(grid)} ({math.prod(grid)} tokens); "
                         f"q has {S} tokens and k {k.shape[1]}")
    cube = cube_of_token(grid, tile, q.device)
    n = num_cubes(grid, tile)
    ct = torch.promote_types(q.dtype, torch.float32)  # fp32 at least (fp64 stays fp64, for tests)
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    scale = 1.0 / math.sqrt(D)

    # coarse: attention between cube means; every token of a query cube gets its cube's row
    q_c, k_c, v_c = (_cube_means(x, cube, n).transpose(1, 2) for x in (qf, kf, vf))  # [B, H, n, D]
    scores = (q_c @ k_c.transpose(-1, -2)) * scale  # [B, H, n, n]
    coarse = (torch.softmax(scores, dim=-1) @ v_c).transpose(1, 2)[:, cube]  # [B, S, H, D]

    # fine: each query attends to the tokens of its cube's top-k key cubes
    ranked = scores.detach()
    if select_dtype is not None:  # the kernel's cube means and scores, in its dtype and its layout
        qs, ks = [tiled_means(tiled(x.detach().to(select_dtype), grid), grid) for x in (q, k)]
        ranked = cube_scores(qs, ks).to(ct)
    chosen = select(ranked, topk(sparsity, n))  # [B, H, n, n]
    allowed = chosen[:, :, cube][:, :, :, cube]  # [B, H, S, S]
    logits = (qf.transpose(1, 2) @ kf.transpose(1, 2).transpose(-1, -2)) * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    fine = (torch.softmax(logits, dim=-1) @ vf.transpose(1, 2)).transpose(1, 2)  # [B, S, H, D]

    out = fine if gate is None else fine + gate.to(ct) * coarse
    return out.to(q.dtype)


# ------------------------------------------------------------------ the tiled path (fastvideo-kernel)
# The kernel's layout: [B, H, n * 64, Dh], each cube's tokens in its own zero-padded 64-token slot, cube
# after cube (FastVideo's tile + non-pad index layout). Everything around the block-sparse kernel (the
# tiling, the cube means, the scores, the top-k choice, the coarse branch and the gate) is plain torch
# that torch.compile traces into the block's graph, fused with the projections around it; only the
# fine attention is an opaque op (fastvideo-kernel's sm_90 / Triton custom ops, with their own autograd).


_KERNEL: dict[str, object] = {}
"""fastvideo-kernel's package and block-sparse op, resolved once, eagerly: `tiling` on a CUDA device resolves
them, and the block runner makes its tiling before its compiled blocks run, so a compiled graph reads them
as constants. (Not functools.cache: Dynamo traces a cached function's body, and an import that fails inside
a trace, such as the kernel's extension under another torch, breaks the graph of every block.)"""


def kernel_module():
    """fastvideo-kernel's Python package (pip install 'fvfunc[vsa]'), or None when it is not installed."""
    if "module" not in _KERNEL:
        try:
            import fastvideo_kernel
        except (ImportError, OSError):  # (also a wheel whose extension does not load: the reference runs)
            fastvideo_kernel = None
        _KERNEL["module"] = fastvideo_kernel
    return _KERNEL["module"]


@functools.cache
def kept_ops() -> frozenset:
    """The ops whose outputs remat='attention' keeps: the cube choice, and the kernel's autograd ops
    where it is installed (those that exist)."""
    ops = {torch.ops.fvfunc.vsa_chosen_cubes.default}
    ns = getattr(torch.ops, "fastvideo_kernel", None) if kernel_module() is not None else None
    ops |= {getattr(ns, n).default for n in ("block_sparse_attn_triton", "block_sparse_attn_sm90")
            if ns is not None and hasattr(ns, n)}
    return frozenset(ops)


class Tiling(NamedTuple):
    """The tiled layout of one token grid: `dst` the slot of each raster-order token [S]; `sizes` the real
    tokens of each cube [n] (int32, the kernel's variable block sizes); `src` the raster token of each
    slot [n * 64] and `real` whether the slot holds one (the tiling as a gather, so that torch.compile
    fuses it into one write of the kernel's contiguous layout)."""

    dst: torch.Tensor
    sizes: torch.Tensor
    src: torch.Tensor
    real: torch.Tensor


_TILINGS: dict[tuple, Tiling] = {}


def tiling(grid: tuple[int, int, int], device) -> Tiling:
    """The grid's `Tiling` on `device`, made once. (A plain dict, not functools.cache: torch.compile reads
    a made entry as constants, where it would trace a cached function's body into every graph; the block
    runner makes the entry before its compiled blocks run.)"""
    key = (tuple(grid), str(torch.device(device)))
    if key not in _TILINGS:
        _TILINGS[key] = _make_tiling(*key)
        if torch.device(device).type == "cuda" and kernel_module() is not None:
            kernel_op()  # (resolved here, eagerly, with the tables: see _KERNEL)
    return _TILINGS[key]


def _make_tiling(grid: tuple[int, int, int], device: str) -> Tiling:
    order = tile_order(grid, device=device)
    sizes = cube_sizes(grid, device=device)
    slot = math.prod(TILE)
    cube = cube_of_token(grid, device=device)
    starts = torch.cumsum(sizes, 0) - sizes
    dst = torch.empty_like(order)
    dst[order] = cube[order] * slot + torch.arange(order.numel(), device=order.device) - starts[cube[order]]
    S, slots = dst.numel(), sizes.numel() * slot
    src = torch.arange(slots, device=dst.device) % S
    src[dst] = torch.arange(S, device=dst.device)
    real = torch.zeros(slots, dtype=torch.bool, device=dst.device)
    real[dst] = True
    return Tiling(dst, sizes.to(torch.int32), src, real)


def _tile(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    t = tiling(grid, x.device)
    return torch.where(t.real[:, None, None], x.index_select(1, t.src), 0).transpose(1, 2).contiguous()


def _untile(y: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    return y.transpose(1, 2).index_select(1, tiling(grid, y.device).dst)


class _Tiled(torch.autograd.Function):
    """The tiling with its adjoint written out: tiling places each token in its own slot (padding zero), so
    its adjoint is the untiling, a gather, and the untiling's adjoint is the tiling. Both directions are
    gathers then, where autograd would scatter-add (atomics) through an index_select's backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, grid, untile):
        return _untile(x, grid) if untile else _tile(x, grid)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.grid, ctx.untile = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx, g):
        return _Tiled.apply(g, ctx.grid, not ctx.untile), None, None


def tiled(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """[B, S, H, D] raster order -> [B, H, n * 64, D] contiguous, the kernel's layout (padding slots zero)."""
    return _Tiled.apply(x, tuple(grid), False)


def untiled(y: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """[B, H, n * 64, D] in the kernel's layout -> [B, S, H, D] raster order (padding slots dropped)."""
    return _Tiled.apply(y, tuple(grid), True)


def tiled_means(xt: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """The cube means [B, H, n, D] of a tiled tensor, in its dtype: fp32 sums of each 64-token slot (its
    padding zeros) over the cube's real size, as fastvideo-kernel's fused_block_mean computes them."""
    sizes = tiling(grid, xt.device).sizes
    B, H, _, D = xt.shape
    sums = xt.to(torch.promote_types(xt.dtype, torch.float32)).view(B, H, sizes.numel(), math.prod(TILE), D).sum(3)
    return (sums / sizes.view(1, 1, -1, 1)).to(xt.dtype)


def chosen_cubes(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k key cubes [.., k] (ascending, int64) of the largest scores of each row, ties to the lower
    index, as `select`; on a torch.topk of exact integer keys (the score's order-preserving bits with the
    index below them): deterministic, and no sort of every row. An opaque op (`fvfunc::vsa_chosen_cubes`),
    so that remat="attention" keeps its small output rather than redo the top-k in the backward pass."""
    return torch.ops.fvfunc.vsa_chosen_cubes(scores.detach(), k)


@torch.library.custom_op("fvfunc::vsa_chosen_cubes", mutates_args=())
def _chosen_cubes(scores: torch.Tensor, k: int) -> torch.Tensor:
    n = scores.shape[-1]
    if n > 1 << 16 or scores.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return torch.sort(torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :k], dim=-1).values
    index = torch.arange(n, device=scores.device)
    if scores.itemsize == 2:  # 16-bit scores: their bits and the index fit one int32 (a cheaper top-k)
        bits = (scores + 0.0).view(torch.int16).to(torch.int32)  # (+0.0: -0 and +0 are one score, as in the sort)
        ordered = bits ^ ((bits >> 15) & 0x7FFF)  # ascending ints for ascending floats
        keys = ordered * (1 << 16) + ((1 << 16) - 1 - index).to(torch.int32)
    else:
        bits = (scores + 0.0).view(torch.int32)
        ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)
        keys = ordered * (1 << 16) + ((1 << 16) - 1 - index)
    return torch.sort(torch.topk(keys, k, dim=-1, sorted=False).indices, dim=-1).values


@_chosen_cubes.register_fake
def _(scores, k):
    return scores.new_empty((*scores.shape[:-1], k), dtype=torch.int64)


def reference_fine(qt, kt, vt, idx, grid) -> torch.Tensor:
    """The block-sparse fine attention in the tiled layout, written out (the kernel's CPU stand-in):
    each query slot attends to the real tokens of its cube's chosen key cubes `idx` [B, H, n, k]."""
    sizes = tiling(grid, qt.device).sizes
    n, slot = sizes.numel(), math.prod(TILE)
    real = torch.arange(slot, device=qt.device)[None, :] < sizes[:, None]  # [n, 64]
    chosen = torch.zeros(*idx.shape[:-1], n, dtype=torch.bool, device=qt.device).scatter(-1, idx, True)
    allowed = chosen[..., None] & real  # [B, H, n, n, 64]: query cube -> key token
    allowed = allowed.flatten(-2).repeat_interleave(slot, dim=-2)  # [B, H, n * 64, n * 64]
    ct = torch.promote_types(qt.dtype, torch.float32)
    logits = (qt.to(ct) @ kt.to(ct).transpose(-1, -2)) / math.sqrt(qt.shape[-1])
    return (torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ vt.to(ct)).to(qt.dtype)


def kernel_fine(qt, kt, vt, idx, grid) -> torch.Tensor:
    """fastvideo-kernel's block-sparse attention (its sm_90 op on Hopper, its Triton op elsewhere; both
    custom ops with autograd) on the chosen cubes `idx` [B, H, n, k]."""
    sizes = tiling(grid, qt.device).sizes
    n = sizes.numel()
    pad = idx.new_full((*idx.shape[:-1], n - idx.shape[-1]), -1)  # the kernel's index rows: n wide, -1 after
    q2k = torch.cat([idx, pad], -1).to(torch.int32)
    num = torch.full(idx.shape[:-1], idx.shape[-1], dtype=torch.int32, device=idx.device)
    return kernel_op()(qt, kt, vt, q2k, num, sizes)[0]


def kernel_op():
    """fastvideo-kernel's block-sparse op: its sm_90 (ThunderKittens) op where its compiled extension loads
    on a Hopper card, as fastvideo-kernel itself chooses; its Triton op otherwise (e.g. a wheel whose
    extension does not load under this torch, or FASTVIDEO_VSA_TRITON=1)."""
    if "op" not in _KERNEL:
        try:
            from fastvideo_kernel._C import fastvideo_kernel_ops as ext
            loads = all(hasattr(ext, f) for f in ("block_sparse_fwd", "block_sparse_bwd"))
        except (ImportError, OSError):  # (seen under torch 2.11: an undefined NCCL symbol of a 2.12 build)
            loads = False
        ops = torch.ops.fastvideo_kernel
        sm90 = (loads and torch.cuda.get_device_capability() == (9, 0)
                and os.environ.get("FASTVIDEO_VSA_TRITON") != "1")
        _KERNEL["op"] = ops.block_sparse_attn_sm90 if sm90 else ops.block_sparse_attn_triton
    return _KERNEL["op"]


def tiled_vsa(q, k, v, gate, grid, sparsity, fine=kernel_fine) -> torch.Tensor:
    """`vsa` computed as fastvideo-kernel's `video_sparse_attn` does, in its tiled layout and its dtype
    (bf16 cube means, scores and coarse branch), with `fine` the block-sparse attention. The top-k
    choice is `select`'s (ties to the lower cube), not the kernel's quickselect, whose choice among
    tied bf16 scores is its own: so `vsa(..., select_dtype=bf16)` chooses the same cubes."""
    check_sparsity(sparsity)
    B, S, H, D = q.shape
    if math.prod(grid) != S or k.shape[1] != S:
        raise ValueError(f"vsa is self-attention over the token grid {tuple(grid)} ({math.prod(grid)} tokens); "
                         f"q has {S} tokens and k {k.shape[1]}")
    n = num_cubes(grid)
    qt, kt, vt = tiled(q, grid), tiled(k, grid), tiled(v, grid)
    q_c, k_c, v_c = tiled_means(qt, grid), tiled_means(kt, grid), tiled_means(vt, grid)
    scores = cube_scores(q_c, k_c)
    idx = chosen_cubes(scores, topk(sparsity, n))
    out = fine(qt, kt, vt, idx, grid)  # [B, H, n * 64, D]
    if gate is not None:  # the coarse branch, gated, in the tiled layout: each cube's row over its slot
        coarse = torch.softmax(scores, dim=-1) @ v_c  # [B, H, n, D]
        gated = tiled(gate.to(q.dtype), grid).unflatten(2, (n, -1)) * coarse[:, :, :, None]
        out = out + gated.flatten(2, 3)
    return untiled(out, grid)


def cube_scores(q_c: torch.Tensor, k_c: torch.Tensor) -> torch.Tensor:
    """q_c k_c^T / sqrt(Dh) of cube means [B, H, n, D], in their dtype (the kernel's bf16 scores)."""
    return (q_c @ k_c.transpose(-1, -2)) / math.sqrt(q_c.shape[-1])


def kernel_vsa(q, k, v, gate, grid, sparsity) -> torch.Tensor:
    """`vsa` on fastvideo-kernel (CUDA, bf16 / fp16, q, k, v, gate [B, S, H, Dh] in raster order)."""
    return tiled_vsa(q, k, v, gate, grid, sparsity, kernel_fine)


def uses_kernel(q: torch.Tensor) -> bool:
    """Whether `attend` runs fastvideo-kernel for q: on CUDA, in bf16 / fp16, head dim 64 or 128, installed."""
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] in (64, 128)
            and kernel_module() is not None)


def attend(q, k, v, gate, grid, sparsity) -> torch.Tensor:
    """VSA on the fastest path there is: fastvideo-kernel where `uses_kernel`, else the reference `vsa`."""
    return (kernel_vsa if uses_kernel(q) else vsa)(q, k, v, gate, grid, sparsity)


def sparsity_at(step: int, sparsity: float, decay_rate: float = 0.0, interval: int = 0) -> float:
    """The sparsity of training step `step` (0-based, fvfunc's state.step) under FastVideo's warm-up (its
    Phase-3 trainer, `_get_current_vsa_sparsity`, whose steps count from 1): with interval > 1 the
    sparsity climbs by `decay_rate` every `interval` steps, min(s // interval, int(sparsity // rate)) *
    rate for FastVideo's step s; otherwise it is `sparsity` from the first step."""
    check_sparsity(sparsity)
    if interval > 1:
        if not decay_rate > 0:
            raise ValueError(f"vsa_decay_rate must be > 0 with a decay interval of {interval} steps, got {decay_rate}")
        return min((step + 1) // interval, int(sparsity // decay_rate)) * decay_rate
    return sparsity
