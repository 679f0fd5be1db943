"""Video patchify / unpatchify: [B, C, T, H, W] <-> tokens [B, S, C*pt*ph*pw].

Patch vectors are ordered (C, pt, ph, pw), the layout of a Conv3d weight [D, C, pt, ph, pw], so
`patchify(x) @ W.reshape(D, -1).T` equals that Conv3d with stride = kernel. Unpatchify reads token
vectors ordered (pt, ph, pw, C), the layout of Wan's output projection."""

from __future__ import annotations

import torch


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    b, c, t, h, w = x.shape
    pt, ph, pw = patch
    if t % pt or h % ph or w % pw:
        raise ValueError(f"latent [T, H, W] = {[t, h, w]} is not divisible by the patch size {list(patch)}")
    x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # [B, F, H', W', C, pt, ph, pw]
    return x.reshape(b, (t // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    b = tokens.shape[0]
    f, h, w = grid
    pt, ph, pw = patch
    x = tokens.reshape(b, f, h, w, pt, ph, pw, -1)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, F, pt, H', ph, W', pw]
    return x.reshape(b, x.shape[1], f * pt, h * ph, w * pw)
