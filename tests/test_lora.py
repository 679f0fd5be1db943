"""LoRA: adapters as a second params tree (fvfunc/lora.py), against diffusers' load_lora_weights (peft)."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

import configs
from fvfunc import checkpoint, cli, lora, random, trainer
from fvfunc.config_file import ConfigError
from fvfunc.models import wan
from fvfunc.ops import linear
from fvfunc.testing import tiny

RANK, ALPHA = 4, 8.0  # a scale of 2, so a mix-up of alpha conventions shows


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_linear_adds_the_unmerged_adapter():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 5, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    a, bb = torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    params = {"l.weight": w, "l.bias": b, "l.lora_A.weight": a, "l.lora_B.weight": bb}
    want = x @ (w + bb @ a).T + b
    torch.testing.assert_close(linear(x, params, "l", torch.float32), want, rtol=1e-5, atol=1e-5)
    del params["l.lora_A.weight"]
    torch.testing.assert_close(linear(x, params, "l", torch.float32), x @ w.T + b)


def test_select_targets_and_its_errors():
    shapes = wan.param_shapes(tiny.tiny_config())
    names = lora.select(shapes, configs.LoraConfig().targets, 4, "roles.student.lora")
    assert len(names) == 2 * 10 and names[0] == "blocks.0.attn1.to_q"
    assert lora.select(shapes, ("blocks.1.ffn.*",), 4, "f") == ["blocks.1.ffn.net.0.proj", "blocks.1.ffn.net.2"]
    assert lora.select(shapes, ("proj_out",), 4, "f") == ["proj_out"]
    with pytest.raises(lora.LoraError, match=r"roles.student.lora.targets: 'attn1.to_qq' matches no linear"):
        lora.select(shapes, ("attn1.to_qq",), 4, "roles.student.lora")
    with pytest.raises(lora.LoraError, match=r"rank 40 is larger than the layer blocks.0.attn1.to_q \(32 x 32\)"):
        lora.select(shapes, ("attn1.to_q",), 40, "roles.student.lora")
    with pytest.raises(lora.LoraError, match="patch_embedding"):  # a conv is no linear
        lora.select(shapes, ("patch_embedding",), 4, "f")


def random_adapters(cfg, seed=0):
    shapes = wan.param_shapes(cfg)
    names = lora.select(shapes, configs.LoraConfig().targets, RANK, "f")
    g = torch.Generator().manual_seed(seed)
    fresh = lora.init(shapes, names, RANK, random.key(0))
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in fresh.items()}


def kohya_file(path, adapters, scale, cfg):
    """A musubi-tuner / kohya file: lora_unet_<original name with underscores>.lora_down/up.weight + alpha."""
    names = wan.original_names(cfg)
    out = {}
    for n in lora.layers_of(adapters):
        key = "lora_unet_" + names[n].replace(".", "_")
        out[f"{key}.lora_down.weight"] = adapters[f"{n}.lora_A.weight"]
        out[f"{key}.lora_up.weight"] = adapters[f"{n}.lora_B.weight"]
        out[f"{key}.alpha"] = torch.tensor(scale * RANK)
    save_file(out, str(path))
    return path


def test_every_file_layout_reads_back_the_same_deltas(tmp_path):
    cfg = tiny.tiny_config()
    shapes, names = wan.param_shapes(cfg), wan.original_names(cfg)
    adapters, scale = random_adapters(cfg), ALPHA / RANK
    files = [lora.write_diffusers(tmp_path / "d.safetensors", adapters, scale),
             lora.write_original(tmp_path / "c.safetensors", adapters, scale, names),
             kohya_file(tmp_path / "k.safetensors", adapters, scale, cfg)]
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in load_file(files[1])
    for f in files:
        pairs = lora.read(f, shapes, names)
        assert sorted(pairs) == sorted(lora.layers_of(adapters)), f
        for n, p in pairs.items():
            want = scale * adapters[f"{n}.lora_B.weight"] @ adapters[f"{n}.lora_A.weight"]
            torch.testing.assert_close(p.scale * p.up @ p.down, want, rtol=1e-6, atol=1e-7)


def test_a_lora_of_another_model_is_refused_naming_the_key(tmp_path):
    cfg = tiny.tiny_config()
    shapes, names = wan.param_shapes(cfg), wan.original_names(cfg)
    adapters = random_adapters(cfg)
    f = lora.write_diffusers(tmp_path / "d.safetensors", adapters, 1.0)
    shallower = wan.param_shapes(tiny.tiny_config(num_layers=1))
    with pytest.raises(lora.LoraError, match=r"transformer.blocks.1.attn\d.to_\w+.lora_[AB].weight names no linear"):
        lora.read(f, shallower, names)
    wider = wan.param_shapes(tiny.tiny_config(ffn_dim=48))
    with pytest.raises(lora.LoraError, match=r"blocks.0.ffn.net.0.proj has down \[4, 32\] and up \[64, 4\]; the "
                                             r"model's layer is 48 x 32"):
        lora.read(f, wider, names)
    save_file({"blocks.0.attn1.to_q.diff": torch.zeros(32, 32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(lora.LoraError, match=r"holds full-tensor diffs \(blocks.0.attn1.to_q.weight and 0 more"):
        lora.read(tmp_path / "x.safetensors", shapes, names)  # diffs merge; adapters cannot continue from them
    save_file({"diffusion_model.blocks.5.diff_m": torch.zeros(1, 6, 32)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(lora.LoraError, match="diffusion_model.blocks.5.diff_m names no parameter of this model"):
        lora.read_all(tmp_path / "y.safetensors", shapes, names, wan.original_params(cfg))
    save_file({"blocks.0.attn1.to_q.lora_down.weight": torch.zeros(4, 32), "x.dora_scale": torch.zeros(3)},
              str(tmp_path / "z.safetensors"))
    with pytest.raises(lora.LoraError, match="x.dora_scale is not a LoRA key"):
        lora.read(tmp_path / "z.safetensors", shapes, names)
    with pytest.raises(lora.LoraError, match="does not exist"):
        lora.read(tmp_path / "nothing.safetensors", shapes, names)


def lightx2v_file(path, adapters, scale, cfg, seed=5, full=True):
    """A LightX2V-style file: ComfyUI pairs (lora_down / lora_up / alpha) plus full-tensor diffs of biases
    (.diff_b) and, when `full`, of norms and the patch embedding (.diff) and of modulations (.diff_m)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(load_file(lora.write_original(path, adapters, scale, wan.original_names(cfg))))
    D = cfg.num_attention_heads * cfg.attention_head_dim
    diffs = {"blocks.0.self_attn.q.diff_b": (D,), "blocks.1.ffn.0.diff_b": (cfg.ffn_dim,),
             "head.head.diff_b": wan.param_shapes(cfg)["proj_out.bias"]}
    if full:
        diffs.update({"blocks.0.self_attn.norm_q.diff": (D,), "blocks.1.norm3.diff": (D,),
                      "blocks.1.norm3.diff_b": (D,), "blocks.1.diff_m": (1, 6, D), "head.diff_m": (1, 2, D),
                      "patch_embedding.diff": wan.param_shapes(cfg)["patch_embedding.weight"]})
    out.update({f"diffusion_model.{k}": torch.randn(shape, generator=g) * 0.1 for k, shape in diffs.items()})
    save_file(out, str(path))
    return path


def test_lightx2v_style_diffs_merge_as_comfyui_and_diffusers_apply_them(world, tmp_path, capsys):
    """A frozen LoRA file with full-tensor diffs: every diff added at the file's strength with the pairs
    (W + s (scale B A + dW), b + s db, the norms', modulations' and patch embedding's + s d); the part
    diffusers' load_lora_weights reads (pairs and .diff_b, as lora_B biases) gives its output; a file of
    diffs cannot continue as trained adapters."""
    from fvfunc import roles

    cfg, base = wan.load(world["model"])
    adapters, scale = random_adapters(cfg), ALPHA / RANK
    f = lightx2v_file(tmp_path / "l.safetensors", adapters, scale, cfg)
    role = configs.RoleConfig(path=str(world["model"]), lora=configs.LoraConfig(frozen=(f"{f}:0.5",)))
    _, merged = roles.load_weights("teacher", role, wan.FAMILY, "cpu")
    raw = load_file(f)

    def d(key):
        return raw[f"diffusion_model.{key}"]

    q = "blocks.0.attn1.to_q"
    want = base[f"{q}.weight"] + 0.5 * scale * adapters[f"{q}.lora_B.weight"] @ adapters[f"{q}.lora_A.weight"]
    torch.testing.assert_close(merged[f"{q}.weight"], want, rtol=1e-6, atol=1e-6)
    pairs = {f"{q}.bias": "blocks.0.self_attn.q.diff_b", "blocks.1.ffn.net.0.proj.bias": "blocks.1.ffn.0.diff_b",
             "proj_out.bias": "head.head.diff_b", "blocks.0.attn1.norm_q.weight": "blocks.0.self_attn.norm_q.diff",
             "blocks.1.norm2.weight": "blocks.1.norm3.diff", "blocks.1.norm2.bias": "blocks.1.norm3.diff_b",
             "blocks.1.scale_shift_table": "blocks.1.diff_m", "scale_shift_table": "head.diff_m",
             "patch_embedding.weight": "patch_embedding.diff"}
    for ours, theirs in pairs.items():
        torch.testing.assert_close(merged[ours], base[ours] + 0.5 * d(theirs), rtol=1e-6, atol=1e-6, msg=ours)
    untouched = [k for k in base if k.startswith("blocks.1.attn2.norm_q") or k == "patch_embedding.bias"]
    assert untouched and all(torch.equal(merged[k], base[k]) for k in untouched)

    # diffusers reads the pairs and the .diff_b keys (as lora_B biases): the same model at strength 1
    lightx2v_file(tmp_path / "diffusers" / "b.safetensors", adapters, scale, cfg, full=False)
    role = configs.RoleConfig(path=str(world["model"]),
                              lora=configs.LoraConfig(frozen=(str(tmp_path / "diffusers" / "b.safetensors"),)))
    _, ours = roles.load_weights("teacher", role, wan.FAMILY, "cpu")
    x, t, ctx = inputs(cfg)
    # (peft makes the lora_B biases on the meta device unless low_cpu_mem_usage is off)
    ref = forward(diffusers_with_lora(world["model"], tmp_path / "diffusers", "b.safetensors",
                                      low_cpu_mem_usage=False), x, t, ctx)
    assert rel(wan.apply(ours, cfg, x, t, ctx), ref) < 1e-5
    assert rel(wan.apply(base, cfg, x, t, ctx), ref) > 1e-3

    argv = ["finetune", "--roles.student.path", str(world["model"]), "--data.path", str(world["data"]),
            "--training.output-dir", str(tmp_path / "run"), "--training.device", "cpu", "--roles.student.lora.rank",
            str(RANK), "--roles.student.lora.init", str(f), "--tracking.wandb-mode", "disabled"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "roles.student.lora.init: " in err and "l.safetensors: holds full-tensor diffs" in err, err
    assert not (tmp_path / "run").exists()


def test_train_py_sample_merges_lora_files_into_the_model(world, tmp_path, capsys):
    """sample --lora FILE:STRENGTH samples the model with the file merged in: the same latents as sampling a
    folder of the merged weights; a missing file is one error before any model loads."""
    from safetensors.torch import save_file as save

    cfg, base = wan.load(world["model"])
    f = lightx2v_file(tmp_path / "l.safetensors", random_adapters(cfg), ALPHA / RANK, cfg)
    pairs, diffs = lora.read_all(f, wan.param_shapes(cfg), wan.original_names(cfg), wan.original_params(cfg))
    merged = tiny.write_pipeline(tmp_path / "merged", cfg, params=lora.merge_diffs(lora.merge_pairs(base, pairs, 0.5),
                                                                                    diffs, 0.5), vae=True)
    g = torch.Generator().manual_seed(2)
    save({"text": torch.randn(2, 5, cfg.text_dim, generator=g)}, str(tmp_path / "text.safetensors"))
    save({"noise": torch.randn(2, cfg.out_channels, 2, 4, 4, generator=g)}, str(tmp_path / "noise.safetensors"))

    def sample(model, out, *more):
        return cli.main(["sample", "--model", str(model), "--prompts", str(tmp_path / "text.safetensors"), "--noise",
                         str(tmp_path / "noise.safetensors"), "--sampler.num-steps", "3", "--output-dir", str(out),
                         "--device", "cpu", "--precision", "float32", *more])

    assert sample(world["model"], tmp_path / "a", "--lora", f"{f}:0.5") == 0
    assert sample(merged, tmp_path / "b") == 0
    assert sample(world["model"], tmp_path / "plain") == 0
    for i in range(2):
        a, b, plain = (load_file(tmp_path / d / f"sample-{i}.safetensors")["latents"] for d in ("a", "b", "plain"))
        assert rel(a, b) < 1e-6 and rel(plain, b) > 1e-3
    assert sample(world["model"], tmp_path / "c", "--lora", str(tmp_path / "none.safetensors")) == 2
    err = capsys.readouterr().err
    assert "lora: " in err and "none.safetensors: LoRA file does not exist" in err and err.count("error:") == 1
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------- training runs


def lora_cfg(world, method, out, roles=("student",), **training):
    run = trainer.METHODS[method].run()
    model = str(world["model"])
    spec = configs.LoraConfig(rank=RANK, alpha=ALPHA)

    def role(name, trainable, dtype="float32"):
        return configs.RoleConfig(path=model, trainable=trainable, dtype=dtype,
                                  lora=spec if name in roles else configs.LoraConfig())

    t = dict(output_dir=str(out), max_steps=3, batch_size=2, checkpoint_every=3, precision="float32",
             device="cpu", lr=5e-2, keep_checkpoints=0, weight_decay=0.0)
    t.update(training)
    method_cfg = run.method
    if method == "dmd2":
        method_cfg = dataclasses.replace(method_cfg, latent_shape=(2, 4, 4), generator_update_interval=2,
                                         critic_lr=1e-2)
    return dataclasses.replace(
        run, roles=configs.RolesConfig(student=role("student", True), teacher=role("teacher", False),
                                       critic=role("critic", True)),
        training=dataclasses.replace(run.training, **t),
        data=configs.DataConfig(path=(str(world["text"] if method == "dmd2" else world["data"]),)),
        method=method_cfg, tracking=configs.TrackingConfig(wandb_mode="disabled"))


def inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, cfg.in_channels, 2, 4, 4, generator=g), torch.tensor([700.0, 250.0]),
            torch.randn(2, 7, cfg.text_dim, generator=g))


def diffusers_with_lora(model, folder, weight_name=None, **more):
    """diffusers' own path: a WanPipeline around the source transformer, load_lora_weights(folder)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=UniPCMultistepScheduler(),
                       transformer=WanTransformer3DModel.from_pretrained(model / "transformer"))
    kwargs = {} if weight_name is None else {"weight_name": weight_name}
    pipe.load_lora_weights(str(folder), **kwargs, **more)
    return pipe.transformer


def forward(module, x, t, ctx):
    with torch.no_grad():
        return module(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]


def test_lora_finetune_equals_diffusers_load_lora_weights_and_the_merged_export(world, tmp_path):
    from diffusers import WanTransformer3DModel

    out = trainer.run("finetune", lora_cfg(world, "finetune", tmp_path / "run"))
    trees, meta = checkpoint.load(out / "checkpoint-3")
    adapters = trees["student"]
    assert all(".lora_A." in k or ".lora_B." in k for k in adapters) and len(adapters) == 2 * 2 * 10
    assert adapters["blocks.0.attn1.to_q.lora_B.weight"].abs().max() > 0  # it trained
    cfg, base = wan.load(world["model"])
    x, t, ctx = inputs(cfg)
    ours = wan.apply(lora.combine(base, adapters, ALPHA / RANK), cfg, x, t, ctx)
    assert rel(ours, wan.apply(base, cfg, x, t, ctx)) > 1e-3  # the adapters change the output
    export = out / "export"
    ref = forward(diffusers_with_lora(world["model"], export / "lora"), x, t, ctx)
    assert rel(ours, ref) < 1e-5
    merged = forward(WanTransformer3DModel.from_pretrained(export / "transformer"), x, t, ctx)
    assert rel(merged, ref) < 1e-5
    comfy = forward(diffusers_with_lora(world["model"], export / "lora", lora.ORIGINAL_FILE), x, t, ctx)
    assert rel(comfy, ref) < 1e-5

    # a kohya / musubi file written here loads, frozen, onto a role and into diffusers alike
    kohya = kohya_file(tmp_path / "kohya.safetensors", adapters, ALPHA / RANK, cfg)
    frozen = lora.merge_pairs(base, lora.read(kohya, wan.param_shapes(cfg), wan.original_names(cfg)))
    assert rel(wan.apply(frozen, cfg, x, t, ctx), ref) < 1e-5
    assert rel(forward(diffusers_with_lora(world["model"], tmp_path, "kohya.safetensors"), x, t, ctx), ref) < 1e-5

    # train.py sample from the LoRA checkpoint samples the merged model, as from the export
    from fvfunc import sample

    sample_cfg = configs.SampleRun(model=str(out / "checkpoint-3"))
    fam, _, _, params, _ = sample.load_model(sample_cfg, "cpu")
    assert rel(wan.apply(params, cfg, x, t, ctx), ref) < 1e-5


def test_continue_training_from_a_lora_file_starts_at_its_model(world, tmp_path):
    cfg, base = wan.load(world["model"])
    adapters = random_adapters(cfg, seed=3)
    f = lora.write_original(tmp_path / "c.safetensors", adapters, 0.5, wan.original_names(cfg))  # alpha 2, rank 4
    run = lora_cfg(world, "finetune", tmp_path / "run", max_steps=1, lr=0.0)
    run = dataclasses.replace(run, roles=dataclasses.replace(run.roles, student=dataclasses.replace(
        run.roles.student, lora=dataclasses.replace(run.roles.student.lora, init=str(f)))))
    out = trainer.run("finetune", run)
    trained = checkpoint.load(out / "checkpoint-1")[0]["student"]
    x, t, ctx = inputs(cfg)
    want = wan.apply(lora.merge(base, adapters, 0.5), cfg, x, t, ctx)
    assert rel(wan.apply(lora.combine(base, trained, ALPHA / RANK), cfg, x, t, ctx), want) < 1e-5


def test_dmd2_with_lora_student_and_critic_shares_one_base_and_resumes_exactly(world, tmp_path):
    from fvfunc import distributed, roles
    from fvfunc.losses import METHODS

    run = lora_cfg(world, "dmd2", tmp_path / "full", roles=("student", "critic"), max_steps=4, checkpoint_every=2)
    built = roles.build(run, METHODS["dmd2"], distributed.init("cpu"))
    teacher, student, critic = built["teacher"], built["student"], built["critic"]
    assert student.base is critic.base is teacher.params  # one base in memory, not three
    assert set(student.params) == set(critic.params) and all("lora_" in k for k in student.params)

    full = trainer.run("dmd2", run)
    half = tmp_path / "half"
    trainer.run("dmd2", dataclasses.replace(run, training=dataclasses.replace(run.training, output_dir=str(half),
                                                                             max_steps=2)))
    trainer.run("dmd2", dataclasses.replace(run, training=dataclasses.replace(run.training, output_dir=str(half),
                                                                             resume="latest")))
    a, _ = checkpoint.load(full / "checkpoint-4")
    b, _ = checkpoint.load(half / "checkpoint-4")
    assert sorted(a) == sorted(b) == ["critic", "critic.opt", "state", "student", "student.opt"]
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    # only adapters and their optimizer states are saved: no frozen weight
    saved = sum(v.numel() for tree in a.values() for v in tree.values())
    assert saved < sum(v.numel() for v in teacher.params.values())
    assert all("lora_" in k for k in a["student.opt"] if k != "step")


def test_kd_trains_a_lora_student(world, tmp_path):
    # kd from the teacher's own trajectories: a LoRA student moves, its checkpoint holds adapters
    run = lora_cfg(world, "kd", tmp_path / "run", max_steps=2, checkpoint_every=2)
    run = dataclasses.replace(run, data=configs.DataConfig(path=(str(world["text"]),)),
                              method=dataclasses.replace(run.method, t_list=(1000, 500), teacher_steps=2,
                                                         latent_shape=(2, 4, 4)))
    out = trainer.run("kd", run)
    student = checkpoint.load(out / "checkpoint-2")[0]["student"]
    assert all("lora_" in k for k in student) and any(v.abs().max() > 0 for k, v in student.items() if "lora_B" in k)
    assert (out / "export" / "lora" / lora.DIFFUSERS_FILE).is_file()


@pytest.mark.parametrize("change, message", [
    (dict(targets=("attn1.to_qq",)), "roles.student.lora.targets: 'attn1.to_qq' matches no linear"),
    (dict(rank=64), "roles.student.lora.rank 64 is larger than the layer"),
    (dict(init="missing.safetensors"), "roles.student.lora.init: missing.safetensors: LoRA file does not exist"),
])
def test_bad_lora_settings_fail_before_models_load(world, tmp_path, change, message):
    run = lora_cfg(world, "finetune", tmp_path / "run")
    run = dataclasses.replace(run, roles=dataclasses.replace(run.roles, student=dataclasses.replace(
        run.roles.student, lora=dataclasses.replace(run.roles.student.lora, **change))))
    with pytest.raises(ConfigError, match=message):
        trainer.run("finetune", run)
    assert not (tmp_path / "run" / "checkpoint-3").exists()


def test_lora_on_a_frozen_role_and_foreign_files_are_refused(world, tmp_path):
    run = lora_cfg(world, "dmd2", tmp_path / "run", roles=("teacher",))
    with pytest.raises(ConfigError, match="roles.teacher.lora.rank 4: the dmd2 method does not train roles.teacher"):
        trainer.run("dmd2", run)
    other = tiny.tiny_config(num_layers=3)
    f = lora.write_diffusers(tmp_path / "big.safetensors", random_adapters(other), 1.0)
    run = lora_cfg(world, "dmd2", tmp_path / "run2", roles=())
    run = dataclasses.replace(run, roles=dataclasses.replace(run.roles, teacher=dataclasses.replace(
        run.roles.teacher, lora=configs.LoraConfig(frozen=(f"{f}:0.5",)))))
    with pytest.raises(ConfigError, match=r"roles.teacher.lora.frozen: .*big.safetensors: "
                                          r"transformer.blocks.2.\S+ names no linear"):
        trainer.run("dmd2", run)


def test_lora_flags_and_the_run_file_round_trip():
    from fvfunc import cli, config_file

    method, cfg = cli.parse(["finetune", "--roles.student.path", "S", "--roles.student.lora.rank", "16",
                             "--roles.student.lora.alpha", "8", "--roles.student.lora.targets", "attn1.*",
                             "--roles.student.lora.frozen", "style.safetensors:0.7"])
    want = configs.LoraConfig(rank=16, alpha=8.0, targets=("attn1.*",), frozen=("style.safetensors:0.7",))
    assert cfg.roles.student.lora == want
    _, again = config_file.from_dict(config_file.dump(method, cfg), method)
    assert again.roles.student.lora == want
    assert lora.parse_frozen("style.safetensors:0.7") == ("style.safetensors", 0.7)
    assert lora.parse_frozen("C:/loras/style.safetensors") == ("C:/loras/style.safetensors", 1.0)
