"""Methods as pure losses: DMD2 and flow matching, against plain references."""


import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

import configs
from fvfunc import random, runner, tree
from fvfunc.autodiff import value_and_grad
from fvfunc.losses import METHODS, dmd2, flow_matching
from fvfunc.models import wan
from fvfunc.testing import tiny

CFG = tiny.tiny_config()
SHAPE = (16, 2, 4, 4)


def wan_model(cfg=CFG, ema_decay=0.0, **kw):
    return tiny.role(lambda p, x, t, c: runner.apply(wan.FAMILY, p, cfg, x, t, c, **kw), cfg.in_channels,
                     ema_decay=ema_decay)


def batch_of(n, seed=0, latents=True):
    g = torch.Generator().manual_seed(seed)
    b = {"text": torch.randn(n, 5, CFG.text_dim, generator=g), "sample_index": torch.arange(n)}
    if latents:
        b["latents"] = torch.randn(n, *SHAPE, generator=g)
    return b


# ------------------------------------------------------------------------- DMD on plain tensors


def test_dmd_gradient_formula_and_loss_gradient():
    g = torch.Generator().manual_seed(0)
    gen, real, fake = (torch.randn(3, 4, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    expected = (fake - real) / (gen - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    assert torch.allclose(dmd2.dmd_gradient(gen, real, fake), expected)

    x = gen.clone().requires_grad_()
    dmd2.distribution_matching_loss(x, real, fake).backward()
    assert torch.allclose(x.grad, expected / gen.numel(), rtol=1e-10, atol=0)
    # and through torch.func
    gf = torch.func.grad(dmd2.distribution_matching_loss)(gen, real, fake)
    assert torch.allclose(gf, expected / gen.numel(), rtol=1e-10, atol=0)


def test_non_finite_dmd_gradient_is_zeroed():
    gen = torch.randn(2, 3, 4)
    real = gen.clone()
    real[1] += 1.0  # sample 0: |gen - real| = 0 -> the normaliser is 0
    fake = torch.randn(2, 3, 4)
    fake[1, 0, 0] = float("nan")
    g = dmd2.dmd_gradient(gen, real, fake)
    assert torch.isfinite(g).all()
    assert (g[0] == 0).all() and g[1, 0, 0] == 0 and (g[1].flatten()[1:] != 0).all()


# ------------------------------------------------- DMD2 generator gradient vs diffusers .backward()


def test_dmd2_generator_gradient_equals_plain_diffusers_backward():
    kw = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
              out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2)
    mods = {}
    for seed, role in enumerate(("student", "teacher", "critic")):
        torch.manual_seed(seed)
        mods[role] = WanTransformer3DModel(**kw).eval()
    cfg = wan.config_from_dict(dict(mods["student"].config))
    params = {r: {k: v.detach().clone() for k, v in m.state_dict().items()} for r, m in mods.items()}
    models = {r: wan_model(cfg) for r in mods}
    method_cfg = configs.DMD2Config(real_score_guidance_scale=3.0)

    g = torch.Generator().manual_seed(1)
    B = 2
    batch = {"text": torch.randn(B, 6, 32, generator=g), "sample_index": torch.arange(B),
             "x_k": torch.randn(B, *SHAPE, generator=g), "sigma_k": torch.tensor([0.75, 0.75]),
             "score_noise": torch.randn(B, *SHAPE, generator=g), "score_sigma": torch.tensor([0.3, 0.9])}

    # the plain way: modules, two teacher calls, .backward()
    s = batch["sigma_k"].view(-1, 1, 1, 1, 1)
    ss = batch["score_sigma"].view(-1, 1, 1, 1, 1)
    v = mods["student"](batch["x_k"], batch["sigma_k"] * 1000, batch["text"]).sample
    x0_gen = batch["x_k"] - s * v
    with torch.no_grad():
        x_t = (1 - ss) * x0_gen + ss * batch["score_noise"]
        t = batch["score_sigma"] * 1000
        fake = x_t - ss * mods["critic"](x_t, t, batch["text"]).sample
        cond = x_t - ss * mods["teacher"](x_t, t, batch["text"]).sample
        uncond = x_t - ss * mods["teacher"](x_t, t, torch.zeros_like(batch["text"])).sample
        real = uncond + 3.0 * (cond - uncond)
        grad = (fake - real) / (x0_gen - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    loss_ref = 0.5 * F.mse_loss(x0_gen, (x0_gen - grad).detach())
    loss_ref.backward()
    ref = {k: p.grad for k, p in mods["student"].named_parameters()}

    for transform in ("func", "autograd"):
        grads, (value, _) = value_and_grad(dmd2.generator_loss, transform)(
            params["student"], batch, models, params, method_cfg)
        assert tree.max_rel_error(grads, ref) <= 1e-5, transform
        assert torch.allclose(value, loss_ref.detach(), rtol=1e-5)


def test_critic_loss_sends_no_gradient_to_the_student():
    p = {r: wan.init(CFG, random.key(i)) for i, r in enumerate(("student", "critic"))}
    models = {"student": wan_model(), "critic": wan_model()}
    b = batch_of(2)
    b.update(x_k=torch.randn(2, *SHAPE), sigma_k=torch.full((2,), 0.5), score_noise=torch.randn(2, *SHAPE),
             score_sigma=torch.tensor([0.2, 0.7]))

    def through_student(student_params):
        with torch.no_grad():
            x0 = dmd2.x0_prediction(models["student"].apply, student_params, b["x_k"], b["sigma_k"], b["text"])
        return dmd2.critic_loss(p["critic"], dict(b, x0_fake=x0), models)[0]

    # x0_fake is produced without grad: the student gets exactly zero gradient ...
    x = {k: v.clone().requires_grad_() for k, v in p["student"].items()}
    loss = through_student(x)
    assert not loss.requires_grad or all(g is None for g in torch.autograd.grad(
        loss, list(x.values()), allow_unused=True))
    # ... while the critic does get one
    gc, _ = value_and_grad(dmd2.critic_loss)(p["critic"], dict(b, x0_fake=torch.randn(2, *SHAPE)), models)
    assert tree.global_norm(gc) > 0


def run_dmd2(steps, interval=2, mode="simulate", ema=0.0, micro=1):
    cfg = configs.DMD2Config(latent_shape=SHAPE[1:], generator_update_interval=interval, rollout_mode=mode,
                             critic_lr=1e-3)
    training = configs.TrainingConfig(lr=1e-3, max_steps=steps, micro_batches=micro)
    names = dmd2.SPEC.roles(None)
    models = {r: wan_model(ema_decay=ema if r == "student" else 0.0) for r in names}
    params = {r: wan.init(CFG, random.key(i)) for i, r in enumerate(names)}
    method = dmd2.make(tiny.run_of(dmd2.SPEC, cfg, training), models)
    state = method.init(params, random.key(7))
    teacher = tree.clone(params["teacher"])
    history = []
    for i in range(steps):
        state, metrics = method.step(state, batch_of(2, seed=i, latents=mode == "data"))
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history, teacher, params


@pytest.mark.parametrize("mode", ["simulate", "data"])
def test_dmd2_schedule_finite_losses_and_frozen_teacher(mode):
    state, history, teacher, initial = run_dmd2(7, interval=3, mode=mode, ema=0.9)
    assert tree.equal(state.params["teacher"], teacher)
    assert [h["student_updated"] for h in history] == [1, 0, 0, 1, 0, 0, 1]
    assert all("generator_loss" in h for h in history[::3])
    assert all("generator_loss" not in h for i, h in enumerate(history) if i % 3)
    assert int(state.opt["student"].step) == 3 and int(state.opt["critic"].step) == 7
    for h in history:
        assert all(torch.isfinite(torch.tensor(v)) for v in h.values()), h
    assert not tree.equal(state.params["student"], initial["student"])
    assert not tree.equal(state.params["critic"], initial["critic"])
    assert state.ema.keys() == {"student"} and not tree.equal(state.ema["student"], state.params["student"])


def test_dmd2_step_is_pure_and_reproducible():
    a, ha, _, _ = run_dmd2(3)
    b, hb, _, _ = run_dmd2(3)
    assert ha == hb
    assert tree.equal(a.params["student"], b.params["student"])


def test_dmd2_micro_batches_equal_one_batch():
    a, ha, _, _ = run_dmd2(2, interval=1, micro=1)
    b, hb, _, _ = run_dmd2(2, interval=1, micro=2)
    for role in ("student", "critic"):
        # Adam at step 1 is nearly sign(g): float reassociation of the micro-batch sum shows at 1e-5
        assert tree.max_rel_error(b.params[role], a.params[role]) <= 1e-4
    assert abs(ha[-1]["critic_loss"] - hb[-1]["critic_loss"]) <= 1e-5 * abs(ha[-1]["critic_loss"])


# ------------------------------------------------------------------------------- flow matching


def test_flow_matching_loss_formulas():
    g = torch.Generator().manual_seed(0)
    v, x0, noise = (torch.randn(3, 2, 2, 2, 2, generator=g) for _ in range(3))
    sigma = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(flow_matching.flow_matching_loss(v, x0, noise, sigma), ((v - noise + x0) ** 2).mean())
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    pre = flow_matching.flow_matching_loss(v, x0, noise, sigma, precondition=True)
    assert torch.allclose(pre, ((x_t - s * v - x0) ** 2).mean())


def test_sigma_schemes():
    k = random.key(0)
    for scheme in ("uniform", "logit_normal", "mode"):
        cfg = configs.FinetuneConfig(weighting_scheme=scheme)
        u = flow_matching.sample_u(k, 4000, cfg)
        assert ((u > 0) & (u < 1)).all(), scheme
    # logit-normal concentrates around sigmoid(mean); mode with scale > 0 moves mass toward the middle
    ln = flow_matching.sample_u(k, 4000, configs.FinetuneConfig(weighting_scheme="logit_normal", logit_mean=1.0))
    assert abs(ln.median().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.03
    uni = flow_matching.sample_u(k, 4000, configs.FinetuneConfig())
    mode = flow_matching.sample_u(k, 4000, configs.FinetuneConfig(weighting_scheme="mode"))
    assert ((mode - 0.5).abs() < 0.25).float().mean() > ((uni - 0.5).abs() < 0.25).float().mean() + 0.05


def test_cfg_dropout_is_deterministic_per_sample_and_has_the_rate():
    cfg = configs.FinetuneConfig(cfg_rate=0.3)
    idx = torch.arange(2000)
    _, _, keep = flow_matching.draw(random.key(1), idx, (1,), cfg)
    _, _, keep2 = flow_matching.draw(random.key(1), idx[1000:], (1,), cfg)
    assert torch.equal(keep[1000:], keep2)  # a sample's decision depends on its index, not its batch
    assert abs((~keep).float().mean().item() - 0.3) < 0.04


def test_vmap_of_per_sample_loss_equals_batched_mean():
    params = wan.init(CFG, random.key(0))
    b = batch_of(3)
    noise, sigma, _ = flow_matching.draw(random.key(2), b["sample_index"], SHAPE, configs.FinetuneConfig())
    apply = wan_model(attention="math").apply

    def per_sample(p, x0, n, s, c):
        x_t = (1 - s) * x0 + s * n
        v = apply(p, x_t[None], (s * 1000)[None], c[None])[0]
        return flow_matching.flow_matching_loss(v[None], x0[None], n[None], s[None])

    def batched(p):
        x_t = (1 - sigma.view(-1, 1, 1, 1, 1)) * b["latents"] + sigma.view(-1, 1, 1, 1, 1) * noise
        return flow_matching.flow_matching_loss(apply(p, x_t, sigma * 1000, b["text"]), b["latents"], noise, sigma)

    losses = torch.func.vmap(per_sample, in_dims=(None, 0, 0, 0, 0))(params, b["latents"], noise, sigma, b["text"])
    assert torch.allclose(losses.mean(), batched(params), rtol=1e-5)
    per_grads = torch.func.vmap(torch.func.grad(per_sample), in_dims=(None, 0, 0, 0, 0))(
        params, b["latents"], noise, sigma, b["text"])
    mean_grads = {k: g.mean(0) for k, g in per_grads.items()}
    assert tree.max_rel_error(mean_grads, torch.func.grad(batched)(params)) <= 1e-4


def finetune(steps, micro=1, transform="autograd", lr=1e-3, batch=None, **method):
    training = configs.TrainingConfig(lr=lr, max_steps=steps, micro_batches=micro, grad_transform=transform,
                                      betas=(0.9, 0.99))
    m = flow_matching.make(tiny.run_of(flow_matching.SPEC, configs.FinetuneConfig(**method), training),
                           {"student": wan_model()})
    state = m.init({"student": wan.init(CFG, random.key(0))}, random.key(1))
    losses = []
    for _ in range(steps):
        state, metrics = m.step(state, batch or batch_of(4))
        losses.append(float(metrics["loss"]))
    return state, losses


def test_four_micro_batches_equal_one_batch_of_four():
    one, l1 = finetune(2, micro=1)
    four, l4 = finetune(2, micro=4)
    assert tree.max_rel_error(four.params["student"], one.params["student"]) <= 1e-5
    assert l4 == pytest.approx(l1, rel=1e-5)


def test_grad_transforms_agree():
    a, la = finetune(2, transform="autograd")
    b, lb = finetune(2, transform="func")
    assert tree.max_rel_error(a.params["student"], b.params["student"]) <= 1e-5
    assert la == pytest.approx(lb, rel=1e-6)


def test_finetune_cuts_the_loss():
    # one fixed synthetic batch of 4 with structure the model can learn (low-frequency latents)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 16, 1, 1, 1, generator=g).expand(4, *SHAPE).contiguous()
    b = {"latents": base, "text": torch.randn(4, 5, CFG.text_dim, generator=g), "sample_index": torch.arange(4)}
    _, losses = finetune(100, lr=3e-3, batch=b, cfg_rate=0.0)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)


def test_specs_declare_roles_and_data():
    finetune_run, dmd2_run = configs.FinetuneRun(), configs.DMD2Run()
    assert METHODS["finetune"].roles(finetune_run) == METHODS["finetune"].trainable == ("student",)
    assert METHODS["dmd2"].roles(dmd2_run) == ("student", "teacher", "critic")
    assert METHODS["dmd2"].trainable == ("student", "critic")
    assert [c.key for c in METHODS["finetune"].data(finetune_run)] == ["text", "latents"]
    assert [c.key for c in METHODS["dmd2"].data(dmd2_run)] == ["text"]
    data_mode = tiny.run_of(METHODS["dmd2"], configs.DMD2Config(rollout_mode="data"))
    assert [c.key for c in METHODS["dmd2"].data(data_mode)] == ["text", "latents"]
    assert all(name == spec.name for name, spec in METHODS.items())
