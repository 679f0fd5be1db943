"""Videos out: validation during training and the sample command."""

import dataclasses

import imageio.v2 as imageio
import numpy as np
import pytest
from test_trainer import make_cfg

import configs
from fvfunc import checkpoint, sample, trainer, validation
from fvfunc.losses import METHODS


def read_mp4(path):
    reader = imageio.get_reader(path)
    frames = [f for f in reader]
    reader.close()
    return np.stack(frames)


def test_write_mp4_round_trip(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (5, 10, 14, 3), dtype=np.uint8)
    video = read_mp4(validation.write_mp4(tmp_path / "a.mp4", frames, fps=8))
    assert video.shape == (5, 10, 14, 3)


def test_validation_writes_mp4s_and_logs_them_to_wandb(world, tmp_path):
    cfg = make_cfg(world, "dmd2", tmp_path / "v", max_steps=2, checkpoint_every=0)
    cfg = dataclasses.replace(cfg, validation=dataclasses.replace(cfg.validation, every=2, num_prompts=2),
                              tracking=configs.TrackingConfig(wandb_mode="offline"))
    out = trainer.run("dmd2", cfg)
    videos = sorted((out / "videos").glob("*.mp4"))
    assert [v.name for v in videos] == ["step-000002-prompt-0.mp4", "step-000002-prompt-1.mp4"]
    for v in videos:
        # latent [2, 4, 4] through the tiny VAE (x2 spatial, no temporal compression): 2 frames of 8x8
        assert read_mp4(v).shape == (2, 8, 8, 3)
    logged = list((out / "wandb").glob("offline-run-*/files/media/videos/**/*.mp4"))
    assert len(logged) == 2


def test_dmd2_validation_samples_with_its_step_list(world, tmp_path):
    cfg = make_cfg(world, "dmd2", tmp_path / "s", max_steps=1)
    s = METHODS["dmd2"].sampler(cfg)
    assert s.kind == "sde" and s.timesteps == cfg.method.dmd_denoising_steps


@pytest.mark.parametrize("source", ["folder", "checkpoint"])
def test_sample_command(world, tmp_path, source):
    if source == "folder":
        model = world["model"]
    else:
        out = trainer.run("finetune", make_cfg(world, "finetune", tmp_path / "run", max_steps=1, ema_decay=0.5))
        model = checkpoint.latest(out)
    cfg = configs.SampleRun(model=str(model), prompts=str(world["text"]), num_prompts=2, latent_shape=(2, 4, 4),
                            sampler=configs.SamplerConfig(kind="unipc", num_steps=3, guidance_scale=3.0),
                            output_dir=str(tmp_path / "samples"), device="cpu", precision="float32")
    paths = sample.sample_command(cfg)
    assert len(paths) == 2
    assert read_mp4(paths[0]).shape == (2, 8, 8, 3)


def test_train_py_sample_subcommand(world, tmp_path):
    from fvfunc import cli

    code = cli.main(["sample", "--model", str(world["model"]), "--prompts", str(world["text"]),
                     "--num-prompts", "1", "--latent-shape", "2", "4", "4", "--sampler.kind", "sde",
                     "--sampler.timesteps", "1000", "500", "--output-dir", str(tmp_path / "o"),
                     "--device", "cpu", "--precision", "float32"])
    assert code == 0
    assert read_mp4(tmp_path / "o" / "sample-0.mp4").shape == (2, 8, 8, 3)
    assert cli.main(["sample", "--model", str(tmp_path / "nope"), "--prompts", str(world["text"])]) == 2
