"""The block runner: how any family's forward is run, from outside the model (torchtitan's
parallelize_fn idea). A family gives `embed` / `block` / `head` (fvfunc/models/__init__.py); the
runner adds, to every family alike:

- the attention backend (`ops.attention`), with cross-attention on the backend that is fastest for
  short keys (FlashAttention-4 only pays off on long ones: cuDNN takes the 512 text tokens);
- activation rematerialisation per block: "full" recomputes each block in the backward pass
  (torch.utils.checkpoint), "attention" keeps the attention kernels' outputs and recomputes the rest
  of the block (selective checkpointing); `remat_fraction` < 1 leaves the last blocks alone;
- torch.compile per block (one graph serves every layer; the embeddings and head stay eager, which
  starts far faster than compiling the whole forward);
- sharded params (`gather`, fvfunc.distributed.gather): the params outside the blocks are made whole
  first, each block's inside the block, so remat gathers them again in the backward pass and only one
  block is whole at a time. With `prefetch` (overlapped communication) block i + 1's all-gather starts
  before block i computes, and when remat recomputes block i in the backward pass it starts the gather
  of block i - 1, recomputed next: two blocks are whole at a time, and the gathers hide behind compute;
- sequence parallelism (`sp`, fvfunc.distributed.Sequence): the blocks run on this rank's shard of the
  tokens (the family's `split` gives their inputs, e.g. their RoPE rows), self-attention between two
  all-to-alls that hand it every token of a share of the heads; the head gets the tokens gathered.

`make_apply(family, cfg, options) -> apply(params, x, t, context) -> v` is what a role runs;
`apply(family, params, cfg, x, t, context, **options)` the same in one call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from torch.utils.checkpoint import checkpoint as recompute

from fvfunc.models import Family, block_params
from fvfunc.ops import attention, vsa

REMAT = ("none", "full", "attention")
CROSS_ATTENTION = {"fa4": "cudnn"}
"""Backend of cross-attention for a self-attention backend (to 512 text tokens cuDNN beats
FlashAttention-4 on an H100, bench/RESULTS.md)."""

Apply = Callable[..., torch.Tensor]
"""apply(params, x, t, context, cond=None) -> v: a family's forward with its config and run options bound."""


class Options(NamedTuple):
    """How a forward runs; none of it changes what it computes (beyond rounding)."""

    dtype: torch.dtype | None = None
    """Compute dtype (None: the params' dtype)."""
    attention: str = "auto"
    """Self-attention backend (fvfunc.ops.attention)."""
    remat: str = "none"
    """'none', 'full' or 'attention' (only where a backward pass follows; needs torch.autograd)."""
    remat_fraction: float = 1.0
    """The share of blocks (the first ones) that remat."""
    compile: bool | str = False
    """torch.compile each block: True for inductor, or a backend name ("aot_eager" in tests)."""
    gather: Callable[[dict], dict] | None = None
    """For sharded params: tree -> the same tree with whole tensors (fvfunc.distributed.gather)."""
    vsa_sparsity: float = 0.0
    """The sparsity of self-attention under attention="vsa" (fvfunc.ops.vsa: fastvideo-kernel on CUDA in
    bf16 when installed, the plain-torch reference otherwise)."""
    vsa_dense: str = "auto"
    """Under attention="vsa": the backend of cross-attention (which stays dense)."""
    prefetch: Callable[[dict], object] | None = None
    """For sharded params, overlapped: tree -> its all-gathers started (fvfunc.distributed.prefetch), for
    `gather(tree, fetched)` to finish; None gathers each tree when it is used."""
    sp: object | None = None
    """Sequence parallelism: this rank's group (fvfunc.distributed.Sequence: size, rank, to_heads,
    to_sequence, gather); None runs every token here."""


def _attend(backend: str, sparsity: float, dense: str, q, k, v, cross: bool, grid=None, gate=None):
    if backend == "vsa":
        if cross:
            return attention(q, k, v, CROSS_ATTENTION.get(dense, dense))
        if grid is None:
            raise ValueError("attention 'vsa' needs the family's token grid (attend(..., grid=(T, H, W)))")
        return vsa.attend(q, k, v, gate, grid, sparsity)
    return attention(q, k, v, CROSS_ATTENTION.get(backend, backend) if cross else backend)


def _attend_sp(inner, sp, q, k, v, cross, grid=None, gate=None):
    # Ulysses: self-attention of every token for size / S of the heads; cross-attention stays local
    if cross:
        return inner(q, k, v, True)
    del grid, gate  # (VSA is refused with sp: check)
    qkv = sp.to_heads(torch.stack([q, k, v]))
    return sp.to_sequence(inner(*qkv.unbind(0), False))


@functools.cache
def attend(backend: str, sparsity: float = 0.0, dense: str = "auto", sp=None):
    """attend(q, k, v, cross, grid=None, gate=None) on `backend` (VSA at `sparsity` for "vsa"
    self-attention, with the family's token grid and gate, and cross-attention on `dense`;
    sequence-parallel over `sp`); one function object per setting, so compiled blocks keep their guards."""
    inner = functools.partial(_attend, backend, sparsity, dense)
    return inner if sp is None else functools.partial(_attend_sp, inner, sp)


# The fused attention kernels whose outputs (and log-sum-exp) remat="attention" keeps for the backward
# pass. Attention is most of a block's time at video lengths (DESIGN.md section 4); the rest of a block
# (projections, norms, RoPE, FFN) is cheap to redo.
_ATTENTION_OPS = {
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.fvfunc.fa4_attention.default,
}


def _save_attention(ctx, op, *args, **kwargs):
    del ctx, args, kwargs
    keep = op in _ATTENTION_OPS or op in vsa.kept_ops()  # (VSA: its cube choice and sparse kernels)
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


def _gathered(block, gather, params, *args):
    return block(gather(params), *args)


def run_block(block, params, cfg, h, inputs, dtype, attend_fn, remat: str, gather=None):
    """One family block under the remat policy (only where a backward pass will follow), its params
    gathered inside when sharded."""
    fn = block if gather is None else functools.partial(_gathered, block, gather)
    args = (params, cfg, h, inputs, dtype, attend_fn)
    if remat == "none" or not torch.is_grad_enabled():
        return fn(*args)
    # (no context_fn at all for "full": torch.compile refuses an explicit noop_context_fn)
    policy = {} if remat == "full" else {
        "context_fn": functools.partial(create_selective_checkpoint_contexts, _save_attention)}
    return recompute(fn, *args, use_reentrant=False, **policy)


@functools.cache
def _compiled(backend: str):
    # dynamic=False: one specialised graph per (shape, dtype, grad mode); a run sees only a few
    return torch.compile(run_block, backend=backend, dynamic=False)


def check(options: Options) -> None:
    if options.sp is not None and options.attention == "vsa":
        raise ValueError("attention 'vsa' cannot run sequence-parallel (its cubes need the whole token grid)")
    if options.remat not in REMAT:
        raise ValueError(f"remat must be one of {REMAT}, got {options.remat!r}")
    if not 0 <= options.remat_fraction <= 1:
        raise ValueError(f"remat_fraction must be in [0, 1], got {options.remat_fraction}")
    vsa.check_sparsity(options.vsa_sparsity, "vsa_sparsity")


DEFAULT = Options()


class _Slot:
    """How one block of sharded params gets its weights whole, overlapped: from the all-gather started
    while the block before computed (`start`, in the forward pass) and, when remat recomputes the block
    in the backward pass, from a gather of its own that first starts the gather of `before`, the block
    recomputed next."""

    def __init__(self, options: Options, params: dict, before: _Slot | None):
        self.options, self.params, self.before = options, params, before
        self.fetched, self.calls = None, 0

    def start(self) -> None:
        if self.fetched is None:
            self.fetched = self.options.prefetch(self.params)

    def __call__(self, params: dict) -> dict:
        self.calls += 1
        fetched, self.fetched = self.fetched, None  # held no longer than the block runs
        if self.calls > 1 and self.before is not None:
            self.before.start()
        return self.options.gather(params, fetched)


def _shard(family: Family, cfg, h, inputs, sp):
    """(this rank's tokens of h [B, N, D], the blocks' inputs for them) under sequence parallelism."""
    tokens = h.shape[1]
    if tokens % sp.size:
        raise ValueError(f"training.sp_size {sp.size} must divide the tokens of a sample ({tokens}); choose a "
                         "latent size whose token count it divides")
    if family.split is None:
        raise ValueError(f"the {family.name} family cannot run sequence-parallel (it has no split)")
    n = tokens // sp.size
    start = sp.rank * n
    return h[:, start:start + n], family.split(cfg, inputs, start, start + n)


def forward(family: Family, params: dict, cfg, x, t, context, options: Options = DEFAULT, cond=None) -> torch.Tensor:
    """The family's v = noise - x0 for latents x at timesteps t given text context (and the image
    condition `cond`, a dict of tensors, for a family that takes one), run as `options` say."""
    check(options)
    dtype = options.dtype or next(iter(params.values())).dtype
    n = family.num_blocks(cfg)
    outer, blocks = block_params(params, n)
    n_remat = round(options.remat_fraction * n)
    gathers = [options.gather] * n
    if options.gather is not None and options.prefetch is not None:
        slots = []
        recomputed = torch.is_grad_enabled() and options.remat != "none"
        for i, bp in enumerate(blocks):
            before = slots[-1] if slots and recomputed and i - 1 < n_remat else None
            slots.append(_Slot(options, bp, before))
        if slots:
            slots[0].start()  # block 0's gather runs while the embeddings compute
        gathers = slots
    if options.gather is not None:
        outer = options.gather(outer)
    h, inputs = family.embed(outer, cfg, x, t, context, dtype, *([cond] if cond else []))
    block_inputs = inputs
    if options.sp is not None:
        h, block_inputs = _shard(family, cfg, h, inputs, options.sp)
    run = _compiled("inductor" if options.compile is True else options.compile) if options.compile else run_block
    attend_fn = attend(options.attention, options.vsa_sparsity, options.vsa_dense, options.sp)
    if options.attention == "vsa" and getattr(inputs, "grid", None) is not None:
        vsa.tiling(inputs.grid, h.device)  # its tiling made here, read as constants by compiled blocks
    for i, bp in enumerate(blocks):
        if i + 1 < n and isinstance(gathers[i + 1], _Slot):
            gathers[i + 1].start()  # the next block's weights arrive while this one computes
        h = run(family.block, bp, cfg, h, block_inputs, dtype, attend_fn, options.remat if i < n_remat else "none",
                gathers[i])
    if options.sp is not None:
        h = options.sp.gather(h)
    return family.head(outer, cfg, h, inputs, dtype)


def make_apply(family: Family, cfg, options: Options = DEFAULT) -> Apply:
    """apply(params, x, t, context) -> v for one role: the family's forward with cfg and options bound."""
    check(options)
    return functools.partial(_bound, family, cfg, options)


def _bound(family, cfg, options, params, x, t, context, cond=None):
    return forward(family, params, cfg, x, t, context, options, cond)


def apply(family: Family, params: dict, cfg, x, t, context, **options) -> torch.Tensor:
    """`forward` with the options as keywords: apply(wan.FAMILY, params, cfg, x, t, ctx, remat="full")."""
    return forward(family, params, cfg, x, t, context, Options(**options))
