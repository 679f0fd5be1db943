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
