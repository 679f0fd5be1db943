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

import torch

TILE = (4, 4, 4)
"""VSA's cube (t, h, w) in tokens (FastVideo's VSA_TILE_SIZE)."""


def check_sparsity(sparsity: float, name: str = "sparsity") -> None:
    if not 0 <= sparsity < 1:
        raise ValueError(f"{name} must be in [0, 1), got {sparsity}")


def num_cubes(grid: tuple[int, int, int], tile: tuple[int, int, int] = TILE) -> int:
    return math.prod(-(-g // t) for g, t in zip(grid, tile, strict=True))


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
    if select_dtype is not None:  # the kernel's cube means and scores, in its dtype
        qs, ks = q_c.detach().to(select_dtype), k_c.detach().to(select_dtype)
        ranked = (qs @ ks.transpose(-1, -2) / math.sqrt(D)).to(ct)
    chosen = select(ranked, topk(sparsity, n))  # [B, H, n, n]
    allowed = chosen[:, :, cube][:, :, :, cube]  # [B, H, S, S]
    logits = (qf.transpose(1, 2) @ kf.transpose(1, 2).transpose(-1, -2)) * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    fine = (torch.softmax(logits, dim=-1) @ vf.transpose(1, 2)).transpose(1, 2)  # [B, S, H, D]

    out = fine if gate is None else fine + gate.to(ct) * coarse
    return out.to(q.dtype)


# ------------------------------------------------------------------ fastvideo-kernel (CUDA, optional)


@functools.cache
def kernel_module():
    """fastvideo-kernel's Python package (pip install 'fvfunc[vsa]'), or None when it is not installed."""
    try:
        import fastvideo_kernel
    except (ImportError, OSError):  # (also a wheel whose extension does not load: the reference runs instead)
        return None
    return fastvideo_kernel


@functools.cache
def kernel_ops() -> frozenset:
    """The kernel's autograd ops (their outputs are what remat='attention' keeps), those that exist."""
    if kernel_module() is None:
        return frozenset()
    ns = getattr(torch.ops, "fastvideo_kernel", None)
    return frozenset(getattr(ns, n).default for n in ("block_sparse_attn_triton", "block_sparse_attn_sm90")
                     if ns is not None and hasattr(ns, n))


@functools.cache
def _tiling(grid: tuple[int, int, int], device: str):
    """(padded slot of each raster-order token [S], the cube sizes [n] as int32): each cube's tokens placed
    in its own zero-padded 64-token slot, cube after cube (FastVideo's tile + non-pad index layout)."""
    order = tile_order(grid, device=device)
    sizes = cube_sizes(grid, device=device)
    slot = math.prod(TILE)
    cube = cube_of_token(grid, device=device)[order]
    starts = torch.cumsum(sizes, 0) - sizes
    dst = torch.empty_like(order)
    dst[order] = cube * slot + torch.arange(order.numel(), device=order.device) - starts[cube]
    return dst, sizes.to(torch.int32)


@torch.compiler.disable
def kernel_vsa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None,
               grid: tuple[int, int, int], sparsity: float) -> torch.Tensor:
    """`vsa` on fastvideo-kernel's `video_sparse_attn` (CUDA, bf16/fp16; q, k, v, gate [B, S, H, Dh] in raster
    order): the tokens scattered into the kernel's tile layout, the result gathered back. No gate is a zero
    gate (the kernel adds the coarse branch ungated when given none)."""
    check_sparsity(sparsity)
    B, S, H, D = q.shape
    if math.prod(grid) != S or k.shape[1] != S:
        raise ValueError(f"vsa is self-attention over the token grid {tuple(grid)} ({math.prod(grid)} tokens); "
                         f"q has {S} tokens and k {k.shape[1]}")
    dst, sizes = _tiling(tuple(grid), str(q.device))
    n = sizes.numel()
    gate = torch.zeros_like(q) if gate is None else gate.to(q.dtype)

    def tiled(x):  # [B, S, H, D] -> [B, H, n * 64, D], the padding zeros (the kernel's cube means need them)
        out = x.new_zeros(B, n * math.prod(TILE), H, D).index_copy(1, dst, x)
        return out.transpose(1, 2).contiguous()

    out = kernel_module().video_sparse_attn(tiled(q), tiled(k), tiled(v), sizes, sizes, topk(sparsity, n),
                                            block_size=TILE, compress_attn_weight=tiled(gate))
    return out.transpose(1, 2).index_select(1, dst)


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
