"""3D rotary position embedding (RoFormer, Su et al. 2021) over a (frames, height, width) grid.

The head dimension Dh is split into rotary parts for t, h, w with h = w = 2 * (Dh // 6) and
t = Dh - h - w (Wan: 44, 42, 42 for Dh = 128). Channel pairs (2i, 2i+1) are rotated together
("interleaved"). Angles are computed in float64, then the cos/sin tables are kept in float32.
"""

from __future__ import annotations

import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _angles(dim: int, n: int, theta: float, device) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    return torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv_freq)  # [n, dim/2]


def rope_3d(head_dim: int, grid: tuple[int, int, int], theta: float = 10000.0, device=None):
    """(cos, sin), each [F*H*W, Dh/2] float32, for tokens in (f, h, w) row-major order."""
    f, h, w = grid
    dt, dh, dw = axis_dims(head_dim)
    at, ah, aw = _angles(dt, f, theta, device), _angles(dh, h, theta, device), _angles(dw, w, theta, device)
    angles = torch.cat([
        at[:, None, None].expand(f, h, w, -1),
        ah[None, :, None].expand(f, h, w, -1),
        aw[None, None, :].expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, -1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, H, Dh] by the tables [S, Dh/2]; computed in fp32, returned in x's dtype."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, S, H, Dh/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)
