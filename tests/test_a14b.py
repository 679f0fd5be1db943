"""Wan2.2 A14B: a role made of two experts routed by the noise level (fvfunc/experts.py), against
diffusers' WanPipeline with transformer_2, through sampling, finetune, DMD2, resume and export."""

import json

import pytest
import torch

import configs
from fvfunc import checkpoint, cli, distributed, experts, random, roles, trainer
from fvfunc.losses import METHODS
from fvfunc.losses.flow_matching import sigmas_of
from fvfunc.models import wan
from fvfunc.testing import tiny
from fvfunc.testing.pipeline import rel

BOUNDARY = 0.875
NAMES = ("transformer", "transformer_2")
PROMPTS = ["a cat runs on the beach", "a red bird flies over the sea at night"]
NEGATIVE = "blurry low quality static"
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2)


def write_a14b(root, seeds=(1, 2)):
    """A tiny Wan2.2-A14B-like pipeline made by diffusers: two random experts, boundary 0.875, a tiny umT5,
    tokenizer and VAE, Wan's UniPC; saved by WanPipeline.save_pretrained."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    parts = root.parent / f"{root.name}-parts"
    tiny.write_vae(parts)
    tiny.write_text_encoder(parts)
    state = torch.get_rng_state()  # diffusers initialises from the global RNG: restore it after
    try:
        models = []
        for s in seeds:
            torch.manual_seed(s)
            m = WanTransformer3DModel(**TINY)
            with torch.no_grad():  # diffusers zero-initialises nothing here, but make the experts far apart
                for p in m.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            models.append(m)
    finally:
        torch.set_rng_state(state)
    scheduler = UniPCMultistepScheduler.from_config({k: v for k, v in tiny.WAN21_SCHEDULER.items()
                                                     if not k.startswith("_")})
    pipe = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(parts / "tokenizer"),
                       text_encoder=UMT5EncoderModel.from_pretrained(parts / "text_encoder"),
                       vae=AutoencoderKLWan.from_pretrained(parts / "vae"), scheduler=scheduler,
                       transformer=models[0], transformer_2=models[1], boundary_ratio=BOUNDARY)
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    return write_a14b(tmp_path_factory.mktemp("a14b") / "pipe")


def test_the_folder_is_a_pair(a14b):
    index = json.loads((a14b / "model_index.json").read_text())
    assert index["boundary_ratio"] == BOUNDARY and index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    assert wan.experts(a14b) == (NAMES, BOUNDARY)
    cfg, pair, params = roles.load_model(wan.FAMILY, a14b)
    assert pair.names == NAMES and pair.boundary == BOUNDARY and cfg == wan.load_config(a14b / "transformer")
    for n in NAMES:
        assert experts.split(params, NAMES)[n].keys() == wan.param_shapes(cfg).keys()


def test_route_is_wan_pipelines_rule():
    t = torch.tensor([1000.0, 875.0, 874.999, 500.0, 0.0])
    assert experts.route(t, BOUNDARY).tolist() == [0, 0, 1, 1, 1]
    pair = experts.Experts(NAMES, BOUNDARY)
    assert experts.hit(torch.tensor([900.0, 950.0]), pair) == ("transformer",)
    assert experts.hit(t, pair) == NAMES
    w = experts.guidance(4.0, 2.0, BOUNDARY)
    assert w(t).tolist() == [4.0, 4.0, 2.0, 2.0, 2.0] and experts.guidance(4.0, None, BOUNDARY) == 4.0
    assert experts.guidance(1.0, 3.0, BOUNDARY) == 1.0  # WanPipeline: no CFG at all when guidance_scale is 1


@pytest.mark.parametrize("together", [False, True])
def test_pair_apply_routes_each_sample_forward_and_gradient(a14b, together):
    """A batch across the boundary: each sample's v (and the gradient of a loss of all of them) is the one of
    its own expert alone, a plain per-sample loop of wan.apply."""
    cfg, pair, params = roles.load_model(wan.FAMILY, a14b)
    pair = pair._replace(configs=(cfg, cfg))
    parts = experts.split(params, NAMES)
    apply = experts.make_apply([lambda p, *a: wan.apply(p, cfg, *a)] * 2, pair, together=together)
    x = random.normal(random.key(0), (4, 16, 2, 4, 4))
    ctx = random.normal(random.key(1), (4, 5, 32))
    t = torch.tensor([200.0, 950.0, 874.0, 875.0])
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    v = apply(leaves, x, t, ctx)
    (v.square().mean()).backward()
    want, grads = [], {n: {k: torch.zeros_like(p) for k, p in parts[n].items()} for n in NAMES}
    for b in range(4):
        n = NAMES[0] if t[b] >= BOUNDARY * 1000 else NAMES[1]
        mine = {k: p.clone().requires_grad_() for k, p in parts[n].items()}
        out = wan.apply(mine, cfg, x[b:b + 1], t[b:b + 1], ctx[b:b + 1])
        (out.square().sum() / v.numel()).backward()
        for k in mine:
            grads[n][k] += mine[k].grad
        want.append(out.detach())
    assert rel(v.detach(), torch.cat(want)) < 1e-6
    got = {k: leaves[k].grad for k in leaves}
    ref = experts.join(grads)
    assert max(rel(got[k], ref[k]) for k in ref if ref[k].norm() > 0) < 1e-5


def test_sampling_equals_wan_pipeline_with_transformer_2(a14b, tmp_path):
    """train.py sample of the pair folder = WanPipeline (transformer for t >= 875, transformer_2 below, each with
    its own guidance scale) on the same prompts, negative prompt and latents; UniPC, 6 steps crossing 875."""
    from diffusers import WanPipeline
    from safetensors.torch import load_file, save_file

    noise = random.normal(random.key(11), (2, 16, 2, 4, 6))
    pipe = WanPipeline.from_pretrained(a14b)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, latents=noise.clone(), height=32, width=48, num_frames=5,
                num_inference_steps=6, guidance_scale=4.5, guidance_scale_2=2.5, output_type="latent").frames
    pipe.scheduler.set_timesteps(6)
    t = pipe.scheduler.timesteps
    assert (t >= 875).any() and (t < 875).any()  # the walk crosses the boundary
    save_file({"noise": noise}, tmp_path / "noise.safetensors")
    argv = ["sample", "--model", str(a14b), "--prompt", *PROMPTS, "--negative-prompt", NEGATIVE,
            "--noise", str(tmp_path / "noise.safetensors"), "--sampler.num-steps", "6", "--sampler.shift", "3",
            "--sampler.guidance-scale", "4.5", "--sampler.guidance-scale-2", "2.5", "--output-dir",
            str(tmp_path / "out"), "--device", "cpu", "--precision", "float32", "--fps", "4"]
    assert cli.main(argv) == 0
    got = torch.stack([load_file(tmp_path / "out" / f"sample-{i}.safetensors")["latents"] for i in range(2)])
    assert rel(got, want) <= 1e-5, rel(got, want)
    # the routing and the second scale both matter: one expert alone, or one scale, is another video
    kwargs = dict(prompt=PROMPTS, negative_prompt=NEGATIVE, height=32, width=48, num_frames=5, num_inference_steps=6,
                  guidance_scale=4.5, output_type="latent")
    assert rel(got, pipe(latents=noise.clone(), guidance_scale_2=4.5, **kwargs).frames) > 1e-3
    pipe.transformer_2 = pipe.transformer
    assert rel(got, pipe(latents=noise.clone(), guidance_scale_2=2.5, **kwargs).frames) > 1e-3


def args_of(method, student, out, data, *extra, steps=4, batch=2):
    return [method, "--roles.student.path", str(student), "--data.path", str(data), "--training.output-dir",
            str(out), "--training.max-steps", str(steps), "--training.batch-size", str(batch),
            "--training.checkpoint-every", "2", "--training.precision", "float32", "--training.device", "cpu",
            "--tracking.wandb-mode", "disabled", "--training.lr", "1e-3", *extra]


def same_checkpoints(a, b):
    ta, _ = checkpoint.load(a)
    tb, _ = checkpoint.load(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].keys() == tb[name].keys(), name
        for k in ta[name]:
            assert torch.equal(ta[name][k], tb[name][k]), (name, k)
    return ta


def exported_params(folder):
    """Each expert of an export as WanPipeline.from_pretrained loads it."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder)
    assert pipe.config.boundary_ratio == BOUNDARY and pipe.transformer_2 is not None
    return {n: {k: v.detach() for k, v in getattr(pipe, n).state_dict().items()} for n in NAMES}


def test_finetune_trains_the_routed_expert_resumes_exactly_and_exports_two_experts(a14b, world, tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    validation = ["--validation.every", "4", "--validation.sampler.num-steps", "3",
                  "--validation.sampler.guidance-scale", "3", "--validation.sampler.guidance-scale-2", "2",
                  "--validation.negative-prompt", NEGATIVE]
    assert cli.main(args_of("finetune", a14b, full, world["data"], *validation)) == 0
    assert len(list((full / "videos").glob("step-000004-prompt-*.mp4"))) == 2  # the pair samples with both scales
    assert cli.main(args_of("finetune", a14b, half, world["data"], steps=2)) == 0
    assert cli.main(args_of("finetune", a14b, half, world["data"], "--training.resume", "latest")) == 0
    trees = same_checkpoints(full / "checkpoint-4", half / "checkpoint-4")
    # each expert stepped on the steps whose global batch had a sample at its noise levels, with its own state
    step_key = random.split(random.key(0), 2)[1]
    counts = dict.fromkeys(NAMES, 0)
    pair = experts.Experts(NAMES, BOUNDARY)
    for s in range(4):
        for n in experts.hit(1000 * sigmas_of(random.fold_in(step_key, s), range(2), configs.FinetuneConfig()), pair):
            counts[n] += 1
    assert {n: int(trees["student.opt"][f"{n}/step"]) for n in NAMES} == counts
    assert 0 < counts["transformer"] < 4 and counts["transformer_2"] > 0  # both trained, not every step
    _, _, start = roles.load_model(wan.FAMILY, a14b)
    for n in NAMES:
        assert any(not torch.equal(trees["student"][f"{n}/{k}"], v) for k, v in experts.split(start, NAMES)[n].items())
    # the export is a two-expert folder WanPipeline loads as is, each expert the trained one
    loaded = exported_params(full / "export")
    for n in NAMES:
        for k, v in loaded[n].items():
            assert torch.equal(v, trees["student"][f"{n}/{k}"]), (n, k)
    # train.py sample of the checkpoint (the pair read back from its trees) = of the exported folder
    from safetensors.torch import load_file

    latents = {}
    for name, model in (("ckpt", full / "checkpoint-4"), ("export", full / "export")):
        argv = ["sample", "--model", str(model), "--prompt", PROMPTS[0], "--sampler.num-steps", "3",
                "--sampler.guidance-scale", "3", "--sampler.guidance-scale-2", "2", "--latent-shape", "2", "4", "4",
                "--output-dir", str(tmp_path / name), "--device", "cpu", "--precision", "float32", "--fps", "4"]
        assert cli.main(argv) == 0
        latents[name] = load_file(tmp_path / name / "sample-0.safetensors")["latents"]
    assert torch.equal(latents["ckpt"], latents["export"])


def test_finetune_of_one_chosen_expert(a14b, world, tmp_path):
    out = tmp_path / "one"
    assert cli.main(args_of("finetune", a14b, out, world["data"], "--method.expert", "transformer", steps=2)) == 0
    trees, _ = checkpoint.load(out / "checkpoint-2")
    _, _, start = roles.load_model(wan.FAMILY, a14b)
    low = [k for k in start if k.startswith("transformer_2/")]
    assert all(torch.equal(trees["student"][k], start[k]) for k in low)  # frozen
    assert int(trees["student.opt"]["transformer/step"]) == 2
    assert not any(k.startswith("transformer_2/") for k in trees["student.opt"])  # no optimizer state for it
    cfg = configs.FinetuneConfig(expert="transformer")
    pair = experts.Experts(NAMES, BOUNDARY)
    sig = sigmas_of(random.key(5), range(64), cfg, within=(0, pair))
    assert (sig >= BOUNDARY).all() and sig.min() < 0.95  # the scheme's sigma within the high-noise range
    assert cli.main(args_of("finetune", world["model"], tmp_path / "x", world["data"], "--method.expert",
                            "transformer")) == 2
    # in bfloat16 the frozen expert is held (and saved) in bfloat16, the trained one keeps fp32 masters
    assert cli.main(args_of("finetune", a14b, tmp_path / "bf16", world["data"], "--method.expert", "transformer_2",
                            "--training.precision", "bfloat16", steps=1)) == 0
    saved, _ = checkpoint.load(tmp_path / "bf16" / "checkpoint-1")
    assert {v.dtype for k, v in saved["student"].items() if k.startswith("transformer/")} == {torch.bfloat16}
    assert {v.dtype for k, v in saved["student"].items() if k.startswith("transformer_2/")} == {torch.float32}


def dmd2_args(student, teacher, critic, out, data, *extra, steps=3):
    return [*args_of("dmd2", student, out, data, steps=steps), "--roles.teacher.path", str(teacher),
            "--roles.critic.path", str(critic), "--method.latent-shape", "2", "4", "4",
            "--method.generator-update-interval", "1", "--method.dmd-denoising-steps", "1000", "750",
            "--method.min-timestep-ratio", "0.5", *extra]


def test_dmd2_of_expert_pairs_crosses_the_boundary_resumes_exactly_and_exports(a14b, world, tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    assert cli.main(dmd2_args(a14b, a14b, a14b, full, world["text"], steps=4)) == 0
    assert cli.main(dmd2_args(a14b, a14b, a14b, half, world["text"], steps=2)) == 0
    assert cli.main(dmd2_args(a14b, a14b, a14b, half, world["text"], "--training.resume", "latest",
                              steps=4)) == 0
    trees = same_checkpoints(full / "checkpoint-4", half / "checkpoint-4")
    steps = {r: {n: int(trees[f"{r}.opt"][f"{n}/step"]) for n in NAMES} for r in ("student", "critic")}
    assert all(v > 0 for r in steps.values() for v in r.values()), steps  # the steps 1000, 750 cross 875
    loaded = exported_params(full / "export")
    for n in NAMES:
        assert all(torch.equal(v, trees["student"][f"{n}/{k}"]) for k, v in loaded[n].items())


def test_dmd2_distils_a_pair_into_one_model(a14b, world, tmp_path):
    out = tmp_path / "single"
    assert cli.main(dmd2_args(world["model"], a14b, world["model"], out, world["text"], steps=2)) == 0
    trees, _ = checkpoint.load(out / "checkpoint-2")
    assert not any("/" in k for k in trees["student"]) and not any("/" in k for k in trees["critic"])
    assert (out / "export" / "transformer" / "config.json").is_file()


def test_lora_student_and_critic_pairs_share_the_teachers_frozen_experts(a14b, world, tmp_path):
    method, run = cli.parse(dmd2_args(a14b, a14b, a14b, tmp_path / "lora", world["text"], "--roles.student.lora.rank",
                                      "4", "--roles.critic.lora.rank", "4", "--roles.student.dtype", "bfloat16",
                                      "--roles.critic.dtype", "bfloat16", "--training.precision", "bfloat16",
                                      steps=2))
    built = roles.build(run, METHODS[method], distributed.init("cpu"))
    teacher, student, critic = built["teacher"], built["student"], built["critic"]
    assert teacher.params.keys() == student.base.keys() == critic.base.keys()
    assert all(student.base[k] is teacher.params[k] is critic.base[k] for k in teacher.params)  # held once
    assert all("lora_" in k and k.split("/")[0] in NAMES for k in student.params)
    assert trainer.run(method, run) == tmp_path / "lora"
    for n in NAMES:
        assert (tmp_path / "lora" / "export" / "lora" / n / "pytorch_lora_weights.safetensors").is_file()
    exported = exported_params(tmp_path / "lora" / "export")
    # train.py sample of the LoRA pair's checkpoint merges each expert's adapters into its own base
    from fvfunc import sample

    fam, _, pair, merged, _ = sample.load_model(configs.SampleRun(model=str(tmp_path / "lora" / "checkpoint-2")),
                                                "cpu")
    assert pair.names == NAMES and merged.keys() == teacher.params.keys()
    for n in NAMES:
        k = "blocks.0.attn1.to_q.weight"
        assert rel(merged[f"{n}/{k}"].float(), exported[n][k].float()) < 1e-2  # (the run's base is bf16)
        assert not torch.equal(merged[f"{n}/{k}"].float(), teacher.params[f"{n}/{k}"].float())


def test_a_pair_without_boundary_is_one_error(a14b, world, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(a14b, broken)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "boundary_ratio"}))
    assert cli.main(args_of("finetune", broken, tmp_path / "run", world["data"])) == 2
    err = capsys.readouterr().err
    assert "model_index.json: a two-expert pipeline (transformer_2) needs boundary_ratio" in err
    assert not (tmp_path / "run").exists()


def test_lora_files_for_a_pair_are_one_per_expert(a14b, world, tmp_path, capsys):
    """A pair's lora.init and lora.frozen take a folder of one LoRA per expert: a LoRA pair's own export
    (export/lora/<expert>/) or <expert>.safetensors files (e.g. a high-noise and a low-noise LoRA); each
    expert gets its own, and anything else is one error before models load."""
    import shutil

    from fvfunc import lora

    trained = tmp_path / "trained"
    assert cli.main(args_of("finetune", a14b, trained, world["data"], "--roles.student.lora.rank", "4", steps=2)) == 0
    exported = exported_params(trained / "export")  # each expert with its adapters merged in
    files = tmp_path / "files"  # the same adapters as two loose files
    files.mkdir()
    for n in NAMES:
        shutil.copy(trained / "export" / "lora" / n / lora.DIFFUSERS_FILE, files / f"{n}.safetensors")
    base = {n: wan.load(a14b / n)[1] for n in NAMES}
    k = "blocks.1.attn1.to_q.weight"
    assert not torch.equal(exported["transformer"][k], base["transformer"][k])
    for source in (trained / "export" / "lora", files):
        # init: the student's adapters are the files', each expert its own
        _, run = cli.parse(args_of("finetune", a14b, tmp_path / "x", world["data"], "--roles.student.lora.rank", "4",
                                   "--roles.student.lora.init", str(source), steps=1))
        student = roles.build(run, METHODS["finetune"], distributed.init("cpu"))["student"]
        adapters, bases = experts.split(student.params, NAMES), experts.split(student.base, NAMES)
        for n in NAMES:
            merged = lora.merge(bases[n], adapters[n], student.lora_scale)
            assert rel(merged[k], exported[n][k]) <= 1e-6, (source, n)
        # frozen: merged into each expert's weights
        _, run = cli.parse(args_of("finetune", a14b, tmp_path / "y", world["data"], "--roles.student.lora.frozen",
                                   str(source), steps=1))
        params = experts.split(roles.build(run, METHODS["finetune"], distributed.init("cpu"))["student"].params, NAMES)
        for n in NAMES:
            assert rel(params[n][k], exported[n][k]) <= 1e-6, (source, n)
    one_file = str(files / "transformer.safetensors")
    for extra in (["--roles.student.lora.rank", "4", "--roles.student.lora.init", one_file],
                  ["--roles.student.lora.frozen", one_file]):
        assert cli.main(args_of("finetune", a14b, tmp_path / "run", world["data"], *extra)) == 2
        err = capsys.readouterr().err
        assert "has no LoRA for the expert transformer: an expert pair takes a folder of one LoRA per expert" in err
        assert err.count("error:") == 1
    assert not (tmp_path / "run").exists()


def test_one_expert_folder_trains_as_one_model(a14b, world, tmp_path):
    out = tmp_path / "low"
    assert cli.main(args_of("finetune", a14b / "transformer_2", out, world["data"], steps=1)) == 0
    index = json.loads((out / "export" / "model_index.json").read_text())
    assert index["transformer_2"] == [None, None] and index["boundary_ratio"] is None


def test_dmd2_of_sharded_pairs_over_two_processes_equals_one_process(a14b, world, tmp_path):
    """ZeRO-3 expert pairs (every expert of student, teacher and critic split over 2 gloo ranks, both experts
    running on every call so the ranks gather alike) give one process's numbers; both experts of each role train."""
    import dataclasses

    from test_distributed import assert_trees_close, final, make_cfg, spawn, train

    def cfg(out, sharding):
        run = make_cfg(world | {"model": a14b}, "dmd2", out, sharding=sharding, max_steps=2, ema_decay=0.0)
        return dataclasses.replace(run, method=dataclasses.replace(run.method, dmd_denoising_steps=(1000, 750),
                                                                   min_timestep_ratio=0.5,
                                                                   generator_update_interval=1))

    one = trainer.run("dmd2", cfg(tmp_path / "one", "replicated"))
    spawn(train, "dmd2", cfg(tmp_path / "two", "sharded"))
    a, b = final(one), final(tmp_path / "two")
    assert all(int(a[f"{r}.opt"][f"{n}/step"]) > 0 for r in ("student", "critic") for n in NAMES)
    assert_trees_close(b, a, 5e-4)


def test_each_expert_trains_as_if_alone(a14b):
    """The pair's finetune, one sample a step, equals two separate one-model finetunes, each stepped (with its
    own AdamW state) on exactly the steps whose noise level routes to it: bitwise."""
    training = configs.TrainingConfig(lr=1e-3, max_steps=8, precision="float32", device="cpu", batch_size=1)
    spec = METHODS["finetune"]
    run = tiny.run_of(spec, configs.FinetuneConfig(cfg_rate=0.3), training,
                      roles=configs.RolesConfig(student=configs.RoleConfig(path=str(a14b), trainable=True)))
    process = distributed.init("cpu")
    pair = roles.build(run, spec, process)["student"]
    alone = {n: roles.place("student", wan.FAMILY, *wan.load(a14b / n), training, process, False, True)
             for n in NAMES}
    method = spec.make(run, {"student": pair})
    singles = {n: spec.make(run, {"student": r}) for n, r in alone.items()}
    state = method.init({"student": pair.params}, random.key(3))
    refs = {n: singles[n].init({"student": r.params}, random.key(3)) for n, r in alone.items()}
    g = torch.Generator().manual_seed(0)
    routed = []
    for s in range(8):
        batch = {"latents": torch.randn(1, 16, 2, 4, 4, generator=g), "text": torch.randn(1, 5, 32, generator=g),
                 "sample_index": torch.arange(1)}
        sigma = sigmas_of(random.fold_in(random.key(3), s), range(1), run.method)
        n = NAMES[int(experts.route(1000 * sigma, BOUNDARY))]
        routed.append(n)
        state, _ = method.step(state, batch)
        refs[n], _ = singles[n].step(refs[n]._replace(step=s), batch)
    assert set(routed) == set(NAMES), routed  # both experts got steps
    got = experts.split(state.params["student"], NAMES)
    for n in NAMES:
        assert all(torch.equal(got[n][k], v) for k, v in refs[n].params["student"].items()), n
        assert int(state.opt["student"][n].step) == routed.count(n) == int(refs[n].opt["student"].step)


def test_fastvideo_run_file_boundary_ratio_is_checked_against_the_folder(a14b):
    from fvfunc import config_file

    def raw(b):
        return {"recipe": {"family": "wan", "method": "finetune"},
                "roles": {"student": {"family": "wan", "path": str(a14b), "trainable": True}},
                "pipeline_config": {"flow_shift": 3.0, "boundary_ratio": b}}

    method, run = config_file.from_dict(raw(BOUNDARY))
    assert method == "finetune" and run.roles.student.path == str(a14b)
    with pytest.raises(config_file.ConfigError, match=r"pipeline_config.boundary_ratio 0.9: roles.student.path "
                                                      r".* switches experts at 0.875"):
        config_file.from_dict(raw(0.9))


def test_dmd2_teacher_pair_guides_each_expert_with_its_own_weight(a14b):
    from fvfunc import runner
    from fvfunc.losses import dmd2

    cfg, pair, params = roles.load_model(wan.FAMILY, a14b)
    teacher = tiny.role(roles.make_apply(wan.FAMILY, cfg, pair, runner.Options()), trainable=False)
    teacher = teacher._replace(experts=pair)
    x = random.normal(random.key(0), (2, 16, 2, 4, 4))
    ctx, unc = random.normal(random.key(1), (2, 5, 32)), random.normal(random.key(2), (2, 5, 32))
    sigma = torch.tensor([0.95, 0.5])
    m = configs.DMD2Config(real_score_guidance_scale=4.0, real_score_guidance_scale_2=2.0)
    with torch.no_grad():
        got = dmd2.real_score(teacher, params, x, sigma, ctx, unc, dmd2.teacher_guidance(m, teacher))
        for b, w in ((0, 4.0), (1, 2.0)):
            want = dmd2.real_score(teacher, params, x[b:b + 1], sigma[b:b + 1], ctx[b:b + 1], unc[b:b + 1], w)
            assert rel(got[b:b + 1], want) < 1e-6, b
    assert dmd2.teacher_guidance(configs.DMD2Config(), teacher) == configs.DMD2Config().real_score_guidance_scale


def test_kd_from_a_teacher_pair_into_a_student_pair(a14b, world, tmp_path):
    out = tmp_path / "kd"
    argv = [*args_of("kd", a14b, out, world["text"], steps=2), "--roles.teacher.path", str(a14b),
            "--method.t-list", "1000", "500", "--method.teacher-steps", "2", "--method.latent-shape", "2", "4", "4"]
    assert cli.main(argv) == 0
    trees, _ = checkpoint.load(out / "checkpoint-2")
    assert sum(int(trees["student.opt"][f"{n}/step"]) for n in NAMES) >= 2  # t_list 1000, 500 crosses 875
    exported_params(out / "export")


def test_i2v_a14b_sampling_equals_wan_image_to_video_pipeline_with_transformer_2():
    """Wan2.2 I2V-A14B: experts of in = 2 x out + 4 channels (frame mask and first-frame latent, no CLIP
    tokens), boundary 0.9; fvfunc's pair = WanImageToVideoPipeline with transformer_2 and guidance_scale_2."""
    from diffusers import WanImageToVideoPipeline
    from test_i2v import _normalised, _scheduler, _vae, module, params_of

    from configs import SamplerConfig
    from fvfunc import runner
    from fvfunc.validation import generate

    c = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, ffn_dim=24, text_dim=12, freq_dim=8,
             in_channels=2 * 4 + 4, out_channels=4)
    ms = [module(seed=s, **c) for s in (0, 1)]
    cfg = wan.config_from_dict(dict(ms[0].config))
    assert wan.conditions(cfg) == {"first_frame_latent": True}
    vae = _vae(4)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=_scheduler(),
                                   transformer=ms[0], transformer_2=ms[1], boundary_ratio=0.9)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(3)
    B, T, H, W = 2, 3, 4, 6
    noise = torch.randn(B, 4, T, H, W, generator=g)
    text, uncond = torch.randn(B, 8, 12, generator=g), torch.randn(B, 8, 12, generator=g)
    image = torch.rand(1, 3, 8 * H, 8 * W, generator=g)
    ref = pipe(image=image, prompt_embeds=text, negative_prompt_embeds=uncond, latents=noise.clone(), height=8 * H,
               width=8 * W, num_frames=4 * (T - 1) + 1, num_inference_steps=6, guidance_scale=3.0,
               guidance_scale_2=2.0, output_type="latent").frames
    pixels = (image * 2 - 1)[:, :, None]
    video = torch.cat([pixels, pixels.new_zeros(1, 3, 4 * (T - 1), 8 * H, 8 * W)], dim=2)
    cond = {"first_frame_latent": _normalised(vae, video).expand(B, -1, -1, -1, -1)}
    pair = experts.Experts(NAMES, 0.9, (cfg, cfg))
    apply = roles.make_apply(wan.FAMILY, cfg, pair, runner.Options())
    params = experts.join({n: params_of(m) for n, m in zip(NAMES, ms, strict=True)})
    sampler = SamplerConfig(kind="unipc", num_steps=6, shift=3.0, guidance_scale=3.0, guidance_scale_2=2.0)
    got = generate(apply, params, text, (4, T, H, W), sampler, uncond=uncond, noise=noise, cond=cond, boundary=0.9)
    assert rel(got, ref) <= 1e-5, rel(got, ref)


def test_a_second_cfg_weight_for_one_model_is_refused_before_models_load(a14b, world, tmp_path, capsys):
    one = world["model"]
    cases = [
        (args_of("finetune", one, tmp_path / "a", world["data"], "--validation.sampler.guidance-scale-2", "2"),
         "validation.sampler.guidance_scale_2 2 is the low-noise expert's CFG weight"),
        (dmd2_args(one, one, one, tmp_path / "b", world["text"], "--method.real-score-guidance-scale-2", "2"),
         "method.real_score_guidance_scale_2 is the low-noise expert's CFG weight of an expert-pair teacher"),
        (["sample", "--model", str(one), "--prompts", str(world["text"]), "--sampler.guidance-scale-2", "2",
          "--output-dir", str(tmp_path / "c")], "sampler.guidance_scale_2 2 is the low-noise expert's CFG weight"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    ok = dmd2_args(one, a14b, one, tmp_path / "d", world["text"], "--method.real-score-guidance-scale-2", "2",
                   steps=1)
    assert cli.main(ok) == 0
