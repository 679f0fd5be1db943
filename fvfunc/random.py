"""Explicit random keys, JAX style.

A key is a CPU int64 tensor of shape [2]. Keys are derived, never advanced: `split(key, n)` and
`fold_in(key, i)` hash the key's words with SplitMix64, so a run's randomness is a pure function of
its seed and the path of splits that led to a draw. Sampling functions seed a private
`torch.Generator` from the key and draw on the requested device; no global RNG is read or written.

The same key gives the same numbers on every run on the same device type (CPU and CUDA generators
are different streams, so a CPU draw and a CUDA draw from one key differ).
"""

from __future__ import annotations

import torch

_MASK = (1 << 64) - 1


def _mix(z: int) -> int:
    # SplitMix64 finaliser (Steele, Lea, Flood 2014): a bijection on 64-bit words with full avalanche.
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _to_signed(z: int) -> int:
    return z - (1 << 64) if z >= (1 << 63) else z


def _words(key: torch.Tensor) -> tuple[int, int]:
    if not (isinstance(key, torch.Tensor) and key.shape == (2,) and key.dtype == torch.int64):
        raise TypeError(f"a key is an int64 tensor of shape [2], got {getattr(key, 'shape', type(key))}")
    a, b = key.tolist()
    return a & _MASK, b & _MASK


def _make(a: int, b: int) -> torch.Tensor:
    return torch.tensor([_to_signed(a), _to_signed(b)], dtype=torch.int64)


def key(seed: int) -> torch.Tensor:
    """The root key of a run."""
    seed = int(seed) & _MASK
    return _make(_mix(seed), _mix(seed ^ 0x5851F42D4C957F2D))


def fold_in(key: torch.Tensor, data: int) -> torch.Tensor:
    """A new key that depends on `key` and the integer `data` (a step, a rank, a sample index)."""
    a, b = _words(key)
    d = _mix(int(data) & _MASK)
    return _make(_mix(a ^ d), _mix(b + d))


def split(key: torch.Tensor, n: int = 2) -> torch.Tensor:
    """`n` independent keys as a [n, 2] tensor; `split(k, n)[i]` is a key."""
    return torch.stack([fold_in(key, (1 << 62) + i) for i in range(n)])


def _generator(key: torch.Tensor, device: torch.device | str | None) -> torch.Generator:
    a, b = _words(key)
    device = torch.device(device if device is not None else "cpu")
    g = torch.Generator(device=device)
    g.manual_seed(_mix(a ^ _mix(b)) & ((1 << 63) - 1))
    return g


def normal(key, shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normal samples, a pure function of `key` (per device type)."""
    return torch.randn(tuple(shape), generator=_generator(key, device), dtype=dtype, device=device)


def uniform(key, shape, dtype=torch.float32, device=None, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Uniform samples in [low, high)."""
    u = torch.rand(tuple(shape), generator=_generator(key, device), dtype=dtype, device=device)
    return low + (high - low) * u


def randint(key, shape, low: int, high: int, device=None) -> torch.Tensor:
    """Integers uniform in [low, high)."""
    return torch.randint(low, high, tuple(shape), generator=_generator(key, device), device=device)


def permutation(key, n: int) -> torch.Tensor:
    """A random permutation of range(n) (on the CPU)."""
    return torch.randperm(n, generator=_generator(key, "cpu"))


def per_sample(key: torch.Tensor, sample_index) -> list[torch.Tensor]:
    """One key per sample from its global index in the step's batch, so a sample's noise does not
    depend on how the batch is split into micro-batches or ranks."""
    return [fold_in(key, int(i)) for i in sample_index]
