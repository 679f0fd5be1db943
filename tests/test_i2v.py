"""Image-to-video Wan (Wan2.1 I2V / FLF2V, Wan2.2 TI2V) against diffusers' WanTransformer3DModel."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from fvfunc import runner
from fvfunc.models import wan

TEXT = 512  # diffusers' I2V attention splits the image tokens off the last 512 context tokens


def module(seed=0, **c):
    torch.manual_seed(seed)
    m = WanTransformer3DModel(**c).eval()
    with torch.no_grad():  # randomise everything, pos_embed and norms included
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5))
    return m


I2V = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, ffn_dim=24, text_dim=12, freq_dim=8,
           in_channels=2 * 4 + 4, out_channels=4, image_dim=10, added_kv_proj_dim=16)
FLF2V = dict(I2V, pos_embed_seq_len=2 * 3)
TI2V = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, ffn_dim=24, text_dim=12, freq_dim=8,
            in_channels=6, out_channels=6)
A14B_I2V = {k: v for k, v in I2V.items() if k not in ("image_dim", "added_kv_proj_dim")}
"""One expert of Wan2.2 I2V-A14B: the frame mask and first-frame latent as input channels, no CLIP tokens."""


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def params_of(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def diffusers_i2v_input(x, first, flf2v=False):
    """[x, mask, first_frame_latent] as WanImageToVideoPipeline.prepare_latents builds it."""
    B, _, T, H, W = x.shape
    frames = torch.ones(B, 1, 4 * (T - 1) + 1, H, W)
    frames[:, :, 1:-1 if flf2v else None] = 0
    mask = torch.cat([frames[:, :, :1].repeat_interleave(4, dim=2), frames[:, :, 1:]], dim=2)
    mask = mask.view(B, -1, 4, H, W).transpose(1, 2)
    return torch.cat([x, mask, first], dim=1)


@pytest.mark.parametrize("c", [I2V, FLF2V], ids=["i2v", "flf2v"])
def test_i2v_forward_and_grads_equal_diffusers(c):
    m = module(**c)
    cfg = wan.config_from_dict(dict(m.config))
    assert wan.conditions(cfg) == {"clip_feature": True, "first_frame_latent": True}
    params = params_of(m)
    g = torch.Generator().manual_seed(1)
    B, T, H, W, L = 2, 3, 4, 6, 3
    x = torch.randn(B, 4, T, H, W, generator=g)
    first = torch.randn(B, 4, T + 1, H, W, generator=g)  # a longer stored latent is cropped to x's frames
    t = torch.rand(B, generator=g) * 1000
    ctx = torch.randn(B, TEXT, 12, generator=g)
    images = 2 if c.get("pos_embed_seq_len") else 1
    clip = torch.randn(B * images, L, 10, generator=g)  # diffusers: one row per image
    cond = {"clip_feature": clip.reshape(B, images * L, 10), "first_frame_latent": first}  # fvfunc: per sample
    target = torch.randn(B, 4, T, H, W, generator=g)

    with torch.no_grad():
        ref = m(diffusers_i2v_input(x, first[:, :, :T], images == 2), t, ctx, encoder_hidden_states_image=clip).sample
    out = wan.apply(params, cfg, x, t, ctx, cond)
    assert out.shape == (B, 4, T, H, W)
    assert rel(out, ref) <= 1e-5
    # grads in fp64 (diffusers keeps its LayerNorms and time projection in fp32 even then): in fp32 the
    # tiniest leaves, e.g. the image keys' bias, differ by rounding at ~2e-5 of their size
    d = lambda a: a.double()  # noqa: E731
    m64 = m.double()
    m64.zero_grad()
    ref64 = m64(diffusers_i2v_input(d(x), d(first[:, :, :T]), images == 2), d(t), d(ctx),
                encoder_hidden_states_image=d(clip)).sample
    ((ref64 - d(target)) ** 2).mean().backward()
    ref_grads = {k: p.grad for k, p in m64.named_parameters()}
    cond64 = {k: d(v) for k, v in cond.items()}
    grads = torch.func.grad(lambda p: ((wan.apply(p, cfg, d(x), d(t), d(ctx), cond64) - d(target)) ** 2).mean())(
        {k: d(v) for k, v in params.items()})
    assert grads.keys() == ref_grads.keys()
    worst = max(grads, key=lambda k: rel(grads[k], ref_grads[k]))
    assert rel(grads[worst], ref_grads[worst]) <= 1e-5, worst
    # the runner (remat, math attention) gives the same
    via_runner = runner.forward(wan.FAMILY, params, cfg, x, t, ctx, runner.Options(attention="math", remat="full"),
                                cond)
    assert rel(via_runner, ref) <= 1e-5
    with pytest.raises(ValueError, match="needs the condition 'clip_feature'"):
        wan.apply(params, cfg, x, t, ctx, {"first_frame_latent": first})


def test_ti2v_forward_equals_diffusers_with_expanded_timesteps():
    m = module(**TI2V)
    cfg = wan.config_from_dict({**dict(m.config), "expand_timesteps": True})
    params = params_of(m)
    g = torch.Generator().manual_seed(2)
    B, C, T, H, W = 2, 6, 3, 4, 6
    x = torch.randn(B, C, T, H, W, generator=g)
    image = torch.randn(B, C, 1, H, W, generator=g)
    t = torch.rand(B, generator=g) * 1000
    ctx = torch.randn(B, 7, 12, generator=g)
    # image mode, as WanImageToVideoPipeline(expand_timesteps=True) calls the model
    mask = torch.ones(1, 1, T, H, W)
    mask[:, :, 0] = 0
    model_in = (1 - mask) * image + mask * x
    per_token = (mask[0, 0][:, ::2, ::2].flatten()[None] * t[:, None])  # [B, N]
    with torch.no_grad():
        ref = m(model_in, per_token, ctx).sample
        out = wan.apply(params, cfg, x, t, ctx, {"first_frame_latent": image})
    assert rel(out[:, :, 1:], ref[:, :, 1:]) <= 1e-5
    # the given frame's flow lands x on the image: x0 = x - sigma v is the given frame
    sigma = (t / 1000).view(-1, 1, 1, 1, 1)
    assert rel(x[:, :, :1] - sigma * out[:, :, :1], image) <= 1e-5
    # text-to-video mode (WanPipeline(expand_timesteps=True)): every token at t, the plain forward
    with torch.no_grad():
        ref_t2v = m(x, t[:, None].expand(B, T * H * W // 4), ctx).sample
        out_t2v = wan.apply(params, cfg, x, t, ctx)
    assert rel(out_t2v, ref_t2v) <= 1e-5
    # grads through the image mode equal diffusers' on the generated frames (fp64, as above)
    d = lambda a: a.double()  # noqa: E731
    target = torch.randn(B, C, T - 1, H, W, generator=g, dtype=torch.float64)
    m64 = m.double()
    m64.zero_grad()
    ((m64(d(model_in), d(per_token), d(ctx)).sample[:, :, 1:] - target) ** 2).mean().backward()
    ref_grads = {k: p.grad for k, p in m64.named_parameters()}
    grads = torch.func.grad(lambda p: ((wan.apply(p, cfg, d(x), d(t), d(ctx), {"first_frame_latent": d(image)})
                                        [:, :, 1:] - target) ** 2).mean())({k: d(v) for k, v in params.items()})
    worst = max(grads, key=lambda k: rel(grads[k], ref_grads[k]))
    assert rel(grads[worst], ref_grads[worst]) <= 1e-5, worst


# ------------------------------------------------------------------------- sampling vs the pipelines


def _vae(z_dim):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
                            temperal_downsample=[False, True, True], latents_mean=[0.1 * i for i in range(z_dim)],
                            latents_std=[1.0 + 0.1 * i for i in range(z_dim)]).eval()


def _scheduler():
    from diffusers import UniPCMultistepScheduler

    from fvfunc.testing.tiny import WAN21_SCHEDULER

    return UniPCMultistepScheduler.from_config(WAN21_SCHEDULER)


def _normalised(vae, video):
    with torch.no_grad():
        z = vae.encode(video).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return (z - mean) / std


def _fvfunc_sample(params, cfg, noise, text, uncond, cond, steps, scale):
    from configs import SamplerConfig
    from fvfunc import samplers as S

    def fn(x, t, c):  # guided batches cond and uncond: the condition goes with both
        n = x.shape[0] // noise.shape[0]
        return wan.apply(params, cfg, x, t, c, {k: v.repeat(n, *[1] * (v.ndim - 1)) for k, v in cond.items()})

    walk = S.schedule(SamplerConfig(kind="unipc", num_steps=steps, shift=3.0))
    with torch.no_grad():
        x = S.sample(S.guided(fn, text, uncond, scale), noise, walk.sigmas, "unipc", timesteps=walk.timesteps)
    return wan.impose(cfg, x, cond)


@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_sampling_equals_wan_image_to_video_pipeline(kind):
    from diffusers import WanImageToVideoPipeline

    c = I2V if kind == "i2v" else TI2V
    m = module(**c)
    expand = kind == "ti2v"
    cfg = wan.config_from_dict({**dict(m.config), "expand_timesteps": expand})
    C = cfg.out_channels
    vae = _vae(C)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=_scheduler(),
                                   transformer=m, expand_timesteps=expand)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(3)
    B, T, H, W = 2, 3, 4, 6
    noise = torch.randn(B, C, T, H, W, generator=g)
    text, uncond = torch.randn(B, TEXT, 12, generator=g), torch.randn(B, TEXT, 12, generator=g)
    image = torch.rand(1, 3, 8 * H, 8 * W, generator=g)  # in [0, 1], as the pipeline's processor takes it
    clip = torch.randn(1, 3, 10, generator=g)
    steps, scale = 4, 3.0
    pipe.encode_image = lambda image, device: clip  # the CLIP tokens given (the pipeline refuses image + embeds)
    ref = pipe(image=image, prompt_embeds=text, negative_prompt_embeds=uncond, latents=noise.clone(),
               height=8 * H, width=8 * W, num_frames=4 * (T - 1) + 1, num_inference_steps=steps, guidance_scale=scale,
               output_type="latent").frames
    pixels = (image * 2 - 1)[:, :, None]  # the pipeline's preprocess: [-1, 1], one frame
    if kind == "i2v":
        video = torch.cat([pixels, pixels.new_zeros(1, 3, 4 * (T - 1), 8 * H, 8 * W)], dim=2)
        cond = {"clip_feature": clip.expand(B, -1, -1),
                "first_frame_latent": _normalised(vae, video).expand(B, -1, -1, -1, -1)}
    else:
        cond = {"first_frame_latent": _normalised(vae, pixels).expand(B, -1, -1, -1, -1)}
    out = _fvfunc_sample(params_of(m), cfg, noise, text, uncond, cond, steps, scale)
    assert rel(out, ref) <= 1e-5
    if kind == "ti2v":  # the first frame is the image's latent
        assert rel(out[:, :, :1], cond["first_frame_latent"]) <= 1e-5


def test_ti2v_text_to_video_equals_wan_pipeline():
    from diffusers import WanPipeline

    m = module(**TI2V)
    cfg = wan.config_from_dict({**dict(m.config), "expand_timesteps": True})
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=_vae(6), scheduler=_scheduler(), transformer=m,
                       expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(2, 6, 3, 4, 6, generator=g)
    text, uncond = torch.randn(2, 7, 12, generator=g), torch.randn(2, 7, 12, generator=g)
    ref = pipe(prompt_embeds=text, negative_prompt_embeds=uncond, latents=noise.clone(), height=32, width=48,
               num_frames=9, num_inference_steps=4, guidance_scale=3.0, output_type="latent").frames
    out = _fvfunc_sample(params_of(m), cfg, noise, text, uncond, {}, 4, 3.0)
    assert rel(out, ref) <= 1e-5


# ------------------------------------------------------------------ training on FastVideo's i2v parquet


def _write_i2v_parquet(path, rows, drop=()):
    """FastVideo's pyarrow_schema_i2v rows, as it writes them: tobytes / list(shape) / str(dtype), zstd,
    one row group a file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"id": [], "file_name": [], "caption": [], "media_type": [], "width": [], "height": [],
            "num_frames": [], "duration_sec": [], "fps": []}
    for r in rows:
        for name, tensor in r["tensors"].items():
            if name in drop:
                continue
            cols.setdefault(f"{name}_bytes", []).append(tensor.numpy().tobytes())
            cols.setdefault(f"{name}_shape", []).append(list(tensor.shape))
            cols.setdefault(f"{name}_dtype", []).append(str(tensor.dtype).removeprefix("torch."))
        for k, v in dict(id=r["id"], file_name=f"{r['id']}.mp4", caption=r["caption"], media_type="video", width=16,
                         height=16, num_frames=5, duration_sec=0.3, fps=16.0).items():
            cols[k].append(v)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path, compression="zstd", row_group_size=len(rows))


@pytest.fixture(scope="module")
def i2v_world(tmp_path_factory):
    from fvfunc.testing import tiny

    root = tmp_path_factory.mktemp("i2v")
    cfg = tiny.tiny_config(in_channels=36, out_channels=16, image_dim=8, added_kv_proj_dim=32)
    tiny.write_pipeline(root / "model", cfg=cfg)
    g = torch.Generator().manual_seed(0)
    rows = [dict(id=f"s{i}", caption=f"clip {i}", tensors={
        "vae_latent": torch.randn(16, 2, 4, 4, generator=g), "text_embedding": torch.randn(3 + i % 3, 32, generator=g),
        "clip_feature": torch.randn(5, 8, generator=g), "first_frame_latent": torch.randn(16, 2, 4, 4, generator=g),
        "pil_image": torch.randint(0, 255, (3, 16, 16), generator=g, dtype=torch.uint8)}) for i in range(4)]
    _write_i2v_parquet(root / "data" / "worker_0" / "data_chunk_0.parquet", rows)
    _write_i2v_parquet(root / "noclip" / "data_chunk_0.parquet", rows, drop=("clip_feature",))
    return {"model": root / "model", "data": root / "data", "noclip": root / "noclip"}


def _cfg(world, method, out, data=None, **training):
    import dataclasses

    import configs
    from fvfunc.losses import METHODS

    run = METHODS[method].run()
    model = str(world["model"])
    roles = configs.RolesConfig(student=configs.RoleConfig(path=model, trainable=True),
                                teacher=configs.RoleConfig(path=model, dtype="float32"),
                                critic=configs.RoleConfig(path=model, trainable=True))
    t = dict(output_dir=str(out), max_steps=4, batch_size=2, checkpoint_every=2, precision="float32", device="cpu",
             lr=1e-3, keep_checkpoints=0, export=False)
    t.update(training)
    m = run.method
    if method == "dmd2":
        m = dataclasses.replace(m, latent_shape=(2, 4, 4), generator_update_interval=2, critic_lr=1e-3)
    return dataclasses.replace(run, roles=roles, training=dataclasses.replace(run.training, **t),
                               data=configs.DataConfig(path=(str(data or world["data"]),)), method=m,
                               tracking=configs.TrackingConfig(wandb_mode="disabled"))


@pytest.mark.parametrize("method", ["finetune", "dmd2"])
def test_i2v_trains_and_resumes_bitwise(i2v_world, tmp_path, method):
    import dataclasses
    import json

    import configs
    from fvfunc import checkpoint, trainer, tree

    cfg = _cfg(i2v_world, method, tmp_path / "full", max_steps=4)
    sampler = configs.SamplerConfig(kind="sde", timesteps=(1000, 500), guidance_scale=2.0)
    cfg = dataclasses.replace(cfg, validation=configs.ValidationConfig(every=4, num_prompts=2, sampler=sampler))
    full = trainer.run(method, cfg)
    assert len(list((full / "videos").glob("*.mp4"))) == 2  # validation samples with the rows' images
    half = tmp_path / "half"
    trainer.run(method, _cfg(i2v_world, method, half, max_steps=2))
    trainer.run(method, _cfg(i2v_world, method, half, max_steps=4, resume="latest"))
    a, _ = checkpoint.load(full / "checkpoint-4")
    b, _ = checkpoint.load(half / "checkpoint-4")
    for name in a:
        assert tree.equal(a[name], b[name]), name
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert all(all(v == v for k, v in r.items() if isinstance(v, float)) for r in rows)  # finite numbers
    # the image condition is used: the image projections have moved
    start = wan.load(i2v_world["model"])[1]
    key = "blocks.0.attn2.add_k_proj.weight"
    assert not torch.equal(a["student"][key], start[key])


def test_i2v_without_clip_feature_is_one_error_naming_the_column_and_file(i2v_world, tmp_path):
    from fvfunc import trainer
    from fvfunc.config_file import ConfigError

    with pytest.raises(ConfigError, match="data_chunk_0.parquet: no column clip_feature_bytes"):
        trainer.run("finetune", _cfg(i2v_world, "finetune", tmp_path / "o", data=i2v_world["noclip"]))
    assert not (tmp_path / "o").exists()


def test_i2v_a14b_pair_trains_on_i2v_data_and_resumes_bitwise(i2v_world, tmp_path):
    """A Wan2.2 I2V-A14B-like pair (experts of 36 input channels, no CLIP, boundary 0.9) trains on FastVideo's
    i2v rows (their first_frame_latent), both experts, and resumes bitwise; DMD2 of pairs runs on them."""
    import dataclasses

    from fvfunc import checkpoint, trainer, tree
    from fvfunc.testing import tiny

    pair = tiny.write_pair(tmp_path / "i2v_a14b", tiny.tiny_config(in_channels=36, out_channels=16), boundary=0.9)
    world = dict(i2v_world, model=pair)
    full = trainer.run("finetune", _cfg(world, "finetune", tmp_path / "full", max_steps=4))
    half = tmp_path / "half"
    trainer.run("finetune", _cfg(world, "finetune", half, max_steps=2))
    trainer.run("finetune", _cfg(world, "finetune", half, max_steps=4, resume="latest"))
    a, _ = checkpoint.load(full / "checkpoint-4")
    b, _ = checkpoint.load(half / "checkpoint-4")
    assert all(tree.equal(a[n], b[n]) for n in a)
    start = {n: wan.load(pair / n)[1] for n in ("transformer", "transformer_2")}
    moved = [n for n in start if not torch.equal(a["student"][f"{n}/patch_embedding.weight"],
                                                 start[n]["patch_embedding.weight"])]
    assert moved == ["transformer", "transformer_2"], moved  # both experts trained
    cfg = _cfg(world, "dmd2", tmp_path / "dmd2", max_steps=2)
    cfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, dmd_denoising_steps=(1000, 750)))
    trainer.run("dmd2", cfg)
    assert checkpoint.latest(tmp_path / "dmd2").name == "checkpoint-2"


# -------------------------------------------------------------- train.py sample from image files


def _i2v_folder(root, kind):
    """A tiny pipeline folder of an image-to-video model, with a VAE that compresses as its config says and,
    for Wan2.1 I2V, a tiny CLIP vision model and processor."""
    from fvfunc.testing import tiny

    c = {"i2v": I2V, "ti2v": TI2V, "a14b": A14B_I2V,  # FLF2V: the tiny CLIP's 17 tokens for each image
         "flf2v": dict(FLF2V, pos_embed_seq_len=2 * 17)}[kind]
    cfg = wan.config_from_dict({"patch_size": (1, 2, 2), **c, "expand_timesteps": kind == "ti2v"})
    return tiny.write_pipeline(root / kind, cfg, seed=5, full_vae=True, image_encoder="image_dim" in c), cfg


def _png(path, seed, size=(40, 56)):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("kind, per_prompt", [("i2v", False), ("i2v", True), ("ti2v", False), ("a14b", False),
                                              ("flf2v", False), ("flf2v", True)],
                         ids=["i2v", "i2v-one-image-a-prompt", "ti2v", "i2v-a14b-expert", "flf2v",
                              "flf2v-two-images-a-prompt"])
def test_train_py_sample_from_image_files_equals_wan_image_to_video_pipeline(tmp_path, kind, per_prompt):
    from diffusers import WanImageToVideoPipeline
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from fvfunc import cli

    folder, cfg = _i2v_folder(tmp_path, kind)
    g = torch.Generator().manual_seed(6)
    B, C, T, H, W = 2, cfg.out_channels, 3, 4, 6
    text = torch.zeros(B, TEXT, 12)
    text[:, :5] = torch.randn(B, 5, 12, generator=g)
    negative = torch.zeros(1, TEXT, 12)
    negative[:, :3] = torch.randn(1, 3, 12, generator=g)
    noise = torch.randn(B, C, T, H, W, generator=g)
    for name, t in (("text", text), ("negative", negative), ("noise", noise)):
        save_file({name: t}, tmp_path / f"{name}.safetensors")
    images = [_png(tmp_path / f"image{i}.png", i) for i in range(2 if per_prompt else 1)]
    lasts = [_png(tmp_path / f"last{i}.png", 10 + i, (24, 72)) for i in range(len(images))] if kind == "flf2v" \
        else []
    argv = ["sample", "--model", str(folder), "--prompts", str(tmp_path / "text.safetensors"),
            "--negative-prompt-embedding", str(tmp_path / "negative.safetensors"), "--image", *map(str, images),
            *(["--last-image", *map(str, lasts)] if lasts else []),
            "--noise", str(tmp_path / "noise.safetensors"), "--sampler.kind", "unipc", "--sampler.num-steps", "4",
            "--sampler.shift", "3", "--sampler.guidance-scale", "3", "--output-dir", str(tmp_path / "out"),
            "--device", "cpu", "--precision", "float32"]
    assert cli.main(argv) == 0
    got = torch.stack([load_file(tmp_path / "out" / f"sample-{i}.safetensors")["latents"] for i in range(B)])

    pipe = WanImageToVideoPipeline.from_pretrained(folder, tokenizer=None, text_encoder=None)
    assert pipe.config.expand_timesteps == (kind == "ti2v")
    pipe.set_progress_bar_config(disable=True)

    def ref(i, rows):
        last = Image.open(lasts[i]) if lasts else None
        return pipe(image=Image.open(images[i]), last_image=last, prompt_embeds=text[rows],
                    negative_prompt_embeds=negative.expand(len(rows), -1, -1), latents=noise[rows].clone(),
                    height=8 * H, width=8 * W, num_frames=4 * (T - 1) + 1, num_inference_steps=4, guidance_scale=3.0,
                    output_type="latent").frames

    want = torch.cat([ref(i, [i]) for i in range(B)]) if per_prompt else ref(0, list(range(B)))
    assert rel(got, want) <= 1e-5
    assert (tmp_path / "out" / "sample-1.mp4").is_file()


def test_sample_image_errors(tmp_path, capsys):
    from safetensors.torch import save_file

    from fvfunc import cli
    from fvfunc.testing import tiny

    i2v, _ = _i2v_folder(tmp_path, "i2v")
    flf2v = tiny.write_pipeline(tmp_path / "flf2v", wan.config_from_dict(dict(FLF2V, patch_size=(1, 2, 2))))
    t2v = tiny.write_pipeline(tmp_path / "t2v")
    save_file({"text": torch.zeros(2, 4, 12)}, tmp_path / "text.safetensors")
    (tmp_path / "not.png").write_text("not an image")
    png = _png(tmp_path / "a.png", 0)
    base = ["sample", "--prompts", str(tmp_path / "text.safetensors"), "--output-dir", str(tmp_path / "o")]
    cases = [(["--model", str(i2v), "--image", str(tmp_path / "nope.png")], "image: " + str(tmp_path / "nope.png")
              + " is not a file"),
             (["--model", str(i2v), "--image", str(tmp_path / "not.png")], "is not an image file PIL can read"),
             (["--model", str(t2v), "--image", str(png)], "is a text-to-video model (it takes no image condition)"),
             (["--model", str(i2v)], "is an image-to-video model: give --image FILE"),
             (["--model", str(i2v), "--image", str(png), "--last-image", str(png)], "last_image: " + str(i2v)
              + " takes no last frame"),
             (["--model", str(flf2v), "--image", str(png)], "give a --last-image for every --image (1 given, 0 last)"),
             (["--model", str(flf2v), "--image", str(png), "--last-image", str(tmp_path / "not.png")],
              "last_image: " + str(tmp_path / "not.png") + " is not an image file PIL can read")]
    for args, message in cases:
        assert cli.main([*base, *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("error:") == 1, (args, err)
    assert not (tmp_path / "o").exists()


def test_export_of_an_i2v_student_is_a_pipeline_wan_image_to_video_pipeline_loads(i2v_world, tmp_path):
    import dataclasses
    import json
    import shutil

    import diffusers
    from diffusers import WanImageToVideoPipeline
    from PIL import Image
    from transformers import CLIPVisionModel

    import configs
    from fvfunc import checkpoint, trainer, tree
    from fvfunc.testing import tiny

    cfg = wan.load_config(i2v_world["model"])
    source = tiny.write_pipeline(tmp_path / "source", cfg, full_vae=True, text_encoder=True, image_encoder=True)
    run = _cfg(i2v_world, "finetune", tmp_path / "run", max_steps=2, export=True)
    run = dataclasses.replace(run, roles=dataclasses.replace(run.roles, student=configs.RoleConfig(
        path=str(source), trainable=True)))
    out = trainer.run("finetune", run)
    folder = out / "export"
    assert sorted(p.name for p in folder.iterdir()) == ["image_encoder", "image_processor", "model_index.json",
                                                         "scheduler", "text_encoder", "tokenizer", "transformer",
                                                         "vae"]
    index = json.loads((source / "model_index.json").read_text())
    assert json.loads((folder / "model_index.json").read_text()) == {**index, "_diffusers_version":
                                                                     diffusers.__version__}
    trained, _ = checkpoint.load(out / "checkpoint-2")
    assert tree.equal(wan.load(folder)[1], trained["student"])
    shutil.rmtree(source)  # the export needs nothing of its source

    pipe = WanImageToVideoPipeline.from_pretrained(folder)  # as is
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.image_encoder, CLIPVisionModel) and pipe.image_processor is not None
    image = Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    text = torch.randn(1, TEXT, 32, generator=torch.Generator().manual_seed(1))  # (the pipeline's prompt cleaning
    latents = pipe(image=image, prompt_embeds=text, negative_prompt_embeds=text * 0, height=32,  # needs ftfy)
                   width=32, num_frames=5, num_inference_steps=2, output_type="latent").frames
    assert latents.shape == (1, 16, 2, 4, 4) and torch.isfinite(latents).all()


# ------------------------------------------------------------------------------------------ kd


def test_kd_generates_image_conditioned_trajectories_and_trains_on_them(i2v_world, tmp_path):
    import dataclasses

    import configs
    from fvfunc import data, random, trainer
    from fvfunc import samplers as S
    from fvfunc.losses import kd
    from fvfunc.losses.spec import CLIP_FEATURE, FIRST_FRAME_LATENT, TEXT

    run = _cfg(i2v_world, "kd", tmp_path / "kd", max_steps=2)
    run = dataclasses.replace(
        run, method=dataclasses.replace(run.method, t_list=(1000, 500), latent_shape=(2, 4, 4), teacher_steps=3,
                                        chunk=2, guidance_scale=2.0, seed=3),
        roles=dataclasses.replace(run.roles, critic=configs.RoleConfig()),
        validation=configs.ValidationConfig(every=2, num_prompts=2))
    out = trainer.run("kd", run)
    assert len(list((out / "videos").glob("*.mp4"))) == 2  # validation with the trajectories' image conditions
    n = run.data.text_len
    traj = data.ParquetDataset(out / "trajectories", (*kd.TRAJECTORIES, CLIP_FEATURE, FIRST_FRAME_LATENT), text_len=n)
    source = data.ParquetDataset(i2v_world["data"], (TEXT, CLIP_FEATURE, FIRST_FRAME_LATENT), text_len=n)
    assert len(traj) == len(source) == 4
    got, rows = traj.batch([0, 1, 2, 3]), source.batch([0, 1, 2, 3])
    for k in ("clip_feature", "first_frame_latent", "text"):  # each trajectory carries its source row's condition
        assert torch.equal(got[k], rows[k]), k
    # each trajectory is the teacher's UniPC run with its own row's condition (a plain loop here)
    cfg, params = wan.load(i2v_world["model"])
    sigmas, at = kd.teacher_sigmas(run.method)
    for i in (0, 3):
        cond = {k: rows[k][i:i + 1] for k in ("clip_feature", "first_frame_latent")}

        def fn(x, t, c, cond=cond):
            return wan.apply(params, cfg, x, t, c, {k: v.repeat(x.shape[0], *[1] * (v.ndim - 1))
                                                    for k, v in cond.items()})

        noise = random.normal(random.fold_in(random.key(3), i), (16, 2, 4, 4))[None]
        with torch.no_grad():
            end, states = S.sample(S.guided(fn, rows["text"][i:i + 1], None, 2.0), noise, sigmas.float(), "unipc",
                                   states=True, timesteps=S.model_timesteps(sigmas, "unipc"))
        want = torch.stack([states[j] for j in at] + [end], dim=1)[0]
        assert torch.allclose(got["trajectory"][i], want, rtol=1e-5, atol=1e-5), i
    other = {k: rows[k][1:2].repeat(2, *[1] * (rows[k].ndim - 1)) for k in ("clip_feature", "first_frame_latent")}
    with torch.no_grad():
        moved = S.sample(S.guided(lambda x, t, c: wan.apply(params, cfg, x, t, c, other), rows["text"][:1], None, 2.0),
                         noise, sigmas.float(), "unipc", timesteps=S.model_timesteps(sigmas, "unipc"))
    assert not torch.allclose(moved, got["trajectory"][3, -1], atol=1e-3)  # the condition matters
    # and the cache trains a student without the teacher: the image columns are read with the trajectories
    again = dataclasses.replace(run, roles=dataclasses.replace(run.roles, teacher=configs.RoleConfig()),
                                data=configs.DataConfig(path=(str(out / "trajectories"),)),
                                training=dataclasses.replace(run.training, output_dir=str(tmp_path / "kd2")),
                                validation=configs.ValidationConfig())
    start = wan.load(i2v_world["model"])[1]
    from fvfunc import checkpoint

    trained, _ = checkpoint.load(trainer.run("kd", again) / "checkpoint-2")
    assert not torch.equal(trained["student"]["blocks.0.attn2.add_k_proj.weight"],
                           start["blocks.0.attn2.add_k_proj.weight"])


# ---------------------------------------------------------------------------------- preprocessing


def _write_clips(root, h, w):
    """root/videos/{a,b}.mp4: smooth moving gradients at the target size (no resizing), 5 frames at 4 fps, and
    root/captions.json naming them."""
    import json

    import imageio.v2 as imageio
    import numpy as np

    videos = root / "videos"
    videos.mkdir()
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    for name in ("a", "b"):
        frames = [np.clip(np.stack([(x * 9 + t * 7) % 256, (y * 11 + t * 5) % 256, (x + y + 40 * t) % 256], -1)
                          + rng.integers(0, 20, (h, w, 3)), 0, 255).astype(np.uint8) for t in range(5)]
        with imageio.get_writer(videos / f"{name}.mp4", fps=4, codec="libx264", macro_block_size=1) as writer:
            for f in frames:
                writer.append_data(f)
    (root / "captions.json").write_text(json.dumps([{"path": "a.mp4", "cap": ["a cat"]},
                                                     {"path": "b.mp4", "cap": ["a dog runs"]}]))
    return videos


def _preprocess_args(model, root, out, h, w, *more):
    return ["preprocess", "--model", str(model), "--videos", str(root / "videos"), "--captions",
            str(root / "captions.json"), "--output", str(out), "--height", str(h), "--width", str(w),
            "--num-frames", "5", "--fps", "4", "--device", "cpu", *more]


def _decoded(path):
    """The clip's decoded frames [3, F, h, w] in [-1, 1]."""
    import imageio.v2 as imageio
    import numpy as np

    frames = torch.from_numpy(np.stack(imageio.mimread(path))).float()
    return (frames / 255 * 2 - 1).permute(3, 0, 1, 2)


def _finetune_args(model, data, out):
    return ["finetune", "--roles.student.path", str(model), "--data.path", str(data), "--training.output-dir",
            str(out), "--training.max-steps", "2", "--training.batch-size", "2", "--training.device", "cpu",
            "--training.precision", "float32", "--tracking.wandb-mode", "disabled"]


def test_preprocess_writes_the_i2v_columns_of_each_clips_first_frame_and_finetune_trains_on_them(tmp_path, capsys):

    import imageio.v2 as imageio
    import numpy as np
    import pyarrow.parquet as pq
    from diffusers import AutoencoderKLWan
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModel

    from fvfunc import cli, data
    from fvfunc.losses.spec import CLIP_FEATURE, FIRST_FRAME_LATENT, LATENTS
    from fvfunc.testing import tiny

    cfg = tiny.tiny_config(in_channels=36, out_channels=16, image_dim=8, added_kv_proj_dim=32)
    model = tiny.write_pipeline(tmp_path / "model", cfg, full_vae=True, text_encoder=True, image_encoder=True)
    videos = _write_clips(tmp_path, 16, 32)
    out = tmp_path / "data"
    code = cli.main(_preprocess_args(model, tmp_path, out, 16, 32))
    assert code == 0, capsys.readouterr().err
    names = pq.read_schema(next(out.glob("*.parquet"))).names
    assert names[:10] == ["id", "vae_latent_bytes", "vae_latent_shape", "vae_latent_dtype", "text_embedding_bytes",
                          "text_embedding_shape", "text_embedding_dtype", "clip_feature_bytes", "clip_feature_shape",
                          "clip_feature_dtype"]  # FastVideo's pyarrow_schema_i2v order
    ds = data.ParquetDataset(out, (LATENTS, CLIP_FEATURE, FIRST_FRAME_LATENT))  # latents as stored
    vae = AutoencoderKLWan.from_pretrained(model / "vae").eval()
    mean = torch.tensor(vae.config.latents_mean).view(-1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(-1, 1, 1, 1)
    processor = CLIPImageProcessor.from_pretrained(model / "image_processor")
    clip = CLIPVisionModel.from_pretrained(model / "image_encoder").eval()
    for i in range(len(ds)):
        row = ds[i]
        first = np.stack(imageio.mimread(videos / f"{row['id']}.mp4"))[0]  # the decoded first frame
        pixels = torch.from_numpy(first).permute(2, 0, 1).float() / 255 * 2 - 1
        video = torch.cat([pixels[:, None], torch.zeros(3, 4, 16, 32)], dim=1)[None]
        with torch.no_grad():
            want = (vae.encode(video).latent_dist.mode()[0] - mean) / std
            tokens = clip(**processor(images=[Image.fromarray(first)], return_tensors="pt"),
                          output_hidden_states=True).hidden_states[-2][0]
        assert row["first_frame_latent"].shape == row["latents"].shape == (16, 2, 2, 4)
        assert rel(row["first_frame_latent"], want) <= 1e-5
        assert rel(row["clip_feature"], tokens) <= 1e-5
    # and the I2V model trains on them
    assert cli.main(_finetune_args(model, out, tmp_path / "run")) == 0, capsys.readouterr().err


def _pil(frame):
    from PIL import Image

    return Image.fromarray(((frame + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())


@pytest.mark.parametrize("kind", ["ti2v", "a14b", "flf2v"])
def test_preprocess_ti2v_with_the_wan22_vae_i2v_a14b_and_flf2v_and_finetune_trains_on_them(tmp_path, capsys, kind):
    """Each model's condition of the clip, as WanImageToVideoPipeline.prepare_latents builds it from the first
    (FLF2V: and last) frame: TI2V the Wan2.2 VAE's latent of the first frame alone (and the clip's latents with
    that VAE, 16x spatial), Wan2.2 I2V-A14B the first frame then zeros, FLF2V the first frame, zeros, the last
    and the CLIP tokens of both; then the model trains on the rows."""
    import json

    import pyarrow.parquet as pq
    from diffusers import AutoencoderKLWan
    from transformers import CLIPImageProcessor, CLIPVisionModel

    from fvfunc import cli, data
    from fvfunc.losses.spec import CLIP_FEATURE, FIRST_FRAME_LATENT, LATENTS
    from fvfunc.testing import tiny

    c = {"ti2v": dict(in_channels=16, expand_timesteps=True), "a14b": dict(in_channels=36),
         "flf2v": dict(in_channels=36, image_dim=8, added_kv_proj_dim=32, pos_embed_seq_len=2 * 17)}[kind]
    cfg = tiny.tiny_config(out_channels=16, **c)
    model = tiny.write_pipeline(tmp_path / "model", cfg, full_vae=kind != "ti2v", wan22_vae=kind == "ti2v",
                                text_encoder=True, image_encoder=kind == "flf2v")
    h, w = (32, 64) if kind == "ti2v" else (16, 32)  # the Wan2.2 VAE's 16 pixels a latent x the patch's 2
    videos = _write_clips(tmp_path, h, w)
    out = tmp_path / "data"
    assert cli.main(_preprocess_args(model, tmp_path, out, h, w)) == 0, capsys.readouterr().err
    names = pq.read_schema(next(out.glob("*.parquet"))).names
    assert "first_frame_latent_bytes" in names and ("clip_feature_bytes" in names) == (kind == "flf2v")
    ds = data.ParquetDataset(out, (LATENTS, FIRST_FRAME_LATENT) + ((CLIP_FEATURE,) if kind == "flf2v" else ()))
    vae = AutoencoderKLWan.from_pretrained(model / "vae").eval()
    mean = torch.tensor(vae.config.latents_mean).view(-1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(-1, 1, 1, 1)
    for i in range(len(ds)):
        row = ds[i]
        clip = _decoded(videos / f"{row['id']}.mp4")
        first, last = clip[:, :1], clip[:, -1:]
        video = {"ti2v": first, "a14b": torch.cat([first, torch.zeros(3, 4, h, w)], dim=1),
                 "flf2v": torch.cat([first, torch.zeros(3, 3, h, w), last], dim=1)}[kind]
        with torch.no_grad():
            want = (vae.encode(video[None]).latent_dist.mode()[0] - mean) / std
            latents = vae.encode(clip[None]).latent_dist.mean[0]
        s = 16 if kind == "ti2v" else 8
        assert row["latents"].shape == latents.shape == (16, 2, h // s, w // s)
        assert rel(row["latents"], latents) <= 1e-5
        assert row["first_frame_latent"].shape == want.shape
        assert rel(row["first_frame_latent"], want) <= 1e-5
        if kind == "ti2v":  # the causal VAE: the first frame alone is the clip's first latent frame
            assert rel(row["first_frame_latent"], (latents[:, :1] - mean) / std) <= 1e-5
        if kind == "flf2v":
            processor = CLIPImageProcessor.from_pretrained(model / "image_processor")
            encoder = CLIPVisionModel.from_pretrained(model / "image_encoder").eval()
            with torch.no_grad():
                tokens = encoder(**processor(images=[_pil(first[:, 0]), _pil(last[:, 0])], return_tensors="pt"),
                                 output_hidden_states=True).hidden_states[-2]
            assert row["clip_feature"].shape == (34, 8)
            assert rel(row["clip_feature"], torch.cat([tokens[0], tokens[1]])) <= 1e-5
    assert cli.main(_finetune_args(model, out, tmp_path / "run")) == 0, capsys.readouterr().err
    if kind == "ti2v":  # text-to-video data from the TI2V folder: no image condition written, none trained on
        t2v = tmp_path / "t2v"
        assert cli.main(_preprocess_args(model, tmp_path, t2v, h, w, "--no-image-condition")) == 0
        assert not any(n.startswith("first_frame") for n in pq.read_schema(next(t2v.glob("*.parquet"))).names)
        assert json.loads((t2v / "preprocess.json").read_text())["image_condition"] is False
        assert cli.main(_finetune_args(model, t2v, tmp_path / "run_t2v")) == 0, capsys.readouterr().err
    if kind == "flf2v":  # a first and a last frame: one-frame clips are refused before any model loads
        args = _preprocess_args(model, tmp_path, tmp_path / "one", h, w)
        args[args.index("--num-frames") + 1] = "1"
        assert cli.main(args) == 2
        assert "num_frames: " in capsys.readouterr().err


def test_toy_image_condition_and_i2v_dataset(tmp_path):
    from fvfunc import data, random
    from fvfunc.losses.spec import CLIP_FEATURE, FIRST_FRAME_LATENT, LATENTS
    from fvfunc.testing import toy

    task = toy.Task()
    labels = toy.labels_for(8)
    rgb = toy.render(random.key(0), labels, task)
    cond = toy.image_condition(rgb, task)
    # the latent decodes to the first frame followed by black frames; the tokens are the first frame's patches
    video = toy.decode(cond["first_frame_latent"], task)
    assert torch.allclose(video[:, :, 0], rgb[:, :, 0], atol=1e-5) and video[:, :, 1:].abs().max() < 1e-5
    tokens = cond["clip_feature"]
    assert tokens.shape == (8, (task.size // toy.IMAGE_PATCH) ** 2, toy.image_dim(task))
    patch = (rgb[:, :, 0, :4, 4:8] - task.offset) / task.scale  # the second patch of the first row
    assert torch.allclose(tokens[:, 1], patch.reshape(8, -1), atol=1e-6)
    toy.write_i2v_dataset(tmp_path / "d", 8, random.key(0), task, rows_per_file=4)
    ds = data.ParquetDataset(tmp_path / "d", (LATENTS, CLIP_FEATURE, FIRST_FRAME_LATENT))
    b = ds.batch(list(range(8)))
    assert torch.equal(b["first_frame_latent"], cond["first_frame_latent"])
    assert torch.equal(b["clip_feature"], tokens) and torch.equal(b["latents"], toy.encode(rgb, task))
