"""UniPC-2 (bh2, data prediction) on flow sigmas, as Wan2.1 samples by default.

Zhao, Bai, Rao, Zhou, Lu 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models" (NeurIPS, arXiv:2302.04867), in the data-prediction (x0) form of DPM-Solver++
(Lu et al. 2022, arXiv:2211.01095). The numerical reference is diffusers' UniPCMultistepScheduler
configured as Wan's pipelines configure it: prediction_type="flow_prediction", use_flow_sigmas=True,
solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, no disabled corrector.
(Wan's own `FlowUniPCMultistepScheduler` is a copy of it.)

Flow sigmas: alpha = 1 - sigma, lambda = log(alpha / sigma), and the model's x0 prediction
m = x - sigma * v. One step from s = sigma_j to t = sigma_{j+1}, with h = lambda_t - lambda_s,
B(h) = e^{-h} - 1 (bh2) and the earlier prediction m_1 at sigma_{j-1}:

    base  = (sigma_t / sigma_s) * x_s - alpha_t * (e^{-h} - 1) * m_s           (DDIM / DPM-Solver++-1)
    D1    = (m_1 - m_s) / r1,   r1 = (lambda_{j-1} - lambda_s) / h
    UniP  x_t = base - alpha_t * B(h) * a_p * D1            a_p = 1/2 at order 2, no term at order 1
    UniC  x_t^c = base - alpha_t * B(h) * (a_0 * D1 + a_1 * (m_t - m_s))

UniC (paper eq. 8, Alg. 1) re-runs the step that produced x_t using the model's output m_t *at* x_t,
which the next step evaluates anyway: it costs no extra evaluation. The sample after correction is
what the next predictor starts from; m_t itself stays the prediction at the uncorrected x_t.
Corrector weights (UniC-1: a_1 = 1/2; UniC-2 solves [[1, 1], [r1, 1]] a = b) with, for hh = -h,
g1 = (e^{hh} - 1) / hh - 1, g2 = g1 / hh - 1/2 and b = [g1, 2 g2] / B(h). The fixed 1/2 of UniP-2
and UniC-1 are the paper code's choices, kept by diffusers and Wan; order 2 is solved here in closed
form (diffusers calls torch.linalg.solve), in float64, then cast to x's dtype.

Order: 1 at the first step (no history yet) and at the last (lower_order_final: the step to sigma = 0
has lambda_t = inf, where only the first-order update is defined; it returns m exactly), 2 between.

lambda is -inf at sigma = 1. diffusers' set_timesteps nudges a first sigma of 1 to 1 - 1e-6 (stored
in float32), and the whole solver, x0 conversion included, runs on that value. This module does the
same to any sigma above it, so a schedule may start at exactly 1; the model is still called at the
caller's sigma. (The nudge is not a rounding detail: lambda_0 = log(1e-6) ~ -13.8 sets r1 of the
second step, so the exact sigma = 1 limit, r1 = -inf, gives a different, first-order second step.)

The multistep history is explicit: `unipc_step(state, x, v, sigmas, i) -> (x_next, state)`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .flow import per_sample

# diffusers: `sigmas[0] -= 1e-6` in float64, then the schedule is stored as float32
_SIGMA_MAX = float(torch.tensor(1 - 1e-6, dtype=torch.float32))


class UniPCState(NamedTuple):
    """The history UniPC carries between steps (all like x; zeros before the first step)."""

    x: torch.Tensor
    """The sample the previous step started from (after its correction)."""
    x0: torch.Tensor
    """The x0 prediction of the previous step, m_{i-1}."""
    x0_prev: torch.Tensor
    """The x0 prediction of the step before, m_{i-2}."""


def unipc_init(x: torch.Tensor) -> UniPCState:
    """An empty history for samples like x."""
    zeros = torch.zeros_like(x)
    return UniPCState(zeros, zeros, zeros)


def unipc_order(i: int, num_steps: int) -> int:
    """The predictor order of step i of num_steps: 1 at the first and last step, 2 between."""
    return 1 if i == 0 or i == num_steps - 1 else 2


def unipc_step(state: UniPCState, x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor,
               i: int) -> tuple[torch.Tensor, UniPCState]:
    """Step i: from x at sigmas[i], with the model's v there, to the sample at sigmas[i + 1].

    sigmas: the whole schedule, [n + 1] (or [B, n + 1], one schedule per sample); i in [0, n).
    Corrects x with v first (i > 0), then predicts. Returns the next sample and the new history.
    """
    n = sigmas.shape[-1] - 1
    if not 0 <= i < n:
        raise IndexError(f"step {i} is outside a schedule of {n} steps")
    s = sigmas.to(torch.float64).clamp(max=_SIGMA_MAX)
    lam = torch.log1p(-s) - torch.log(s)  # log(alpha / sigma); +inf at sigma = 0
    m = x - per_sample(s[..., i], x) * v.to(x.dtype)  # x0 prediction at the (uncorrected) x
    if i > 0:
        x = _update(state.x, state.x0, state.x0_prev, s, lam, i - 1, unipc_order(i - 1, n), m_t=m)
    x_next = _update(x, m, state.x0, s, lam, i, unipc_order(i, n))
    return x_next, UniPCState(x, m, state.x0)


def _update(x, m0, m1, s, lam, j, order, m_t=None):
    """UniP (m_t None) or UniC (m_t given) of the step sigmas[j] -> sigmas[j + 1]; x, m0 at j, m1 at j-1."""
    def c(coef):  # a float64 scalar (or [B]) coefficient, ready to multiply x
        return per_sample(coef, x)

    sigma_s, sigma_t = s[..., j], s[..., j + 1]
    alpha_t = 1 - sigma_t
    h = lam[..., j + 1] - lam[..., j]
    hh = -h
    b_h = torch.expm1(hh)  # e^{-h} - 1: both h*phi_1 and bh2's B(h)
    x_t = c(sigma_t / sigma_s) * x - c(alpha_t * b_h) * m0
    if order == 2:
        r1 = (lam[..., j - 1] - lam[..., j]) / h
        d1 = (m1 - m0) / c(r1)
    if m_t is None:
        return x_t - c(alpha_t * b_h * 0.5) * d1 if order == 2 else x_t
    if order == 1:
        return x_t - c(alpha_t * b_h * 0.5) * (m_t - m0)
    g1 = b_h / hh - 1
    g2 = g1 / hh - 0.5
    b1, b2 = g1 / b_h, 2 * g2 / b_h
    a0 = (b1 - b2) / (1 - r1)
    a1 = b1 - a0
    return x_t - c(alpha_t * b_h * a0) * d1 - c(alpha_t * b_h * a1) * (m_t - m0)
