"""Scaled-dot-product attention with an explicit backend choice.

Layout is [B, S, H, Dh] in and out (the layout Wan's projections produce). `backend`:
- "auto": torch picks (flash / cuDNN / efficient on GPU, its fused CPU kernel on CPU);
- "flash", "efficient", "cudnn": force that fused SDPA kernel (GPU only);
- "fa4": FlashAttention-4's CuTe kernels (the optional `flash-attn-4` package; Hopper and Blackwell
  GPUs). On an H100 they run the Wan-1.3B self-attention about 20% faster than cuDNN, the fastest
  SDPA kernel there (bench/RESULTS.md);
- "math": plain softmax(q k^T / sqrt(Dh)) v written out here. It is the one backend every torch.func
  transform differentiates (jvp has no rule for the fused kernels), at O(S^2) memory.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "math", "flash", "efficient", "cudnn", "fa4")
_FUSED = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v over [B, S, H, Dh] tensors, no mask."""
    if backend == "fa4":
        return _FA4.apply(q, k, v)[0]
    q, k, v = (a.transpose(1, 2) for a in (q, k, v))  # [B, H, S, Dh]
    if backend == "math":
        scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-1, -2)
        out = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
    elif backend == "auto":
        out = F.scaled_dot_product_attention(q, k, v)
    elif backend in _FUSED:
        with sdpa_kernel([_FUSED[backend]]):
            out = F.scaled_dot_product_attention(q, k, v)
    else:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    return out.transpose(1, 2)


# ------------------------------------------------------------------------------ FlashAttention-4
# The kernels run behind two torch custom ops, so that torch.compile sees one opaque node with a
# known output shape, and a selective-remat policy can name the forward op and keep its outputs. An
# autograd.Function joins them (rather than the ops' register_autograd, which torch.func.grad refuses).


def fa4_problem(device: torch.device | str) -> str | None:
    """Why "fa4" cannot run on `device` (None when it can)."""
    return _fa4_problem(str(device))


@functools.cache
def _fa4_problem(device: str) -> str | None:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"it needs a CUDA GPU, and the device is {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10, 11):
        return f"it needs a Hopper or Blackwell GPU (compute capability 9.x-11.x), this one is {major}.{minor}"
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError as e:
        return f"the flash-attn-4 package is not importable ({e}); pip install 'fvfunc[fa4]'"
    return None


@torch.library.custom_op("fvfunc::fa4_attention", mutates_args=())
def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, S, H, Dh], log-sum-exp [B, H, S] fp32) of softmax(q k^T / sqrt(Dh)) v."""
    problem = fa4_problem(q.device)
    if problem:
        raise RuntimeError(f"attention backend 'fa4' cannot run: {problem}")
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse, *_ = _flash_attn_fwd(q.contiguous(), k.contiguous(), v.contiguous(), return_lse=True)
    return out, lse


@fa4_attention.register_fake
def _(q, k, v):
    B, S, H, _ = q.shape
    return q.new_empty(B, S, H, v.shape[-1]), q.new_empty(B, H, S, dtype=torch.float32)


@torch.library.custom_op("fvfunc::fa4_attention_backward", mutates_args=())
def fa4_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, grad_out: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q.contiguous(), k.contiguous(), v.contiguous(), out, grad_out.contiguous(), lse)
    return dq, dk, dv


@fa4_attention_backward.register_fake
def _(q, k, v, out, lse, grad_out):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class _FA4(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v):
        return fa4_attention(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, *output)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        del grad_lse  # the log-sum-exp is non-differentiable
        with torch.no_grad():  # the kernels have no double backward
            return fa4_attention_backward(*ctx.saved_tensors, grad_out)
