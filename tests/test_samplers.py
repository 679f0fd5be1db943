"""Samplers: diffusers' schedulers as the numerical reference, an exactly solvable flow for the order
of convergence, explicit keys, purity and vmap, and a tiny Wan sampled end to end."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from configs import SamplerConfig
from fvfunc import random
from fvfunc import samplers as S
from fvfunc.models import wan

SHAPE = (2, 4, 3, 5, 6)


def _randn(seed, shape=SHAPE, dtype=torch.float32):
    return random.normal(random.key(seed), shape, dtype=dtype)


C = _randn(100)


def v_toy(x, sigma):
    """A smooth nonlinear stand-in for a model."""
    return torch.tanh(x * (1 + sigma)) - 0.5 * x * sigma + C * sigma**2


def denoise_toy(x, t):
    return v_toy(x, (t / S.NUM_TRAIN_TIMESTEPS).view(-1, 1, 1, 1, 1))


SCHEDULES = {
    "shifted": S.shifted_sigmas(12, 3.0),
    "few_step": S.timesteps_to_sigmas([1000, 750, 500, 250]),
    "not_from_1": S.timesteps_to_sigmas([900, 620, 410, 200, 90, 30]),
    "one_step": S.timesteps_to_sigmas([1000]),
}


def wan_unipc_scheduler(flow_shift=1.0):
    """UniPC as diffusers' Wan2.1 pipelines configure it (the scheduler_config of the Diffusers repos)."""
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   flow_shift=flow_shift, solver_order=2, solver_type="bh2", predict_x0=True,
                                   lower_order_final=True)


# -------------------------------------------------------------------------- flow and schedules


@pytest.mark.parametrize("form", ["float", "0d", "batch"])
def test_conversions_round_trip(form):
    x0, noise = _randn(1), _randn(2)
    sigma = {"float": 0.3, "0d": torch.tensor(0.3), "batch": torch.tensor([0.3, 0.8])}[form]
    s = sigma if form != "batch" else sigma.view(-1, 1, 1, 1, 1)
    x = S.add_noise(x0, noise, sigma)
    torch.testing.assert_close(x, (1 - s) * x0 + s * noise)
    v = noise - x0
    torch.testing.assert_close(S.x0_from_v(x, v, sigma), x0)
    torch.testing.assert_close(S.noise_from_v(x, v, sigma), noise)
    torch.testing.assert_close(S.v_from_x0(x, x0, sigma), v)
    assert torch.equal(S.add_noise(x0, noise, 0.0), x0)


def test_shift():
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(S.shift(u, 1.0), u)
    for s in (3.0, 5.0, 8.0):
        y = S.shift(u, s)
        assert y[0] == 0 and y[-1] == 1 and bool((y[1:-1] > u[1:-1]).all())
        torch.testing.assert_close(S.shift(y, 1 / s), u)  # shift(.; 1/s) inverts shift(.; s)


@pytest.mark.parametrize("n", [1, 2, 10, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0])
def test_shifted_sigmas_match_diffusers_wan_scheduler(n, shift):
    sched = wan_unipc_scheduler(shift)
    sched.set_timesteps(n)
    ours = S.shifted_sigmas(n, shift)
    assert ours.shape == (n + 1,) and ours.dtype == torch.float32 and ours[0] == 1 and ours[-1] == 0
    # diffusers stores a first sigma of 1 as 1 - 1e-6 (UniPC's log-SNR must stay finite); the rest is equal
    assert abs(sched.sigmas[0].item() - 1) < 2e-6
    torch.testing.assert_close(ours[1:], sched.sigmas[1:], rtol=0, atol=1e-7)


def test_timesteps_to_sigmas():
    assert S.timesteps_to_sigmas([1000, 750, 500, 250]).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert S.timesteps_to_sigmas((999.5, 3)).tolist() == pytest.approx([0.9995, 0.003, 0.0])


@pytest.mark.parametrize("timesteps, match", [
    ([], "empty"),
    ([1000, 0], r"timestep 0 \(index 1\)"),
    ([1001, 500], "timestep 1001 "),
    ([500, -250], "timestep -250 "),
    ([800, float("nan")], "timestep nan "),
    ([1000, 750, 750, 250], r"descending: 750 \(index 2\) follows 750"),
    ([250, 500], r"descending: 500 \(index 1\) follows 250"),
])
def test_timesteps_to_sigmas_validation(timesteps, match):
    with pytest.raises(ValueError, match=match):
        S.timesteps_to_sigmas(timesteps)


def test_sigmas_from_config():
    few = SamplerConfig(timesteps=(1000, 500), num_steps=30)
    assert torch.equal(S.sigmas_from_config(few), torch.tensor([1.0, 0.5, 0.0]))
    assert torch.equal(S.sigmas_from_config(SamplerConfig(num_steps=7, shift=3.0)), S.shifted_sigmas(7, 3.0))


# ------------------------------------------------------------------------- against diffusers


@pytest.mark.parametrize("n", [1, 2, 7, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_flow_match_euler_sigmas_and_timesteps_match_diffusers(n, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    walk = S.schedule(SamplerConfig(kind="ode", schedule="flow_match_euler", num_steps=n, shift=shift))
    assert torch.equal(walk.sigmas, sched.sigmas) and torch.equal(S.flow_match_euler_sigmas(n, shift), sched.sigmas)
    assert torch.equal(walk.timesteps, sched.timesteps)  # float timesteps, 1000 * sigma in float32


def test_ode_on_flow_match_euler_schedule_is_the_scheduler_loop():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    x_ref = _randn(24)
    for t in sched.timesteps:
        x_ref = sched.step(denoise_toy(x_ref, t.expand(SHAPE[0])), t, x_ref).prev_sample
    walk = S.schedule(SamplerConfig(kind="ode", schedule="flow_match_euler", num_steps=6, shift=3.0))
    out = S.sample(denoise_toy, _randn(24), walk.sigmas, "ode", timesteps=walk.timesteps)
    assert (out - x_ref).abs().max() <= 1e-6
    assert torch.equal(S.sample(denoise_toy, _randn(24), walk.sigmas, "ode"), out)  # the default rule agrees


def test_unipc_model_timesteps_are_diffusers_integers_for_every_schedule():
    # floor of the float64 schedule, 999 at sigma = 1; the float32 sigmas alone floor one lower in ~3%
    for n in (1, 2, 3, 4, 5, 8, 9, 12, 16, 20, 25, 30, 40, 50, 64, 100):
        for shift in (1.0, 2.0, 3.0, 5.0, 7.0, 8.0, 12.0):
            sched = wan_unipc_scheduler(shift)
            sched.set_timesteps(n)
            walk = S.schedule(SamplerConfig(num_steps=n, shift=shift))
            assert torch.equal(walk.timesteps, sched.timesteps.float()), (n, shift)
            assert torch.equal(walk.sigmas, S.shifted_sigmas(n, shift))
    few = S.schedule(SamplerConfig(timesteps=(1000, 937, 500.5)))
    assert few.timesteps.tolist() == [999, 937, 500] and S.model_timesteps(few.sigmas, "unipc")[1] == 936
    assert S.schedule(SamplerConfig(kind="sde", timesteps=(1000, 937, 500.5))).timesteps.tolist() == pytest.approx(
        [1000, 937, 500.5])
    with pytest.raises(ValueError, match=r"timesteps must be one per step, \[3\]"):
        S.sample(denoise_toy, _randn(0), few.sigmas, "unipc", timesteps=[999, 937])




@pytest.mark.parametrize("name", list(SCHEDULES))
def test_ode_matches_flow_match_euler(name):
    sigmas = SCHEDULES[name]
    sched = FlowMatchEulerDiscreteScheduler()  # shift 1: drives exactly the sigmas it is given
    sched.set_timesteps(sigmas=sigmas[:-1].numpy())
    sched.set_begin_index(0)
    assert torch.equal(sched.sigmas, sigmas)
    x_ref = x = _randn(3)
    for i in range(len(sigmas) - 1):
        x_ref = sched.step(v_toy(x_ref, sigmas[i]), sched.timesteps[i], x_ref).prev_sample
        x = S.ode_step(x, v_toy(x, sigmas[i]), sigmas[i], sigmas[i + 1])
        assert (x - x_ref).abs().max() <= 1e-6, i
    assert (S.sample(denoise_toy, _randn(3), sigmas, "ode") - x_ref).abs().max() <= 1e-6


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_unipc_matches_diffusers_on_given_sigmas(name):
    sigmas = SCHEDULES[name]
    sched = wan_unipc_scheduler()  # flow_shift 1: runs on the sigmas it is given
    sched.set_timesteps(sigmas=sigmas[:-1].numpy().astype(np.float64))
    sched.set_begin_index(0)
    x_ref = x = _randn(4)
    state = S.unipc_init(x)
    for i in range(len(sigmas) - 1):
        # the model sees our sigma; diffusers' own list starts at 1 - 1e-6 where ours starts at 1
        x_ref = sched.step(v_toy(x_ref, sigmas[i]), sched.timesteps[i], x_ref).prev_sample
        x, state = S.unipc_step(state, x, v_toy(x, sigmas[i]), sigmas, i)
        assert (x - x_ref).abs().max() <= 1e-5, i


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 30])
def test_unipc_matches_diffusers_wan_default(n):
    # the whole Wan default: set_timesteps(n) with flow_shift 3 against shifted_sigmas + sample("unipc")
    # diffusers' pipelines call the model at the scheduler's int64 timesteps; so does sample("unipc")
    sched = wan_unipc_scheduler(3.0)
    sched.set_timesteps(n)
    sigmas = S.shifted_sigmas(n, 3.0)
    x_ref = _randn(5)
    for t in sched.timesteps:
        x_ref = sched.step(denoise_toy(x_ref, t.float().expand(SHAPE[0])), t, x_ref).prev_sample
    assert (S.sample(denoise_toy, _randn(5), sigmas, "unipc") - x_ref).abs().max() <= 1e-5
    assert torch.equal(S.schedule(SamplerConfig(num_steps=n, shift=3.0)).timesteps, sched.timesteps.float())


# ------------------------------------------------------------- an exactly solvable flow problem
# Data x0 ~ N(mu, sd^2) per channel, noise ~ N(0, 1). Then E[v | x_sigma] is affine in x:
#   v*(x, sigma) = -mu + (sigma - (1 - sigma) sd^2) / var(sigma) * (x - (1 - sigma) mu),
#   var(sigma) = (1 - sigma)^2 sd^2 + sigma^2,
# and the ODE dx/dsigma = v* carries x(1) = z to x(0) = mu + sd * z exactly.

MU = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64).view(1, -1, 1, 1, 1)
SD = torch.tensor([0.6, 1.0, 1.5], dtype=torch.float64).view(1, -1, 1, 1, 1)


def v_gauss(x, t):
    s = (t / S.NUM_TRAIN_TIMESTEPS).view(-1, 1, 1, 1, 1)
    var = (1 - s) ** 2 * SD**2 + s**2
    return -MU + (s - (1 - s) * SD**2) / var * (x - (1 - s) * MU)


def gauss_error(kind, n):
    z = random.normal(random.key(7), (4, 3, 2, 2, 2), dtype=torch.float64)
    sigmas = S.shifted_sigmas(n, 1.0).double()
    # the solvers' own order: the model at the exact sigma (UniPC's integer timesteps, diffusers' choice,
    # put an O(1e-3) error into sigma and cap the order; the pipeline tests check that choice)
    x = S.sample(v_gauss, z, sigmas, kind, timesteps=sigmas[:-1] * S.NUM_TRAIN_TIMESTEPS)
    return (x - (MU + SD * z)).pow(2).mean().sqrt().item()


def test_order_of_convergence():
    ns = (16, 32, 64, 128)
    euler = [gauss_error("ode", n) for n in ns]
    unipc = [gauss_error("unipc", n) for n in ns]
    for a, b in zip(euler[:-1], euler[1:], strict=True):
        assert 1.6 <= a / b <= 2.6, euler  # first order
    for a, b in zip(unipc[:-1], unipc[1:], strict=True):
        # second order overall (the last step to sigma = 0 is first order, lower_order_final); the
        # third-order UniC steps in between push the ratio above 4 at these step counts
        assert 3.0 <= a / b <= 9.0, unipc
    assert unipc[1] < euler[1] / 10


def test_sde_last_step_returns_x0_prediction():
    seen = []

    def denoise(x, t):
        v = denoise_toy(x, t)
        seen.append((x, t, v))
        return v

    sigmas = SCHEDULES["few_step"]
    out = S.sample(denoise, _randn(6), sigmas, "sde", random.key(0))
    x, t, v = seen[-1]
    assert len(seen) == 4 and torch.equal(t, torch.full((SHAPE[0],), 250.0))
    assert torch.equal(out, S.x0_from_v(x, v, sigmas[-2]))
    assert torch.equal(S.sde_step(x, v, 0.25, 0.0, _randn(9)), out)  # the formula agrees at sigma_next = 0


def test_sde_on_exact_flow_with_one_step_returns_the_mean():
    # from pure noise, the x0 prediction at sigma = 1 is E[x0] = mu
    z = random.normal(random.key(3), (2, 3, 1, 2, 2), dtype=torch.float64)
    out = S.sample(v_gauss, z, S.timesteps_to_sigmas([1000]).double(), "sde", random.key(0))
    torch.testing.assert_close(out, MU.expand_as(out))


# ------------------------------------------------------------------------------ keys and RNG


def test_same_key_same_output_and_no_global_rng():
    sigmas, x = SCHEDULES["few_step"], _randn(10)
    rng = torch.get_rng_state()
    a = S.sample(denoise_toy, x, sigmas, "sde", random.key(1))
    assert torch.equal(torch.get_rng_state(), rng)
    torch.manual_seed(123)
    b = S.sample(denoise_toy, x, sigmas, "sde", random.key(1))
    torch.manual_seed(456)
    c = S.sample(denoise_toy, x, sigmas, "sde", random.key(1))
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.allclose(a, S.sample(denoise_toy, x, sigmas, "sde", random.key(2)))


def test_sample_validation():
    with pytest.raises(ValueError, match="kind"):
        S.sample(denoise_toy, _randn(0), SCHEDULES["few_step"], "euler")
    with pytest.raises(ValueError, match="key"):
        S.sample(denoise_toy, _randn(0), SCHEDULES["few_step"], "sde")
    with pytest.raises(ValueError, match="schedule"):
        S.sample(denoise_toy, _randn(0), [1.0], "ode")
    with pytest.raises(ValueError, match="descending"):
        S.sample(denoise_toy, _randn(0), [1.0, 0.5, 0.5, 0.0], "unipc")


def test_sde_rollout_to_step_k_is_a_prefix_of_the_full_run():
    sigmas, x, key = SCHEDULES["few_step"], _randn(8), random.key(5)
    seen = []

    def denoise(x, t):
        seen.append(x)
        return denoise_toy(x, t)

    S.sample(denoise, x, sigmas, "sde", key)
    for k in (1, 2, 3):
        assert torch.equal(S.sample(denoise_toy, x, sigmas[:k + 1], "sde", key), seen[k])


@pytest.mark.parametrize("kind", ["ode", "sde", "unipc"])
def test_states_are_what_the_model_saw_and_noise_replaces_the_key(kind):
    sigmas, x, key = SCHEDULES["few_step"], _randn(8), random.key(5)
    seen = []

    def denoise(x, t):
        seen.append(x)
        return denoise_toy(x, t)

    out, states = S.sample(denoise, x, sigmas, kind, key, states=True)
    assert len(states) == len(seen) == len(sigmas) - 1
    assert all(torch.equal(a, b) for a, b in zip(states, seen, strict=True)) and torch.equal(states[0], x)
    assert torch.equal(out, S.sample(denoise_toy, x, sigmas, kind, key))
    if kind == "sde":  # noise(i) instead of the key's draws gives the same run
        noise = [random.normal(random.fold_in(key, i), x.shape) for i in range(len(sigmas) - 1)]
        assert torch.equal(out, S.sample(denoise_toy, x, sigmas, "sde", noise=lambda i: noise[i]))


# -------------------------------------------------------------------------- purity and vmap


def _clones(*ts):
    return [t.clone() for t in ts]


def test_steps_are_pure():
    x, v, noise = _randn(11), _randn(12), _randn(13)
    sigmas = SCHEDULES["shifted"]
    before = _clones(x, v, noise, sigmas)
    S.ode_step(x, v, sigmas[2], sigmas[3])
    S.sde_step(x, v, sigmas[2], sigmas[3], noise)
    S.x0_from_v(x, v, sigmas[2])
    S.add_noise(x, noise, sigmas[2])
    state = S.unipc_init(x)
    for i in range(3):
        state_before = _clones(*state)
        _, new_state = S.unipc_step(state, x, v, sigmas, i)
        assert all(torch.equal(a, b) for a, b in zip(state, state_before, strict=True))
        state = new_state
    assert all(torch.equal(a, b) for a, b in zip((x, v, noise, sigmas), before, strict=True))


def test_ode_and_sde_vmap_over_sigmas_equals_loop():
    x, v, noise = _randn(14), _randn(15), _randn(16)
    sig, sig_next = torch.tensor([1.0, 0.8, 0.5, 0.1]), torch.tensor([0.8, 0.5, 0.1, 0.0])
    ode = torch.func.vmap(S.ode_step, in_dims=(None, None, 0, 0))(x, v, sig, sig_next)
    sde = torch.func.vmap(S.sde_step, in_dims=(None, None, 0, 0, None))(x, v, sig, sig_next, noise)
    for k in range(len(sig)):
        torch.testing.assert_close(ode[k], S.ode_step(x, v, sig[k], sig_next[k]), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(sde[k], S.sde_step(x, v, sig[k], sig_next[k], noise), rtol=1e-6, atol=1e-7)


def test_per_sample_sigmas_equal_one_sample_at_a_time():
    x, v, noise = _randn(17), _randn(18), _randn(19)
    sig, sig_next = torch.tensor([0.9, 0.3]), torch.tensor([0.6, 0.0])
    ode, sde = S.ode_step(x, v, sig, sig_next), S.sde_step(x, v, sig, sig_next, noise)
    for b in range(2):
        torch.testing.assert_close(ode[b], S.ode_step(x[b:b + 1], v[b:b + 1], sig[b], sig_next[b])[0])
        torch.testing.assert_close(sde[b], S.sde_step(x[b:b + 1], v[b:b + 1], sig[b], sig_next[b],
                                                      noise[b:b + 1])[0])


def test_unipc_vmap_over_schedules_equals_loop():
    schedules = torch.stack([S.shifted_sigmas(6, s) for s in (1.0, 3.0, 5.0)])
    x0 = _randn(20)

    def run(sigmas):
        x, state = x0, S.unipc_init(x0)
        for i in range(6):
            x, state = S.unipc_step(state, x, v_toy(x, sigmas[i]), sigmas, i)
        return x

    batched = torch.func.vmap(run)(schedules)
    for k in range(len(schedules)):
        torch.testing.assert_close(batched[k], run(schedules[k]), rtol=1e-6, atol=1e-6)
    # and one schedule per sample ([B, n + 1]) equals each sample on its own schedule
    per_sample = torch.stack([schedules[0], schedules[2]])
    x, state = x0, S.unipc_init(x0)
    for i in range(6):
        x, state = S.unipc_step(state, x, v_toy(x, per_sample[:, i].view(-1, 1, 1, 1, 1)), per_sample, i)
    torch.testing.assert_close(x[0], run(schedules[0])[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x[1], run(schedules[2])[1], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ guidance


def test_guided_formula_and_scale_one():
    def fn(x, t, ctx):
        return x * ctx.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1) + t.view(-1, 1, 1, 1, 1) / 1000

    x, t = _randn(21), torch.tensor([500.0, 250.0])
    cond, uncond = _randn(22, (2, 3, 8)), _randn(23, (1, 3, 8))
    want = fn(x, t, uncond.expand(2, -1, -1)) + 4.5 * (fn(x, t, cond) - fn(x, t, uncond.expand(2, -1, -1)))
    torch.testing.assert_close(S.guided(fn, cond, uncond, 4.5)(x, t), want)
    assert torch.equal(S.guided(fn, cond, uncond, 1.0)(x, t), fn(x, t, cond))
    zeros = fn(x, t, torch.zeros_like(cond))
    torch.testing.assert_close(S.guided(fn, cond, None, 2.0)(x, t), zeros + 2.0 * (fn(x, t, cond) - zeros))

    def fn_bf16(x, t, ctx):
        return fn(x, t, ctx).bfloat16()

    v = S.guided(fn_bf16, cond, uncond, 4.5)(x, t)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, want, rtol=0.05, atol=0.05)


# ------------------------------------------------------------------------------- a tiny Wan


@pytest.fixture(scope="module")
def tiny_wan():
    cfg = wan.WanConfig(num_attention_heads=2, attention_head_dim=16, ffn_dim=32, text_dim=32, freq_dim=32,
                        num_layers=2)
    params = wan.init(cfg, random.key(0))
    cond = random.normal(random.key(1), (2, 5, cfg.text_dim))
    uncond = random.normal(random.key(2), (1, 5, cfg.text_dim))
    x = random.normal(random.key(3), (2, 16, 2, 4, 6))
    return cfg, params, cond, uncond, x


@pytest.mark.parametrize("kind", S.KINDS)
@pytest.mark.parametrize("scale", [1.0, 4.5])
def test_tiny_wan_samples(tiny_wan, kind, scale):
    cfg, params, cond, uncond, x = tiny_wan

    def fn(x, t, ctx):
        return wan.apply(params, cfg, x, t, ctx)

    sigmas = S.timesteps_to_sigmas([1000, 750, 500, 250]) if kind == "sde" else S.shifted_sigmas(5, 5.0)
    x_before = x.clone()
    out = S.sample(S.guided(fn, cond, uncond, scale), x, sigmas, kind, random.key(4))
    assert out.shape == x.shape and out.dtype == x.dtype and bool(out.isfinite().all())
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("scale", [1.0, 4.5])
def test_guidance_is_one_batched_call_per_step(tiny_wan, scale):
    cfg, params, cond, uncond, x = tiny_wan
    calls = []

    def fn(x, t, ctx):
        calls.append((x.shape[0], t.shape[0], ctx.shape[0]))
        return wan.apply(params, cfg, x, t, ctx)

    sigmas = S.shifted_sigmas(4, 3.0)
    S.sample(S.guided(fn, cond, uncond, scale), x, sigmas, "unipc")
    B = x.shape[0] * (1 if scale == 1 else 2)
    assert calls == [(B, B, B)] * 4
    assert S.nfe(sigmas, scale) == len(calls) * B // x.shape[0]
    if scale != 1:  # the doubled batch gives what two separate calls give
        t = torch.full((2,), 600.0)
        v_c, v_u = fn(x, t, cond), fn(x, t, uncond.expand_as(cond))
        torch.testing.assert_close(S.guided(fn, cond, uncond, scale)(x, t), v_u + scale * (v_c - v_u),
                                   rtol=1e-5, atol=1e-5)


def test_nfe():
    assert S.nfe(S.shifted_sigmas(50, 5.0)) == 50
    assert S.nfe([1.0, 0.5, 0.0], 4.5) == 4
