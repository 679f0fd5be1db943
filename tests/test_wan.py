"""Wan as params + pure apply, against diffusers' WanTransformer3DModel (the numerical reference)."""

import dataclasses
import json
import math

import pytest
import torch
from diffusers import WanTransformer3DModel

from fvfunc import random, runner, tree
from fvfunc.models import ModelError, family, wan

CONFIGS = [  # heads, head dim, layers, FFN, text dim, latent [T, H, W], text length
    dict(num_attention_heads=2, attention_head_dim=12, num_layers=2, ffn_dim=40, text_dim=24,
         in_channels=4, out_channels=4, freq_dim=16, grid=(1, 4, 6), text_len=7),
    dict(num_attention_heads=3, attention_head_dim=16, num_layers=1, ffn_dim=64, text_dim=32,
         in_channels=16, out_channels=16, freq_dim=32, grid=(3, 6, 4), text_len=5),
    dict(num_attention_heads=1, attention_head_dim=32, num_layers=3, ffn_dim=24, text_dim=16,
         in_channels=8, out_channels=8, freq_dim=8, grid=(2, 2, 8), text_len=11, cross_attn_norm=False),
]


def make_module(c, seed=0):
    c = {k: v for k, v in c.items() if k not in ("grid", "text_len")}
    torch.manual_seed(seed)
    m = WanTransformer3DModel(**c).eval()
    with torch.no_grad():  # diffusers inits biases / tables in ways that hide bugs; randomise all
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5))
    return m


def inputs(m, c, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    T, H, W = c["grid"]
    x = torch.randn(batch, m.config.in_channels, T, H, W, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    ctx = torch.randn(batch, c["text_len"], m.config.text_dim, generator=g)
    return x, t, ctx


def params_of(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("c", CONFIGS)
def test_apply_equals_diffusers_fp32_and_bf16(c):
    m = make_module(c)
    cfg = wan.config_from_dict(dict(m.config))
    params = params_of(m)
    x, t, ctx = inputs(m, c)
    with torch.no_grad():
        ref = m(x, t, ctx).sample
        out = wan.apply(params, cfg, x, t, ctx)
        out_math = runner.apply(wan.FAMILY, params, cfg, x, t, ctx, attention="math")
        out_bf16 = wan.apply(params, cfg, x, t, ctx, dtype=torch.bfloat16)
    assert out.shape == ref.shape
    assert rel(out, ref) <= 1e-5
    assert rel(out_math, ref) <= 1e-5
    assert out_bf16.dtype == torch.bfloat16
    assert rel(out_bf16, out) <= 2e-2
    assert rel(out_bf16, out) > 0  # the bf16 path really computes in bf16


def test_grad_equals_diffusers_autograd():
    c = CONFIGS[0]
    m = make_module(c)
    cfg = wan.config_from_dict(dict(m.config))
    params = params_of(m)
    x, t, ctx = inputs(m, c)
    target = torch.randn_like(x)

    m.zero_grad()
    ((m(x, t, ctx).sample - target) ** 2).mean().backward()
    ref = {k: p.grad for k, p in m.named_parameters()}

    def loss(p):
        return ((wan.apply(p, cfg, x, t, ctx) - target) ** 2).mean()

    grads = torch.func.grad(loss)(params)
    assert tree.max_rel_error(grads, ref) <= 1e-5

    # block rematerialisation (autograd path) gives the same gradients
    p_req = {k: v.clone().requires_grad_() for k, v in params.items()}
    lc = ((runner.apply(wan.FAMILY, p_req, cfg, x, t, ctx, remat="full") - target) ** 2).mean()
    g_remat = dict(zip(p_req, torch.autograd.grad(lc, list(p_req.values())), strict=True))
    assert tree.max_rel_error(g_remat, ref) <= 1e-5


def test_vmap_per_sample_equals_batched():
    c = CONFIGS[1]
    m = make_module(c)
    cfg = wan.config_from_dict(dict(m.config))
    params = params_of(m)
    x, t, ctx = inputs(m, c, batch=3)
    batched = wan.apply(params, cfg, x, t, ctx)

    def one(xi, ti, ci):
        return wan.apply(params, cfg, xi[None], ti[None], ci[None])[0]

    per_sample = torch.func.vmap(one)(x, t, ctx)
    assert rel(per_sample, batched) <= 1e-5


def test_jvp_with_math_attention():
    c = CONFIGS[0]
    m = make_module(c)
    cfg = wan.config_from_dict(dict(m.config))
    params = params_of(m)
    x, t, ctx = inputs(m, c)
    tangent = torch.randn_like(x)

    def f(xx):
        return runner.apply(wan.FAMILY, params, cfg, xx, t, ctx, attention="math")

    out, jt = torch.func.jvp(f, (x,), (tangent,))
    assert rel(out, f(x)) <= 1e-6
    # duality <J t, u> = <t, J^T u> checks the JVP against reverse mode
    u = torch.randn_like(out)
    (jtu,) = torch.func.vjp(f, x)[1](u)
    lhs, rhs = (jt * u).sum().item(), (tangent * jtu).sum().item()
    assert math.isclose(lhs, rhs, rel_tol=1e-4)
    # and against a central finite difference
    eps = 1e-3
    fd = (f(x + eps * tangent) - f(x - eps * tangent)) / (2 * eps)
    assert rel(jt, fd) <= 1e-2


@pytest.mark.parametrize("sharded", [False, True])
def test_load_diffusers_folder_and_save_back(tmp_path, sharded):
    c = CONFIGS[1]
    m = make_module(c)
    kw = {"max_shard_size": "20KB"} if sharded else {}
    m.save_pretrained(tmp_path / "pipe" / "transformer", safe_serialization=True, **kw)
    if sharded:
        assert (tmp_path / "pipe" / "transformer" / wan.INDEX).is_file()

    cfg, params = wan.load(tmp_path / "pipe")  # a pipeline folder with transformer/
    assert tree.equal(params, params_of(m))
    x, t, ctx = inputs(m, c)
    with torch.no_grad():
        ref = m(x, t, ctx).sample
    assert rel(wan.apply(params, cfg, x, t, ctx), ref) <= 1e-5

    wan.save(tmp_path / "ours", cfg, params, max_shard_bytes=30_000 if sharded else 2**40)
    back = WanTransformer3DModel.from_pretrained(tmp_path / "ours").eval()
    assert tree.equal(params_of(back), params)
    with torch.no_grad():
        assert torch.equal(back(x, t, ctx).sample, ref)

    cfg2, params2 = wan.load(tmp_path / "ours")
    assert cfg2 == cfg and tree.equal(params2, params)


def test_init_is_a_pure_function_of_the_key():
    cfg = wan.WanConfig(num_attention_heads=2, attention_head_dim=8, num_layers=1, ffn_dim=8, text_dim=8,
                        freq_dim=8, in_channels=4, out_channels=4)
    a, b = wan.init(cfg, random.key(3)), wan.init(cfg, random.key(3))
    assert tree.equal(a, b)
    assert not tree.allclose(a, wan.init(cfg, random.key(4)))
    wan.check_params(cfg, a)
    assert family("wan") is wan.FAMILY


def _write(tmp_path, cfg_dict, params=None):
    folder = tmp_path / "m"
    cfg = wan.WanConfig(num_attention_heads=2, attention_head_dim=8, num_layers=1, ffn_dim=8, text_dim=8,
                        freq_dim=8, in_channels=4, out_channels=4)
    wan.save(folder, cfg, params or wan.init(cfg, random.key(0)))
    if cfg_dict is not None:
        d = json.loads((folder / "config.json").read_text())
        d.update(cfg_dict)
        (folder / "config.json").write_text(json.dumps(d))
    return folder, cfg


def test_bad_folders_and_configs(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        wan.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a Wan transformer folder"):
        wan.load(tmp_path / "empty")
    folder, _ = _write(tmp_path, {"_class_name": "UNet2DConditionModel"})
    with pytest.raises(ModelError, match="not a Wan transformer"):
        wan.load(folder)
    folder, _ = _write(tmp_path, {"_class_name": "WanTransformer3DModel", "image_dim": 1280,
                                  "added_kv_proj_dim": 5120})
    with pytest.raises(ModelError, match="added_kv_proj_dim 5120 must equal the model width 16"):
        wan.load(folder)
    folder, _ = _write(tmp_path, {"image_dim": 8, "added_kv_proj_dim": None})
    with pytest.raises(ModelError, match="set together"):
        wan.load(folder)
    folder, _ = _write(tmp_path, {"image_dim": 8, "added_kv_proj_dim": 16})
    with pytest.raises(ModelError, match="in_channels = 2 x out_channels \\+ 4"):
        wan.load(folder)
    folder, _ = _write(tmp_path, {"image_dim": None, "added_kv_proj_dim": None, "qk_norm": "rms_norm"})
    with pytest.raises(ModelError, match="qk_norm"):
        wan.load(folder)
    folder, _ = _write(tmp_path, {"qk_norm": "rms_norm_across_heads", "frobnicate": 3})
    with pytest.raises(ModelError, match="frobnicate"):
        wan.load(folder)


def test_missing_extra_and_misshaped_keys(tmp_path):
    cfg = wan.WanConfig(num_attention_heads=2, attention_head_dim=8, num_layers=1, ffn_dim=8, text_dim=8,
                        freq_dim=8, in_channels=4, out_channels=4)
    good = wan.init(cfg, random.key(0))
    missing = {k: v for k, v in good.items() if k != "blocks.0.attn2.to_k.bias"}
    with pytest.raises(ModelError, match=r"missing .*blocks\.0\.attn2\.to_k\.bias"):
        wan.check_params(cfg, missing)
    extra = dict(good, **{"blocks.7.attn1.to_q.weight": torch.zeros(1)})
    with pytest.raises(ModelError, match=r"unexpected .*blocks\.7"):
        wan.check_params(cfg, extra)
    bad = dict(good, **{"proj_out.weight": torch.zeros(3, 16)})
    with pytest.raises(ModelError, match=r"proj_out\.weight has shape \[3, 16\]"):
        wan.check_params(cfg, bad)
    # the same through a folder on disk
    from safetensors.torch import save_file
    folder = tmp_path / "f"
    wan.save(folder, cfg, good)
    save_file({k: v.contiguous() for k, v in bad.items()}, str(folder / wan.WEIGHTS))
    with pytest.raises(ModelError, match=r"proj_out\.weight"):
        wan.load(folder)
    with pytest.raises(ModelError, match=r"proj_out\.weight has shape \[3, 16\]"):
        wan.load(folder, rows=lambda n: (0, 1))  # the whole shape is checked, not the rows read


@pytest.mark.parametrize("world", [2, 3])
def test_load_rows_reads_each_ranks_piece(tmp_path, world):
    c = CONFIGS[1]
    m = make_module(c)
    m.save_pretrained(tmp_path / "t", safe_serialization=True, max_shard_size="20KB")
    _, whole = wan.load(tmp_path / "t")
    for rank in range(world):
        rows = lambda n, rank=rank: (rank * -(-n // world), min(n, (rank + 1) * -(-n // world)))
        _, piece = wan.load(tmp_path / "t", dtype=torch.bfloat16, rows=rows)
        for k, v in whole.items():
            want = v[slice(*rows(v.shape[0]))] if v.ndim else v
            assert torch.equal(piece[k], want.to(torch.bfloat16)), k


def test_load_casts_dtype(tmp_path):
    folder, cfg = _write(tmp_path, None)
    _, p16 = wan.load(folder, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in p16.values())


# ------------------------------------------------------------------------------ model folders


@pytest.mark.parametrize("sharded", [False, True])
def test_weight_variants_load_as_diffusers_names_them(tmp_path, sharded):
    m = make_module(CONFIGS[1])
    folder = tmp_path / "pipe" / "transformer"
    m.save_pretrained(folder)  # the plain fp32 weights
    half = make_module(CONFIGS[1], seed=1).to(torch.float16)
    half.save_pretrained(folder, variant="fp16", **({"max_shard_size": "20KB"} if sharded else {}))
    assert (folder / ("diffusion_pytorch_model.safetensors.index.fp16.json" if sharded
                      else "diffusion_pytorch_model.fp16.safetensors")).is_file()

    _, plain = wan.load(tmp_path / "pipe")
    assert tree.equal(plain, params_of(m))
    cfg, fp16 = wan.load(tmp_path / "pipe", variant="fp16")
    assert tree.equal(fp16, params_of(half)) and {v.dtype for v in fp16.values()} == {torch.float16}
    assert set(wan.stored_dtypes(folder, "fp16").values()) == {torch.float16}
    ref = WanTransformer3DModel.from_pretrained(folder, variant="fp16").eval()
    x, t, ctx = inputs(ref, CONFIGS[1])
    with torch.no_grad():
        assert rel(wan.apply({k: v.float() for k, v in fp16.items()}, cfg, x, t, ctx), ref(x, t, ctx).sample) <= 1e-5

    with pytest.raises(ModelError, match=r"transformer: no weights of variant 'bf16' .*the variants here: "
                                         r"'' \(plain\), 'fp16'"):
        wan.load(tmp_path / "pipe", variant="bf16")
    for f in folder.glob("diffusion_pytorch_model.safetensors*"):
        f.unlink()
    with pytest.raises(ModelError, match=r"no weights of variant '' .*the variants here: 'fp16'"):
        wan.load(folder)


def test_roles_load_the_variant_of_their_config(tmp_path):
    import configs
    from fvfunc import cli, distributed, roles
    from fvfunc.losses import METHODS
    from fvfunc.testing import tiny

    cfg = tiny.tiny_config()
    base = wan.init(cfg, random.key(0))
    tiny.write_pipeline(tmp_path / "p", cfg, params=base)
    half = {k: (v * 2).half() for k, v in base.items()}
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in half.items()}, str(tmp_path / "p" / "transformer" /
                                                              "diffusion_pytorch_model.fp16.safetensors"))
    spec = METHODS["finetune"]
    run = spec.run()
    for variant, want in (("", base), ("fp16", half)):
        student = configs.RoleConfig(path=str(tmp_path / "p"), trainable=True, variant=variant)
        run = dataclasses.replace(run, roles=configs.RolesConfig(student=student))
        built = roles.build(run, spec, distributed.init("cpu"))
        assert tree.equal(built["student"].params, {k: v.float() for k, v in want.items()}), variant
    with pytest.raises(cli.ConfigError, match=r"roles.student.path: .*no weights of variant 'bf16'.*'fp16'"):
        _check_student(tmp_path / "p", tmp_path, variant="bf16")


def test_out_channels_null_means_in_channels(tmp_path):
    folder, cfg = _write(tmp_path, {"out_channels": None})
    got, params = wan.load(folder)
    assert got == cfg and got.out_channels == got.in_channels == 4
    ref = WanTransformer3DModel.from_pretrained(folder).eval()
    x, t, ctx = torch.randn(1, 4, 1, 2, 2), torch.tensor([300.0]), torch.randn(1, 3, 8)
    with torch.no_grad():
        assert rel(wan.apply(params, got, x, t, ctx), ref(x, t, ctx).sample) <= 1e-5


def _pipeline(root, **index):
    from fvfunc.testing import tiny

    tiny.write_pipeline(root)
    d = json.loads((root / "model_index.json").read_text())
    d.update(index)
    (root / "model_index.json").write_text(json.dumps(d))
    return root


def _check_student(root, tmp_path, variant=""):
    """cli.check of a finetune run whose student is `root`."""
    import configs
    from fvfunc import cli

    (tmp_path / "data").mkdir(exist_ok=True)
    run = configs.FinetuneRun()
    return cli.check("finetune", dataclasses.replace(
        run, roles=configs.RolesConfig(student=configs.RoleConfig(path=str(root), trainable=True,
                                                                     variant=variant)),
        data=configs.DataConfig(path=(str(tmp_path / "data"),))))


def test_two_expert_wan22_needs_a_boundary_at_load_and_at_the_config_check(tmp_path, capsys):
    from fvfunc import cli

    root = _pipeline(tmp_path / "a14b", transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=0.875)
    from fvfunc.testing import tiny
    wan.save(root / "transformer_2", tiny.tiny_config(), wan.init(tiny.tiny_config(), random.key(1)))
    assert wan.experts(root) == (("transformer", "transformer_2"), 0.875)
    assert wan.experts(root / "transformer") is None and wan.experts(root / "transformer_2") is None  # one expert
    assert len(wan.pair_weight_files(root)) == 2
    _check_student(root, tmp_path)
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps(dict(index, boundary_ratio=None)))
    why = "a two-expert pipeline \\(transformer_2\\) needs boundary_ratio"
    for load in (wan.load_config, wan.load):
        with pytest.raises(ModelError, match=f"{root / 'model_index.json'}: {why}"):
            load(root)
    with pytest.raises(cli.ConfigError, match=f"roles.student.path: {root / 'model_index.json'}: {why}"):
        _check_student(root, tmp_path)
    out = tmp_path / "run"
    code = cli.main(["finetune", "--roles.student.path", str(root), "--data.path", str(tmp_path / "data"),
                     "--training.output-dir", str(out)])
    assert code == 2 and "needs boundary_ratio" in capsys.readouterr().err
    assert not out.exists()
    (root / "model_index.json").write_text(json.dumps(dict(index, boundary_ratio=1.5)))
    with pytest.raises(ModelError, match="boundary_ratio must be a number in \\(0, 1\\), got 1.5"):
        wan.experts(root)


def test_ti2v_expand_timesteps_is_read_from_the_transformer_or_the_pipeline_config(tmp_path):
    folder, _ = _write(tmp_path, {"expand_timesteps": True})
    assert wan.load_config(folder).expand_timesteps
    assert "expand_timesteps" not in wan.config_to_dict(wan.load_config(folder))  # a pipeline fact
    root = _pipeline(tmp_path / "ti2v", expand_timesteps=True)
    assert wan.load_config(root).expand_timesteps and wan.load(root)[0].expand_timesteps
    _check_student(root, tmp_path)
    # the Wan2.1 folders' own `"transformer_2": [null, null]` and `"expand_timesteps": false` are fine
    ok = _pipeline(tmp_path / "t2v", transformer_2=[None, None], expand_timesteps=False, boundary_ratio=None)
    _check_student(ok, tmp_path)
