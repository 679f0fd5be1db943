"""FastVideo semantics: what a FastVideo run file means, checked against FastVideo's formulas written out
here (fastvideo/distillation at the Phase-3 commit, and fastvideo/train)."""

from __future__ import annotations

import numpy as np
import torch

import configs
from fvfunc import random
from fvfunc.losses import dmd2


def fastvideo_score_sigma(t0: torch.Tensor, shift: float, min_ratio: float, max_ratio: float) -> torch.Tensor:
    """FastVideo's DMD2 score noise level of integer timesteps t0, step by step as its code does it:
    training_utils.shift_timestep, the adapter's clamp to int(ratio * 1000), and
    FlowMatchEulerDiscreteScheduler(shift).add_noise, which looks the timestep up in its grid."""
    t = t0 / 1000  # shift_timestep
    t = 1000 * (shift * t / (1 + (shift - 1) * t))
    t = t.clamp(int(min_ratio * 1000), int(max_ratio * 1000))
    grid_t = torch.from_numpy(np.linspace(1, 1000, 1000, dtype=np.float32)[::-1].copy())
    sigmas = grid_t / 1000
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = sigmas * 1000
    return sigmas[(timesteps[None, :] - t[:, None]).abs().argmin(dim=1)]


def test_score_sigma_of_every_timestep_is_fastvideos():
    cfg = configs.DMD2Config(flow_shift=8.0, min_timestep_ratio=0.02, max_timestep_ratio=0.98)
    t0 = torch.arange(1000)
    ours = dmd2.score_sigmas(t0, cfg)
    theirs = fastvideo_score_sigma(t0, 8.0, 0.02, 0.98)
    assert torch.equal(ours, theirs)
    assert abs(ours.min().item() - 0.0236) < 1e-4  # a clamp of shift(u) would stop at 0.140
    for shift, lo, hi in ((3.0, 0.2, 0.98), (1.0, 0.0, 1.0), (5.0, 0.1, 0.9)):
        cfg = configs.DMD2Config(flow_shift=shift, min_timestep_ratio=lo, max_timestep_ratio=hi)
        assert torch.equal(dmd2.score_sigmas(t0, cfg), fastvideo_score_sigma(t0, shift, lo, hi))


def test_score_sigma_distribution_over_many_draws_equals_fastvideos():
    """The draws themselves: t0 uniform over {0..999} per sample, so the sigma distribution is the
    formula's image of the uniform one (checked bin by bin against FastVideo's torch.randint draws)."""
    cfg = configs.DMD2Config(flow_shift=8.0)
    n = 6000
    _, _, t0, k = dmd2.draw(random.key(3), range(n), (1, 1, 1, 1), 4, "cpu")
    assert t0.dtype == torch.int64 and 0 <= t0.min() and t0.max() <= 999
    ours = dmd2.score_sigmas(t0, cfg)
    theirs = fastvideo_score_sigma(torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(0)),
                                   8.0, 0.02, 0.98)
    edges = torch.linspace(0, 1, 21)
    h_ours = torch.histogram(ours, edges).hist / n
    h_theirs = torch.histogram(theirs, edges).hist / n
    assert (h_ours - h_theirs).abs().max() < 0.025  # ~4 standard errors of a bin's share
    assert abs((ours == ours.max()).float().mean().item() - 0.14) < 0.015  # clamped at 980: 14 % of the mass
    # k: each sample draws its own, uniform over the 4 steps
    counts = torch.bincount(k, minlength=4).float() / n
    assert (counts - 0.25).abs().max() < 0.025


def test_step_index_k_is_per_sample_and_independent_of_the_split():
    key = random.key(0)
    _, _, t_all, k_all = dmd2.draw(key, range(8), (1, 1, 1, 1), 4, "cpu")
    assert len(set(k_all.tolist())) > 1  # one global batch covers several k
    _, _, t_a, k_a = dmd2.draw(key, range(0, 4), (1, 1, 1, 1), 4, "cpu")  # rank 0 of 2
    _, _, t_b, k_b = dmd2.draw(key, range(4, 8), (1, 1, 1, 1), 4, "cpu")  # rank 1 of 2
    assert torch.equal(torch.cat([k_a, k_b]), k_all) and torch.equal(torch.cat([t_a, t_b]), t_all)
