"""The seam, tried as a contributor would: a model family written here, in one file's worth of code,
registered with one line, trains, validates, resumes and exports through train.py's machinery with
no other change; the block runner's remat and attention backends apply to it as to Wan."""

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import configs
from fvfunc import checkpoint, models, random, runner, trainer, tree
from fvfunc.models import Family, Latents, ModelError
from fvfunc.ops import patchify, timestep_embedding, unpatchify

# ------------------------------------------------------------ a family: a tiny attention-MLP video model


@dataclasses.dataclass(frozen=True)
class MixerConfig:
    channels: int = 16
    dim: int = 32
    text_dim: int = 32
    layers: int = 2
    patch: tuple[int, int, int] = (1, 2, 2)


def param_shapes(cfg):
    p = cfg.channels * cfg.patch[0] * cfg.patch[1] * cfg.patch[2]
    shapes = {"proj_in": (cfg.dim, p), "time": (cfg.dim, 32), "text": (cfg.dim, cfg.text_dim),
              "proj_out": (p, cfg.dim)}
    for i in range(cfg.layers):
        shapes |= {f"blocks.{i}.qkv": (3 * cfg.dim, cfg.dim), f"blocks.{i}.mlp": (cfg.dim, cfg.dim)}
    return shapes


def init(cfg, key, dtype=torch.float32, device=None):
    return {k: (random.normal(random.fold_in(key, i), s, device=device) / s[1] ** 0.5).to(dtype)
            for i, (k, s) in enumerate(param_shapes(cfg).items())}


def embed(params, cfg, x, t, context, dtype):
    grid = tuple(n // p for n, p in zip(x.shape[2:], cfg.patch, strict=True))
    h = patchify(x.to(dtype), cfg.patch) @ params["proj_in"].to(dtype).T
    cond = timestep_embedding(t, 32).to(dtype) @ params["time"].to(dtype).T
    cond = cond + context.to(dtype).mean(1) @ params["text"].to(dtype).T
    return h, (cond[:, None], grid)


def block(params, cfg, h, inputs, dtype, attend):
    q, k, v = ((h + inputs[0]) @ params["qkv"].to(dtype).T).chunk(3, dim=-1)
    h = h + attend(*(a.unflatten(-1, (2, -1)) for a in (q, k, v)), False).flatten(-2)
    return h + F.gelu(h @ params["mlp"].to(dtype).T)


def head(params, cfg, h, inputs, dtype):
    return unpatchify(h @ params["proj_out"].to(dtype).T, inputs[1], cfg.patch)


def load_config(folder):
    path = Path(folder) / "mixer.json"
    if not path.is_file():
        raise ModelError(f"{folder}: no mixer.json")
    d = json.loads(path.read_text())
    return MixerConfig(**{**d, "patch": tuple(d["patch"])})


def load(folder, dtype=None, device=None, rows=None, variant=""):
    del rows, variant
    cfg = load_config(folder)
    weights = load_file(Path(folder) / "w.safetensors")
    return cfg, {k: v.to(dtype=dtype or v.dtype, device=device) for k, v in weights.items()}


def save(folder, cfg, params):
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "mixer.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, str(Path(folder) / "w.safetensors"))


MIXER = Family(name="mixer", load_config=load_config, load=load, save=save, init=init, param_shapes=param_shapes,
               num_blocks=lambda cfg: cfg.layers, embed=embed, block=block, head=head,
               latents=lambda cfg, folder: Latents((cfg or MixerConfig()).channels, (1, 2, 2), 4, 8, None, None),
               load_vae=lambda folder, device: None, decode=None)


# ---------------------------------------------------------------------------------- through the trainer


def test_a_new_family_is_one_module_and_one_registry_line(world, tmp_path, monkeypatch):
    monkeypatch.setitem(models.FAMILIES, "mixer", MIXER)  # the one registry line
    cfg = MixerConfig()
    save(tmp_path / "mixer", cfg, init(cfg, random.key(0)))
    student = configs.RoleConfig(family="mixer", path=str(tmp_path / "mixer"), trainable=True)

    def run_cfg(out, **t):
        base = configs.FinetuneRun()
        training = dict(output_dir=str(out), max_steps=4, batch_size=2, checkpoint_every=2, device="cpu",
                        precision="float32", remat="full", lr=1e-3)
        return dataclasses.replace(
            base, roles=configs.RolesConfig(student=student),
            training=dataclasses.replace(base.training, **{**training, **t}),
            data=configs.DataConfig(path=(str(world["data"]),)),
            validation=dataclasses.replace(base.validation, every=4, num_prompts=1,
                                           sampler=configs.SamplerConfig(kind="ode", num_steps=2)),
            tracking=configs.TrackingConfig(wandb_mode="disabled"))

    full = trainer.run("finetune", run_cfg(tmp_path / "full"))
    trainer.run("finetune", run_cfg(tmp_path / "half", max_steps=2))
    half = trainer.run("finetune", run_cfg(tmp_path / "half", resume="latest"))
    a, _ = checkpoint.load(full / "checkpoint-4")
    b, _ = checkpoint.load(half / "checkpoint-4")
    assert all(tree.equal(a[n], b[n]) for n in a)  # exact resume
    assert not tree.equal(a["student"], init(cfg, random.key(0)))  # it trained
    assert (full / "videos" / "step-000004-prompt-0.mp4").is_file()  # validation (a latent preview: no VAE)
    assert tree.equal(load(full / "export" / "transformer")[1], a["student"])  # its own file format


def test_the_runner_gives_any_family_remat_and_attention_backends():
    cfg = MixerConfig()
    params = init(cfg, random.key(1))
    x, t, ctx = random.normal(random.key(2), (2, 16, 2, 4, 4)), torch.tensor([300.0, 700.0]), torch.ones(2, 5, 32)

    def grads(**options):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        loss = runner.apply(MIXER, leaves, cfg, x, t, ctx, **options).square().mean()
        return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))

    plain = grads()
    assert tree.max_rel_error(grads(remat="full"), plain) <= 1e-6
    assert tree.max_rel_error(grads(remat="attention", remat_fraction=0.5), plain) <= 1e-6
    assert tree.max_rel_error(grads(attention="math"), plain) <= 1e-5
